//! `onnx-lora export-adapter` and `onnx-lora export-peft`: adapters out of injected models.

use std::path::PathBuf;

use onnx_lora::adapter::ort_format;
use onnx_lora::rewrite::{export_peft, serving_adapter_params};

use super::output::{json_line, report_line};

/// Write a PEFT adapter as an onnxruntime `.onnx_adapter` file for a serving model made with
/// `inject --as-inputs`, with exactly the parameter names and layouts its inputs expect.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  onnx-lora inject model.onnx --as-inputs --target 'q_proj|v_proj' -o serving.onnx
  onnx-lora export-adapter french/ --model serving.onnx -o french.onnx_adapter
  onnx-lora export-adapter german/ --model serving.onnx -o german.onnx_adapter

Activate one at run time with onnxruntime's LoraAdapter (Python) / Adapter (ort crate).")]
pub struct AdapterArgs {
    /// The PEFT adapter (folder or .safetensors with adapter_config.json beside it), or a
    /// diffusers / kohya LoRA file.
    adapter: PathBuf,
    /// The serving model (from `inject --as-inputs`).
    #[arg(long)]
    model: PathBuf,
    /// The .onnx_adapter file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Leave out, with a warning, adapter modules the serving model has no LoRA inputs for
    /// (another part's, when it serves one part of an encoder-decoder) instead of failing.
    #[arg(long)]
    allow_unmatched: bool,
    /// The adapter's module path under which the serving model's paths sit, when that cannot
    /// be told (a model of one part of an encoder-decoder: `--root model.encoder`).
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
    /// Print a JSON report on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run_adapter(args: AdapterArgs) -> anyhow::Result<u8> {
    let model = super::load_assigned_once(&args.model)?;
    let mut adapter = super::load_adapter(&args.adapter, args.root.as_deref(), &model)?;
    super::check_root(args.root.as_deref(), std::slice::from_ref(&adapter))?;
    super::check_diffusers_flags(
        args.alpha_keys.as_deref(),
        args.part.as_deref(),
        std::slice::from_ref(&adapter),
    )?;
    super::settle(
        &model,
        &mut adapter,
        args.alpha_keys.as_deref(),
        args.part.as_deref(),
        true,
    )?;
    let (params, unmatched) = serving_adapter_params(&model, &adapter, args.allow_unmatched)?;
    for u in &unmatched {
        eprintln!("onnx-lora: warning: no LoRA input for adapter module {u}; left out");
    }
    let mut inputs = model.files();
    inputs.extend(adapter.files());
    ort_format::write(&args.output, &params, &inputs)?;
    if args.json {
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        json_line(
            "report",
            &serde_json::json!({"output": args.output, "parameters": names}),
        )?;
    } else {
        eprintln!(
            "wrote {} ({} parameters)",
            args.output.display(),
            params.len()
        );
    }
    Ok(super::EXIT_OK)
}

/// Write the (trained) branches of a model made by `inject` as a PEFT adapter folder
/// (adapter_config.json + adapter_model.safetensors) that PeftModel.from_pretrained loads.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  onnx-lora inject model.onnx --rank 8 --strip-prefix m -o train.onnx
  # ... train train.onnx's lora_A / lora_B initializers (e.g. onnxruntime training) ...
  onnx-lora export-peft trained.onnx -o my-adapter/

Module paths are the branch names given at inject time: use --strip-prefix there so they match
the torch model's named_modules(), or --root here where the export's paths lack its top module:
  onnx-lora export-peft trained.onnx --root model -o my-adapter/")]
pub struct PeftArgs {
    /// The model with injected branches.
    model: PathBuf,
    /// The adapter folder to create (must not exist).
    #[arg(short, long)]
    output: PathBuf,
    /// Put PREFIX before every module path, where the export's paths lack the torch model's
    /// top module (a TorchScript export of OPT names `decoder.layers.0…`, PEFT's model has
    /// `model.decoder.layers.0…`: --root model).
    #[arg(long, value_name = "PREFIX")]
    root: Option<String>,
    /// Print a JSON report on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run_peft(args: PeftArgs) -> anyhow::Result<u8> {
    let mut model = super::load_assigned_once(&args.model)?;
    onnx_lora::rewrite::ungate(&mut model)?;
    // (what the model holds is named by the model; a failed write names the output itself)
    let report = export_peft(&model, &args.output, args.root.as_deref()).map_err(|e| match e {
        onnx_lora::Error::Io { .. } => anyhow::Error::new(e),
        e => anyhow::Error::new(e).context(args.model.display().to_string()),
    })?;
    if let Some(first) = report.left_out.first() {
        eprintln!(
            "onnx-lora: warning: {}: inject wrote the values of {} module(s) ('{first}'{}) into the weights where export-peft cannot give them back (LoHa / LoKr deltas, one projection's slice of a packed q/k/v weight, a kohya or diffusers file's whole tensors, a model injected before onnx-lora recorded where they went), and the exported adapter does not hold them: PEFT loading it computes without them",
            args.model.display(),
            report.left_out.len(),
            match report.left_out.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            }
        );
    }
    if args.json {
        report_line(&report, &args.output)?;
    } else {
        let parameters = match report.parameters.len() {
            0 => String::new(),
            n => format!(", {} target_parameters", n),
        };
        let whole = match report.whole_values.len() {
            0 => String::new(),
            n => format!(", {n} whole tensors"),
        };
        eprintln!(
            "wrote {} ({} modules{parameters}{whole}, r = {}, lora_alpha = {})",
            args.output.display(),
            report.modules.len(),
            report.r,
            report.lora_alpha
        );
    }
    Ok(super::EXIT_OK)
}
