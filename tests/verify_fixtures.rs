//! `verify` and `--verify` on the real exports: each fixture passes against itself and against
//! PEFT's stored base outputs on onnxruntime and tract (so the two agree), fails against the
//! same model with an adapter merged in, and fold / inject `--verify` report PASS. Runtime
//! failures (a tract panic, an onnxruntime run error) are one-line errors naming the model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use onnx_lora::onnx::DataType;
use onnx_lora::verify::ArrayData;
use onnx_lora::verify::npz::write_npz;

/// Asserts a one-line error (exit 2, nothing on stdout) containing each of `want`; returns
/// stderr.
fn one_line_error(args: &[&str], want: &[&str]) -> String {
    let o = onnx_lora(args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert_eq!(o.status.code(), Some(2), "{args:?}: {out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    assert!(out.is_empty(), "{args:?}: {out}");
    for w in want {
        assert!(err.contains(w), "{args:?}: no '{w}' in {err}");
    }
    err
}

fn code(args: &[&str]) -> (Option<i32>, String) {
    let o = onnx_lora(args);
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn fixtures_pass_against_themselves_and_peft_outputs_on_both_backends() {
    let mut tract_ran = 0;
    for case in cases() {
        let m = case.onnx.to_str().unwrap();
        let (inputs, base) = (case.inputs.to_str().unwrap(), case.base.to_str().unwrap());
        let (c, out) = code(&["verify", m, m, "--ep", "cpu"]);
        assert_eq!(c, Some(0), "{}: {out}", case.label());
        let (c, out) = code(&[
            "verify", m, "--inputs", inputs, "--expect", base, "--ep", "cpu",
        ]);
        assert_eq!(c, Some(0), "{}: {out}", case.label());
        let (c, out) = code(&[
            "verify", m, "--inputs", inputs, "--expect", base, "--ep", "tract",
        ]);
        match c {
            Some(0) => tract_ran += 1,
            Some(2) => assert!(
                out.contains("tract") && out.contains("--ep cpu"),
                "{}: {out}",
                case.label()
            ),
            _ => panic!("{}: ort and tract disagree: {out}", case.label()),
        }
    }
    assert!(tract_ran >= 4, "tract ran only {tract_ran} fixtures");
}

#[test]
fn merged_adapter_is_detected_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases().into_iter().filter(|c| c.dtype == "float32") {
        let foldable = |a: &&AdapterCase| !a.refuse && !a.has("grouped_conv");
        let Some(ad) = case.adapters.iter().find(foldable) else {
            continue;
        };
        let folded = dir
            .path()
            .join(format!("{}_{}.onnx", case.model, case.exporter));
        fold_ok(&case.onnx, &[&ad.dir], &folded, &[]);
        for ep in ["cpu", "tract"] {
            let (c, out) = code(&[
                "verify",
                folded.to_str().unwrap(),
                case.onnx.to_str().unwrap(),
                "--ep",
                ep,
            ]);
            assert!(
                c == Some(1) || (ep == "tract" && c == Some(2)),
                "{} {ep}: {out}",
                case.label()
            );
            if c == Some(1) {
                assert!(out.contains("FAIL"), "{out}");
            }
        }
    }
}

#[test]
fn fold_and_inject_verify_pass_on_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let Some(ad) = case.adapters.iter().find(|a| a.name == "plain") else {
            continue;
        };
        let m = case.onnx.to_str().unwrap();
        let out = dir
            .path()
            .join(format!("{}_{}.onnx", case.model, case.exporter));
        let o = out.to_str().unwrap();
        for args in [
            vec![
                "fold",
                m,
                ad.dir.to_str().unwrap(),
                "-o",
                o,
                "--verify",
                "--ep",
                "cpu",
            ],
            vec![
                "fold",
                m,
                ad.dir.to_str().unwrap(),
                "-o",
                o,
                "--verify",
                "--ep",
                "cpu",
                "--scale",
                "0.5",
            ],
            vec![
                "inject", m, "--rank", "4", "-o", o, "--verify", "--ep", "cpu",
            ],
            vec![
                "inject",
                m,
                "--adapter",
                ad.dir.to_str().unwrap(),
                "-o",
                o,
                "--verify",
                "--ep",
                "cpu",
            ],
        ] {
            let (c, text) = code(&args);
            assert_eq!(c, Some(0), "{args:?}: {text}");
            assert!(text.contains("PASS"), "{text}");
        }
    }
}

#[test]
fn fold_verify_covers_whole_replacements() {
    // A whole replaced tensor (modules_to_save) has no branch form: the unmerged reference
    // takes it as the layer's weight, so --verify runs, passes, and the output is written.
    let dir = tempfile::tempdir().unwrap();
    let case = cases()
        .into_iter()
        .find(|c| c.model == "convnet" && c.exporter == "dynamo")
        .unwrap();
    let ad = write_adapter(
        &dir.path().join("ad"),
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "modules_to_save": ["fc"]}),
        &[(
            "fc.modules_to_save.default.weight",
            vec![10, 16],
            vec![0.01; 160],
        )],
    );
    let peft = case
        .adapters
        .iter()
        .find(|a| a.has("modules_to_save"))
        .expect("a modules_to_save fixture adapter");
    for (i, adapter) in [ad, peft.dir.clone()].iter().enumerate() {
        let out = dir.path().join(format!("x{i}.onnx"));
        let (c, text) = code(&[
            "fold",
            case.onnx.to_str().unwrap(),
            adapter.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--verify",
            "--ep",
            "cpu",
        ]);
        assert_eq!(c, Some(0), "{text}");
        assert!(text.contains("PASS") && out.exists(), "{text}");
    }
}

#[test]
fn out_of_range_ids_are_one_line_errors_naming_the_model() {
    // fixtures/llama/dynamo has a vocabulary of 128 and takes [1, 8] ids and mask: id 1000 is
    // beyond its embedding table. tract panics on it, onnxruntime fails the run.
    let model = fixtures().join("llama/dynamo/model.onnx");
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids1000.npz");
    write_npz(
        &ids,
        &[
            (
                "input_ids".into(),
                ArrayData::from_f64(DataType::Int64, vec![1, 8], &[1000.0; 8]).unwrap(),
            ),
            (
                "attention_mask".into(),
                ArrayData::from_f64(DataType::Int64, vec![1, 8], &[1.0; 8]).unwrap(),
            ),
        ],
    )
    .unwrap();
    let f = ids.to_str().unwrap();
    let err = one_line_error(
        &["verify", m, m, "--inputs", f, "--ep", "tract"],
        &[&format!("tract failed on {m}: ")],
    );
    assert!(!err.contains("panicked at"), "{err}");
    // onnxruntime's own logger prints nothing: the one line is ours, naming the model.
    let err = one_line_error(
        &["verify", m, m, "--inputs", f, "--ep", "cpu"],
        &[&format!("{m}: onnxruntime failed to run the model: ")],
    );
    assert!(!err.contains('\x1b'), "no coloured log line: {err}");
}

#[test]
fn onnxruntime_run_errors_are_one_line_naming_the_model() {
    // The genai model's KV cache dim is symbolic: at its default of 1 the run fails inside
    // onnxruntime, which must not log its own (coloured) line.
    let model = fixtures().join("llama_genai/model.onnx");
    let m = model.to_str().unwrap();
    let err = one_line_error(
        &["verify", m, m, "--ep", "cpu"],
        &[&format!("{m}: onnxruntime failed to run the model")],
    );
    assert!(!err.contains('\x1b'), "{err}");
    let (c, out) = code(&["verify", m, m, "--ep", "cpu", "--dim", "kv_cache_dim=16"]);
    assert_eq!(c, Some(0), "{out}");
}

#[test]
fn verify_references_are_named_not_their_scratch_files() {
    // fold --verify and inject --adapter --verify build their reference in a scratch file that
    // is gone afterwards: the report names what the reference is.
    let dir = tempfile::tempdir().unwrap();
    let case = cases()
        .into_iter()
        .find(|c| c.model == "llama" && c.exporter == "dynamo")
        .unwrap();
    let ad = case.adapters.iter().find(|a| a.name == "plain").unwrap();
    let (m, a) = (case.onnx.to_str().unwrap(), ad.dir.to_str().unwrap());
    let out = dir.path().join("out.onnx");
    let o = out.to_str().unwrap();
    for (args, label) in [
        (
            vec!["fold", m, a, "-o", o, "--verify", "--ep", "cpu"],
            "the unmerged reference (base + adapters: PEFT's unmerged forward)",
        ),
        (
            vec![
                "inject",
                m,
                "--adapter",
                a,
                "-o",
                o,
                "--verify",
                "--ep",
                "cpu",
            ],
            "the reference (base with the adapter folded in)",
        ),
    ] {
        let (c, text) = code(&args);
        assert_eq!(c, Some(0), "{args:?}: {text}");
        assert!(
            text.contains(&format!("{label}: cpu, ")) && !text.contains("reference.onnx"),
            "{args:?}: {text}"
        );
        let mut json = args.clone();
        json.push("--json");
        let text = onnx_lora_ok(&json);
        let verdict: serde_json::Value =
            serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(verdict["type"], "verdict", "{text}");
        assert_eq!(verdict["models"][1]["model"], label, "{text}");
        assert_eq!(verdict["models"][0]["model"], o, "{text}");
    }
    // Folding branches back compares with the input model itself: named by its path.
    let injected = dir.path().join("injected.onnx");
    onnx_lora_ok(&["inject", m, "--rank", "2", "-o", injected.to_str().unwrap()]);
    let text = onnx_lora_ok(&[
        "fold",
        injected.to_str().unwrap(),
        "-o",
        o,
        "--verify",
        "--ep",
        "cpu",
    ]);
    assert!(
        text.contains(&format!("{}: cpu, ", injected.display()))
            && !text.contains("reference.onnx"),
        "{text}"
    );
    assert!(Path::new(o).exists());
}

/// `scripts/cuda_check.py`, run by hand where there is a GPU, keeps working between such runs:
/// its dry run on onnxruntime's CPU makes and checks the serving model of every fixture.
#[test]
fn cuda_check_script_dry_run_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut cmd = std::process::Command::new(python());
    cmd.arg(root().join("scripts/cuda_check.py"))
        .args(["--bin", env!("CARGO_BIN_EXE_onnx-lora"), "--ep", "cpu"])
        .args(["--only", "serving", "--jobs", "2", "--out"])
        .arg(&report);
    if let Some(lib) = std::env::var_os("ORT_DYLIB_PATH") {
        cmd.arg("--ort-lib").arg(lib);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let results = r["results"].as_array().unwrap();
    assert!(results.len() >= 10, "only {} checks: {text}", results.len());
    for x in results {
        assert_eq!(x["ok"], true, "{x}");
        assert_eq!(x["ep"], "cpu", "{x}");
        assert!(x["check"].as_str().unwrap().ends_with(" serving"), "{x}");
    }
}

/// `--output` compares only the named outputs: an `--expect` file holding the logits alone (as
/// the genai fixture's) checks a model that also gives out its KV cache; a name neither side
/// has is an error listing what they have.
#[test]
fn output_limits_the_comparison() {
    let dir = fixtures().join("llama_genai");
    let (model, inputs, expect) = (
        dir.join("model.onnx"),
        dir.join("inputs.npz"),
        dir.join("base.npz"),
    );
    // `verify MODEL --inputs .. --expect EXPECT --ep cpu --json EXTRA..`
    let args = |expect: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "verify".into(),
            model.to_str().unwrap().into(),
            "--inputs".into(),
            inputs.to_str().unwrap().into(),
            "--expect".into(),
            expect.to_str().unwrap().into(),
        ];
        v.extend(
            ["--ep", "cpu", "--json"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        v
    };
    let run = |expect: &Path, extra: &[&str]| {
        let a = args(expect, extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        onnx_lora(&refs)
    };
    let fails_with = |expect: &Path, extra: &[&str], want: &[&str]| {
        let a = args(expect, extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        one_line_error(&refs, want);
    };
    let all = run(&expect, &[]);
    assert_eq!(
        all.status.code(),
        Some(1),
        "the KV cache is not in base.npz"
    );
    let one = run(&expect, &["--output", "logits"]);
    let out = String::from_utf8_lossy(&one.stdout);
    assert_eq!(one.status.code(), Some(0), "{out}");
    let outputs: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "output")
        .collect();
    assert_eq!(outputs.len(), 1, "{out}");
    assert_eq!(outputs[0]["name"], "logits");
    fails_with(
        &expect,
        &["--output", "logitz"],
        &["--output logitz", "present.0.key"],
    );
    // A lone .npy is the output --output names (without it, the model has too many outputs).
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("logits.npy");
    let script = format!(
        "import numpy as np; np.save({:?}, np.load({:?})['logits'])",
        npy.to_str().unwrap(),
        expect.to_str().unwrap()
    );
    let o = std::process::Command::new(python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&npy, &["--output", "logits"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    fails_with(&npy, &[], &["name the one it holds with --output"]);
}
