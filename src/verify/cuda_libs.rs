//! Makes the CUDA and cuDNN libraries that pip installs visible to onnxruntime's CUDA provider.
//!
//! `onnxruntime-gpu` from pip does not bundle CUDA: its `[cuda,cudnn]` extras, and torch, put
//! the libraries in `site-packages/nvidia/*/lib`, where the dynamic loader never looks. Python's
//! `onnxruntime.preload_dlls()` opens them first; this does the same for onnx-lora. It opens the
//! provider library (`libonnxruntime_providers_cuda.so`, beside `libonnxruntime.so`), and while
//! that fails for a missing dependency (`libcublasLt.so.13: cannot open shared object file`),
//! opens that library by path from the `nvidia` folders with `RTLD_GLOBAL`, so the provider's
//! dependency then resolves to it by name. cuDNN, which onnxruntime opens by name only when a
//! kernel needs it, is opened from there too when the loader cannot find it. Only libraries the
//! provider asks for are opened, and nothing is tried without an NVIDIA driver (`libcuda.so.1`).
//!
//! Where the `nvidia` folders are looked for: beside the onnxruntime library's own folders (the
//! `site-packages` of a Python `onnxruntime-gpu`), then in the `site-packages` of the same
//! interpreters the library search asks (`$ONNX_LORA_PYTHON`, `./.venv/bin/python`, `python3`).

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What [`prepare`] did.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Libraries opened from pip's folders, in order.
    pub loaded: Vec<PathBuf>,
    /// A library the provider needs that no `nvidia` folder holds (the loader's name for it).
    pub missing: Option<String>,
    /// The `site-packages` folders searched for `nvidia/`, when any was needed.
    pub searched: Vec<PathBuf>,
}

/// The CUDA provider library beside the onnxruntime library at `ort_lib`.
pub fn provider_beside(ort_lib: &Path) -> PathBuf {
    ort_lib
        .parent()
        .unwrap_or(Path::new(""))
        .join("libonnxruntime_providers_cuda.so")
}

/// Opens, from pip's `nvidia` folders, the libraries the CUDA provider beside `ort_lib` needs
/// and the loader cannot find. `None` when there is nothing to do: no provider there (a
/// CPU-only onnxruntime), or no NVIDIA driver. `pythons` are the interpreters whose
/// `site-packages` are searched after the library's own.
pub fn prepare(ort_lib: &Path, pythons: &[PathBuf]) -> Option<Prepared> {
    let provider = provider_beside(ort_lib);
    if !provider.is_file() || Dl::open_name("libcuda.so.1", false).is_err() {
        return None;
    }
    let mut sites = Sites::new(ort_lib, pythons);
    let mut prepared = resolve(&provider, &mut sites, &mut |p, global| Dl::open(p, global));
    for name in cudnn_needed(&mut sites) {
        if let Ok(()) = Dl::open(&name, true) {
            prepared.loaded.push(name);
        }
    }
    prepared.searched = sites.searched();
    Some(prepared)
}

/// Opens `provider`; while that fails naming a missing library, opens that library from
/// `sites` (globally) and tries again. `open(path, global)` is `dlopen`, or a stand-in in tests.
fn resolve(
    provider: &Path,
    sites: &mut Sites,
    open: &mut dyn FnMut(&Path, bool) -> Result<(), String>,
) -> Prepared {
    let mut prepared = Prepared::default();
    // Each round opens one more library; a provider needs a handful.
    for _ in 0..32 {
        let err = match open(provider, false) {
            Ok(()) => return prepared,
            Err(e) => e,
        };
        let Some(name) = missing_library(&err) else {
            return prepared;
        };
        let Some(path) = sites.find(name) else {
            prepared.missing = Some(name.to_string());
            return prepared;
        };
        if prepared.loaded.contains(&path) || open(&path, true).is_err() {
            // Opening it did not help (or it has missing dependencies of its own, which the
            // provider's error will name): leave the message to onnxruntime.
            return prepared;
        }
        prepared.loaded.push(path);
    }
    prepared
}

/// The library a `dlopen` error says it could not find (glibc: `NAME: cannot open shared object
/// file: No such file or directory`).
fn missing_library(err: &str) -> Option<&str> {
    let (head, _) = err.split_once(": cannot open shared object file")?;
    let name = head.rsplit([' ', ':']).next()?.trim();
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// cuDNN's libraries, the ones `libcudnn` opens by name before it.
const CUDNN_PARTS: &[&str] = &[
    "libcudnn_graph",
    "libcudnn_engines_precompiled",
    "libcudnn_engines_runtime_compiled",
    "libcudnn_heuristic",
    "libcudnn_ops",
    "libcudnn_cnn",
    "libcudnn_adv",
    "libcudnn",
];

/// cuDNN files to open from pip's folders: those of the first folder holding `libcudnn.so.N`
/// when the loader does not already find that name; sub-libraries first.
fn cudnn_needed(sites: &mut Sites) -> Vec<PathBuf> {
    let Some(main) = sites.find_prefixed("libcudnn.so.") else {
        return Vec::new();
    };
    let soname = main.file_name().map(|n| n.to_string_lossy().into_owned());
    if soname.is_some_and(|n| Dl::open_name(&n, false).is_ok()) {
        return Vec::new();
    }
    let dir = main.parent().unwrap_or(Path::new("")).to_path_buf();
    let major = main
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libcudnn.so."))
        .unwrap_or("")
        .to_string();
    CUDNN_PARTS
        .iter()
        .map(|p| dir.join(format!("{p}.so.{major}")))
        .filter(|p| p.is_file())
        .collect()
}

/// The `site-packages` folders holding `nvidia/`, found lazily (interpreters are asked only
/// when the library's own neighbourhood lacks a file).
struct Sites<'a> {
    ort_lib: &'a Path,
    pythons: &'a [PathBuf],
    near: Option<Vec<PathBuf>>,
    far: Option<Vec<PathBuf>>,
}

impl<'a> Sites<'a> {
    fn new(ort_lib: &'a Path, pythons: &'a [PathBuf]) -> Self {
        Sites {
            ort_lib,
            pythons,
            near: None,
            far: None,
        }
    }

    /// Folders above the library (the `site-packages` of `.../onnxruntime/capi/`).
    fn near(&mut self) -> &[PathBuf] {
        let lib = self.ort_lib;
        self.near.get_or_insert_with(|| {
            let real = std::fs::canonicalize(lib).unwrap_or_else(|_| lib.to_path_buf());
            real.ancestors()
                .skip(1)
                .take(4)
                .filter(|a| a.join("nvidia").is_dir())
                .map(Path::to_path_buf)
                .collect()
        })
    }

    /// The interpreters' `site-packages` folders holding `nvidia/`.
    fn far(&mut self) -> &[PathBuf] {
        let pythons = self.pythons;
        self.far.get_or_insert_with(|| {
            let mut out: Vec<PathBuf> = Vec::new();
            for py in pythons {
                for dir in python_site_dirs(py) {
                    if dir.join("nvidia").is_dir() && !out.contains(&dir) {
                        out.push(dir);
                    }
                }
            }
            out
        })
    }

    fn searched(&self) -> Vec<PathBuf> {
        let mut all: Vec<PathBuf> = self.near.iter().flatten().cloned().collect();
        for d in self.far.iter().flatten() {
            if !all.contains(d) {
                all.push(d.clone());
            }
        }
        all
    }

    /// `nvidia/*/lib/NAME` in the near folders, else in the far ones.
    fn find(&mut self, name: &str) -> Option<PathBuf> {
        self.find_with(|dir| Some(dir.join(name)).filter(|p| p.is_file()))
    }

    /// The first `nvidia/*/lib/PREFIX*` file (name order), near folders first.
    fn find_prefixed(&mut self, prefix: &str) -> Option<PathBuf> {
        self.find_with(|dir| {
            let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect();
            names.sort();
            names.into_iter().next()
        })
    }

    fn find_with(&mut self, mut pick: impl FnMut(&Path) -> Option<PathBuf>) -> Option<PathBuf> {
        if let Some(p) = nvidia_lib_dirs(self.near()).iter().find_map(|d| pick(d)) {
            return Some(p);
        }
        nvidia_lib_dirs(self.far()).iter().find_map(|d| pick(d))
    }
}

/// `SITE/nvidia/*/lib` folders, in name order (CUDA 13's single `cu13` package, or CUDA 12's
/// one package per library, and `cudnn`).
fn nvidia_lib_dirs(sites: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for site in sites {
        let Ok(entries) = std::fs::read_dir(site.join("nvidia")) else {
            continue;
        };
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("lib"))
            .filter(|d| d.is_dir())
            .collect();
        dirs.sort();
        out.extend(dirs);
    }
    out
}

/// The interpreter's `site-packages` folders (empty if it does not run).
fn python_site_dirs(python: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new(python)
        .args([
            "-c",
            "import site,sys;print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]+sys.path))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .collect()
}

/// `dlopen`, kept open for the life of the process (onnxruntime opens the same libraries).
struct Dl;

impl Dl {
    fn open(path: &Path, global: bool) -> Result<(), String> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        Self::open_c(&c, global)
    }

    fn open_name(name: &str, global: bool) -> Result<(), String> {
        let c = CString::new(name).map_err(|e| e.to_string())?;
        Self::open_c(&c, global)
    }

    fn open_c(c: &CStr, global: bool) -> Result<(), String> {
        let flags = if global {
            libc::RTLD_NOW | libc::RTLD_GLOBAL
        } else {
            libc::RTLD_LAZY | libc::RTLD_LOCAL
        };
        // SAFETY: `c` is a valid NUL-terminated string; dlopen runs the library's
        // initializers, which is what onnxruntime does with the same files right after.
        let handle = unsafe { libc::dlopen(c.as_ptr(), flags) };
        if handle.is_null() {
            // SAFETY: dlerror returns a NUL-terminated message owned by libc, or null.
            let msg = unsafe { libc::dlerror() };
            if msg.is_null() {
                return Err("dlopen failed".into());
            }
            // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
            return Err(unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_reads_glibc_messages() {
        assert_eq!(
            missing_library(
                "libcublasLt.so.13: cannot open shared object file: No such file or directory"
            ),
            Some("libcublasLt.so.13")
        );
        // onnxruntime wraps it: "... Failed to load library X with error: NAME: cannot open ..."
        assert_eq!(
            missing_library(
                "FAIL : Failed to load library /x/libonnxruntime_providers_cuda.so with error: libcurand.so.10: cannot open shared object file: No such file or directory"
            ),
            Some("libcurand.so.10")
        );
        assert_eq!(missing_library("undefined symbol: cublasLtCreate"), None);
        assert_eq!(
            missing_library("/x/y.so: cannot open shared object file: No such file or directory"),
            None
        );
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    /// The provider's missing dependencies are opened one at a time from pip's folders beside
    /// the library, globally, until the provider opens; a name found nowhere stops it.
    #[test]
    fn resolve_opens_missing_dependencies_from_nvidia_folders() {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site-packages");
        let capi = site.join("onnxruntime/capi");
        let lib = capi.join("libonnxruntime.so.1.31.1");
        touch(&lib);
        touch(&provider_beside(&lib));
        touch(&site.join("nvidia/cu13/lib/libcublasLt.so.13"));
        touch(&site.join("nvidia/cu13/lib/libcudart.so.13"));
        let needs = ["libcudart.so.13", "libcublasLt.so.13"];
        let mut opened: Vec<(PathBuf, bool)> = Vec::new();
        let mut open = |p: &Path, global: bool| {
            opened.push((p.to_path_buf(), global));
            if p.ends_with("libonnxruntime_providers_cuda.so") {
                let have: Vec<String> = opened
                    .iter()
                    .filter(|(_, g)| *g)
                    .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
                    .collect();
                match needs.iter().find(|n| !have.iter().any(|h| h == *n)) {
                    Some(n) => Err(format!(
                        "{n}: cannot open shared object file: No such file or directory"
                    )),
                    None => Ok(()),
                }
            } else {
                Ok(())
            }
        };
        let mut sites = Sites::new(&lib, &[]);
        let got = resolve(&provider_beside(&lib), &mut sites, &mut open);
        let names: Vec<_> = got
            .loaded
            .iter()
            .map(|p| p.strip_prefix(&site).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            names,
            [
                PathBuf::from("nvidia/cu13/lib/libcudart.so.13"),
                PathBuf::from("nvidia/cu13/lib/libcublasLt.so.13")
            ]
        );
        assert_eq!(got.missing, None);
        // Every library went in globally, the provider itself never.
        assert!(
            opened
                .iter()
                .all(|(p, g)| *g != p.ends_with("libonnxruntime_providers_cuda.so"))
        );

        // A dependency no folder holds is named, and nothing more is tried.
        let mut open =
            |p: &Path, _: bool| {
                if p.ends_with("libonnxruntime_providers_cuda.so") {
                    Err("libcurand.so.10: cannot open shared object file: No such file or directory"
                    .to_string())
                } else {
                    Ok(())
                }
            };
        let mut sites = Sites::new(&lib, &[]);
        let got = resolve(&provider_beside(&lib), &mut sites, &mut open);
        assert!(got.loaded.is_empty());
        assert_eq!(got.missing.as_deref(), Some("libcurand.so.10"));
        assert_eq!(sites.searched(), std::slice::from_ref(&site));
    }

    /// cuDNN's parts come from the folder holding `libcudnn.so.N`, sub-libraries first.
    #[test]
    fn cudnn_parts_in_load_order() {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("lib/python3.12/site-packages");
        let lib = site.join("onnxruntime/capi/libonnxruntime.so");
        touch(&lib);
        let dir = site.join("nvidia/cudnn/lib");
        for n in ["libcudnn.so.9", "libcudnn_ops.so.9", "libcudnn_graph.so.9"] {
            touch(&dir.join(n));
        }
        let mut sites = Sites::new(&lib, &[]);
        let names: Vec<_> = cudnn_needed(&mut sites)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["libcudnn_graph.so.9", "libcudnn_ops.so.9", "libcudnn.so.9"]
        );
    }
}
