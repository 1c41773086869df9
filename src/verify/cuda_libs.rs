//! Makes the CUDA and cuDNN libraries that pip installs visible to onnxruntime's CUDA provider.
//!
//! `onnxruntime-gpu` from pip does not bundle CUDA: its `[cuda,cudnn]` extras, and torch, put
//! the libraries in `site-packages/nvidia/*/lib`, where the dynamic loader never looks. Python's
//! `onnxruntime.preload_dlls()` opens them first; this does the same for onnx-lora. It opens the
//! provider library (`libonnxruntime_providers_cuda.so`, beside the loaded `libonnxruntime.so`),
//! and while that fails for a missing dependency (`libcublasLt.so.13: cannot open shared object
//! file`), opens that library by path from the `nvidia` folders (first what *it* is missing),
//! after which the loader matches the provider's dependency to it by name. cuDNN is not linked
//! by onnxruntime 1.31's provider, which looks for it when a kernel first needs it (for the
//! unversioned `libcudnn.so`, which pip does not ship): when the loader cannot find
//! `libcudnn.so.9`, pip's and its parts are opened. Libraries the loader finds by itself are
//! never replaced, and nothing is tried without an NVIDIA driver (`libcuda.so.1`).
//!
//! How each is opened is what was seen to work on an H200 (onnxruntime-gpu 1.31.1, torch's CUDA
//! 13 wheels, the system's CUDA and cuDNN moved away): the provider is only probed, lazily and
//! locally, and that probe never succeeds on its own (the provider binds `Provider_GetHost` at
//! load, which onnxruntime's `libonnxruntime_providers_shared.so` supplies once onnxruntime has
//! loaded it); it serves to name the libraries the loader cannot find. Those, and cuDNN, are
//! opened from pip `RTLD_NOW | RTLD_GLOBAL`. (A version that opened cuDNN only after a
//! successful probe never opened it, and every CUDA session then failed at its first cuDNN
//! kernel: "dlopen failed for libcudnn.so".)
//!
//! Where the `nvidia` folders are looked for: above the onnxruntime library (the `site-packages`
//! of a Python `onnxruntime-gpu`), then in the `site-packages` of the same interpreters the
//! library search asks (`$ONNX_LORA_PYTHON`, `./.venv/bin/python`, `python3`). When CUDA 12 and
//! 13 packages share a `site-packages`, only the major version the provider links against is
//! used (read from its ELF dependencies): CUDA 13's single `nvidia/cu13` package first, another
//! major's `nvidia/cuNN` never.

use std::ffi::{CStr, CString};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// cuDNN's main library for onnxruntime-gpu's providers (cuDNN 9 since onnxruntime 1.19).
const CUDNN: &str = "libcudnn.so.9";

/// cuDNN 9's libraries, the parts `libcudnn` opens before it.
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

/// What [`prepare`] did.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Libraries opened from pip's folders, in order.
    pub loaded: Vec<PathBuf>,
    /// A library the provider needs that no `nvidia` folder holds (the loader's name for it).
    pub missing: Option<String>,
    /// A library found in pip's folders that did not open, and why.
    pub failed: Option<String>,
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

/// Opens, from pip's `nvidia` folders, the libraries the CUDA provider beside the loaded
/// onnxruntime (`ort_lib`, as it was given to the loader) needs and the loader cannot find.
/// `None` when there is nothing to do: no provider there (a CPU-only onnxruntime), or no
/// NVIDIA driver. `pythons` are the interpreters whose `site-packages` are searched after the
/// library's own.
pub fn prepare(ort_lib: &Path, pythons: &[PathBuf]) -> Option<Prepared> {
    prepare_with(&loaded_path(ort_lib)?, pythons, &mut Dl)
}

/// [`prepare`] for the library at `lib` (an absolute path), through `dl`.
fn prepare_with(lib: &Path, pythons: &[PathBuf], dl: &mut dyn Loader) -> Option<Prepared> {
    let provider = provider_beside(lib);
    if !provider.is_file() || dl.probe_name("libcuda.so.1").is_err() {
        return None;
    }
    let major = elf_needed(&provider).and_then(|n| cuda_major(&n));
    let mut sites = Sites::new(lib, pythons, major);
    let mut prepared = Prepared::default();
    // The provider is probed; what it needs is opened for good. The provider itself never
    // opens here: it binds `Provider_GetHost` at load (lazily or not), which onnxruntime's
    // shared provider library supplies once onnxruntime loads it. What matters is that its
    // libraries were found; cuDNN is not among them.
    ensure(
        &provider,
        &mut sites,
        &mut |p: &Path| {
            if p == provider {
                dl.probe(p)
            } else {
                dl.open_global(p)
            }
        },
        &mut prepared,
    );
    let pip_cudnn = if dl.probe_name(CUDNN).is_err() {
        sites.find(CUDNN)
    } else {
        None
    };
    for part in pip_cudnn
        .iter()
        .flat_map(|m| cudnn_files(m.parent().unwrap_or(Path::new(""))))
    {
        match dl.open_global(&part) {
            Ok(()) => prepared.loaded.push(part),
            Err(e) => {
                let _ = prepared
                    .failed
                    .get_or_insert_with(|| format!("{}: {}", part.display(), e.trim()));
            }
        }
    }
    prepared.searched = sites.searched();
    Some(prepared)
}

/// Opens `target`; while an open fails naming a missing library, opens that library from
/// `sites` first (and, the same way, what it is missing), then tries again. Returns whether
/// `target` opened; libraries opened on the way are added to `prepared.loaded`, a name found
/// nowhere to `missing`, another failure to `failed`. `open` is `dlopen`, or a stand-in in
/// tests.
fn ensure(
    target: &Path,
    sites: &mut Sites,
    open: &mut dyn FnMut(&Path) -> Result<(), String>,
    prepared: &mut Prepared,
) -> bool {
    let mut stack = vec![target.to_path_buf()];
    // Each round opens a library or goes one dependency deeper; a provider needs a handful.
    for _ in 0..64 {
        let Some(top) = stack.last().cloned() else {
            return true;
        };
        let err = match open(&top) {
            Ok(()) => {
                stack.pop();
                if stack.is_empty() {
                    return true;
                }
                prepared.loaded.push(top);
                continue;
            }
            Err(e) => e,
        };
        match missing_library(&err).map(|name| (name, sites.find(name))) {
            Some((_, Some(path))) if !stack.contains(&path) => stack.push(path),
            Some((name, None)) => {
                prepared.missing = Some(name.to_string());
                return false;
            }
            // Not a missing library (or a cycle): say which file and why, if it is one of ours.
            _ => {
                if top != target {
                    prepared.failed = Some(format!("{}: {}", top.display(), err.trim()));
                }
                return false;
            }
        }
    }
    false
}

/// cuDNN's files in `dir`, parts first (those present).
fn cudnn_files(dir: &Path) -> Vec<PathBuf> {
    let major = CUDNN.rsplit('.').next().unwrap_or("9");
    CUDNN_PARTS
        .iter()
        .map(|p| dir.join(format!("{p}.so.{major}")))
        .filter(|p| p.is_file())
        .collect()
}

/// The library a `dlopen` error says it could not find (glibc: `NAME: cannot open shared object
/// file: No such file or directory`).
fn missing_library(err: &str) -> Option<&str> {
    let (head, _) = err.split_once(": cannot open shared object file")?;
    let name = head.rsplit([' ', ':']).next()?.trim();
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// The CUDA major version a library links against, from its `libcudart.so.N` or
/// `libcublas(Lt).so.N` dependency.
fn cuda_major(needed: &[String]) -> Option<u32> {
    needed.iter().find_map(|n| {
        ["libcudart.so.", "libcublasLt.so.", "libcublas.so."]
            .iter()
            .find_map(|p| n.strip_prefix(p)?.parse().ok())
    })
}

/// The path the loader opened for `ort_lib`: itself (made absolute) when it names a folder,
/// else the mapped `libonnxruntime.so*` of this process (a bare name was found through the
/// loader's own search).
fn loaded_path(ort_lib: &Path) -> Option<PathBuf> {
    if ort_lib.components().count() > 1 {
        return std::fs::canonicalize(ort_lib).ok();
    }
    mapped_library("libonnxruntime.so")
}

/// The first file mapped into this process whose name starts with `prefix`.
fn mapped_library(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.find('/').map(|i| PathBuf::from(&l[i..])))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
}

/// The `DT_NEEDED` names of a 64-bit little-endian ELF file (`None` if it is not one, or is
/// damaged). Reads the section headers, the dynamic section and its string table only.
fn elf_needed(path: &Path) -> Option<Vec<String>> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = [0u8; 64];
    f.read_exact(&mut h).ok()?;
    if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |b: &[u8], o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let (shoff, shentsize, shnum) = (u64_at(&h, 0x28)?, u16_at(&h, 0x3a)?, u16_at(&h, 0x3c)?);
    if shentsize != 64 || shnum == 0 {
        return None;
    }
    let mut read = |off: u64, len: u64| -> Option<Vec<u8>> {
        // A dynamic section or its strings past 64 MB is not a real library.
        if len > 64 << 20 {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        f.seek(SeekFrom::Start(off)).ok()?;
        f.read_exact(&mut buf).ok()?;
        Some(buf)
    };
    let sh = read(shoff, u64::from(shnum) * 64)?;
    let section = |i: usize| -> Option<(u32, u64, u64, u32)> {
        let start = i.checked_mul(64)?;
        let s = sh.get(start..start.checked_add(64)?)?;
        Some((
            u32_at(s, 4)?,
            u64_at(s, 0x18)?,
            u64_at(s, 0x20)?,
            u32_at(s, 0x28)?,
        ))
    };
    const SHT_DYNAMIC: u32 = 6;
    let (_, dyn_off, dyn_size, link) =
        (0..usize::from(shnum)).find_map(|i| section(i).filter(|s| s.0 == SHT_DYNAMIC))?;
    let (_, str_off, str_size, _) = section(usize::try_from(link).ok()?)?;
    let dynamic = read(dyn_off, dyn_size)?;
    let strings = read(str_off, str_size)?;
    let mut out = Vec::new();
    for entry in dynamic.chunks_exact(16) {
        let (tag, val) = (u64_at(entry, 0)?, u64_at(entry, 8)?);
        match tag {
            0 => break,
            1 => {
                let rest = strings.get(usize::try_from(val).ok()?..)?;
                let name = CStr::from_bytes_until_nul(rest).ok()?;
                out.push(name.to_string_lossy().into_owned());
            }
            _ => {}
        }
    }
    Some(out)
}

/// The `site-packages` folders holding `nvidia/`, found lazily (interpreters are asked only
/// when the library's own neighbourhood lacks a file).
struct Sites<'a> {
    ort_lib: &'a Path,
    pythons: &'a [PathBuf],
    /// The CUDA major version the provider links against, when known.
    major: Option<u32>,
    near: Option<Vec<PathBuf>>,
    far: Option<Vec<PathBuf>>,
}

impl<'a> Sites<'a> {
    fn new(ort_lib: &'a Path, pythons: &'a [PathBuf], major: Option<u32>) -> Self {
        Sites {
            ort_lib,
            pythons,
            major,
            near: None,
            far: None,
        }
    }

    /// Folders above the library (the `site-packages` of `.../onnxruntime/capi/`).
    fn near(&mut self) -> &[PathBuf] {
        let lib = self.ort_lib;
        self.near.get_or_insert_with(|| {
            lib.ancestors()
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
        let major = self.major;
        let pick = |dir: &PathBuf| Some(dir.join(name)).filter(|p| p.is_file());
        if let Some(p) = nvidia_lib_dirs(self.near(), major).iter().find_map(pick) {
            return Some(p);
        }
        nvidia_lib_dirs(self.far(), major).iter().find_map(pick)
    }
}

/// `SITE/nvidia/*/lib` folders: `cuN` (CUDA 13 and later ship one package per major) first,
/// then the rest in name order (CUDA 12's one package per library, `cudnn`), without another
/// major's `cuNN`. With the major unknown, all of them in name order.
fn nvidia_lib_dirs(sites: &[PathBuf], major: Option<u32>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for site in sites {
        let Ok(entries) = std::fs::read_dir(site.join("nvidia")) else {
            continue;
        };
        let mut dirs: Vec<(bool, String)> = entries
            .flatten()
            .filter(|e| e.path().join("lib").is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter_map(|name| {
                let cu = name.strip_prefix("cu").and_then(|d| d.parse::<u32>().ok());
                match (cu, major) {
                    (Some(m), Some(want)) if m != want => None,
                    (Some(_), Some(_)) => Some((false, name)),
                    _ => Some((true, name)),
                }
            })
            .collect();
        dirs.sort();
        out.extend(
            dirs.into_iter()
                .map(|(_, name)| site.join("nvidia").join(name).join("lib")),
        );
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

/// How libraries are opened: [`Dl`], or a stand-in in tests.
trait Loader {
    /// Whether the library at `path` opens (`RTLD_LAZY | RTLD_LOCAL`).
    fn probe(&mut self, path: &Path) -> Result<(), String>;
    /// Whether the loader finds and opens `name` by itself.
    fn probe_name(&mut self, name: &str) -> Result<(), String>;
    /// Opens `path` for good (`RTLD_NOW | RTLD_GLOBAL`).
    fn open_global(&mut self, path: &Path) -> Result<(), String>;
}

/// `dlopen`, kept open for the life of the process (onnxruntime opens the same libraries; the
/// loader matches a dependency to a library already open by its name).
struct Dl;

impl Loader for Dl {
    fn probe(&mut self, path: &Path) -> Result<(), String> {
        Self::open_c(&Self::c_path(path)?, libc::RTLD_LAZY | libc::RTLD_LOCAL)
    }

    fn probe_name(&mut self, name: &str) -> Result<(), String> {
        let c = CString::new(name).map_err(|e| e.to_string())?;
        Self::open_c(&c, libc::RTLD_LAZY | libc::RTLD_LOCAL)
    }

    fn open_global(&mut self, path: &Path) -> Result<(), String> {
        Self::open_c(&Self::c_path(path)?, libc::RTLD_NOW | libc::RTLD_GLOBAL)
    }
}

impl Dl {
    fn c_path(path: &Path) -> Result<CString, String> {
        CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())
    }

    fn open_c(c: &CStr, flags: libc::c_int) -> Result<(), String> {
        // SAFETY: `c` is a valid NUL-terminated string; dlopen runs the library's
        // initializers, which is what onnxruntime does with the same files right after.
        let handle = unsafe { libc::dlopen(c.as_ptr(), flags) };
        if handle.is_null() {
            // SAFETY: dlerror returns a NUL-terminated message owned by libc (per thread), or
            // null; it is copied out before any other dl* call.
            let msg = unsafe { libc::dlerror() };
            if msg.is_null() {
                return Err("dlopen failed".into());
            }
            // SAFETY: non-null and NUL-terminated, as above.
            let text = unsafe { CStr::from_ptr(msg) };
            return Err(text.to_string_lossy().into_owned());
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

    /// A loader stand-in: `deps` says what each file name needs; a file opens once all its
    /// needs were opened before it.
    fn fake_loader<'a>(
        deps: &'a [(&'a str, &'a [&'a str])],
        opened: &'a mut Vec<String>,
    ) -> impl FnMut(&Path) -> Result<(), String> + 'a {
        move |p: &Path| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let needs = deps
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(&[][..], |d| d.1);
            match needs.iter().find(|n| !opened.iter().any(|o| o == *n)) {
                Some(n) => Err(format!(
                    "{n}: cannot open shared object file: No such file or directory"
                )),
                None => {
                    opened.push(name);
                    Ok(())
                }
            }
        }
    }

    /// A `site-packages` holding onnxruntime-gpu's library and CUDA provider (empty files):
    /// the folder (kept while it lives), the `site-packages` path, the library's path.
    fn fake_site() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site-packages");
        let lib = site.join("onnxruntime/capi/libonnxruntime.so.1.31.1");
        touch(&lib);
        touch(&provider_beside(&lib));
        (t, site, lib)
    }

    /// `ensure(provider)` through [`fake_loader`], CUDA 13 folders: whether it opened, what was
    /// done, and the folders searched.
    fn ensure_with(
        lib: &Path,
        provider: &Path,
        deps: &[(&str, &[&str])],
    ) -> (bool, Prepared, Vec<PathBuf>) {
        let mut opened = Vec::new();
        let mut prepared = Prepared::default();
        let mut sites = Sites::new(lib, &[], Some(13));
        let ok = ensure(
            provider,
            &mut sites,
            &mut fake_loader(deps, &mut opened),
            &mut prepared,
        );
        (ok, prepared, sites.searched())
    }

    /// The provider's missing dependencies, and theirs first, are opened from pip's folders
    /// beside the library until the provider opens; a name found nowhere stops it.
    #[test]
    fn ensure_opens_missing_dependencies_depth_first() {
        let (_t, site, lib) = fake_site();
        let provider = provider_beside(&lib);
        for n in ["libcublasLt.so.13", "libcublas.so.13", "libcudart.so.13"] {
            touch(&site.join("nvidia/cu13/lib").join(n));
        }
        let deps: &[(&str, &[&str])] = &[
            (
                "libonnxruntime_providers_cuda.so",
                &["libcublas.so.13", "libcudart.so.13"],
            ),
            ("libcublas.so.13", &["libcublasLt.so.13"]),
        ];
        let (ok, prepared, _) = ensure_with(&lib, &provider, deps);
        assert!(ok, "{prepared:?}");
        let names: Vec<_> = prepared
            .loaded
            .iter()
            .map(|p| {
                p.strip_prefix(&site)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "nvidia/cu13/lib/libcublasLt.so.13",
                "nvidia/cu13/lib/libcublas.so.13",
                "nvidia/cu13/lib/libcudart.so.13"
            ]
        );
        assert_eq!((prepared.missing, prepared.failed), (None, None));

        // A dependency no folder holds is named, and nothing more is tried.
        let deps: &[(&str, &[&str])] =
            &[("libonnxruntime_providers_cuda.so", &["libcurand.so.10"])];
        let (ok, prepared, searched) = ensure_with(&lib, &provider, deps);
        assert!(!ok);
        assert!(prepared.loaded.is_empty());
        assert_eq!(prepared.missing.as_deref(), Some("libcurand.so.10"));
        assert_eq!(searched, std::slice::from_ref(&site));

        // A found library that fails for another reason is named with its error.
        let mut prepared = Prepared::default();
        let mut sites = Sites::new(&lib, &[], Some(13));
        let mut open = |p: &Path| {
            if p.ends_with("libcudart.so.13") {
                Err("libcudart.so.13: undefined symbol: x".to_string())
            } else if p == provider {
                Err("libcudart.so.13: cannot open shared object file: No such file".to_string())
            } else {
                Ok(())
            }
        };
        assert!(!ensure(&provider, &mut sites, &mut open, &mut prepared));
        let failed = prepared.failed.unwrap();
        assert!(
            failed.contains("nvidia/cu13/lib/libcudart.so.13: libcudart.so.13: undefined symbol"),
            "{failed}"
        );
    }

    /// With CUDA 12 and 13 packages side by side, each major takes its own: 13 its `cu13`
    /// package before anything else, 12 never `cu13`.
    #[test]
    fn folders_of_the_providers_cuda_major() {
        let t = tempfile::tempdir().unwrap();
        let site = t.path().join("site-packages");
        for d in ["cu13", "cudnn", "curand", "cublas"] {
            touch(&site.join("nvidia").join(d).join("lib/x"));
        }
        let rel = |major| -> Vec<String> {
            nvidia_lib_dirs(std::slice::from_ref(&site), major)
                .iter()
                .map(|p| {
                    p.strip_prefix(site.join("nvidia"))
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        assert_eq!(
            rel(Some(13)),
            ["cu13/lib", "cublas/lib", "cudnn/lib", "curand/lib"]
        );
        assert_eq!(rel(Some(12)), ["cublas/lib", "cudnn/lib", "curand/lib"]);
        assert_eq!(
            rel(None),
            ["cu13/lib", "cublas/lib", "cudnn/lib", "curand/lib"]
        );
        assert_eq!(
            cuda_major(&["libcublasLt.so.13".into(), "libcudart.so.13".into()]),
            Some(13)
        );
        assert_eq!(cuda_major(&["libcurand.so.10".into()]), None);
    }

    /// A loader like onnxruntime-gpu 1.31's on an H200 with only pip's CUDA: the driver is
    /// there; the provider needs `deps`, and once they are open it still fails to open on its
    /// own (`Provider_GetHost`); cuDNN is not on the loader's path.
    struct GpuLike {
        deps: Vec<&'static str>,
        global: Vec<PathBuf>,
        /// A library whose opening fails (an undefined symbol, say).
        broken: Option<&'static str>,
    }

    impl Loader for GpuLike {
        fn probe(&mut self, path: &Path) -> Result<(), String> {
            let missing = self
                .deps
                .iter()
                .find(|d| !self.global.iter().any(|g| g.ends_with(d)));
            Err(match missing {
                Some(d) => {
                    format!("{d}: cannot open shared object file: No such file or directory")
                }
                None => format!("{}: undefined symbol: Provider_GetHost", path.display()),
            })
        }
        fn probe_name(&mut self, name: &str) -> Result<(), String> {
            match name {
                "libcuda.so.1" => Ok(()),
                _ => Err(format!("{name}: cannot open shared object file")),
            }
        }
        fn open_global(&mut self, path: &Path) -> Result<(), String> {
            if self.broken.is_some_and(|b| path.ends_with(b)) {
                return Err("undefined symbol: cudnnGraphNothing".into());
            }
            self.global.push(path.to_path_buf());
            Ok(())
        }
    }

    /// The provider never opens on its own, yet its libraries and cuDNN (parts first) are all
    /// opened from pip, globally. (A version that waited for the provider to open before cuDNN
    /// never opened cuDNN, and every CUDA session failed at its first cuDNN kernel.)
    #[test]
    fn prepare_opens_dependencies_and_cudnn_though_the_provider_never_opens() {
        let (_t, site, lib) = fake_site();
        for n in ["libcublasLt.so.13", "libcudart.so.13"] {
            touch(&site.join("nvidia/cu13/lib").join(n));
        }
        for n in ["libcudnn.so.9", "libcudnn_graph.so.9", "libcudnn_ops.so.9"] {
            touch(&site.join("nvidia/cudnn/lib").join(n));
        }
        let mut dl = GpuLike {
            deps: vec!["libcublasLt.so.13", "libcudart.so.13"],
            global: Vec::new(),
            broken: None,
        };
        let got = prepare_with(&lib, &[], &mut dl).expect("a provider and a driver");
        let rel = |v: &[PathBuf]| -> Vec<String> {
            v.iter()
                .map(|p| {
                    p.strip_prefix(&site)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        let want = [
            "nvidia/cu13/lib/libcublasLt.so.13",
            "nvidia/cu13/lib/libcudart.so.13",
            "nvidia/cudnn/lib/libcudnn_graph.so.9",
            "nvidia/cudnn/lib/libcudnn_ops.so.9",
            "nvidia/cudnn/lib/libcudnn.so.9",
        ];
        assert_eq!(rel(&got.loaded), want);
        assert_eq!(rel(&dl.global), want);
        assert_eq!((got.missing, got.failed), (None, None));
        // A cuDNN part that does not open is named (the others still open).
        let mut dl = GpuLike {
            deps: vec![],
            global: Vec::new(),
            broken: Some("libcudnn_ops.so.9"),
        };
        let got = prepare_with(&lib, &[], &mut dl).unwrap();
        let failed = got.failed.unwrap_or_default();
        assert!(
            failed.contains("libcudnn_ops.so.9: undefined symbol"),
            "{failed}"
        );
        assert_eq!(got.loaded.len(), 2, "{:?}", got.loaded);
        // No driver: nothing is tried.
        struct NoDriver;
        impl Loader for NoDriver {
            fn probe(&mut self, _: &Path) -> Result<(), String> {
                panic!("probed without a driver")
            }
            fn probe_name(&mut self, name: &str) -> Result<(), String> {
                Err(format!("{name}: cannot open shared object file"))
            }
            fn open_global(&mut self, _: &Path) -> Result<(), String> {
                panic!("opened without a driver")
            }
        }
        assert!(prepare_with(&lib, &[], &mut NoDriver).is_none());
    }

    /// cuDNN's parts come before its main library.
    #[test]
    fn cudnn_parts_in_load_order() {
        let t = tempfile::tempdir().unwrap();
        for n in [
            "libcudnn.so.9",
            "libcudnn_ops.so.9",
            "libcudnn_graph.so.9",
            "libcudnn.so.8",
        ] {
            touch(&t.path().join(n));
        }
        let names: Vec<_> = cudnn_files(t.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["libcudnn_graph.so.9", "libcudnn_ops.so.9", "libcudnn.so.9"]
        );
    }

    /// The ELF reader finds this test binary's own dependencies, and refuses what is not ELF.
    #[test]
    fn elf_needed_reads_dependencies() {
        let exe = std::env::current_exe().unwrap();
        let needed = elf_needed(&exe).expect("the test binary is a 64-bit ELF");
        assert!(
            needed.iter().any(|n| n.starts_with("libc.so")),
            "{needed:?}"
        );
        let t = tempfile::tempdir().unwrap();
        let junk = t.path().join("junk.so");
        std::fs::write(&junk, b"\x7fELF\x02\x01 not really").unwrap();
        assert_eq!(elf_needed(&junk), None);
        assert_eq!(elf_needed(&t.path().join("absent.so")), None);
    }

    /// A path is made absolute; a bare name is looked up among the files this process mapped.
    #[test]
    fn loaded_path_of_names_and_paths() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("libonnxruntime.so");
        touch(&lib);
        assert_eq!(
            loaded_path(&lib),
            Some(std::fs::canonicalize(&lib).unwrap())
        );
        let libc = mapped_library("libc.so").expect("this process maps the C library");
        assert!(libc.is_absolute() && libc.is_file(), "{}", libc.display());
        assert_eq!(mapped_library("libnothing-such.so"), None);
    }
}
