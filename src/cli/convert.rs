//! `onnx-lora convert`: re-encode a model, changing only where tensor data is stored.

use std::path::PathBuf;

use onnx_lora::onnx;

use super::output::report_line;
use super::save_args::SaveArgs;

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
    #[command(flatten)]
    save: SaveArgs,
    /// Print a JSON report on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let model = onnx::load(&args.model)?;
    let report = onnx::save(&model, &args.output, &args.save.options())?;
    super::warn_after_write(&args.model, &model, &report);
    args.save.note_unused(&report, model.files().len() > 1);
    if args.json {
        report_line(&report, &report.model)?;
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
            None => eprintln!(
                "wrote {} ({} bytes)",
                report.model.display(),
                report.model_bytes
            ),
        }
    }
    Ok(super::EXIT_OK)
}
