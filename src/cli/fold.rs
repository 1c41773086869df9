//! `onnx-lora fold`: merge PEFT adapters (or diffusers / kohya LoRA files) into a model's weights.

use std::path::PathBuf;

use anyhow::Context;
use onnx_lora::adapter::Adapter;
use onnx_lora::onnx;
use onnx_lora::onnx::io::SaveReport;
use onnx_lora::rewrite::{FoldOptions, FoldReport, fold, fold_branches, unmerged_reference};

use super::output::{json_line, scale_cell, table};
use super::save_args::SaveArgs;

/// Merge trained PEFT LoRA adapters into the weights of an ONNX model, exactly as PEFT's
/// merge_and_unload would, giving a fine-tuned model with no inference overhead.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  onnx-lora fold model.onnx adapter/ -o model.tuned.onnx
  onnx-lora fold model.onnx a/ b/ --weight 0.7 --weight 0.3 -o mix.onnx
  onnx-lora fold model.onnx adapter/adapter_model.safetensors -o out.onnx --json
  onnx-lora fold unet.onnx my_style.safetensors -o unet.style.onnx   # a kohya LoRA
  onnx-lora fold flux.onnx pytorch_lora_weights.safetensors -o flux.style.onnx   # diffusers'
  onnx-lora fold trained.onnx -o merged.onnx      # fold injected (trained) branches back
  onnx-lora fold model.onnx adapter/ -o out.onnx --verify --ep cpu
  onnx-lora fold genai/model.onnx adapter/ -o out.onnx --verify --dim kv_cache_dim=16
  onnx-lora fold model.onnx adapter/ --dry-run    # does it fit? (merges, writes nothing)

ADAPTER is a PEFT folder (adapter_config.json + adapter_model.safetensors: LoRA, or PEFT's
LoHa / LoKr), the .safetensors file with its adapter_config.json beside it, a diffusers LoRA file (transformer.* / unet.* /
text_encoder.* PEFT keys, no adapter_config.json: the config is its metadata or what diffusers
derives; the part that is the model is taken, the others left out with a warning), or a kohya
LoRA .safetensors file (lora_unet_* / lora_te_* keys; text-encoder parts are left out of a UNet,
and the report says so; LyCORIS LoHa and LoKr modules too). Module paths
in the adapter are matched to the model's weights by dotted suffix (kohya's underscored names:
the path that reads the same with '.' as '_', and SDXL files' original UNet blocks,
input_blocks_4_1_…, at their place in a diffusers UNet's blocks, and Flux files' original
modules, double_blocks_0_img_attn_qkv…, on a diffusers Flux export, fused q/k/v split by rows;
see `onnx-lora inspect`). Weights shared with other nodes
(tied embeddings) are copied for the adapted node, so only it changes. In models that pack
q/k/v into one weight (onnxruntime's Attention, a `qkv_proj` layer) a q/k/v module goes into its
columns of its layer's packed weight (`--json` module records list them under `packed`);
embeddings fused into onnxruntime's EmbedLayerNormalization go into its table. Whole tensors
(modules_to_save: weight and bias) replace the layer's; trainable tokens (PEFT's
trainable_token_indices) replace their rows of the embedding table and of an output layer tied
to it (its channels for those tokens equal the table's rows), as PEFT does; such adapters fold
at weight 1 only.")]
pub struct Args {
    /// The base ONNX model.
    model: PathBuf,
    /// PEFT adapters (or diffusers / kohya LoRA files) to merge, in order. None: fold the branches `inject` put into MODEL
    /// (e.g. trained in place) back into its weights and remove them.
    adapters: Vec<PathBuf>,
    /// Where to write the merged model (atomically; inputs are never modified).
    #[arg(short, long, required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    /// Check that the adapters fit the model and print what would change (module, weight,
    /// rank, scale, largest change), writing nothing: the merges are computed and dropped, so
    /// a result the real run would refuse (not finite, beyond a float16 weight's range) is
    /// refused here too.
    #[arg(long, conflicts_with_all = ["output", "verify"])]
    dry_run: bool,
    /// Weight of each adapter's delta: one per adapter, in adapter order, or none (each 1); may
    /// be negative.
    #[arg(
        long = "weight",
        value_name = "W",
        allow_negative_numbers = true,
        value_parser = super::finite
    )]
    weights: Vec<f32>,
    /// Multiplies every delta (may be negative).
    #[arg(
        long,
        default_value_t = 1.0,
        value_name = "S",
        allow_negative_numbers = true,
        value_parser = super::finite
    )]
    scale: f32,
    /// Warn about adapter modules that match no weight instead of failing.
    #[arg(long)]
    allow_unmatched: bool,
    /// The adapters' module path under which this file's paths sit, when that cannot be told
    /// (one file of an encoder-decoder export: `--root model.encoder`).
    #[arg(long, value_name = "PREFIX")]
    root: Option<String>,
    /// diffusers LoRA files: whether their .alpha keys set each module's scale (read: as
    /// diffusers' Flux.1 loader reads them; ignore: as its other loaders do; default: read on a
    /// Flux.1 transformer export and on the text encoder of a file with Flux's single blocks).
    #[arg(long, value_name = "read|ignore", value_parser = ["read", "ignore"])]
    alpha_keys: Option<String>,
    /// diffusers LoRA files holding several pipeline parts: the part this model is
    /// (transformer, unet, text_encoder, text_encoder_2, ...); default: the part that fits it.
    #[arg(long, value_name = "NAME")]
    part: Option<String>,
    /// After writing, run the result and the unmerged reference (the base with the adapters as
    /// branches; in weight space inside onnxruntime's fused ops) on the same inputs and
    /// compare; exit 1 when they differ (the output is then
    /// removed, as when the check cannot run).
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    runtime: super::verify::RuntimeArgs,
    #[command(flatten)]
    save: SaveArgs,
    /// JSON Lines report on stdout: one `module` record per weight, then a `report` record.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    if !args.weights.is_empty() && args.weights.len() != args.adapters.len() {
        anyhow::bail!(
            "{} --weight values for {} adapters: give one per adapter, in adapter order, or none (each 1)",
            args.weights.len(),
            args.adapters.len()
        );
    }
    if args.verify {
        args.runtime.preflight()?;
    }
    let _doing = onnx_lora::cleanup::doing(format!("folding into {}", args.model.display()));
    let (mut model, was_gated) = super::load_ungated(&args.model)?;
    if args.verify {
        args.runtime.check_feeds(&model, &args.model)?;
    }
    let mut adapters = args
        .adapters
        .iter()
        .map(|p| super::load_adapter(p, args.root.as_deref(), &model))
        .collect::<Result<Vec<_>, _>>()?;
    super::check_root(args.root.as_deref(), &adapters)?;
    super::check_diffusers_flags(args.alpha_keys.as_deref(), args.part.as_deref(), &adapters)?;
    let alone = adapters.len() == 1;
    for a in &mut adapters {
        super::settle(
            &model,
            a,
            args.alpha_keys.as_deref(),
            args.part.as_deref(),
            alone,
        )?;
    }
    let opts = FoldOptions {
        weights: args.weights.clone(),
        scale: args.scale,
        allow_unmatched: args.allow_unmatched,
    };
    // The reference is built before anything is written: if it cannot be, nothing is.
    let reference = match (args.verify, adapters.is_empty()) {
        (false, _) => None,
        (true, true) => Some(model.clone()),
        (true, false) => {
            let all: Vec<&Adapter> = adapters.iter().collect();
            super::refuse_dynamically_quantized(&args.model, &model, &all)?;
            Some(
                unmerged_reference(&model, &adapters, &opts.weights, opts.scale).context(
                    "--verify cannot build its unmerged reference, the base with the adapters unmerged (fold without --verify, then check the output with `onnx-lora verify OUT --expect OUTPUTS.npz`)",
                )?,
            )
        }
    };
    let label = super::model_label(&args.model, &model);
    let report = if adapters.is_empty() {
        fold_branches(&mut model)
    } else {
        fold(&mut model, &adapters, &opts)
    }
    .with_context(|| format!("fold into {label}"))?;
    // A gated serving model keeps its gate while it still serves LoRA inputs.
    if was_gated && onnx_lora::rewrite::gate::serves_inputs(&model) {
        onnx_lora::rewrite::gate(&mut model)?;
    }
    let (saved, held) = match &args.output {
        Some(out) if !args.dry_run => {
            let mut opts = args.save.options();
            opts.protect = adapters.iter().flat_map(Adapter::files).collect();
            // Checked by --verify before it counts as a result.
            if reference.is_some() {
                let (saved, held) = onnx::io::save_provisional(&model, out, &opts)?;
                (Some(saved), Some(held))
            } else {
                (Some(onnx::save(&model, out, &opts)?), None)
            }
        }
        // A dry run computes the merged values without writing them: what the real run
        // would refuse, it refuses, and it reports the largest changes.
        _ => {
            model
                .compute_pending()
                .with_context(|| format!("fold into {label}"))?;
            (None, None)
        }
    };
    if let Some(saved) = &saved {
        super::warn_after_write(&args.model, &model, saved);
        args.save.note_unused(saved, model.files().len() > 1);
    }
    for u in &report.unmatched {
        eprintln!("onnx-lora: warning: unmatched adapter module: {u}");
    }
    print_report(
        &report,
        saved.as_ref(),
        adapters.len(),
        reference.is_some(),
        args.json,
    )?;
    let Some(saved) = saved else {
        return Ok(super::EXIT_OK);
    };
    // The reference lives in a scratch file: messages name what it is.
    let label = if adapters.is_empty() {
        args.model.display().to_string()
    } else {
        UNMERGED_REFERENCE.to_string()
    };
    let (Some(r), Some(held)) = (&reference, held) else {
        return Ok(super::EXIT_OK);
    };
    let written = saved.files();
    super::verify_written(held, &written, args.json, || {
        super::verify::check_against(&saved.model, r, &label, &args.runtime, args.json, &[])
    })
}

/// How `--verify` messages name the reference it compares a fold with.
const UNMERGED_REFERENCE: &str =
    "the unmerged reference (base + adapters: PEFT's unmerged forward)";

/// The report; `saved` is None for a dry run; `verifying`: --verify checks the output next.
fn print_report(
    report: &FoldReport,
    saved: Option<&SaveReport>,
    adapters: usize,
    verifying: bool,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        for m in &report.modules {
            json_line("module", m)?;
        }
        json_line(
            "report",
            &serde_json::json!({"output": saved.map(|s| &s.model),
                "external_data": saved.map(|s| &s.external_data), "dry_run": saved.is_none(),
                "modules": report.modules.len(), "unmatched": report.unmatched, "notes": report.notes}),
        )?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = report
        .modules
        .iter()
        .map(|m| {
            vec![
                m.module.clone(),
                m.op.clone(),
                m.weight.clone(),
                // several deltas on one weight: each one's, in order
                if m.steps.len() > 1 {
                    let ranks: Vec<String> = m.steps.iter().map(|s| s.rank.to_string()).collect();
                    ranks.join("+")
                } else {
                    m.rank.to_string()
                },
                if m.steps.len() > 1 {
                    let scales: Vec<String> = m.steps.iter().map(|s| scale_cell(s.scale)).collect();
                    scales.join("+")
                } else {
                    scale_cell(m.scale)
                },
                m.max_abs_delta
                    .get()
                    .map(|d| format!("{d:.3e}"))
                    .unwrap_or_else(|| "-".into()),
                [
                    m.dora.then_some("dora"),
                    m.replaced.then_some("replaced"),
                    m.bias_replaced.then_some("bias replaced"),
                    (!m.tokens.is_empty()).then_some("token rows"),
                    m.copy.as_ref().map(|_| "copied"),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(","),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "MODULE", "OP", "WEIGHT", "RANK", "SCALE", "MAX|ΔW|", "NOTES"
            ],
            &rows
        )
    );
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    // (no adapter given: the model's own injected branches were folded back)
    let from = match adapters {
        0 => "its injected branches".to_string(),
        1 => "1 adapter".to_string(),
        n => format!("{n} adapters"),
    };
    match saved {
        Some(saved) => eprintln!(
            "folded {} from {from} into {}{}",
            super::count(report.modules.len(), "weight", "weights"),
            saved.model.display(),
            super::checking_note(verifying)
        ),
        None => eprintln!(
            "dry run: {} would change (from {from}); nothing written",
            super::count(report.modules.len(), "weight", "weights"),
        ),
    }
    Ok(())
}
