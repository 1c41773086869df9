//! Reading and replacing a candidate's weight: its stored values as an f32 matrix in the
//! layer's orientation, writing new values back in place, or giving the node its own copy
//! when the initializer is shared with nodes that must not change.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::graph::{ConstSource, ModelGraph};
use crate::onnx::io::PendingValues;
use crate::onnx::pb::{ModelProto, TensorProto};
use crate::onnx::{DataType, LoadedModel};
use crate::target::{Candidate, Layout};
use crate::tensor::{Matrix, Orientation, to_f32};

/// A candidate's weight, decoded.
pub struct WeightValues {
    pub dtype: DataType,
    pub values: Vec<f32>,
    pub orient: Orientation,
    pub n_out: usize,
}

pub fn orientation(layout: Layout) -> Option<Orientation> {
    match layout {
        Layout::OutIn | Layout::Conv | Layout::Norm => Some(Orientation::OutIn),
        Layout::InOut | Layout::Embedding => Some(Orientation::InOut),
        Layout::Quantized => None,
    }
}

/// The stored tensor behind a candidate.
pub fn tensor<'m>(
    model: &'m ModelProto,
    graph: &ModelGraph,
    c: &Candidate,
) -> Result<&'m TensorProto> {
    c.source
        .as_ref()
        .and_then(|s| graph.const_tensor(model, s))
        .ok_or_else(|| Error::tensor(&c.weight, "weight tensor not found"))
}

/// Whether two candidates' weights hold the same values (one tensor, or equal copies: an
/// exporter's copy of a weight per call of a shared layer).
pub fn same_values(model: &LoadedModel, graph: &ModelGraph, a: &Candidate, b: &Candidate) -> bool {
    if a.source == b.source {
        return a.window == b.window;
    }
    if a.window.is_some() || b.window.is_some() {
        return false;
    }
    let bytes = |c: &Candidate| {
        let t = tensor(&model.proto, graph, c).ok()?;
        Some((t.dims.clone(), t.data_type(), model.tensor_bytes(t).ok()?))
    };
    match (bytes(a), bytes(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// A candidate's stored weight, not yet decoded: its bytes are a zero-copy slice.
#[derive(Clone)]
pub struct StoredWeight {
    pub name: String,
    pub dtype: DataType,
    pub orient: Orientation,
    pub n_in: usize,
    pub n_out: usize,
    pub bytes: Bytes,
}

impl StoredWeight {
    /// The values at index `k` of the input axis (`out = false`: an embedding's row `k`) or of
    /// the output axis (`out = true`: output channel `k`), decoding only those elements.
    pub fn line(&self, out: bool, k: usize) -> Result<Vec<f32>> {
        let width = self.dtype.bits().unwrap_or(32) / 8;
        let (len, limit) = if out {
            (self.n_in, self.n_out)
        } else {
            (self.n_out, self.n_in)
        };
        if k >= limit {
            return Err(Error::tensor(
                &self.name,
                format!("index {k} is out of range ({limit})"),
            ));
        }
        let at = |i: usize| {
            let (i_in, j_out) = if out { (i, k) } else { (k, i) };
            self.orient.index(self.n_in, self.n_out, i_in, j_out)
        };
        let mut raw = Vec::with_capacity(len * width);
        for i in 0..len {
            let e = at(i) * width;
            let bytes = self
                .bytes
                .get(e..e + width)
                .ok_or_else(|| Error::tensor(&self.name, "stored data is too short"))?;
            raw.extend_from_slice(bytes);
        }
        to_f32(&raw, self.dtype, &self.name)
    }

    pub fn decode(&self) -> Result<WeightValues> {
        Ok(WeightValues {
            dtype: self.dtype,
            values: to_f32(&self.bytes, self.dtype, &self.name)?,
            orient: self.orient,
            n_out: self.n_out,
        })
    }
}

/// Decodes the candidate's weight to f32 in its stored order.
/// The per-output-channel norms of the weight the layer applies with `scale`·B·A added:
/// ‖alpha·W + s·B·A‖ for a Gemm, whose stored W the node scales by alpha (DoRA's denominator).
pub(crate) fn effective_norms(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
    a: &Matrix,
    b: &Matrix,
    scale: f32,
) -> Result<Vec<f32>> {
    let mut w = read(model, graph, c)?;
    let alpha = super::fold::gemm_alpha(model, graph, c);
    if alpha != 1.0 {
        w.values.iter_mut().for_each(|v| *v *= alpha);
    }
    crate::tensor::add_low_rank(&mut w.values, w.orient, a, b, scale);
    Ok(crate::tensor::out_norms(&w.values, w.orient, w.n_out))
}

pub fn read(model: &LoadedModel, graph: &ModelGraph, c: &Candidate) -> Result<WeightValues> {
    stored(model, graph, c)?.decode()
}

/// The candidate's weight as stored, checked to be a float weight LoRA can change.
pub fn stored(model: &LoadedModel, graph: &ModelGraph, c: &Candidate) -> Result<StoredWeight> {
    if c.dynamically_quantized() && c.float_site.is_none() {
        return Err(Error::tensor(
            &c.weight,
            format!(
                "module '{}' has a quantized weight and quantized activations ({}, as onnxruntime's quantization writes it): it cannot be folded into, nor take a float branch (no DynamicQuantizeLinear before it and Cast + scale Mul after it, as quantize_dynamic writes); fold the adapter into the float model, then quantize that",
                c.module, c.op
            ),
        ));
    }
    if c.quantized {
        return Err(Error::tensor(
            &c.weight,
            format!(
                "module '{}' has a quantized weight ({}): it cannot be folded into, nor take values that replace it (modules_to_save, trained biases, trainable tokens), nor give DoRA its norm; a LoRA on it stays a float branch beside it, as `onnx-lora inject --adapter` puts one; for the rest, apply the adapter to the float model, then quantize that",
                c.module, c.op
            ),
        ));
    }
    let orient = orientation(c.layout)
        .ok_or_else(|| Error::tensor(&c.weight, "unsupported weight layout"))?;
    let t = tensor(&model.proto, graph, c)?;
    let dtype = DataType::from_i32(t.data_type());
    if !dtype.is_foldable_float() {
        return Err(Error::tensor(
            &c.weight,
            format!("{dtype} weights cannot be adapted (float32, float16, bfloat16, float64 only)"),
        ));
    }
    let mut bytes = model.tensor_bytes(t)?;
    // (a Split's rows of the tensor: the slice the node reads)
    if let (Some([s, e]), [_, cols]) = (c.window, &t.dims[..]) {
        let row = (*cols).max(0) as usize * (dtype.bits().unwrap_or(32) / 8);
        bytes = bytes
            .get(s * row..e * row)
            .map(|b| bytes.slice_ref(b))
            .ok_or_else(|| Error::tensor(&c.weight, "stored data is too short for its rows"))?;
    }
    let numel = crate::onnx::pb_ext::numel(&c.shape);
    let n_out = c.out_features.max(0) as usize;
    Ok(StoredWeight {
        name: c.weight.clone(),
        dtype,
        orient,
        // (a weight with no outputs still has its inputs: the message on it says so)
        n_in: numel.checked_div(n_out).unwrap_or_else(|| match c.layout {
            Layout::Conv => crate::onnx::pb_ext::numel(t.dims.get(1..).unwrap_or_default()),
            _ => c.in_features.max(0) as usize,
        }),
        n_out,
        bytes,
    })
}

/// New data for a tensor: bytes now, or a value computed when the model is written.
pub enum TensorData {
    Raw(Vec<u8>),
    Lazy(std::sync::Arc<dyn crate::onnx::io::LazyTensor>),
}

fn fill(pending: &mut PendingValues<'_>, t: &mut TensorProto, data: TensorData) {
    match data {
        TensorData::Raw(raw) => set_raw(t, raw),
        TensorData::Lazy(v) => pending.set(t, v),
    }
}

/// Replaces a tensor's data with new raw bytes (inline; saving decides where it goes).
pub fn set_raw(t: &mut TensorProto, raw: Vec<u8>) {
    t.raw_data = Some(Bytes::from(raw));
    t.external_data.clear();
    t.data_location = None;
    t.float_data.clear();
    t.int32_data.clear();
    t.int64_data.clear();
    t.double_data.clear();
    t.uint64_data.clear();
}

/// Writes new values for a candidate's weight. A weight that also feeds other nodes is left
/// alone: the candidate gets its own initializer (and its own copy of any Transpose / Cast
/// chain in between) so the change reaches this node only. Returns the copy's name, if any.
pub fn write(
    model: &mut LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
    data: TensorData,
    taken: &mut std::collections::HashSet<String>,
) -> Result<Option<String>> {
    let (proto, mut pending) = model.split_mut();
    let source = c
        .source
        .clone()
        .ok_or_else(|| Error::tensor(&c.weight, "weight tensor not found"))?;
    if !c.shared {
        let t = match source {
            ConstSource::Initializer { graph: g, index } => graph.graphs[g]
                .loc
                .get_mut(proto)
                .and_then(|gp| gp.initializer.get_mut(index)),
            ConstSource::Constant { graph: g, node } => graph.graphs[g]
                .loc
                .get_mut(proto)
                .and_then(|gp| gp.node.get_mut(node))
                .and_then(|n| n.attribute.iter_mut().find(|a| a.name() == "value"))
                .and_then(|a| a.t.as_mut()),
        }
        .ok_or_else(|| Error::tensor(&c.weight, "weight tensor not found"))?;
        fill(&mut pending, t, data);
        return Ok(None);
    }
    let original = graph
        .const_tensor(proto, &source)
        .ok_or_else(|| Error::tensor(&c.weight, "weight tensor not found"))?
        .clone();
    // (a norm layer's bias copy is named as its bias)
    let param = crate::target::norm::param(c).unwrap_or("weight");
    let base = if c.module.is_empty() {
        c.weight.clone()
    } else {
        format!("{}.{param}", c.module)
    };
    let name = unique_name(&format!("{base}.lora_folded"), taken);
    let mut copy = TensorProto {
        name: Some(name.clone()),
        dims: original.dims.clone(),
        data_type: original.data_type,
        doc_string: original.doc_string.clone(),
        metadata_props: original.metadata_props.clone(),
        ..Default::default()
    };
    fill(&mut pending, &mut copy, data);
    let gp = graph.graphs[c.graph]
        .loc
        .get_mut(proto)
        .ok_or_else(|| Error::tensor(&c.weight, "graph not found"))?;
    gp.initializer.push(copy);
    // Duplicate the pass-through chain, feeding it the copy, right before the node. (A Split
    // on the way, whose rows the layer reads, keeps all its outputs; the way goes on from the
    // one the layer reads.)
    let mut value = name.clone();
    let mut new_nodes = Vec::new();
    for (i, &ci) in c.chain.iter().enumerate() {
        let next = match c.chain.get(i + 1) {
            Some(&ni) => gp.node[ni].input.first(),
            None => gp
                .node
                .get(c.node_index)
                .and_then(|n| n.input.get(c.weight_input)),
        }
        .cloned()
        .unwrap_or_default();
        let mut n = gp.node[ci].clone();
        n.input[0] = value.clone();
        let k = n.output.iter().position(|o| *o == next).unwrap_or(0);
        n.output = n
            .output
            .iter()
            .map(|o| match o.is_empty() {
                true => String::new(),
                false => unique_name(&format!("{o}.lora_folded"), taken),
            })
            .collect();
        if let Some(nm) = n.name.as_mut() {
            *nm = unique_name(&format!("{nm}.lora_folded"), taken);
        }
        value = n.output[k].clone();
        new_nodes.push(n);
    }
    let node = gp
        .node
        .get_mut(c.node_index)
        .ok_or_else(|| Error::tensor(&c.weight, "node not found"))?;
    node.input[c.weight_input] = value;
    for (k, n) in new_nodes.into_iter().enumerate() {
        gp.node.insert(c.node_index + k, n);
    }
    Ok(Some(name))
}

/// `base`, or `base.1`, `base.2`, ... whichever is not yet taken; records the choice.
pub fn unique_name(base: &str, taken: &mut std::collections::HashSet<String>) -> String {
    let mut name = base.to_string();
    let mut i = 1;
    while taken.contains(&name) {
        name = format!("{base}.{i}");
        i += 1;
    }
    taken.insert(name.clone());
    name
}

/// Every value and initializer name in the model, so new names never collide.
pub fn all_names(model: &ModelProto) -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    fn walk(g: &crate::onnx::pb::GraphProto, names: &mut std::collections::HashSet<String>) {
        names.extend(g.initializer.iter().map(|t| t.name().to_string()));
        names.extend(g.input.iter().map(|v| v.name().to_string()));
        for n in &g.node {
            names.extend(n.output.iter().cloned());
            names.insert(n.name().to_string());
            for a in &n.attribute {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    walk(sub, names);
                }
            }
        }
    }
    if let Some(g) = model.graph.as_ref() {
        walk(g, &mut names);
    }
    names
}

/// Checks a base weight an adapter saved beside its LoRA (`<module>.base_layer.weight`, which
/// PEFT writes for embeddings by default) against the model's: different values mean the
/// adapter was trained on another base (another checkpoint, a resized vocabulary), and merging
/// it here would silently give another model than PEFT's. Values may differ by the rounding to
/// the model's dtype. Quantized weights are not compared.
pub fn check_saved_base(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
    module: &str,
    saved: &crate::adapter::peft::F32Tensor,
) -> Result<()> {
    if c.quantized {
        return Ok(());
    }
    let mismatch = |what: String| {
        Error::Target(format!(
            "module '{module}': the adapter's saved base weight (base_layer.weight) {what} the model's '{}' ({} {:?}): the adapter was trained on another base; export that base to ONNX",
            c.weight, c.op, c.shape
        ))
    };
    match saved_weight_difference(model, graph, c, saved)? {
        None => Err(mismatch(format!(
            "has shape {:?}, not the shape of",
            saved.shape
        ))),
        Some(d) if d.worst > d.tolerance => Err(mismatch(format!(
            "differs (max |difference| {:.3e}, largest |value| {:.3e}) from",
            d.worst, d.scale
        ))),
        Some(_) => Ok(()),
    }
}

/// A saved torch weight (a `modules_to_save` replacement, a `base_layer.weight` saved beside a
/// LoRA) in the layout the model stores `c`'s weight in; `stored` gives the stored values, read
/// only when they decide. torch gives a Linear's weight as (out, in) and a GPT-2 Conv1D's as
/// (in, out), whatever the adapter's `fan_in_fan_out` (which is about its LoRA targets);
/// embeddings and convs are stored as torch holds them. A non-square matrix is placed by its
/// shape. A square one is kept as it is when the model stores the torch parameter itself (the
/// initializer has its name); in a copy the exporter made, it goes in the orientation much
/// nearer the model's weight (a trained copy stays near it, its transpose is unrelated), and
/// otherwise follows the layout: a MatMul's (in, out) copy is a Linear's weight transposed.
pub(crate) fn saved_in_stored_layout<S: AsRef<[f32]>>(
    c: &Candidate,
    orient: Orientation,
    t: &crate::adapter::peft::F32Tensor,
    stored: impl FnOnce() -> Result<S>,
) -> Result<Vec<f32>> {
    if saved_transposed(c, orient, t, stored)? {
        Ok(Matrix::new(t.shape[0], t.shape[1], t.data.clone())?
            .transposed()
            .data)
    } else {
        Ok(t.data.clone())
    }
}

/// Whether `saved_in_stored_layout` transposes `t`.
pub(crate) fn saved_transposed<S: AsRef<[f32]>>(
    c: &Candidate,
    orient: Orientation,
    t: &crate::adapter::peft::F32Tensor,
    stored: impl FnOnce() -> Result<S>,
) -> Result<bool> {
    let shape: Vec<usize> = c.shape.iter().map(|&d| d.max(0) as usize).collect();
    if !c.is_linear() || t.shape.len() != 2 || shape.len() != 2 {
        return Ok(false);
    }
    Ok(if t.shape[0] != t.shape[1] {
        t.shape != shape
    } else if c.weight == format!("{}.weight", c.module) {
        false
    } else {
        let stored = stored()?;
        let base = stored.as_ref();
        let n = t.shape[0];
        if base.len() != n * n || t.data.len() != n * n {
            return Err(Error::Target(format!(
                "a saved weight of shape {:?} does not fit '{}' ({} {:?})",
                t.shape, c.weight, c.op, c.shape
            )));
        }
        let (mut kept, mut flipped) = (0f64, 0f64);
        for i in 0..n {
            for j in 0..n {
                let b = base[i * n + j];
                kept += f64::from(t.data[i * n + j] - b).powi(2);
                flipped += f64::from(t.data[j * n + i] - b).powi(2);
            }
        }
        if kept < 0.25 * flipped {
            false
        } else if flipped < 0.25 * kept {
            true
        } else {
            orient == Orientation::InOut
        }
    })
}

/// How far a saved weight is from the one a layer reads.
pub struct Difference {
    /// The largest |difference|.
    pub worst: f32,
    /// The model weight's largest |value|.
    pub scale: f32,
    /// What rounding to the model's dtype explains, at the largest value.
    pub tolerance: f32,
    /// Every saved value, rounded to the model's dtype, is the layer's own.
    pub identical: bool,
}

/// How far `saved` (a torch parameter, placed as `saved_in_stored_layout` places it) is from
/// the weight `c` reads; None when their sizes differ.
pub fn saved_weight_difference(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
    saved: &crate::adapter::peft::F32Tensor,
) -> Result<Option<Difference>> {
    let w = read(model, graph, c)?;
    if saved.data.len() != w.values.len() {
        return Ok(None);
    }
    // A Gemm applies alpha·W: torch holds that weight, fold would store it divided by alpha.
    let alpha = super::fold::gemm_alpha(model, graph, c);
    let applied: std::borrow::Cow<[f32]> = if alpha == 1.0 {
        (&w.values[..]).into()
    } else {
        w.values.iter().map(|v| v * alpha).collect()
    };
    let saved = saved_in_stored_layout(c, w.orient, saved, || Ok(&applied[..]))?;
    let scale = applied.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let tolerance = match w.dtype {
        DataType::Float16 => 1e-3,
        DataType::Bfloat16 => 8e-3,
        _ => 1e-6,
    } * scale;
    let round = |v: f32| match w.dtype {
        DataType::Float16 => half::f16::from_f32(v).to_f32(),
        DataType::Bfloat16 => half::bf16::from_f32(v).to_f32(),
        _ => v,
    };
    let mut worst = 0f32;
    let mut identical = true;
    for ((&a, &own), &b) in applied.iter().zip(&w.values).zip(&saved) {
        worst = worst.max((a - b).abs());
        identical &= round(b / alpha) == own;
    }
    Ok(Some(Difference {
        worst,
        scale,
        tolerance,
        identical,
    }))
}
