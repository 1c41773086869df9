//! Building the nodes and initializers of one low-rank branch beside a targeted node.
//!
//! ```text
//!            ┌── Node(W) ─────────────── y.base ──┐
//!   x ───────┤                                    Add ── y
//!            └── lora_A ── lora_B ── Mul(s) ──────┘
//! ```
//!
//! `lora_bias` adds lora_B's bias before the scale; DoRA multiplies the sum by the per-channel
//! factor m / ||W + s·B·A|| and adds back (1 - factor)·bias for layers with a bias.
//!
//! lora_A / lora_B are MatMuls for MatMul, Gemm and MatMulNBits (Gemm's transA handled by a
//! Transpose of x), Convs for Conv (A with the base's kernel, strides, pads and dilations;
//! B 1×1), and Gather + MatMul for embeddings. The base node's output is renamed and the Add
//! takes its name, so consumers and graph outputs are untouched. Every node carries
//! `onnx-lora.*` metadata so the branch can be found again (fold-back, export).

use crate::onnx::DataType;
use crate::onnx::pb::{
    AttributeProto, NodeProto, StringStringEntryProto, TensorProto, attribute_proto::AttributeType,
};
use crate::onnx::pb_ext::NodeExt;
use crate::target::Candidate;

pub use crate::onnx::pb_ext::{BRANCH_KEY, ROLE_KEY};

/// Metadata key of a branch on a packed q/k/v weight: the projections it carries (JSON list of
/// [`Slice`]), so that export-peft gives each module back its own factors.
pub const SLICES_KEY: &str = "onnx-lora.slices";

/// One adapter module's part of a branch on a packed q/k/v weight: its rows of the branch's A
/// (`ranks`), its output columns of the weight (`columns`, where its B sits, scaled by
/// `scale`; zeros elsewhere), and whether its magnitude (DoRA) and lora_B bias are in the
/// branch's.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Slice {
    pub module: String,
    pub ranks: [usize; 2],
    pub columns: [usize; 2],
    pub scale: f32,
    #[serde(default)]
    pub dora: bool,
    #[serde(default)]
    pub lora_bias: bool,
}

/// Metadata key of a branch whose module PEFT targets through `target_parameters` (value
/// `parameter`), so that export-peft names it there rather than in `target_modules`.
pub const TARGET_KEY: &str = "onnx-lora.target";

/// Marks `nodes` as a branch on a module's parameter (nothing unless `via_parameter`).
pub fn mark_parameter(nodes: &mut [NodeProto], via_parameter: bool) {
    if via_parameter {
        for n in nodes {
            n.metadata_props.push(meta(TARGET_KEY, "parameter"));
        }
    }
}

/// The branch node was marked by [`mark_parameter`].
pub fn is_parameter(n: &NodeProto) -> bool {
    n.metadata(TARGET_KEY) == Some("parameter")
}

/// The slices of a branch node's metadata (none when it has no `SLICES_KEY`).
pub fn slices_of(n: &NodeProto) -> std::result::Result<Vec<Slice>, String> {
    match n.metadata(SLICES_KEY) {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(text).map_err(|e| format!("{SLICES_KEY}: {e}")),
    }
}

/// Marks `nodes` as a branch carrying `slices` (nothing when there are none).
pub fn mark_slices(nodes: &mut [NodeProto], slices: &[Slice]) {
    if slices.is_empty() {
        return;
    }
    let text = serde_json::to_string(slices).unwrap_or_default();
    for n in nodes {
        n.metadata_props.push(meta(SLICES_KEY, &text));
    }
}

/// Metadata key of a branch carrying rows `[start, end]` (JSON) of a cross-attention's packed
/// in-projection (`ModuleAdapter::in_proj_rows`): one of its module's branches, one per layer,
/// which export-peft joins again.
pub const IN_PROJ_ROWS_KEY: &str = "onnx-lora.in_proj_rows";

/// Marks `nodes` as a branch carrying `rows` of an in-projection (nothing when None).
pub fn mark_in_proj_rows(nodes: &mut [NodeProto], rows: Option<[usize; 2]>) {
    if let Some(r) = rows {
        let text = serde_json::to_string(&r).unwrap_or_default();
        for n in nodes {
            n.metadata_props.push(meta(IN_PROJ_ROWS_KEY, &text));
        }
    }
}

/// The in-projection rows a branch node was marked with by [`mark_in_proj_rows`].
pub fn in_proj_rows_of(n: &NodeProto) -> std::result::Result<Option<[usize; 2]>, String> {
    match n.metadata(IN_PROJ_ROWS_KEY) {
        None => Ok(None),
        Some(text) => match serde_json::from_str::<[usize; 2]>(text) {
            Ok([s, e]) if s < e => Ok(Some([s, e])),
            Ok(r) => Err(format!("{IN_PROJ_ROWS_KEY}: rows {r:?} are empty")),
            Err(e) => Err(format!("{IN_PROJ_ROWS_KEY}: {e}")),
        },
    }
}

/// Names of a branch's parameters in the graph.
#[derive(Clone, Debug)]
pub struct BranchNames {
    pub a: String,
    pub b: String,
    /// None when the scale is folded into B (serving models).
    pub scale: Option<String>,
    /// lora_B's bias (`lora_bias`), added before the scale as PEFT does.
    pub lora_bias: Option<String>,
    /// DoRA: the per-channel factor m / ||W + s·B·A|| applied after the sum, and the
    /// correction (1 - factor)·bias that keeps the layer's own bias unscaled.
    pub dora_scale: Option<String>,
    pub dora_bias: Option<String>,
}

pub fn meta(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    }
}

/// Sets the metadata entry `k` (a model's record) to `v`, adding it where there is none.
pub(crate) fn set_meta(props: &mut Vec<StringStringEntryProto>, k: &str, v: String) {
    match props.iter_mut().find(|p| p.key() == k) {
        Some(p) => p.value = Some(v),
        None => props.push(meta(k, &v)),
    }
}

/// An int attribute.
pub(crate) fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    }
}

pub(crate) fn node(
    op: &str,
    inputs: Vec<String>,
    output: String,
    name: String,
    branch: &str,
    role: &str,
) -> NodeProto {
    NodeProto {
        input: inputs,
        output: vec![output],
        name: Some(name),
        op_type: Some(op.into()),
        domain: Some(String::new()),
        metadata_props: vec![meta(BRANCH_KEY, branch), meta(ROLE_KEY, role)],
        ..Default::default()
    }
}

/// The branch's nodes for `c` (whose proto is `base`), added to the value `y` (the base
/// node's output, or its bias Add's). `y_base` is `y`'s new name; the last node produces `y`.
pub fn branch_nodes(
    c: &Candidate,
    base: &NodeProto,
    names: &BranchNames,
    y: &str,
    y_base: &str,
    branch: &str,
) -> Vec<NodeProto> {
    let y = y.to_string();
    let stem = format!(
        "{}.lora",
        if base.name().is_empty() {
            y.as_str()
        } else {
            base.name()
        }
    );
    let v = |s: &str| format!("{y}.lora_{s}");
    let mut nodes = Vec::new();
    let mut x = base.input.first().cloned().unwrap_or_default();
    match c.op.as_str() {
        "Conv" => {
            let mut a = node(
                "Conv",
                vec![x, names.a.clone()],
                v("a"),
                format!("{stem}_A"),
                branch,
                "lora_A",
            );
            a.attribute = base
                .attribute
                .iter()
                .filter(|at| {
                    matches!(
                        at.name(),
                        "strides" | "pads" | "dilations" | "auto_pad" | "kernel_shape"
                    )
                })
                .cloned()
                .collect();
            nodes.push(a);
            let mut b = node(
                "Conv",
                vec![v("a"), names.b.clone()],
                v("b"),
                format!("{stem}_B"),
                branch,
                "lora_B",
            );
            let spatial = c.shape.len().saturating_sub(2);
            b.attribute = vec![ints("kernel_shape", &vec![1; spatial])];
            if c.groups() > 1 {
                b.attribute.push(int("group", c.groups() as i64));
            }
            nodes.push(b);
        }
        "Gather" => {
            let idx = base.input.get(1).cloned().unwrap_or_default();
            nodes.push(node(
                "Gather",
                vec![names.a.clone(), idx],
                v("a"),
                format!("{stem}_A"),
                branch,
                "lora_A",
            ));
            nodes.push(node(
                "MatMul",
                vec![v("a"), names.b.clone()],
                v("b"),
                format!("{stem}_B"),
                branch,
                "lora_B",
            ));
        }
        _ => {
            if c.op == "Gemm" && base.attr_i("transA").unwrap_or(0) != 0 {
                let mut t = node(
                    "Transpose",
                    vec![x],
                    v("xt"),
                    format!("{stem}_T"),
                    branch,
                    "transpose",
                );
                t.attribute = vec![ints("perm", &[1, 0])];
                nodes.push(t);
                x = v("xt");
            }
            nodes.push(node(
                "MatMul",
                vec![x, names.a.clone()],
                v("a"),
                format!("{stem}_A"),
                branch,
                "lora_A",
            ));
            nodes.push(node(
                "MatMul",
                vec![v("a"), names.b.clone()],
                v("b"),
                format!("{stem}_B"),
                branch,
                "lora_B",
            ));
        }
    }
    let mut last = v("b");
    if let Some(b) = &names.lora_bias {
        nodes.push(node(
            "Add",
            vec![last, b.clone()],
            v("bb"),
            format!("{stem}_bias"),
            branch,
            "lora_bias",
        ));
        last = v("bb");
    }
    if let Some(s) = &names.scale {
        nodes.push(node(
            "Mul",
            vec![last, s.clone()],
            v("s"),
            format!("{stem}_scale"),
            branch,
            "scale",
        ));
        last = v("s");
    }
    // DoRA: (y_base + branch) * factor (+ (1 - factor) * bias), the last node producing y.
    let mut tail = Vec::new();
    if let Some(f) = &names.dora_scale {
        tail.push(("Mul", f.clone(), "dora_scale"));
    }
    if let Some(b) = &names.dora_bias {
        tail.push(("Add", b.clone(), "dora_bias"));
    }
    let mut sum = if tail.is_empty() { y.clone() } else { v("sum") };
    nodes.push(node(
        "Add",
        vec![y_base.to_string(), last],
        sum.clone(),
        format!("{stem}_add"),
        branch,
        "add",
    ));
    let n = tail.len();
    for (i, (op, param, role)) in tail.into_iter().enumerate() {
        let out = if i + 1 == n { y.clone() } else { v(role) };
        nodes.push(node(
            op,
            vec![sum, param],
            out.clone(),
            format!("{stem}_{role}"),
            branch,
            role,
        ));
        sum = out;
    }
    nodes
}

/// A tensor initializer from f32 values in `dtype`.
pub fn initializer(
    name: &str,
    dims: &[i64],
    values: &[f32],
    dtype: DataType,
) -> crate::Result<TensorProto> {
    Ok(TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(dtype.to_i32()),
        raw_data: Some(crate::tensor::from_f32(values, dtype, name)?.into()),
        ..Default::default()
    })
}
