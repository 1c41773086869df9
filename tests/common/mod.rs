//! Helpers shared by the integration tests: the built binary, the Python with onnx and
//! onnxruntime that `scripts/test.sh` installs, and paths to fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    root().join("fixtures")
}

/// Runs the onnx-lora binary with `args`.
pub fn onnx_lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
        .args(args)
        .output()
        .expect("the onnx-lora binary runs")
}

/// Runs the binary and asserts success, returning stdout.
pub fn onnx_lora_ok(args: &[&str]) -> String {
    let out = onnx_lora(args);
    assert!(
        out.status.success(),
        "onnx-lora {:?} failed ({:?}): {}",
        args,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Python interpreter with `onnx`, `onnxruntime` and `numpy` (the test venv). Tests that
/// need it fail, never skip, when it is missing: `scripts/test.sh` installs it.
pub fn python() -> PathBuf {
    let p = std::env::var_os("ONNX_LORA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run scripts/test.sh (it creates the venv with onnx and onnxruntime), or set ONNX_LORA_PYTHON",
        p.display()
    );
    p
}

/// Runs a Python script from tests/py with arguments; asserts it succeeds; returns stdout.
pub fn py(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python())
        .arg(root().join("tests/py").join(script))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The folder of the onnx package's backend test models (inside the test venv).
pub fn onnx_backend_data() -> PathBuf {
    let out = Command::new(python())
        .args([
            "-c",
            "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend', 'test', 'data'))",
        ])
        .output()
        .expect("python runs");
    assert!(out.status.success(), "the onnx package is not importable");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Every file under `dir` with the given extension, sorted.
pub fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
