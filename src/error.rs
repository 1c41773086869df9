//! The library's typed errors. Every variant names what it is about (a file, a node, a tensor,
//! a module path) so that the one line the CLI prints is enough to find the problem.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message rather than a `#[source]`, so `{:#}` chains print it once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    #[error("{path}: not a valid ONNX model: {err}")]
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
