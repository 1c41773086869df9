//! The fold pass: merges PEFT adapters into the weights, as PEFT's `merge_and_unload` would,
//! mapped onto each ONNX layout.
//!
//! ```text
//!   x ──MatMul(W)── y        becomes        x ──MatMul(W + s·ΔW)── y
//! ```
//!
//! ΔW = B·A for Linear, Conv1D, Conv (A flattened over its kernel) and embeddings, applied
//! in f32 and rounded once to the weight's dtype; DoRA rescales each output channel to its
//! magnitude; several adapters apply in order, each delta times its `--weight`. A weight that
//! other nodes also read (tied embeddings, deduplicated initializers) is copied for the
//! targeted node, so the result equals the adapted model's unmerged forward. Whole tensors
//! (modules_to_save: weight and bias) replace the layer's; trainable tokens replace rows of an
//! embedding table and, when an output layer holds the same rows (tied embeddings), its
//! channels too, as PEFT's tied token adapter does.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use serde::Serialize;

use super::weights;
use crate::adapter::{Adapter, ModuleAdapter, ModuleKind};
use crate::error::{Error, Result};
use crate::graph::{ConstSource, ModelGraph};
use crate::onnx::LoadedModel;
use crate::onnx::io::LazyTensor;
use crate::onnx::pb_ext::NodeExt;
use crate::target::{Candidate, Layout, find_candidates, norm, packed, resolve_module};
use crate::tensor::{Matrix, add_low_rank, from_f32, out_norms, scale_out};

#[derive(Clone, Debug)]
pub struct FoldOptions {
    /// One weight per adapter (default 1).
    pub weights: Vec<f32>,
    /// Multiplies every delta.
    pub scale: f32,
    /// Adapter modules that match no weight are warnings instead of an error.
    pub allow_unmatched: bool,
}

impl Default for FoldOptions {
    fn default() -> Self {
        FoldOptions {
            weights: Vec::new(),
            scale: 1.0,
            allow_unmatched: false,
        }
    }
}

/// What happened to one adapted weight.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleReport {
    pub module: String,
    pub node: String,
    pub op: String,
    pub weight: String,
    pub rank: usize,
    pub scale: f32,
    pub dora: bool,
    pub replaced: bool,
    /// Largest |new - old| element; known once the merge has run (the model was saved).
    pub max_abs_delta: DeltaCell,
    /// A kohya file's own name for the module (its keys' stem, `lora_unet_…`), which for a
    /// Flux file's fused module names every layer it was split into.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_module: Option<String>,
    /// The slices of a packed q/k/v weight that adapter modules changed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packed: Vec<PackedSlice>,
    /// Name of the private copy made because the weight was shared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
    /// Trainable tokens whose rows (an output layer's channels) were replaced.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<usize>,
    /// The layer's bias was replaced by a trained one (modules_to_save, PEFT's bias option).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bias_replaced: bool,
    /// Every delta merged into this weight, in order, when there are several (adapters given
    /// together); `rank` and `scale` above are the last one's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepReport>,
}

impl ModuleReport {
    /// The report of a change to `c`'s weight, before anything is known of it.
    fn of(c: &Candidate) -> ModuleReport {
        ModuleReport {
            module: c.module.clone(),
            node: c.node.clone(),
            op: c.op.clone(),
            weight: c.weight.clone(),
            rank: 0,
            scale: 0.0,
            dora: false,
            replaced: false,
            max_abs_delta: DeltaCell::default(),
            adapter_module: None,
            packed: Vec::new(),
            copy: None,
            tokens: Vec::new(),
            bias_replaced: false,
            steps: Vec::new(),
        }
    }
}

/// A kohya module's name in its file (its keys' module: `lora_unet_…`, or ComfyUI's
/// `diffusion_model.…`); None for other formats.
fn kohya_stem(m: &ModuleAdapter) -> Option<String> {
    m.part?;
    Some(crate::adapter::kohya::file_module(m.keys.first()?).to_string())
}

/// One delta merged into a weight.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub module: String,
    pub rank: usize,
    pub scale: f32,
}

/// One projection's columns in a packed weight.
#[derive(Clone, Debug, Serialize)]
pub struct PackedSlice {
    pub module: String,
    /// `q`, `k` or `v`.
    pub projection: &'static str,
    /// Output channels `[start, end)`.
    pub columns: [usize; 2],
}

/// A value filled in when the lazy merge runs (at save time); `null` in JSON before that.
#[derive(Clone, Debug, Default)]
pub struct DeltaCell(Arc<OnceLock<f32>>);

impl DeltaCell {
    pub fn get(&self) -> Option<f32> {
        self.0.get().copied()
    }
}

impl Serialize for DeltaCell {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.get().serialize(s)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FoldReport {
    pub modules: Vec<ModuleReport>,
    pub unmatched: Vec<String>,
    pub notes: Vec<String>,
    /// The layers whole-values modules (modules_to_save, trained biases, trainable tokens)
    /// were written into, for `inject` to record (see `whole_record`).
    #[serde(skip)]
    pub whole: Vec<WholeTarget>,
}

/// A layer a whole-values module's tensors were written into.
#[derive(Clone, Debug)]
pub struct WholeTarget {
    /// The adapter module's path.
    pub module: String,
    pub cand: Candidate,
    /// The module is one projection's slice of a packed q/k/v weight.
    pub packed: bool,
    /// For a whole weight: whether torch's layout of it is the stored matrix transposed
    /// (`weights::saved_transposed`); None for a module with no whole weight, or a weight
    /// that is no float matrix.
    pub transposed: Option<bool>,
    /// An output layer tied to a trainable-tokens table, given the table's new rows as its
    /// channels for those tokens.
    pub tied_head: bool,
}

/// One adapter module's contribution to a weight.
#[derive(Clone)]
pub(crate) struct Step<'a> {
    pub module: &'a ModuleAdapter,
    /// The module's scaling times its adapter's weight and the global scale.
    pub scale: f32,
    /// torch stores this layer's full weight as (in, out) (GPT-2 Conv1D).
    pub fan_in_fan_out: bool,
    /// The module is the q (0), k (1) or v (2) slice of a packed weight.
    pub role: Option<usize>,
    /// The module's layer reads these rows (its outputs) of the weight through a Split or
    /// Slice (`Candidate::window`); the job is then on the whole weight (`join_windows`).
    pub rows: Option<[usize; 2]>,
}

/// All the steps aimed at one node's weight.
#[derive(Clone)]
pub(crate) struct Job<'a> {
    pub cand: Candidate,
    pub steps: Vec<Step<'a>>,
}

/// Folds `adapters` into `model` in place. On error the model may be partly changed (the
/// CLI then writes nothing); every new weight is computed before the first write.
pub fn fold(
    model: &mut LoadedModel,
    adapters: &[Adapter],
    opts: &FoldOptions,
) -> Result<FoldReport> {
    let graph = ModelGraph::build(&model.proto);
    let cands = find_candidates(&model.proto, &graph);
    let norms = norm::find_norm_params(&model.proto, &graph);
    let mut report = FoldReport::default();
    let same = |a: &Candidate, b: &Candidate| weights::same_values(model, &graph, a, b);
    let mut jobs = plan(&cands, &norms, adapters, opts, &mut report, same)?;
    // (before the weights change: the layout a whole weight was placed in, for inject's record)
    for t in &mut report.whole {
        let Some(w) = adapters
            .iter()
            .flat_map(|a| &a.modules)
            .find(|m| m.path == t.module && m.kind == ModuleKind::Full)
            .and_then(|m| m.full.get("weight"))
        else {
            continue;
        };
        let Some(orient) = weights::orientation(t.cand.layout) else {
            continue;
        };
        // (a weight of another size is refused when the fold plans it)
        let size: i64 = t.cand.shape.iter().product();
        if usize::try_from(size).ok() != Some(w.data.len()) {
            continue;
        }
        let alpha = gemm_alpha(model, &graph, &t.cand);
        t.transposed = weights::saved_transposed(&t.cand, orient, w, || {
            weights::read(model, &graph, &t.cand)
                .map(|v| v.values.iter().map(|x| x * alpha).collect::<Vec<f32>>())
        })
        .ok();
    }
    tie_token_heads(model, &graph, &cands, &mut jobs, &mut report)?;
    execute(model, &graph, &jobs, &mut report)?;
    Ok(report)
}

/// The jobs on layers that read rows of a weight through a Split or Slice (`Candidate::window`:
/// a cross-attention's query and key / value layers in a dynamo export, or a TorchScript export
/// with dynamic axes) as jobs on the whole tensor, each step writing its layer's rows
/// (`Step::rows`): one job for the windows of a tensor they own (written in place), one per
/// window of a shared tensor (each a private copy). Other jobs pass as they are.
fn join_windows<'a>(
    model: &LoadedModel,
    graph: &ModelGraph,
    jobs: &[Job<'a>],
) -> Result<Vec<Job<'a>>> {
    let mut out: Vec<Job<'a>> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let Some(rows) = job.cand.window else {
            out.push(job.clone());
            continue;
        };
        if let Some(m) = job.steps.iter().map(|s| s.module).find(|m| {
            !matches!(m.kind, ModuleKind::Lora) || !m.full.is_empty() || m.lycoris.is_some()
        }) {
            return Err(Error::Target(format!(
                "module '{}' ({}): its layer {} reads rows {}-{} of '{}' through a {} (a cross-attention's in-projection, split at run time), and onnx-lora merges only LoRA factors there, not values that replace the layer's weight or bias (modules_to_save, trained biases); export the model with the TorchScript exporter (dynamo=False) without dynamic axes, where each part has a weight of its own",
                m.path,
                m.keys.join(", "),
                job.cand.node,
                rows[0],
                rows[1],
                job.cand.weight,
                job.cand.through.first().map_or("Split", String::as_str),
            )));
        }
        let steps = job.steps.iter().map(|s| Step {
            rows: Some(rows),
            ..s.clone()
        });
        // The job this loop made of another window of the tensor (its steps all have rows),
        // where the tensor is the windows' own (its readers are Slices of other rows, or one
        // Split): one write in place. Where it is shared (another call's windows, an
        // exporter's merge of equal weights), each window's job stays its own: its layer then
        // reads a private copy holding its rows' change (`weights::write` copies the tensor
        // and the Split or Slice for that layer alone).
        let group = |c: &Candidate| {
            (
                c.source.clone(),
                c.shared.then_some((c.graph, c.node_index)),
            )
        };
        if let Some(whole) = out.iter_mut().find(|j| {
            j.cand.window.is_none()
                && !j.steps.is_empty()
                && j.steps.iter().all(|s| s.rows.is_some())
                && group(&j.cand) == group(&job.cand)
        }) {
            whole.steps.extend(steps);
            continue;
        }
        let dims = weights::tensor(&model.proto, graph, &job.cand)?
            .dims
            .clone();
        let [n_out, n_in] = dims[..] else {
            return Err(Error::tensor(
                &job.cand.weight,
                "rows, through a Split or Slice, of a tensor that is not 2-D",
            ));
        };
        let cand = Candidate {
            shape: dims,
            out_features: n_out,
            in_features: n_in,
            window: None,
            mha_rows: None,
            ..job.cand.clone()
        };
        out.push(Job {
            cand,
            steps: steps.collect(),
        });
    }
    Ok(out)
}

/// Merges each job's steps into its weight and writes the results.
pub(crate) fn execute(
    model: &mut LoadedModel,
    graph: &ModelGraph,
    jobs: &[Job],
    report: &mut FoldReport,
) -> Result<()> {
    let joined = join_windows(model, graph, jobs)?;
    let jobs = &joined[..];
    // Check and plan every merge first (reads only); the merges themselves run when the model
    // is written, one weight at a time.
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        results.push(plan_merge(model, graph, job)?);
    }
    report.modules = results.iter().map(|(_, rep, _)| rep.clone()).collect();
    let mut taken = weights::all_names(&model.proto);
    // In-place writes first, then private copies: deepest graphs first and, within a graph,
    // from the last node back (each job also finds its node again below, by name).
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| {
        let c = &jobs[i].cand;
        (
            c.shared,
            std::cmp::Reverse(graph.graphs[c.graph].loc.0.len()),
            std::cmp::Reverse(c.node_index),
        )
    });
    // (each job's node output, and its chain nodes', before anything moves them)
    let output_of = |c: &Candidate, i: usize| {
        graph
            .node(&model.proto, c.graph, i)
            .and_then(|n| n.output.first().cloned())
    };
    let outputs: Vec<(Option<String>, Vec<String>)> = jobs
        .iter()
        .map(|j| {
            let chain = j.cand.chain.iter().filter_map(|&i| output_of(&j.cand, i));
            (output_of(&j.cand, j.cand.node_index), chain.collect())
        })
        .collect();
    // (and a weight held by a Constant node, by that node's output)
    let constants: Vec<Option<(usize, String)>> = jobs
        .iter()
        .map(|j| match j.cand.source {
            Some(crate::graph::ConstSource::Constant { graph: g, node }) => graph
                .node(&model.proto, g, node)
                .and_then(|n| n.output.first().cloned())
                .map(|o| (g, o)),
            _ => None,
        })
        .collect();
    // Bias deltas into existing biases (in place); layers without one get a new bias below.
    let mut new_bias = vec![false; jobs.len()];
    for (i, (job, (_, _, bias))) in jobs.iter().zip(&results).enumerate() {
        if let Some(bias) = bias {
            new_bias[i] = !apply_bias(model, graph, &job.cand, bias, &mut taken)?;
        }
    }
    // Writes insert nodes (a private copy's pass-through chain before its node, a new bias's
    // Add after it): each job finds its node, and its chain's, by the output they had.
    for i in order {
        let cand = Candidate {
            node_index: now_at(model, graph, &jobs[i].cand, outputs[i].0.as_deref())?,
            chain: outputs[i]
                .1
                .iter()
                .map(|o| now_at(model, graph, &jobs[i].cand, Some(o)))
                .collect::<Result<_>>()?,
            source: match &constants[i] {
                Some((g, o)) => {
                    let at = Candidate {
                        graph: *g,
                        ..jobs[i].cand.clone()
                    };
                    Some(crate::graph::ConstSource::Constant {
                        graph: *g,
                        node: now_at(model, graph, &at, Some(o))?,
                    })
                }
                None => jobs[i].cand.source.clone(),
            },
            ..jobs[i].cand.clone()
        };
        if new_bias[i]
            && let Some(bias) = &results[i].2
        {
            create_bias(model, graph, &cand, &bias.apply(None, 1.0), &mut taken)?;
            report.notes.push(if !bias.set.is_empty() {
                format!(
                    "{}: the layer had no bias; the adapter's trained bias was added",
                    jobs[i].cand.module
                )
            } else {
                format!(
                    "{}: the layer had no bias; lora_bias added one (PEFT's merge refuses this case; its unmerged forward is what we match)",
                    jobs[i].cand.module
                )
            });
        }
        // A job that only changes the bias (a trained bias alone) leaves the weight as it is.
        if results[i].0.steps.is_empty() {
            continue;
        }
        let copy = weights::write(
            model,
            graph,
            &cand,
            weights::TensorData::Lazy(results[i].0.clone()),
            &mut taken,
        )?;
        if let Some(name) = copy {
            let c = &cand;
            report.notes.push(format!(
                "{}: weight '{}' is shared with {}; the node got its own copy '{}', so the others keep theirs (where the model ties these weights, PEFT's merge would change them too; an exporter's deduplication of equal values ties nothing)",
                c.module,
                c.weight,
                c.shared_with.listed(8),
                name
            ));
            if let Some(m) = report
                .modules
                .iter_mut()
                .find(|m| m.node == c.node && m.weight == c.weight)
            {
                m.copy = Some(name);
            }
        }
    }
    Ok(())
}

/// Where the node of `c` that wrote `output` is now (nodes inserted before it move it on).
fn now_at(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
    output: Option<&str>,
) -> Result<usize> {
    let Some(output) = output else {
        return Ok(c.node_index);
    };
    graph.graphs[c.graph]
        .loc
        .get(&model.proto)
        .and_then(|g| {
            g.node
                .iter()
                .position(|n| n.output.first().map(String::as_str) == Some(output))
        })
        .ok_or_else(|| Error::tensor(&c.weight, "its node is gone"))
}

/// Matches every adapter module to the weight it adapts, grouped by node.
fn plan<'a>(
    cands: &[Candidate],
    norms: &[Candidate],
    adapters: &'a [Adapter],
    opts: &FoldOptions,
    report: &mut FoldReport,
    same_values: impl Fn(&Candidate, &Candidate) -> bool,
) -> Result<Vec<Job<'a>>> {
    let mut jobs: Vec<Job<'a>> = Vec::new();
    let mut unmatched = Vec::new();
    // (said once after the list: where whole tensors can go)
    let mut whole_unmatched = false;
    // (the export's root is found among its norm layers too: an adapter may train only their
    // biases)
    let all: Vec<Candidate> = cands.iter().chain(norms).cloned().collect();
    let mut looked_up = Vec::with_capacity(adapters.len());
    for adapter in adapters {
        adapter.check_foldable()?;
        looked_up.push(super::module_paths(adapter, &all)?);
    }
    // (every adapter's modules: a later call one of them names is a module of its own)
    let named = super::named_paths(
        &all,
        &looked_up.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
    );
    report.notes.extend(super::deeper_matches_note(
        &all,
        &looked_up.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        &named,
    ));
    for (ai, (adapter, (paths, notes))) in adapters.iter().zip(looked_up).enumerate() {
        let weight = opts.weights.get(ai).copied().unwrap_or(1.0) * opts.scale;
        report.notes.extend(notes);
        // (the modules of PEFT's MultiheadAttention LoRA whose out_proj delta was applied: the
        // note follows the modules')
        let mut mha_applied: Vec<&str> = Vec::new();
        for (module, path) in adapter.modules.iter().zip(&paths) {
            let Some(path) = path else { continue };
            if module.replaces_values() && weight != 1.0 {
                return Err(Error::Adapter {
                    path: adapter.path.clone(),
                    reason: format!(
                        "module '{}' replaces whole values ({}), which cannot be weighted: fold this adapter with weight 1 (--weight / --scale)",
                        module.path,
                        module.replaced_what()
                    ),
                });
            }
            let accept = |c: &Candidate| super::accepts(module, c);
            // Trainable tokens on an embedding module that its call sites share (T5's `shared`,
            // which is encoder.embed_tokens and decoder.embed_tokens): the export names the
            // Gathers after the call sites, the table after the module. (Not a LoRA: PEFT's
            // LoRA on `shared` leaves the call sites as they are.)
            let resolved = resolve_module(cands, path, accept, &same_values)
                .and_then(|found| super::drop_named_later_calls(found, &named, cands))
                .or_else(|e| {
                    let by_table: Vec<&Candidate> = cands
                        .iter()
                        .filter(|c| {
                            module.kind == ModuleKind::Tokens
                                && accept(c)
                                && c.other_paths.iter().any(|p| p == path)
                        })
                        .collect();
                    if by_table.is_empty() {
                        Err(e)
                    } else {
                        Ok(by_table)
                    }
                });
            let found: Vec<(Candidate, Option<usize>)> = match resolved {
                Ok(found) => {
                    // TorchScript names a module's later calls `x_1`, as it would name a module
                    // of its own called `x_1`, and merges equal initializers; the parameter
                    // names it reads tell them apart only where the exporter named a merged
                    // parameter after its module (torch 2.15 does, through an Identity), so
                    // each node taken as a later call is noted.
                    let later: Vec<&str> = found
                        .iter()
                        .filter(|c| c.module != found[0].module)
                        .map(|c| c.node.as_str())
                        .collect();
                    if !later.is_empty() {
                        report.notes.push(format!(
                            "module '{path}' (node {}) is also changed at {}, taken as its later call{}: TorchScript names calls so and reads one weight for them. A module of its own with that name, values equal to this one's (the exporter merges equal weights) and no parameter the export names after it (a bias) would be changed too; the dynamo exporter names the two apart",
                            found[0].node,
                            crate::target::list_names(later.iter().copied(), later.len(), 8),
                            if later.len() > 1 { "s" } else { "" }
                        ));
                    }
                    // The same layer packed in another If body (q/k/v fused in one body only).
                    let twin = (is_linear_lora(module) || module.kind == ModuleKind::Full)
                        .then(|| packed::twin(cands, path, &found))
                        .flatten();
                    let mut calls: Vec<(Candidate, Option<usize>)> = one_write_per_weight(found)
                        .into_iter()
                        .map(|c| (c, None))
                        .collect();
                    calls.extend(twin.map(|(c, role)| (c.clone(), Some(role))));
                    calls
                }
                Err(e) => match packed::resolve_all(cands, path) {
                    // (one write per weight: the bodies of an If may read the same one)
                    Some(Ok((found, role)))
                        if is_linear_lora(module) || module.kind == ModuleKind::Full =>
                    {
                        one_write_per_weight(found)
                            .into_iter()
                            .map(|c| (c, Some(role)))
                            .collect()
                    }
                    Some(Err(pe)) => {
                        unmatched.push(format!("{} ({pe})", module.keys.join(", ")));
                        continue;
                    }
                    _ => match (module.kind, norm_targets(norms, module, path, &same_values)) {
                        (ModuleKind::Full, Some(found)) => {
                            found?.into_iter().map(|c| (c, None)).collect()
                        }
                        _ => {
                            let why =
                                super::kind_mismatch(module, cands, path).unwrap_or_else(|| {
                                    whole_unmatched |= module.kind == ModuleKind::Full;
                                    e.to_string()
                                });
                            unmatched.push(format!("{} ({why})", module.keys.join(", ")));
                            continue;
                        }
                    },
                },
            };
            for (c, role) in found {
                if c.norm_folded {
                    return Err(Error::Target(crate::target::norm_folded_refusal(path, &c)));
                }
                // (once per module: not per call, nor per adapter)
                if matches!(module.kind, ModuleKind::Lora | ModuleKind::Lycoris)
                    && let Some(n) = super::inner_pad_note(&module.path, &c, false)
                    && !report.notes.contains(&n)
                {
                    report.notes.push(n);
                }
                mha_applied.push(&module.path);
                if matches!(module.kind, ModuleKind::Full | ModuleKind::Tokens) {
                    report.whole.push(WholeTarget {
                        module: module.path.clone(),
                        cand: c.clone(),
                        packed: role.is_some(),
                        transposed: None,
                        tied_head: false,
                    });
                }
                let step = Step {
                    module,
                    scale: adapter.scaling(module) * weight,
                    fan_in_fan_out: adapter.config.fan_in_fan_out,
                    role,
                    rows: None,
                };
                // (a norm layer's scale and bias are two jobs on one node)
                match jobs.iter_mut().find(|j| {
                    (j.cand.graph, j.cand.node_index, j.cand.weight_input)
                        == (c.graph, c.node_index, c.weight_input)
                }) {
                    Some(j) => j.steps.push(step),
                    None => jobs.push(Job {
                        cand: c.clone(),
                        steps: vec![step],
                    }),
                }
            }
        }
        report
            .notes
            .extend(adapter.mha_note(|m| mha_applied.contains(&m.path.as_str())));
    }
    if !unmatched.is_empty() {
        if !opts.allow_unmatched {
            // (where the export's root is below the adapter's, the report's note says so)
            let root = report
                .notes
                .iter()
                .find(|n| n.starts_with("this export's module paths"))
                .map(|n| format!("; {n}"))
                .unwrap_or_default();
            let hint = if whole_unmatched {
                format!(". {WHOLE_FIT}")
            } else {
                String::new()
            };
            return Err(Error::Target(format!(
                "{} adapter module(s) match no weight: {} (use --allow-unmatched to apply the rest{root}){hint}",
                unmatched.len(),
                unmatched.join("; ")
            )));
        }
        report.unmatched = unmatched;
        if whole_unmatched {
            report.notes.push(WHOLE_FIT.to_string());
        }
    }
    Ok(jobs)
}

/// Where whole tensors (modules_to_save, trained biases) can go, for modules that found none.
const WHOLE_FIT: &str = "Whole tensors fold into linear, conv and embedding layers, and into the scale and bias of normalization layers (LayerNormalization, RMSNormalization, group and batch norms, and onnxruntime's fusions of them; not a norm the export wrote as elementary ops, as torch writes RMSNorm below opset 23)";

/// The normalization-layer parameters a whole-values module replaces (PEFT's `bias="all"`
/// trains norm biases; `modules_to_save` may hold a norm layer): each of its tensors resolved to
/// the layer's parameter of that name. None when no normalization layer has the module's path.
fn norm_targets(
    norms: &[Candidate],
    module: &ModuleAdapter,
    path: &str,
    same_values: impl Fn(&Candidate, &Candidate) -> bool,
) -> Option<Result<Vec<Candidate>>> {
    let of =
        |name: &str| resolve_module(norms, path, |c| norm::param(c) == Some(name), &same_values);
    // (the layer's scale and bias are two tensors: each is resolved on its own)
    let layer = ["weight", "bias"].iter().find_map(|n| of(n).ok())?[0];
    let mut out = Vec::new();
    for name in module.full.keys() {
        match of(name) {
            Ok(found) => out.extend(one_write_per_weight(found)),
            Err(_) => {
                return Some(Err(Error::Target(format!(
                    "module '{}': the adapter holds a trained {name}, but the normalization layer ({} {}) has no constant {name}",
                    module.path, layer.op, layer.node
                ))));
            }
        }
    }
    Some(Ok(out))
}

/// The calls of one module that read one shared weight, and are all its readers, change it
/// once in place (a layer shared across calls, as ALBERT's): the first call stands for them,
/// no longer counted as shared. Copies with equal values (dynamo's) each change.
fn one_write_per_weight(found: Vec<&Candidate>) -> Vec<Candidate> {
    use std::collections::HashMap;
    // The calls reading each weight, by node label and by count (nodes in different graphs
    // may share a name: `fc`'s call and a module `fc_1` both `/fc_1/MatMul`).
    let mut calls: HashMap<&ConstSource, (HashSet<&str>, usize)> = HashMap::new();
    for f in &found {
        if let Some(s) = &f.source {
            let (names, count) = calls.entry(s).or_default();
            names.insert(f.node.as_str());
            *count += 1;
        }
    }
    // Whether every reader of the weight is one of them (made once per weight: a layer an
    // unrolled loop calls thousands of times is one group).
    let mut only_calls: HashMap<&ConstSource, bool> = HashMap::new();
    let mut written: HashSet<&ConstSource> = HashSet::new();
    let mut out: Vec<Candidate> = Vec::new();
    for c in &found {
        let all_readers = c.source.as_ref().is_some_and(|s| {
            let (names, count) = &calls[s];
            *count > 1
                && c.shared_with.len() + 1 == *count
                && *only_calls.entry(s).or_insert_with(|| {
                    c.shared_with
                        .all()
                        .iter()
                        .all(|r| names.contains(r.as_str()))
                })
        });
        match (&c.source, all_readers) {
            (Some(s), true) => {
                if written.insert(s) {
                    let mut first = (*c).clone();
                    first.shared = false;
                    first.shared_with = Default::default();
                    out.push(first);
                }
            }
            _ => out.push((*c).clone()),
        }
    }
    out
}

/// Candidates whose rows are an embedding table's (`Gather`, onnxruntime's
/// EmbedLayerNormalization): a token is a row on the input axis. Elsewhere it is an output
/// channel (an output layer).
fn is_table(c: &Candidate) -> bool {
    matches!(c.op.as_str(), "Gather" | "EmbedLayerNormalization")
}

/// Rows, spread over the vocabulary, that an output layer and an embedding table must share
/// (beside the trained tokens' rows) to count as tied.
const TIE_SAMPLES: usize = 256;

/// Gives the trainable tokens of each embedding table to the output layers tied to it, as
/// PEFT's tied token adapter does: a linear layer mapping the table's dim to its vocabulary
/// that reads the table's own tensor, or whose channels hold exactly the table's rows at the
/// tokens and across the vocabulary (an export keeps tied weights as two equal copies, or one
/// shared tensor). A layer the adapter gives its own rows is left to them. One shared tensor
/// is changed in place, for all its readers.
fn tie_token_heads<'a>(
    model: &LoadedModel,
    graph: &ModelGraph,
    cands: &[Candidate],
    jobs: &mut Vec<Job<'a>>,
    report: &mut FoldReport,
) -> Result<()> {
    let mut added: Vec<(Candidate, Step<'a>)> = Vec::new();
    for ji in 0..jobs.len() {
        let job = &jobs[ji];
        if !is_table(&job.cand) {
            continue;
        }
        let Some(step) = job
            .steps
            .iter()
            .find(|s| s.module.kind == ModuleKind::Tokens)
        else {
            continue;
        };
        let (module, fan_in_fan_out) = (step.module, step.fan_in_fan_out);
        let Some(rows) = &module.tokens else { continue };
        let table = weights::stored(model, graph, &job.cand)?;
        let mut originals = Vec::with_capacity(rows.indices.len());
        for &t in &rows.indices {
            originals.push(
                table.line(false, t).map_err(|e| {
                    Error::Target(format!("module '{}': token {t}: {e}", module.path))
                })?,
            );
        }
        let mut heads = Vec::new();
        let head_shaped = |c: &&Candidate| {
            c.is_linear()
                && c.out_features as usize == table.n_in
                && c.in_features as usize == table.n_out
        };
        for c in cands.iter().filter(head_shaped).filter(|c| c.quantized) {
            report.notes.push(format!(
                "{}: a quantized output layer of the table's shape; its values cannot be compared or changed, so if it is tied to '{}' (PEFT would then change its rows for these tokens too) the result differs from PEFT's there",
                if c.module.is_empty() { &c.node } else { &c.module },
                module.path
            ));
        }
        for c in cands.iter().filter(head_shaped).filter(|c| !c.quantized) {
            let own = jobs.iter().any(|j| {
                j.cand.graph == c.graph
                    && j.cand.node_index == c.node_index
                    && j.steps.iter().any(|s| s.module.kind == ModuleKind::Tokens)
            });
            if own {
                continue;
            }
            // Tied means equal at every token, not just at these: untrained rows (reserved
            // tokens, often all zero in both) are equal in untied models too. The token rows
            // and rows spread over the whole vocabulary must all match.
            // One shared tensor is tied; a copy must hold the table's rows.
            let same_tensor = c.graph == jobs[ji].cand.graph && c.source == jobs[ji].cand.source;
            let mut equal = true;
            if !same_tensor {
                let w = weights::stored(model, graph, c)?;
                let samples = (0..TIE_SAMPLES).map(|i| i * table.n_in / TIE_SAMPLES);
                for (t, orig) in rows
                    .indices
                    .iter()
                    .copied()
                    .zip(originals.iter().map(Some))
                    .chain(samples.map(|t| (t, None)))
                {
                    let want = match orig {
                        Some(o) => o.clone(),
                        None => table.line(false, t)?,
                    };
                    if w.line(true, t)? != want {
                        equal = false;
                        break;
                    }
                }
            }
            if equal {
                heads.push(c.clone());
            }
        }
        let emb = jobs[ji].cand.clone();
        let same = |h: &Candidate| h.graph == emb.graph && h.source == emb.source;
        let in_place = emb.shared
            && jobs[ji]
                .steps
                .iter()
                .all(|s| s.module.kind == ModuleKind::Tokens)
            && emb
                .shared_with
                .iter()
                .all(|n| heads.iter().any(|h| same(h) && h.node == *n));
        for h in &heads {
            report.notes.push(format!(
                "{}: its channels for the trainable tokens of '{}' equal the table's rows (tied embeddings): they take the new rows too, as PEFT's tied token adapter does",
                if h.module.is_empty() { &h.node } else { &h.module },
                module.path
            ));
        }
        if in_place {
            jobs[ji].cand.shared = false;
            heads.retain(|h| !same(h));
        }
        for h in heads {
            report.whole.push(WholeTarget {
                module: module.path.clone(),
                cand: h.clone(),
                packed: false,
                transposed: None,
                tied_head: true,
            });
            added.push((
                h,
                Step {
                    module,
                    scale: 1.0,
                    fan_in_fan_out,
                    role: None,
                    rows: None,
                },
            ));
        }
    }
    // After the layer's own steps (a LoRA on the output layer) when it has a job already.
    for (cand, step) in added {
        match jobs
            .iter_mut()
            .find(|j| j.cand.graph == cand.graph && j.cand.node_index == cand.node_index)
        {
            Some(j) => j.steps.push(step),
            None => jobs.push(Job {
                cand,
                steps: vec![step],
            }),
        }
    }
    Ok(())
}

/// A LoRA module with 2-D factors (a linear layer's).
fn is_linear_lora(m: &ModuleAdapter) -> bool {
    m.kind == ModuleKind::Lora && m.a.as_ref().is_some_and(|a| a.shape.len() == 2)
}

type Merged = (Arc<MergePlan>, ModuleReport, Option<BiasChange>);

/// What happens to a layer's bias: the channels of each `set` range take a trained bias the
/// adapter saved (modules_to_save, PEFT's `bias="all"` / `"lora_only"`; a range is one
/// projection's slice of a packed bias), then the whole bias gets `add` (lora_bias, scaled).
pub(crate) struct BiasChange {
    len: usize,
    set: Vec<(std::ops::Range<usize>, Vec<f32>)>,
    add: Option<Vec<f32>>,
}

impl BiasChange {
    fn new(len: usize) -> Self {
        BiasChange {
            len,
            set: Vec::new(),
            add: None,
        }
    }

    /// The new stored bias of a layer computing `beta·C` (Gemm; 1 elsewhere) whose stored bias
    /// is `old` (None: it has none).
    fn apply(&self, old: Option<&[f32]>, beta: f32) -> Vec<f32> {
        let mut b = old.map_or_else(|| vec![0.0; self.len], <[f32]>::to_vec);
        for (cols, v) in &self.set {
            for (x, v) in b[cols.clone()].iter_mut().zip(v) {
                *x = v / beta;
            }
        }
        if let Some(d) = &self.add {
            b.iter_mut().zip(d).for_each(|(x, d)| *x += d / beta);
        }
        b
    }

    /// Sets the trained bias of channels `cols`; an error when they already have one.
    fn set(
        &mut self,
        cols: std::ops::Range<usize>,
        values: &[f32],
        m: &ModuleAdapter,
        c: &Candidate,
    ) -> Result<()> {
        if self
            .set
            .iter()
            .any(|(r, _)| r.start < cols.end && cols.start < r.end)
        {
            return Err(Error::Target(format!(
                "module '{}': weight '{}' gets two trained biases",
                m.path, c.weight
            )));
        }
        self.set.push((cols, values.to_vec()));
        Ok(())
    }
}

/// One step of a merge with everything it needs owned, so the merge can run later.
enum OwnedStep {
    LowRank {
        a: Matrix,
        b: Matrix,
        scale: f32,
        /// DoRA magnitudes of the output channels in `cols`.
        magnitude: Option<Vec<f32>>,
        /// The output channels this step owns (a packed weight's slice; else all of them).
        cols: std::ops::Range<usize>,
    },
    Replace(Vec<f32>),
    /// A LyCORIS delta, computed densely when the weight is written, times `scale`.
    Dense {
        lycoris: crate::adapter::lycoris::Lycoris,
        scale: f32,
    },
    /// Trainable tokens: `values` (indices.len() × line length) replace the lines at `indices`
    /// of the output axis (`out`) or of the input axis (an embedding table's rows).
    Rows {
        indices: Vec<usize>,
        values: Vec<f32>,
        out: bool,
    },
}

/// A weight's merge, run when the model is written (`LazyTensor`).
pub(crate) struct MergePlan {
    weight: weights::StoredWeight,
    module: String,
    steps: Vec<OwnedStep>,
    max_abs_delta: DeltaCell,
}

impl LazyTensor for MergePlan {
    fn compute(&self, model: &LoadedModel) -> Result<bytes::Bytes> {
        let mut w = self.weight.decode()?;
        model.release(&self.weight.bytes);
        // A single plain low-rank step measures its own change; anything else compares with
        // a copy of the original.
        let single = matches!(
            self.steps.as_slice(),
            [OwnedStep::LowRank {
                magnitude: None,
                ..
            }]
        );
        let original = (!single).then(|| w.values.clone());
        let mut delta = 0f32;
        let mut all_finite = true;
        for (k, step) in self.steps.iter().enumerate() {
            match step {
                OwnedStep::Replace(values) => w.values.clone_from(values),
                OwnedStep::Dense { lycoris, scale } => {
                    let d = lycoris.delta()?;
                    let n_in = w.values.len() / w.n_out.max(1);
                    for (o, row) in d.chunks_exact(n_in.max(1)).enumerate() {
                        for (i, v) in row.iter().enumerate() {
                            w.values[w.orient.index(n_in, w.n_out, i, o)] += scale * v;
                        }
                    }
                }
                OwnedStep::Rows {
                    indices,
                    values,
                    out,
                } => {
                    let n_in = w.values.len() / w.n_out.max(1);
                    let len = if *out { n_in } else { w.n_out };
                    for (&k, line) in indices.iter().zip(values.chunks_exact(len.max(1))) {
                        for (i, v) in line.iter().enumerate() {
                            let (i_in, j_out) = if *out { (i, k) } else { (k, i) };
                            w.values[w.orient.index(n_in, w.n_out, i_in, j_out)] = *v;
                        }
                    }
                }
                OwnedStep::LowRank {
                    a,
                    b,
                    scale,
                    magnitude,
                    cols,
                } => {
                    let (d, finite) = add_low_rank(&mut w.values, w.orient, a, b, *scale);
                    delta = d;
                    all_finite &= finite;
                    if let Some(mag) = magnitude {
                        // PEFT's DoRA takes the norm of the base weight plus its own delta,
                        // and scales everything before it (the base and earlier adapters).
                        let norms = match &original {
                            Some(base) if k > 0 => {
                                let mut own = base.clone();
                                add_low_rank(&mut own, w.orient, a, b, *scale);
                                out_norms(&own, w.orient, w.n_out)
                            }
                            _ => out_norms(&w.values, w.orient, w.n_out),
                        };
                        let mut factor = vec![1f32; w.n_out];
                        for ((f, m), n) in factor[cols.clone()]
                            .iter_mut()
                            .zip(mag)
                            .zip(&norms[cols.clone()])
                        {
                            *f = m / n;
                        }
                        scale_out(&mut w.values, w.orient, &factor);
                    }
                }
            }
        }
        let bad = match &original {
            Some(orig) => {
                let (d, bad) = crate::tensor::max_abs_diff_finite(&w.values, orig);
                delta = d;
                bad
            }
            None if all_finite => None,
            None => w.values.par_iter().position_any(|v| !v.is_finite()),
        };
        if let Some(bad) = bad {
            return Err(Error::tensor(
                &self.weight.name,
                format!(
                    "module '{}': the merged weight has a non-finite value at element {bad} (NaN or Inf); nothing written",
                    self.module
                ),
            ));
        }
        let _ = self.max_abs_delta.0.set(delta);
        if w.dtype == crate::onnx::DataType::Float {
            return Ok(crate::tensor::f32_into_bytes(w.values));
        }
        // (A finite float32 can still round to Inf in a narrower type: refused there.)
        let bytes = encode_merged(
            &w.values,
            w.dtype,
            &self.weight.name,
            &self.module,
            "weight",
        )?;
        Ok(bytes.into())
    }
}

/// `from_f32` for a merged `what` ("weight", "bias") of `module`: a value beyond the stored
/// type's range is refused naming the module as well as the tensor.
fn encode_merged(
    values: &[f32],
    dtype: crate::onnx::DataType,
    tensor: &str,
    module: &str,
    what: &str,
) -> Result<Vec<u8>> {
    from_f32(values, dtype, tensor).map_err(|e| match e {
        Error::Tensor { tensor, reason } => Error::Tensor {
            tensor,
            reason: format!("module '{module}': the merged {what}'s {reason}; nothing written"),
        },
        other => other,
    })
}

/// Checks one node's steps against its weight and plans the merge (which runs at save time);
/// also returns the report and the bias delta (lora_bias), which are computed now.
fn plan_merge(model: &LoadedModel, graph: &ModelGraph, job: &Job) -> Result<Merged> {
    let c = &job.cand;
    if c.layout == Layout::Norm {
        return plan_norm(model, graph, job);
    }
    // (PEFT merges a LoHa / LoKr delta, shaped as the grouped weight, and whole values; it
    // refuses to merge LoRA factors there)
    if c.groups() > 1
        && job
            .steps
            .iter()
            .any(|s| matches!(s.module.kind, ModuleKind::Lora | ModuleKind::Embedding))
    {
        return Err(Error::Target(format!(
            "module '{}' ({}) is a grouped convolution (group > 1): folding LoRA into it is not supported (PEFT's merge refuses it too)",
            c.module, c.node
        )));
    }
    check_gemm_alpha(model, graph, c)?;
    let weight = weights::stored(model, graph, c)?;
    let mut rep = ModuleReport::of(c);
    let mut bias: Option<BiasChange> = None;
    let mut steps = Vec::new();
    let widths = packed_widths(c, job, weight.n_out)?;
    for step in &job.steps {
        let m = step.module;
        let cols = match (step.rows, step.role, widths) {
            (Some([s, e]), ..) if e <= weight.n_out && s < e => s..e,
            (Some(r), ..) => {
                return Err(Error::Target(format!(
                    "module '{}': rows {r:?} of weight '{}' ({} rows) are no rows of it",
                    m.path, c.weight, weight.n_out
                )));
            }
            (None, Some(role), Some(w)) => {
                let start: usize = w[..role].iter().sum();
                rep.packed.push(PackedSlice {
                    module: m.path.clone(),
                    projection: packed::ROLE_NAMES[role],
                    columns: [start, start + w[role]],
                });
                start..start + w[role]
            }
            _ => 0..weight.n_out,
        };
        if m.kind == ModuleKind::Full && step.role.is_some() && m.full.contains_key("weight") {
            return Err(Error::Target(format!(
                "module '{}': the adapter replaces the whole layer, but its weight is a slice of the packed weight '{}' ({}); replacing a slice is not supported",
                m.path, c.weight, c.node
            )));
        }
        // A LoRA module's saved base (`base_layer.weight`) must be this model's weight.
        if matches!(m.kind, ModuleKind::Lora | ModuleKind::Embedding)
            && step.role.is_none()
            && let Some(saved) = m.full.get("weight")
        {
            weights::check_saved_base(model, graph, c, &m.path, saved)?;
        }
        if m.kind == ModuleKind::Tokens {
            steps.push(token_rows(&weight, c, m)?);
            rep.replaced = true;
            rep.tokens
                .extend(m.tokens.iter().flat_map(|t| t.indices.iter().copied()));
            continue;
        }
        if m.kind == ModuleKind::Full {
            let alpha = gemm_alpha(model, graph, c);
            if let Some(mut values) = full_values(&weight, c, m, alpha)? {
                // Gemm computes alpha·x·W: the layer's weight W' is stored as W' / alpha.
                values.iter_mut().for_each(|v| *v /= alpha);
                steps.push(OwnedStep::Replace(values));
                rep.replaced = true;
            }
        }
        // A trained bias (modules_to_save; PEFT's bias="all" / "lora_only", saved as
        // `<module>.base_layer.bias` beside a LoRA) replaces the layer's.
        if let Some(b) = m.full.get("bias") {
            if b.data.len() != cols.len() {
                return Err(shape_err(c, m, "trained bias", &b.shape, cols.len()));
            }
            bias.get_or_insert_with(|| BiasChange::new(weight.n_out))
                .set(cols.clone(), &b.data, m, c)?;
            rep.bias_replaced = true;
        }
        if m.kind == ModuleKind::Full {
            continue;
        }
        if let Some(l) = &m.lycoris {
            l.check()
                .map_err(|e| Error::Target(format!("module '{}': {e}", m.path)))?;
            let (out, inn) = l.shape()?;
            if step.role.is_some() || out != weight.n_out || inn != weight.n_in {
                return Err(Error::Target(format!(
                    "module '{}': its {} delta is ({out}, {inn}) but weight '{}' ({} {:?}) is ({}, {})",
                    m.path,
                    l.name(),
                    c.weight,
                    c.op,
                    c.shape,
                    weight.n_out,
                    weight.n_in
                )));
            }
            let s = step.scale / gemm_alpha(model, graph, c);
            rep.rank = m.rank();
            rep.scale = s;
            rep.adapter_module = kohya_stem(m);
            rep.steps.push(StepReport {
                module: m.path.clone(),
                rank: rep.rank,
                scale: s,
            });
            steps.push(OwnedStep::Dense {
                lycoris: l.clone(),
                scale: s,
            });
            continue;
        }
        // Gemm computes alpha·x·W: the layer's delta is ΔW, so the weight takes ΔW / alpha.
        let alpha = gemm_alpha(model, graph, c);
        let s = step.scale / alpha;
        let (a, b) = super::factors(m, c, weight.n_in, cols.len())?;
        // A slice's B gets zero rows for the other projections' channels.
        let b = if cols.len() == weight.n_out {
            b
        } else {
            let mut padded = vec![0f32; weight.n_out * b.cols];
            padded[cols.start * b.cols..cols.end * b.cols].copy_from_slice(&b.data);
            Matrix::new(weight.n_out, b.cols, padded)?
        };
        let magnitude = match &m.magnitude {
            Some(mag) if mag.data.len() != cols.len() => {
                return Err(shape_err(
                    c,
                    m,
                    "lora_magnitude_vector",
                    &mag.shape,
                    cols.len(),
                ));
            }
            // The merge divides by the norm of the stored weight, W + (s / alpha)·B·A, which
            // is the layer's ‖alpha·W + s·B·A‖ / |alpha|: m / |alpha| gives PEFT's factor.
            Some(mag) => Some(mag.data.iter().map(|v| v / alpha.abs()).collect()),
            None => None,
        };
        rep.dora |= magnitude.is_some();
        if let Some(bb) = &m.bias_b {
            if bb.data.len() != cols.len() {
                return Err(shape_err(c, m, "lora_B.bias", &bb.shape, cols.len()));
            }
            let acc = bias
                .get_or_insert_with(|| BiasChange::new(weight.n_out))
                .add
                .get_or_insert_with(|| vec![0.0; weight.n_out]);
            // (the bias term s·b is the layer's own: alpha scales x·W only)
            acc[cols.clone()]
                .iter_mut()
                .zip(&bb.data)
                .for_each(|(x, y)| *x += step.scale * y);
        }
        rep.rank = m.rank();
        rep.scale = s;
        rep.adapter_module = kohya_stem(m);
        rep.steps.push(StepReport {
            module: m.path.clone(),
            rank: rep.rank,
            scale: s,
        });
        steps.push(OwnedStep::LowRank {
            a,
            b,
            scale: s,
            magnitude,
            cols,
        });
    }
    if !rep.packed.is_empty() {
        rep.module = rep
            .packed
            .iter()
            .map(|p| p.module.as_str())
            .collect::<Vec<_>>()
            .join(" + ");
    }
    let plan = MergePlan {
        weight,
        module: c.module.clone(),
        steps,
        max_abs_delta: rep.max_abs_delta.clone(),
    };
    if rep.steps.len() < 2 {
        rep.steps.clear();
    }
    Ok((Arc::new(plan), rep, bias))
}

/// A normalization layer's scale or bias (`norm::param`), replaced by the adapter's trained
/// values.
fn plan_norm(model: &LoadedModel, graph: &ModelGraph, job: &Job) -> Result<Merged> {
    let c = &job.cand;
    let name = norm::param(c).unwrap_or("weight");
    let weight = weights::stored(model, graph, c)?;
    let mut steps = Vec::new();
    for step in &job.steps {
        let m = step.module;
        let Some(t) = m.full.get(name) else { continue };
        if t.data.len() != weight.n_out {
            return Err(shape_err(
                c,
                m,
                &format!("trained {name}"),
                &t.shape,
                weight.n_out,
            ));
        }
        if !steps.is_empty() {
            return Err(Error::Target(format!(
                "module '{}': '{}' gets two trained values",
                m.path, c.weight
            )));
        }
        steps.push(OwnedStep::Replace(t.data.clone()));
    }
    let rep = ModuleReport {
        replaced: name == "weight",
        bias_replaced: name == "bias",
        ..ModuleReport::of(c)
    };
    let plan = MergePlan {
        weight,
        module: c.module.clone(),
        steps,
        max_abs_delta: rep.max_abs_delta.clone(),
    };
    Ok((Arc::new(plan), rep, None))
}

/// The q/k/v widths of a packed weight, when any step is a slice of it.
fn packed_widths(c: &Candidate, job: &Job, total: usize) -> Result<Option<[usize; 3]>> {
    let Some(p) = c
        .packed
        .as_ref()
        .filter(|_| job.steps.iter().any(|s| s.role.is_some()))
    else {
        return Ok(None);
    };
    let mut known = [None; 3];
    for step in &job.steps {
        if let (Some(role), Some(b)) = (step.role, &step.module.b) {
            let w = b.shape[0];
            if known[role].is_some_and(|k| k != w) {
                return Err(Error::Target(format!(
                    "modules for the {} projection of packed weight '{}' disagree on its width ({} and {w})",
                    packed::ROLE_NAMES[role],
                    c.weight,
                    known[role].unwrap_or(0)
                )));
            }
            known[role] = Some(w);
        }
    }
    let widths = packed::widths(p, total, known);
    match widths {
        Some(w) if known.iter().zip(w).all(|(k, w)| k.is_none_or(|k| k == w)) => Ok(Some(w)),
        _ => {
            let names: Vec<String> = job
                .steps
                .iter()
                .filter(|s| s.role.is_some())
                .map(|s| {
                    format!(
                        "{} ({} outputs)",
                        s.module.path,
                        s.module.b.as_ref().map_or(0, |b| b.shape[0])
                    )
                })
                .collect();
            Err(Error::Target(format!(
                "packed q/k/v weight '{}' ({} {:?}, {total} outputs{}) cannot be split to fit {}",
                c.weight,
                c.node,
                c.shape,
                p.widths
                    .map(|w| format!(", node sizes {w:?}"))
                    .unwrap_or_default(),
                names.join(", ")
            )))
        }
    }
}

pub(super) fn gemm_alpha(model: &LoadedModel, graph: &ModelGraph, c: &Candidate) -> f32 {
    graph
        .node(&model.proto, c.graph, c.node_index)
        .filter(|n| n.op_type() == "Gemm")
        .and_then(|n| n.attr_f("alpha"))
        .filter(|a| *a != 0.0)
        .unwrap_or(1.0)
}

/// Refuses a Gemm whose `alpha` is 0 or not finite: its weight is stored as W / alpha, which a
/// delta cannot be folded into.
pub(super) fn check_gemm_alpha(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
) -> Result<()> {
    let alpha = graph
        .node(&model.proto, c.graph, c.node_index)
        .filter(|n| n.op_type() == "Gemm")
        .and_then(|n| n.attr_f("alpha"));
    match alpha {
        Some(a) if a == 0.0 || !a.is_finite() => Err(Error::Target(format!(
            "module '{}' ({}): Gemm alpha = {a}, so its weight cannot take a delta",
            c.module, c.node
        ))),
        _ => Ok(()),
    }
}

fn shape_err(
    c: &Candidate,
    m: &ModuleAdapter,
    what: &str,
    shape: &[usize],
    expect: usize,
) -> Error {
    Error::Target(format!(
        "module '{}': adapter {what} has shape {shape:?} but weight '{}' ({} {:?}) needs {expect}",
        m.path, c.weight, c.op, c.shape
    ))
}

/// A trainable-tokens step on a weight: the rows of an embedding table, or the output channels
/// of a linear layer (an output layer tied to the table, or one the adapter names), checked
/// against the weight's size.
fn token_rows(w: &weights::StoredWeight, c: &Candidate, m: &ModuleAdapter) -> Result<OwnedStep> {
    let rows = m
        .tokens
        .as_ref()
        .ok_or_else(|| Error::Target(format!("module '{}': no token rows", m.path)))?;
    let out = !is_table(c);
    let (count, len) = if out {
        (w.n_out, w.n_in)
    } else {
        (w.n_in, w.n_out)
    };
    if rows.values.shape.get(1) != Some(&len) {
        return Err(shape_err(
            c,
            m,
            "trainable_tokens_delta",
            &rows.values.shape,
            len,
        ));
    }
    if let Some(t) = rows.indices.iter().find(|&&t| t >= count) {
        return Err(Error::Target(format!(
            "module '{}': token {t} is outside weight '{}' ({} {:?}: {count} tokens)",
            m.path, c.weight, c.op, c.shape
        )));
    }
    Ok(OwnedStep::Rows {
        indices: rows.indices.clone(),
        values: rows.values.data.clone(),
        out,
    })
}

/// The values of a whole-tensor replacement (`modules_to_save`) in the stored layout (see
/// `weights::saved_in_stored_layout`).
fn full_values(
    w: &weights::StoredWeight,
    c: &Candidate,
    m: &ModuleAdapter,
    alpha: f32,
) -> Result<Option<Vec<f32>>> {
    let Some(t) = m.full.get("weight") else {
        return Ok(None); // a replaced module's bias is not this weight
    };
    if t.data.len() != w.n_in * w.n_out {
        return Err(Error::Target(format!(
            "module '{}': the adapter's full weight has shape {:?} but the model's '{}' is {:?} (resized layers cannot be folded into a fixed graph)",
            m.path, t.shape, c.weight, c.shape
        )));
    }
    // (compared with the weight the layer applies: a Gemm's alpha·W)
    weights::saved_in_stored_layout(c, w.orient, t, || {
        Ok(w.decode()?
            .values
            .iter()
            .map(|v| v * alpha)
            .collect::<Vec<f32>>())
    })
    .map(Some)
}

/// Where a node's bias is, as (node index, input index, value): Gemm's C and Conv's and
/// Attention's input 2, or for a MatMul the constant its only consumer adds: an Add, or an
/// onnxruntime fusion that took the bias in (SkipLayerNormalization's bias, BiasGelu's /
/// FastGelu's bias, BiasDropout's bias).
fn bias_value(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
) -> Option<(usize, usize, String)> {
    let node = graph.node(&model.proto, c.graph, c.node_index)?;
    match c.op.as_str() {
        "Gemm" | "Conv" | "Attention" => node
            .input
            .get(2)
            .filter(|v| !v.is_empty())
            .map(|v| (c.node_index, 2, v.clone())),
        _ => {
            let o = node.output.first()?;
            let [u] = graph.graphs[c.graph].consumers_of(o) else {
                return None;
            };
            let user = graph.node(&model.proto, c.graph, *u)?;
            let at = user.input.iter().position(|i| i == o)?;
            let k = match (user.op_type(), user.domain(), at) {
                ("Add", "", 0 | 1) => 1 - at,
                ("SkipLayerNormalization", "com.microsoft", 0 | 1) => 4,
                ("SkipSimplifiedLayerNormalization", "com.microsoft", 0 | 1) => 3,
                ("BiasGelu" | "FastGelu" | "BiasDropout", "com.microsoft", 0) => 1,
                _ => return None,
            };
            let v = user.input.get(k).filter(|v| !v.is_empty())?;
            bias_source(model, graph, c.graph, v).map(|_| (*u, k, v.clone()))
        }
    }
}

/// The constant behind a bias value: itself, or through Identity nodes (TorchScript reads a
/// deduplicated tensor that way); and whether it was behind Identity nodes.
fn bias_source(
    model: &LoadedModel,
    graph: &ModelGraph,
    gi: usize,
    value: &str,
) -> Option<(crate::graph::ConstSource, bool)> {
    let view = &graph.graphs[gi];
    let mut v = value.to_string();
    let mut behind = false;
    // (at most one step per node: a malformed cycle of Identity nodes ends the walk)
    for _ in 0..=view.producer.len() {
        if let Some(src) = graph.const_source(&model.proto, gi, &v) {
            return Some((src, behind));
        }
        let node = graph.node(&model.proto, gi, *view.producer.get(&v)?)?;
        if node.op_type() != "Identity" {
            return None;
        }
        v = node.input.first()?.clone();
        behind = true;
    }
    None
}

/// The layer's bias as it adds it (Gemm's beta·C), None where it has none onnx-lora can read.
pub(crate) fn current_bias(
    model: &LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
) -> Option<Vec<f32>> {
    let (_, _, value) = bias_value(model, graph, c)?;
    let (src, _) = bias_source(model, graph, c.graph, &value)?;
    let t = graph.const_tensor(&model.proto, &src)?;
    let dtype = crate::onnx::DataType::from_i32(t.data_type());
    let mut b = crate::tensor::to_f32(&model.tensor_bytes(t).ok()?, dtype, t.name()).ok()?;
    let beta = gemm_beta(model, graph, c);
    b.iter_mut().for_each(|v| *v *= beta);
    Some(b)
}

/// Gemm computes beta·C: a bias delta d goes in as d / beta.
fn gemm_beta(model: &LoadedModel, graph: &ModelGraph, c: &Candidate) -> f32 {
    graph
        .node(&model.proto, c.graph, c.node_index)
        .filter(|n| n.op_type() == "Gemm")
        .and_then(|n| n.attr_f("beta"))
        .filter(|b| *b != 0.0)
        .unwrap_or(1.0)
}

/// Applies a bias change to the layer's existing bias: in place, or on a private copy when
/// other nodes read the same tensor. Returns false when the layer has no bias (the caller then
/// creates one).
fn apply_bias(
    model: &mut LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
    change: &BiasChange,
    taken: &mut HashSet<String>,
) -> Result<bool> {
    let Some((user, input, value)) = bias_value(model, graph, c) else {
        return Ok(false);
    };
    let Some((src, behind_identity)) = bias_source(model, graph, c.graph, &value) else {
        return Ok(false);
    };
    let t = graph
        .const_tensor(&model.proto, &src)
        .ok_or_else(|| Error::tensor(&c.weight, "bias not found"))?;
    let dtype = crate::onnx::DataType::from_i32(t.data_type());
    let old = crate::tensor::to_f32(&model.tensor_bytes(t)?, dtype, t.name())?;
    if old.len() != change.len {
        return Err(Error::Target(format!(
            "module '{}': the layer's bias has {} values, the adapter's {}",
            c.module,
            old.len(),
            change.len
        )));
    }
    let b = change.apply(Some(&old), gemm_beta(model, graph, c));
    let module = if c.module.is_empty() {
        &c.node
    } else {
        &c.module
    };
    let raw = encode_merged(&b, dtype, t.name(), module, "bias")?;
    // A bias tensor other nodes read too (identical values deduplicated by an exporter or
    // optimizer) is copied for this node, so only its bias changes.
    // (a bias read through Identity nodes, an exporter's deduplicated tensor, gets a copy that
    // the node reads directly)
    let shared = behind_identity || graph.graphs[c.graph].consumers_of(&value).len() > 1;
    let base = if c.module.is_empty() {
        format!("{}.bias", c.node)
    } else {
        format!("{}.bias", c.module)
    };
    let bias_cand = Candidate {
        source: Some(src),
        shared,
        module: String::new(),
        weight: base,
        node_index: user,
        weight_input: input,
        chain: Vec::new(),
        ..c.clone()
    };
    weights::write(
        model,
        graph,
        &bias_cand,
        weights::TensorData::Raw(raw),
        taken,
    )?;
    Ok(true)
}

/// Gives a bias-less layer the bias `values`: Gemm's C / Conv's B input, or an Add after a
/// MatMul (which takes over the MatMul's output name). The node is found by its output name,
/// since earlier insertions in this pass may have moved it.
fn create_bias(
    model: &mut LoadedModel,
    graph: &ModelGraph,
    c: &Candidate,
    values: &[f32],
    taken: &mut HashSet<String>,
) -> Result<()> {
    let dtype = graph
        .const_tensor(
            &model.proto,
            c.source
                .as_ref()
                .ok_or_else(|| Error::tensor(&c.weight, "weight not found"))?,
        )
        .map(|t| crate::onnx::DataType::from_i32(t.data_type()))
        .unwrap_or(crate::onnx::DataType::Float);
    let y = graph
        .node(&model.proto, c.graph, c.node_index)
        .and_then(|n| n.output.first().cloned())
        .ok_or_else(|| Error::tensor(&c.weight, "node not found"))?;
    let base = if c.module.is_empty() {
        c.node.clone()
    } else {
        c.module.clone()
    };
    let name = weights::unique_name(&format!("{base}.bias.lora_folded"), taken);
    let tensor = super::branch::initializer(&name, &[values.len() as i64], values, dtype)?;
    let gp = graph.graphs[c.graph]
        .loc
        .get_mut(&mut model.proto)
        .ok_or_else(|| Error::tensor(&c.weight, "graph not found"))?;
    let at = gp
        .node
        .iter()
        .position(|n| n.output.first() == Some(&y))
        .ok_or_else(|| Error::tensor(&c.weight, "node not found"))?;
    gp.initializer.push(tensor);
    if c.op == "MatMul" {
        let pre = weights::unique_name(&format!("{y}.before_bias"), taken);
        gp.node[at].output[0] = pre.clone();
        let add = crate::onnx::pb::NodeProto {
            input: vec![pre, name],
            output: vec![y],
            name: Some(weights::unique_name(
                &format!("{}.lora_bias_add", gp.node[at].name()),
                taken,
            )),
            op_type: Some("Add".into()),
            domain: Some(String::new()),
            ..Default::default()
        };
        gp.node.insert(at + 1, add);
    } else {
        let node = &mut gp.node[at];
        node.input.resize(3, String::new());
        node.input[2] = name;
        if c.op == "Gemm" {
            // The new C is the delta itself: make beta 1 so it adds once.
            node.attribute.retain(|a| a.name() != "beta");
        }
    }
    Ok(())
}
