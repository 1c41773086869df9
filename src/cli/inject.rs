//! `onnx-lora inject`: add low-rank branches beside targeted weights.

use std::path::PathBuf;

use anyhow::Context;
use onnx_lora::adapter::{Adapter, ort_format};
use onnx_lora::graph::ModelGraph;
use onnx_lora::onnx;
use onnx_lora::rewrite::{
    FoldOptions, Init, adapter_branches, check_one_branch_per_module, fold, fresh_branches,
    fuse_shared, gate, inject, inject_weight, module_paths, serving_adapter_params,
    write_whole_values,
};
use onnx_lora::target::{self, TargetSpec};

use super::output::{json_line, scale_cell, table};
use super::save_args::SaveArgs;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum InitArg {
    Kaiming,
    Gaussian,
}

/// Where a branch meets the layer.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FormArg {
    /// y = base(x) + s·B(A(x)): a few small kernels per branch at every run.
    Branch,
    /// The node reads W + s·A·B, which onnxruntime folds when the session loads.
    Weight,
}

/// Add parallel low-rank branches y = base(x) + s·B(A(x)) beside the targeted MatMul / Gemm /
/// Conv / Gather nodes: fresh (trainable, output equal to the base), from a PEFT adapter
/// (unmerged deployment), or as graph inputs for run-time adapter swapping.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  onnx-lora inject model.onnx --rank 8 -o train.onnx
  onnx-lora inject model.onnx --target 'q_proj|v_proj' --rank 16 --alpha 32 -o train.onnx
  onnx-lora inject model.onnx --adapter adapter/ -o unmerged.onnx
  onnx-lora inject model.onnx --adapter adapter/ --form weight -o unmerged.onnx
  onnx-lora inject model.onnx --as-inputs --target 'q_proj|v_proj' -o serving.onnx
  onnx-lora inject model.onnx --as-inputs --idle-gate --adapter adapter/ \\
      --adapter-out adapter.onnx_adapter -o serving.onnx

With --adapter, what the adapter replaces outright (modules_to_save, trainable tokens, trained
biases) and LyCORIS LoHa / LoKr deltas have no branch form: they are written into the weights,
as in PEFT's unmerged model (--as-inputs refuses them). The q/k/v modules of a model that
packs them into one `qkv_proj` weight (onnxruntime-genai's builder, also int4) take one branch
on it, their factors side by side (export-peft splits it back; --as-inputs refuses it).
Quantized layers (MatMulNBits, a DequantizeLinear weight, quantize_dynamic's MatMulInteger and
int8 embedding tables, onnxruntime's DynamicQuantizeMatMul / MatMulIntegerToFloat) get a float
branch beside them, reading and adding float values.
Fresh branches are named <module>.lora_A.weight [in, r] and <module>.lora_B.weight [r, out]
(PEFT's lora_A / lora_B transposed; conv: [r, in, kh, kw] and [out, r / groups, 1, 1]) with the scale
in <module>.lora_scale. Default targets: all-linear (every linear layer but the output head).")]
pub struct Args {
    /// The base ONNX model.
    model: PathBuf,
    /// Modules to target: regex matching the whole module path or a dotted suffix (repeatable).
    #[arg(
        long = "target",
        short = 't',
        value_name = "REGEX",
        conflicts_with = "adapter",
        value_parser = super::parse_target
    )]
    targets: Vec<String>,
    /// Rank of fresh branches.
    #[arg(long, default_value_t = 8, conflicts_with = "adapter")]
    rank: usize,
    /// LoRA alpha of fresh branches (scale = alpha / rank); default: the rank (scale 1).
    #[arg(long, value_parser = super::finite, conflicts_with = "adapter")]
    alpha: Option<f32>,
    /// Scale alpha / sqrt(rank) instead of alpha / rank.
    #[arg(long, conflicts_with = "adapter")]
    rslora: bool,
    /// Initialisation of A for fresh branches (B starts at zero).
    #[arg(
        long,
        value_enum,
        default_value = "kaiming",
        conflicts_with = "adapter"
    )]
    init: InitArg,
    /// Seed for fresh branches.
    #[arg(long, default_value_t = 0, conflicts_with = "adapter")]
    seed: u64,
    /// Take the branch weights from this PEFT adapter or diffusers / kohya LoRA file (targets: its modules).
    #[arg(long, value_name = "ADAPTER")]
    adapter: Option<PathBuf>,
    /// With --adapter: warn about adapter modules that match no weight instead of failing.
    #[arg(long, requires = "adapter")]
    allow_unmatched: bool,
    /// With --adapter: its module path under which this file's paths sit, when that cannot be
    /// told (one file of an encoder-decoder export: `--root model.encoder`).
    #[arg(long, value_name = "PREFIX", requires = "adapter")]
    root: Option<String>,
    /// diffusers LoRA files: whether their .alpha keys set each module's scale (read: as
    /// diffusers' Flux.1 loader reads them; ignore: as its other loaders do; default: read on a
    /// Flux.1 transformer export and on the text encoder of a file with Flux's single blocks).
    #[arg(long, value_name = "read|ignore", value_parser = ["read", "ignore"], requires = "adapter")]
    alpha_keys: Option<String>,
    /// diffusers LoRA files holding several pipeline parts: the part this model is
    /// (transformer, unet, text_encoder, text_encoder_2, ...); default: the part that fits it.
    #[arg(long, value_name = "NAME", requires = "adapter")]
    part: Option<String>,
    /// Make the branch weights graph inputs with empty defaults (multi-LoRA serving).
    #[arg(long)]
    as_inputs: bool,
    /// With --as-inputs --adapter: also write the adapter as an onnxruntime `.onnx_adapter`
    /// file whose parameter names and layouts are exactly the serving model's inputs.
    #[arg(long, value_name = "FILE", requires_all = ["as_inputs", "adapter"])]
    adapter_out: Option<PathBuf>,
    /// With --as-inputs: wrap the graph in one If that runs the base graph while no adapter is
    /// active (every LoRA input empty), so idle runs cost what the base costs. onnxruntime then
    /// prepacks each weight for both paths when a session loads: loading takes longer and
    /// briefly needs about twice the model's memory (see README, "Serving cost").
    #[arg(long, requires = "as_inputs")]
    idle_gate: bool,
    /// Branches that read the same activation (q/k/v) share one MatMul on their concatenated
    /// A matrices, split per branch.
    #[arg(long)]
    fuse_shared: bool,
    /// Where the branch meets the layer. `branch`: its output is added to the layer's.
    /// `weight`: the layer reads W + s·A·B, the factors still separate in the file (fold and
    /// export-peft find them); onnxruntime merges them when a session loads, so serving costs
    /// what the base costs, but loading takes longer and, with glibc's allocator, the process
    /// keeps up to ~3x the model's size in memory (see README, "Serving cost").
    #[arg(long, value_enum, default_value = "branch")]
    form: FormArg,
    /// Remove these leading dotted components (e.g. `model` or `base.model`) from resolved
    /// module paths when naming fresh branches; an error if no targeted path starts with them.
    #[arg(long, value_name = "PREFIX", conflicts_with = "adapter")]
    strip_prefix: Option<String>,
    /// Where to write the model (atomically; the input is never modified).
    #[arg(short, long)]
    output: PathBuf,
    /// After writing, compare the result with its reference on the same inputs: the base for
    /// fresh branches and idle serving models (no adapter active), the folded adapter for
    /// --adapter, and for a serving model's --adapter-out file, active (onnxruntime only), the
    /// folded adapter too, after the idle check; exit 1 when they differ (the written files are
    /// then removed, as when the check cannot run).
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    runtime: super::verify::RuntimeArgs,
    #[command(flatten)]
    save: SaveArgs,
    /// JSON Lines report on stdout: one `branch` record per branch, then a `report` record.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    if args.rank == 0 {
        anyhow::bail!("--rank must be at least 1");
    }
    if args.form == FormArg::Weight && (args.as_inputs || args.fuse_shared) {
        anyhow::bail!(
            "--form weight needs constant factors in the weight itself; it cannot be combined with --as-inputs or --fuse-shared"
        );
    }
    // (clap does not enforce --adapter-out's requirements when --target is given)
    if args.adapter_out.is_some() && (args.adapter.is_none() || !args.as_inputs) {
        anyhow::bail!("--adapter-out writes the --adapter given with --as-inputs; give both");
    }
    if args.verify {
        if args.adapter_out.is_some() && args.runtime.ep == onnx_lora::verify::Ep::Tract {
            anyhow::bail!(
                "--verify checks the --adapter-out file active in the serving model, which needs onnxruntime (tract cannot activate LoRA adapters): use --ep auto, cpu or cuda"
            );
        }
        args.runtime.preflight()?;
        if args.adapter_out.is_some() {
            onnx_lora::verify::backend::require_ort(args.runtime.ort_lib.as_deref())
                .map_err(|e| anyhow::anyhow!("--verify checks the --adapter-out file active, which needs onnxruntime: {e}"))?;
        }
    }
    let _doing = onnx_lora::cleanup::doing(format!("injecting into {}", args.model.display()));
    let (mut model, was_gated) = super::load_ungated(&args.model)?;
    if args.verify {
        args.runtime.check_feeds(&model, &args.model)?;
    }
    // The branch's Add / Mul / MatMul broadcast as opset 7 defines them (onnxruntime runs no
    // older Add); the gate's If reads initializers that IR < 4 would have to list as inputs.
    if let Some(v) = onnx_lora::onnx::pb_ext::default_opset(&model.proto).filter(|v| *v < 7) {
        anyhow::bail!(
            "{}: opset {v}: inject needs opset 7 or later (its branches broadcast as opset 7's Add and Mul do); convert the model first (onnx.version_converter)",
            args.model.display()
        );
    }
    if args.idle_gate && model.proto.ir_version() < 4 {
        anyhow::bail!(
            "{}: IR version {}: --idle-gate needs IR version 4 or later (its If bodies read initializers that older IR versions must also list as graph inputs)",
            args.model.display(),
            model.proto.ir_version()
        );
    }
    let mut adapter = args
        .adapter
        .as_deref()
        .map(|p| super::load_adapter(p, args.root.as_deref(), &model))
        .transpose()?;
    super::check_root(args.root.as_deref(), adapter.as_slice())?;
    super::check_diffusers_flags(
        args.alpha_keys.as_deref(),
        args.part.as_deref(),
        adapter.as_slice(),
    )?;
    if let Some(a) = &mut adapter {
        super::settle(
            &model,
            a,
            args.alpha_keys.as_deref(),
            args.part.as_deref(),
            true,
        )?;
    }
    // The reference (the adapter folded into the untouched base) is built before anything is
    // written: if it cannot be, nothing is.
    // (a serving model is checked idle against the base, and with its --adapter-out file
    // active against this reference; where a quantized weight cannot take the fold, against
    // the adapter as branches, which a serving model's active run must compute)
    let reference = match (
        &adapter,
        args.verify && (!args.as_inputs || args.adapter_out.is_some()),
    ) {
        (Some(adapter), true) => {
            super::refuse_dynamically_quantized(&args.model, &model, &[adapter])?;
            // The reference folds the adapter, which a quantized weight cannot take.
            let graph = ModelGraph::build(&model.proto);
            let cands = target::find_candidates(&model.proto, &graph);
            let (paths, _) = module_paths(adapter, &cands)?;
            let quantized = paths.iter().flatten().find_map(|p| {
                let found = target::resolve_module(&cands, p, |c| c.quantized, |_, _| false);
                let packed = || match target::packed::resolve_all(&cands, p) {
                    Some(Ok((found, _))) => found.into_iter().find(|c| c.quantized),
                    _ => None,
                };
                found.ok().map(|f| f[0]).or_else(packed).map(|c| (p, c))
            });
            match quantized {
                Some((_, _)) if args.as_inputs => {
                    let mut branched = model.clone();
                    let (branches, _) =
                        adapter_branches(&branched, &graph, &cands, adapter, args.allow_unmatched)?;
                    onnx_lora::rewrite::inject(&mut branched, &branches, false)
                        .context("--verify: the adapter as branches, for the reference")?;
                    Some((
                        branched,
                        "the reference (base with the adapter as branches)",
                    ))
                }
                Some((path, c)) => anyhow::bail!(
                    "{}: --verify compares with the adapter folded into the weights, and module '{}' has a quantized weight ('{}', {}) that cannot take it; inject without --verify, then check the output with `onnx-lora verify OUT --expect OUTPUTS.npz`",
                    args.model.display(),
                    path,
                    c.weight,
                    c.op
                ),
                None => {
                    let mut folded = model.clone();
                    fold(
                        &mut folded,
                        std::slice::from_ref(adapter),
                        &FoldOptions {
                            allow_unmatched: args.allow_unmatched,
                            ..Default::default()
                        },
                    )
                    .context("--verify: folding the adapter for the reference (inject without --verify, then check the output with `onnx-lora verify OUT --expect OUTPUTS.npz`)")?;
                    Some((folded, "the reference (base with the adapter folded in)"))
                }
            }
        }
        _ => None,
    };
    // Replaced values (modules_to_save, trainable tokens, trained biases) and LyCORIS deltas
    // have no branch form: they go into the weights, and the branches carry the rest.
    // (each with the LyCORIS algorithm whose delta it added, None where it replaced values;
    // and whether export-peft reads its values back)
    let mut replaced: Vec<(onnx_lora::rewrite::ModuleReport, Option<&'static str>, bool)> =
        Vec::new();
    // (what writing them noted: said once the output is written, not before a later refusal)
    let mut whole_notes: Vec<String> = Vec::new();
    let low = match &adapter {
        Some(adapter) => {
            if let Some(m) = adapter.modules.iter().find(|m| m.has_no_branch_form())
                && args.as_inputs
            {
                anyhow::bail!(
                    "{}: module '{}' ({}) has no branch form: a serving model swaps LoRA factors only; inject without --as-inputs (it then goes into the weights) or fold the adapter",
                    adapter.path.display(),
                    m.path,
                    m.replaced_what()
                );
            }
            let (low, rep) = write_whole_values(&mut model, adapter, 1.0, args.allow_unmatched)
                .with_context(|| format!("{}", args.model.display()))?;
            if let Some(rep) = rep {
                whole_notes.extend(rep.notes.iter().map(|n| format!("note: {n}")));
                whole_notes.extend(
                    rep.unmatched
                        .iter()
                        .map(|u| format!("onnx-lora: warning: unmatched adapter module: {u}")),
                );
                replaced = rep
                    .modules
                    .into_iter()
                    .map(|r| {
                        // (a module that replaced no values added a LyCORIS delta; a kohya
                        // module's report is under the model's path, its keys' stem noted)
                        let stem = r.adapter_module.as_deref();
                        let what = adapter
                            .modules
                            .iter()
                            .filter(|m| m.kind == onnx_lora::adapter::ModuleKind::Lycoris)
                            .find(|m| {
                                m.path == r.module
                                    || m.keys.iter().any(|k| k.split('.').next() == stem)
                            })
                            .map_or("LyCORIS", |m| m.replaced_what());
                        let delta = !(r.replaced || r.bias_replaced);
                        (r, delta.then_some(what), false)
                    })
                    .collect();
            }
            Some(low)
        }
        None => None,
    };
    // (the layers whose written values export-peft reads back: inject recorded them)
    if let Some(rec) = onnx_lora::rewrite::whole_record::read(&model.proto) {
        for (r, _, given_back) in &mut replaced {
            *given_back = rec
                .tensors
                .iter()
                .any(|e| e.node == r.node && !rec.unrecorded.contains(&e.module));
        }
    }
    let graph = ModelGraph::build(&model.proto);
    let cands = target::find_candidates(&model.proto, &graph);
    let label = super::model_label(&args.model, &model);
    let (branches, unmatched) = match &low {
        Some(low) => adapter_branches(&model, &graph, &cands, low, args.allow_unmatched)
            .with_context(|| label.clone())?,
        None => {
            let spec = args.targets.is_empty().then_some(TargetSpec::AllLinear);
            let mut chosen = target::select(&cands, spec.as_ref(), &args.targets)
                .with_context(|| label.clone())?;
            // The default (every linear layer) leaves out layers that take no branch (quantized
            // activations) when others remain, and says so; named targets must all take one.
            if spec.is_some() && chosen.iter().any(|c| c.branchable()) {
                let skipped: Vec<String> = chosen
                    .iter()
                    .filter(|c| !c.branchable())
                    .map(|c| c.module.clone())
                    .collect();
                if let Some(first) = chosen.iter().find(|c| !c.branchable()) {
                    eprintln!(
                        "onnx-lora: warning: {} linear layer(s) left out ({}): {}",
                        skipped.len(),
                        onnx_lora::target::list_names(
                            skipped.iter().map(String::as_str),
                            skipped.len(),
                            8
                        ),
                        first.no_branch_reason()
                    );
                }
                chosen.retain(|c| c.branchable());
            }
            if let Some(c) = chosen.iter().find(|c| !c.branchable()) {
                anyhow::bail!(
                    "{}: '{}' cannot take a branch: {}",
                    args.model.display(),
                    c.module,
                    c.no_branch_reason()
                );
            }
            if chosen.is_empty() {
                anyhow::bail!("{label}: no weight matches the targets (see `onnx-lora inspect`)");
            }
            // (export-peft refuses such branches later: said now, before a training run)
            let folded: Vec<&str> = chosen
                .iter()
                .filter(|c| c.norm_folded)
                .map(|c| c.module.as_str())
                .collect();
            if !folded.is_empty() {
                eprintln!(
                    "onnx-lora: warning: {} targeted layer(s) hold the BatchNorm after them, which the exporter folded into their weights ({}): branches trained there cannot be given back as PEFT factors of the torch model (`export-peft` refuses them; `fold` bakes them into this model); export with the BatchNorm kept apart (TorchScript: `training=torch.onnx.TrainingMode.PRESERVE`; dynamo: `optimize=False`) to train branches PEFT can load",
                    folded.len(),
                    onnx_lora::target::list_names(folded.iter().copied(), folded.len(), 8)
                );
            }
            let init = match args.init {
                InitArg::Kaiming => Init::Kaiming,
                InitArg::Gaussian => Init::Gaussian,
            };
            let alpha = args.alpha.unwrap_or(args.rank as f32);
            let fresh = fresh_branches(
                &chosen,
                args.rank,
                alpha,
                args.rslora,
                init,
                args.seed,
                args.strip_prefix.as_deref(),
            )?;
            (fresh, Vec::new())
        }
    };
    // (the adapter's modules: a TorchScript scope `x_1` it names is no later call of `x`)
    let named = match &low {
        Some(low) => {
            let paths = [module_paths(low, &cands)?.0];
            let named = onnx_lora::rewrite::named_paths(&cands, &paths);
            if let Some(n) = onnx_lora::rewrite::deeper_matches_note(&cands, &paths, &named) {
                eprintln!("note: {n}");
            }
            named
        }
        None => Vec::new(),
    };
    check_one_branch_per_module(&model, &branches, &cands, &named)
        .with_context(|| args.model.display().to_string())?;
    let reports = match args.form {
        FormArg::Branch => inject(&mut model, &branches, args.as_inputs),
        FormArg::Weight => {
            for n in onnx_lora::rewrite::weight_form::merged_at_run_time(&model, &branches) {
                eprintln!("note: {n}");
            }
            inject_weight(&mut model, &branches)
        }
    }
    .with_context(|| format!("inject into {}", args.model.display()))?;
    if args.fuse_shared {
        if args.as_inputs {
            anyhow::bail!(
                "--fuse-shared needs constant branch weights; it cannot be combined with --as-inputs"
            );
        }
        let groups = fuse_shared(&mut model)?;
        eprintln!("fused the A projections of {groups} groups of branches sharing an input");
    }
    if args.idle_gate || was_gated {
        gate(&mut model)?;
    }
    let mut inputs = model.files();
    inputs.extend(adapter.iter().flat_map(Adapter::files));
    let adapter_out = match (&args.adapter_out, &adapter) {
        (Some(path), Some(adapter)) => {
            // (the model's external data file, if it gets one, is named after the output)
            let data = PathBuf::from(format!("{}.data", args.output.display()));
            onnx::io::check_outputs(&[&args.output, path, &data], &inputs)?;
            Some((
                path,
                serving_adapter_params(&model, adapter, args.allow_unmatched)?.0,
            ))
        }
        _ => None,
    };
    let mut opts = args.save.options();
    opts.protect = inputs.clone();
    // Held until the run's outputs are all in place (an interrupt before that removes them),
    // and with --verify until they pass the check.
    let (saved, mut held) = onnx::io::save_provisional(&model, &args.output, &opts)?;
    if let Some((path, params)) = adapter_out {
        // The model's own files are outputs of this run too: on failure, none is left.
        inputs.extend(saved.files());
        match ort_format::write_staged(path, &params, &inputs) {
            Ok(guard) => held.hold(guard),
            Err(e) => {
                for f in saved.files() {
                    let _ = std::fs::remove_file(f);
                }
                return Err(e.into());
            }
        }
        eprintln!("wrote {} ({} parameters)", path.display(), params.len());
    }
    // Without --verify the outputs are accepted once all are in place.
    let held = args.verify.then_some(held);
    super::warn_after_write(&args.model, &model, &saved);
    args.save.note_unused(&saved, model.files().len() > 1);
    for line in &whole_notes {
        eprintln!("{line}");
    }
    for u in &unmatched {
        eprintln!("onnx-lora: warning: unmatched adapter module: {u}");
    }
    for n in branches
        .iter()
        .filter_map(|b| onnx_lora::rewrite::inner_pad_note(&b.name, &b.cand, adapter.is_none()))
    {
        eprintln!("note: {n}");
    }
    // (only where the out_proj part of PEFT's MultiheadAttention LoRA became branches)
    if let Some(n) = adapter
        .as_ref()
        .and_then(|a| a.mha_note(|m| branches.iter().any(|b| b.name == m.path)))
    {
        eprintln!("note: {n}");
    }
    let form = match args.form {
        FormArg::Branch => "branch",
        FormArg::Weight => "weight",
    };
    print_report(
        &reports,
        &replaced,
        &unmatched,
        &saved,
        args.adapter_out.as_deref(),
        form,
        args.json,
    )?;
    if !args.json {
        eprintln!(
            "injected {}{} into {}{}",
            super::count(reports.len(), "branch", "branches"),
            if form == "weight" {
                " (weight form)"
            } else {
                ""
            },
            saved.model.display(),
            super::checking_note(args.verify)
        );
    }
    let Some(held) = held else {
        return Ok(super::EXIT_OK);
    };
    let mut written = saved.files();
    written.extend(args.adapter_out.clone());
    super::verify_written(held, &written, args.json, || {
        match (&reference, args.as_inputs, args.adapter_out.as_deref()) {
            (Some((r, label)), false, _) => {
                super::verify::check_against(&saved.model, r, label, &args.runtime, args.json, &[])
            }
            // A serving model: idle it is the base; with the written adapter active, the
            // adapter folded in.
            (Some((r, label)), true, Some(adapter_file)) => {
                let idle =
                    super::verify::check(&saved.model, &args.model, &args.runtime, args.json)?;
                if idle != super::EXIT_OK {
                    return Ok(idle);
                }
                super::verify::check_against(
                    &saved.model,
                    r,
                    label,
                    &args.runtime,
                    args.json,
                    &[adapter_file.to_path_buf()],
                )
            }
            _ => super::verify::check(&saved.model, &args.model, &args.runtime, args.json),
        }
    })
}

fn print_report(
    reports: &[onnx_lora::rewrite::BranchReport],
    replaced: &[(onnx_lora::rewrite::ModuleReport, Option<&'static str>, bool)],
    unmatched: &[String],
    saved: &onnx::io::SaveReport,
    adapter_out: Option<&std::path::Path>,
    form: &str,
    json: bool,
) -> anyhow::Result<()> {
    let output = saved.model.as_path();
    if json {
        for r in reports {
            json_line("branch", r)?;
        }
        for (r, _, _) in replaced {
            json_line("replaced", r)?;
        }
        json_line(
            "report",
            &serde_json::json!({"output": output, "external_data": saved.external_data,
                "adapter_out": adapter_out, "branches": reports.len(), "form": form,
                "replaced": replaced.len(), "unmatched": unmatched}),
        )?;
        return Ok(());
    }
    for (r, delta, given_back) in replaced {
        if let Some(kind) = delta {
            eprintln!(
                "{}: its {kind} delta added into '{}' ({} {}); no branch can carry it (it is no LoRA A·B product), and export-peft will not give it back",
                r.module, r.weight, r.op, r.node
            );
        } else {
            eprintln!(
                "{}: whole values written into '{}' ({} {}); no branch can carry them, and export-peft {}",
                r.module,
                r.weight,
                r.op,
                r.node,
                if *given_back {
                    "reads them back from there"
                } else {
                    "will not give them back"
                }
            );
        }
    }
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.module.clone(),
                r.op.clone(),
                r.rank.to_string(),
                scale_cell(r.scale),
                r.lora_a.clone(),
                r.lora_b.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["MODULE", "OP", "RANK", "SCALE", "LORA_A", "LORA_B"],
            &rows
        )
    );
    Ok(())
}
