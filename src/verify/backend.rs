//! The runtimes verification can run a model on, behind one trait, and the choice between
//! them: onnxruntime (CPU or CUDA execution provider) or the embedded tract.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

use super::tensor::{ArrayData, Tensors};

/// Where to run. `Auto` (the default) is CUDA when onnxruntime can register it, onnxruntime's
/// CPU otherwise, and tract when the search finds no onnxruntime library (one named with
/// `--ort-lib` or `ORT_DYLIB_PATH` must load).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Ep {
    #[default]
    Auto,
    Cuda,
    Cpu,
    Tract,
}

impl Ep {
    pub fn name(self) -> &'static str {
        match self {
            Ep::Auto => "auto",
            Ep::Cuda => "cuda",
            Ep::Cpu => "cpu",
            Ep::Tract => "tract",
        }
    }
}

impl std::fmt::Display for Ep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A model opened on a runtime.
pub trait Backend {
    /// The execution provider the model actually runs on (never `Auto`).
    fn ep(&self) -> Ep;

    /// Work that depends on the feeds' shapes and should not count as run time (tract
    /// optimizes its plan for concrete shapes).
    fn prepare(&mut self, _feeds: &[(String, ArrayData)]) -> Result<()> {
        Ok(())
    }

    /// Runs the model once; returns every graph output, in the model's order.
    fn run(&mut self, feeds: &[(String, ArrayData)]) -> Result<Tensors>;

    /// Makes onnxruntime `.onnx_adapter` files active for every following run.
    fn activate_adapters(&mut self, adapters: &[std::path::PathBuf]) -> Result<()> {
        match adapters.first() {
            None => Ok(()),
            Some(a) => Err(Error::Usage(format!(
                "{}: LoRA adapter files need onnxruntime (--ep cpu or cuda), not {}",
                a.display(),
                self.ep().name()
            ))),
        }
    }
}

/// Opens `model` on `ep`. With `Auto`, no onnxruntime library found by the search means tract
/// (said in `notes`; a library named by `--ort-lib` or `ORT_DYLIB_PATH` that does not load is
/// an error), and a CUDA EP that does not register means CPU.
///
/// `label` names the model in messages (its path, or a description of a temporary file).
pub fn open(
    model: &Path,
    label: &str,
    ep: Ep,
    ort_lib: Option<&Path>,
    notes: &mut Vec<String>,
) -> Result<Box<dyn Backend>> {
    if ep == Ep::Tract {
        return Ok(Box::new(super::tract::TractBackend::open(
            model, label, false,
        )?));
    }
    match open_ort(model, label, ep, ort_lib, notes) {
        Err(OrtOpenError::NoLibrary(reason)) if ep == Ep::Auto => {
            notes.push(format!("{reason}; using the embedded tract backend"));
            Ok(Box::new(super::tract::TractBackend::open(
                model, label, true,
            )?))
        }
        Err(OrtOpenError::NoLibrary(reason)) => Err(Error::Backend(reason)),
        Err(OrtOpenError::Other(e)) => Err(e),
        Ok(b) => Ok(b),
    }
}

/// Checks, before a rewrite writes anything, what `open` will need that needs no model: the
/// onnxruntime library for `Cpu` and `Cuda`, and with `Auto` a library the user named
/// (`--ort-lib`, `ORT_DYLIB_PATH`), which is never replaced by tract; and for `Cuda` that the
/// CUDA EP registers.
pub fn preflight(ep: Ep, ort_lib: Option<&Path>) -> Result<()> {
    #[cfg(feature = "ort")]
    {
        use super::ort as o;
        let needed = match ep {
            Ep::Tract => false,
            Ep::Auto => o::pinned_library(ort_lib).is_some(),
            Ep::Cpu | Ep::Cuda => true,
        };
        if needed {
            o::environment(ort_lib)?;
        }
        if ep == Ep::Cuda {
            o::check_cuda(ort_lib)?;
        }
        Ok(())
    }
    #[cfg(not(feature = "ort"))]
    {
        let _ = ort_lib;
        match ep {
            Ep::Cpu | Ep::Cuda => Err(Error::Backend(
                "onnx-lora was built without its `ort` feature (onnxruntime)".into(),
            )),
            Ep::Auto | Ep::Tract => Ok(()),
        }
    }
}

/// Checks that onnxruntime loads, for what only it can run (LoRA adapter files), whatever
/// `--ep auto` would fall back to.
pub fn require_ort(ort_lib: Option<&Path>) -> Result<()> {
    #[cfg(feature = "ort")]
    {
        super::ort::environment(ort_lib).map(|_| ())
    }
    #[cfg(not(feature = "ort"))]
    {
        let _ = ort_lib;
        Err(Error::Backend(
            "onnx-lora was built without its `ort` feature (onnxruntime)".into(),
        ))
    }
}

// Without the `ort` feature only `NoLibrary` is ever made.
#[cfg_attr(not(feature = "ort"), allow(dead_code))]
enum OrtOpenError {
    /// No usable onnxruntime library (the message says how to get one).
    NoLibrary(String),
    Other(Error),
}

#[cfg(feature = "ort")]
fn open_ort(
    model: &Path,
    label: &str,
    ep: Ep,
    ort_lib: Option<&Path>,
    notes: &mut Vec<String>,
) -> std::result::Result<Box<dyn Backend>, OrtOpenError> {
    use super::ort as o;
    match o::environment(ort_lib) {
        // A library the user named (--ort-lib, ORT_DYLIB_PATH) is never replaced by tract.
        Err(e @ Error::Backend(_)) if o::pinned_library(ort_lib).is_some() => {
            return Err(OrtOpenError::Other(e));
        }
        Err(Error::Backend(reason)) => return Err(OrtOpenError::NoLibrary(reason)),
        Err(e) => return Err(OrtOpenError::Other(e)),
        Ok(_) => {}
    }
    o::OrtBackend::open(model, label, ep, ort_lib, notes)
        .map(|b| Box::new(b) as Box<dyn Backend>)
        .map_err(OrtOpenError::Other)
}

#[cfg(not(feature = "ort"))]
fn open_ort(
    _: &Path,
    _: &str,
    _: Ep,
    _: Option<&Path>,
    _: &mut Vec<String>,
) -> std::result::Result<Box<dyn Backend>, OrtOpenError> {
    Err(OrtOpenError::NoLibrary(
        "onnx-lora was built without its `ort` feature (onnxruntime)".into(),
    ))
}
