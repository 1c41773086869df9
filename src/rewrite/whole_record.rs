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
use crate::error::Result;
use crate::graph::ModelGraph;
use crate::onnx::LoadedModel;
use crate::onnx::pb::ModelProto;
use crate::onnx::pb_ext::WHOLE_KEY;
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
}

/// The config entries that make PEFT load whole tensors.
const CONFIG_KEYS: [&str; 3] = ["modules_to_save", "bias", "trainable_token_indices"];

/// The model's record; None when it has none, or one this version cannot read.
pub fn read(model: &ModelProto) -> Option<Record> {
    crate::onnx::pb_ext::lookup(&model.metadata_props, WHOLE_KEY)
        .and_then(|t| serde_json::from_str(t).ok())
}

/// Records where `report` (the fold that wrote `whole`, the whole-values part of `adapter`,
/// into `model`) put each module's tensors. `before` is the model before that fold, whose graph
/// the report's layers are of. Modules of other formats than a PEFT LoRA folder, packed q/k/v
/// slices, and layers with no node name or a weight that is no float matrix are not recorded:
/// `export-peft` names them as left out.
pub fn record(
    model: &mut LoadedModel,
    before: &LoadedModel,
    adapter: &Adapter,
    whole: &Adapter,
    report: &FoldReport,
) -> Result<()> {
    if adapter.config.peft_type != PeftType::Lora || adapter.diffusers.is_some() {
        return Ok(());
    }
    let graph = ModelGraph::build(&before.proto);
    let mut rec = read(&model.proto).unwrap_or_default();
    let mut any = false;
    for m in whole.modules.iter().filter(|m| m.part.is_none()) {
        let targets: Vec<&WholeTarget> =
            report.whole.iter().filter(|t| t.module == m.path).collect();
        if targets.is_empty() || targets.iter().any(|t| t.packed) {
            continue;
        }
        let cands: Vec<&Candidate> = targets.iter().map(|t| &t.cand).collect();
        if let Some(entries) = entries(before, &graph, m, &cands)? {
            rec.tensors
                .retain(|e| !entries.iter().any(|n| n.key == e.key));
            rec.tensors.extend(entries);
            any = true;
        }
    }
    if !any {
        return Ok(());
    }
    for k in CONFIG_KEYS {
        let Some(v) = adapter.config.raw.get(k).filter(|v| !v.is_null()) else {
            continue;
        };
        let merged = match (rec.config.get(k), v) {
            // (an adapter injected over another: both adapters' modules)
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
            (Some(serde_json::Value::String(a)), serde_json::Value::String(b)) if b == "none" => {
                serde_json::Value::String(a.clone())
            }
            _ => v.clone(),
        };
        rec.config.insert(k.to_string(), merged);
    }
    let text = serde_json::to_string(&rec).unwrap_or_default();
    match model
        .proto
        .metadata_props
        .iter_mut()
        .find(|p| p.key() == WHOLE_KEY)
    {
        Some(p) => p.value = Some(text),
        None => model
            .proto
            .metadata_props
            .push(super::branch::meta(WHOLE_KEY, &text)),
    }
    Ok(())
}

/// The entries of one module's tensors; None when one of them cannot be recorded.
fn entries(
    model: &LoadedModel,
    graph: &ModelGraph,
    m: &ModuleAdapter,
    cands: &[&Candidate],
) -> Result<Option<Vec<Entry>>> {
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
    };
    let mut out = Vec::new();
    let first = cands[0];
    if cands.iter().any(|c| c.node.is_empty() || c.quantized) {
        return Ok(None);
    }
    for (name, t) in &m.full {
        let Some(key) = key_of(&Part::Full(name)) else {
            return Ok(None);
        };
        if first.layout == Layout::Norm {
            let Some(c) = cands.iter().find(|c| norm::param(c) == Some(name.as_str())) else {
                return Ok(None);
            };
            out.push(entry(key, c, What::Weight, &t.shape));
            continue;
        }
        match name.as_str() {
            "weight" => {
                let Some(orient) = weights::orientation(first.layout) else {
                    return Ok(None);
                };
                let transposed = weights::saved_transposed(first, orient, t, || {
                    Ok(weights::read(model, graph, first)?.values)
                })?;
                let mut e = entry(key, first, What::Weight, &t.shape);
                e.transposed = transposed;
                out.push(e);
            }
            "bias" => out.push(entry(key, first, What::Bias, &t.shape)),
            _ => return Ok(None),
        }
    }
    if let Some(tokens) = &m.tokens {
        let Some(key) = m
            .keys
            .iter()
            .find(|k| k.contains(".trainable_tokens_delta"))
        else {
            return Ok(None);
        };
        if first.layout != Layout::Embedding {
            return Ok(None);
        }
        let mut e = entry(key, first, What::Rows, &tokens.values.shape);
        e.rows = tokens.indices.clone();
        out.push(e);
    }
    Ok((!out.is_empty()).then_some(out))
}

/// A tensor read back: its key, torch shape and values.
pub type Tensor = (String, Vec<usize>, Vec<f32>);

/// The recorded tensors `model` (an injected model with its branches taken out) holds now. A
/// module one of whose tensors is not found where the record says (a renamed node, a changed
/// shape) is left out whole; the second list names them.
pub fn read_back(model: &LoadedModel, rec: &Record) -> Result<(Vec<Tensor>, Vec<String>)> {
    let graph = ModelGraph::build(&model.proto);
    let mut cands = crate::target::find_candidates(&model.proto, &graph);
    cands.extend(norm::find_norm_params(&model.proto, &graph));
    let mut out: Vec<Tensor> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for e in &rec.tensors {
        if failed.contains(&e.module) {
            continue;
        }
        match value(model, &graph, &cands, e)? {
            Some(v) => out.push((e.key.clone(), e.shape.clone(), v)),
            None => failed.push(e.module.clone()),
        }
    }
    out.retain(|(k, _, _)| {
        rec.tensors
            .iter()
            .any(|e| e.key == *k && !failed.contains(&e.module))
    });
    Ok((out, failed))
}

/// One entry's values in torch's layout; None when the model does not hold it as recorded.
fn value(
    model: &LoadedModel,
    graph: &ModelGraph,
    cands: &[Candidate],
    e: &Entry,
) -> Result<Option<Vec<f32>>> {
    let mut at = cands
        .iter()
        .filter(|c| c.node == e.node && c.weight_input == e.input);
    let (Some(c), None) = (at.next(), at.next()) else {
        return Ok(None);
    };
    let len: usize = e.shape.iter().product();
    let values = match e.what {
        What::Bias => super::fold::current_bias(model, graph, c),
        What::Weight => {
            let w = weights::read(model, graph, c)?;
            let alpha = super::fold::gemm_alpha(model, graph, c);
            let mut v = if e.transposed {
                if e.shape.len() != 2 || w.values.len() != len {
                    return Ok(None);
                }
                Matrix::new(e.shape[1], e.shape[0], w.values)?
                    .transposed()
                    .data
            } else {
                w.values
            };
            v.iter_mut().for_each(|x| *x *= alpha);
            Some(v)
        }
        What::Rows => {
            let w = weights::read(model, graph, c)?;
            let dim = e.shape.last().copied().unwrap_or(0);
            let count = w.values.len() / dim.max(1);
            if c.layout != Layout::Embedding || e.rows.iter().any(|&r| r >= count) {
                return Ok(None);
            }
            Some(
                e.rows
                    .iter()
                    .flat_map(|&r| w.values[r * dim..(r + 1) * dim].iter().copied())
                    .collect(),
            )
        }
    };
    Ok(values.filter(|v| v.len() == len))
}
