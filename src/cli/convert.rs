//! `onnx-lora convert`: re-encode a model, changing only where tensor data is stored.

use std::path::PathBuf;

use onnx_lora::onnx::{self, SaveOptions, TensorLayout};

use super::output::json_line;

/// Re-write a model with its weights inline or in one external data file. Nothing else
/// changes: the output is the same model.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  onnx-lora convert model.onnx -o model.ext.onnx --external-data model.ext.onnx.data
  onnx-lora convert model.onnx -o model.inline.onnx --inline

Without --inline or --external-data, the output keeps external data if the input had any (in
one file `<output>.data`, 4096-aligned) and is inline otherwise; tensors go external
automatically whenever the model would pass protobuf's 2 GiB limit.")]
pub struct Args {
    /// The ONNX model to read.
    model: PathBuf,
    /// Where to write the result (written atomically; the input is never modified).
    #[arg(short, long)]
    output: PathBuf,
    /// Put initializers of at least --threshold bytes into this file beside the output.
    #[arg(long, value_name = "NAME", conflicts_with = "inline", num_args = 0..=1, default_missing_value = "")]
    external_data: Option<String>,
    /// Store every tensor inside the .onnx file.
    #[arg(long)]
    inline: bool,
    /// Smallest tensor, in bytes, that goes to external data.
    #[arg(long, default_value_t = onnx::io::DEFAULT_THRESHOLD, value_name = "BYTES")]
    threshold: usize,
    /// Print a JSON report on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let model = onnx::load(&args.model)?;
    let layout = match (&args.external_data, args.inline) {
        (_, true) => TensorLayout::Inline,
        (Some(name), _) => TensorLayout::External {
            name: (!name.is_empty()).then(|| name.clone()),
        },
        (None, false) => TensorLayout::Auto,
    };
    let report = onnx::save(
        &model,
        &args.output,
        &SaveOptions {
            layout,
            threshold: args.threshold,
            ..SaveOptions::default()
        },
    )?;
    if args.json {
        json_line("report", &report)?;
    } else {
        match &report.external_data {
            Some(d) => eprintln!(
                "wrote {} ({} bytes) and {} ({} tensors, {} bytes)",
                report.model.display(),
                report.model_bytes,
                d.display(),
                report.external_tensors,
                report.external_bytes
            ),
            None => eprintln!("wrote {} ({} bytes)", report.model.display(), report.model_bytes),
        }
    }
    Ok(super::EXIT_OK)
}
