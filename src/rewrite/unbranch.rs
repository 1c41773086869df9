//! Folding injected branches back: finds the branches `inject` added (by their `onnx-lora.*`
//! node metadata; weight-space ones are taken out by `weight_form::take`), merges each one's
//! s·A·B into its base weight with the fold machinery, and removes the branch nodes,
//! parameters and serving inputs, giving the base's structure.
//!
//! ```text
//!   x ─┬─ Node(W) ── y.base ──┐                 x ── Node(W + s·ΔW) ── y
//!      └─ A ── B ── Mul(s) ───Add ── y    ==>
//! ```

use std::collections::{BTreeMap, HashSet};

use super::branch::{BRANCH_KEY, ROLE_KEY};
use super::fold::{FoldReport, Job, Step, execute};
use crate::adapter::{ModuleAdapter, ModuleKind, peft::F32Tensor};
use crate::error::{Error, Result};
use crate::graph::ModelGraph;
use crate::onnx::LoadedModel;
use crate::onnx::pb::NodeProto;
use crate::onnx::pb_ext::NodeExt;
use crate::target::{Candidate, find_candidates};
use crate::tensor::to_f32;

/// One injected branch found in the graph, its factors in PEFT's layout.
pub struct Found {
    pub cand: Candidate,
    pub module: ModuleAdapter,
    pub scale: f32,
    /// On a packed q/k/v weight, the adapter modules the branch carries.
    pub slices: Vec<super::branch::Slice>,
    /// The Add's output: the base node gets this name back.
    y: String,
    y_base: String,
    params: Vec<String>,
}

impl Found {
    /// The same branch site carrying `module` at `scale` (a packed branch's slice, for export).
    pub(crate) fn carrying(&self, module: ModuleAdapter, scale: f32) -> Found {
        Found {
            cand: self.cand.clone(),
            module,
            scale,
            slices: Vec::new(),
            y: self.y.clone(),
            y_base: self.y_base.clone(),
            params: self.params.clone(),
        }
    }
}

/// Folds every injected branch (either form) into its base weight and removes the branches.
pub fn fold_branches(model: &mut LoadedModel) -> Result<FoldReport> {
    let (graph, found) = find_all(model)?;
    if found.is_empty() {
        return Err(Error::Target(format!(
            "{}: no injected LoRA branches found (nothing to fold; give an ADAPTER to merge)",
            model.path.display()
        )));
    }
    let jobs: Vec<Job> = found
        .iter()
        .map(|f| Job {
            cand: f.cand.clone(),
            steps: vec![Step {
                role: None,
                rows: None,
                module: &f.module,
                scale: f.scale,
                fan_in_fan_out: false,
            }],
        })
        .collect();
    let mut report = FoldReport::default();
    execute(model, &graph, &jobs, &mut report)?;
    remove_branches(model, &graph, &found);
    // (with no branches left, export-peft has nothing to leave out)
    model.proto.metadata_props.retain(|p| {
        p.key() != crate::onnx::pb_ext::REPLACED_KEY && p.key() != crate::onnx::pb_ext::WHOLE_KEY
    });
    Ok(report)
}

/// Every injected branch of either form. Weight-space branches are taken out of `model`
/// first (each node reads its own weight again), so the returned graph view is of what
/// remains: the base with activation-space branches, which `remove_branches` takes out.
pub fn find_all(model: &mut LoadedModel) -> Result<(ModelGraph, Vec<Found>)> {
    let taken = super::weight_form::take(model)?;
    let graph = ModelGraph::build(&model.proto);
    let cands = find_candidates(&model.proto, &graph);
    let mut found = Vec::new();
    for t in taken {
        let cand = cands
            .iter()
            .find(|c| {
                c.graph == t.graph
                    && graph
                        .node(&model.proto, c.graph, c.node_index)
                        .and_then(|n| n.output.first())
                        == Some(&t.base_output)
            })
            .ok_or_else(|| {
                Error::Target(format!(
                    "injected branch '{}': its base node has no constant weight",
                    t.name
                ))
            })?;
        let (a, b) = if t.b_first {
            let mut a = t.second;
            if cand.op == "Conv" {
                a.shape = a
                    .shape
                    .iter()
                    .take(1)
                    .copied()
                    .chain(cand.shape.iter().skip(1).map(|&d| d.max(0) as usize))
                    .collect();
            }
            (a, t.first)
        } else {
            peft_layout(cand, t.first, t.second)
        };
        let scale = t.weight_scale * super::fold::gemm_alpha(model, &graph, cand);
        let bias_b = t.lora_bias.map(|data| F32Tensor {
            shape: vec![data.len()],
            data,
        });
        let mut module = branch_module(&t.name, a, b, None, bias_b);
        module.via_parameter = t.via_parameter;
        module.in_proj_rows = t.in_proj_rows;
        module.mha_in_proj = t.in_proj_rows.is_some();
        checked_factors(&module, cand)?;
        if let (Some(f), Some(a), Some(b)) = (&t.dora_factor, &module.a, &module.b) {
            module.magnitude = Some(dora_magnitude(model, &graph, cand, a, b, scale, f)?);
        }
        found.push(Found {
            cand: cand.clone(),
            module,
            scale,
            slices: t.slices,
            y: String::new(),
            y_base: String::new(),
            params: Vec::new(),
        });
    }
    found.extend(find_branches(model, &graph, &cands)?);
    // Each branch is one module: its name finds its nodes and keys what export-peft writes.
    // (a cross-attention's in-projection: one module, a branch per layer, by its rows)
    let mut names: BTreeMap<(&str, Option<[usize; 2]>), &str> = BTreeMap::new();
    for f in &found {
        if let Some(other) = names.insert((&f.module.path, f.module.in_proj_rows), &f.cand.node) {
            return Err(Error::Target(format!(
                "injected branches on nodes '{other}' and '{}' are both named '{}'; each branch needs its own module name",
                f.cand.node, f.module.path
            )));
        }
    }
    Ok((graph, found))
}

/// How many branches onnx-lora injected into the model: (in the branch form, in weight form).
pub fn count_injected(model: &LoadedModel, graph: &ModelGraph) -> (usize, usize) {
    let mut counts = (0, 0);
    for view in &graph.graphs {
        for n in view.loc.get(&model.proto).iter().flat_map(|g| &g.node) {
            match role(n) {
                Some("add") => counts.0 += 1,
                Some(r) if r == super::weight_form::ADD => counts.1 += 1,
                _ => {}
            }
        }
    }
    counts
}

/// A branch parameter's value as f32: an initializer, a Constant, or (serving models) the
/// default initializer of a graph input.
pub(crate) fn param_value(
    model: &LoadedModel,
    graph: &ModelGraph,
    gi: usize,
    v: &str,
) -> Result<F32Tensor> {
    let view = &graph.graphs[gi];
    let src = graph
        .const_source(&model.proto, gi, v)
        .or_else(|| {
            view.initializers
                .get(v)
                .map(|&index| crate::graph::ConstSource::Initializer { graph: gi, index })
        })
        .ok_or_else(|| Error::Target(format!("'{v}' is not a constant")))?;
    let t = graph
        .const_tensor(&model.proto, &src)
        .ok_or_else(|| Error::Target(format!("parameter '{v}' not found")))?;
    let dtype = crate::onnx::DataType::from_i32(t.data_type());
    let data = to_f32(&model.tensor_bytes(t)?, dtype, v)?;
    let shape = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    Ok(F32Tensor { shape, data })
}

fn role(n: &NodeProto) -> Option<&str> {
    n.metadata(ROLE_KEY)
}

/// The ops a branch node of each role is (the default ONNX domain). A node tagged with a role
/// computes what fold-back and export read from it only if it is that op.
fn role_ops(role: &str) -> Option<&'static [&'static str]> {
    use super::weight_form as wf;
    Some(match role {
        "lora_A" => &["MatMul", "Conv", "Gather"],
        "lora_B" => &["MatMul", "Conv"],
        "transpose" => &["Transpose"],
        "lora_bias" | "add" | "dora_bias" => &["Add"],
        "scale" | "dora_scale" => &["Mul"],
        super::fuse::SPLIT_ROLE => &["Split"],
        super::fuse::FUSED_ROLE => &["MatMul"],
        super::fuse::CONCAT_ROLE => &["Concat"],
        wf::DELTA => &["MatMul"],
        wf::RESHAPE => &["Reshape"],
        wf::SCALE | wf::DORA | wf::BIAS_SCALE => &["Mul"],
        wf::ADD | wf::BIAS_MERGE | wf::BIAS_ADD => &["Add"],
        wf::CAST => &["Cast"],
        _ => return None,
    })
}

/// Refuses taking branches out of graph `gi` when the model is not just its base plus those
/// branches: a node carrying branch metadata (`tagged`) that is not the op its role says, or
/// that is none of the branches' nodes (`members`), and a value removed with the branches
/// (`removed`: value -> branch) that a node outside them reads or that is a graph output.
pub(crate) fn check_removable(
    model: &LoadedModel,
    graph: &ModelGraph,
    gi: usize,
    members: &HashSet<usize>,
    removed: &BTreeMap<String, String>,
    tagged: impl Fn(&NodeProto) -> bool,
) -> Result<()> {
    let view = &graph.graphs[gi];
    let Some(gp) = view.loc.get(&model.proto) else {
        return Ok(());
    };
    for (i, n) in gp.node.iter().enumerate().filter(|(_, n)| tagged(n)) {
        let branch = n.metadata(BRANCH_KEY).unwrap_or_default();
        let r = role(n).unwrap_or_default();
        let ops = role_ops(r).ok_or_else(|| {
            Error::Target(format!(
                "node '{}' of injected branch '{branch}' has an unknown role '{r}'",
                n.label()
            ))
        })?;
        if !ops.contains(&n.op_type()) || !matches!(n.domain(), "" | "ai.onnx") {
            let op = match n.domain() {
                "" | "ai.onnx" => article(n.op_type()),
                d => format!("{d}'s {}", n.op_type()),
            };
            return Err(Error::Target(format!(
                "node '{}' of injected branch '{branch}' (role '{r}') is {op}, not {}",
                n.label(),
                ops.join(" / ")
            )));
        }
        if !members.contains(&i) {
            return Err(Error::Target(format!(
                "node '{}' ({}) carries the metadata of injected branch '{branch}' (role '{r}') but is not part of a branch (it does not lead to the branch's Add)",
                n.label(),
                n.op_type()
            )));
        }
    }
    for (v, branch) in removed {
        if view.is_graph_output(v) {
            return Err(Error::Target(format!(
                "injected branch '{branch}': its value '{v}' is also a graph output, so the branch cannot be taken out"
            )));
        }
        if let Some(&u) = view.consumers_of(v).iter().find(|u| !members.contains(u)) {
            let n = &gp.node[u];
            return Err(Error::Target(format!(
                "injected branch '{branch}': its value '{v}' is also read by node '{}' ({}), outside the branch, so the branch cannot be taken out",
                n.label(),
                n.op_type()
            )));
        }
    }
    Ok(())
}

/// Every branch `inject` added, in graph order. Each is read only when it is what `inject`
/// writes: its nodes the ops their roles say, wired to its layer's input, factors with the
/// layer's dimensions, and nothing outside the branch reading what goes with it.
pub fn find_branches(
    model: &LoadedModel,
    graph: &ModelGraph,
    cands: &[Candidate],
) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    for (gi, view) in graph.graphs.iter().enumerate() {
        let Some(gp) = view.loc.get(&model.proto) else {
            continue;
        };
        // The nodes of this graph's branches, and the values removed with them.
        let mut members = HashSet::new();
        let mut removed = BTreeMap::new();
        for (add_index, add) in gp
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| role(n) == Some("add"))
        {
            let name = add.metadata(BRANCH_KEY).unwrap_or_default().to_string();
            let broken = |why: &str| Error::Target(format!("injected branch '{name}': {why}"));
            let producer = |v: &str| view.producer.get(v).map(|&i| (i, &gp.node[i]));
            let param = |v: Option<&String>| -> Result<(String, F32Tensor)> {
                let v = v.ok_or_else(|| broken("missing parameter input"))?;
                let t = param_value(model, graph, gi, v).map_err(|e| broken(&e.to_string()))?;
                Ok((v.clone(), t))
            };
            let mut nodes = vec![add_index];
            let y_base = add.input.first().cloned().unwrap_or_default();
            let (anchor, anchor_node) =
                producer(&y_base).ok_or_else(|| broken("base node not found"))?;
            // (a layer with quantized input and output: the node giving its float output)
            let is_cand = |i: usize| {
                cands.iter().find(|c| {
                    c.graph == gi
                        && (c.node_index == i
                            || c.float_site.as_ref().is_some_and(|s| s.anchor == i))
                })
            };
            // The branch sits on the base node, or on the bias Add after a MatMul.
            let cand = is_cand(anchor)
                .or_else(|| {
                    (anchor_node.op_type() == "Add")
                        .then(|| {
                            anchor_node
                                .input
                                .iter()
                                .find_map(|i| producer(i).and_then(|(p, _)| is_cand(p)))
                        })
                        .flatten()
                })
                .ok_or_else(|| broken("its base node has no constant weight"))?;
            let base = gp
                .node
                .get(cand.node_index)
                .ok_or_else(|| broken("base node not found"))?;
            let mut last = add.input.get(1).cloned().unwrap_or_default();
            let mut params = Vec::new();
            let mut scale = 1.0;
            let (mut at, mut node) =
                producer(&last).ok_or_else(|| broken("branch output not found"))?;
            if role(node) == Some("scale") {
                let (n, s) = param(node.input.get(1))?;
                scale = one_number(&s.data).map_err(|got| {
                    broken(&format!(
                        "its scale '{n}' must be one finite number, not {got}"
                    ))
                })?;
                params.push(n);
                nodes.push(at);
                last = node.input.first().cloned().unwrap_or_default();
                (at, node) = producer(&last).ok_or_else(|| broken("lora_B not found"))?;
            }
            let mut bias_b = None;
            if role(node) == Some("lora_bias") {
                let (n, b) = param(node.input.get(1))?;
                bias_b = Some(F32Tensor {
                    shape: vec![b.data.len()],
                    data: b.data,
                });
                params.push(n);
                nodes.push(at);
                last = node.input.first().cloned().unwrap_or_default();
                (at, node) = producer(&last).ok_or_else(|| broken("lora_B not found"))?;
            }
            if role(node) != Some("lora_B") {
                return Err(broken("lora_B not found"));
            }
            nodes.push(at);
            // What inject writes for each kind of layer: (lora_A op, lora_B op).
            let (a_op, b_op) = match cand.op.as_str() {
                "Conv" => ("Conv", "Conv"),
                "Gather" => ("Gather", "MatMul"),
                _ => ("MatMul", "MatMul"),
            };
            let wrong_op = |n: &NodeProto, r: &str, op: &str| {
                broken(&format!(
                    "its {r} node '{}' is {}, not the {op} {} layer's branch has",
                    n.label(),
                    article(n.op_type()),
                    article(&cand.op)
                ))
            };
            if node.op_type() != b_op {
                return Err(wrong_op(node, "lora_B", b_op));
            }
            if b_op == "Conv" && !is_pointwise(node, cand.groups()) {
                return Err(broken(&format!(
                    "its lora_B node '{}' is not the 1x1 convolution (group {}) inject writes",
                    node.label(),
                    cand.groups()
                )));
            }
            let (b_name, b) = param(node.input.get(1))?;
            let a_value = node.input.first().cloned().unwrap_or_default();
            let (a_at, a_node) = producer(&a_value).ok_or_else(|| broken("lora_A not found"))?;
            nodes.push(a_at);
            // The activation lora_A reads: the layer's input (Gemm with transA: transposed).
            let (x, a_input) = match role(a_node) {
                Some("lora_A") if a_node.op_type() != a_op => {
                    return Err(wrong_op(a_node, "lora_A", a_op));
                }
                Some("lora_A") if a_op == "Gather" => (a_node.input.get(1), a_node.input.first()),
                Some("lora_A") => (a_node.input.first(), a_node.input.get(1)),
                // Fused (--fuse-shared): this branch's slot of Split <- MatMul <- Concat(A...).
                Some(super::fuse::SPLIT_ROLE) if a_op == "MatMul" => {
                    let slot = a_node
                        .output
                        .iter()
                        .position(|o| *o == a_value)
                        .unwrap_or(0);
                    let matmul = a_node
                        .input
                        .first()
                        .and_then(|v| producer(v))
                        .filter(|(_, n)| role(n) == Some(super::fuse::FUSED_ROLE));
                    let concat = matmul
                        .and_then(|(_, m)| m.input.get(1))
                        .and_then(|v| producer(v))
                        .filter(|(_, n)| role(n) == Some(super::fuse::CONCAT_ROLE));
                    let (Some((mi, matmul)), Some((ci, concat))) = (matmul, concat) else {
                        return Err(broken("lora_A not found"));
                    };
                    nodes.extend([mi, ci]);
                    (matmul.input.first(), concat.input.get(slot))
                }
                _ => return Err(broken("lora_A not found")),
            };
            let mut x = x.cloned().unwrap_or_default();
            let transposed = cand.op == "Gemm" && base.attr_i("transA").unwrap_or(0) != 0;
            if let Some((ti, t)) = producer(&x).filter(|(_, n)| role(n) == Some("transpose")) {
                if !transposed || t.attr_ints("perm") != Some(&[1i64, 0][..]) {
                    return Err(broken(&format!(
                        "its Transpose '{}' is not the one inject writes for a Gemm with transA",
                        t.label()
                    )));
                }
                nodes.push(ti);
                x = t.input.first().cloned().unwrap_or_default();
            } else if transposed {
                return Err(broken(
                    "its Gemm has transA but the branch reads x untransposed",
                ));
            }
            let layer_x = match &cand.float_site {
                Some(site) => Some(&site.x),
                None => base.input.get(if a_op == "Gather" { 1 } else { 0 }),
            };
            if Some(&x) != layer_x {
                return Err(broken(&format!(
                    "its lora_A reads '{x}', not the input '{}' of its layer '{}'",
                    layer_x.map_or("", String::as_str),
                    base.label()
                )));
            }
            if a_op == "Conv" && !same_conv_attributes(a_node, base) {
                return Err(broken(&format!(
                    "its lora_A node '{}' does not convolve as its layer '{}' does (kernel, strides, pads, dilations)",
                    a_node.label(),
                    base.label()
                )));
            }
            let (a_name, a) = param(a_input)?;
            // Graph layout: [in, r] / [r, out] (Gather's A: [rows, r]); conv: A [r, in, k...],
            // B [out, r / groups, 1...].
            let dims = if a_op == "Conv" { cand.shape.len() } else { 2 };
            for (n, t) in [(&a_name, &a), (&b_name, &b)] {
                if t.shape.len() != dims {
                    return Err(broken(&format!(
                        "its factor '{n}' has shape {:?}; a {} layer's branch factors have {dims} dimensions",
                        t.shape, cand.op
                    )));
                }
            }
            params.extend([a_name, b_name]);
            let (a, b) = peft_layout(cand, a, b);
            let mut module = branch_module(&name, a, b, None, bias_b);
            checked_factors(&module, cand)?;
            // DoRA: the factor and bias correction after the sum; the branch's output is the
            // last of them.
            let mut y = add.output.first().cloned().unwrap_or_default();
            let mut factor = None;
            for expect in ["dora_scale", "dora_bias"] {
                let next = view.consumers_of(&y).first().map(|&i| (i, &gp.node[i]));
                if let Some((i, n)) = next.filter(|(_, n)| {
                    role(n) == Some(expect) && n.metadata(BRANCH_KEY) == Some(name.as_str())
                }) {
                    let (pn, p) = param(n.input.get(1))?;
                    if expect == "dora_scale" {
                        factor = Some(p.data);
                    }
                    params.push(pn);
                    nodes.push(i);
                    y = n.output.first().cloned().unwrap_or_default();
                }
            }
            if let (Some(f), Some(a), Some(b)) = (factor, &module.a, &module.b) {
                module.magnitude = Some(dora_magnitude(model, graph, cand, a, b, scale, &f)?);
            }
            // Taken out: the branch's nodes and parameters, and the base's own output (the
            // base node gets `y` back).
            for &i in &nodes {
                for o in gp.node[i].output.iter().filter(|o| **o != y) {
                    removed.insert(o.clone(), name.clone());
                }
            }
            for v in params.iter().chain([&y_base]) {
                removed.insert(v.clone(), name.clone());
            }
            module.via_parameter = super::branch::is_parameter(add);
            module.in_proj_rows = super::branch::in_proj_rows_of(add).map_err(|e| broken(&e))?;
            module.mha_in_proj = module.in_proj_rows.is_some();
            members.extend(nodes);
            out.push(Found {
                cand: cand.clone(),
                module,
                scale,
                slices: super::branch::slices_of(add).map_err(|e| broken(&e))?,
                y,
                y_base,
                params,
            });
        }
        check_removable(model, graph, gi, &members, &removed, |n| {
            n.metadata(BRANCH_KEY).is_some() || role(n).is_some()
        })?;
    }
    Ok(out)
}

/// "a MatMul", "an Add".
fn article(op: &str) -> String {
    let vowel = op.starts_with(['A', 'E', 'I', 'O', 'U']);
    format!("{} {op}", if vowel { "an" } else { "a" })
}

/// `values` as one finite number, or how they are not (for the message).
pub(crate) fn one_number(values: &[f32]) -> std::result::Result<f32, String> {
    match values {
        [v] if v.is_finite() => Ok(*v),
        other => Err(format!(
            "{:?}{}",
            &other[..other.len().min(4)],
            if other.len() > 4 { " ..." } else { "" }
        )),
    }
}

/// A conv lora_B as inject writes it: 1x1, with the layer's groups, default strides / pads.
fn is_pointwise(n: &NodeProto, groups: usize) -> bool {
    n.attribute.iter().all(|a| match a.name() {
        "kernel_shape" | "strides" | "dilations" => a.ints.iter().all(|&v| v == 1),
        "pads" => a.ints.iter().all(|&v| v == 0),
        "group" => a.i.unwrap_or(1) == groups as i64,
        "auto_pad" => matches!(a.s.as_deref(), None | Some(b"NOTSET")),
        _ => false,
    }) && (groups == 1 || n.attr_i("group") == Some(groups as i64))
}

/// A conv lora_A convolves as its layer: the attributes inject copies, equal; no others.
fn same_conv_attributes(a: &NodeProto, base: &NodeProto) -> bool {
    const COPIED: [&str; 5] = ["strides", "pads", "dilations", "auto_pad", "kernel_shape"];
    fn pick(n: &NodeProto) -> Vec<&crate::onnx::pb::AttributeProto> {
        let mut v: Vec<_> = n
            .attribute
            .iter()
            .filter(|at| COPIED.contains(&at.name()))
            .collect();
        v.sort_by_key(|at| at.name());
        v
    }
    a.attribute.iter().all(|at| COPIED.contains(&at.name())) && pick(a) == pick(base)
}

/// A found branch's factors checked against its layer, as an adapter's are.
fn checked_factors(m: &ModuleAdapter, c: &Candidate) -> Result<()> {
    super::factors(
        m,
        c,
        super::inject::factor_in(c),
        c.out_features.max(0) as usize,
    )
    .map(|_| ())
}

/// A found branch as the adapter module fold merges: PEFT-layout factors named by the branch.
fn branch_module(
    name: &str,
    a: F32Tensor,
    b: F32Tensor,
    magnitude: Option<F32Tensor>,
    bias_b: Option<F32Tensor>,
) -> ModuleAdapter {
    ModuleAdapter {
        a: Some(a),
        b: Some(b),
        magnitude,
        bias_b,
        keys: vec![name.to_string()],
        ..ModuleAdapter::empty(name, ModuleKind::Lora, None)
    }
}

/// PEFT's magnitude vector from a branch's DoRA factor: m = factor · ||W + s·B·A||.
fn dora_magnitude(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
    a: &F32Tensor,
    b: &F32Tensor,
    scale: f32,
    factor: &[f32],
) -> Result<F32Tensor> {
    let r = a.shape[0];
    let am = crate::tensor::Matrix::new(r, a.data.len() / r.max(1), a.data.clone())?;
    let bm = crate::tensor::Matrix::new(b.shape[0], r, b.data.clone())?;
    let norms = super::weights::effective_norms(model, graph, c, &am, &bm, scale)?;
    if factor.len() != norms.len() {
        return Err(Error::Target(format!(
            "branch '{}': its DoRA factor has {} values but the layer ({}) has {} output channels",
            c.module,
            factor.len(),
            c.node,
            norms.len()
        )));
    }
    let data: Vec<f32> = factor.iter().zip(&norms).map(|(f, n)| f * n).collect();
    Ok(F32Tensor {
        shape: vec![data.len()],
        data,
    })
}

/// Graph-layout factors back to PEFT's A (r, in...) and B (out, r).
fn peft_layout(c: &Candidate, a: F32Tensor, b: F32Tensor) -> (F32Tensor, F32Tensor) {
    if c.op == "Conv" {
        let b_shape = vec![b.shape[0], b.shape.get(1).copied().unwrap_or(0)];
        return (
            a,
            F32Tensor {
                shape: b_shape,
                data: b.data,
            },
        );
    }
    let t = |x: F32Tensor| {
        let (rows, cols) = (x.shape[0], x.shape.get(1).copied().unwrap_or(0));
        let mut data = vec![0f32; x.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = x.data[r * cols + c];
            }
        }
        F32Tensor {
            shape: vec![cols, rows],
            data,
        }
    };
    (t(a), t(b))
}

/// Removes branch nodes and parameters and gives base nodes their outputs back. Constants
/// only the removed nodes read (a fused group's split sizes) go too.
pub(super) fn remove_branches(model: &mut LoadedModel, graph: &ModelGraph, found: &[Found]) {
    let mut params: HashSet<String> = found
        .iter()
        .flat_map(|f| f.params.iter().cloned())
        .collect();
    let mut branch_inputs = HashSet::new();
    let mut other_inputs = HashSet::new();
    for view in &graph.graphs {
        for n in view.loc.get(&model.proto).iter().flat_map(|g| &g.node) {
            let set = if n.metadata(BRANCH_KEY).is_some() {
                &mut branch_inputs
            } else {
                &mut other_inputs
            };
            set.extend(n.input.iter().cloned());
        }
        for o in view.loc.get(&model.proto).iter().flat_map(|g| &g.output) {
            other_inputs.insert(o.name().to_string());
        }
    }
    params.extend(branch_inputs.difference(&other_inputs).cloned());
    // Subgraphs first (each comes after its parent): a subgraph is located through its
    // parents' node indices, which removing their branch nodes shifts.
    for view in graph.graphs.iter().rev() {
        let Some(gp) = view.loc.get_mut(&mut model.proto) else {
            continue;
        };
        gp.node.retain(|n| n.metadata(BRANCH_KEY).is_none());
        gp.initializer.retain(|t| !params.contains(t.name()));
        gp.input.retain(|v| !params.contains(v.name()));
        for f in found {
            for n in gp.node.iter_mut() {
                for o in n.output.iter_mut().filter(|o| **o == f.y_base) {
                    *o = f.y.clone();
                }
            }
        }
    }
}
