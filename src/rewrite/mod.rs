//! Rewrites, each a pass over the model: `fold` merges adapters into weight initializers,
//! `inject` adds low-rank branches beside targeted nodes (built by `branch`; in weight space,
//! merged by onnxruntime at load, by `weight_form`), `unbranch` folds
//! injected branches back, `export` writes adapters out of injected models (`whole_record`
//! keeps what inject wrote into the weights for it), `gate` puts a
//! serving model's graph behind the idle gate (and takes it off).
//! Passes decide on the read-only graph view, then edit the proto.

pub mod branch;
pub mod export;
pub mod fold;
pub mod fuse;
pub mod gate;
pub mod inject;
pub mod unbranch;
pub mod weight_form;
pub(crate) mod weights;
pub mod whole_record;

pub use export::{export_peft, serving_adapter_params};
pub use fold::{FoldOptions, FoldReport, ModuleReport, fold};
pub use fuse::fuse_shared;
pub use gate::{gate, is_gated, ungate};
pub use inject::{
    BranchReport, BranchSpec, Init, adapter_branches, check_one_branch_per_module, fresh_branches,
    inject, unmerged_reference, write_whole_values,
};
pub use unbranch::{count_injected, fold_branches};
pub use weight_form::inject_weight;
pub use weights::same_values;

use crate::adapter::{Adapter, ModuleAdapter, ModuleKind, kohya, sgm};
use crate::error::{Error, Result};
use crate::graph::ModelGraph;
use crate::onnx::LoadedModel;
use crate::target::Candidate;
use crate::tensor::Matrix;

/// The note for a low-rank module on a Conv whose module pads its input other than with
/// zeros (`Candidate::inner_pad`), where PEFT's forward and its merge disagree.
pub fn inner_pad_note(path: &str, c: &Candidate, fresh: bool) -> Option<String> {
    let pad = c.inner_pad.as_deref()?;
    Some(if fresh {
        format!(
            "module '{path}': the layer pads its input itself ({pad}), and PEFT's LoRA conv pads the same input with zeros: this branch reads the layer's padding, so PEFT, given it back by export-peft, computes other values near the borders than this model (its merge_and_unload computes this model's)"
        )
    } else {
        format!(
            "module '{path}': the layer pads its input itself ({pad}), and PEFT's LoRA conv pads the same input with zeros, so PEFT's forward differs from its merge_and_unload near the borders; onnx-lora computes the merge (W + s·ΔW with the layer's padding), in fold and inject alike"
        )
    })
}

/// Which candidates' weights an adapter module may adapt: embeddings are tables (Gather,
/// onnxruntime's EmbedLayerNormalization), 2-D LoRA factors linear layers (and onnxruntime's
/// Attention projection), 4-D ones convolutions; whole tensors any float weight; token rows
/// tables and (untied output layers named in the config) linear layers; LyCORIS deltas linear
/// layers and convolutions (their shape decides at the merge). `inject`
/// also needs the candidate to be `branchable`.
pub(crate) fn accepts(m: &ModuleAdapter, c: &Candidate) -> bool {
    if mha_out_proj_alone(m, c) {
        return false;
    }
    // (PEFT's LoRA on a MultiheadAttention adapts the attention's packed in-projection and its
    // out_proj, as onnx-lora finds them; nothing else in its scope)
    if m.mha_in_proj
        && (c.mha != Some(crate::target::MhaPart::InProj) || c.mha_rows != m.in_proj_rows)
        || m.mha_outer.is_some() && c.mha != Some(crate::target::MhaPart::OutProj)
    {
        return false;
    }
    if parameter_layout_unknown(m, c) {
        return false;
    }
    match m.kind {
        ModuleKind::Embedding => matches!(c.op.as_str(), "Gather" | "EmbedLayerNormalization"),
        ModuleKind::Lora => match m.a.as_ref().map(|a| a.shape.len()) {
            Some(2) => c.is_linear() || c.op == "Attention",
            _ => c.op == "Conv",
        },
        ModuleKind::Full => c.op != "MatMulNBits",
        ModuleKind::Lycoris => c.is_linear() && c.op != "MatMulNBits" || c.op == "Conv",
        ModuleKind::Tokens => {
            matches!(c.op.as_str(), "Gather" | "EmbedLayerNormalization")
                || (c.is_linear() && c.op != "MatMulNBits")
        }
    }
}

/// A module targeted through `target_parameters` whose layer onnx-lora cannot take as a
/// Linear's: PEFT's update is W + s·B·A on the parameter as stored, which acts as a Linear's
/// only where the module computes x·Wᵀ with it (a Linear, a MoE router). A layer reading the
/// weight through a Transpose (or a Gemm with transB) shows that; one reading a square weight
/// as stored (`[in, out]`) shows it only where a MatMul reads an exporter's folded transpose
/// (`onnx::MatMul_N`, `val_N`), since x·W (GPT-2's Conv1D) reads the parameter
/// itself (a non-square one that does not fit is refused by its shape). An embedding table's
/// parameter is refused too: its factors are laid out as a Linear's, not as an embedding's.
fn parameter_layout_unknown(m: &ModuleAdapter, c: &Candidate) -> bool {
    if !m.via_parameter {
        return false;
    }
    if matches!(c.op.as_str(), "Gather" | "EmbedLayerNormalization") {
        return true;
    }
    // (TorchScript's transposed copy for a MatMul of x·Wᵀ, dynamo's folded constants; a Gemm
    // reading its weight as stored computes x·W: addmm, GPT-2's Conv1D)
    let folded = c.op == "MatMul"
        && ["onnx::MatMul_", "val_", "_val_"]
            .iter()
            .any(|p| c.weight.starts_with(p));
    c.layout == crate::target::Layout::InOut
        && c.shape.len() == 2
        && c.shape[0] == c.shape[1]
        && !folded
}

/// A low-rank module on a torch `nn.MultiheadAttention`'s out_proj Linear that is not part of
/// PEFT's LoRA on the attention module (`ModuleAdapter::mha_outer`): the attention never calls
/// that Linear, so PEFT's forward never runs its LoRA.
fn mha_out_proj_alone(m: &ModuleAdapter, c: &Candidate) -> bool {
    c.mha == Some(crate::target::MhaPart::OutProj)
        && m.mha_outer.is_none()
        && matches!(m.kind, ModuleKind::Lora | ModuleKind::Lycoris)
}

/// Why module `m` found nothing at `path` when a layer there is of another kind than its
/// factors are for (a conv-shaped lora_A on a MatMul): that layer and the factors' shapes, for
/// the message; None when no layer of any kind has the path.
pub(crate) fn kind_mismatch(m: &ModuleAdapter, cands: &[Candidate], path: &str) -> Option<String> {
    if let Some(c) = cands.iter().find(|c| {
        parameter_layout_unknown(m, c) && crate::target::select::name_matches(&c.module, path)
    }) {
        return Some(
            if matches!(c.op.as_str(), "Gather" | "EmbedLayerNormalization") {
                format!(
                    "module '{path}' is adapted through target_parameters on the embedding table '{}' that {} reads: onnx-lora applies target_parameters to weights a MatMul / Gemm reads; target the module (target_modules) for an embedding LoRA",
                    c.weight, c.node
                )
            } else {
                format!(
                    "module '{path}' is adapted through target_parameters, and {} reads its square weight '{}' as stored, with nothing showing whether the module computes x·Wᵀ with it (a Linear, a router) or x·W (GPT-2's Conv1D); PEFT's W + s·B·A on the parameter acts differently in the two, so onnx-lora refuses rather than guess",
                    c.node, c.weight
                )
            },
        );
    }
    if let Some(c) = cands
        .iter()
        .find(|c| mha_out_proj_alone(m, c) && crate::target::select::name_matches(&c.module, path))
    {
        let outer = c.other_paths.first().map_or("", String::as_str);
        return Some(format!(
            "module '{path}' is the out_proj of the torch.nn.MultiheadAttention '{outer}', which calls that Linear's weight itself: PEFT's forward never runs a LoRA on the Linear (its merge_and_unload would merge it; the two disagree), and only PEFT's LoRA on the attention module adapts the out_proj (nested at '{outer}.base_layer.out_proj'); train without the out_proj in target_modules"
        ));
    }
    if let (false, None, Some((c, _))) = (m.mha_in_proj, &m.mha_outer, parent_reader(cands, path)) {
        return Some(format!(
            "module '{path}' has no layer of its own in the export: its parent '{}' reads the layer's weight '{}' itself ({} {}). Where the parent reads the weight (`F.linear(x, self.layer.weight)`), PEFT's forward never runs this LoRA and --allow-unmatched leaves it out as PEFT does; where it calls the layer's forward directly (`self.layer.forward(x)`), PEFT runs it, and the export cannot tell the two apart",
            c.module, c.weight, c.op, c.node
        ));
    }
    // (where a layer at the path is the part the module adapts, the lookup's own error says
    // what went wrong)
    let part = if m.mha_in_proj {
        crate::target::MhaPart::InProj
    } else {
        crate::target::MhaPart::OutProj
    };
    let part_there = || {
        cands
            .iter()
            .any(|c| c.mha == Some(part) && crate::target::select::matches_path(&c.module, path))
    };
    if m.mha_outer.is_some() || m.mha_in_proj {
        if part_there() {
            return None;
        }
        let outer = path.strip_suffix(".out_proj").unwrap_or(path);
        let which = if m.mha_in_proj {
            "packed in-projection"
        } else {
            "out_proj"
        };
        return Some(format!(
            "module '{path}' is the {which} of PEFT's LoRA on the torch.nn.MultiheadAttention '{outer}', which this export does not show as onnx-lora finds one: a layer computing its packed q/k/v (E → 3E) in the scope '{outer}', or a cross-attention's two (its query E → E and its key and value E → 2E: a weight each, as the TorchScript exporter writes them, or rows of the packed weight through a Split, as the dynamo exporter does, or through Slices by bounds computed from the query's shape, as the TorchScript exporter with dynamic axes does), and an E → E layer whose weight is named '{outer}.out_proj.weight' (a TorchScript export of an attention without biases renames it; the dynamo exporter keeps it)"
        ));
    }
    // The dynamo exporter names a layer with a BatchNorm folded in after the BatchNorm; its
    // weight keeps the layer's parameter name.
    let folded = cands.iter().find(|c| {
        c.norm_folded
            && c.weight
                .strip_suffix(".weight")
                .is_some_and(|w| crate::target::select::name_matches(w, path))
    });
    if let Some(c) = folded {
        return Some(crate::target::norm_folded_refusal(path, c));
    }
    let c = crate::target::resolve_module(cands, path, |c| !accepts(m, c), |_, _| true).ok()?[0];
    let shapes = match (&m.a, &m.b) {
        (Some(a), Some(b)) => format!("its factors have shapes A {:?}, B {:?}", a.shape, b.shape),
        _ => format!("it holds {}", m.keys.join(", ")),
    };
    Some(format!(
        "module '{path}' is {} {} (weight '{}' {:?}), which the adapter's module does not fit: {shapes}",
        c.op, c.node, c.weight, c.shape
    ))
}

/// A module's A (r, in) and B (out, r) as matrices, checked against a weight with `n_in`
/// inputs (times the kernel size for convolutions) and `n_out` outputs. For a grouped Conv
/// PEFT's B is itself grouped: (out, r / groups), each group of outputs reading its slice of
/// the r channels A gives.
pub(crate) fn factors(
    m: &ModuleAdapter,
    c: &Candidate,
    n_in: usize,
    n_out: usize,
) -> Result<(Matrix, Matrix)> {
    let (Some(a), Some(b)) = (&m.a, &m.b) else {
        return Err(Error::Target(format!(
            "module '{}': missing lora_A or lora_B",
            m.path
        )));
    };
    if a.shape.len() < 2 || b.shape.len() < 2 {
        return Err(Error::Target(format!(
            "module '{}': lora_A {:?} and lora_B {:?} must have at least 2 dimensions",
            m.path, a.shape, b.shape
        )));
    }
    let r = a.shape[0];
    let a_cols: usize = a.shape[1..].iter().product();
    let b_cols: usize = b.shape[1..].iter().product();
    let groups = c.groups();
    // A conv's lora_A has the layer's kernel and lora_B a 1×1 one (PEFT refuses others); the
    // flattened sizes alone could match another kernel's.
    let conv_kernels_fit = c.op != "Conv"
        || ((a.shape.len() == 2
            || a.shape[2..]
                .iter()
                .map(|&d| d as i64)
                .eq(c.shape[2..].iter().copied()))
            && b.shape.iter().skip(2).all(|&d| d == 1));
    if a_cols != n_in || b.shape[0] != n_out || b_cols * groups != r || !conv_kernels_fit {
        // (a module `adapter::bfl` renamed, or a share of a fused one: as the file names it)
        let from = m
            .renamed_from()
            .map(|stem| format!(" (from the file's module '{stem}')"))
            .unwrap_or_default();
        return Err(Error::Target(format!(
            "module '{}'{from}: lora_A {:?} and lora_B {:?} do not fit weight '{}' ({} {:?}: {n_in} in, {n_out} out)",
            m.path, a.shape, b.shape, c.weight, c.op, c.shape
        )));
    }
    Ok((
        Matrix::new(r, a_cols, a.data.clone())?,
        Matrix::new(b.shape[0], b_cols, b.data.clone())?,
    ))
}

/// The most values one adapter tensor may declare for `model` ([`crate::adapter::peft::tensor_limit`]
/// of the largest tensor it stores: initializers and Constant values, in subgraphs too), for
/// [`Adapter::load_within`].
pub fn adapter_tensor_limit(model: &LoadedModel) -> usize {
    fn largest(g: &crate::onnx::pb::GraphProto) -> usize {
        let numel = |t: &crate::onnx::pb::TensorProto| crate::onnx::pb_ext::numel(&t.dims);
        let own = g.initializer.iter().map(numel).max().unwrap_or(0);
        let in_nodes = g
            .node
            .iter()
            .flat_map(|n| &n.attribute)
            .map(|a| {
                let t = a.t.as_ref().map_or(0, numel);
                let sub = a.g.iter().chain(&a.graphs).map(largest).max().unwrap_or(0);
                t.max(sub)
            })
            .max()
            .unwrap_or(0);
        own.max(in_nodes)
    }
    crate::adapter::peft::tensor_limit(model.proto.graph.as_ref().map_or(0, largest))
}

/// Settles `adapter.root` for the whole adapter (see `target::export_root`; the user's `--root`
/// stands), so that its parts (the low-rank part inject branches, the whole values written
/// into the weights, `fold --verify`'s reference) all look its modules up under one root. A
/// kohya file has no root; its modules named by Flux's original model are mapped onto a
/// diffusers Flux export here (`adapter::bfl`); of a diffusers file, the part that is the
/// model is taken (`adapter::diffusers`). Every command calls it once per adapter, after
/// loading it and before anything binds its modules; `alone`: no other adapter is applied
/// with it (see `drop_unchanged_values`). Returns what it left out of the adapter (for
/// warnings).
pub fn settle_root(model: &LoadedModel, adapter: &mut Adapter, alone: bool) -> Result<Vec<String>> {
    if adapter.modules.iter().any(|m| m.part.is_some()) {
        // kohya modules are bound to the model's paths instead
        if let Some(r) = &adapter.root {
            return Err(Error::Usage(format!(
                "{}: --root '{r}' applies to PEFT adapters; a kohya file's modules are found by their own names",
                adapter.path.display()
            )));
        }
    }
    let graph = ModelGraph::build(&model.proto);
    let mut cands = crate::target::find_candidates(&model.proto, &graph);
    if adapter.modules.iter().any(|m| m.part.is_some()) {
        // Flux's original module names onto a diffusers Flux export (fused layers split).
        crate::adapter::bfl::map_onto(adapter, &crate::target::select::module_paths_in(&cands))?;
        return Ok(Vec::new());
    }
    // (a diffusers file: the part that is this model, as diffusers loads it)
    let left_out = crate::adapter::diffusers::settle(
        adapter,
        &cands,
        &crate::target::select::module_paths_in(&cands),
    )?;
    cands.extend(crate::target::norm::find_norm_params(&model.proto, &graph));
    let paths: Vec<&str> = adapter.modules.iter().map(|m| m.path.as_str()).collect();
    let forced = adapter.root.is_some();
    adapter.root = crate::target::export_root(&paths, &cands, adapter.root.as_deref())?;
    if let (false, Some(root)) = (forced, &adapter.root)
        && let Some(why) = crate::target::part::not_the_part(
            root,
            &model.proto,
            &graph,
            &cands,
            adapter.config.raw.get("task_type").and_then(|t| t.as_str()) == Some("CAUSAL_LM"),
        )
    {
        let root = root.trim_end_matches('.');
        return Err(Error::InvalidModel {
            path: model.path.clone(),
            reason: format!(
                "the adapter's modules fit this file under '{root}' (its module paths lack that prefix), but nothing shows the file is that part: {why}. If it is another part, this adapter does not change it; if it is '{root}', say so with --root {root}"
            ),
        });
    }
    saved_modules_to_save(&cands, adapter)?;
    // (a bias saved beside a LoRA, or a whole weight, that the layer already has is no
    // trained value)
    drop_unchanged_values(model, &graph, &cands, adapter, alone)?;
    let mut left_out = left_out;
    left_out.extend(drop_unrun_modules(adapter, &cands)?);
    split_in_proj(adapter, &cands)?;
    Ok(left_out)
}

/// Splits PEFT's module on a torch `nn.MultiheadAttention` whose export computes the
/// in-projection as layers of their own (a cross-attention, or a query, key and value
/// projected apart: `Candidate::mha_rows`) into one module per layer: the attention's A, and
/// its rows of B and of a trained weight or bias (PEFT merges `B·A` into the packed
/// `in_proj_weight`, whose rows the attention then splits between its layers). Each part is
/// found only by its layer (`accepts`).
fn split_in_proj(adapter: &mut Adapter, cands: &[Candidate]) -> Result<()> {
    use crate::target::MhaPart;
    if !cands.iter().any(|c| c.mha_rows.is_some()) {
        return Ok(());
    }
    let (paths, _) = module_paths(adapter, cands)?;
    let mut out = Vec::with_capacity(adapter.modules.len());
    for (m, path) in std::mem::take(&mut adapter.modules).into_iter().zip(paths) {
        let whole = m.in_proj_rows.is_none()
            && m.mha_outer.is_none()
            && (m.mha_in_proj && m.kind == ModuleKind::Lora || m.kind == ModuleKind::Full);
        let layers: Vec<&Candidate> = match (&path, whole) {
            (Some(p), true) => cands
                .iter()
                .filter(|c| {
                    c.mha == Some(MhaPart::InProj)
                        && crate::target::select::name_matches(&c.module, p)
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut rows: Vec<[usize; 2]> = layers.iter().filter_map(|c| c.mha_rows).collect();
        if !rows.is_empty()
            && let Some(packed) = layers.iter().find(|c| c.mha_rows.is_none())
        {
            return Err(Error::Adapter {
                path: adapter.path.clone(),
                reason: format!(
                    "module '{}' is PEFT's LoRA on a torch.nn.MultiheadAttention whose calls compute its in-projection in different forms: packed in one layer ({}) in one call, in parts (a query, key or value apart) in another; onnx-lora cannot merge one LoRA into both; merge the adapter in torch, or export each call's use apart",
                    m.path, packed.node
                ),
            });
        }
        rows.sort_unstable();
        rows.dedup();
        if rows.is_empty() {
            out.push(m);
            continue;
        }
        let total = rows.iter().map(|r| r[1]).max().unwrap_or(0);
        for r in rows {
            out.push(in_proj_part(&m, r, total).map_err(|reason| Error::Adapter {
                path: adapter.path.clone(),
                reason,
            })?);
        }
    }
    adapter.modules = out;
    Ok(())
}

/// Module `m` (on a whole packed in-projection of `total` = 3E rows) restricted to rows
/// `[s, e)`.
fn in_proj_part(
    m: &ModuleAdapter,
    [s, e]: [usize; 2],
    total: usize,
) -> std::result::Result<ModuleAdapter, String> {
    use crate::adapter::peft::F32Tensor;
    let what = if m.kind == ModuleKind::Full {
        "trained"
    } else {
        "LoRA"
    };
    if m.magnitude.is_some() || m.bias_b.is_some() || m.lycoris.is_some() || m.tokens.is_some() {
        return Err(format!(
            "module '{}' is on a torch.nn.MultiheadAttention whose export computes the in-projection in parts (a cross-attention), and onnx-lora splits only a LoRA's B and trained weights and biases by rows there (no DoRA, lora_B bias, LoHa / LoKr)",
            m.path
        ));
    }
    let rows = |t: &F32Tensor, key: &str| -> std::result::Result<F32Tensor, String> {
        let have = t.shape.first().copied().unwrap_or(0);
        let per: usize = t.shape.iter().skip(1).product();
        if have != total {
            return Err(format!(
                "module '{}': its {key} has {have} rows, where the attention's packed in-projection has {total} (this export computes rows {s}-{e} of them in one layer)",
                m.path
            ));
        }
        let mut shape = t.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = e - s;
        }
        Ok(F32Tensor {
            data: t.data[s * per..e * per].to_vec(),
            shape,
        })
    };
    let mut part = m.clone();
    if let Some(b) = &m.b {
        part.b = Some(rows(b, "lora_B")?);
    }
    for (key, t) in &m.full {
        if matches!(key.as_str(), "weight" | "bias") {
            part.full
                .insert(key.clone(), rows(t, &format!("{what} {key}"))?);
        }
    }
    part.in_proj_rows = Some([s, e]);
    part.mha_in_proj = true;
    Ok(part)
}

/// Takes out of the adapter the low-rank modules that PEFT loads but whose LoRA its forward
/// never runs, because the layer's parent reads the layer's weight itself instead of calling
/// the layer: torch's `MultiheadAttention` and its `out_proj` Linear (found as onnx-lora finds
/// such an attention, or where the export shows a parent scope reading a weight named after
/// the layer, as a cross-attention's export does). PEFT's `merge_and_unload` would merge such
/// a LoRA, so its forward and its merge disagree; onnx-lora follows the forward, which the
/// adapter was trained with. Returns what was taken out, for warnings; an adapter holding
/// nothing else is refused.
fn drop_unrun_modules(adapter: &mut Adapter, cands: &[Candidate]) -> Result<Vec<String>> {
    if adapter.modules.iter().any(|m| m.part.is_some()) {
        return Ok(Vec::new());
    }
    let (paths, _) = module_paths(adapter, cands)?;
    let why: Vec<Option<String>> = adapter
        .modules
        .iter()
        .zip(&paths)
        .map(|(m, path)| unrun_by_peft(m, cands, path.as_deref()?))
        .collect();
    let dropped: Vec<String> = why.iter().flatten().cloned().collect();
    if dropped.is_empty() {
        return Ok(dropped);
    }
    if dropped.len() == adapter.modules.len() {
        return Err(Error::Adapter {
            path: adapter.path.clone(),
            reason: format!(
                "holds no module whose LoRA PEFT's forward runs: {}",
                dropped.join("; ")
            ),
        });
    }
    let mut why = why.into_iter();
    adapter.modules.retain(|_| why.next().flatten().is_none());
    Ok(dropped)
}

/// Why PEFT's forward never runs module `m` (at `path` in the export), if it does not (see
/// [`drop_unrun_modules`]).
fn unrun_by_peft(m: &ModuleAdapter, cands: &[Candidate], path: &str) -> Option<String> {
    use crate::target::select::name_matches;
    if m.via_parameter
        || m.mha_in_proj
        || m.mha_outer.is_some()
        || !matches!(
            m.kind,
            ModuleKind::Lora | ModuleKind::Lycoris | ModuleKind::Embedding
        )
    {
        return None;
    }
    let what = format!("module '{}' ({})", m.path, m.keys.join(", "));
    let forward = "so PEFT's forward never runs this LoRA (its merge_and_unload would merge it; the two disagree): left out, as the forward the adapter was trained with leaves it out";
    if let Some(c) = cands
        .iter()
        .find(|c| mha_out_proj_alone(m, c) && name_matches(&c.module, path))
    {
        let outer = c.other_paths.first().map_or("", String::as_str);
        return Some(format!(
            "{what}: the torch.nn.MultiheadAttention '{outer}' reads its out_proj Linear's weight itself instead of calling the Linear ({} {}), {forward} (only PEFT's LoRA on the attention module adapts the out_proj)",
            c.op, c.node
        ));
    }
    let (first, layer) = parent_reader(cands, path)?;
    // (a parent calling the layer's forward directly, `self.fc.forward(x)`, shows the same in
    // an export, and there PEFT runs the LoRA: only an attention of torch's, which reads its
    // out_proj's weight, is taken as one that does not; dynamo records its class)
    let mha = match &first.module_class {
        Some(k) => k.ends_with("MultiheadAttention"),
        None => layer.rsplit('.').next() == Some("out_proj"),
    };
    if !mha {
        return None;
    }
    Some(format!(
        "{what}: its parent '{}' (a torch.nn.MultiheadAttention) reads the layer's weight '{}' itself ({} {}) instead of calling the layer, {forward}",
        first.module, first.weight, first.op, first.node
    ))
}

/// Where no layer has module path `path` of its own but the export shows its parent reading
/// the layer's weight itself: a node in a scope above `path` reads a weight named after it
/// (`head.attention.out_proj.weight` in `head.attention`), every such node so. That reader,
/// and the layer path its weight's name gives.
fn parent_reader<'a>(cands: &'a [Candidate], path: &str) -> Option<(&'a Candidate, String)> {
    use crate::target::select::name_matches;
    if crate::target::select::found_as_is(cands, path) {
        return None;
    }
    let mut readers = cands.iter().filter_map(|c| {
        let layer = crate::target::evidence::from_weight_name(&c.weight)?;
        name_matches(&layer, path).then_some((c, layer))
    });
    let (first, layer) = readers.next()?;
    let above = |c: &Candidate, layer: &str| {
        !c.module.is_empty() && layer.starts_with(&format!("{}.", c.module))
    };
    if !above(first, &layer) || !readers.all(|(c, l)| above(c, &l)) {
        return None;
    }
    Some((first, layer))
}

/// Refuses an adapter whose config names in `modules_to_save` a module this model has but whose
/// weights the file does not hold: PEFT wraps every module whose path ends with the name and
/// fails on the first tensor it does not find, so the config and the file disagree. (Names the
/// model does not have, such as the `classifier` of PEFT's `["classifier", "score"]` on a
/// model with a `score`, are no such disagreement.)
fn saved_modules_to_save(cands: &[Candidate], adapter: &Adapter) -> Result<()> {
    let Some(serde_json::Value::Array(names)) = adapter.config.raw.get("modules_to_save") else {
        return Ok(());
    };
    // ("a.b.c": "a", "a.b", "a.b.c", each of which PEFT's `endswith` may match)
    let prefixes = |p: &str| -> Vec<String> {
        let parts: Vec<&str> = p.split('.').collect();
        (1..=parts.len()).map(|n| parts[..n].join(".")).collect()
    };
    let whole: Vec<&ModuleAdapter> = adapter
        .modules
        .iter()
        .filter(|m| m.kind == ModuleKind::Full || !m.full.is_empty())
        .collect();
    for name in names.iter().filter_map(|n| n.as_str()) {
        let Some(layer) = cands
            .iter()
            .find(|c| prefixes(&c.module).iter().any(|p| p.ends_with(name)))
        else {
            continue;
        };
        let saved = whole
            .iter()
            .any(|m| prefixes(&m.path).iter().any(|p| p.ends_with(name)));
        if !saved {
            return Err(Error::Adapter {
                path: adapter.path.clone(),
                reason: format!(
                    "adapter_config.json names modules_to_save '{name}', which is this model's '{}' ({} {}), but the file holds no weights of it: PEFT fails to load it (on the first of them); remove it from modules_to_save, or give the adapter it was saved with",
                    layer.module, layer.op, layer.node
                ),
            });
        }
    }
    Ok(())
}

/// Leaves out the values an adapter saved that equal the layer's own: biases beside a LoRA
/// (PEFT saves `<module>.base_layer.bias` with the base weight of an output layer it targets,
/// Phi's `lm_head`, whatever `bias` says; up to 1e-6 of the largest) and, when the adapter is
/// applied `alone`, whole weights and biases equal to the layer's own once rounded to the
/// model's dtype (PEFT's `save_embedding_layers` saves the embedding and output tables whether
/// or not they were trained). Loading them changes nothing, so they are no trained values for
/// inject, a serving model or export-adapter to refuse, nor weights fold changed; a whole module
/// left with nothing is left out. (After other adapters, a whole value equal to the base still
/// resets what they changed, as loading it after them in PEFT does; an adapter all of whose
/// modules would go is kept as it is.)
fn drop_unchanged_values(
    model: &LoadedModel,
    graph: &ModelGraph,
    cands: &[Candidate],
    adapter: &mut Adapter,
    alone: bool,
) -> Result<()> {
    let saves = |m: &ModuleAdapter| {
        alone && m.kind == ModuleKind::Full || !m.is_whole() && m.full.contains_key("bias")
    };
    if !adapter.modules.iter().any(saves) {
        return Ok(());
    }
    let (paths, _) = module_paths(adapter, cands)?;
    // (module index, the names of its saved tensors that change nothing)
    let mut drops: Vec<(usize, Vec<&'static str>)> = Vec::new();
    for (i, (m, p)) in adapter.modules.iter().zip(&paths).enumerate() {
        let Some(p) = p else { continue };
        if !saves(m) {
            continue;
        }
        // (the layer itself: not a normalization's parameters)
        let layer = |c: &Candidate| c.layout != crate::target::Layout::Norm;
        let Ok(found) = crate::target::resolve_module(cands, p, layer, |_, _| false) else {
            continue;
        };
        let whole = m.kind == ModuleKind::Full;
        let mut unchanged = Vec::new();
        if let Some(saved) = m.full.get("bias")
            && let Some(own) = fold::current_bias(model, graph, found[0])
        {
            let scale = own.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-30);
            let tolerance = if whole { 0.0 } else { 1e-6 * scale };
            if own.len() == saved.data.len()
                && own
                    .iter()
                    .zip(&saved.data)
                    .all(|(a, b)| (a - b).abs() <= tolerance)
            {
                unchanged.push("bias");
            }
        }
        if whole && let Some(saved) = m.full.get("weight") {
            // (a quantized weight is not compared: its values are not the float ones)
            let mut same = found.iter().all(|c| !c.quantized);
            for c in &found {
                if !same {
                    break;
                }
                same = weights::saved_weight_difference(model, graph, c, saved)?
                    .is_some_and(|d| d.identical);
            }
            if same {
                unchanged.push("weight");
            }
        }
        if !unchanged.is_empty() {
            drops.push((i, unchanged));
        }
    }
    let emptied: Vec<usize> = drops
        .iter()
        .filter(|(i, names)| {
            let m = &adapter.modules[*i];
            m.kind == ModuleKind::Full && m.full.keys().all(|k| names.contains(&k.as_str()))
        })
        .map(|(i, _)| *i)
        .collect();
    if emptied.len() == adapter.modules.len() {
        return Ok(());
    }
    for (i, names) in drops {
        let m = &mut adapter.modules[i];
        for name in names {
            m.full.remove(name);
            let suffix = format!(".{name}");
            m.keys
                .retain(|k| !k.ends_with(&suffix) || k.contains(".lora_"));
        }
    }
    let mut i = 0;
    adapter.modules.retain(|_| {
        i += 1;
        !emptied.contains(&(i - 1))
    });
    Ok(())
}

/// The model path each of an adapter's modules is looked up by (in module order; None: left
/// out), and notes on what was left out. PEFT paths are used as they are, less the prefix the
/// export's paths lack (`target::export_root`), when it has one. kohya's underscored
/// names are bound to the candidate module path of the best `kohya::fit_part` (the same underscored,
/// then rooted above, then rooted below, as transformers 5's CLIPTextModel without
/// `text_model.`); several paths fitting equally well is an error. A kohya part none of whose
/// modules is in the model (a text encoder's, when the model is the UNet) is left out.
pub fn module_paths(
    adapter: &Adapter,
    cands: &[Candidate],
) -> Result<(Vec<Option<String>>, Vec<String>)> {
    if adapter.modules.iter().all(|m| m.part.is_none()) {
        let all: Vec<&str> = adapter.modules.iter().map(|m| m.path.as_str()).collect();
        let root = crate::target::export_root(&all, cands, adapter.root.as_deref())?;
        let Some(root) = root else {
            return Ok((
                all.iter().map(|p| Some(p.to_string())).collect(),
                Vec::new(),
            ));
        };
        // Under the root, a path the export does not have as it is is looked up without it; the
        // rest as they are (those the export lacks are another part's).
        let paths: Vec<Option<String>> = all
            .iter()
            .map(|p| match p.strip_prefix(root.as_str()) {
                Some(rest) if !crate::target::select::found_as_is(cands, p) => {
                    Some(rest.to_string())
                }
                _ => Some(p.to_string()),
            })
            .collect();
        let note = format!(
            "this export's module paths are the adapter's under '{}'",
            root.trim_end_matches('.')
        );
        return Ok((paths, vec![note]));
    }
    let model_paths = crate::target::select::module_paths_in(cands);
    let names = kohya_names(adapter, &model_paths)?;
    let mut bound: Vec<Option<String>> = Vec::with_capacity(adapter.modules.len());
    for (m, name) in adapter.modules.iter().zip(&names) {
        // The paths of the best kind of fit only.
        let fits: Vec<(kohya::Fit, &str)> = model_paths
            .iter()
            .filter_map(|p| kohya::fit_part(m.part, name, p).map(|f| (f, *p)))
            .collect();
        let best = fits.iter().map(|(f, _)| *f).min();
        let found: Vec<&str> = fits
            .iter()
            .filter(|(f, _)| Some(*f) == best)
            .map(|(_, p)| *p)
            .collect();
        match found.as_slice() {
            [] => bound.push(None),
            [one] => bound.push(Some(one.to_string())),
            many => {
                return Err(Error::Adapter {
                    path: adapter.path.clone(),
                    reason: format!(
                        "kohya module '{}' ({}) fits several module paths of the model: {}",
                        m.path,
                        m.keys.first().map_or("", String::as_str),
                        many.join(", ")
                    ),
                });
            }
        }
    }
    let mut notes = Vec::new();
    let translated = names
        .iter()
        .zip(&bound)
        .filter(|(n, b)| matches!(n, std::borrow::Cow::Owned(_)) && b.is_some())
        .count();
    if translated > 0 {
        notes.push(format!(
            "{translated} UNet module(s) named as in SDXL's original (sgm) UNet (input_blocks_…, time_embed_…) found in this model's diffusers blocks"
        ));
    }
    // (Flux's original names, which `settle_root` renamed)
    let flux: Vec<&str> = adapter
        .modules
        .iter()
        .zip(&bound)
        .filter(|(_, b)| b.is_some())
        .filter_map(|(m, _)| m.renamed_from())
        .collect();
    if !flux.is_empty() {
        let mut files = flux.clone();
        files.dedup();
        notes.push(format!(
            "{} module(s) of the file named as in Flux's original model (double_blocks_…, single_blocks_…) found in this model's diffusers blocks, as {} layer(s): fused q/k/v and linear1 split by rows",
            files.len(),
            flux.len()
        ));
    }
    let mut parts: Vec<&str> = adapter.modules.iter().filter_map(|m| m.part).collect();
    parts.sort_unstable();
    parts.dedup();
    let in_model = |part: &str| {
        adapter
            .modules
            .iter()
            .zip(&bound)
            .any(|(m, b)| m.part == Some(part) && b.is_some())
    };
    let used: Vec<&str> = parts.iter().copied().filter(|p| in_model(p)).collect();
    let mut paths = Vec::with_capacity(bound.len());
    for ((m, b), name) in adapter.modules.iter().zip(bound).zip(&names) {
        let part = m.part.unwrap_or("");
        if !used.is_empty() && !used.contains(&part) {
            paths.push(None);
            continue;
        }
        // (unbound: looked up by the name it was bound by, which the unmatched message shows
        // beside the file's keys: an sgm name's place in the model's blocks)
        paths.push(Some(b.unwrap_or_else(|| name.to_string())));
    }
    for part in parts
        .iter()
        .filter(|p| !used.is_empty() && !used.contains(p))
    {
        let n = adapter
            .modules
            .iter()
            .filter(|m| m.part == Some(part))
            .count();
        notes.push(format!(
            "left out {n} module(s) of the {} (lora_{part}_*): none of them is in this model",
            kohya::part_description(part)
        ));
    }
    Ok((paths, notes))
}

/// The names a kohya file's modules are bound by (`sgm::bind_names`: SDXL's original UNet block
/// names mapped to the model's diffusers blocks, Owned; the rest Borrowed).
pub(crate) fn kohya_names<'a>(
    adapter: &'a Adapter,
    model_paths: &[&str],
) -> Result<Vec<std::borrow::Cow<'a, str>>> {
    let names: Vec<(&str, bool)> = adapter
        .modules
        .iter()
        .map(|m| (m.path.as_str(), m.part == Some("unet")))
        .collect();
    sgm::bind_names(&names, model_paths).map_err(|reason| Error::Adapter {
        path: adapter.path.clone(),
        reason,
    })
}

/// The model's module paths that adapters name (`paths`: `module_paths`' lookups, all
/// adapters together): the path each lookup resolves to by name, where it resolves, and the
/// one module path it names where its lookup fails (an ambiguous scope).
pub fn named_paths(cands: &[Candidate], paths: &[Vec<Option<String>>]) -> Vec<String> {
    let mut out: Vec<String> = paths
        .iter()
        .flatten()
        .flatten()
        .filter_map(
            |p| match crate::target::resolve_module(cands, p, |_| true, |_, _| false) {
                Ok(found) => Some(found[0].module.clone()),
                // (the model's path, also where the export adds a wrapper prefix, when the
                // path names one module)
                Err(_) => match crate::target::select::modules_named(cands, p).as_slice() {
                    [one] => Some(one.to_string()),
                    _ => None,
                },
            },
        )
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Where an adapter path names the shortest of several modules ending with it (`layers.0.fc1`
/// is `m.layers.0.fc1`, not `m.encoder.layers.0.fc1`), the deeper ones that no adapter path
/// names stay unchanged: one note naming an example and counting the rest, so that the choice
/// is seen. None where no such module exists (a TorchScript scope `blocks.0.fc_1` whose nodes
/// may all be `blocks.0.fc`'s later calls counts as none).
pub fn deeper_matches_note(
    cands: &[Candidate],
    paths: &[Vec<Option<String>>],
    named: &[String],
) -> Option<String> {
    let mut example: Option<(&str, &str, &str)> = None;
    let mut left: Vec<&str> = Vec::new();
    for p in paths.iter().flatten().flatten() {
        let taken = crate::target::select::modules_named(cands, p);
        let Some(&first) = taken.first() else {
            continue;
        };
        let mut deeper: Vec<&str> = cands
            .iter()
            .map(|c| c.module.as_str())
            .filter(|m| {
                !m.is_empty()
                    && crate::target::select::name_matches(m, p)
                    && !taken.contains(m)
                    && !named.iter().any(|n| n == m)
            })
            .collect();
        deeper.sort_unstable();
        deeper.dedup();
        // (a scope whose nodes may all be another module's later calls need be no module)
        deeper.retain(|m| !crate::target::select::may_be_calls_only(cands, m));
        if let (None, Some(&d)) = (example, deeper.first()) {
            example = Some((p, first, d));
        }
        left.extend(deeper);
    }
    left.sort_unstable();
    left.dedup();
    let (p, first, d) = example?;
    let taken = if p == first {
        format!("adapter path '{p}' is the export's module '{first}'")
    } else {
        format!("adapter path '{p}' is taken as '{first}', the shortest module path ending with it")
    };
    Some(format!(
        "{taken}; '{d}' ends with it too and is left unchanged{}",
        match left.len() - 1 {
            0 => String::new(),
            n => format!(
                " ({n} more such module{} in this export)",
                if n > 1 { "s" } else { "" }
            ),
        }
    ))
}

/// A module's resolved nodes less the later calls (TorchScript's scope `x_1` reading `x`'s
/// weight) that an adapter names as a module of its own (`named`): factors saved for `x_1`
/// prove that scope is a module, not `x` called again, except for the nodes that the lookup
/// of `x_1` itself leaves to `x` ([`scope_takes`]). Where that lookup fails (`x_1` is
/// ambiguous), so does this one: its nodes may be `x`'s calls or not.
pub(crate) fn drop_named_later_calls<'a>(
    found: Vec<&'a Candidate>,
    named: &[String],
    cands: &[Candidate],
) -> Result<Vec<&'a Candidate>> {
    let Some(first) = found.first().map(|c| c.module.clone()) else {
        return Ok(found);
    };
    let mut out = Vec::with_capacity(found.len());
    for c in found {
        if c.module == first || !is_named(&c.module, named) {
            out.push(c);
            continue;
        }
        match scope_takes(c, cands) {
            Ok(true) => {}
            Ok(false) => out.push(c),
            Err(e) => {
                return Err(Error::Target(format!(
                    "module '{first}' may also be called at node {} of the scope '{}', which an adapter names as a module of its own: {e}",
                    c.node, c.module
                )));
            }
        }
    }
    Ok(out)
}

/// Whether the lookup of node `c`'s own scope (`fc_1`) takes it: that lookup leaves to `x`
/// a node of the scope that reads `x`'s parameters, or none, beside a node of the module
/// `fc_1` itself (TorchScript scoped `x`'s call like the module). An error where the lookup
/// fails.
pub(crate) fn scope_takes(c: &Candidate, cands: &[Candidate]) -> Result<bool> {
    let found = crate::target::resolve_module(cands, &c.module, |_| true, |_, _| true)?;
    Ok(found
        .iter()
        .any(|f| (f.graph, f.node_index) == (c.graph, c.node_index)))
}

/// Whether node `c` belongs to a module that an adapter names at its scope (`named`): its
/// scope's lookup takes it ([`scope_takes`]), or fails (an ambiguous scope, which the lookups
/// of both modules refuse).
pub(crate) fn named_takes(c: &Candidate, named: &[String], cands: &[Candidate]) -> bool {
    is_named(&c.module, named) && scope_takes(c, cands).unwrap_or(true)
}

/// Whether an adapter names the module at model path `module` (`named`: `named_paths`).
pub(crate) fn is_named(module: &str, named: &[String]) -> bool {
    named.iter().any(|p| p == module)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{MhaPart, test_candidate};

    /// The MultiheadAttention explanation is for a path with no layer of the part a module of
    /// PEFT's attention LoRA adapts; where that layer is there, the lookup's own error stands.
    #[test]
    fn the_attention_explanation_is_only_for_a_missing_part() {
        let mut m = ModuleAdapter::empty("attn", ModuleKind::Lora, None);
        m.mha_in_proj = true;
        let mut c = test_candidate("attn", "W");
        assert!(
            kind_mismatch(&m, std::slice::from_ref(&c), "attn")
                .is_some_and(|w| w.contains("MultiheadAttention"))
        );
        c.mha = Some(MhaPart::InProj);
        assert_eq!(kind_mismatch(&m, std::slice::from_ref(&c), "attn"), None);
        let mut m = ModuleAdapter::empty("attn.out_proj", ModuleKind::Lora, None);
        m.mha_outer = Some("attn".into());
        let mut o = test_candidate("attn.out_proj", "O");
        assert!(kind_mismatch(&m, std::slice::from_ref(&o), "attn.out_proj").is_some());
        o.mha = Some(MhaPart::OutProj);
        assert_eq!(
            kind_mismatch(&m, std::slice::from_ref(&o), "attn.out_proj"),
            None
        );
    }
}
