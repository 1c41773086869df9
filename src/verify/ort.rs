//! The onnxruntime backend, through the `ort` crate with the library opened at run time.
//!
//! Where the library comes from, first found wins:
//! 1. `--ort-lib PATH` (only that path is tried);
//! 2. `ORT_DYLIB_PATH` (only that path is tried);
//! 3. the `capi/` folder of the Python `onnxruntime` package, as reported by
//!    `$ONNX_LORA_PYTHON`, then `./.venv/bin/python`, then `python3`;
//! 4. `./.venv/lib/python*/site-packages/onnxruntime/capi/` read directly;
//! 5. `libonnxruntime.so` through the dynamic loader (`LD_LIBRARY_PATH`, the loader cache),
//!    then `/usr/local/lib` and `/usr/lib`.
//!
//! A library named in one of the first two ways that does not load is an error, even with
//! `--ep auto`: only when the search (3 to 5) finds nothing does `auto` fall back to tract.
//!
//! Before the CUDA EP is registered, the CUDA libraries its provider needs and the loader
//! cannot find are opened from pip's `nvidia` packages (see the `cuda_libs` module).
//!
//! Models are opened from their path (`commit_from_file`), never from a copy in memory: a
//! large model is not held twice.
//!
//! onnxruntime's own logger is set to print nothing below Fatal (environment, sessions and
//! runs): its errors come back as values and are reported once, in the CLI's one line, naming
//! the model.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::Session;
use ort::session::builder::SessionBuilder;
use ort::value::{DynTensor, DynTensorValueType, DynValue, TensorElementType};

use crate::error::{Error, Result};
use crate::onnx::DataType;

use super::backend::{Backend, Ep};
use super::tensor::{ArrayData, Tensors};

/// The one line said when no library could be loaded.
pub const HOW_TO_GET_ORT: &str = "install one with `pip install onnxruntime` (`onnxruntime-gpu` for CUDA), point --ort-lib or ORT_DYLIB_PATH at libonnxruntime.so, or use --ep tract (embedded, no onnxruntime needed)";

/// What onnxruntime itself may print: only fatal messages (errors are returned, and reported
/// by onnx-lora on one line).
const LOG_LEVEL: ort::logging::LogLevel = ort::logging::LogLevel::Fatal;

/// The environment is process-wide in onnxruntime, and so is the loaded library.
static ENV: OnceLock<Environment> = OnceLock::new();

/// The path of the library `ENV` was made from.
static LIB: OnceLock<PathBuf> = OnceLock::new();

/// Loads onnxruntime (see the module doc for the search order) and creates the environment.
/// Later calls reuse the first library loaded.
pub fn environment(explicit: Option<&Path>) -> Result<&'static Environment> {
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let lib = load_library(explicit)?;
    let env = ort::init_from(&lib)
        .map_err(|e| Error::Backend(format!("{}: {e}", lib.display())))?
        .with_name("onnx-lora")
        .build()
        .map_err(|e| Error::Backend(format!("onnxruntime ({}): {e}", lib.display())))?;
    env.set_log_level(LOG_LEVEL);
    let _ = LIB.set(lib);
    Ok(ENV.get_or_init(|| env))
}

/// The library the user named, and where (`--ort-lib`, else a non-empty `ORT_DYLIB_PATH`):
/// only that one is tried, and failing to load it is an error even with `--ep auto`.
pub fn pinned_library(explicit: Option<&Path>) -> Option<(PathBuf, &'static str)> {
    explicit
        .map(|p| (p.to_path_buf(), "--ort-lib"))
        .or_else(|| {
            std::env::var_os("ORT_DYLIB_PATH")
                .filter(|v| !v.is_empty())
                .map(|v| (PathBuf::from(v), "ORT_DYLIB_PATH"))
        })
}

/// Finds and opens the library; returns the path that loaded.
fn load_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some((path, origin)) = pinned_library(explicit) {
        return try_load(&path).map(|()| path.clone()).map_err(|e| {
            Error::Backend(format!(
                "onnxruntime library '{}' (from {origin}) could not be loaded: {e}; {HOW_TO_GET_ORT}",
                path.display()
            ))
        });
    }
    let mut failed: Vec<String> = Vec::new();
    for path in discovered_candidates() {
        match try_load(&path) {
            Ok(()) => return Ok(path),
            // A file that exists but does not load (wrong version, missing dependencies) is
            // worth naming; the bare name the dynamic loader did not find is not, but one it
            // found in an older version is.
            Err(e) if path.is_absolute() => failed.push(format!("{}: {e}", path.display())),
            Err(e) if e.contains("is not compatible") => {
                failed.push(format!("the dynamic loader's {}: {e}", path.display()))
            }
            Err(_) => {}
        }
    }
    let failed = if failed.is_empty() {
        String::new()
    } else {
        format!("; could not load {}", failed.join("; "))
    };
    Err(Error::Backend(format!(
        "no onnxruntime library found (searched the Python onnxruntime package of $ONNX_LORA_PYTHON, ./.venv/bin/python and python3, ./.venv, the dynamic loader's path, /usr/local/lib and /usr/lib{failed}); {HOW_TO_GET_ORT}"
    )))
}

/// Opens the library with `ort` (which also checks its version) without creating anything.
fn try_load(path: &Path) -> std::result::Result<(), String> {
    if path.is_absolute() && !path.exists() {
        return Err("no such file".into());
    }
    ort::init_from(path).map(drop).map_err(|e| e.to_string())
}

/// Candidates after the pinned ones, in search order, existing files only (the bare name
/// for the dynamic loader comes last but one).
fn discovered_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for py in pythons() {
        if let Some(dir) = python_capi_dir(&py) {
            out.extend(libs_in(&dir));
        }
    }
    for site in glob_venv_site_packages(Path::new(".venv")) {
        out.extend(libs_in(&site.join("onnxruntime/capi")));
    }
    out.push(PathBuf::from(lib_file_name()));
    for dir in ["/usr/local/lib", "/usr/lib"] {
        out.extend(libs_in(Path::new(dir)));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// The Python interpreters asked where their onnxruntime package is, in order.
fn pythons() -> Vec<PathBuf> {
    std::env::var_os("ONNX_LORA_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(".venv/bin/python"), PathBuf::from("python3")])
        .collect()
}

/// `libonnxruntime.so` (or the platform's equivalent).
fn lib_file_name() -> String {
    format!(
        "{}onnxruntime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The onnxruntime package's `capi` folder according to this interpreter, if it has one.
fn python_capi_dir(python: &Path) -> Option<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import onnxruntime,os;print(os.path.dirname(onnxruntime.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !dir.trim().is_empty()).then(|| PathBuf::from(dir.trim()).join("capi"))
}

/// `VENV/lib/python*/site-packages` folders.
fn glob_venv_site_packages(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
        .map(|e| e.path().join("site-packages"))
        .collect()
}

/// onnxruntime libraries in `dir` (`libonnxruntime.so`, `libonnxruntime.so.1.31.1`, ...; not
/// the providers' libraries), the plain name first, then longest (most specific) first.
fn libs_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{}onnxruntime", std::env::consts::DLL_PREFIX);
    let suffix = std::env::consts::DLL_SUFFIX;
    let mut libs: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with(suffix) || rest.starts_with('.'))
                && n.contains(suffix)
        })
        .collect();
    libs.sort_by_key(|n| std::cmp::Reverse(n.len()));
    libs.into_iter().map(|n| dir.join(n)).collect()
}

/// A model opened in onnxruntime.
pub struct OrtBackend {
    session: Session,
    ep: Ep,
    /// How messages name the model.
    label: String,
    /// Run options: a quiet log, and the active LoRA adapters.
    run_options: ort::session::RunOptions,
}

impl OrtBackend {
    /// Opens `model` on `ep` (`Auto`: CUDA when it registers and the session builds, else CPU;
    /// `Cuda`: CUDA or an error). Reasons for falling back to CPU are pushed to `notes`.
    /// `label` names the model in messages.
    pub fn open(
        model: &Path,
        label: &str,
        ep: Ep,
        ort_lib: Option<&Path>,
        notes: &mut Vec<String>,
    ) -> Result<Self> {
        let env = environment(ort_lib)?;
        let named = Named { path: model, label };
        let run_options = run_options()?;
        let backend = |session, ep| OrtBackend {
            session,
            ep,
            label: label.to_string(),
            run_options,
        };
        if matches!(ep, Ep::Auto | Ep::Cuda) {
            match cuda_session(env, model) {
                Ok(session) => return Ok(backend(session, Ep::Cuda)),
                Err(e) if ep == Ep::Cuda => return Err(e.into_error(&named)),
                Err(e) => notes.push(format!(
                    "CUDA execution provider not available ({}); running on onnxruntime's CPU",
                    named.relabel(&e.reason())
                )),
            }
        }
        let session = builder(env)?
            .commit_from_file(model)
            .map_err(|e| session_error(&named, "CPU", e))?;
        Ok(backend(session, Ep::Cpu))
    }
}

/// A model's path and how messages name it.
struct Named<'a> {
    path: &'a Path,
    label: &'a str,
}

impl Named<'_> {
    /// onnxruntime's message with the model's path (which it quotes, e.g. when loading fails)
    /// replaced by its label.
    fn relabel(&self, msg: &str) -> String {
        let path = self.path.to_string_lossy();
        if path.is_empty() || path == self.label {
            msg.to_string()
        } else {
            msg.replace(&*path, self.label)
        }
    }
}

fn builder(env: &Environment) -> Result<SessionBuilder> {
    Session::builder(env)
        .and_then(|b| b.with_log_level(LOG_LEVEL).map_err(Into::into))
        .map_err(|e| Error::Backend(format!("onnxruntime: {e}")))
}

fn session_error(model: &Named, ep: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend(format!(
        "{}: onnxruntime could not load the model on {ep}: {}",
        model.label,
        model.relabel(&e.to_string())
    ))
}

/// Why a CUDA session could not be made (without the `cuda` feature, only `Register`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum CudaFailure {
    /// The EP did not register (CPU-only onnxruntime, missing CUDA libraries, no driver).
    Register(String),
    /// It registered but the session could not be created on it.
    Commit(String),
    Other(Error),
}

impl CudaFailure {
    fn reason(&self) -> String {
        match self {
            CudaFailure::Register(r) | CudaFailure::Commit(r) => r.clone(),
            CudaFailure::Other(e) => e.to_string(),
        }
    }

    fn into_error(self, model: &Named) -> Error {
        match self {
            CudaFailure::Register(e) => Error::Backend(format!(
                "the CUDA execution provider could not be registered ({e}); it needs onnxruntime-gpu (pip install onnxruntime-gpu) with a matching CUDA runtime and cuDNN, and an NVIDIA driver"
            )),
            CudaFailure::Commit(e) => session_error(model, "CUDA", e),
            CudaFailure::Other(e) => e,
        }
    }
}

/// A session builder with the CUDA EP registered; registration failures are errors, not
/// silent CPU fallbacks.
#[cfg(feature = "cuda")]
fn cuda_builder(env: &Environment) -> std::result::Result<SessionBuilder, CudaFailure> {
    // TF32 would trade fp32 accuracy for speed: a verification wants the fp32 it asks for.
    let pip = pip_cuda_libraries();
    let cuda = ort::ep::CUDA::default()
        .with_tf32(false)
        .build()
        .error_on_failure();
    builder(env)
        .map_err(CudaFailure::Other)?
        .with_execution_providers([cuda])
        .map_err(|e| {
            let mut msg = e
                .to_string()
                .trim()
                .trim_end_matches('.')
                .trim()
                .to_string();
            if let Some((p, name)) = pip.and_then(|p| Some((p, p.missing.as_ref()?))) {
                let looked = if p.searched.is_empty() {
                    "no pip `nvidia` packages were found".to_string()
                } else {
                    let dirs: Vec<String> =
                        p.searched.iter().map(|d| d.display().to_string()).collect();
                    format!("not in the pip `nvidia` packages of {}", dirs.join(", "))
                };
                msg.push_str(&format!("; {name}: {looked}"));
            }
            if let Some(failed) = pip.and_then(|p| p.failed.as_ref()) {
                msg.push_str(&format!("; could not open {failed}"));
            }
            CudaFailure::Register(msg)
        })
}

/// Opens, once, the CUDA libraries pip installed that the provider beside the loaded
/// onnxruntime needs (see [`super::cuda_libs`]).
#[cfg(all(feature = "cuda", unix))]
fn pip_cuda_libraries() -> Option<&'static super::cuda_libs::Prepared> {
    static PREPARED: OnceLock<Option<super::cuda_libs::Prepared>> = OnceLock::new();
    PREPARED
        .get_or_init(|| super::cuda_libs::prepare(LIB.get()?, &pythons()))
        .as_ref()
}

/// Elsewhere than on Unix, pip's CUDA libraries are left to the system's loader.
#[cfg(all(feature = "cuda", not(unix)))]
struct NoPip {
    missing: Option<String>,
    failed: Option<String>,
    searched: Vec<PathBuf>,
}

#[cfg(all(feature = "cuda", not(unix)))]
fn pip_cuda_libraries() -> Option<&'static NoPip> {
    None
}

#[cfg(not(feature = "cuda"))]
fn cuda_builder(_: &Environment) -> std::result::Result<SessionBuilder, CudaFailure> {
    Err(CudaFailure::Register(
        "onnx-lora was built without its `cuda` feature".into(),
    ))
}

/// A session on the CUDA EP.
fn cuda_session(env: &Environment, model: &Path) -> std::result::Result<Session, CudaFailure> {
    cuda_builder(env)?
        .commit_from_file(model)
        .map_err(|e| CudaFailure::Commit(e.to_string().trim().to_string()))
}

/// Whether the CUDA EP registers (no model needed): the error `Ep::Cuda` would give.
pub fn check_cuda(ort_lib: Option<&Path>) -> Result<()> {
    let env = environment(ort_lib)?;
    match cuda_builder(env) {
        Ok(_) => Ok(()),
        Err(e @ CudaFailure::Register(_)) => Err(e.into_error(&Named {
            path: Path::new(""),
            label: "",
        })),
        Err(e) => Err(Error::Backend(e.reason())),
    }
}

impl Backend for OrtBackend {
    fn ep(&self) -> Ep {
        self.ep
    }

    fn activate_adapters(&mut self, adapters: &[std::path::PathBuf]) -> Result<()> {
        // On CUDA the factors go to the GPU once, at load; left in host memory, onnxruntime
        // would copy every one of them to the device on every run.
        let device = (self.ep == Ep::Cuda)
            .then(|| cuda_allocator(&self.session))
            .flatten();
        let opts = &mut self.run_options;
        for path in adapters {
            let loaded = match &device {
                Some(alloc) => ort::session::Adapter::from_file(path, Some(alloc))
                    .or_else(|_| ort::session::Adapter::from_file(path, None)),
                None => ort::session::Adapter::from_file(path, None),
            };
            let adapter = loaded.map_err(|e| {
                Error::Backend(format!(
                    "{}: not a usable LoRA adapter: {e}",
                    path.display()
                ))
            })?;
            opts.add_adapter(&adapter)
                .map_err(|e| Error::Backend(format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }

    fn run(&mut self, feeds: &[(String, ArrayData)]) -> Result<Tensors> {
        let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(feeds.len());
        for outlet in self.session.inputs() {
            let name = outlet.name();
            let (_, arr) = feeds
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::Verify(format!("no value for model input '{name}'")))?;
            inputs.push((name.to_string(), to_ort(name, arr)?.into_dyn()));
        }
        let outputs = self
            .session
            .run_with_options(inputs, &self.run_options)
            .map_err(|e| {
                Error::Backend(format!(
                    "{}: onnxruntime failed to run the model: {}",
                    self.label,
                    e.to_string().trim_end()
                ))
            })?;
        outputs
            .into_iter()
            .map(|(name, v)| Ok((name.to_string(), from_ort(name, v)?)))
            .collect()
    }
}

/// An allocator of the session's CUDA device memory (`None` if onnxruntime has none for it).
fn cuda_allocator(session: &Session) -> Option<Allocator> {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    let info = MemoryInfo::new(
        AllocationDevice::CUDA,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .ok()?;
    Allocator::new(session, info).ok()
}

/// Run options that keep onnxruntime's run log quiet below Fatal.
fn run_options() -> Result<ort::session::RunOptions> {
    let mut opts = ort::session::RunOptions::new()
        .map_err(|e| Error::Backend(format!("onnxruntime run options: {e}")))?;
    opts.set_log_level(LOG_LEVEL)
        .map_err(|e| Error::Backend(format!("onnxruntime run options: {e}")))?;
    Ok(opts)
}

fn element_type(dtype: DataType) -> Option<TensorElementType> {
    use DataType::*;
    Some(match dtype {
        Float => TensorElementType::Float32,
        Float16 => TensorElementType::Float16,
        Bfloat16 => TensorElementType::Bfloat16,
        Double => TensorElementType::Float64,
        Int8 => TensorElementType::Int8,
        Int16 => TensorElementType::Int16,
        Int32 => TensorElementType::Int32,
        Int64 => TensorElementType::Int64,
        Uint8 => TensorElementType::Uint8,
        Uint16 => TensorElementType::Uint16,
        Uint32 => TensorElementType::Uint32,
        Uint64 => TensorElementType::Uint64,
        Bool => TensorElementType::Bool,
        _ => return None,
    })
}

fn data_type(t: TensorElementType) -> Option<DataType> {
    super::tensor::SUPPORTED
        .into_iter()
        .find(|&d| element_type(d) == Some(t))
}

/// Copies an array into a new onnxruntime tensor of the same type and shape.
fn to_ort(name: &str, arr: &ArrayData) -> Result<DynTensor> {
    let ty = element_type(arr.dtype)
        .ok_or_else(|| Error::Verify(format!("input '{name}': {} is not supported", arr.dtype)))?;
    let shape: Vec<i64> = arr.shape.iter().map(|&d| d as i64).collect();
    let mut t = DynTensor::new(&Allocator::default(), ty, shape)
        .map_err(|e| Error::Backend(format!("input '{name}': {e}")))?;
    if t.size() != Some(arr.data.len()) {
        return Err(Error::Verify(format!("input '{name}': size mismatch")));
    }
    if !arr.data.is_empty() {
        // SAFETY: the tensor was just allocated on the CPU allocator with exactly
        // `arr.data.len()` bytes (checked above) and nothing else refers to it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(
                arr.data.as_ptr(),
                t.data_ptr_mut().cast::<u8>(),
                arr.data.len(),
            );
        }
    }
    Ok(t)
}

/// Copies an onnxruntime output (on the host, as outputs are by default) into an array.
fn from_ort(name: &str, v: DynValue) -> Result<ArrayData> {
    let err = |r: String| Error::Verify(format!("output '{name}': {r}"));
    let t = v
        .downcast::<DynTensorValueType>()
        .map_err(|_| err("is not a tensor (sequences and maps are not compared)".into()))?;
    let dtype = data_type(*t.data_type())
        .ok_or_else(|| err(format!("element type {:?} is not supported", t.data_type())))?;
    if !t.memory_info().is_cpu_accessible() {
        return Err(err("is not in host memory".into()));
    }
    let shape: Vec<usize> = t.shape().iter().map(|&d| d.max(0) as usize).collect();
    let len = t.size().unwrap_or(0);
    let data = if len == 0 {
        Vec::new()
    } else {
        // SAFETY: the tensor is host-accessible (checked) and holds `len` bytes, as onnxruntime
        // reports; the slice is copied before `t` is dropped.
        unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u8>(), len) }.to_vec()
    };
    ArrayData::new(dtype, shape, data).map_err(|e| err(e.to_string()))
}
