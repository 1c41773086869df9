//! The inject pass: splices a parallel low-rank branch `y = base(x) + s·B(A(x))` beside each
//! targeted node (see `branch` for the subgraph it adds). Branch weights come fresh (A random,
//! B zero, so the model starts exactly equal to the base) or from a PEFT adapter (the
//! unmerged deployment, whose replaced values, modules_to_save, trainable tokens and trained
//! biases, go into the weights first: `write_whole_values`). With `as_inputs`, each branch weight is also a graph
//! input whose initializer is an empty default, so onnxruntime can swap adapters at run time
//! (scale folded into B).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::branch::{BranchNames, branch_nodes, initializer};
use super::weights::{all_names, unique_name};
use crate::adapter::{Adapter, ModuleAdapter, ModuleKind};
use crate::error::{Error, Result};
use crate::graph::ModelGraph;
use crate::onnx::pb::{
    TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto::Dimension,
    tensor_shape_proto::dimension::Value as DimValue, type_proto,
};
use crate::onnx::pb_ext::NodeExt;
use crate::onnx::{DataType, LoadedModel};
use crate::target::{Candidate, resolve_module};
use crate::tensor::Matrix;

/// One branch to add: PEFT-layout factors A (r, in) and B (out, r) and the scaling.
#[derive(Clone, Debug)]
pub struct BranchSpec {
    pub cand: Candidate,
    /// Name the branch's parameters are called by (`<name>.lora_A.weight`).
    pub name: String,
    pub a: Matrix,
    pub b: Matrix,
    pub scale: f32,
    /// DoRA magnitude per output channel; NaN for a channel DoRA leaves alone (a packed q/k/v
    /// weight whose other projections are plain LoRA).
    pub magnitude: Option<Vec<f32>>,
    /// lora_B's bias (`lora_bias`), unscaled.
    pub bias: Option<Vec<f32>>,
    /// On a packed q/k/v weight: the adapter modules whose factors the branch carries.
    pub slices: Vec<super::branch::Slice>,
    /// The adapter targets the module's weight through `target_parameters`.
    pub via_parameter: bool,
    /// The rows of a cross-attention's packed in-projection the branch carries
    /// (`ModuleAdapter::in_proj_rows`): one of the module's branches, one per layer.
    pub in_proj_rows: Option<[usize; 2]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// A ~ kaiming-uniform(a = sqrt 5), i.e. U(-1/sqrt(in), 1/sqrt(in)), PEFT's default.
    Kaiming,
    /// A ~ N(0, (1/r)^2), PEFT's "gaussian".
    Gaussian,
}

#[derive(Clone, Debug, Serialize)]
pub struct BranchReport {
    pub module: String,
    pub node: String,
    pub op: String,
    pub rank: usize,
    pub scale: f32,
    pub lora_a: String,
    pub lora_b: String,
    #[serde(rename = "dtype", serialize_with = "dtype_name")]
    pub dtype: DataType,
    /// On a packed q/k/v weight: the adapter modules the branch carries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slices: Vec<super::branch::Slice>,
}

fn dtype_name<S: serde::Serializer>(d: &DataType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&d.name())
}

/// Fresh branches for `cands`: A random per PEFT's init, B zero (embeddings: A zero, B
/// normal, as PEFT does), scaling alpha / r or alpha / sqrt(r).
pub fn fresh_branches(
    cands: &[&Candidate],
    rank: usize,
    alpha: f32,
    rslora: bool,
    init: Init,
    seed: u64,
    strip_prefix: Option<&str>,
) -> Result<Vec<BranchSpec>> {
    if let Some(p) = strip_prefix
        && let Some(c) = cands.first()
        && cands
            .iter()
            .all(|c| branch_name(c, strip_prefix) == branch_name(c, None))
    {
        return Err(Error::Usage(format!(
            "--strip-prefix '{p}' is no leading dotted component of any targeted module path (e.g. '{}')",
            branch_name(c, None)
        )));
    }
    let scale = if rslora {
        alpha / (rank as f32).sqrt()
    } else {
        alpha / rank as f32
    };
    let mut specs = cands
        .iter()
        .map(|c| {
            let n_in = factor_in(c);
            let n_out = c.out_features.max(0) as usize;
            if !rank.is_multiple_of(c.groups()) {
                return Err(Error::Usage(format!(
                    "rank {rank} is not a multiple of the {} groups of convolution '{}' (PEFT's rule for grouped convolutions)",
                    c.groups(),
                    c.module
                )));
            }
            if rank > n_in.max(n_out) {
                return Err(Error::Usage(format!(
                    "rank {rank} is larger than both sides of '{}' ({n_in} inputs, {n_out} outputs), surely a mistake (the update's rank is at most {})",
                    c.module,
                    n_in.min(n_out)
                )));
            }
            let mut rng = Rng::new(seed ^ fnv(&c.module) ^ fnv(&c.node));
            let (a, b) = if c.op == "Gather" {
                (
                    vec![0.0; rank * n_in],
                    (0..n_out * rank).map(|_| rng.normal()).collect(),
                )
            } else {
                let a = match init {
                    Init::Kaiming => {
                        // torch's fan_in of A: its input features times a conv's kernel size
                        let bound = 1.0 / (n_in.max(1) as f32).sqrt();
                        (0..rank * n_in)
                            .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
                            .collect()
                    }
                    Init::Gaussian => (0..rank * n_in)
                        .map(|_| rng.normal() / rank as f32)
                        .collect(),
                };
                (a, vec![0.0; n_out * rank / c.groups()])
            };
            Ok(BranchSpec {
                cand: (*c).clone(),
                name: branch_name(c, strip_prefix),
                a: Matrix::new(rank, n_in, a)?,
                b: Matrix::new(n_out, rank / c.groups(), b)?,
                scale,
                magnitude: None,
                bias: None,
                slices: Vec::new(),
                via_parameter: false,
                in_proj_rows: c.mha_rows,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // A cross-attention's in-projection layers are one PEFT module: they take one A (the query
    // layer's), which `inject` gives them as one initializer.
    let firsts: Vec<(String, Matrix)> = specs
        .iter()
        .filter(|s| s.in_proj_rows.is_some_and(|[start, _]| start == 0))
        .map(|s| (s.name.clone(), s.a.clone()))
        .collect();
    for s in specs.iter_mut().filter(|s| s.in_proj_rows.is_some()) {
        if let Some((_, a)) = firsts
            .iter()
            .find(|(n, a)| *n == s.name && a.cols == s.a.cols)
        {
            s.a = a.clone();
        }
    }
    Ok(specs)
}

/// Branches carrying a PEFT adapter's factors (the unmerged deployment). `cands` are those of
/// `model`; a base weight the adapter saved beside a LoRA is checked against the model's.
/// Without `allow_unmatched`, the modules that fit no layer are refused together in one
/// error; a module that fits a layer it cannot branch (a layer folded with a BatchNorm, a
/// saved base weight unlike the model's, a DoRA embedding) stops the lookup at once.
pub fn adapter_branches(
    model: &LoadedModel,
    graph: &ModelGraph,
    cands: &[Candidate],
    adapter: &Adapter,
    allow_unmatched: bool,
) -> Result<(Vec<BranchSpec>, Vec<String>)> {
    adapter_branches_or_deltas(model, graph, cands, adapter, allow_unmatched, None, &[])
}

/// `adapter_branches`, where `deltas` (when given) takes what has no branch form but a weight
/// form: layers inside onnxruntime's fused ops (an Attention's packed q/k/v weight,
/// EmbedLayerNormalization's table). Without `deltas` those are refused. The q/k/v modules of
/// a weight packed in a node of its own (`qkv_proj`) become one branch on it (`packed_spec`).
/// A later call that this adapter or `also_named` (other adapters' paths) names is a module
/// of its own (`drop_named_later_calls`).
fn adapter_branches_or_deltas(
    model: &LoadedModel,
    graph: &ModelGraph,
    cands: &[Candidate],
    adapter: &Adapter,
    allow_unmatched: bool,
    mut deltas: Option<&mut Vec<BranchSpec>>,
    also_named: &[String],
) -> Result<(Vec<BranchSpec>, Vec<String>)> {
    adapter.check_foldable()?;
    let mut out = Vec::new();
    // (packed weight, the module's projection, the module)
    let mut slices: Vec<(&Candidate, usize, &ModuleAdapter)> = Vec::new();
    let mut unmatched = Vec::new();
    let mut refused: Vec<String> = Vec::new();
    let (paths, _) = super::module_paths(adapter, cands)?;
    let mut named = super::named_paths(cands, std::slice::from_ref(&paths));
    named.extend(also_named.iter().cloned());
    for (m, path) in adapter.modules.iter().zip(&paths) {
        let Some(path) = path else { continue };
        if m.has_no_branch_form() {
            return Err(Error::Adapter {
                path: adapter.path.clone(),
                reason: format!(
                    "module '{}' ({}) has no branch form; write it into the weights first (`write_whole_values`)",
                    m.path,
                    m.replaced_what()
                ),
            });
        }
        if m.magnitude.is_some() && m.kind == ModuleKind::Embedding {
            return Err(Error::Adapter {
                path: adapter.path.clone(),
                reason: format!(
                    "module '{}': DoRA embedding branches are not supported; use fold",
                    m.path
                ),
            });
        }
        let same = |a: &Candidate, b: &Candidate| super::weights::same_values(model, graph, a, b);
        let found = match resolve_module(
            cands,
            path,
            |c| super::accepts(m, c) && c.branchable(),
            same,
        )
        .and_then(|found| super::drop_named_later_calls(found, &named, cands))
        {
            Ok(f) if let Some((c, role)) = crate::target::packed::twin(cands, path, &f) => {
                // (inject puts one branch per module: not one per If body)
                if deltas.is_none() {
                    return Err(packed_slice_refusal(
                        m,
                        c,
                        role,
                        " in another If body (onnxruntime fused q/k/v in that body only)",
                        "merges into both",
                    ));
                }
                slices.push((c, role, m));
                f
            }
            Ok(f) => f,
            Err(_)
                if let Ok(found) = resolve_module(
                    cands,
                    path,
                    |c| super::accepts(m, c) && !c.branchable(),
                    same,
                ) =>
            {
                match deltas.as_deref_mut() {
                    Some(d) if found.iter().all(|c| !c.quantized) => {
                        // (an ambiguous scope is unmatched or refused, as in the `Err(e)` arm)
                        match super::drop_named_later_calls(found, &named, cands) {
                            Ok(found) => {
                                for c in found {
                                    d.push(spec_from_module(c, m, &m.path, adapter.scaling(m))?);
                                }
                            }
                            Err(e) if allow_unmatched => unmatched.push(e.to_string()),
                            Err(e) => refused.push(e.to_string()),
                        }
                        continue;
                    }
                    _ => {
                        return Err(Error::Target(format!(
                            "module '{}': {}",
                            m.path,
                            found[0].no_branch_reason()
                        )));
                    }
                }
            }
            Err(_)
                if let Some(Ok((found, role))) =
                    crate::target::packed::resolve_all(cands, path) =>
            {
                for c in found {
                    if deltas.is_none() && !c.branchable() {
                        return Err(packed_slice_refusal(m, c, role, "", "merges it"));
                    }
                    slices.push((c, role, m));
                }
                continue;
            }
            // (packed weights that none, or several, of fit: their own message)
            Err(_) if let Some(Err(e)) = crate::target::packed::resolve_all(cands, path) => {
                if allow_unmatched {
                    unmatched.push(e.to_string());
                } else {
                    refused.push(e.to_string());
                }
                continue;
            }
            // (every module that fits nothing is named, as fold names them)
            Err(e) => {
                let why = super::kind_mismatch(m, cands, path).unwrap_or_else(|| e.to_string());
                if allow_unmatched {
                    unmatched.push(why);
                } else {
                    refused.push(why);
                }
                continue;
            }
        };
        for c in found {
            if c.norm_folded {
                return Err(Error::Target(crate::target::norm_folded_refusal(path, c)));
            }
            if let Some(saved) = m.full.get("weight") {
                super::weights::check_saved_base(model, graph, c, &m.path, saved)?;
            }
            // (a PEFT module's branch keeps the adapter's own path, also where the export
            // lacks its root: serving inputs and export-peft use PEFT's names)
            let name = if m.part.is_none() { &m.path } else { path };
            out.push(spec_from_module(c, m, name, adapter.scaling(m))?);
        }
    }
    match refused.len() {
        0 => {}
        1 if paths.iter().flatten().count() == 1 => return Err(Error::Target(refused.remove(0))),
        1 => {
            return Err(Error::Target(format!(
                "{} (use --allow-unmatched to inject the rest)",
                refused.remove(0)
            )));
        }
        n => {
            return Err(Error::Target(format!(
                "{n} adapter modules fit no layer: {} (use --allow-unmatched to inject the rest)",
                refused.join("; ")
            )));
        }
    }
    // One branch per packed weight that a node computes from x (a `qkv_proj` MatMul, also a
    // quantized one); inside a fused op (Attention), the reference's weight form.
    {
        let mut packed: Vec<&Candidate> = slices.iter().map(|(c, ..)| *c).collect();
        packed.sort_by_key(|c| (c.graph, c.node_index, c.weight_input));
        packed.dedup_by_key(|c| (c.graph, c.node_index, c.weight_input));
        for c in packed {
            let on_c: Vec<(usize, &ModuleAdapter)> = slices
                .iter()
                .filter(|(s, ..)| {
                    (s.graph, s.node_index, s.weight_input)
                        == (c.graph, c.node_index, c.weight_input)
                })
                .map(|&(_, role, m)| (role, m))
                .collect();
            let spec = packed_spec(c, &on_c, |m| adapter.scaling(m))?;
            match deltas.as_deref_mut() {
                Some(d) if !c.branchable() => d.push(spec),
                _ => out.push(spec),
            }
        }
    }
    Ok((out, unmatched))
}

/// One spec for the projections `slices` ((q 0, k 1 or v 2; module)) of the packed weight `c`:
/// their A's stacked, and their scaled B's placed at their projections' outputs (zeros
/// elsewhere), so that B·A is the packed weight's whole delta. Scale 1.
fn packed_spec(
    c: &Candidate,
    slices: &[(usize, &ModuleAdapter)],
    scaling: impl Fn(&ModuleAdapter) -> f32,
) -> Result<BranchSpec> {
    use crate::target::packed::{ROLE_NAMES, widths};
    let total = c.out_features.max(0) as usize;
    let n_in = factor_in(c);
    let mut known = [None; 3];
    for (i, &(role, m)) in slices.iter().enumerate() {
        // (one module per projection: a second, under another path, would be a second layer)
        if let Some((_, other)) = slices[..i].iter().find(|(r, _)| *r == role) {
            return Err(Error::Target(format!(
                "modules '{}' and '{}' are both the {} projection of packed weight '{}'",
                other.path, m.path, ROLE_NAMES[role], c.weight
            )));
        }
        known[role] = Some(m.b.as_ref().map_or(0, |b| b.shape[0]));
    }
    let fits = |w: &[usize; 3]| known.iter().zip(w).all(|(k, w)| k.is_none_or(|k| k == *w));
    let Some(w) = c
        .packed
        .as_ref()
        .and_then(|p| widths(p, total, known))
        .filter(fits)
    else {
        return Err(Error::Target(format!(
            "packed q/k/v weight '{}' ({} {}, {total} outputs) cannot be split to fit {}",
            c.weight,
            c.op,
            c.node,
            slices
                .iter()
                .map(|(_, m)| m.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let mut factors = Vec::new();
    for &(role, m) in slices {
        let (a, b) = super::factors(m, c, n_in, w[role])?;
        factors.push((role, a, b, scaling(m)));
    }
    let rank: usize = factors.iter().map(|(_, a, ..)| a.rows).sum();
    let mut a_all = Vec::with_capacity(rank * n_in);
    let mut b_all = vec![0.0f32; total * rank];
    // (DoRA and lora_bias per output channel, where a projection has them)
    let mut magnitude = vec![f32::NAN; total];
    let mut bias = vec![0.0f32; total];
    let mut col = 0;
    let mut parts = Vec::with_capacity(slices.len());
    for ((role, a, b, s), (_, m)) in factors.iter().zip(slices) {
        a_all.extend_from_slice(&a.data);
        let start: usize = w[..*role].iter().sum();
        parts.push(super::branch::Slice {
            module: m.path.clone(),
            ranks: [col, col + a.rows],
            columns: [start, start + w[*role]],
            scale: *s,
            dora: m.magnitude.is_some(),
            lora_bias: m.bias_b.is_some(),
        });
        for i in 0..b.rows {
            for j in 0..b.cols {
                b_all[(start + i) * rank + col + j] = s * b.data[i * b.cols + j];
            }
        }
        col += a.rows;
        let channels = start..start + w[*role];
        // A per-channel tensor of the module: one value per output of its projection.
        let per_channel = |n: usize, what: &str| {
            if n == w[*role] {
                Ok(())
            } else {
                Err(Error::Target(format!(
                    "module '{}': {what} has {n} values for {} output channels",
                    m.path, w[*role]
                )))
            }
        };
        if let Some(mag) = &m.magnitude {
            per_channel(mag.data.len(), "lora_magnitude_vector")?;
            magnitude[channels.clone()].copy_from_slice(&mag.data);
        }
        if let Some(lb) = &m.bias_b {
            per_channel(lb.data.len(), "lora_B.bias")?;
            let lb = &lb.data;
            bias[channels]
                .iter_mut()
                .zip(lb)
                .for_each(|(o, v)| *o = s * v);
        }
    }
    let dora = slices.iter().any(|(_, m)| m.magnitude.is_some());
    let lora_bias = slices.iter().any(|(_, m)| m.bias_b.is_some());
    Ok(BranchSpec {
        cand: c.clone(),
        // (named by the packed layer; the slices name the adapter's modules)
        name: if c.module.is_empty() {
            c.weight.clone()
        } else {
            c.module.clone()
        },
        a: Matrix::new(rank, n_in, a_all)?,
        b: Matrix::new(total, rank, b_all)?,
        scale: 1.0,
        magnitude: dora.then_some(magnitude),
        bias: lora_bias.then_some(bias),
        slices: parts,
        // (a packed layer's slices are exported as the modules they name)
        via_parameter: false,
        in_proj_rows: None,
    })
}

/// inject's refusal of a module that is (`where_`: also, elsewhere) the `role` slice of the
/// packed q/k/v weight of `c`; `fold_does` says what fold does instead.
fn packed_slice_refusal(
    m: &ModuleAdapter,
    c: &Candidate,
    role: usize,
    where_: &str,
    fold_does: &str,
) -> Error {
    let also = if where_.is_empty() { "" } else { "also " };
    Error::Target(format!(
        "module '{}' is {also}the {} slice of the packed q/k/v weight '{}' ({} {}){where_}: inject cannot put a branch on one slice; `onnx-lora fold` {fold_does}",
        m.path,
        crate::target::packed::ROLE_NAMES[role],
        c.weight,
        c.op,
        c.node
    ))
}

/// A branch for module `m` on candidate `c`, named `path`.
fn spec_from_module(
    c: &Candidate,
    m: &ModuleAdapter,
    path: &str,
    scale: f32,
) -> Result<BranchSpec> {
    let (a, b) = super::factors(m, c, factor_in(c), c.out_features.max(0) as usize)?;
    Ok(BranchSpec {
        cand: c.clone(),
        name: path.to_string(),
        a,
        b,
        scale,
        magnitude: m.magnitude.as_ref().map(|t| t.data.clone()),
        bias: m.bias_b.as_ref().map(|t| t.data.clone()),
        slices: Vec::new(),
        via_parameter: m.via_parameter,
        in_proj_rows: m.in_proj_rows,
    })
}

/// Columns of A: input features, times the kernel size for convolutions.
pub(super) fn factor_in(c: &Candidate) -> usize {
    if c.op == "Conv" {
        // PEFT's conv lora_A reads every input channel, grouped layer or not.
        (c.in_features * c.shape[2..].iter().product::<i64>()).max(0) as usize
    } else {
        c.in_features.max(0) as usize
    }
}

fn branch_name(c: &Candidate, strip_prefix: Option<&str>) -> String {
    let base = if c.module.is_empty() {
        c.node.clone()
    } else {
        c.module.clone()
    };
    match strip_prefix.and_then(|p| base.strip_prefix(p.trim_end_matches('.'))) {
        Some(rest) if rest.starts_with('.') => rest[1..].to_string(),
        _ => base,
    }
}

/// Refuses what `inject` cannot carry as one branch per module, which fold-back and
/// export-peft rely on: a module called several times (a layer shared across calls: the same
/// name, or TorchScript's `query_1` reading `query`'s weight), whether the targets picked
/// every call or one (`cands`: every candidate of the model), or a layer that already has a
/// branch from an earlier inject. A scope that an adapter names (`named`: `named_paths` of
/// the adapter's lookups; empty for fresh branches) is a module of its own, never a later
/// call.
pub fn check_one_branch_per_module(
    model: &LoadedModel,
    branches: &[BranchSpec],
    cands: &[Candidate],
    named: &[String],
) -> Result<()> {
    // (the nodes each module name is found on, with the graph that holds each)
    // (a cross-attention's in-projection parts are one module, a branch per layer: counted
    // apart by their rows)
    type Nodes<'n> = Vec<(&'n str, usize)>;
    let mut by_name: HashMap<(&str, Option<[usize; 2]>), Nodes> = HashMap::new();
    let later = |x: &Candidate, y: &Candidate| {
        crate::target::select::later_call_of(x, y) && !super::named_takes(y, named, cands)
    };
    // The first branch on each weight: a later one whose module is a later call of its module
    // (or the reverse) counts under its name.
    // (The source names the graph that holds the weight: a later call inside a subgraph reading
    // the main graph's weight counts too.)
    let mut by_weight: HashMap<&crate::graph::ConstSource, &BranchSpec> = HashMap::new();
    for b in branches {
        by_name
            .entry((b.name.as_str(), b.in_proj_rows))
            .or_default()
            .push((b.cand.node.as_str(), b.cand.graph));
        if let Some(src) = &b.cand.source {
            let first = *by_weight.entry(src).or_insert(b);
            let (f, m) = (&first.cand, &b.cand);
            if first.name != b.name && (later(f, m) || later(m, f)) {
                by_name
                    .entry((first.name.as_str(), first.in_proj_rows))
                    .or_default()
                    .push((b.cand.node.as_str(), b.cand.graph));
            }
        }
    }
    // Calls of a targeted module that the targets left out: the same module name on another
    // node, or a later call's scope on the same weight (of the same op and shape: TorchScript
    // also merges equal initializers of different modules, `proj` and `proj_1` both zeros).
    let targeted: HashSet<(usize, usize)> = branches
        .iter()
        .map(|b| (b.cand.graph, b.cand.node_index))
        .collect();
    for b in branches {
        let other_call = |c: &&Candidate| {
            // (a node of the scope that the scope's lookup leaves to another module is that
            // module's call: `fc`'s, which TorchScript scoped like the module `fc_1`)
            let same_name = !b.cand.module.is_empty()
                && c.module == b.cand.module
                && match (
                    super::scope_takes(c, cands),
                    super::scope_takes(&b.cand, cands),
                ) {
                    (Ok(in_c), Ok(in_b)) => in_c && in_b,
                    _ => {
                        !crate::target::select::reads_others_params(c)
                            && !crate::target::select::reads_others_params(&b.cand)
                    }
                };
            let later_call = || {
                c.source.is_some()
                    && c.source == b.cand.source
                    && c.op == b.cand.op
                    && c.shape == b.cand.shape
                    && (later(&b.cand, c) || later(c, &b.cand))
            };
            (same_name || later_call()) && !targeted.contains(&(c.graph, c.node_index))
        };
        for c in cands.iter().filter(other_call) {
            by_name
                .entry((b.name.as_str(), b.in_proj_rows))
                .or_default()
                .push((c.node.as_str(), c.graph));
        }
    }
    // (a node found both as a later call and by its name counts once)
    for nodes in by_name.values_mut() {
        let mut seen = HashSet::new();
        nodes.retain(|n| seen.insert(*n));
    }
    let mut shared: Vec<(&str, Option<[usize; 2]>, &Nodes)> = by_name
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|((name, rows), v)| (*name, *rows, v))
        .collect();
    shared.sort_by_key(|(name, rows, _)| (*name, *rows));
    if let Some((name, _, nodes)) = shared.first() {
        let labels: Vec<&str> = nodes.iter().map(|(n, _)| *n).collect();
        let mut graphs: Vec<usize> = nodes.iter().map(|(_, g)| *g).collect();
        graphs.sort_unstable();
        graphs.dedup();
        // One node per subgraph: the bodies of an If, of which one runs per call (a merged
        // decoder, with and without past), not calls of a shared layer.
        if graphs.len() == nodes.len() && !graphs.contains(&0) {
            return Err(Error::Target(format!(
                "module '{name}' is in {} subgraphs of this export (nodes {}; the bodies of an If, as in a merged decoder with and without past); inject puts one branch per module, so it refuses this one: inject into the separate files (decoder_model.onnx, decoder_with_past_model.onnx), or `onnx-lora fold`, which merges an adapter into every body",
                nodes.len(),
                crate::target::list_names(labels.iter().copied(), labels.len(), 8)
            )));
        }
        return Err(Error::Target(format!(
            "module '{name}' is called {} times in this export (nodes {}: one layer shared across calls); inject puts one branch per module, so it refuses this one: `onnx-lora fold` merges an adapter into every call",
            nodes.len(),
            crate::target::list_names(labels.iter().copied(), labels.len(), 8)
        )));
    }
    let graph = ModelGraph::build(&model.proto);
    if super::count_injected(model, &graph) == (0, 0) {
        return Ok(());
    }
    let mut probe = model.clone();
    let (_, existing) = super::unbranch::find_all(&mut probe)?;
    if let Some(b) = branches.iter().find(|b| {
        existing
            .iter()
            .any(|f| f.cand.graph == b.cand.graph && f.cand.node == b.cand.node)
    }) {
        return Err(Error::Target(format!(
            "module '{}' ({}) already has a branch from an earlier inject; fold it first (`onnx-lora fold MODEL -o OUT`) or target other layers",
            b.name, b.cand.node
        )));
    }
    Ok(())
}

/// Adds every branch to the model.
pub fn inject(
    model: &mut LoadedModel,
    branches: &[BranchSpec],
    as_inputs: bool,
) -> Result<Vec<BranchReport>> {
    let graph = ModelGraph::build(&model.proto);
    let mut taken = all_names(&model.proto);
    let mut seen_nodes = HashSet::new();
    for br in branches {
        if !seen_nodes.insert((br.cand.graph, br.cand.node_index)) {
            return Err(Error::Target(format!(
                "node '{}' is targeted twice",
                br.cand.node
            )));
        }
        if br.magnitude.is_some() && br.cand.groups() > 1 {
            return Err(Error::Target(format!(
                "module '{}': DoRA on a grouped convolution is not supported",
                br.name
            )));
        }
        // (a quantized base takes a float branch beside it: its activations are float)
        let dtype = crate::onnx::DataType::from_i32(
            super::weights::tensor(&model.proto, &graph, &br.cand)?.data_type(),
        );
        if !br.cand.quantized && !dtype.is_foldable_float() {
            return Err(Error::Target(format!(
                "module '{}' ({} {}): {dtype} layers take no branch (float32, float16, bfloat16, float64 only)",
                br.name, br.cand.op, br.cand.node
            )));
        }
        if as_inputs && !br.slices.is_empty() {
            return Err(Error::Target(format!(
                "module '{}' is a slice of the packed q/k/v weight '{}': --as-inputs gives each module its own LoRA inputs, which a packed weight's one branch cannot read; inject without --as-inputs",
                br.slices[0].module, br.cand.weight
            )));
        }
        if as_inputs && br.in_proj_rows.is_some() {
            return Err(Error::Target(format!(
                "module '{}' is the in-projection of a torch.nn.MultiheadAttention that this export computes as layers of their own (a cross-attention's query, and its key and value; or a query, key and value projected apart): --as-inputs would give each layer LoRA inputs of its own, which an adapter of the attention's one module cannot fill; inject without --as-inputs",
                br.name
            )));
        }
        if as_inputs && (br.magnitude.is_some() || br.bias.is_some()) {
            return Err(Error::Target(format!(
                "module '{}': DoRA and lora_bias cannot be served through LoRA inputs; inject without --as-inputs",
                br.name
            )));
        }
        if as_inputs && (br.cand.graph != 0 || br.cand.op == "Conv") {
            return Err(Error::Target(format!(
                "module '{}': --as-inputs supports linear and embedding layers of the main graph only",
                br.name
            )));
        }
    }
    // From the deepest graph and the last anchor back, so insertions never move a node
    // still to be visited.
    let mut order: Vec<(&BranchSpec, usize)> = branches
        .iter()
        .map(|b| {
            // DoRA scales the layer's output without its bias: stay on the node itself.
            let at = if b.magnitude.is_some() {
                b.cand.node_index
            } else {
                anchor(model, &graph, &b.cand)
            };
            (b, at)
        })
        .collect();
    order.sort_by_key(|(b, at)| {
        (
            std::cmp::Reverse(graph.graphs[b.cand.graph].loc.0.len()),
            std::cmp::Reverse(*at),
        )
    });
    check_shared_a(branches)?;
    let mut shared_a: HashMap<String, String> = HashMap::new();
    let mut reports = Vec::new();
    for (br, at) in order {
        reports.push(add_branch(
            model,
            &graph,
            br,
            at,
            as_inputs,
            &mut taken,
            &mut shared_a,
        )?);
    }
    reports.reverse();
    Ok(reports)
}

/// An attention's in-projection layers (`in_proj_rows`: a cross-attention's two, or a query,
/// key and value projected apart) read one A initializer, as PEFT's module on the attention has
/// one A (training it trains them all): their branches must carry one.
pub(super) fn check_shared_a(branches: &[BranchSpec]) -> Result<()> {
    for br in branches.iter().filter(|b| b.in_proj_rows.is_some()) {
        // (one call packs the in-projection, another computes it in parts: no PEFT module
        // gives both, nor does export-peft)
        if let Some(packed) = branches.iter().find(|o| {
            o.in_proj_rows.is_none()
                && o.name == br.name
                && o.cand.mha == Some(crate::target::MhaPart::InProj)
        }) {
            return Err(Error::Target(format!(
                "module '{}' is a torch.nn.MultiheadAttention whose calls compute its in-projection in different forms: packed in one layer ({}) in one call, in parts (a query, key or value apart, {}) in another; inject puts one branch per layer, which no PEFT module on the attention gives; merge the adapter in torch",
                br.name, packed.cand.node, br.cand.node
            )));
        }
        if let Some(other) = branches
            .iter()
            .find(|o| o.in_proj_rows.is_some() && o.name == br.name && o.a != br.a)
        {
            return Err(Error::Target(format!(
                "module '{}': its branches on '{}' and '{}' (one attention's in-projection) have different lora_A factors, where they share one",
                br.name, br.cand.node, other.cand.node
            )));
        }
    }
    Ok(())
}

/// The node whose output the branch is added to: the node itself, or for a MatMul the bias
/// Add right after it, so onnxruntime can still fuse MatMul + bias exactly as in the base; for
/// a layer with quantized input and output, the node giving its float output.
pub(super) fn anchor(model: &LoadedModel, graph: &ModelGraph, c: &Candidate) -> usize {
    let view = &graph.graphs[c.graph];
    let bias_add = |at: usize| -> Option<usize> {
        let y = graph.node(&model.proto, c.graph, at)?.output.first()?;
        let [u] = view.consumers_of(y) else {
            return None;
        };
        let add = graph.node(&model.proto, c.graph, *u)?;
        let other = add.input.iter().find(|i| *i != y)?;
        (add.op_type() == "Add"
            && graph.const_source(&model.proto, c.graph, other).is_some()
            && !view.is_graph_output(y))
        .then_some(*u)
    };
    match (c.op.as_str(), &c.float_site) {
        ("MatMul", _) => bias_add(c.node_index).unwrap_or(c.node_index),
        // (quantize_dynamic's MatMul: the bias Add after its scale Mul, which onnxruntime
        // fuses with it as it fuses a MatMul's)
        ("MatMulInteger", Some(site)) => bias_add(site.anchor).unwrap_or(site.anchor),
        (_, Some(site)) => site.anchor,
        _ => c.node_index,
    }
}

fn add_branch(
    model: &mut LoadedModel,
    graph: &ModelGraph,
    br: &BranchSpec,
    anchor: usize,
    as_inputs: bool,
    taken: &mut HashSet<String>,
    shared_a: &mut HashMap<String, String>,
) -> Result<BranchReport> {
    let c = &br.cand;
    let dtype = activation_dtype(model, graph, c);
    let r = br.a.rows;
    let (a_dims, a_vals, b_dims, b_vals) = graph_factors(br);
    let dora = dora_constants(model, graph, br)?;
    // (the A of an in-projection's other layer, already written: `inject`)
    let a_written = br
        .in_proj_rows
        .and_then(|_| shared_a.get(&br.name))
        .cloned();
    let a_name = match &a_written {
        Some(a) => a.clone(),
        None => unique_name(&format!("{}.lora_A.weight", br.name), taken),
    };
    if br.in_proj_rows.is_some() {
        shared_a.insert(br.name.clone(), a_name.clone());
    }
    let names = BranchNames {
        a: a_name,
        b: unique_name(&format!("{}.lora_B.weight", br.name), taken),
        scale: (!as_inputs).then(|| unique_name(&format!("{}.lora_scale", br.name), taken)),
        lora_bias: br
            .bias
            .as_ref()
            .map(|_| unique_name(&format!("{}.lora_B.bias", br.name), taken)),
        dora_scale: dora
            .as_ref()
            .map(|_| unique_name(&format!("{}.dora_scale", br.name), taken)),
        dora_bias: dora
            .as_ref()
            .and_then(|(_, b)| b.as_ref())
            .map(|_| unique_name(&format!("{}.dora_bias", br.name), taken)),
    };
    let channel_dims = channel_dims(c);
    let gp = graph.graphs[c.graph]
        .loc
        .get_mut(&mut model.proto)
        .ok_or_else(|| Error::tensor(&c.weight, "graph not found"))?;
    let base = gp
        .node
        .get(c.node_index)
        .ok_or_else(|| Error::tensor(&c.weight, "node not found"))?;
    let y = gp
        .node
        .get(anchor)
        .ok_or_else(|| Error::tensor(&c.weight, "node not found"))?
        .output
        .first()
        .cloned()
        .filter(|y| !y.is_empty())
        .ok_or_else(|| {
            Error::Target(format!(
                "node '{}' has no output to add a branch to",
                c.node
            ))
        })?;
    let y_base = unique_name(&format!("{y}.base"), taken);
    // A branch beside a quantized MatMul reads the float x its DynamicQuantizeLinear
    // quantizes (an embedding's indices are its own input).
    let mut base = base.clone();
    if let (Some(site), Some(x)) = (&c.float_site, base.input.first_mut())
        && c.op != "Gather"
    {
        x.clone_from(&site.x);
    }
    let mut nodes = branch_nodes(c, &base, &names, &y, &y_base, &br.name);
    super::branch::mark_slices(&mut nodes, &br.slices);
    super::branch::mark_parameter(&mut nodes, br.via_parameter);
    super::branch::mark_in_proj_rows(&mut nodes, br.in_proj_rows);
    // Node and intermediate value names unique in the model (a layer may already have a branch,
    // e.g. in the reference of several adapters); the last node still produces y.
    let mut renamed: HashMap<String, String> = HashMap::new();
    for n in &mut nodes {
        for i in n.input.iter_mut() {
            if let Some(r) = renamed.get(i) {
                i.clone_from(r);
            }
        }
        for o in n.output.iter_mut().filter(|o| **o != y) {
            let u = unique_name(o, taken);
            renamed.insert(o.clone(), u.clone());
            *o = u;
        }
        n.name = Some(unique_name(n.name(), taken));
    }
    gp.node[anchor].output[0] = y_base;
    let at = anchor + 1;
    for (k, n) in nodes.into_iter().enumerate() {
        gp.node.insert(at + k, n);
    }
    if as_inputs {
        let rank_dim = format!("{}.rank", br.name);
        let (a_empty, b_empty) = empty_dims(&a_dims, &b_dims);
        gp.initializer
            .push(initializer(&names.a, &a_empty, &[], dtype)?);
        gp.initializer
            .push(initializer(&names.b, &b_empty, &[], dtype)?);
        gp.input
            .push(input_info(&names.a, &a_dims, 1, &rank_dim, dtype));
        gp.input
            .push(input_info(&names.b, &b_dims, 0, &rank_dim, dtype));
    } else {
        if a_written.is_none() {
            gp.initializer
                .push(initializer(&names.a, &a_dims, &a_vals, dtype)?);
        }
        gp.initializer
            .push(initializer(&names.b, &b_dims, &b_vals, dtype)?);
        if let Some(s) = &names.scale {
            gp.initializer
                .push(initializer(s, &[], &[br.scale], dtype)?);
        }
        let per_channel = [
            (&names.lora_bias, br.bias.as_ref()),
            (&names.dora_scale, dora.as_ref().map(|(f, _)| f)),
            (
                &names.dora_bias,
                dora.as_ref().and_then(|(_, b)| b.as_ref()),
            ),
        ];
        for (name, values) in per_channel {
            if let (Some(n), Some(v)) = (name, values) {
                gp.initializer
                    .push(initializer(n, &channel_dims, v, dtype)?);
            }
        }
    }
    Ok(BranchReport {
        module: br.name.clone(),
        node: c.node.clone(),
        op: c.op.clone(),
        rank: r,
        scale: br.scale,
        lora_a: names.a,
        lora_b: names.b,
        dtype,
        slices: br.slices.clone(),
    })
}

/// DoRA's per-channel factor and, for layers with a bias, the bias correction.
type DoraConstants = (Vec<f32>, Option<Vec<f32>>);

/// Shape of per-output-channel constants: [out] for linear layers, [out, 1, ...] for Conv
/// (channels on axis 1 of an NCHW output).
fn channel_dims(c: &Candidate) -> Vec<i64> {
    let mut d = vec![c.out_features];
    if c.op == "Conv" {
        d.extend(std::iter::repeat_n(1, c.shape.len().saturating_sub(2)));
    }
    d
}

/// DoRA's per-channel factor m / ||W + s·B·A|| (PEFT's weight norm, over everything but the
/// output channel) and, for layers whose output includes a bias (Gemm C, Conv B), the
/// correction (1 - factor)·bias so the bias itself stays unscaled.
pub(super) fn dora_constants(
    model: &LoadedModel,
    graph: &ModelGraph,
    br: &BranchSpec,
) -> Result<Option<DoraConstants>> {
    let Some(m) = &br.magnitude else {
        return Ok(None);
    };
    let c = &br.cand;
    let norms = super::weights::effective_norms(model, graph, c, &br.a, &br.b, br.scale)?;
    if m.len() != norms.len() {
        return Err(Error::Target(format!(
            "module '{}': lora_magnitude_vector has {} values for {} output channels",
            br.name,
            m.len(),
            norms.len()
        )));
    }
    let f: Vec<f32> = m
        .iter()
        .zip(&norms)
        .map(|(m, n)| if m.is_nan() { 1.0 } else { m / n })
        .collect();
    let node = graph.node(&model.proto, c.graph, c.node_index);
    let bias = match c.op.as_str() {
        "Gemm" | "Conv" => node
            .and_then(|n| n.input.get(2))
            .filter(|v| !v.is_empty())
            .and_then(|v| graph.const_source(&model.proto, c.graph, v))
            .and_then(|src| graph.const_tensor(&model.proto, &src)),
        _ => None,
    };
    let correction = match bias {
        Some(t) => {
            let b = crate::tensor::to_f32(
                &model.tensor_bytes(t)?,
                DataType::from_i32(t.data_type()),
                t.name(),
            )?;
            if b.len() != f.len() {
                return Err(Error::Target(format!(
                    "module '{}': DoRA needs a per-channel bias, found {} values",
                    br.name,
                    b.len()
                )));
            }
            let beta = node
                .filter(|n| n.op_type() == "Gemm")
                .and_then(|n| n.attr_f("beta"))
                .unwrap_or(1.0);
            Some(
                b.iter()
                    .zip(&f)
                    .map(|(b, f)| (1.0 - f) * beta * b)
                    .collect(),
            )
        }
        None => None,
    };
    Ok(Some((f, correction)))
}

/// The branch's factors in graph layout: linear and embedding A [in, r], B [r, out];
/// conv A [r, in, k...] (PEFT's own), B [out, r, 1...].
pub fn graph_factors(br: &BranchSpec) -> (Vec<i64>, Vec<f32>, Vec<i64>, Vec<f32>) {
    let r = br.a.rows as i64;
    let c = &br.cand;
    if c.op == "Conv" {
        let mut a_dims = vec![r, c.in_features];
        a_dims.extend_from_slice(&c.shape[2..]);
        let mut b_dims = vec![br.b.rows as i64, br.b.cols as i64];
        b_dims.extend(std::iter::repeat_n(1, c.shape.len().saturating_sub(2)));
        (a_dims, br.a.data.clone(), b_dims, br.b.data.clone())
    } else {
        (
            vec![br.a.cols as i64, r],
            br.a.transposed().data,
            vec![r, br.b.rows as i64],
            br.b.transposed().data,
        )
    }
}

fn empty_dims(a: &[i64], b: &[i64]) -> (Vec<i64>, Vec<i64>) {
    (vec![a[0], 0], vec![0, b[1]])
}

fn input_info(
    name: &str,
    dims: &[i64],
    rank_axis: usize,
    rank_dim: &str,
    dtype: DataType,
) -> ValueInfoProto {
    let dim = dims
        .iter()
        .enumerate()
        .map(|(i, &d)| Dimension {
            value: Some(if i == rank_axis {
                DimValue::DimParam(rank_dim.into())
            } else {
                DimValue::DimValue(d)
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype.to_i32()),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

/// The dtype the node computes in: the weight's, after any Cast on its way; for quantized
/// weights, the dtype of their scales.
pub(super) fn activation_dtype(model: &LoadedModel, graph: &ModelGraph, c: &Candidate) -> DataType {
    let stored = DataType::from_i32(
        c.source
            .as_ref()
            .and_then(|s| graph.const_tensor(&model.proto, s))
            .map(|t| t.data_type())
            .unwrap_or(1),
    );
    let mut dtype = stored;
    for &ci in &c.chain {
        let Some(n) = graph.node(&model.proto, c.graph, ci) else {
            continue;
        };
        match n.op_type() {
            "Cast" => dtype = DataType::from_i32(n.attr_i("to").unwrap_or(1) as i32),
            "DequantizeLinear" => dtype = input_dtype(model, graph, c.graph, n.input.get(1)),
            _ => {}
        }
    }
    if c.op == "MatMulNBits" {
        let n = graph.node(&model.proto, c.graph, c.node_index);
        dtype = input_dtype(model, graph, c.graph, n.and_then(|n| n.input.get(2)));
    }
    match (c.op.as_str(), &c.float_site) {
        // (DynamicQuantizeLinear takes float32 only)
        ("MatMulInteger" | "DynamicQuantizeMatMul" | "MatMulIntegerToFloat", _) => DataType::Float,
        (_, Some(site)) => {
            let n = graph.node(&model.proto, c.graph, site.anchor);
            input_dtype(model, graph, c.graph, n.and_then(|n| n.input.get(1)))
        }
        _ => dtype,
    }
}

fn input_dtype(model: &LoadedModel, graph: &ModelGraph, gi: usize, v: Option<&String>) -> DataType {
    v.and_then(|v| graph.const_source(&model.proto, gi, v))
        .and_then(|s| graph.const_tensor(&model.proto, &s))
        .map(|t| DataType::from_i32(t.data_type()))
        .unwrap_or(DataType::Float)
}

/// Small deterministic generator (splitmix64) so branches are the same for the same seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes the values an adapter replaces outright (modules_to_save, trainable tokens, trained
/// biases) into the model's weights, as they are in PEFT's unmerged model (no branch can carry
/// them), with `weight` (which must be 1 for them). Returns the adapter's low-rank part, for
/// branches, and the fold report of the whole part, if it had one (with `allow_unmatched`, what
/// matched no weight is listed there instead of failing).
pub fn write_whole_values(
    model: &mut LoadedModel,
    adapter: &Adapter,
    weight: f32,
    allow_unmatched: bool,
) -> Result<(Adapter, Option<super::FoldReport>)> {
    let (low, whole) = adapter.split_whole();
    let Some(whole) = whole else {
        return Ok((low, None));
    };
    let opts = super::FoldOptions {
        weights: vec![weight],
        allow_unmatched,
        ..Default::default()
    };
    let report = super::fold(model, std::slice::from_ref(&whole), &opts)?;
    // (the adapter's module paths, as its user names them; not those --allow-unmatched left
    // out, which fold lists by their keys)
    let written = whole.modules.iter().filter(|m| {
        let listed = format!("{} (", m.keys.join(", "));
        !report.unmatched.iter().any(|u| u.starts_with(&listed))
    });
    let written: Vec<&str> = written.map(|m| m.path.as_str()).collect();
    super::whole_record::record(model, adapter, &whole, &report, &written);
    record_replaced(&mut model.proto, written.into_iter());
    Ok((low, Some(report)))
}

/// Adds `modules` to the model's list of modules whose values were written into its weights
/// (`REPLACED_KEY`).
fn record_replaced<'a>(
    model: &mut crate::onnx::pb::ModelProto,
    modules: impl Iterator<Item = &'a str>,
) {
    use crate::onnx::pb_ext::REPLACED_KEY;
    let mut list = replaced_modules(model);
    for m in modules {
        if !list.iter().any(|l| l == m) {
            list.push(m.to_string());
        }
    }
    if list.is_empty() {
        return;
    }
    let text = serde_json::to_string(&list).unwrap_or_default();
    super::branch::set_meta(&mut model.metadata_props, REPLACED_KEY, text);
}

/// The modules whose values `inject --adapter` wrote into the model's weights (see
/// `REPLACED_KEY`); none when the model has no such record or an unreadable one.
pub fn replaced_modules(model: &crate::onnx::pb::ModelProto) -> Vec<String> {
    crate::onnx::pb_ext::lookup(&model.metadata_props, crate::onnx::pb_ext::REPLACED_KEY)
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default()
}

/// The adapted model's unmerged forward as a graph: `model` with every adapter as branches
/// (applied in order, each scaled by its weight and `scale`; later adapters' branches nest
/// inside earlier ones on the same node; the q/k/v modules of a `qkv_proj` layer, one branch
/// as inject gives it). Layers with no branch form (a packed weight inside onnxruntime's
/// Attention, a table inside its fused embedding op) read W + s·A·B computed by the runtime
/// instead (`--form weight`'s nodes). `fold --verify` compares its result with this.
pub fn unmerged_reference(
    model: &LoadedModel,
    adapters: &[Adapter],
    weights: &[f32],
    scale: f32,
) -> Result<LoadedModel> {
    let mut reference = model.clone();
    // (every adapter's modules: a later call one of them names is a module of its own, as
    // fold takes it)
    let named = {
        let graph = ModelGraph::build(&model.proto);
        let mut cands = crate::target::find_candidates(&model.proto, &graph);
        cands.extend(crate::target::norm::find_norm_params(&model.proto, &graph));
        let mut paths = Vec::with_capacity(adapters.len());
        for adapter in adapters {
            paths.push(super::module_paths(adapter, &cands)?.0);
        }
        super::named_paths(&cands, &paths)
    };
    // Layers that take the adapters in weight space (packed q/k/v, fused ops), added last.
    let mut in_weight: Vec<BranchSpec> = Vec::new();
    // Layers branched by earlier adapters, and whether one of those branches is DoRA.
    let mut branched: HashMap<(usize, String), bool> = HashMap::new();
    for (i, adapter) in adapters.iter().enumerate() {
        // The reference writes each adapter's replaced values into the weights and adds every
        // low-rank part beside them: it cannot replace what an earlier adapter's LoRA changed
        // (fold does, in the adapters' order).
        for m in adapter.modules.iter().filter(|m| m.replaces_values()) {
            let earlier = adapters[..i]
                .iter()
                .find(|e| e.modules.iter().any(|l| l.path == m.path && l.a.is_some()));
            if let Some(e) = earlier {
                return Err(Error::Usage(format!(
                    "module '{}': {} replaces values ({}) of a layer whose LoRA from {}, an earlier adapter, the reference keeps beside the weights; it cannot follow that order",
                    m.path,
                    adapter.path.display(),
                    m.replaced_what(),
                    e.path.display()
                )));
            }
        }
        let w = weights.get(i).copied().unwrap_or(1.0) * scale;
        // (the fold this checks has already refused what matches no weight, unless allowed)
        let (low, _) = write_whole_values(&mut reference, adapter, w, true)?;
        let graph = ModelGraph::build(&reference.proto);
        let cands = crate::target::find_candidates(&reference.proto, &graph);
        let mut deltas = Vec::new();
        let (mut branches, _) = adapter_branches_or_deltas(
            &reference,
            &graph,
            &cands,
            &low,
            true,
            Some(&mut deltas),
            &named,
        )?;
        branches.iter_mut().for_each(|b| b.scale *= w);
        deltas.iter_mut().for_each(|b| b.scale *= w);
        for b in branches.iter().chain(&deltas) {
            // (per layer; on a packed weight per projection, whose columns no other touches)
            let mut keys = vec![(
                b.cand.graph,
                b.cand.node.clone(),
                b.name.clone(),
                b.magnitude.is_some(),
            )];
            if !b.slices.is_empty() {
                keys = b
                    .slices
                    .iter()
                    .map(|s| {
                        let at = format!("{}#{}", b.cand.node, s.columns[0]);
                        (b.cand.graph, at, s.module.clone(), s.dora)
                    })
                    .collect();
            }
            for (graph, node, name, dora) in keys {
                if let Some(earlier_dora) = branched.insert((graph, node), dora)
                    && (dora || earlier_dora)
                {
                    return Err(Error::Usage(format!(
                        "module '{name}': two of the adapters change it and one is DoRA, which in PEFT rescales what the adapters before it added; the branch reference does not model that order"
                    )));
                }
            }
        }
        inject(&mut reference, &branches, false)?;
        // (one delta per layer, all adapters': the weight form edits a node once)
        for d in deltas {
            let key = |c: &Candidate| (c.graph, c.node.clone(), c.weight.clone(), c.weight_input);
            match in_weight.iter_mut().find(|e| key(&e.cand) == key(&d.cand)) {
                Some(e) => *e = summed(e, &d)?,
                None => in_weight.push(d),
            }
        }
    }
    if in_weight.is_empty() {
        return Ok(reference);
    }
    // The branches moved the nodes: find each layer again.
    let graph = ModelGraph::build(&reference.proto);
    let cands = crate::target::find_candidates(&reference.proto, &graph);
    for d in &mut in_weight {
        let same = |c: &&Candidate| {
            (c.graph, &c.node, &c.weight, c.weight_input)
                == (
                    d.cand.graph,
                    &d.cand.node,
                    &d.cand.weight,
                    d.cand.weight_input,
                )
        };
        d.cand = cands
            .iter()
            .find(same)
            .cloned()
            .ok_or_else(|| Error::Target(format!("node '{}' not found again", d.cand.node)))?;
    }
    super::weight_form::inject_weight(&mut reference, &in_weight)?;
    Ok(reference)
}

/// One spec whose B·A is the sum of both specs' scaled B·A (their ranks side by side; scale 1).
fn summed(x: &BranchSpec, y: &BranchSpec) -> Result<BranchSpec> {
    // DoRA on channels the other spec leaves alone (another projection of a packed weight:
    // the reference refuses DoRA where two adapters change one module before it gets here).
    let untouched = |by: &BranchSpec, ch: usize| {
        by.b.data[ch * by.b.cols..(ch + 1) * by.b.cols]
            .iter()
            .all(|v| *v == 0.0)
            && by.bias.as_ref().is_none_or(|b| b[ch] == 0.0)
    };
    let dora_apart = |d: &BranchSpec, other: &BranchSpec| {
        d.magnitude.as_ref().is_none_or(|m| {
            m.iter()
                .enumerate()
                .all(|(ch, v)| v.is_nan() || untouched(other, ch))
        })
    };
    if !(dora_apart(x, y) && dora_apart(y, x)) {
        return Err(Error::Target(format!(
            "layer '{}': two adapters change the same outputs and one is DoRA; the reference does not model that",
            y.name
        )));
    }
    let magnitude = (x.magnitude.is_some() || y.magnitude.is_some()).then(|| {
        (0..x.b.rows)
            .map(|ch| {
                let of = |s: &BranchSpec| s.magnitude.as_ref().map_or(f32::NAN, |m| m[ch]);
                if of(x).is_nan() { of(y) } else { of(x) }
            })
            .collect()
    });
    // lora_B biases add up, each at its spec's scale.
    let bias = (x.bias.is_some() || y.bias.is_some()).then(|| {
        let at = |s: &BranchSpec, i: usize| s.bias.as_ref().map_or(0.0, |b| b[i] * s.scale);
        (0..x.b.rows).map(|i| at(x, i) + at(y, i)).collect()
    });
    let rank = x.a.rows + y.a.rows;
    let mut a = x.a.data.clone();
    a.extend_from_slice(&y.a.data);
    let mut b = Vec::with_capacity(x.b.rows * rank);
    for i in 0..x.b.rows {
        for s in [x, y] {
            let row = &s.b.data[i * s.b.cols..(i + 1) * s.b.cols];
            b.extend(row.iter().map(|v| v * s.scale));
        }
    }
    Ok(BranchSpec {
        a: Matrix::new(rank, x.a.cols, a)?,
        b: Matrix::new(x.b.rows, rank, b)?,
        scale: 1.0,
        bias,
        magnitude,
        // (a reference's spec: never exported, so its slices need not follow the sum)
        slices: Vec::new(),
        ..x.clone()
    })
}
