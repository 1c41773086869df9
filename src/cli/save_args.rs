//! The output-layout flags shared by every subcommand that writes a model.

use onnx_lora::onnx::{SaveOptions, TensorLayout, io::DEFAULT_THRESHOLD};

#[derive(clap::Args, Clone, Debug)]
pub struct SaveArgs {
    /// Put initializers of at least --threshold bytes into one file beside the output
    /// (default name `<output>.data`).
    #[arg(long, value_name = "NAME", conflicts_with = "inline", num_args = 0..=1, default_missing_value = "")]
    pub external_data: Option<String>,
    /// Store every tensor inside the .onnx file.
    #[arg(long)]
    pub inline: bool,
    /// Smallest tensor, in bytes, that goes to external data.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD, value_name = "BYTES")]
    pub threshold: usize,
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
            threshold: self.threshold,
            ..SaveOptions::default()
        }
    }
}

impl SaveArgs {
    /// Options for scratch models (verification references): external data like the source,
    /// no fsync.
    pub fn scratch() -> onnx_lora::onnx::SaveOptions {
        onnx_lora::onnx::SaveOptions {
            sync: false,
            ..onnx_lora::onnx::SaveOptions::default()
        }
    }
}
