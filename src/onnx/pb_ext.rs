//! Small extension helpers on the generated protobuf types: attribute access, metadata
//! lookup, and walking every tensor a model stores (graphs, subgraphs, functions, training).

use super::pb::{
    AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto,
    TensorProto,
};

/// Metadata key on every node onnx-lora adds for a LoRA branch: the branch's name (the module
/// path). Such nodes are no layers of the model.
pub const BRANCH_KEY: &str = "onnx-lora.branch";
/// Metadata key naming the role of a branch node (`lora_A`, `add`, `weight_add`, ...).
pub const ROLE_KEY: &str = "onnx-lora.role";
/// Model metadata key: the adapter modules whose values `inject --adapter` wrote into the
/// weights (modules_to_save, trained biases, trainable tokens: no branch form), as a JSON list,
/// so that `export-peft` can say what it does not give back.
pub const REPLACED_KEY: &str = "onnx-lora.replaced";
/// Model metadata key: where `inject --adapter` wrote each whole tensor of a PEFT adapter
/// (`rewrite::whole_record`), so that `export-peft` gives them back.
pub const WHOLE_KEY: &str = "onnx-lora.whole_values";

pub trait NodeExt {
    fn attr(&self, name: &str) -> Option<&AttributeProto>;
    fn attr_i(&self, name: &str) -> Option<i64>;
    fn attr_f(&self, name: &str) -> Option<f32>;
    fn attr_ints(&self, name: &str) -> Option<&[i64]>;
    fn metadata(&self, key: &str) -> Option<&str>;
    fn label(&self) -> String;
}

impl NodeExt for NodeProto {
    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute.iter().find(|a| a.name() == name)
    }
    fn attr_i(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.i)
    }
    fn attr_f(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.f)
    }
    fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
    fn metadata(&self, key: &str) -> Option<&str> {
        lookup(&self.metadata_props, key)
    }
    /// `name` when the node has one, otherwise `op_type(first output)`, for messages.
    fn label(&self) -> String {
        match self.name() {
            "" => format!(
                "{}({})",
                self.op_type(),
                self.output.first().map(String::as_str).unwrap_or("")
            ),
            n => n.to_string(),
        }
    }
}

pub fn lookup<'a>(props: &'a [StringStringEntryProto], key: &str) -> Option<&'a str> {
    props.iter().find(|p| p.key() == key).map(|p| p.value())
}

/// Calls `f` on every tensor stored anywhere in the model: initializers, sparse initializers,
/// tensor attributes (Constant values), subgraphs, functions and training graphs.
pub fn for_each_tensor_mut<E>(
    model: &mut ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(g) = model.graph.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for t in &mut model.training_info {
        if let Some(g) = t.initialization.as_mut() {
            graph_tensors_mut(g, f)?;
        }
        if let Some(g) = t.algorithm.as_mut() {
            graph_tensors_mut(g, f)?;
        }
    }
    for func in &mut model.functions {
        function_tensors_mut(func, f)?;
    }
    Ok(())
}

fn function_tensors_mut<E>(
    func: &mut FunctionProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    for a in &mut func.attribute_proto {
        attribute_tensors_mut(a, f)?;
    }
    for n in &mut func.node {
        for a in &mut n.attribute {
            attribute_tensors_mut(a, f)?;
        }
    }
    Ok(())
}

pub fn graph_tensors_mut<E>(
    g: &mut GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for s in &mut g.sparse_initializer {
        if let Some(v) = s.values.as_mut() {
            f(v)?;
        }
        if let Some(i) = s.indices.as_mut() {
            f(i)?;
        }
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            attribute_tensors_mut(a, f)?;
        }
    }
    Ok(())
}

fn attribute_tensors_mut<E>(
    a: &mut AttributeProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(t) = a.t.as_mut() {
        f(t)?;
    }
    for t in &mut a.tensors {
        f(t)?;
    }
    for s in a
        .sparse_tensor
        .iter_mut()
        .chain(a.sparse_tensors.iter_mut())
    {
        if let Some(v) = s.values.as_mut() {
            f(v)?;
        }
        if let Some(i) = s.indices.as_mut() {
            f(i)?;
        }
    }
    if let Some(g) = a.g.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for g in &mut a.graphs {
        graph_tensors_mut(g, f)?;
    }
    Ok(())
}

/// Whether the tensor's data lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(super::pb::tensor_proto::DataLocation::External as i32)
}

/// The version of the default (`ai.onnx`) operator set the model imports, if it imports it.
pub fn default_opset(model: &ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
        .map(|o| o.version())
}

/// Number of elements of a tensor with these dims (negative dims count as 0, and a count past
/// `usize` saturates): for tensors [`checked_numel`] has accepted.
pub fn numel(dims: &[i64]) -> usize {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d.max(0) as usize))
        .unwrap_or(usize::MAX)
}

/// Number of elements of a stored tensor's shape, refusing negative dims and counts too large
/// for any file (what a loader checks before it trusts the shape).
pub fn checked_numel(dims: &[i64]) -> Result<usize, String> {
    if dims.iter().any(|&d| d < 0) {
        return Err(format!("negative dimension in shape {dims:?}"));
    }
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .filter(|&n| n <= isize::MAX as usize / 16)
        .ok_or_else(|| format!("shape {dims:?} is too large"))
}
