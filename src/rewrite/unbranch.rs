//! Folding injected branches back: finds the branches `inject` added (by their `onnx-lora.*`
//! node metadata; weight-space ones are taken out by `weight_form::take`), merges each one's
//! s·A·B into its base weight with the fold machinery, and removes the branch nodes,
//! parameters and serving inputs, giving the base's structure.
//!
//! ```text
//!   x ─┬─ Node(W) ── y.base ──┐                 x ── Node(W + s·ΔW) ── y
//!      └─ A ── B ── Mul(s) ───Add ── y    ==>
//! ```

use std::collections::HashSet;

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
    /// The Add's output: the base node gets this name back.
    y: String,
    y_base: String,
    params: Vec<String>,
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
                module: &f.module,
                scale: f.scale,
                fan_in_fan_out: false,
            }],
        })
        .collect();
    let mut report = FoldReport::default();
    execute(model, &graph, &jobs, &mut report)?;
    remove_branches(model, &graph, &found);
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
                a.shape = std::iter::once(a.shape[0])
                    .chain(cand.shape[1..].iter().map(|&d| d.max(0) as usize))
                    .collect();
            }
            (a, t.first)
        } else {
            peft_layout(cand, t.first, t.second)
        };
        let scale = t.weight_scale * super::fold::gemm_alpha(model, &graph, cand);
        let magnitude = t
            .dora_factor
            .map(|f| dora_magnitude(model, &graph, cand, &a, &b, scale, &f))
            .transpose()?;
        let bias_b = t.lora_bias.map(|data| F32Tensor {
            shape: vec![data.len()],
            data,
        });
        found.push(Found {
            cand: cand.clone(),
            module: branch_module(&t.name, a, b, magnitude, bias_b),
            scale,
            y: String::new(),
            y_base: String::new(),
            params: Vec::new(),
        });
    }
    found.extend(find_branches(model, &graph, &cands)?);
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

/// Every branch `inject` added, in graph order.
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
        for add in gp.node.iter().filter(|n| role(n) == Some("add")) {
            let name = add.metadata(BRANCH_KEY).unwrap_or_default().to_string();
            let broken = |why: &str| Error::Target(format!("injected branch '{name}': {why}"));
            let producer = |v: &str| view.producer.get(v).map(|&i| (i, &gp.node[i]));
            let param = |v: Option<&String>| -> Result<(String, F32Tensor)> {
                let v = v.ok_or_else(|| broken("missing parameter input"))?;
                let t = param_value(model, graph, gi, v).map_err(|e| broken(&e.to_string()))?;
                Ok((v.clone(), t))
            };
            let y_base = add.input.first().cloned().unwrap_or_default();
            let (anchor, anchor_node) =
                producer(&y_base).ok_or_else(|| broken("base node not found"))?;
            let is_cand = |i: usize| cands.iter().find(|c| c.graph == gi && c.node_index == i);
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
            let mut last = add.input.get(1).cloned().unwrap_or_default();
            let mut params = Vec::new();
            let mut scale = 1.0;
            let (_, mut node) = producer(&last).ok_or_else(|| broken("branch output not found"))?;
            if role(node) == Some("scale") {
                let (n, s) = param(node.input.get(1))?;
                scale = match s.data.as_slice() {
                    [v] if v.is_finite() => *v,
                    other => {
                        return Err(broken(&format!(
                            "its scale '{n}' must be one finite number, not {:?}{}",
                            &other[..other.len().min(4)],
                            if other.len() > 4 { " ..." } else { "" }
                        )));
                    }
                };
                params.push(n);
                last = node.input.first().cloned().unwrap_or_default();
                node = producer(&last).ok_or_else(|| broken("lora_B not found"))?.1;
            }
            let mut bias_b = None;
            if role(node) == Some("lora_bias") {
                let (n, b) = param(node.input.get(1))?;
                bias_b = Some(F32Tensor {
                    shape: vec![b.data.len()],
                    data: b.data,
                });
                params.push(n);
                last = node.input.first().cloned().unwrap_or_default();
                node = producer(&last).ok_or_else(|| broken("lora_B not found"))?.1;
            }
            if role(node) != Some("lora_B") {
                return Err(broken("lora_B not found"));
            }
            let (b_name, b) = param(node.input.get(1))?;
            let a_value = node.input.first().cloned().unwrap_or_default();
            let (_, a_node) = producer(&a_value).ok_or_else(|| broken("lora_A not found"))?;
            let a_input = match role(a_node) {
                Some("lora_A") if a_node.op_type() == "Gather" => a_node.input.first(),
                Some("lora_A") => a_node.input.get(1),
                // Fused (--fuse-shared): this branch's slot of Split <- MatMul <- Concat(A...).
                Some(super::fuse::SPLIT_ROLE) => {
                    let slot = a_node
                        .output
                        .iter()
                        .position(|o| *o == a_value)
                        .unwrap_or(0);
                    let matmul = a_node
                        .input
                        .first()
                        .and_then(|v| producer(v))
                        .map(|(_, n)| n);
                    let concat = matmul
                        .and_then(|m| m.input.get(1))
                        .and_then(|v| producer(v))
                        .map(|(_, n)| n);
                    concat.and_then(|c| c.input.get(slot))
                }
                _ => return Err(broken("lora_A not found")),
            };
            let (a_name, a) = param(a_input)?;
            params.extend([a_name, b_name]);
            let (a, b) = peft_layout(cand, a, b);
            // DoRA: the factor and bias correction after the sum; the branch's output is the
            // last of them.
            let mut y = add.output.first().cloned().unwrap_or_default();
            let mut factor = None;
            for expect in ["dora_scale", "dora_bias"] {
                let next = view.consumers_of(&y).first().map(|&i| &gp.node[i]);
                if let Some(n) = next.filter(|n| {
                    role(n) == Some(expect) && n.metadata(BRANCH_KEY) == Some(name.as_str())
                }) {
                    let (pn, p) = param(n.input.get(1))?;
                    if expect == "dora_scale" {
                        factor = Some(p.data);
                    }
                    params.push(pn);
                    y = n.output.first().cloned().unwrap_or_default();
                }
            }
            let magnitude = factor
                .map(|f| dora_magnitude(model, graph, cand, &a, &b, scale, &f))
                .transpose()?;
            out.push(Found {
                cand: cand.clone(),
                module: branch_module(&name, a, b, magnitude, bias_b),
                scale,
                y,
                y_base,
                params,
            });
        }
    }
    Ok(out)
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
    let mut w = super::weights::read(model, graph, c)?;
    let r = a.shape[0];
    let am = crate::tensor::Matrix::new(r, a.data.len() / r.max(1), a.data.clone())?;
    let bm = crate::tensor::Matrix::new(b.shape[0], r, b.data.clone())?;
    crate::tensor::add_low_rank(&mut w.values, w.orient, &am, &bm, scale);
    let norms = crate::tensor::out_norms(&w.values, w.orient, w.n_out);
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
fn remove_branches(model: &mut LoadedModel, graph: &ModelGraph, found: &[Found]) {
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
    for view in &graph.graphs {
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
