//! What `inject --adapter` writes into a model's weights (modules_to_save, trained biases,
//! trainable tokens: values no branch carries), recorded in the model's metadata so that
//! `export-peft` gives them back under the adapter's own keys, read from the weights as they
//! are then (a training run may have changed them).
//!
//! ```text
//!   inject --adapter:  fold's report (layer of each whole module) ──► metadata record
//!   export-peft:       record ──► layer by node name ──► current values in torch's layout
//! ```

use serde::{Deserialize, Serialize};

use super::fold::{FoldReport, WholeTarget};
use super::weights;
use crate::adapter::peft::{Part, PeftType, split_key};
use crate::adapter::{Adapter, ModuleAdapter};
use crate::graph::ModelGraph;
use crate::onnx::pb::ModelProto;
use crate::onnx::pb_ext::WHOLE_KEY;
use crate::onnx::{DataType, LoadedModel};
use crate::target::{Candidate, Layout, norm};
use crate::tensor::Matrix;

/// The record under `WHOLE_KEY`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// The adapter's `adapter_config.json` entries that make PEFT load these tensors.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub tensors: Vec<Entry>,
    /// Modules whose values inject wrote into the weights without recording them (another
    /// format, a packed slice, an adapter whose config entries clash with an earlier one's):
    /// `export-peft` names them as left out even where a recorded tensor has their path.
    #[serde(default)]
    pub unrecorded: Vec<String>,
}

/// One tensor of the adapter file, and where the model holds it now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// The adapter module's path.
    pub module: String,
    /// The adapter file's key.
    pub key: String,
    /// The node reading the weight (by name: node indices move as branches come and go).
    pub node: String,
    /// The node's input that reads the weight.
    pub input: usize,
    pub what: What,
    /// The tensor's shape in the file (torch's).
    pub shape: Vec<usize>,
    /// torch's layout is the stored matrix transposed (a Linear read by a MatMul).
    #[serde(default)]
    pub transposed: bool,
    /// For `Rows`: the token indices, in the file's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<usize>,
    /// Not written: another copy of the tensor under `key` (a layer's own copy of a weight the
    /// module is read through, a tied output layer's channels), which must still hold what the
    /// written one holds, as PEFT's one module gives both.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    /// The weight the node reads (a normalization parameter: that parameter).
    Weight,
    /// The bias the layer adds.
    Bias,
    /// Rows of an embedding table (trainable tokens).
    Rows,
    /// An output layer's channels that hold the token rows (tied embeddings): a check.
    HeadRows,
}

/// The config entries that make PEFT load whole tensors (and `task_type`, which picks the
/// PeftModel class whose task adds a classifier to modules_to_save).
const CONFIG_KEYS: [&str; 4] = [
    "modules_to_save",
    "bias",
    "trainable_token_indices",
    "task_type",
];

/// The model's record; None when it has none, or one this version cannot read.
pub fn read(model: &ModelProto) -> Option<Record> {
    crate::onnx::pb_ext::lookup(&model.metadata_props, WHOLE_KEY)
        .and_then(|t| serde_json::from_str(t).ok())
}

/// Records where `report` (the fold that wrote `whole`, the whole-values part of `adapter`,
/// into `model`) put each of the `written` modules' tensors. Modules of other formats than a
/// PEFT LoRA folder, packed q/k/v slices, layers with no node name or a quantized weight, and
/// the modules of an adapter whose `bias` or `trainable_token_indices` differ from those of
/// one recorded before (one folder cannot hold both) are listed as unrecorded: `export-peft`
/// names them as left out.
pub fn record(
    model: &mut LoadedModel,
    adapter: &Adapter,
    whole: &Adapter,
    report: &FoldReport,
    written: &[&str],
) {
    let mut rec = read(&model.proto).unwrap_or_default();
    let mut new: Vec<Entry> = Vec::new();
    let mut unrecorded: Vec<String> = Vec::new();
    let peft = adapter.config.peft_type == PeftType::Lora && adapter.diffusers.is_none();
    // (list entries of modules_to_save add up; the other entries must agree)
    let clash = CONFIG_KEYS[1..].iter().any(|k| {
        let ours = adapter.config.raw.get(*k).filter(|v| !v.is_null());
        let theirs = rec.config.get(*k).filter(|v| !v.is_null());
        matches!((ours, theirs), (Some(a), Some(b)) if a != b && a != "none" && b != "none")
    });
    for m in whole
        .modules
        .iter()
        .filter(|m| written.contains(&m.path.as_str()))
    {
        let targets: Vec<&WholeTarget> =
            report.whole.iter().filter(|t| t.module == m.path).collect();
        let entries = (peft && !clash && m.part.is_none())
            .then(|| entries(m, &targets))
            .flatten();
        match entries {
            Some(entries) => new.extend(entries),
            None => unrecorded.push(m.path.clone()),
        }
    }
    if new.is_empty() && unrecorded.is_empty() {
        return;
    }
    if !new.is_empty() {
        // (a tensor written again: its new entries, and their checks, replace the earlier ones)
        rec.tensors.retain(|e| !new.iter().any(|n| n.key == e.key));
        rec.tensors.extend(new);
        for k in CONFIG_KEYS {
            let Some(v) = adapter.config.raw.get(k).filter(|v| !v.is_null()) else {
                continue;
            };
            let merged = match (rec.config.get(k), v) {
                (Some(serde_json::Value::Array(a)), serde_json::Value::Array(b)) => {
                    let mut a = a.clone();
                    a.extend(
                        b.iter()
                            .filter(|x| !a.contains(x))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                    serde_json::Value::Array(a)
                }
                (Some(earlier), now) if now == "none" => earlier.clone(),
                _ => v.clone(),
            };
            rec.config.insert(k.to_string(), merged);
        }
    }
    for m in unrecorded {
        if !rec.unrecorded.contains(&m) {
            rec.unrecorded.push(m);
        }
    }
    let text = serde_json::to_string(&rec).unwrap_or_default();
    super::branch::set_meta(&mut model.proto.metadata_props, WHOLE_KEY, text);
}

/// The entries of one module's tensors; None when one of them cannot be recorded.
fn entries(m: &ModuleAdapter, targets: &[&WholeTarget]) -> Option<Vec<Entry>> {
    let (heads, targets): (Vec<&WholeTarget>, Vec<&WholeTarget>) =
        targets.iter().partition(|t| t.tied_head);
    let first = &targets.first()?.cand;
    if targets
        .iter()
        .any(|t| t.packed || t.cand.node.is_empty() || t.cand.quantized)
    {
        return None;
    }
    let key_of = |want: &Part| {
        m.keys.iter().find(|k| {
            let stripped = k.strip_prefix("base_model.model.").unwrap_or(k);
            split_key(stripped).is_some_and(|(_, p)| p == *want)
        })
    };
    let entry = |key: &str, c: &Candidate, what: What, shape: &[usize]| Entry {
        module: m.path.clone(),
        key: key.to_string(),
        node: c.node.clone(),
        input: c.weight_input,
        what,
        shape: shape.to_vec(),
        transposed: false,
        rows: Vec::new(),
        check: false,
    };
    // (one entry per weight the module was written into: the first written, the others checked)
    let mut sources: Vec<&WholeTarget> = Vec::new();
    for t in &targets {
        if !sources
            .iter()
            .any(|s| s.cand.graph == t.cand.graph && s.cand.source == t.cand.source)
        {
            sources.push(t);
        }
    }
    let mut out = Vec::new();
    for (name, t) in &m.full {
        let key = key_of(&Part::Full(name))?;
        if first.layout == Layout::Norm {
            let c = targets
                .iter()
                .map(|t| &t.cand)
                .find(|c| norm::param(c) == Some(name.as_str()))?;
            out.push(entry(key, c, What::Weight, &t.shape));
            continue;
        }
        for (i, s) in sources.iter().enumerate() {
            let mut e = match name.as_str() {
                "weight" => {
                    let mut e = entry(key, &s.cand, What::Weight, &t.shape);
                    e.transposed = s.transposed?;
                    e
                }
                "bias" => entry(key, &s.cand, What::Bias, &t.shape),
                _ => return None,
            };
            e.check = i > 0;
            out.push(e);
        }
    }
    if let Some(tokens) = &m.tokens {
        let key = m
            .keys
            .iter()
            .find(|k| k.contains(".trainable_tokens_delta"))?;
        if first.layout != Layout::Embedding {
            return None;
        }
        for (i, s) in sources.iter().enumerate() {
            if s.cand.layout != Layout::Embedding {
                return None;
            }
            let mut e = entry(key, &s.cand, What::Rows, &tokens.values.shape);
            e.rows = tokens.indices.clone();
            e.check = i > 0;
            out.push(e);
        }
        for h in heads {
            if h.cand.node.is_empty() || h.cand.quantized {
                return None;
            }
            let mut e = entry(key, &h.cand, What::HeadRows, &tokens.values.shape);
            e.rows = tokens.indices.clone();
            e.check = true;
            out.push(e);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A tensor read back: its key, torch shape and float32 bytes.
pub type Tensor = (String, Vec<usize>, Vec<u8>);

/// The recorded tensors `model` (an injected model with its branches taken out) holds now,
/// and the modules left out: the unrecorded ones, and those one of whose tensors is not where
/// the record says (a renamed node, a changed shape, a weight that no longer reads as floats).
pub fn read_back(model: &LoadedModel, rec: &Record) -> (Vec<Tensor>, Vec<String>) {
    let graph = ModelGraph::build(&model.proto);
    let mut cands = crate::target::find_candidates(&model.proto, &graph);
    cands.extend(norm::find_norm_params(&model.proto, &graph));
    let mut failed: Vec<String> = rec.unrecorded.clone();
    let fail = |failed: &mut Vec<String>, m: &str| {
        if !failed.iter().any(|f| f == m) {
            failed.push(m.to_string());
        }
    };
    let (checks, written): (Vec<&Entry>, Vec<&Entry>) = rec.tensors.iter().partition(|e| e.check);
    let mut out: Vec<(&Entry, Vec<f32>)> = Vec::new();
    for e in written {
        if failed.contains(&e.module) {
            continue;
        }
        match value(model, &graph, &cands, e) {
            Some(v) => out.push((e, v)),
            None => fail(&mut failed, &e.module),
        }
    }
    // Another copy that no longer holds what the written one holds (trained apart): no PEFT
    // module gives both.
    for e in checks {
        let same = out
            .iter()
            .find(|(w, _)| w.key == e.key)
            .zip(value(model, &graph, &cands, e))
            .is_some_and(|((w, want), got)| {
                let dtype = |x: &Entry| stored_dtype(model, &graph, &cands, x);
                equal_in_dtypes(want, dtype(w), &got, dtype(e))
            });
        if !same {
            fail(&mut failed, &e.module);
        }
    }
    let out = out
        .into_iter()
        .filter(|(e, _)| !failed.contains(&e.module))
        .map(|(e, v)| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (e.key.clone(), e.shape.clone(), bytes)
        })
        .collect();
    (out, failed)
}

/// Whether two copies written with the same values still hold them: equal once rounded to the
/// coarser of their dtypes (None: unknown, compared as float32).
fn equal_in_dtypes(a: &[f32], da: Option<DataType>, b: &[f32], db: Option<DataType>) -> bool {
    let coarse = [da, db]
        .into_iter()
        .flatten()
        .filter(|d| matches!(d, DataType::Float16 | DataType::Bfloat16))
        .max_by_key(|d| matches!(d, DataType::Bfloat16));
    let round = |v: f32| match coarse {
        Some(DataType::Float16) => half::f16::from_f32(v).to_f32(),
        Some(DataType::Bfloat16) => half::bf16::from_f32(v).to_f32(),
        _ => v,
    };
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| round(*x) == round(*y))
}

/// The dtype of the weight an entry's layer reads.
fn stored_dtype(
    model: &LoadedModel,
    graph: &ModelGraph,
    cands: &[Candidate],
    e: &Entry,
) -> Option<DataType> {
    let c = cands
        .iter()
        .find(|c| c.node == e.node && c.weight_input == e.input)?;
    weights::stored(model, graph, c).ok().map(|w| w.dtype)
}

/// One entry's values in torch's layout; None when the model does not hold it as recorded.
fn value(
    model: &LoadedModel,
    graph: &ModelGraph,
    cands: &[Candidate],
    e: &Entry,
) -> Option<Vec<f32>> {
    // (the two bodies of an If, a merged decoder's, may name their nodes alike: they must read
    // one weight)
    let at: Vec<&Candidate> = cands
        .iter()
        .filter(|c| c.node == e.node && c.weight_input == e.input)
        .collect();
    let c = *at.first()?;
    if at
        .iter()
        .any(|d| d.source != c.source || d.source.is_none())
    {
        return None;
    }
    let len = e.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    let values = match e.what {
        What::Bias => super::fold::current_bias(model, graph, c)?,
        What::Weight => {
            let w = weights::read(model, graph, c).ok()?;
            let alpha = super::fold::gemm_alpha(model, graph, c);
            let mut v = if e.transposed {
                if e.shape.len() != 2 || w.values.len() != len {
                    return None;
                }
                Matrix::new(e.shape[1], e.shape[0], w.values)
                    .ok()?
                    .transposed()
                    .data
            } else {
                w.values
            };
            v.iter_mut().for_each(|x| *x *= alpha);
            v
        }
        What::Rows => {
            if c.layout != Layout::Embedding {
                return None;
            }
            let w = weights::stored(model, graph, c).ok()?;
            let dim = *e.shape.last()?;
            if w.n_out != dim {
                return None;
            }
            let mut v = Vec::with_capacity(len);
            for &r in &e.rows {
                v.extend(w.line(false, r).ok()?);
            }
            v
        }
        What::HeadRows => {
            let w = weights::stored(model, graph, c).ok()?;
            let alpha = super::fold::gemm_alpha(model, graph, c);
            let mut v = Vec::with_capacity(len);
            for &r in &e.rows {
                v.extend(w.line(true, r).ok()?.iter().map(|x| x * alpha));
            }
            v
        }
    };
    (values.len() == len).then_some(values)
}
