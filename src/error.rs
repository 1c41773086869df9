//! The library's typed errors. Every variant names what it is about (a file, a node, a tensor,
//! a module path) so that the one line the CLI prints is enough to find the problem.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message rather than a `#[source]`, so `{:#}` chains print it once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    #[error("{path}: not a valid ONNX model: {}", decode_reason(.err))]
    Decode {
        path: PathBuf,
        err: prost::DecodeError,
    },

    #[error("{path}: tensor '{tensor}': external data: {reason}")]
    ExternalData {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    #[error("{path}: {reason}")]
    InvalidModel { path: PathBuf, reason: String },

    #[error("tensor '{tensor}': {reason}")]
    Tensor { tensor: String, reason: String },

    #[error("{0}")]
    Target(String),

    #[error("{path}: {reason}")]
    Adapter { path: PathBuf, reason: String },

    #[error("{0}")]
    Usage(String),

    #[error("verification: {0}")]
    Verify(String),

    /// A numpy `.npy` / `.npz` file that cannot be read or written.
    #[error("{path}: {reason}")]
    Npz { path: PathBuf, reason: String },

    /// A runtime (onnxruntime, its CUDA provider, tract) that is missing or cannot run the
    /// model; the message says what to do about it.
    #[error("{0}")]
    Backend(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }

    pub(crate) fn tensor(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }
}

/// A protobuf decode error in a few words: prost names every message on the way to the fault,
/// which for subgraphs nested deeply is thousands of characters. Nesting beyond prost's
/// recursion limit is said as such (onnxruntime cannot parse such a model either).
fn decode_reason(err: &prost::DecodeError) -> String {
    let text = err.to_string();
    let parts: Vec<&str> = text.split(": ").collect();
    if text.ends_with("recursion limit reached") {
        return "its subgraphs are nested too deeply (each If / Loop / Scan body inside another takes three of the 100 message levels a protobuf decoder reads)".into();
    }
    if parts.len() <= 8 {
        return text;
    }
    format!(
        "{}: {}: ...: {}",
        parts[0],
        parts[1],
        parts[parts.len() - 4..].join(": ")
    )
}

#[cfg(test)]
mod tests {
    use crate::onnx::pb::{AttributeProto, GraphProto, ModelProto, NodeProto};
    use prost::Message;

    /// A model whose If bodies nest beyond what a protobuf decoder reads is refused in a few
    /// words, not with the path of every message on the way down; one within it decodes.
    #[test]
    fn deep_nesting_is_said_in_a_few_words() {
        let nested = |depth: usize| {
            let mut g = GraphProto::default();
            for _ in 0..depth {
                let attr = AttributeProto {
                    name: Some("then_branch".into()),
                    g: Some(g),
                    ..Default::default()
                };
                let node = NodeProto {
                    op_type: Some("If".into()),
                    attribute: vec![attr],
                    ..Default::default()
                };
                g = GraphProto {
                    node: vec![node],
                    ..Default::default()
                };
            }
            ModelProto {
                graph: Some(g),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let load = |depth: usize| {
            crate::onnx::LoadedModel::from_bytes(
                std::path::Path::new("m.onnx"),
                nested(depth).into(),
            )
        };
        assert!(load(20).is_ok());
        let Err(err) = load(45) else {
            panic!("decoded")
        };
        let text = err.to_string();
        assert!(
            text.starts_with("m.onnx: not a valid ONNX model: its subgraphs are nested too deeply")
                && text.len() < 200,
            "{text}"
        );
    }
}
