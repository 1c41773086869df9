//! The output flags shared by every subcommand that writes a model: tensor layout and progress.

use std::io::IsTerminal;
use std::sync::Arc;

use onnx_lora::onnx::io::{DEFAULT_THRESHOLD, Progress};
use onnx_lora::onnx::{SaveOptions, TensorLayout};

#[derive(clap::Args, Clone, Debug)]
pub struct SaveArgs {
    /// Put initializers of at least --threshold bytes into one file beside the output
    /// (default name `<output>.data`).
    #[arg(long, value_name = "NAME", conflicts_with = "inline", num_args = 0..=1, default_missing_value = "")]
    pub external_data: Option<String>,
    /// Store every tensor inside the .onnx file.
    #[arg(long)]
    pub inline: bool,
    /// Smallest tensor, in bytes, that goes to external data (default 1024; int32/int64
    /// tensors under the default stay inline at any threshold: onnxruntime reads shapes and
    /// axes from them).
    #[arg(long, value_name = "BYTES", conflicts_with = "inline")]
    pub threshold: Option<usize>,
    /// No progress bar (one is shown on stderr when it is a terminal).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl SaveArgs {
    pub fn options(&self) -> SaveOptions {
        let layout = match (&self.external_data, self.inline) {
            (_, true) => TensorLayout::Inline,
            (Some(name), _) => TensorLayout::External {
                name: (!name.is_empty()).then(|| name.clone()),
            },
            (None, false) => TensorLayout::Auto,
        };
        SaveOptions {
            layout,
            threshold: self.threshold.unwrap_or(DEFAULT_THRESHOLD),
            progress: (!self.quiet && std::io::stderr().is_terminal()).then(progress_bar),
            notice: Some(onnx_lora::onnx::io::Notice(Arc::new(|m| {
                eprintln!("onnx-lora: note: {m}")
            }))),
            ..SaveOptions::default()
        }
    }

    /// Says on stderr when the layout flags given had no effect on what was written: an
    /// output that could have had external data (`--external-data`, or by default an input
    /// that had some) but has none at this threshold; a `--threshold` for an output written
    /// inline by default. `input_external`: the input had external data.
    pub fn note_unused(&self, saved: &onnx_lora::onnx::io::SaveReport, input_external: bool) {
        if saved.external_data.is_some() || self.inline {
            return;
        }
        let out = saved.model.display();
        let threshold = self.threshold.unwrap_or(DEFAULT_THRESHOLD);
        if self.external_data.is_some() || input_external {
            eprintln!(
                "onnx-lora: note: no tensor went to external data at --threshold {threshold} bytes (int32 / int64 tensors under 1024 bytes stay inline): {out} holds them all, and no external data file was written"
            );
        } else if self.threshold.is_some() {
            eprintln!(
                "onnx-lora: note: --threshold had no effect: {out} is written inline (by default an output keeps external data only where its input had some, or past 2 GiB; --external-data puts the tensors of at least --threshold bytes beside it)"
            );
        }
    }

    /// Options for scratch models (verification references): external data like the source,
    /// no fsync, no progress bar.
    pub fn scratch() -> SaveOptions {
        SaveOptions {
            sync: false,
            ..SaveOptions::default()
        }
    }
}

/// A bytes progress bar on stderr, created on the first report with bytes to show (so
/// outputs written inline, and small models, never show one).
fn progress_bar() -> Progress {
    let bar: std::sync::OnceLock<indicatif::ProgressBar> = std::sync::OnceLock::new();
    Progress(Arc::new(move |done, total| {
        if total == 0 {
            return;
        }
        let bar = bar.get_or_init(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message("writing");
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish_and_clear();
        }
    }))
}
