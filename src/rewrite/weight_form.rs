//! Branches in weight space (`inject --form weight`): the base node reads W + s·A·B instead of
//! adding s·B(A(x)) to its output. The factors stay separate in the file (fold-back and
//! export find them again), and onnxruntime's constant folding merges them when a session
//! loads, so serving runs exactly the base's kernels.
//!
//! ```text
//!   first factor ── Mul(s) ──┐                          (Conv: Reshape to W's shape)
//!   second factor ──────────MatMul ──┐
//!   W ──────────────────────────────Add ── [Mul(DoRA factor)] ── Node ── y
//! ```
//!
//! The factors are laid out so one MatMul gives ΔW in the layout the node reads W: [in, out]
//! for MatMul, Gemm (transB = 0) and embeddings (A [in, r], B [r, out]); [out, in] for Gemm
//! with transB = 1 and for Conv (B [out, r], A [r, in·k], reshaped to W's shape). Gemm's alpha
//! scales x·W, so the weight takes s / alpha. DoRA multiplies the merged weight per output
//! channel by m / ||W + s·B·A||, which leaves the layer's bias unscaled, as PEFT does.
//! `lora_bias` (never with DoRA in PEFT) adds s·b to the layer's constant bias (Gemm C, Conv B,
//! the Add after a MatMul), also folded at load, or after the node when it has none.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::branch::{BRANCH_KEY, ROLE_KEY, initializer, node};
use super::inject::{BranchReport, BranchSpec, activation_dtype, anchor, dora_constants};
use super::weights::{all_names, unique_name};
use crate::adapter::peft::F32Tensor;
use crate::error::{Error, Result};
use crate::graph::ModelGraph;
use crate::onnx::pb::{NodeProto, TensorProto};
use crate::onnx::pb_ext::NodeExt;
use crate::onnx::{DataType, LoadedModel};

/// Roles of the nodes a weight-space branch adds (`onnx-lora.role`).
pub(crate) const DELTA: &str = "weight_delta";
pub(crate) const RESHAPE: &str = "weight_reshape";
pub(crate) const SCALE: &str = "weight_scale";
pub(crate) const ADD: &str = "weight_add";
pub(crate) const DORA: &str = "weight_dora";
pub(crate) const BIAS_SCALE: &str = "weight_bias_scale";
pub(crate) const BIAS_MERGE: &str = "weight_bias_merge";
pub(crate) const BIAS_ADD: &str = "weight_bias_add";
/// A Cast between the model's dtype and the merge's (float32 for 16-bit models).
pub(crate) const CAST: &str = "weight_cast";

/// One branch's edit, decided on the read-only graph and applied with the others in one pass.
struct Plan {
    graph: usize,
    node_index: usize,
    /// (node, input, value): the node reads the merged weight (or bias) there instead.
    rewires: Vec<(usize, usize, String)>,
    /// Nodes computing the merged weight (and bias), inserted right before the node.
    pre: Vec<NodeProto>,
    /// lora_bias: the node after which s·b is added, its output's new name and the Add.
    post: Option<(usize, String, NodeProto)>,
    initializers: Vec<TensorProto>,
}

/// Adds every branch in weight space. Refuses what has no weight form: serving inputs are
/// handled by the caller; quantized weights (the merge would dequantize them), grouped
/// convolutions, and nodes targeted twice are refused here.
pub fn inject_weight(
    model: &mut LoadedModel,
    branches: &[BranchSpec],
) -> Result<Vec<BranchReport>> {
    let graph = ModelGraph::build(&model.proto);
    let mut taken = all_names(&model.proto);
    let mut seen = HashSet::new();
    let mut plans = Vec::new();
    let mut reports = Vec::new();
    super::inject::check_shared_a(branches)?;
    // (a cross-attention's in-projection layers: one A initializer, by module and layout)
    let mut shared_a: HashMap<(String, bool), String> = HashMap::new();
    for br in branches {
        let c = &br.cand;
        if !seen.insert((c.graph, c.node_index)) {
            return Err(Error::Target(format!(
                "node '{}' is targeted twice",
                c.node
            )));
        }
        let base = graph
            .node(&model.proto, c.graph, c.node_index)
            .ok_or_else(|| Error::tensor(&c.weight, "node not found"))?;
        let refuse = |why: &str| {
            Error::Target(format!(
                "module '{}' ({} {}): {why}; inject it in the branch form (without --form weight)",
                br.name, c.op, c.node
            ))
        };
        if c.quantized || c.op == "MatMulNBits" {
            return Err(refuse(
                "its weight is quantized, and merging at load would dequantize it",
            ));
        }
        let dtype = crate::onnx::DataType::from_i32(
            super::weights::tensor(&model.proto, &graph, c)?.data_type(),
        );
        if !dtype.is_foldable_float() {
            return Err(Error::tensor(
                &c.weight,
                format!(
                    "module '{}': {dtype} weights cannot be adapted (float32, float16, bfloat16, float64 only)",
                    br.name
                ),
            ));
        }
        if c.groups() > 1 {
            return Err(refuse("grouped convolutions have no weight form here"));
        }
        if br.magnitude.is_some() && br.bias.is_some() {
            return Err(refuse("DoRA with lora_bias (PEFT refuses the combination)"));
        }
        let (plan, report) = plan(model, &graph, br, base, &mut taken, &mut shared_a)?;
        plans.push(plan);
        reports.push(report);
    }
    apply(model, &graph, &plans)?;
    Ok(reports)
}

/// Notes for the branches whose merged weight onnxruntime cannot compute once at load: a layer
/// that reads its rows of the weight through a Slice by bounds the graph computes at run time
/// (a cross-attention's in-projection in a TorchScript export with dynamic axes). Their merge
/// runs at every call (the outputs are the same).
pub fn merged_at_run_time(model: &LoadedModel, branches: &[BranchSpec]) -> Vec<String> {
    let graph = ModelGraph::build(&model.proto);
    let mut notes = Vec::new();
    for br in branches {
        let c = &br.cand;
        let Some(&first) = c.chain.first() else {
            continue;
        };
        let runtime = c.window.is_some()
            && graph.node(&model.proto, c.graph, first).is_some_and(|n| {
                n.op_type() == "Slice"
                    && n.input.iter().skip(1).any(|i| {
                        !i.is_empty() && graph.const_source(&model.proto, c.graph, i).is_none()
                    })
            });
        if runtime {
            notes.push(format!(
                "module '{}' ({} {}): the layer reads its rows of '{}' through a Slice whose bounds the model computes at run time, so onnxruntime cannot merge its weight form at load: it computes W + s·A·B at every run (same outputs; the branch form costs less there)",
                br.name, c.op, c.node, c.weight
            ));
        }
    }
    notes
}

/// The factors as the delta MatMul takes them: (first, its dims, second, its dims), plus the
/// shape to reshape the product to (Conv), and which of the two is PEFT's A.
struct WeightFactors {
    first: (Vec<i64>, Vec<f32>),
    second: (Vec<i64>, Vec<f32>),
    /// The first factor is lora_B (the product is [out, in...]).
    b_first: bool,
    reshape: Option<Vec<i64>>,
}

fn weight_factors(br: &BranchSpec, base: &NodeProto) -> WeightFactors {
    let c = &br.cand;
    let (r, n_in, n_out) = (br.a.rows as i64, br.a.cols as i64, br.b.rows as i64);
    let out_in = c.op == "Conv" || (c.op == "Gemm" && base.attr_i("transB").unwrap_or(0) != 0);
    if out_in {
        WeightFactors {
            first: (vec![n_out, r], br.b.data.clone()),
            second: (vec![r, n_in], br.a.data.clone()),
            b_first: true,
            reshape: (c.op == "Conv").then(|| c.shape.clone()),
        }
    } else {
        WeightFactors {
            first: (vec![n_in, r], br.a.transposed().data),
            second: (vec![r, n_out], br.b.transposed().data),
            b_first: false,
            reshape: None,
        }
    }
}

fn plan(
    model: &LoadedModel,
    graph: &ModelGraph,
    br: &BranchSpec,
    base: &NodeProto,
    taken: &mut HashSet<String>,
    shared_a: &mut HashMap<(String, bool), String>,
) -> Result<(Plan, BranchReport)> {
    let c = &br.cand;
    let dtype = activation_dtype(model, graph, c);
    // onnxruntime's CPU kernels, which its constant folding runs, have no 16-bit MatMul / Add:
    // 16-bit models merge in float32 (rounding once, as fold does) and cast the result back.
    let compute = match dtype {
        DataType::Float | DataType::Double => dtype,
        _ => DataType::Float,
    };
    let w = base
        .input
        .get(c.weight_input)
        .cloned()
        .ok_or_else(|| Error::tensor(&c.weight, "node has no weight input"))?;
    let f = weight_factors(br, base);
    let name =
        |s: &str, taken: &mut HashSet<String>| unique_name(&format!("{}.{s}", br.name), taken);
    let key = (br.name.clone(), f.b_first);
    let a_written = br.in_proj_rows.and_then(|_| shared_a.get(&key)).cloned();
    let a_name = a_written
        .clone()
        .unwrap_or_else(|| name("lora_A.weight", taken));
    if br.in_proj_rows.is_some() {
        shared_a.insert(key, a_name.clone());
    }
    let b_name = name("lora_B.weight", taken);
    let s_name = name("lora_scale", taken);
    let (first, second) = if f.b_first {
        (&b_name, &a_name)
    } else {
        (&a_name, &b_name)
    };
    super::fold::check_gemm_alpha(model, graph, c)?;
    let alpha = super::fold::gemm_alpha(model, graph, c);
    let mut initializers = vec![
        initializer(first, &f.first.0, &f.first.1, compute)?,
        initializer(second, &f.second.0, &f.second.1, compute)?,
        initializer(&s_name, &[], &[br.scale / alpha], compute)?,
    ];
    if a_written.is_some() {
        initializers.retain(|t| t.name() != a_name);
    }
    let stem = if base.name().is_empty() {
        w.clone()
    } else {
        base.name().to_string()
    };
    let v = |s: &str, taken: &mut HashSet<String>| unique_name(&format!("{w}.lora_{s}"), taken);
    let n = |op: &str, inputs: Vec<String>, out: &str, role: &str, taken: &mut HashSet<String>| {
        node(
            op,
            inputs,
            out.to_string(),
            unique_name(&format!("{stem}.lora_{role}"), taken),
            &br.name,
            role,
        )
    };
    let mut pre = Vec::new();
    // `value` in dtype `to`, through a Cast when it is not.
    let cast =
        |pre: &mut Vec<NodeProto>, value: String, to: DataType, taken: &mut HashSet<String>| {
            if to == compute && dtype == compute {
                return value;
            }
            let out = v(&format!("{}_cast", to.name()), taken);
            let mut cn = n("Cast", vec![value], &out, CAST, taken);
            cn.attribute = vec![super::branch::int("to", to.to_i32() as i64)];
            pre.push(cn);
            out
        };
    // The scale goes on the small first factor, so no weight-sized product is scaled.
    let first_scaled = v("scaled", taken);
    pre.push(n(
        "Mul",
        vec![first.clone(), s_name.clone()],
        &first_scaled,
        SCALE,
        taken,
    ));
    let mut delta = v("delta", taken);
    pre.push(n(
        "MatMul",
        vec![first_scaled, second.clone()],
        &delta,
        DELTA,
        taken,
    ));
    if let Some(shape) = &f.reshape {
        let shape_name = name("lora_shape", taken);
        initializers.push(TensorProto {
            name: Some(shape_name.clone()),
            dims: vec![shape.len() as i64],
            data_type: Some(DataType::Int64.to_i32()),
            int64_data: shape.clone(),
            ..Default::default()
        });
        let out = v("delta_reshaped", taken);
        pre.push(n("Reshape", vec![delta, shape_name], &out, RESHAPE, taken));
        delta = out;
    }
    let w_compute = cast(&mut pre, w.clone(), compute, taken);
    let mut merged = v("merged", taken);
    pre.push(n("Add", vec![w_compute, delta], &merged, ADD, taken));
    if let Some((factor, _)) = dora_constants(model, graph, br)? {
        // Per output channel of the weight as the node reads it.
        let mut dims = vec![c.out_features];
        if f.b_first {
            dims.extend(std::iter::repeat_n(1, c.shape.len().saturating_sub(1)));
        }
        let f_name = name("dora_scale", taken);
        initializers.push(initializer(&f_name, &dims, &factor, compute)?);
        let out = v("merged_dora", taken);
        pre.push(n("Mul", vec![merged, f_name], &out, DORA, taken));
        merged = out;
    }
    let merged = cast(&mut pre, merged, dtype, taken);
    let mut rewires = vec![(c.node_index, c.weight_input, merged)];
    let post = match &br.bias {
        Some(bias) => {
            let lb_name = name("lora_B.bias", taken);
            let bs_name = name("lora_bias_scale", taken);
            // Gemm adds beta·C: C takes s·b / beta.
            let beta = match c.op.as_str() {
                "Gemm" => base.attr_f("beta").filter(|b| *b != 0.0).unwrap_or(1.0),
                _ => 1.0,
            };
            let site = bias_site(model, graph, c, base);
            // Added after a Conv (which had no bias), b broadcasts per channel: [out, 1, ...].
            let mut dims = vec![c.out_features];
            if site.is_none() && c.op == "Conv" {
                dims.resize(c.shape.len().saturating_sub(1).max(1), 1);
            }
            initializers.push(initializer(&lb_name, &dims, bias, compute)?);
            initializers.push(initializer(&bs_name, &[], &[br.scale / beta], compute)?);
            let term = v("bias_scaled", taken);
            pre.push(n("Mul", vec![lb_name, bs_name], &term, BIAS_SCALE, taken));
            match site {
                Some((at, input, value)) => {
                    let value = cast(&mut pre, value, compute, taken);
                    let merged_bias = v("bias_merged", taken);
                    pre.push(n("Add", vec![value, term], &merged_bias, BIAS_MERGE, taken));
                    let merged_bias = cast(&mut pre, merged_bias, dtype, taken);
                    rewires.push((at, input, merged_bias));
                    None
                }
                None if !matches!(c.op.as_str(), "MatMul" | "Gemm" | "Conv") => {
                    return Err(Error::Target(format!(
                        "module '{}' ({} {}): lora_bias needs the node's constant bias input, and it has none",
                        br.name, c.op, c.node
                    )));
                }
                None => {
                    let y = base
                        .output
                        .first()
                        .cloned()
                        .ok_or_else(|| Error::tensor(&c.weight, "node has no output"))?;
                    let y_base = unique_name(&format!("{y}.base"), taken);
                    let term = cast(&mut pre, term, dtype, taken);
                    let add = n("Add", vec![y_base.clone(), term], &y, BIAS_ADD, taken);
                    Some((c.node_index, y_base, add))
                }
            }
        }
        None => None,
    };
    let report = BranchReport {
        module: br.name.clone(),
        node: c.node.clone(),
        op: c.op.clone(),
        rank: br.a.rows,
        scale: br.scale,
        lora_a: a_name,
        lora_b: b_name,
        dtype,
        slices: br.slices.clone(),
    };
    super::branch::mark_slices(&mut pre, &br.slices);
    super::branch::mark_parameter(&mut pre, br.via_parameter);
    super::branch::mark_in_proj_rows(&mut pre, br.in_proj_rows);
    let mut post = post;
    if let Some((_, _, n)) = &mut post {
        super::branch::mark_slices(std::slice::from_mut(n), &br.slices);
        super::branch::mark_parameter(std::slice::from_mut(n), br.via_parameter);
        super::branch::mark_in_proj_rows(std::slice::from_mut(n), br.in_proj_rows);
    }
    let plan = Plan {
        graph: c.graph,
        node_index: c.node_index,
        rewires,
        pre,
        post,
        initializers,
    };
    Ok((plan, report))
}

/// Where the layer's constant bias enters: (node, input, value) of Gemm's C, Conv's B, or the
/// constant of the Add right after a MatMul.
fn bias_site(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &crate::target::Candidate,
    base: &NodeProto,
) -> Option<(usize, usize, String)> {
    let constant =
        |v: &String| !v.is_empty() && graph.const_source(&model.proto, c.graph, v).is_some();
    match c.op.as_str() {
        "Gemm" | "Conv" => base
            .input
            .get(2)
            .filter(|v| constant(v))
            .map(|v| (c.node_index, 2, v.clone())),
        // (onnxruntime's Attention: packed q/k/v bias)
        "Attention" => base
            .input
            .get(2)
            .filter(|v| constant(v))
            .map(|v| (c.node_index, 2, v.clone())),
        "MatMul" => {
            let at = anchor(model, graph, c);
            let y = base.output.first()?;
            let add = graph
                .node(&model.proto, c.graph, at)
                .filter(|_| at != c.node_index)?;
            let (i, v) = add.input.iter().enumerate().find(|(_, v)| *v != y)?;
            constant(v).then(|| (at, i, v.clone()))
        }
        _ => None,
    }
}

/// Applies the plans: each graph's node list is rebuilt once, the merged-weight nodes right
/// before their node and lora_bias Adds right after theirs, so indices never shift mid-way.
fn apply(model: &mut LoadedModel, graph: &ModelGraph, plans: &[Plan]) -> Result<()> {
    for (gi, view) in graph.graphs.iter().enumerate() {
        let mine: Vec<&Plan> = plans.iter().filter(|p| p.graph == gi).collect();
        if mine.is_empty() {
            continue;
        }
        let gp = view
            .loc
            .get_mut(&mut model.proto)
            .ok_or_else(|| Error::Target("graph not found".into()))?;
        let old = std::mem::take(&mut gp.node);
        let mut nodes = Vec::with_capacity(old.len() + mine.len() * 4);
        for (i, mut n) in old.into_iter().enumerate() {
            for p in mine.iter().filter(|p| p.node_index == i) {
                nodes.extend(p.pre.iter().cloned());
            }
            for (_, input, value) in mine
                .iter()
                .flat_map(|p| &p.rewires)
                .filter(|(at, _, _)| *at == i)
            {
                if let Some(slot) = n.input.get_mut(*input) {
                    *slot = value.clone();
                }
            }
            let posts: Vec<&(usize, String, NodeProto)> = mine
                .iter()
                .filter_map(|p| p.post.as_ref())
                .filter(|(at, _, _)| *at == i)
                .collect();
            for (_, y_base, _) in &posts {
                if let Some(o) = n.output.first_mut() {
                    *o = y_base.clone();
                }
            }
            nodes.push(n);
            nodes.extend(posts.into_iter().map(|(_, _, add)| add.clone()));
        }
        gp.node = nodes;
        for p in mine {
            gp.initializer.extend(p.initializers.iter().cloned());
        }
    }
    Ok(())
}

/// A weight-space branch taken out of a model: its parameters as the graph held them.
pub(crate) struct Taken {
    pub name: String,
    pub graph: usize,
    /// The base node's first output (after the branch is taken out), to find it again.
    pub base_output: String,
    /// The delta MatMul's two factors, in order, and whether the first is lora_B.
    pub first: F32Tensor,
    pub second: F32Tensor,
    pub b_first: bool,
    /// The scale the weight took (s / Gemm alpha).
    pub weight_scale: f32,
    pub dora_factor: Option<Vec<f32>>,
    pub lora_bias: Option<Vec<f32>>,
    /// On a packed q/k/v weight, the modules the branch carries.
    pub slices: Vec<super::branch::Slice>,
    /// The branch was marked as one on a `target_parameters` module.
    pub via_parameter: bool,
    /// The rows of a cross-attention's in-projection the branch carries.
    pub in_proj_rows: Option<[usize; 2]>,
}

/// Per graph: its index, (merged value, W) pairs the nodes read again, (y_base, y) output
/// renames, the parameters to remove, and the branches' nodes (indices) to remove.
type GraphEdits = (
    usize,
    Vec<(String, String)>,
    Vec<(String, String)>,
    HashSet<String>,
    HashSet<usize>,
);

fn role(n: &NodeProto) -> Option<&str> {
    n.metadata(ROLE_KEY)
}

/// Takes every weight-space branch out of `model`: each node reads its weight W again, and
/// the branch's nodes and parameters are removed. Returns the branches' parameters. A branch
/// is read only when it is what `inject --form weight` writes (see
/// `unbranch::check_removable`); the factors must be matrices and the scale one number.
pub(crate) fn take(model: &mut LoadedModel) -> Result<Vec<Taken>> {
    let graph = ModelGraph::build(&model.proto);
    let mut taken = Vec::new();
    let mut edits: Vec<GraphEdits> = Vec::new();
    for (gi, view) in graph.graphs.iter().enumerate() {
        let Some(gp) = view.loc.get(&model.proto) else {
            continue;
        };
        let mut restore = Vec::new();
        let mut rename = Vec::new();
        let mut params = HashSet::new();
        let mut members = HashSet::new();
        // Values removed with the branches (value -> branch), checked unused elsewhere.
        let mut removed = BTreeMap::new();
        for (add_index, add) in gp
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| role(n) == Some(ADD))
        {
            let name = add.metadata(BRANCH_KEY).unwrap_or_default().to_string();
            let broken = |why: &str| Error::Target(format!("injected branch '{name}': {why}"));
            let producer = |v: &str| view.producer.get(v).map(|&i| (i, &gp.node[i]));
            let mut nodes = vec![add_index];
            let mut names = Vec::new();
            let mut param = |v: Option<&String>| -> Result<(String, F32Tensor)> {
                let v = v.ok_or_else(|| broken("missing parameter input"))?;
                names.push(v.clone());
                let t = super::unbranch::param_value(model, &graph, gi, v)
                    .map_err(|e| broken(&e.to_string()))?;
                Ok((v.clone(), t))
            };
            // Through this branch's Casts (16-bit models merge in float32).
            let back = |v: String, nodes: &mut Vec<usize>| match producer(&v) {
                Some((i, p)) if role(p) == Some(CAST) => {
                    nodes.push(i);
                    p.input.first().cloned().unwrap_or_default()
                }
                _ => v,
            };
            let fwd = |v: String, nodes: &mut Vec<usize>| match view.consumers_of(&v) {
                [u] if role(&gp.node[*u]) == Some(CAST) => {
                    nodes.push(*u);
                    gp.node[*u].output.first().cloned().unwrap_or_default()
                }
                _ => v,
            };
            let w = back(add.input.first().cloned().unwrap_or_default(), &mut nodes);
            let (mut delta_at, mut delta) = add
                .input
                .get(1)
                .and_then(|v| producer(v))
                .ok_or_else(|| broken("its delta MatMul is missing"))?;
            let mut shape = None;
            if role(delta) == Some(RESHAPE) {
                // The target shape (int64): removed with the parameters, not read.
                shape = delta.input.get(1).cloned();
                nodes.push(delta_at);
                (delta_at, delta) = delta
                    .input
                    .first()
                    .and_then(|v| producer(v))
                    .ok_or_else(|| broken("its delta MatMul is missing"))?;
            }
            if role(delta) != Some(DELTA) {
                return Err(broken("its delta MatMul is missing"));
            }
            nodes.push(delta_at);
            let (scale_at, scale_node) = delta
                .input
                .first()
                .and_then(|v| producer(v))
                .filter(|(_, n)| role(n) == Some(SCALE))
                .ok_or_else(|| broken("its scale node is missing"))?;
            nodes.push(scale_at);
            // Mul commutes: the first factor is the matrix, the scale the other input.
            let mut first = param(scale_node.input.first())?;
            let mut s = param(scale_node.input.get(1))?;
            if first.1.shape.len() != 2 && s.1.shape.len() == 2 {
                std::mem::swap(&mut first, &mut s);
            }
            let weight_scale = super::unbranch::one_number(&s.1.data).map_err(|got| {
                broken(&format!(
                    "its scale '{}' must be one finite number, not {got}",
                    s.0
                ))
            })?;
            let second = param(delta.input.get(1))?;
            for (n, t) in [&first, &second] {
                if t.shape.len() != 2 {
                    return Err(broken(&format!(
                        "its factor '{n}' has shape {:?}; weight-form factors are matrices",
                        t.shape
                    )));
                }
            }
            let mut merged = add.output.first().cloned().unwrap_or_default();
            let mut dora_factor = None;
            if let [u] = view.consumers_of(&merged)
                && role(&gp.node[*u]) == Some(DORA)
            {
                let dn = &gp.node[*u];
                nodes.push(*u);
                dora_factor = Some(param(dn.input.get(1))?.1.data);
                merged = dn.output.first().cloned().unwrap_or_default();
            }
            let merged = fwd(merged, &mut nodes);
            let [user] = view.consumers_of(&merged) else {
                return Err(broken("its merged weight must feed exactly one node"));
            };
            let base = &gp.node[*user];
            let b_first = base.op_type() == "Conv"
                || (base.op_type() == "Gemm" && base.attr_i("transB").unwrap_or(0) != 0);
            let mut base_output = base.output.first().cloned().unwrap_or_default();
            let mut lora_bias = None;
            let mut kept = vec![merged.clone()];
            // lora_bias: merged into the layer's bias, or added after the node.
            if let Some((bi, bn)) = gp.node.iter().enumerate().find(|(_, n)| {
                matches!(role(n), Some(BIAS_MERGE | BIAS_ADD))
                    && n.metadata(BRANCH_KEY) == Some(&name)
            }) {
                nodes.push(bi);
                let term_value = back(bn.input.get(1).cloned().unwrap_or_default(), &mut nodes);
                let (term_at, term) = producer(&term_value)
                    .filter(|(_, n)| role(n) == Some(BIAS_SCALE))
                    .ok_or_else(|| broken("its lora_bias scale node is missing"))?;
                nodes.push(term_at);
                lora_bias = Some(param(term.input.first())?.1.data);
                param(term.input.get(1))?;
                let input = bn.input.first().cloned().unwrap_or_default();
                let output = bn.output.first().cloned().unwrap_or_default();
                if role(bn) == Some(BIAS_MERGE) {
                    let merged_bias = fwd(output, &mut nodes);
                    kept.push(merged_bias.clone());
                    restore.push((merged_bias, back(input, &mut nodes)));
                } else {
                    if input == base_output {
                        base_output = output.clone();
                    }
                    // The node's own output, renamed back: read by the Add alone.
                    removed.insert(input.clone(), name.clone());
                    kept.push(output.clone());
                    rename.push((input, output));
                }
            }
            restore.push((merged, w));
            names.extend(shape);
            for &i in &nodes {
                for o in gp.node[i].output.iter().filter(|o| !kept.contains(o)) {
                    removed.insert(o.clone(), name.clone());
                }
            }
            for v in &names {
                removed.insert(v.clone(), name.clone());
            }
            params.extend(names);
            members.extend(nodes);
            let slices = super::branch::slices_of(add).map_err(|e| broken(&e))?;
            let via_parameter = super::branch::is_parameter(add);
            let in_proj_rows = super::branch::in_proj_rows_of(add).map_err(|e| broken(&e))?;
            taken.push(Taken {
                name,
                graph: gi,
                base_output,
                first: first.1,
                second: second.1,
                b_first,
                weight_scale,
                dora_factor,
                lora_bias,
                slices,
                via_parameter,
                in_proj_rows,
            });
        }
        super::unbranch::check_removable(model, &graph, gi, &members, &removed, |n| {
            role(n).is_some_and(|r| r.starts_with("weight_"))
        })?;
        if !restore.is_empty() {
            edits.push((gi, restore, rename, params, members));
        }
    }
    // Deepest graphs first: removing nodes of a graph moves the nodes its subgraphs hang on.
    for (gi, restore, rename, params, members) in edits.into_iter().rev() {
        let Some(gp) = graph.graphs[gi].loc.get_mut(&mut model.proto) else {
            continue;
        };
        let mut index = 0;
        gp.node.retain(|_| {
            index += 1;
            !members.contains(&(index - 1))
        });
        gp.initializer.retain(|t| !params.contains(t.name()));
        for n in gp.node.iter_mut() {
            for i in n.input.iter_mut() {
                if let Some((_, w)) = restore.iter().find(|(m, _)| m == i) {
                    *i = w.clone();
                }
            }
            for o in n.output.iter_mut() {
                if let Some((_, y)) = rename.iter().find(|(yb, _)| yb == o) {
                    *o = y.clone();
                }
            }
        }
    }
    Ok(taken)
}
