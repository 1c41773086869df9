//! `onnx-lora verify` end to end, on models made by tests/py/make_verify_models.py (an MLP with
//! embeddings; the same with one bias element moved by 1e-2; an fp16 copy; a single-output
//! copy; copies taking other inputs; a Det model tract cannot run) and outputs onnxruntime
//! computed in Python. Tests that need onnxruntime fail, never skip, when it is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;
use onnx_lora::onnx::DataType;
use onnx_lora::verify::ArrayData;
use onnx_lora::verify::npz::{read_arrays, write_npz};
use serde_json::Value;

/// The generated models and data, made once per test binary.
fn data() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        py("make_verify_models.py", &[&dir]);
        dir
    })
}

fn file(name: &str) -> String {
    data().join(name).to_str().unwrap().to_string()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `onnx-lora verify ARGS` with extra environment (`None` removes a variable) in `cwd`.
fn verify_in(args: &[&str], env: &[(&str, Option<&str>)], cwd: &Path) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onnx-lora"));
    cmd.arg("verify").args(args).current_dir(cwd);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn verify(args: &[&str]) -> Run {
    verify_in(args, &[], &root())
}

/// `verify ARGS` where the search for onnxruntime finds nothing: no --ort-lib, no
/// ORT_DYLIB_PATH, an ONNX_LORA_PYTHON that does not exist, no python3 on PATH, a working
/// folder without .venv (the machine has no system-wide libonnxruntime).
fn verify_without_ort(args: &[&str]) -> Run {
    let cwd = tempfile::tempdir().unwrap();
    let bin = cwd.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    verify_in(
        args,
        &[
            ("ORT_DYLIB_PATH", None),
            ("ONNX_LORA_PYTHON", Some("/nonexistent/python")),
            ("PATH", Some(bin.to_str().unwrap())),
            ("LD_LIBRARY_PATH", None),
        ],
        cwd.path(),
    )
}

/// Asserts an error: exit 2, nothing on stdout, one line on stderr containing each of `want`.
fn expect_error(r: &Run, what: &str, want: &[&str]) {
    expect_code(r, 2, what);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{what}: {}", r.stderr);
    assert!(r.stdout.is_empty(), "{what}: {}", r.stdout);
    for w in want {
        assert!(r.stderr.contains(w), "{what}: no '{w}' in {}", r.stderr);
    }
}

/// Writes `arrays` as an npz in the data folder; returns its path.
fn npz(name: &str, arrays: &[(String, ArrayData)]) -> String {
    let path = file(name);
    write_npz(Path::new(&path), arrays).unwrap();
    path
}

/// inputs.npz with `input` replaced by `arr` (or left out when `None`).
fn inputs_with(input: &str, arr: Option<ArrayData>) -> Vec<(String, ArrayData)> {
    let mut arrays = read_arrays(Path::new(&file("inputs.npz"))).unwrap();
    let i = arrays.iter().position(|(n, _)| n == input).unwrap();
    match arr {
        Some(a) => arrays[i].1 = a,
        None => drop(arrays.remove(i)),
    }
    arrays
}

fn expect_code(r: &Run, code: i32, what: &str) {
    assert_eq!(
        r.code, code,
        "{what}: exit {} (want {code})\nstdout:\n{}\nstderr:\n{}",
        r.code, r.stdout, r.stderr
    );
}

/// The JSON Lines records of a `--json` run.
fn records(r: &Run) -> Vec<Value> {
    r.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn output<'a>(recs: &'a [Value], name: &str) -> &'a Value {
    recs.iter()
        .find(|r| r["type"] == "output" && r["name"] == name)
        .unwrap_or_else(|| panic!("no output record for {name}: {recs:?}"))
}

fn verdict(recs: &[Value]) -> &Value {
    let last = recs.last().unwrap();
    assert_eq!(last["type"], "verdict", "{recs:?}");
    last
}

#[test]
fn equal_models_pass_on_cpu_and_tract() {
    // The token-type table has 2 rows and ids go through a Cast: generated ids outside it
    // would make onnxruntime fail, so passing on cpu also checks the Gather bound.
    for ep in ["cpu", "tract"] {
        let r = verify(&[&file("mlp.onnx"), &file("mlp.onnx"), "--ep", ep]);
        expect_code(&r, 0, ep);
        assert!(
            r.stdout
                .contains(&format!("PASS: 2 outputs equal within tolerance (ep {ep})")),
            "{}",
            r.stdout
        );
    }
}

#[test]
fn perturbed_model_fails_on_cpu_and_tract() {
    for ep in ["cpu", "tract"] {
        let r = verify(&[
            &file("mlp.onnx"),
            &file("mlp_perturbed.onnx"),
            "--ep",
            ep,
            "--json",
        ]);
        expect_code(&r, 1, ep);
        let recs = records(&r);
        let logits = output(&recs, "logits");
        assert_eq!(logits["status"], "differ");
        let d = logits["max_abs_diff"].as_f64().unwrap();
        assert!((d - 1e-2).abs() < 1e-5, "{ep}: max abs diff {d}");
        assert_eq!(output(&recs, "hidden")["status"], "pass");
        assert_eq!(verdict(&recs)["passed"], false);
        let text = verify(&[&file("mlp.onnx"), &file("mlp_perturbed.onnx"), "--ep", ep]);
        assert!(
            text.stdout.contains("FAIL: 1 of 2 outputs differ"),
            "{}",
            text.stdout
        );
    }
}

#[test]
fn tolerances_move_the_verdict_as_documented() {
    // The perturbation moves every logits[..., 0] by 1e-2: |a - b| <= atol + rtol * |b|.
    let (a, b) = (file("mlp.onnx"), file("mlp_perturbed.onnx"));
    let cases: [(&[&str], i32); 5] = [
        (&["--atol", "0.1"], 0),
        (&["--atol", "0.0101", "--rtol", "0"], 0),
        (&["--atol", "0.0099", "--rtol", "0"], 1),
        (&["--atol", "0", "--rtol", "1e6"], 0),
        (&["--atol", "0", "--rtol", "0"], 1),
    ];
    for (flags, code) in cases {
        let mut args = vec![a.as_str(), b.as_str(), "--ep", "cpu"];
        args.extend_from_slice(flags);
        expect_code(&verify(&args), code, &format!("{flags:?}"));
    }
    // Equal models pass even with zero tolerance.
    expect_code(
        &verify(&[&a, &a, "--ep", "cpu", "--atol", "0", "--rtol", "0"]),
        0,
        "zero tolerance",
    );
}

#[test]
fn default_tolerances_follow_the_dtype() {
    let r = verify(&[
        &file("mlp.onnx"),
        &file("mlp_fp16.onnx"),
        "--ep",
        "cpu",
        "--json",
    ]);
    expect_code(&r, 0, "fp32 vs fp16");
    let recs = records(&r);
    let logits = output(&recs, "logits");
    assert_eq!(
        (logits["dtype_a"].as_str(), logits["dtype_b"].as_str()),
        (Some("float32"), Some("float16"))
    );
    assert_eq!(
        (logits["atol"].as_f64(), logits["rtol"].as_f64()),
        (Some(1e-2), Some(1e-2))
    );
    let r = verify(&[
        &file("mlp.onnx"),
        &file("mlp.onnx"),
        "--ep",
        "cpu",
        "--json",
    ]);
    let recs = records(&r);
    assert_eq!(output(&recs, "logits")["atol"].as_f64(), Some(1e-4));
    assert!(output(&recs, "logits").get("tolerance_of").is_none());
}

/// A model that computes in float16 behind float32 inputs and outputs (onnxruntime's
/// converter, keep_io_types) differs from its float32 original by float16 rounding: its
/// float32 outputs take float16's tolerances, with a note; --atol / --rtol still decide.
#[test]
fn models_computing_in_float16_take_its_tolerances() {
    let (a, b) = (file("mlp_keepio.onnx"), file("mlp.onnx"));
    let r = verify(&[&a, &b, "--ep", "cpu", "--json"]);
    expect_code(&r, 0, "keep_io fp16 vs fp32");
    let recs = records(&r);
    let logits = output(&recs, "logits");
    assert_eq!(logits["dtype_a"].as_str(), Some("float32"), "{logits}");
    assert_eq!(logits["tolerance_of"].as_str(), Some("float16"), "{logits}");
    assert_eq!(
        (logits["atol"].as_f64(), logits["rtol"].as_f64()),
        (Some(1e-2), Some(1e-2))
    );
    // The difference is float16's, beyond float32's tolerance: the loosening is needed.
    assert!(logits["max_abs_diff"].as_f64().unwrap() > 1e-4, "{logits}");
    assert!(
        r.stderr.contains("the models compute in float16") && r.stderr.contains("logits"),
        "{}",
        r.stderr
    );
    let r = verify(&[&a, &b, "--ep", "cpu", "--atol", "1e-6", "--rtol", "0"]);
    expect_code(&r, 1, "explicit tolerances");
    assert!(!r.stderr.contains("compute in float16"), "{}", r.stderr);
}

#[test]
fn expect_against_stored_outputs() {
    let (inputs, model) = (file("inputs.npz"), file("mlp.onnx"));
    // expected.npz was computed by onnxruntime in Python: tract agreeing with it is tract
    // agreeing with onnxruntime.
    for ep in ["cpu", "tract"] {
        let r = verify(&[
            &model,
            "--inputs",
            &inputs,
            "--expect",
            &file("expected.npz"),
            "--ep",
            ep,
        ]);
        expect_code(&r, 0, ep);
        let r = verify(&[
            &model,
            "--inputs",
            &inputs,
            "--expect",
            &file("wrong.npz"),
            "--ep",
            ep,
        ]);
        expect_code(&r, 1, ep);
    }
    let single = file("mlp_single.onnx");
    let r = verify(&[
        &single,
        "--inputs",
        &inputs,
        "--expect",
        &file("logits.npy"),
        "--ep",
        "cpu",
    ]);
    expect_code(&r, 0, ".npy for a single-output model");
    let r = verify(&[
        &model,
        "--inputs",
        &inputs,
        "--expect",
        &file("logits.npy"),
        "--ep",
        "cpu",
    ]);
    expect_code(&r, 2, ".npy for a two-output model");
    assert!(r.stderr.contains("store them in an .npz"), "{}", r.stderr);
}

#[test]
fn ort_and_tract_agree_on_generated_inputs() {
    // Same seed, same generated feeds on both runtimes: fp32 vs fp16 differences agree.
    let diff = |ep: &str| {
        let r = verify(&[
            &file("mlp.onnx"),
            &file("mlp_fp16.onnx"),
            "--ep",
            ep,
            "--json",
            "--seed",
            "3",
        ]);
        expect_code(&r, 0, ep);
        let recs = records(&r);
        output(&recs, "logits")["max_abs_diff"].as_f64().unwrap()
    };
    let (cpu, tract) = (diff("cpu"), diff("tract"));
    // Both compare fp32 with fp16 results; the fp16 kernels differ a little between runtimes.
    assert!(
        cpu > 0.0 && tract > 0.0 && (cpu - tract).abs() < 5e-3,
        "cpu {cpu} tract {tract}"
    );
}

#[test]
fn shape_mismatch_and_missing_outputs_are_differences() {
    let r = verify(&[
        &file("mlp.onnx"),
        "--expect",
        &file("expected.npz"),
        "--dim",
        "sequence=3",
        "--ep",
        "cpu",
        "--json",
    ]);
    expect_code(&r, 1, "shape mismatch");
    let recs = records(&r);
    let logits = output(&recs, "logits");
    assert_eq!(logits["status"], "shape_mismatch");
    assert_eq!(logits["shape_a"], serde_json::json!([1, 3, 8]));
    assert_eq!(logits["shape_b"], serde_json::json!([2, 5, 8]));
    // Values of different shapes are not compared: no mismatch count, not "0 of N".
    assert_eq!(logits["mismatches"], Value::Null, "{logits}");
    assert_eq!(logits["missing_in"], Value::Null, "{logits}");
    let r = verify(&[
        &file("mlp.onnx"),
        "--expect",
        &file("expected.npz"),
        "--dim",
        "sequence=3",
        "--ep",
        "cpu",
    ]);
    expect_code(&r, 1, "shape mismatch, text");
    let line = r.stdout.lines().find(|l| l.starts_with("logits")).unwrap();
    assert!(
        line.contains("SHAPE [1, 3, 8] vs [2, 5, 8]") && !line.contains("0/"),
        "{}",
        r.stdout
    );
    let r = verify(&[
        &file("mlp_single.onnx"),
        &file("mlp.onnx"),
        "--ep",
        "cpu",
        "--json",
    ]);
    expect_code(&r, 1, "missing output");
    let recs = records(&r);
    let hidden = output(&recs, "hidden");
    assert_eq!(hidden["status"], "missing");
    assert_eq!(hidden["missing_in"], "a", "{hidden}");
    assert_eq!(hidden["mismatches"], Value::Null, "{hidden}");
    assert_eq!(output(&recs, "logits")["status"], "pass");
    assert_eq!(output(&recs, "logits")["mismatches"], 0);
    // Both ways round, in the table: which side lacks it, and no "0/N" mismatch count.
    for (a, b, status) in [
        ("mlp_single.onnx", "mlp.onnx", "MISSING in A"),
        ("mlp.onnx", "mlp_single.onnx", "MISSING in B"),
    ] {
        let r = verify(&[&file(a), &file(b), "--ep", "cpu"]);
        expect_code(&r, 1, status);
        let line = r.stdout.lines().find(|l| l.starts_with("hidden")).unwrap();
        assert!(
            line.contains(status) && !line.contains("0/"),
            "{status}: {}",
            r.stdout
        );
        assert!(
            r.stdout.contains("FAIL: 1 of 2 outputs differ"),
            "{}",
            r.stdout
        );
    }
}

#[test]
fn dims_and_runs() {
    let r = verify(&[
        &file("mlp.onnx"),
        &file("mlp.onnx"),
        "--ep",
        "cpu",
        "--dim",
        "batch=2",
        "--dim",
        "sequence=4",
        "--runs",
        "3",
        "--json",
    ]);
    expect_code(&r, 0, "dims");
    let recs = records(&r);
    assert_eq!(
        output(&recs, "hidden")["shape_a"],
        serde_json::json!([2, 4, 32])
    );
    let models = verdict(&recs)["models"].as_array().unwrap().clone();
    assert_eq!(models.len(), 2);
    for m in models {
        assert_eq!(m["runs"], 3);
        assert!(m["mean_ms"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["first_ms"].as_f64().unwrap() > 0.0, "{m}");
    }
    // Default dims: batch 1, sequence 8.
    let r = verify(&[
        &file("mlp.onnx"),
        &file("mlp.onnx"),
        "--ep",
        "cpu",
        "--json",
    ]);
    assert_eq!(
        output(&records(&r), "logits")["shape_a"],
        serde_json::json!([1, 8, 8])
    );
}

#[test]
fn cuda_fails_clearly_and_auto_reports_cpu() {
    // This machine has onnxruntime without CUDA: --ep cuda must fail, not fall back.
    let r = verify(&[&file("mlp.onnx"), &file("mlp.onnx"), "--ep", "cuda"]);
    expect_code(&r, 2, "--ep cuda");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("CUDA execution provider") && r.stderr.contains("onnxruntime-gpu"),
        "{}",
        r.stderr
    );

    let r = verify(&[&file("mlp.onnx"), &file("mlp.onnx")]);
    expect_code(&r, 0, "--ep auto");
    assert!(r.stdout.contains("(ep cpu)"), "{}", r.stdout);
    let r = verify(&[&file("mlp.onnx"), &file("mlp.onnx"), "--json"]);
    let recs = records(&r);
    let v = verdict(&recs);
    assert_eq!(v["ep"], "cpu");
    assert_eq!(v["passed"], true);
    assert!(
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["ep"] == "cpu"),
        "{v}"
    );
}

#[test]
fn missing_model_is_an_error_naming_it() {
    let missing = data().join("nope.onnx");
    let r = verify(&[missing.to_str().unwrap(), &file("mlp.onnx"), "--ep", "cpu"]);
    expect_code(&r, 2, "missing model");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains(missing.to_str().unwrap()), "{}", r.stderr);
    let r = verify(&[
        &file("mlp.onnx"),
        "--expect",
        missing.to_str().unwrap(),
        "--ep",
        "cpu",
    ]);
    expect_code(&r, 2, "missing expected file");
    assert!(r.stderr.contains("nope.onnx"), "{}", r.stderr);
}

#[test]
fn no_onnxruntime_says_how_to_get_it() {
    let r = verify(&[
        &file("mlp.onnx"),
        &file("mlp.onnx"),
        "--ep",
        "cpu",
        "--ort-lib",
        "/nonexistent",
    ]);
    expect_code(&r, 2, "--ort-lib /nonexistent");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    for want in [
        "/nonexistent",
        "pip install onnxruntime",
        "ORT_DYLIB_PATH",
        "--ep tract",
    ] {
        assert!(r.stderr.contains(want), "missing '{want}': {}", r.stderr);
    }
    let r = verify_in(
        &[&file("mlp.onnx"), &file("mlp.onnx"), "--ep", "cpu"],
        &[("ORT_DYLIB_PATH", Some("/nonexistent/libonnxruntime.so"))],
        &root(),
    );
    expect_code(&r, 2, "ORT_DYLIB_PATH=/nonexistent");
    assert!(
        r.stderr.contains("ORT_DYLIB_PATH") && r.stderr.contains("pip install onnxruntime"),
        "{}",
        r.stderr
    );
}

#[test]
fn auto_falls_back_to_tract_without_onnxruntime() {
    let r = verify_without_ort(&[&file("mlp.onnx"), &file("mlp.onnx"), "--json"]);
    expect_code(&r, 0, "auto without onnxruntime");
    assert!(
        r.stderr.contains("no onnxruntime library found") && r.stderr.contains("tract"),
        "{}",
        r.stderr
    );
    assert_eq!(verdict(&records(&r))["ep"], "tract");
}

#[test]
fn a_named_onnxruntime_library_that_does_not_load_is_an_error_with_auto() {
    // The user named a library: tract standing in for it would hide the mistake.
    let lib = "/nonexistent/libonnxruntime.so";
    let r = verify(&[&file("mlp.onnx"), &file("mlp.onnx"), "--ort-lib", lib]);
    expect_error(
        &r,
        "--ort-lib, --ep auto",
        &[lib, "--ort-lib", "could not be loaded"],
    );
    assert!(!r.stderr.contains("note"), "{}", r.stderr);
    let r = verify_in(
        &[&file("mlp.onnx"), &file("mlp.onnx")],
        &[("ORT_DYLIB_PATH", Some(lib))],
        &root(),
    );
    expect_error(&r, "ORT_DYLIB_PATH, --ep auto", &[lib, "ORT_DYLIB_PATH"]);
    // A file that exists but is no onnxruntime library; and inject --verify the same way.
    let not_a_lib = file("inputs.npz");
    let r = verify(&[
        &file("mlp.onnx"),
        &file("mlp.onnx"),
        "--ort-lib",
        &not_a_lib,
    ]);
    expect_error(&r, "not a library", &[&not_a_lib, "could not be loaded"]);
    let out = data().join("injected.onnx");
    let o = onnx_lora(&[
        "inject",
        &file("mlp.onnx"),
        "--rank",
        "2",
        "-o",
        out.to_str().unwrap(),
        "--verify",
        "--ort-lib",
        lib,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    // Its report of what it wrote, then the error.
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.starts_with("onnx-lora: error: ") && last.contains(lib) && !err.contains("note"),
        "{err}"
    );
}

/// A stand-in onnxruntime library that reports an old version (what `ort` checks before
/// anything else), compiled with the C compiler that links this crate; in a folder of its own
/// as `libonnxruntime.so`.
fn old_onnxruntime(dir: &Path) -> PathBuf {
    let src = dir.join("old_ort.c");
    std::fs::write(
        &src,
        "#include <stdint.h>\n\
         typedef struct { const void *(*get_api)(uint32_t); const char *(*version)(void); } base_t;\n\
         static const void *get_api(uint32_t v) { (void)v; return 0; }\n\
         static const char *version(void) { return \"1.22.0\"; }\n\
         static const base_t base = { get_api, version };\n\
         const base_t *OrtGetApiBase(void) { return &base; }\n",
    )
    .unwrap();
    let lib = dir.join("libonnxruntime.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let o = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    lib
}

/// An onnxruntime older than `ort` needs is named with its version, whether the user named it
/// or the dynamic loader found it by its bare name; `--ep auto` then falls back to tract.
#[test]
fn an_older_onnxruntime_is_named_with_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let lib = old_onnxruntime(dir.path());
    let lib_s = lib.to_str().unwrap();
    let r = verify(&[&file("mlp.onnx"), &file("mlp.onnx"), "--ort-lib", lib_s]);
    expect_error(
        &r,
        "--ort-lib old",
        &[
            lib_s,
            "could not be loaded",
            "'1.22.0'",
            "pip install onnxruntime",
        ],
    );
    // (found by the loader: the search finds nothing else)
    let cwd = tempfile::tempdir().unwrap();
    let bin = cwd.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let env = [
        ("ORT_DYLIB_PATH", None),
        ("ONNX_LORA_PYTHON", Some("/nonexistent/python")),
        ("PATH", Some(bin.to_str().unwrap())),
        ("LD_LIBRARY_PATH", Some(dir.path().to_str().unwrap())),
    ];
    let both = [file("mlp.onnx"), file("mlp.onnx")];
    let args = |ep: &'static str| [both[0].as_str(), both[1].as_str(), "--ep", ep];
    let r = verify_in(&args("cpu"), &env, cwd.path());
    expect_error(
        &r,
        "bare name, old",
        &[
            "no onnxruntime library found",
            "the dynamic loader's libonnxruntime.so",
            "'1.22.0'",
        ],
    );
    let r = verify_in(&args("auto"), &env, cwd.path());
    expect_code(&r, 0, "bare name, old, auto");
    assert!(
        r.stderr.contains("'1.22.0'") && r.stderr.contains("tract"),
        "{}",
        r.stderr
    );
}

#[test]
fn finds_onnxruntime_through_python() {
    // Neither ORT_DYLIB_PATH nor a ./.venv: only the interpreter named by ONNX_LORA_PYTHON.
    let cwd = tempfile::tempdir().unwrap();
    let py = python();
    let r = verify_in(
        &[&file("mlp.onnx"), &file("mlp.onnx"), "--ep", "cpu"],
        &[
            ("ORT_DYLIB_PATH", None),
            ("ONNX_LORA_PYTHON", Some(py.to_str().unwrap())),
        ],
        cwd.path(),
    );
    expect_code(&r, 0, "through $ONNX_LORA_PYTHON");
    // And through the ./.venv of the current folder (the repository's test venv).
    let r = verify_in(
        &[&file("mlp.onnx"), &file("mlp.onnx"), "--ep", "cpu"],
        &[("ORT_DYLIB_PATH", None), ("ONNX_LORA_PYTHON", None)],
        &root(),
    );
    expect_code(&r, 0, "through ./.venv");
}

#[test]
fn tract_says_when_it_cannot_run_a_model() {
    let det = file("det.onnx");
    let r = verify(&[&det, &det, "--ep", "tract"]);
    expect_code(&r, 2, "Det on tract");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("tract cannot run") && r.stderr.contains("--ep cpu"),
        "{}",
        r.stderr
    );
    expect_code(
        &verify(&[&det, &det, "--ep", "cpu"]),
        0,
        "Det on onnxruntime",
    );
    // As the fallback for a missing onnxruntime, the error says how to get onnxruntime.
    let r = verify_without_ort(&[&det, &det]);
    expect_code(&r, 2, "Det on the tract fallback");
    assert!(r.stderr.contains("pip install onnxruntime"), "{}", r.stderr);
}

#[test]
fn usage_errors() {
    let r = verify(&[&file("mlp.onnx")]);
    expect_code(&r, 2, "neither B nor --expect");
    let r = verify(&[
        &file("mlp.onnx"),
        &file("mlp.onnx"),
        "--runs",
        "0",
        "--ep",
        "cpu",
    ]);
    expect_code(&r, 2, "--runs 0");
    let r = verify(&[
        &file("mlp.onnx"),
        &file("mlp.onnx"),
        "--dim",
        "sequence",
        "--ep",
        "cpu",
    ]);
    expect_code(&r, 2, "--dim without =");
}

#[test]
fn models_taking_different_inputs_are_an_error() {
    let (a, renamed, int32) = (
        file("mlp.onnx"),
        file("mlp_renamed.onnx"),
        file("mlp_int32.onnx"),
    );
    for ep in ["cpu", "tract"] {
        let r = verify(&[&a, &renamed, "--ep", ep]);
        expect_error(
            &r,
            "renamed input",
            &[
                &format!("{a} and {renamed} take different inputs"),
                "token_type_ids (int64) vs segment_ids (int64)",
            ],
        );
    }
    let r = verify(&[&int32, &a, "--ep", "cpu"]);
    expect_error(
        &r,
        "input of another type",
        &["take different inputs: input_ids (int32) vs input_ids (int64)"],
    );
    // An input only one model takes.
    let r = verify(&[&file("det.onnx"), &file("det.onnx"), "--ep", "cpu"]);
    expect_code(&r, 0, "det");
    let r = verify(&[&a, &file("det.onnx"), "--ep", "cpu"]);
    expect_error(
        &r,
        "no common input",
        &["input_ids (int64), token_type_ids (int64), attention_mask (int64) vs x (float32)"],
    );
}

#[test]
fn symbolic_dims_may_differ_in_name() {
    // mlp_dims.onnx names its dims N and L: the same inputs, and --dim may use either name.
    let (a, b) = (file("mlp.onnx"), file("mlp_dims.onnx"));
    for dim in ["sequence=3", "L=3"] {
        let r = verify(&[&a, &b, "--ep", "cpu", "--dim", dim, "--json"]);
        expect_code(&r, 0, dim);
        let recs = records(&r);
        assert_eq!(
            output(&recs, "logits")["shape_b"],
            serde_json::json!([1, 3, 8]),
            "{dim}"
        );
    }
}

#[test]
fn a_dim_no_input_has_is_an_error() {
    let m = file("mlp.onnx");
    let r = verify(&[&m, &m, "--ep", "cpu", "--dim", "seqence=3"]);
    expect_error(
        &r,
        "--dim typo",
        &[
            "--dim seqence",
            "has a symbolic dimension of that name",
            "they have batch, sequence",
        ],
    );
    let r = verify(&[
        &m,
        "--expect",
        &file("expected.npz"),
        "--inputs",
        &file("inputs.npz"),
        "--ep",
        "cpu",
        "--dim",
        "batch_size=2",
    ]);
    expect_error(&r, "--dim with --expect", &["--dim batch_size", &m]);
    // det.onnx has one symbolic dim, and the message lists it.
    let single = file("det.onnx");
    let r = verify(&[&single, &single, "--ep", "cpu", "--dim", "rows=3"]);
    expect_error(&r, "--dim rows", &["--dim rows", "they have batch"]);
}

#[test]
fn inputs_file_must_hold_every_input() {
    let m = file("mlp.onnx");
    let f = npz("no_mask.npz", &inputs_with("attention_mask", None));
    for ep in ["cpu", "tract"] {
        let r = verify(&[&m, &m, "--inputs", &f, "--ep", ep]);
        expect_error(
            &r,
            "missing input",
            &[&f, "no array 'attention_mask'", "must hold every input"],
        );
    }
    let r = verify(&[&m, "--inputs", &f, "--expect", &file("expected.npz")]);
    expect_error(&r, "missing input, --expect", &[&f, "'attention_mask'"]);
}

/// An array must have the input's declared shape (onnxruntime refuses another; tract would
/// broadcast it), and an npz may not hold two arrays of one name (numpy reads the last).
#[test]
fn inputs_file_arrays_must_fit_the_inputs_shape_once() {
    let m = file("mlp.onnx");
    let arrays = read_arrays(Path::new(&file("inputs.npz"))).unwrap();
    let (_, ids) = arrays
        .iter()
        .find(|(n, _)| n == "input_ids")
        .unwrap()
        .clone();
    let mut flat = ids.clone();
    flat.shape = vec![ids.shape.iter().product()];
    let f = npz("flat_ids.npz", &inputs_with("input_ids", Some(flat)));
    for ep in ["cpu", "tract"] {
        let r = verify(&[&m, &m, "--inputs", &f, "--ep", ep]);
        expect_error(
            &r,
            "flat ids",
            &[&f, "array 'input_ids' has shape", "input takes"],
        );
    }
    let mut twice = arrays.clone();
    twice.push(("input_ids".into(), ids));
    let f = npz("twice.npz", &twice);
    let r = verify(&[&m, &m, "--inputs", &f, "--ep", "tract"]);
    expect_error(
        &r,
        "two arrays of one name",
        &[&f, "two arrays named 'input_ids'"],
    );
}

#[test]
fn inputs_file_arrays_must_be_of_the_inputs_kind() {
    let m = file("mlp.onnx");
    let ids = read_arrays(Path::new(&file("inputs.npz")))
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "input_ids")
        .unwrap()
        .1;
    let values: Vec<f64> = ids.values().unwrap().collect();
    let as_type = |dt| ArrayData::from_f64(dt, ids.shape.clone(), &values).unwrap();
    // Floats for int64 ids: refused, naming the input, the array's type and the input's.
    let f = npz(
        "float_ids.npz",
        &inputs_with("input_ids", Some(as_type(DataType::Float))),
    );
    let r = verify(&[&m, &m, "--inputs", &f, "--ep", "cpu"]);
    expect_error(
        &r,
        "float ids",
        &[&f, "array 'input_ids' is float32", "takes int64"],
    );
    // int32 ids for int64: the same values, the same outputs as the stored ones.
    let f = npz(
        "int32_ids.npz",
        &inputs_with("input_ids", Some(as_type(DataType::Int32))),
    );
    let r = verify(&[
        &m,
        "--inputs",
        &f,
        "--expect",
        &file("expected.npz"),
        "--ep",
        "cpu",
    ]);
    expect_code(&r, 0, "int32 ids");
    // int64 values an int32 input cannot hold: refused, not saturated.
    let mut big = values.clone();
    big[0] = 5e9;
    let big = ArrayData::from_f64(DataType::Int64, ids.shape.clone(), &big).unwrap();
    let f = npz("big_ids.npz", &inputs_with("input_ids", Some(big)));
    let int32 = file("mlp_int32.onnx");
    let r = verify(&[&int32, &int32, "--inputs", &f, "--ep", "cpu"]);
    expect_error(
        &r,
        "ids beyond int32",
        &[&f, "5000000000", "int32 cannot hold"],
    );
    // A float input: int64 refused, float64 converted (same kind).
    let det = file("det.onnx");
    let x: Vec<f64> = (0..9).map(|i| ((i * 7) % 5) as f64 - 1.5).collect();
    for (dt, code) in [(DataType::Int64, 2), (DataType::Double, 0)] {
        let arr = ArrayData::from_f64(dt, vec![1, 3, 3], &x).unwrap();
        let f = npz(&format!("x_{}.npz", dt.name()), &[("x".into(), arr)]);
        let r = verify(&[&det, &det, "--inputs", &f, "--ep", "cpu"]);
        if code == 2 {
            expect_error(
                &r,
                "int64 for float32",
                &["array 'x' is int64", "takes float32"],
            );
        } else {
            expect_code(&r, 0, "float64 for float32");
        }
    }
}

/// A one-array npz `name` holding `values` as int64 / uint64 / float64 / float32 arrays.
fn array_i64(values: &[i64]) -> ArrayData {
    ArrayData::new(
        DataType::Int64,
        vec![values.len()],
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .unwrap()
}

/// `verify MODEL MODEL --inputs INPUTS --ep cpu`: a model against itself on given feeds.
fn against_itself(model: &str, inputs: &str) -> Run {
    verify(&[
        &file(model),
        &file(model),
        "--inputs",
        inputs,
        "--ep",
        "cpu",
    ])
}

/// Integer outputs compare exactly, 64-bit values beyond 2^53 included (through f64 they
/// rounded to equal values and "passed").
#[test]
fn integer_outputs_compare_exactly() {
    let big = [1i64 << 60, (1 << 53) + 1, -(1 << 62), 7];
    let off: Vec<i64> = big
        .iter()
        .map(|v| if *v == 7 { 7 } else { v + 1 })
        .collect();
    let inputs = npz("big_in.npz", &[("x".into(), array_i64(&big))]);
    let same = npz("big_same.npz", &[("y".into(), array_i64(&big))]);
    let wrong = npz("big_off.npz", &[("y".into(), array_i64(&off))]);
    for ep in ["cpu", "tract"] {
        let args = |expect: &str| {
            verify(&[
                &file("id_int64.onnx"),
                "--inputs",
                &inputs,
                "--expect",
                expect,
                "--ep",
                ep,
                "--json",
            ])
        };
        expect_code(&args(&same), 0, "the same integers");
        let r = args(&wrong);
        expect_code(&r, 1, "integers one apart");
        let y = output(&records(&r), "y").clone();
        assert_eq!(y["mismatches"], 3, "{y}");
        assert_eq!(y["max_abs_diff"], 1.0, "{y}");
    }
}

/// An integer feed converts to the input's type only when every value fits, compared exactly
/// (a uint64 2^63 saturated to int64's largest and passed); a float64 feed for a float32 input
/// only when no finite value would become an infinity.
#[test]
fn feeds_convert_only_when_every_value_fits() {
    let top = ArrayData::new(
        DataType::Uint64,
        vec![1],
        (1u64 << 63).to_le_bytes().to_vec(),
    )
    .unwrap();
    let u = npz("u64_top.npz", &[("x".into(), top)]);
    let r = against_itself("id_int64.onnx", &u);
    expect_error(
        &r,
        "uint64 2^63 into int64",
        &["holds 9223372036854775808", "int64"],
    );
    let fits = ArrayData::new(DataType::Uint64, vec![1], 5u64.to_le_bytes().to_vec()).unwrap();
    let u = npz("u64_fits.npz", &[("x".into(), fits)]);
    let r = against_itself("id_int64.onnx", &u);
    expect_code(&r, 0, "uint64 5 into int64");
    let huge = ArrayData::from_f64(DataType::Double, vec![2], &[1.0, 1e300]).unwrap();
    let f = npz("f64_huge.npz", &[("x".into(), huge)]);
    let r = against_itself("id_float.onnx", &f);
    expect_error(
        &r,
        "float64 1e300 into float32",
        &["holds 1e300", "infinity"],
    );
}

/// A NaN or infinity against another value is a mismatch the largest finite difference does
/// not show: JSON counts it in `nonfinite_mismatches`, the table says `non-finite`.
#[test]
fn non_finite_mismatches_are_counted_apart() {
    let x = ArrayData::from_f64(DataType::Float, vec![3], &[1.0, 2.0, 3.0]).unwrap();
    let inputs = npz("nf_in.npz", &[("x".into(), x)]);
    let inf = ArrayData::from_f64(DataType::Float, vec![3], &[f64::INFINITY, 2.0, 3.0]).unwrap();
    let expect = npz("nf_expect.npz", &[("y".into(), inf)]);
    let args = |json: bool| {
        let mut a = vec![
            file("id_float.onnx"),
            "--inputs".into(),
            inputs.clone(),
            "--expect".into(),
            expect.clone(),
            "--ep".into(),
            "tract".into(),
        ];
        if json {
            a.push("--json".into());
        }
        verify(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let r = args(true);
    expect_code(&r, 1, "inf against 1");
    let y = output(&records(&r), "y").clone();
    assert_eq!(
        (
            &y["mismatches"],
            &y["nonfinite_mismatches"],
            &y["max_abs_diff"]
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(0.0)
        ),
        "{y}"
    );
    let r = args(false);
    expect_code(&r, 1, "inf against 1 (text)");
    let row = r.stdout.lines().find(|l| l.starts_with("y ")).unwrap();
    assert!(row.contains("non-finite"), "{}", r.stdout);
}

/// Verification that would compare nothing is an error (a model without outputs) or says so
/// (outputs without elements, from feeds or a zero --dim); a graph output no node makes is
/// named.
#[test]
fn comparing_nothing_is_refused_or_said() {
    for ep in ["cpu", "tract"] {
        let r = verify(&[
            &file("no_outputs.onnx"),
            &file("no_outputs.onnx"),
            "--ep",
            ep,
        ]);
        expect_error(
            &r,
            "no outputs",
            &[
                "no_outputs.onnx",
                "the graph has no outputs: nothing to compare",
            ],
        );
        let r = verify(&[&file("dangling.onnx"), &file("dangling.onnx"), "--ep", ep]);
        expect_error(
            &r,
            "dangling output",
            &["graph output 'zz' is made by no node"],
        );
    }
    let empty = ArrayData::from_f64(DataType::Float, vec![0], &[]).unwrap();
    let inputs = npz("empty_in.npz", &[("x".into(), empty)]);
    let r = against_itself("id_float.onnx", &inputs);
    expect_code(&r, 0, "zero-size feeds");
    assert!(
        r.stderr.contains("output 'y' has no elements (a zero-size dimension): it compared equal, which checks nothing"),
        "{}",
        r.stderr
    );
    let r = verify(&[
        &file("id_float.onnx"),
        &file("id_float.onnx"),
        "--dim",
        "n=0",
    ]);
    // (0 is a size: an empty KV cache's past length) the same empty feeds, the same note
    expect_code(&r, 0, "--dim n=0");
    assert!(
        r.stderr.contains("output 'y' has no elements"),
        "{}",
        r.stderr
    );
}

/// Argument errors say what is wrong with the value: a negative tolerance or run count (which
/// clap took for a flag), a dim too large, a dim given twice with two values.
#[test]
fn argument_errors_name_the_value() {
    let m = file("id_float.onnx");
    for (args, want) in [
        (
            &["--rtol", "-0.5"][..],
            "'-0.5' is not a finite number >= 0",
        ),
        (&["--atol", "-1"][..], "'-1' is not a finite number >= 0"),
        (
            &["--runs", "-1"][..],
            "'-1' is not a number of runs (1 or more)",
        ),
        (&["--dim", "n=99999999999999999999"][..], "is too large"),
        (
            &["--dim", "n=2", "--dim", "n=3"][..],
            "--dim n is given twice, as 2 and as 3",
        ),
    ] {
        let mut all = vec![m.as_str(), m.as_str(), "--ep", "tract"];
        all.extend_from_slice(args);
        let r = verify(&all);
        expect_error(&r, &format!("{args:?}"), &[want]);
    }
    // the same dim twice with one value is no conflict
    let r = verify(&[&m, &m, "--ep", "tract", "--dim", "n=2", "--dim", "n=2"]);
    expect_code(&r, 0, "--dim n=2 twice");
}

/// A --target pattern that does not compile is refused as the arguments are read, in one line
/// naming the pattern as written (not the anchored form it is matched in) and what is wrong.
#[test]
fn an_invalid_target_pattern_is_refused_up_front() {
    let model = fixtures().join("llama/torchscript/model.onnx");
    let m = model.to_str().unwrap();
    for args in [
        vec!["inspect", m, "--target", "q_proj|("],
        vec![
            "inject",
            m,
            "--target",
            "q_proj|(",
            "-o",
            "/nonexistent/out.onnx",
        ],
    ] {
        let o = onnx_lora(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("'q_proj|('") && err.contains("unclosed group") && !err.contains("^(?:"),
            "{args:?}: {err}"
        );
    }
}

/// An arithmetic fault in onnxruntime's native code (its GroupQueryAttention on a zero batch)
/// ends the run with one line and exit 2, not a death by SIGFPE with no word.
#[test]
fn a_fault_in_the_runtime_is_one_line_and_exit_2() {
    let m = fixtures().join("llama_genai/model.onnx");
    let m = m.to_str().unwrap();
    let r = verify(&[
        m,
        m,
        "--ep",
        "cpu",
        "--dim",
        "kv_cache_dim=16",
        "--dim",
        "batch_size=0",
    ]);
    expect_error(
        &r,
        "batch_size=0 on GroupQueryAttention",
        &[
            "arithmetic fault (SIGFPE)",
            "while running",
            "llama_genai/model.onnx",
        ],
    );
}

/// Integer outputs compared exactly show tolerances of 0, whatever --atol / --rtol asked for.
#[test]
fn integer_outputs_report_no_tolerance() {
    let x = array_i64(&[5, 6]);
    let inputs = npz("tol_in.npz", &[("x".into(), x)]);
    let expect = npz("tol_expect.npz", &[("y".into(), array_i64(&[5, 7]))]);
    let r = verify(&[
        &file("id_int64.onnx"),
        "--inputs",
        &inputs,
        "--expect",
        &expect,
        "--ep",
        "tract",
        "--atol",
        "10",
        "--json",
    ]);
    expect_code(&r, 1, "one apart, atol 10");
    let y = output(&records(&r), "y").clone();
    assert_eq!(
        (&y["atol"], &y["rtol"], &y["mismatches"]),
        (
            &serde_json::json!(0.0),
            &serde_json::json!(0.0),
            &serde_json::json!(1)
        ),
        "{y}"
    );
}
