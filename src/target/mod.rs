//! Target resolution: every MatMul / Gemm / Conv / Gather whose weight is a constant becomes a
//! `Candidate`, tied to the module path it came from. Node evidence (dynamo `name_scopes`,
//! then the TorchScript node-name path) wins over weight evidence (a parameter-style
//! initializer name, then onnxscript's `folded_from`): with tied weights the embedding Gather
//! reads `lm_head.weight` but is `embed_tokens`. `select` matches PEFT-style target specs and
//! adapter module paths against the candidates.

pub mod evidence;
pub mod norm;
pub mod packed;
pub mod part;
mod rows;
pub mod select;

use serde::Serialize;

use crate::graph::{ConstSource, ModelGraph};
use crate::onnx::DataType;
use crate::onnx::pb::{ModelProto, NodeProto};
use crate::onnx::pb_ext::NodeExt;

pub use select::{
    Call, TargetSpec, ambiguous_scopes, export_root, module_calls, resolve_module, select,
};

/// How the stored weight is laid out relative to the layer it implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `[in, out]`: MatMul weights, Gemm with transB = 0, GPT-2 Conv1D.
    InOut,
    /// `[out, in]`: torch's Linear layout (Gemm with transB = 1, or behind a Transpose).
    OutIn,
    /// `[out, in/groups, k...]`.
    Conv,
    /// `[num_embeddings, dim]` read by Gather.
    Embedding,
    /// Packed low-bit weight (MatMulNBits): cannot be folded into.
    Quantized,
    /// `[channels]`: a normalization layer's scale or bias (see `norm`); replaced whole only.
    Norm,
}

/// Where the module path came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    NameScopes,
    NodeName,
    WeightName,
    FoldedFrom,
    None,
}

/// A node whose constant weight LoRA can target.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// Module path (`model.layers.0.self_attn.q_proj`), empty when nothing names it.
    pub module: String,
    pub evidence: Evidence,
    /// Module paths other evidence gave, when it disagreed with the chosen one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_paths: Vec<String>,
    pub node: String,
    pub op: String,
    /// Name of the initializer (or Constant output) holding the weight.
    pub weight: String,
    /// Shape as stored.
    pub shape: Vec<i64>,
    pub layout: Layout,
    pub dtype: String,
    /// Input and output features of the layer (for embeddings: table size and dim).
    pub in_features: i64,
    pub out_features: i64,
    /// The weight also feeds other nodes (tied or deduplicated initializers).
    pub shared: bool,
    #[serde(skip_serializing_if = "SharedWith::is_empty")]
    pub shared_with: SharedWith,
    pub in_subgraph: bool,
    /// Quantized base (MatMulNBits or a DequantizeLinear on the weight path).
    pub quantized: bool,
    /// The exporter folded a BatchNorm after the layer into its weight (see
    /// [`norm_folded`]): an adapter trained on the layer cannot be applied to it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub norm_folded: bool,
    /// The weight packs q/k/v projections side by side (onnxruntime's Attention, `qkv_proj`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packed: Option<packed::Packed>,
    /// The class of the module calling the node, where torch's dynamo exporter recorded it
    /// (`torch.nn.modules.linear.Linear`, a MoE model's `…TopKRouter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_class: Option<String>,
    /// A Conv whose module pads its input other than with zeros (`padding_mode="reflect"`:
    /// a Pad node of that mode in the layer's own scope feeds it), as `Pad 'node' (mode)`:
    /// PEFT's LoRA conv pads with zeros, so PEFT's forward differs from its merge there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inner_pad: Option<String>,
    /// The layer is one of a torch `nn.MultiheadAttention`'s two projections (see
    /// [`mark_mha`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mha: Option<MhaPart>,
    /// For a part of a split in-projection (a cross-attention computes its query from
    /// `in_proj_weight`'s first E rows and its key and value from the other 2E, as two
    /// layers): the rows `[start, end)` of the packed `[3E, E]` weight this layer computes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mha_rows: Option<[usize; 2]>,
    /// The rows `[start, end)` of the stored weight the node reads, where a Split or Slice on
    /// axis 0 stands between them (dynamo splits a cross-attention's `in_proj_weight` so at
    /// run time; TorchScript with dynamic axes slices it by bounds it computes from the query's
    /// shape); `shape` is then that slice's. None: the whole tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<[usize; 2]>,
    /// Ops between the stored weight and the node (`Transpose`, `Cast`, ...), weight first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub through: Vec<String>,
    #[serde(skip)]
    pub graph: usize,
    /// Where that graph sits in the model (which If / Loop body), to tell the two bodies of
    /// an If, of which a run executes one, from graphs that may both run.
    #[serde(skip)]
    pub graph_loc: crate::graph::GraphLoc,
    #[serde(skip)]
    pub node_index: usize,
    #[serde(skip)]
    pub source: Option<ConstSource>,
    /// Node indices of the pass-through ops between the weight and the node, weight first.
    #[serde(skip)]
    pub chain: Vec<usize>,
    /// Which input of the node is the weight.
    #[serde(skip)]
    pub weight_input: usize,
    /// For a layer whose own input and output are quantized, where its float values are.
    #[serde(skip)]
    pub float_site: Option<FloatSite>,
    /// Names of the constants the layer reads as its parameters, as it reads them (its weight,
    /// its bias: a Gemm's or Conv's third input, the constant an Add after it adds), where
    /// they are named like a parameter (`fc_1.bias`; see [`mark_params`]).
    #[serde(skip)]
    pub params: Vec<String>,
    /// The name the layer reads its weight by, where `params` holds it (TorchScript reads a
    /// weight it merged with another module's through an Identity named after its own).
    #[serde(skip)]
    pub weight_read_as: Option<String>,
}

/// Where a layer whose own input and output are quantized (onnxruntime's `quantize_dynamic`:
/// MatMulInteger between DynamicQuantizeLinear and a Cast + scale Mul; a Gather from an int8
/// table before DequantizeLinear) has the float values a branch reads and adds to.
#[derive(Clone, Debug, PartialEq)]
pub struct FloatSite {
    /// The layer's float input: DynamicQuantizeLinear's input; a Gather's indices.
    pub x: String,
    /// Index of the node whose float output is the layer's output: the scale Mul after the
    /// Cast; the DequantizeLinear after the Gather.
    pub anchor: usize,
}

impl Candidate {
    pub fn is_linear(&self) -> bool {
        matches!(
            self.op.as_str(),
            "MatMul"
                | "Gemm"
                | "MatMulNBits"
                | "MatMulInteger"
                | "DynamicQuantizeMatMul"
                | "MatMulIntegerToFloat"
        )
    }

    /// A Conv's groups (its weight holds in / groups input channels); 1 for other layers.
    pub fn groups(&self) -> usize {
        match (self.op.as_str(), self.shape.get(1)) {
            ("Conv", Some(&per_group)) if per_group > 0 => {
                (self.in_features / per_group).max(1) as usize
            }
            _ => 1,
        }
    }

    /// Whether `inject` can put a branch beside the node: the layer's own input and output are
    /// graph values. In onnxruntime's fused ops (Attention, EmbedLayerNormalization) the
    /// projection or lookup happens inside the op; only `fold` can change those weights.
    pub fn branchable(&self) -> bool {
        match self.op.as_str() {
            "MatMul" | "Gemm" | "MatMulNBits" | "Conv" => true,
            "Gather" => !self.quantized || self.float_site.is_some(),
            "MatMulInteger" | "DynamicQuantizeMatMul" | "MatMulIntegerToFloat" => {
                self.float_site.is_some()
            }
            _ => false,
        }
    }

    /// Why `inject` cannot put a branch beside the node (see [`Candidate::branchable`]), for
    /// the message that refuses it.
    pub fn no_branch_reason(&self) -> String {
        if self.dynamically_quantized() {
            format!(
                "its input and output are quantized ({} {}) and it is not between DynamicQuantizeLinear and a Cast + scale Mul (a Gather: before a DequantizeLinear) as onnxruntime's quantize_dynamic writes it, so inject finds no float values to put a branch beside; fold the adapter into the float model, then quantize that",
                self.op, self.node
            )
        } else {
            format!(
                "it is computed inside onnxruntime's fused {} node '{}', so inject cannot put a branch beside it; `onnx-lora fold` merges it",
                self.op, self.node
            )
        }
    }

    /// A layer whose activations are quantized too (MatMulInteger from quantize_dynamic, a
    /// Gather from an integer table followed by DequantizeLinear): no float value to branch
    /// from, nor a float weight to fold into.
    pub fn dynamically_quantized(&self) -> bool {
        matches!(
            self.op.as_str(),
            "MatMulInteger" | "DynamicQuantizeMatMul" | "MatMulIntegerToFloat"
        ) || (self.op == "Gather" && self.quantized)
    }
}

/// Ops that pass a weight through unchanged in value (up to layout or dtype) on its way to
/// the node that uses it.
const PASS_THROUGH: [&str; 4] = ["Transpose", "Identity", "Cast", "DequantizeLinear"];

/// Layers onnx-lora does not look into: the MatMul / Gemm / Conv nodes inside the model's
/// local functions (TorchScript's `export_modules_as_functions`), as (function name, count)
/// for each function that has any.
pub fn layers_in_functions(model: &ModelProto) -> Vec<(String, usize)> {
    model
        .functions
        .iter()
        .map(|f| {
            let n = f
                .node
                .iter()
                .filter(|n| matches!(n.op_type(), "MatMul" | "Gemm" | "Conv"))
                .count();
            (f.name().to_string(), n)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Finds every candidate in the model, in graph order.
pub fn find_candidates(model: &ModelProto, graph: &ModelGraph) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = graph
        .nodes(model)
        .filter_map(|(gi, ni, node)| candidate(model, graph, gi, ni, node))
        .collect();
    for c in &mut out {
        c.graph_loc = graph.graphs[c.graph].loc.clone();
    }
    mark_shared(model, graph, &mut out);
    mark_params(model, graph, &mut out);
    mark_mha(model, graph, &mut out);
    // A Split's or Slice's rows are a layer's weight only as a cross-attention's in-projection;
    // other splits of a weight (a chunked parameter, a query, key and value all apart) stay
    // no layers, as no adapter module names them.
    out.retain(|c| c.window.is_none() || c.mha_rows.is_some());
    out
}

/// Records the parameter names each layer reads (`Candidate::params`): its weight input and
/// its bias as the node reads them, before any pass-through op. The TorchScript exporter keeps
/// a parameter's own name where it can; where it merges equal parameters of two modules, it
/// reads the first's through an Identity named after the second's (`fc_1.bias`). So a layer
/// that reads a parameter named under its own scope is that module's, not a later call of
/// another (see [`select::later_call_of`]).
fn mark_params(model: &ModelProto, graph: &ModelGraph, cands: &mut [Candidate]) {
    for c in cands.iter_mut() {
        let Some(node) = graph.node(model, c.graph, c.node_index) else {
            continue;
        };
        let view = &graph.graphs[c.graph];
        // (a constant as seen from this graph, directly or through one Identity, which may sit
        // in an enclosing graph)
        let constant = |v: &str| {
            graph
                .const_source_through_identity(model, c.graph, v)
                .is_some()
        };
        let mut names: Vec<&str> = node
            .input
            .get(c.weight_input)
            .map(String::as_str)
            .into_iter()
            .collect();
        if matches!(node.op_type(), "Gemm" | "Conv") {
            names.extend(node.input.get(2).map(String::as_str));
        }
        if let Some(y) = node.output.first() {
            for &u in view.consumers_of(y) {
                if let Some(add) = graph
                    .node(model, c.graph, u)
                    .filter(|n| n.op_type() == "Add")
                {
                    names.extend(add.input.iter().map(String::as_str).filter(|i| *i != y));
                }
            }
        }
        let weight = names.first().copied();
        c.params = names
            .into_iter()
            .filter(|n| !n.is_empty() && n.contains('.') && !n.starts_with('/') && constant(n))
            .map(str::to_string)
            .collect();
        c.weight_read_as = weight
            .filter(|w| c.params.iter().any(|p| p == w))
            .map(str::to_string);
    }
}

/// Which projection of a torch `nn.MultiheadAttention` a layer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MhaPart {
    /// The packed in-projection (`in_proj_weight`: q, k and v stacked, E → 3E).
    InProj,
    /// The `out_proj` Linear (E → E).
    OutProj,
}

/// Finds torch `nn.MultiheadAttention` modules. Such a module computes its in-projection
/// from its own packed `in_proj_weight` and calls its `out_proj` Linear's weight itself
/// rather than that Linear, so both exporters put both products in the attention module's
/// scope `S`; the out-projection's weight keeps its name, `S.out_proj.weight`. That Linear
/// is a module of its own (PEFT adapts it at `S.out_proj`), so an E → E candidate whose
/// weight is named so takes that path, `S` staying as other evidence, when `S` also holds an
/// E → 3E in-projection. An attention called several times has a node per call, reading one
/// weight (TorchScript scopes the later calls `S_1`, ...); each call's out-projection takes
/// the path under its call's scope (`S_1.out_proj`, a later call of `S.out_proj`). Where
/// dynamo recorded the calling module's class, it must be a MultiheadAttention (a custom
/// module calling a child `out_proj`'s weight is none), and then a weight named after another
/// module's out_proj (equal weights the exporter merged) is this one's too.
fn mark_mha(model: &ModelProto, graph: &ModelGraph, cands: &mut [Candidate]) {
    let class_of = |c: &Candidate| -> Option<String> {
        let node = graph.node(model, c.graph, c.node_index)?;
        let list = evidence::parse_py_str_list(node.metadata(evidence::CLASS_HIERARCHY_KEY)?)?;
        list.len().checked_sub(2).map(|i| list[i].clone())
    };
    let not_mha = |c: &Candidate| class_of(c).is_some_and(|k| !k.ends_with("MultiheadAttention"));
    for o in 0..cands.len() {
        let c = &cands[o];
        if !c.is_linear() || c.quantized || c.module.is_empty() || c.in_features != c.out_features {
            continue;
        }
        // The attention module the weight's name puts the out_proj Linear in: the node's
        // scope, or (TorchScript's scope names only: dynamo names every call by the module's
        // path) the scope of which the node's is a later call.
        // Where dynamo recorded that the scope is a MultiheadAttention, any `*.out_proj`
        // weight name will do: the exporter merges equal weights across modules (the layers
        // of an untrained stack), naming them after one of them.
        let torchscript = c.evidence == Evidence::NodeName;
        // (dynamo's record of the scope's class: Some(true) for a MultiheadAttention)
        let class_is_mha = class_of(c).map(|k| k.ends_with("MultiheadAttention"));
        let is_mha = class_is_mha == Some(true);
        // (the weight's name, and the name the node reads it by: TorchScript reads a weight
        // it merged with another module's through an Identity named after its own)
        let read_as = c
            .weight_read_as
            .as_deref()
            .and_then(|p| p.strip_suffix(".weight"))
            .map(str::to_string);
        let Some(outer) = c.other_paths.iter().chain(&read_as).find_map(|p| {
            let outer = p.strip_suffix(".out_proj")?;
            if is_mha {
                return Some(c.module.clone());
            }
            (outer == c.module || torchscript && select::is_later_call(outer, &c.module))
                .then(|| outer.to_string())
        }) else {
            continue;
        };
        // The in-projection in the same scope; else, for a later call whose in-projection
        // TorchScript named after the first call's, the module's.
        let in_proj = |scope: &dyn Fn(&str) -> bool| -> Vec<usize> {
            (0..cands.len())
                .filter(|&i| {
                    let d = &cands[i];
                    i != o
                        && d.is_linear()
                        && !d.quantized
                        && scope(&d.module)
                        && d.in_features == c.in_features
                        && d.out_features == 3 * c.in_features
                })
                .collect()
        };
        let mut ins = in_proj(&|m| m == c.module);
        if ins.is_empty() && torchscript {
            ins = in_proj(&|m| m == outer || select::is_later_call(&outer, m));
        }
        // (a cross-attention's in-projection in two parts: rows of the packed weight by layer)
        let mut rows: Vec<Option<[usize; 2]>> = vec![None; ins.len()];
        if ins.is_empty()
            && let Some(parts) = split_in_proj(model, graph, cands, o, &c.module)
        {
            (ins, rows) = parts.into_iter().map(|(i, r)| (i, Some(r))).unzip();
        }
        // A call of the attention that computes the in-projection in parts (in its own scope:
        // TorchScript's `attn_1`, dynamo's `attn`), where another call (found above) packs it:
        // one attention called as a self-attention, then with a query, key or value apart.
        // Its parts are the attention's too (`rewrite::settle_root` refuses an adapter
        // there, which it cannot merge into both forms).
        let other_call = match rows.first() {
            Some(None) => split_in_proj(model, graph, cands, o, &c.module)
                .filter(|parts| !parts.iter().any(|&(i, _)| not_mha(&cands[i])))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let Some(&first) = ins.first() else {
            continue;
        };
        if rows[0].is_none() && ins.iter().any(|&i| cands[i].source != cands[first].source)
            || class_is_mha == Some(false)
            || ins.iter().any(|&i| not_mha(&cands[i]))
        {
            continue;
        }
        // (a later call's node keeps its call's scope, as other layers' later calls do)
        let own = format!("{}.out_proj", c.module);
        let c = &mut cands[o];
        let scope = std::mem::replace(&mut c.module, own.clone());
        c.other_paths.retain(|p| *p != own);
        c.other_paths.insert(0, scope);
        // (the evidence stays the scope's: the path is the call's scope and the Linear's name)
        c.mha = Some(MhaPart::OutProj);
        for (i, r) in ins.into_iter().zip(rows) {
            cands[i].mha = Some(MhaPart::InProj);
            cands[i].mha_rows = r;
        }
        for (i, r) in other_call {
            let d = &mut cands[i];
            let call = std::mem::replace(&mut d.module, outer.clone());
            d.other_paths.insert(0, call);
            d.mha = Some(MhaPart::InProj);
            d.mha_rows = Some(r);
        }
    }
}

/// The in-projection of the attention whose out-projection is candidate `o`, in `scope` (the
/// attention's, or a call's), where the attention split it: torch's
/// `multi_head_attention_forward` projects a query that is not its key and value (a
/// cross-attention: `attn(q, mem, mem)`) with the first E rows of `in_proj_weight`, and the
/// key and value, one tensor, with the other 2E, as two layers in the attention's scope: E → E and E → 2E, each with a weight of its own (the TorchScript
/// exporter folds each slice into a constant). A query, key and value all apart (DETR's
/// `attn(x + pos, x + pos, x)`) are three E → E layers, on rows 0-E, E-2E and 2E-3E (see
/// `qkv_rows`). Those layers, with their rows `[start, end)` of the packed weight.
fn split_in_proj(
    model: &ModelProto,
    graph: &ModelGraph,
    cands: &[Candidate],
    o: usize,
    scope: &str,
) -> Option<Vec<(usize, [usize; 2])>> {
    let c = &cands[o];
    let e = c.in_features;
    let parts: Vec<usize> = (0..cands.len())
        .filter(|&i| {
            let d = &cands[i];
            i != o
                && d.is_linear()
                && !d.quantized
                && d.mha.is_none()
                && d.module == scope
                // (another call's out_proj)
                && !d.weight.ends_with("out_proj.weight")
                && d.graph == c.graph
                && d.in_features == e
                && (d.out_features == e || Some(d.out_features) == e.checked_mul(2))
        })
        .collect();
    if let [x, y, z] = parts[..] {
        return qkv_rows(model, graph, cands, [x, y, z]);
    }
    let [x, y] = parts[..] else {
        return None;
    };
    let (q, kv) = if cands[x].out_features == e {
        (x, y)
    } else {
        (y, x)
    };
    let e = usize::try_from(e).ok()?;
    let (cq, ckv) = (&cands[q], &cands[kv]);
    let (e2, e3) = (e.checked_mul(2)?, e.checked_mul(3)?);
    // (a weight each, TorchScript's; or the rows of one: dynamo's Split, or TorchScript's
    // Slices by bounds computed from the query's shape)
    let own = cq.source != ckv.source && cq.window.is_none() && ckv.window.is_none();
    let split = cq.source == ckv.source && cq.window == Some([0, e]) && ckv.window == Some([e, e3]);
    (cq.out_features as usize == e && ckv.out_features as usize == e2 && (own || split))
        .then(|| vec![(q, [0, e]), (kv, [e, e3])])
}

/// The rows of a query, key and value projected apart (three E → E layers in an attention's
/// scope, `parts`): the rows of one weight each reads through a Split (dynamo), or, for
/// weights of their own (TorchScript folds each third into a constant), what each one's
/// output becomes: the query and the key are the two operands of one product (query · keyᵀ),
/// the value the second operand of another (the weights · value).
fn qkv_rows(
    model: &ModelProto,
    graph: &ModelGraph,
    cands: &[Candidate],
    parts: [usize; 3],
) -> Option<Vec<(usize, [usize; 2])>> {
    let e = usize::try_from(cands[parts[0]].in_features).ok()?;
    let thirds = [[0, e], [e, e.checked_mul(2)?], [e * 2, e.checked_mul(3)?]];
    if parts
        .iter()
        .any(|&i| cands[i].out_features != cands[parts[0]].in_features)
    {
        return None;
    }
    let first = &cands[parts[0]];
    if parts.iter().all(|&i| cands[i].source == first.source) {
        let mut by_rows: Vec<(usize, [usize; 2])> = parts
            .iter()
            .map(|&i| Some((i, cands[i].window?)))
            .collect::<Option<_>>()?;
        by_rows.sort_by_key(|&(_, w)| w);
        return by_rows
            .iter()
            .zip(thirds)
            .all(|(&(_, w), t)| w == t)
            .then_some(by_rows);
    }
    let apart = parts.iter().enumerate().all(|(k, &i)| {
        cands[i].window.is_none()
            && parts[..k]
                .iter()
                .all(|&j| cands[j].source != cands[i].source)
    });
    if !apart {
        return None;
    }
    // (each layer's product: the node and the operand its output becomes)
    let uses: Vec<(usize, usize)> = parts
        .iter()
        .map(|&i| attention_operand(model, graph, &cands[i]))
        .collect::<Option<_>>()?;
    let at = |node: usize, k: usize| parts.iter().zip(&uses).find(|(_, u)| **u == (node, k));
    let (&q, &(qk, _)) = parts.iter().zip(&uses).find(|(_, u)| u.1 == 0)?;
    let (&k, _) = at(qk, 1)?;
    let (&v, _) = parts
        .iter()
        .zip(&uses)
        .find(|(_, u)| u.1 == 1 && u.0 != qk)?;
    Some(vec![(q, thirds[0]), (k, thirds[1]), (v, thirds[2])])
}

/// The product of two activations (a MatMul with no constant operand) that layer `c`'s output
/// becomes an operand of, through the ops an attention puts between (bias Add, scaling,
/// Reshape, Transpose, ...), and which operand (0 or 1); None when it reaches none, more than
/// one, or any other op.
fn attention_operand(
    model: &ModelProto,
    graph: &ModelGraph,
    c: &Candidate,
) -> Option<(usize, usize)> {
    const CARRY: [&str; 10] = [
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Reshape",
        "Transpose",
        "Unsqueeze",
        "Squeeze",
        "Identity",
        "Cast",
    ];
    let view = &graph.graphs[c.graph];
    let node = graph.node(model, c.graph, c.node_index)?;
    let mut todo: Vec<String> = vec![node.output.first()?.clone()];
    let mut seen = std::collections::HashSet::new();
    let mut found = None;
    while let Some(value) = todo.pop() {
        if !seen.insert(value.clone()) || seen.len() > 64 {
            return None;
        }
        for &u in view.consumers_of(&value) {
            let n = graph.node(model, c.graph, u)?;
            if !(n.domain().is_empty() || n.domain() == "ai.onnx") {
                return None;
            }
            if n.op_type() == "MatMul" {
                let k = n.input.iter().position(|i| *i == value)?;
                let both = n
                    .input
                    .iter()
                    .all(|i| graph.const_source(model, c.graph, i).is_none());
                if !both || found.is_some_and(|f| f != (u, k)) {
                    return None;
                }
                found = Some((u, k));
            } else if CARRY.contains(&n.op_type()) {
                todo.extend(n.output.iter().cloned());
            } else if !matches!(n.op_type(), "Shape" | "Size") {
                // (reading only the shape of the value is no use of it)
                return None;
            }
        }
    }
    found
}

fn weight_input(node: &NodeProto) -> Option<usize> {
    match (node.domain(), node.op_type()) {
        ("" | "ai.onnx", "MatMul" | "Gemm" | "Conv" | "MatMulInteger") => Some(1),
        ("" | "ai.onnx", "Gather") => (node.attr_i("axis").unwrap_or(0) == 0).then_some(0),
        ("com.microsoft", "MatMulNBits" | "Attention") => Some(1),
        // onnxruntime's fusions of quantize_dynamic's MatMulInteger (saved optimized models)
        ("com.microsoft", "DynamicQuantizeMatMul" | "MatMulIntegerToFloat") => Some(1),
        // onnxruntime's fused embedding + LayerNorm: input 2 is the word embedding table.
        ("com.microsoft", "EmbedLayerNormalization") => Some(2),
        _ => None,
    }
}

fn candidate(
    model: &ModelProto,
    graph: &ModelGraph,
    gi: usize,
    ni: usize,
    node: &NodeProto,
) -> Option<Candidate> {
    // The nodes of branches onnx-lora injected are no layers of the model.
    if node.metadata(crate::onnx::pb_ext::BRANCH_KEY).is_some() {
        return None;
    }
    let wi = weight_input(node)?;
    let view = &graph.graphs[gi];
    let walked = walk_to_const(model, graph, gi, node.input.get(wi)?)?;
    let mut quantized = walked.dequantized
        || matches!(
            node.op_type(),
            "MatMulNBits" | "MatMulInteger" | "DynamicQuantizeMatMul" | "MatMulIntegerToFloat"
        );
    let tensor = graph.const_tensor(model, &walked.source)?;
    let dtype = DataType::from_i32(tensor.data_type());
    // A Gather from an integer table is shape arithmetic, not an embedding (even with constant
    // indices, as for folded position ids, a float table is one), unless what it gathers is
    // dequantized (a quantized embedding table).
    if node.op_type() == "Gather" && !dtype.is_foldable_float() {
        let dequantized = node.output.first().is_some_and(|y| {
            view.consumers_of(y).iter().any(|&u| {
                graph
                    .node(model, gi, u)
                    .is_some_and(|n| n.op_type() == "DequantizeLinear")
            })
        });
        if !dequantized {
            return None;
        }
        quantized = true;
    }
    // (a Split's or Slice's rows: the layer's weight is that slice, its rows the layer's outputs)
    let dims = match (walked.window, &tensor.dims[..]) {
        (Some([s, e]), [_, cols]) => vec![(e - s) as i64, *cols],
        (Some(_), _) => return None,
        (None, _) => tensor.dims.clone(),
    };
    let (layout, in_features, out_features) = layout_of(node, &dims, walked.transposes)?;
    if walked.window.is_some() && layout != Layout::OutIn {
        return None;
    }
    let (module, evidence, other_paths) =
        module_path(model, graph, gi, node, tensor.name(), &walked.value);
    let packed = packed::packing(model, graph, gi, node, &module, out_features);
    let inner_pad = inner_pad(model, graph, gi, node, &module);
    let module_class = node
        .metadata(evidence::CLASS_HIERARCHY_KEY)
        .and_then(evidence::parse_py_str_list)
        .and_then(|list| Some(list.get(list.len().checked_sub(2)?)?.clone()));
    let float_site = if quantized {
        float_site(model, graph, (gi, ni), node)
    } else {
        None
    };
    Some(Candidate {
        module,
        evidence,
        other_paths,
        quantized,
        norm_folded: norm_folded(node, tensor.name()),
        inner_pad,
        module_class,
        packed,
        float_site,
        ..walked.candidate(
            (gi, ni, node, wi),
            tensor,
            dims,
            layout,
            (in_features, out_features),
        )
    })
}

/// Whether the exporter folded a BatchNorm that follows the layer into its weight and bias
/// (W·γ/σ): PEFT's LoRA acts before the BatchNorm, so its delta would need that per-channel
/// γ/σ, which the export no longer holds. torch's dynamo exporter marks the node with the
/// optimizer rule that did it; the TorchScript exporter leaves no mark, but gives the Conv a
/// weight and a bias that are both constants it computed (`onnx::Conv_N`), where a Conv's own
/// parameters keep their names (a computed weight alone, as weight normalization gives, keeps
/// its bias's name).
fn norm_folded(node: &NodeProto, weight: &str) -> bool {
    let computed = |v: Option<&String>| v.is_some_and(|v| v.starts_with("onnx::Conv_"));
    bn_fused_by_rule(node)
        || (node.op_type() == "Conv"
            && weight.starts_with("onnx::Conv_")
            && computed(node.input.get(2)))
}

/// The Pad node of a mode other than `constant` that feeds Conv `node` from inside the layer's
/// own module `module` (torch's Conv with `padding_mode` reflect, replicate or circular pads in
/// its forward), as `Pad 'name' (mode)`.
fn inner_pad(
    model: &ModelProto,
    graph: &ModelGraph,
    gi: usize,
    node: &NodeProto,
    module: &str,
) -> Option<String> {
    if node.op_type() != "Conv" || module.is_empty() {
        return None;
    }
    let &p = graph.graphs[gi].producer.get(node.input.first()?)?;
    let pad = graph.node(model, gi, p)?;
    let mode = pad
        .attr("mode")
        .and_then(|a| a.s.as_deref())
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    if pad.op_type() != "Pad" || matches!(mode.as_ref(), "" | "constant") {
        return None;
    }
    let scope = pad
        .metadata(evidence::NAME_SCOPES_KEY)
        .and_then(evidence::from_name_scopes)
        .or_else(|| evidence::from_node_name(pad.name()))?;
    (scope == module).then(|| format!("Pad '{}' ({mode})", pad.label()))
}

/// Whether onnxscript's rewriter (torch's dynamo exporter) marked the node as one it fused a
/// BatchNorm into.
fn bn_fused_by_rule(node: &NodeProto) -> bool {
    node.metadata("pkg.onnxscript.rewriter.rule_name")
        .is_some_and(|r| r.contains("FuseBatchNorm"))
}

/// The refusal of an adapter module on a layer with a BatchNorm folded into it.
pub fn norm_folded_refusal(path: &str, c: &Candidate) -> String {
    format!(
        "module '{path}': the exporter folded the BatchNorm after it into its {} node '{}' (weight '{}' holds W·γ/σ), and the adapter's delta would need that γ/σ, which the model no longer holds; export the model with the BatchNorm kept apart (TorchScript: `training=torch.onnx.TrainingMode.PRESERVE`; dynamo: `optimize=False`), or fold the adapter in torch before exporting",
        c.op, c.node, c.weight
    )
}

/// The float values around a MatMulInteger or a quantized Gather (see [`FloatSite`]), when
/// the nodes around it are those `quantize_dynamic` writes and nothing else reads the
/// quantized values in between.
fn float_site(
    model: &ModelProto,
    graph: &ModelGraph,
    (gi, ni): (usize, usize),
    node: &NodeProto,
) -> Option<FloatSite> {
    let view = &graph.graphs[gi];
    let sole = |v: &str| -> Option<(usize, &NodeProto)> {
        let [u] = view.consumers_of(v) else {
            return None;
        };
        if view.is_graph_output(v) {
            return None;
        }
        graph.node(model, gi, *u).map(|n| (*u, n))
    };
    // The float x that a DynamicQuantizeLinear quantizes into `xq`.
    let dequantized_x = |xq: &str| -> Option<(String, String)> {
        let dq = graph.node(model, gi, *view.producer.get(xq)?)?;
        (dq.op_type() == "DynamicQuantizeLinear"
            && dq.output.first().map(String::as_str) == Some(xq))
        .then(|| Some((dq.input.first()?.clone(), dq.output.get(1)?.clone())))?
    };
    match node.op_type() {
        // onnxruntime's fusions: the float output is the node's own; DynamicQuantizeMatMul
        // takes float x itself.
        "DynamicQuantizeMatMul" => Some(FloatSite {
            x: node.input.first()?.clone(),
            anchor: ni,
        }),
        "MatMulIntegerToFloat" => Some(FloatSite {
            x: dequantized_x(node.input.first()?)?.0,
            anchor: ni,
        }),
        "MatMulInteger" => {
            let (x, x_scale) = dequantized_x(node.input.first()?)?;
            let to_float = Some(i64::from(DataType::Float.to_i32()));
            let (_, cast) = sole(node.output.first()?)?;
            if cast.op_type() != "Cast" || cast.attr_i("to") != to_float {
                return None;
            }
            let (mi, mul) = sole(cast.output.first()?)?;
            // The Mul scales by x's scale (times the weight's, through one more Mul).
            let scaled_by_x = mul.op_type() == "Mul"
                && mul.input.iter().any(|v| {
                    *v == x_scale
                        || view
                            .producer
                            .get(v)
                            .and_then(|&p| graph.node(model, gi, p))
                            .is_some_and(|p| p.op_type() == "Mul" && p.input.contains(&x_scale))
                });
            scaled_by_x.then_some(FloatSite { x, anchor: mi })
        }
        "Gather" => {
            let (di, dq) = sole(node.output.first()?)?;
            let ids = node.input.get(1)?;
            (dq.op_type() == "DequantizeLinear").then(|| FloatSite {
                x: ids.clone(),
                anchor: di,
            })
        }
        _ => None,
    }
}

/// A constant found behind a node input (see [`walk_to_const`]).
pub(crate) struct Walked {
    source: ConstSource,
    /// The value that names the constant (an initializer, or a Constant's output).
    value: String,
    /// The pass-through ops in between, weight first, and their node indices.
    through: Vec<String>,
    chain: Vec<usize>,
    transposes: usize,
    /// A DequantizeLinear is on the way.
    dequantized: bool,
    /// The rows of the constant that a Split or Slice reading it passes on (see
    /// `Candidate::window`).
    window: Option<[usize; 2]>,
}

impl Walked {
    /// The candidate of `node` (at `at`: graph, node index, node, weight input) reading this
    /// constant, `tensor`; no module path yet, not shared, not quantized, not packed.
    fn candidate(
        self,
        at: (usize, usize, &NodeProto, usize),
        tensor: &crate::onnx::pb::TensorProto,
        shape: Vec<i64>,
        layout: Layout,
        (in_features, out_features): (i64, i64),
    ) -> Candidate {
        let (gi, ni, node, wi) = at;
        Candidate {
            module: String::new(),
            evidence: Evidence::None,
            other_paths: Vec::new(),
            node: node.label(),
            op: node.op_type().to_string(),
            weight: match &self.source {
                ConstSource::Initializer { .. } => tensor.name().to_string(),
                ConstSource::Constant { .. } => self.value,
            },
            shape,
            layout,
            dtype: DataType::from_i32(tensor.data_type()).name(),
            in_features,
            out_features,
            shared: false,
            shared_with: SharedWith::default(),
            in_subgraph: gi != 0,
            quantized: false,
            norm_folded: false,
            inner_pad: None,
            module_class: None,
            packed: None,
            mha: None,
            mha_rows: None,
            window: self.window,
            through: self.through,
            graph: gi,
            graph_loc: crate::graph::GraphLoc::default(),
            node_index: ni,
            source: Some(self.source),
            chain: self.chain,
            weight_input: wi,
            float_site: None,
            params: Vec::new(),
            weight_read_as: None,
        }
    }
}

/// Walks back from `input` through pass-through ops (`PASS_THROUGH`; a Transpose only as a
/// 2-D swap) to the constant it reads; None when it reads anything else.
fn walk_to_const(model: &ModelProto, graph: &ModelGraph, gi: usize, input: &str) -> Option<Walked> {
    let view = &graph.graphs[gi];
    let mut value = input.to_string();
    let (mut through, mut chain) = (Vec::new(), Vec::new());
    let (mut transposes, mut dequantized) = (0usize, false);
    let mut window = None;
    // (at most one step per node: a malformed cycle of pass-through nodes ends the walk)
    let mut steps = 0..=view.producer.len();
    let source = loop {
        if let Some(src) = graph.const_source(model, gi, &value) {
            break src;
        }
        steps.next()?;
        let &p = view.producer.get(&value)?;
        let pn = graph.node(model, gi, p)?;
        // A Split or Slice on axis 0 of the constant itself (its rows as one layer's weight).
        if matches!(pn.op_type(), "Split" | "Slice") && window.is_none() {
            let x = pn.input.first()?;
            let src = graph.const_source(model, gi, x)?;
            let t = graph.const_tensor(model, &src)?;
            window = Some(rows::window(model, graph, gi, pn, &value, &t.dims)?);
            through.insert(0, pn.op_type().to_string());
            chain.insert(0, p);
            value = x.clone();
            continue;
        }
        if !PASS_THROUGH.contains(&pn.op_type()) {
            return None;
        }
        match pn.op_type() {
            "Transpose" => {
                let perm = pn.attr_ints("perm").unwrap_or(&[]);
                if !(perm.is_empty() || perm == [1, 0]) {
                    return None;
                }
                transposes += 1;
            }
            "DequantizeLinear" => dequantized = true,
            _ => {}
        }
        through.insert(0, pn.op_type().to_string());
        chain.insert(0, p);
        value = pn.input.first()?.clone();
    };
    Some(Walked {
        source,
        value,
        through,
        chain,
        transposes,
        dequantized,
        window,
    })
}

/// Layout and (in, out) features from the node and the stored shape.
fn layout_of(node: &NodeProto, shape: &[i64], transposes: usize) -> Option<(Layout, i64, i64)> {
    match node.op_type() {
        // onnxruntime's Attention: weight [in, q + k + v].
        "Attention" => (shape.len() == 2).then(|| (Layout::InOut, shape[0], shape[1])),
        "MatMul" | "Gemm" | "MatMulInteger" | "DynamicQuantizeMatMul" | "MatMulIntegerToFloat" => {
            if shape.len() != 2 {
                return None;
            }
            let trans_b = node.op_type() == "Gemm" && node.attr_i("transB").unwrap_or(0) != 0;
            let flipped = (transposes % 2 == 1) ^ trans_b;
            Some(if flipped {
                (Layout::OutIn, shape[1], shape[0])
            } else {
                (Layout::InOut, shape[0], shape[1])
            })
        }
        "Conv" => {
            if shape.len() < 3 {
                return None;
            }
            // (a group count below 1, or one that overflows, is no valid Conv)
            let groups = node.attr_i("group").unwrap_or(1);
            let in_features = (groups >= 1).then(|| shape[1].checked_mul(groups))??;
            Some((Layout::Conv, in_features, shape[0]))
        }
        "Gather" | "EmbedLayerNormalization" => {
            (shape.len() == 2).then(|| (Layout::Embedding, shape[0], shape[1]))
        }
        "MatMulNBits" => Some((
            Layout::Quantized,
            node.attr_i("K").unwrap_or(0),
            node.attr_i("N").unwrap_or(0),
        )),
        _ => None,
    }
}

/// The module path by evidence order; the other paths found are kept for the report.
fn module_path(
    model: &ModelProto,
    graph: &ModelGraph,
    gi: usize,
    node: &NodeProto,
    weight_name: &str,
    weight_value: &str,
) -> (String, Evidence, Vec<String>) {
    let folded = graph
        .value_info(model, gi, weight_value)
        .or_else(|| graph.value_info(model, gi, weight_name))
        .and_then(|vi| crate::onnx::pb_ext::lookup(&vi.metadata_props, evidence::FOLDED_FROM_KEY))
        .and_then(evidence::from_folded_from);
    let mut found: Vec<(Evidence, Option<String>)> = vec![
        (
            Evidence::NameScopes,
            node.metadata(evidence::NAME_SCOPES_KEY)
                .and_then(evidence::from_name_scopes),
        ),
        (Evidence::NodeName, evidence::from_node_name(node.name())),
        (
            Evidence::WeightName,
            evidence::from_weight_name(weight_name),
        ),
        (Evidence::FoldedFrom, folded),
    ];
    // A layer the dynamo exporter fused a BatchNorm into is scoped to the BatchNorm; its
    // weight keeps the layer's parameter name.
    if bn_fused_by_rule(node) {
        found.swap(0, 2);
    }
    let mut chosen: Option<(String, Evidence)> = None;
    let mut others = Vec::new();
    for (ev, path) in found {
        let Some(path) = path else { continue };
        match &chosen {
            None => chosen = Some((path, ev)),
            Some((c, _)) if *c != path && !others.contains(&path) => others.push(path),
            _ => {}
        }
    }
    match chosen {
        Some((path, ev)) => (path, ev, others),
        None => (String::new(), Evidence::None, others),
    }
}

/// The other readers of a candidate's weight (node labels, and `graph output 'x'` when the
/// graph gives the weight out). The list is made once per weight and shared by all its readers:
/// a layer called thousands of times would otherwise hold, per call, the list of all the others.
#[derive(Clone, Debug, Default)]
pub struct SharedWith {
    /// Every reader of the weight, this candidate included.
    all: std::sync::Arc<[String]>,
    /// This candidate's place in `all`.
    me: Option<usize>,
}

impl SharedWith {
    /// The readers other than this candidate.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let me = self.me;
        self.all
            .iter()
            .enumerate()
            .filter(move |&(i, _)| Some(i) != me)
            .map(|(_, r)| r.as_str())
    }

    pub fn len(&self) -> usize {
        self.all.len() - usize::from(self.me.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every reader of the weight, this candidate among them when it is a node that reads it.
    pub fn all(&self) -> &[String] {
        &self.all
    }

    /// `a, b, c`, or the first `max` and how many more.
    pub fn listed(&self, max: usize) -> String {
        list_names(self.iter(), self.len(), max)
    }
}

/// How many of the other readers a serialized [`SharedWith`] lists: a layer called thousands of
/// times would otherwise make each call's record list all the others (`inspect --json` counts
/// them, and lists them once per weight).
pub const SHARED_LISTED: usize = 16;

impl Serialize for SharedWith {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().take(SHARED_LISTED))
    }
}

/// `a, b, c`, or the first `max` names of `len` and `… and N more`: a message names a few
/// nodes, not the thousands of calls an unrolled loop makes.
pub fn list_names<'a>(names: impl Iterator<Item = &'a str>, len: usize, max: usize) -> String {
    let shown: Vec<&str> = names.take(max).collect();
    let list = shown.join(", ");
    if len > shown.len() {
        format!("{list}, … and {} more", len - shown.len())
    } else {
        list
    }
}

/// Marks candidates whose stored weight also feeds other nodes.
fn mark_shared(model: &ModelProto, graph: &ModelGraph, cands: &mut [Candidate]) {
    type Readers = (Vec<(usize, usize)>, std::sync::Arc<[String]>);
    let mut by_source: std::collections::HashMap<ConstSource, Readers> = Default::default();
    for c in cands.iter_mut() {
        let Some(src) = c.source.clone() else {
            continue;
        };
        let (nodes, all) = by_source
            .entry(src.clone())
            .or_insert_with(|| readers(model, graph, &src));
        let me = nodes.iter().position(|&u| u == (c.graph, c.node_index));
        c.shared_with = SharedWith {
            all: all.clone(),
            me,
        };
        c.shared = !c.shared_with.is_empty();
        // A Split's or Slice's rows (`window`) are the layer's own where the tensor's other
        // readers are Slices of other rows (TorchScript slices a cross-attention's packed weight
        // twice) and this output feeds only the way to this node.
        if let (Some(rows), Some(&split)) = (c.window, c.chain.first()) {
            let view = &graph.graphs[c.graph];
            let dims = graph.const_tensor(model, &src).map(|t| t.dims.as_slice());
            // (a Slice of the constant itself: one behind a Transpose slices its columns)
            let apart = |&(g, u): &(usize, usize)| {
                (g, u) == (c.graph, split)
                    || (g == c.graph
                        && graph.node(model, g, u).and_then(|n| {
                            let reads = graph.const_source(model, g, n.input.first()?);
                            let w = (n.op_type() == "Slice" && reads.as_ref() == Some(&src))
                                .then(|| rows::window(model, graph, g, n, n.output.first()?, dims?))
                                .flatten()?;
                            Some(w[1] <= rows[0] || rows[1] <= w[0])
                        }) == Some(true))
            };
            // (every value on the way, from the Split's or Slice's output to the node, feeds
            // only the way: an exporter that merged two layers' equal weights may also have
            // merged the Transpose after the Split that both read)
            let private_way = (0..c.chain.len()).all(|k| {
                let (to, input) = match c.chain.get(k + 1) {
                    Some(&to) => (to, 0),
                    None => (c.node_index, c.weight_input),
                };
                graph
                    .node(model, c.graph, to)
                    .and_then(|n| n.input.get(input))
                    .is_some_and(|v| view.consumers_of(v) == [to] && !view.is_graph_output(v))
            });
            // (a constant the graph also gives out is read by whoever runs it)
            let own = all.len() == nodes.len() && nodes.iter().all(apart) && private_way;
            if own {
                c.shared = false;
                c.shared_with = SharedWith::default();
            }
        }
    }
}

/// Every node that reads a constant (and its label), then `graph output 'x'` when the graph
/// gives the constant out: whoever runs the model reads it too.
fn readers(
    model: &ModelProto,
    graph: &ModelGraph,
    src: &ConstSource,
) -> (Vec<(usize, usize)>, std::sync::Arc<[String]>) {
    let (nodes, mut labels): (Vec<(usize, usize)>, Vec<String>) = final_users(model, graph, src)
        .into_iter()
        .filter_map(|(g, n)| graph.node(model, g, n).map(|node| ((g, n), node.label())))
        .unzip();
    let (g, value) = match *src {
        ConstSource::Initializer { graph: g, index } => (
            g,
            graph.graphs[g]
                .loc
                .get(model)
                .and_then(|p| p.initializer.get(index))
                .map(|t| t.name().to_string()),
        ),
        ConstSource::Constant { graph: g, node } => (
            g,
            graph
                .node(model, g, node)
                .and_then(|n| n.output.first().cloned()),
        ),
    };
    if let (Some(value), Some(proto)) = (value, graph.graphs[g].loc.get(model))
        && proto.output.iter().any(|o| o.name() == value)
    {
        labels.push(format!("graph output '{value}'"));
    }
    (nodes, labels.into())
}

/// Nodes that use a constant's value, looking through pass-through ops.
pub fn final_users(
    model: &ModelProto,
    graph: &ModelGraph,
    src: &ConstSource,
) -> Vec<(usize, usize)> {
    let (gi, value) = match *src {
        ConstSource::Initializer { graph: g, index } => {
            match graph.graphs[g]
                .loc
                .get(model)
                .and_then(|p| p.initializer.get(index))
            {
                Some(t) => (g, t.name().to_string()),
                None => return Vec::new(),
            }
        }
        ConstSource::Constant { graph: g, node } => match graph.node(model, g, node) {
            Some(n) => (g, n.output.first().cloned().unwrap_or_default()),
            None => return Vec::new(),
        },
    };
    let mut users = Vec::new();
    let mut stack = vec![(gi, value)];
    let mut seen = std::collections::HashSet::new();
    while let Some((g, v)) = stack.pop() {
        if !seen.insert((g, v.clone())) {
            continue;
        }
        // Readers in this graph and in subgraphs that see it from an enclosing scope.
        for (sg, view) in graph.graphs.iter().enumerate() {
            if sg != g && !is_within(graph, sg, g) {
                continue;
            }
            if sg != g && view.initializers.contains_key(&v) {
                continue;
            }
            for &n in view.consumers_of(&v) {
                let Some(node) = graph.node(model, sg, n) else {
                    continue;
                };
                if !node.input.contains(&v) {
                    continue; // reads it inside its own subgraph, counted there
                }
                if PASS_THROUGH.contains(&node.op_type()) && node.input.first() == Some(&v) {
                    if let Some(o) = node.output.first() {
                        stack.push((sg, o.clone()));
                    }
                } else {
                    users.push((sg, n));
                }
            }
        }
    }
    users.sort_unstable();
    users.dedup();
    users
}

fn is_within(graph: &ModelGraph, inner: usize, outer: usize) -> bool {
    let mut cur = graph.graphs[inner].parent;
    while let Some(p) = cur {
        if p == outer {
            return true;
        }
        cur = graph.graphs[p].parent;
    }
    false
}

/// A TorchScript-scoped candidate over weight `weight` (one initializer per name).
#[cfg(test)]
pub(crate) fn test_candidate(module: &str, weight: &str) -> Candidate {
    Candidate {
        module: module.into(),
        evidence: Evidence::NodeName,
        other_paths: vec![],
        node: String::new(),
        op: "MatMul".into(),
        weight: weight.into(),
        shape: vec![2, 2],
        layout: Layout::InOut,
        dtype: "float32".into(),
        in_features: 2,
        out_features: 2,
        shared: false,
        shared_with: SharedWith::default(),
        in_subgraph: false,
        quantized: false,
        norm_folded: false,
        inner_pad: None,
        module_class: None,
        packed: None,
        mha: None,
        mha_rows: None,
        window: None,
        through: vec![],
        graph: 0,
        graph_loc: crate::graph::GraphLoc::default(),
        node_index: 0,
        // One initializer per weight name.
        source: Some(crate::graph::ConstSource::Initializer {
            graph: 0,
            index: weight.bytes().map(usize::from).sum(),
        }),
        chain: vec![],
        weight_input: 1,
        float_site: None,
        params: vec![],
        weight_read_as: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_names_counts_what_it_leaves_out() {
        let names = ["a", "b", "c"];
        assert_eq!(list_names(names.iter().copied(), 3, 8), "a, b, c");
        assert_eq!(
            list_names(names.iter().copied(), 3, 2),
            "a, b, … and 1 more"
        );
        assert_eq!(list_names(std::iter::empty(), 0, 2), "");
    }

    #[test]
    fn shared_with_leaves_out_its_own_reader() {
        let all: std::sync::Arc<[String]> = vec!["/a".to_string(), "/b".into(), "/c".into()].into();
        let mine = SharedWith {
            all: all.clone(),
            me: Some(1),
        };
        assert_eq!(mine.iter().collect::<Vec<_>>(), ["/a", "/c"]);
        assert_eq!((mine.len(), mine.all().len()), (2, 3));
        assert_eq!(
            serde_json::to_value(&mine).unwrap(),
            serde_json::json!(["/a", "/c"])
        );
        assert_eq!(mine.listed(1), "/a, … and 1 more");
        // (a reader that is not one of the nodes, as a graph output: every entry is another)
        let outside = SharedWith { all, me: None };
        assert_eq!(outside.len(), 3);
        assert!(SharedWith::default().is_empty());
    }
}
