//! The idle gate of a serving model (`inject --as-inputs --idle-gate`): the main graph becomes
//! one If that runs the base graph while no LoRA input holds a factor, and the graph with its
//! branches otherwise. `ungate` gives the flat serving graph back, exactly.
//!
//! ```text
//!   A inputs ── Size ─┐
//!   (one per branch)  Max ── Greater(0) ── If ─┬─ then: the graph with its branches
//!                     ┘                        └─ else: the base graph (branches left out)
//! ```
//!
//! Both bodies read the initializers of the main graph, which stay there. The If gives the graph
//! outputs that nodes compute (each once), renamed inside each body (`<name>.lora_active` /
//! `.lora_idle`) so that no body defines a name the main graph defines; an output that is a
//! graph input or an initializer stays the main graph's own.

use std::collections::{HashMap, HashSet};

use super::branch::{BRANCH_KEY, ROLE_KEY, node};
use super::weights::{all_names, unique_name};
use crate::error::{Error, Result};
use crate::onnx::LoadedModel;
use crate::onnx::pb::{
    AttributeProto, GraphProto, NodeProto, TensorProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataType as PbType,
};
use crate::onnx::pb_ext::NodeExt;

/// Metadata role of the gate's nodes (the If and what computes its condition).
pub const GATE_ROLE: &str = "idle_gate";
/// Branch metadata value of the gate's nodes.
const GATE_BRANCH: &str = "(idle gate)";
/// The first opset whose Max takes int64 (Size gives int64).
const MIN_OPSET: i64 = 12;

/// Whether the model's main graph is an idle gate.
pub fn is_gated(model: &LoadedModel) -> bool {
    model.proto.graph.as_ref().and_then(gate_position).is_some()
}

/// Whether the main graph has branches whose factors are graph inputs (what `gate` switches).
pub fn serves_inputs(model: &LoadedModel) -> bool {
    model
        .proto
        .graph
        .as_ref()
        .is_some_and(|g| !served(g).a_inputs.is_empty())
}

/// Where the gate's If is among the main graph's nodes.
fn gate_position(g: &GraphProto) -> Option<usize> {
    g.node
        .iter()
        .position(|n| n.op_type() == "If" && n.metadata(ROLE_KEY) == Some(GATE_ROLE))
}

/// Served branches of the main graph: the branch name, its lora_A factor input, and (from its
/// final Add) the base value `y.base` and the branch's output `y`.
struct Served {
    a_inputs: Vec<String>,
    branches: HashSet<String>,
    /// y.base → y: the base graph gives the base node its output back.
    restore: HashMap<String, String>,
}

/// A MatMul / Gemm whose weight is a DequantizeLinear (through a Cast or not) of a constant
/// while its activation is not dequantized (weight-only quantization, as onnxruntime's
/// MatMulNBitsQuantizer writes in QDQ format), in `g` or its subgraphs: onnxruntime's rewrite
/// of that pattern into MatMulNBits fails to load inside an If body when the weight lives in
/// the outer graph. (Fully quantized QDQ layers load.)
fn weight_only_dequantized(g: &GraphProto) -> Option<&NodeProto> {
    weight_only_in(g, &HashSet::new())
}

/// [`weight_only_dequantized`] in `g`, whose enclosing graphs hold the constants `outer`.
fn weight_only_in<'g>(g: &'g GraphProto, outer: &HashSet<&str>) -> Option<&'g NodeProto> {
    let producer: HashMap<&str, &NodeProto> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let mut constant: HashSet<&str> = outer.clone();
    constant.extend(g.initializer.iter().map(|t| t.name()));
    constant.extend(
        g.node
            .iter()
            .filter(|n| n.op_type() == "Constant")
            .flat_map(|n| n.output.iter().map(String::as_str)),
    );
    // The DequantizeLinear that produces `v`, through one Cast.
    let dequantized = |v: Option<&String>| {
        let mut p = v.and_then(|v| producer.get(v.as_str()))?;
        if p.op_type() == "Cast" {
            p = p.input.first().and_then(|v| producer.get(v.as_str()))?;
        }
        (p.op_type() == "DequantizeLinear").then_some(*p)
    };
    let found = g.node.iter().find(|n| {
        matches!(n.op_type(), "MatMul" | "Gemm")
            && dequantized(n.input.get(1))
                .and_then(|dq| dq.input.first())
                .is_some_and(|w| constant.contains(w.as_str()))
            && dequantized(n.input.first()).is_none()
    });
    found.or_else(|| {
        g.node
            .iter()
            .flat_map(|n| &n.attribute)
            .flat_map(|a| a.g.iter().chain(&a.graphs))
            .find_map(|sub| weight_only_in(sub, &constant))
    })
}

fn served(g: &GraphProto) -> Served {
    let inputs: HashSet<&str> = g.input.iter().map(|v| v.name()).collect();
    let factor = |n: &NodeProto| -> Option<String> {
        let at = match (n.metadata(ROLE_KEY), n.op_type()) {
            (Some("lora_A"), "Gather") => 0,
            (Some("lora_A" | "lora_B"), _) => 1,
            _ => return None,
        };
        n.input
            .get(at)
            .filter(|i| inputs.contains(i.as_str()))
            .cloned()
    };
    let mut s = Served {
        a_inputs: Vec::new(),
        branches: HashSet::new(),
        restore: HashMap::new(),
    };
    for n in &g.node {
        if let (Some(b), Some(f)) = (n.metadata(BRANCH_KEY), factor(n)) {
            s.branches.insert(b.to_string());
            if n.metadata(ROLE_KEY) == Some("lora_A") {
                s.a_inputs.push(f);
            }
        }
    }
    for n in &g.node {
        if n.metadata(ROLE_KEY) == Some("add")
            && n.metadata(BRANCH_KEY)
                .is_some_and(|b| s.branches.contains(b))
            && let (Some(y_base), Some(y)) = (n.input.first(), n.output.first())
        {
            s.restore.insert(y_base.clone(), y.clone());
        }
    }
    s
}

/// Wraps the main graph of a serving model into the idle gate. Returns the number of served
/// branches the gate switches. Refused: no branch with factor inputs, DoRA or bias branches
/// (their tails stay in the base), an opset before 12, and an already gated model.
pub fn gate(model: &mut LoadedModel) -> Result<usize> {
    let path = model.path.display().to_string();
    if is_gated(model) {
        return Err(Error::Target(format!("{path}: the model is already gated")));
    }
    let opset = crate::onnx::pb_ext::default_opset(&model.proto).unwrap_or(0);
    if opset < MIN_OPSET {
        return Err(Error::Target(format!(
            "{path}: the idle gate needs opset {MIN_OPSET} or later (the model imports {opset}); serve it without --idle-gate"
        )));
    }
    let mut taken = all_names(&model.proto);
    let g = model
        .proto
        .graph
        .as_mut()
        .ok_or_else(|| Error::Target(format!("{path}: no graph")))?;
    let s = served(g);
    if s.a_inputs.is_empty() {
        return Err(Error::Target(format!(
            "{path}: no LoRA inputs to gate (make the serving model with `inject --as-inputs`)"
        )));
    }
    // (inject --as-inputs refuses DoRA and lora_bias already; a model edited by hand may not)
    if let Some(n) = g.node.iter().find(|n| {
        n.metadata(BRANCH_KEY)
            .is_some_and(|b| s.branches.contains(b))
            && !matches!(
                n.metadata(ROLE_KEY),
                Some("lora_A" | "lora_B" | "add" | "transpose")
            )
    }) {
        return Err(Error::Target(format!(
            "{path}: branch '{}' has a '{}' node; only plain LoRA branches can be gated",
            n.metadata(BRANCH_KEY).unwrap_or_default(),
            n.metadata(ROLE_KEY).unwrap_or_default()
        )));
    }
    if let Some(n) = weight_only_dequantized(g) {
        return Err(Error::Target(format!(
            "{path}: node '{}' reads a weight dequantized from a constant beside float activations (weight-only quantization); onnxruntime cannot load such a layer inside an If (its DequantizeLinear→MatMulNBits rewrite misses weights of the outer graph), so it cannot be gated; serve the model without --idle-gate",
            n.label()
        )));
    }

    // The base graph: the served branches' nodes left out, base nodes given their outputs back.
    let mut idle: Vec<NodeProto> = g
        .node
        .iter()
        .filter(|n| {
            !n.metadata(BRANCH_KEY)
                .is_some_and(|b| s.branches.contains(b))
        })
        .cloned()
        .collect();
    rename_in_nodes(&mut idle, &s.restore);
    let idle_values: HashSet<&str> = idle
        .iter()
        .flat_map(|n| n.output.iter())
        .map(String::as_str)
        .collect();
    let idle_info: Vec<ValueInfoProto> = g
        .value_info
        .iter()
        .filter(|v| idle_values.contains(v.name()))
        .cloned()
        .collect();
    let active = std::mem::take(&mut g.node);
    let active_info = std::mem::take(&mut g.value_info);
    // The If gives the graph outputs that nodes compute, each once; an output that is a graph
    // input or an initializer is the same on both paths and stays the main graph's own.
    let produced: HashSet<&str> = active
        .iter()
        .flat_map(|n| n.output.iter())
        .map(String::as_str)
        .collect();
    let mut seen = HashSet::new();
    let outputs: Vec<ValueInfoProto> = g
        .output
        .iter()
        .filter(|o| produced.contains(o.name()) && seen.insert(o.name()))
        .cloned()
        .collect();
    if outputs.is_empty() {
        return Err(Error::Target(format!(
            "{path}: no graph output is computed by the graph's nodes, so there is nothing to gate"
        )));
    }
    let then_branch = body(active, active_info, &outputs, "lora_active", &mut taken);
    let else_branch = body(idle, idle_info, &outputs, "lora_idle", &mut taken);

    let mut nodes = Vec::new();
    let mut sizes = Vec::new();
    for a in &s.a_inputs {
        let out = unique_name(&format!("{a}.size"), &mut taken);
        let name = unique_name(&format!("{a}.gate_size"), &mut taken);
        nodes.push(gate_node_proto("Size", vec![a.clone()], out.clone(), name));
        sizes.push(out);
    }
    let largest = unique_name("lora_gate.largest", &mut taken);
    let name = unique_name("lora_gate.max", &mut taken);
    nodes.push(gate_node_proto("Max", sizes, largest.clone(), name));
    let zero = unique_name("lora_gate.zero", &mut taken);
    g.initializer.push(TensorProto {
        name: Some(zero.clone()),
        data_type: Some(PbType::Int64 as i32),
        raw_data: Some(0i64.to_le_bytes().to_vec().into()),
        ..Default::default()
    });
    let active_flag = unique_name("lora_gate.active", &mut taken);
    let name = unique_name("lora_gate.greater", &mut taken);
    nodes.push(gate_node_proto(
        "Greater",
        vec![largest, zero],
        active_flag.clone(),
        name,
    ));
    let name = unique_name("lora_gate.if", &mut taken);
    let mut iff = gate_node_proto("If", vec![active_flag], String::new(), name);
    iff.output = outputs.iter().map(|o| o.name().to_string()).collect();
    iff.attribute = vec![
        graph_attr("then_branch", then_branch),
        graph_attr("else_branch", else_branch),
    ];
    nodes.push(iff);
    g.node = nodes;
    Ok(s.branches.len())
}

fn gate_node_proto(op: &str, inputs: Vec<String>, output: String, name: String) -> NodeProto {
    node(op, inputs, output, name, GATE_BRANCH, GATE_ROLE)
}

fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        g: Some(g),
        r#type: Some(AttributeType::Graph as i32),
        ..Default::default()
    }
}

/// One body of the If: `nodes` with the graph outputs (each computed by one of them) renamed
/// `<name>.<suffix>`.
fn body(
    mut nodes: Vec<NodeProto>,
    mut value_info: Vec<ValueInfoProto>,
    outputs: &[ValueInfoProto],
    suffix: &str,
    taken: &mut HashSet<String>,
) -> GraphProto {
    let mut map = HashMap::new();
    let mut body_outputs = Vec::new();
    for o in outputs {
        let new = unique_name(&format!("{}.{suffix}", o.name()), taken);
        map.insert(o.name().to_string(), new.clone());
        body_outputs.push(ValueInfoProto {
            name: Some(new),
            ..o.clone()
        });
    }
    rename_in_nodes(&mut nodes, &map);
    rename_infos(&mut value_info, &map);
    GraphProto {
        node: nodes,
        name: Some(suffix.into()),
        output: body_outputs,
        value_info,
        ..Default::default()
    }
}

/// Undoes `gate`: the main graph gets the then-body's nodes and value infos back, with the
/// graph outputs' own names, and the gate's nodes and constant go. Returns whether the model
/// was gated.
pub fn ungate(model: &mut LoadedModel) -> Result<bool> {
    let path = model.path.display().to_string();
    let Some(g) = model.proto.graph.as_mut() else {
        return Ok(false);
    };
    let Some(at) = gate_position(g) else {
        return Ok(false);
    };
    // Checked before anything changes: the If's then-body fits its outputs, and every other
    // node of the main graph is one of the gate's.
    let bad = || Error::Target(format!("{path}: its idle gate is not one onnx-lora wrote"));
    let fits = g.node[at]
        .attr("then_branch")
        .and_then(|a| a.g.as_ref())
        .is_some_and(|t| t.output.len() == g.node[at].output.len());
    let only_gate = g
        .node
        .iter()
        .all(|n| n.metadata(ROLE_KEY) == Some(GATE_ROLE));
    if !fits || !only_gate {
        return Err(bad());
    }
    let iff = g.node.swap_remove(at);
    let then_branch = iff
        .attribute
        .into_iter()
        .find(|a| a.name() == "then_branch")
        .and_then(|a| a.g)
        .ok_or_else(bad)?;
    // The gate's constant 0: the second input of its Greater.
    let zero = g
        .node
        .iter()
        .find(|n| n.op_type() == "Greater")
        .and_then(|n| n.input.get(1))
        .cloned();
    let mut nodes = then_branch.node;
    let mut map = HashMap::new();
    for (inner, outer) in then_branch.output.iter().zip(&iff.output) {
        map.insert(inner.name().to_string(), outer.clone());
    }
    rename_in_nodes(&mut nodes, &map);
    let mut value_info = then_branch.value_info;
    rename_infos(&mut value_info, &map);
    g.initializer.retain(|t| Some(t.name()) != zero.as_deref());
    g.node = nodes;
    g.value_info = value_info;
    Ok(true)
}

/// Renames value infos by `map`.
fn rename_infos(infos: &mut [ValueInfoProto], map: &HashMap<String, String>) {
    for v in infos {
        if let Some(n) = map.get(v.name()) {
            v.name = Some(n.clone());
        }
    }
}

/// Renames values (node inputs and outputs, and what nested graphs read or output) by `map`.
fn rename_in_nodes(nodes: &mut [NodeProto], map: &HashMap<String, String>) {
    if map.is_empty() {
        return;
    }
    for n in nodes {
        for v in n.input.iter_mut().chain(n.output.iter_mut()) {
            if let Some(new) = map.get(v.as_str()) {
                v.clone_from(new);
            }
        }
        for a in &mut n.attribute {
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_in_nodes(&mut g.node, map);
                rename_infos(&mut g.output, map);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb::TensorProto;

    fn n(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(format!("/{output}/{op}")),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn graph(nodes: Vec<NodeProto>, inits: &[&str]) -> GraphProto {
        GraphProto {
            node: nodes,
            initializer: inits
                .iter()
                .map(|s| TensorProto {
                    name: Some(s.to_string()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn weight_only_dequantization_is_found_through_casts_and_in_subgraphs() {
        let dq = n("DequantizeLinear", &["wq", "s"], "w");
        // Weight-only: float activation x.
        let g = graph(
            vec![dq.clone(), n("MatMul", &["x", "w"], "y")],
            &["wq", "s"],
        );
        assert!(weight_only_dequantized(&g).is_some());
        // Through a Cast (onnxruntime fuses DequantizeLinear -> Cast -> MatMul too).
        let g = graph(
            vec![
                dq.clone(),
                n("Cast", &["w"], "wc"),
                n("MatMul", &["x", "wc"], "y"),
            ],
            &["wq", "s"],
        );
        assert!(weight_only_dequantized(&g).is_some());
        // Fully quantized (the activation is dequantized too): onnxruntime loads it gated.
        let g = graph(
            vec![
                dq.clone(),
                n("DequantizeLinear", &["xq", "s"], "x"),
                n("MatMul", &["x", "w"], "y"),
            ],
            &["wq", "s"],
        );
        assert!(weight_only_dequantized(&g).is_none());
        // Inside an If body, on a weight of the outer graph.
        let body = graph(vec![dq, n("MatMul", &["x", "w"], "y")], &[]);
        let mut iff = n("If", &["c"], "out");
        iff.attribute.push(crate::onnx::pb::AttributeProto {
            name: Some("then_branch".into()),
            g: Some(body),
            ..Default::default()
        });
        let g = graph(vec![iff], &["wq", "s"]);
        assert_eq!(
            weight_only_dequantized(&g).map(|n| n.name()),
            Some("/y/MatMul")
        );
    }
}
