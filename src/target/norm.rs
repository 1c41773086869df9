//! Normalization layers (LayerNormalization and onnxruntime's fusions of it, RMS, group and
//! batch norms; not InstanceNormalization, which torch's exporters use for GroupNorm with
//! placeholder unit scales, the real ones in a Mul and Add after it): no LoRA targets them, but PEFT's `bias="all"` trains their biases
//! and `modules_to_save` can replace them whole. Each constant scale or bias becomes a
//! `Candidate` of layout `Norm`, whose values a fold replaces.

use super::{Candidate, Evidence, Layout, mark_shared, module_path, walk_to_const};
use crate::graph::ModelGraph;
use crate::onnx::DataType;
use crate::onnx::pb::{ModelProto, NodeProto};
use crate::onnx::pb_ext::NodeExt;

/// A normalization op's parameter inputs: (input index, PEFT's parameter name).
type Params = &'static [(usize, &'static str)];

const SCALE_BIAS: Params = &[(1, "weight"), (2, "bias")];

/// (domain, op, its parameters).
const NORM_OPS: &[(&str, &str, Params)] = &[
    ("", "LayerNormalization", SCALE_BIAS),
    ("", "GroupNormalization", SCALE_BIAS),
    ("", "BatchNormalization", SCALE_BIAS),
    ("", "RMSNormalization", &[(1, "weight")]),
    ("", "SimplifiedLayerNormalization", &[(1, "weight")]),
    (
        "com.microsoft",
        "SkipLayerNormalization",
        &[(2, "weight"), (3, "bias")],
    ),
    (
        "com.microsoft",
        "SkipSimplifiedLayerNormalization",
        &[(2, "weight")],
    ),
    (
        "com.microsoft",
        "EmbedLayerNormalization",
        &[(5, "weight"), (6, "bias")],
    ),
];

/// A node's normalization parameters (none when it is no normalization op).
fn params(node: &NodeProto) -> Params {
    let domain = match node.domain() {
        "ai.onnx" => "",
        d => d,
    };
    NORM_OPS
        .iter()
        .find(|(d, op, _)| *d == domain && *op == node.op_type())
        .map_or(&[], |(_, _, p)| p)
}

/// Which parameter of its normalization layer a `Norm` candidate is (`weight`, `bias`).
pub fn param(c: &Candidate) -> Option<&'static str> {
    if c.layout != Layout::Norm {
        return None;
    }
    NORM_OPS
        .iter()
        .find(|(_, op, _)| *op == c.op)
        .and_then(|(_, _, p)| p.iter().find(|(i, _)| *i == c.weight_input))
        .map(|(_, name)| *name)
}

/// Every constant float scale and bias of a normalization node, as a candidate whose module is
/// the layer's path: from the node's own evidence (dynamo's scopes, TorchScript's node name),
/// else from the parameter's name (`encoder.layer.0.output.LayerNorm.bias`) when this node
/// alone reads it (an exporter's deduplicated tensor names one layer of several).
pub fn find_norm_params(model: &ModelProto, graph: &ModelGraph) -> Vec<Candidate> {
    // (nodes onnx-lora added are no layers of the model)
    let mut out: Vec<Candidate> = graph
        .nodes(model)
        .filter(|(_, _, node)| node.metadata(crate::onnx::pb_ext::BRANCH_KEY).is_none())
        .flat_map(|(gi, ni, node)| {
            params(node)
                .iter()
                .filter_map(move |&(input, _)| norm_param(model, graph, gi, ni, node, input))
        })
        .collect();
    for c in &mut out {
        c.graph_loc = graph.graphs[c.graph].loc.clone();
    }
    mark_shared(model, graph, &mut out);
    for c in out.iter_mut().filter(|c| c.module.is_empty() && !c.shared) {
        let stem = c
            .weight
            .strip_suffix(&format!(".{}", param(c).unwrap_or("")));
        if let Some(stem) = stem.filter(|s| !s.contains("::") && !s.contains('/') && !s.is_empty())
        {
            c.module = stem.to_string();
            c.evidence = Evidence::WeightName;
        }
    }
    out
}

fn norm_param(
    model: &ModelProto,
    graph: &ModelGraph,
    gi: usize,
    ni: usize,
    node: &NodeProto,
    input: usize,
) -> Option<Candidate> {
    let walked = walk_to_const(
        model,
        graph,
        gi,
        node.input.get(input).filter(|v| !v.is_empty())?,
    )?;
    if walked.dequantized || walked.transposes > 0 || walked.window.is_some() {
        return None;
    }
    let tensor = graph.const_tensor(model, &walked.source)?;
    let dtype = DataType::from_i32(tensor.data_type());
    if !dtype.is_foldable_float() {
        return None;
    }
    // Node evidence only: a parameter name is taken once sharing is known (above).
    let (module, evidence, other_paths) = module_path(model, graph, gi, node, "", &walked.value);
    let numel = crate::onnx::pb_ext::numel(&tensor.dims) as i64;
    Some(Candidate {
        module,
        evidence,
        other_paths,
        ..walked.candidate(
            (gi, ni, node, input),
            tensor,
            tensor.dims.clone(),
            Layout::Norm,
            (1, numel),
        )
    })
}
