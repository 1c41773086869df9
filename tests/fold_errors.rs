//! `fold` on bad or unsupported input: one clear line naming the module / tensor, exit 2, no
//! output file, inputs untouched; shared initializers get a private copy, except a table tied
//! to an output layer that trainable tokens change for both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// (target_modules ".*": every module of the file is targeted, whatever the test names it)
fn config() -> serde_json::Value {
    serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ".*"})
}

fn lora(module: &str, n_in: usize, n_out: usize, fill: f32) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        (
            format!("{module}.lora_A.weight"),
            vec![2, n_in],
            vec![fill; 2 * n_in],
        ),
        (
            format!("{module}.lora_B.weight"),
            vec![n_out, 2],
            vec![fill; 2 * n_out],
        ),
    ]
}

fn refs(t: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<(&str, Vec<usize>, Vec<f32>)> {
    t.iter()
        .map(|(k, s, v)| (k.as_str(), s.clone(), v.clone()))
        .collect()
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        py("make_edge_models.py", &[dir.path()]);
        Env { dir }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A LoRA for the 2-group 3×3 conv of grouped.onnx (4 input and output channels), in
    /// PEFT's layout: A reads all 4 inputs, B is grouped (r / 2 = 1 channel per output).
    fn grouped_conv_adapter(&self) -> PathBuf {
        let t = vec![
            ("conv.lora_A.weight", vec![2, 4, 3, 3], vec![0.1; 2 * 4 * 9]),
            ("conv.lora_B.weight", vec![4, 1, 1, 1], vec![0.1; 4]),
        ];
        write_adapter(&self.p("adc"), config(), &t)
    }
    /// Runs fold expecting failure; returns stderr after checking exit 2, one line, no output.
    fn fold_fails(&self, model: &str, adapter: &Path) -> String {
        fold_fails(&self.p(model), adapter, &self.p("out.onnx"), &[])
    }
}

#[test]
fn unmatched_modules_are_listed() {
    let env = Env::new();
    let mut t = lora("fc", 8, 4, 0.1);
    t.extend(lora("nonexistent.proj", 8, 4, 0.1));
    let ad = write_adapter(&env.p("ad"), config(), &refs(&t));
    let err = env.fold_fails("linear.onnx", &ad);
    assert!(
        err.contains("nonexistent.proj.lora_A.weight") && err.contains("match no weight"),
        "{err}"
    );
    let out = env.p("partial.onnx");
    let o = onnx_lora(&fold_args(
        &env.p("linear.onnx"),
        &[&ad],
        &out,
        &["--allow-unmatched"],
    ));
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: unmatched adapter module"));
    assert!(out.exists());
}

#[test]
fn shape_mismatch_names_module_and_shapes() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 7, 4, 0.1)));
    let err = env.fold_fails("linear.onnx", &ad);
    assert!(
        err.contains("module 'fc'") && err.contains("[2, 7]") && err.contains("[8, 4]"),
        "{err}"
    );
}

#[test]
fn non_finite_results_are_refused() {
    let env = Env::new();
    let ad = write_adapter(
        &env.p("ad"),
        config(),
        &refs(&lora("fc", 8, 4, f32::INFINITY)),
    );
    let err = env.fold_fails("linear.onnx", &ad);
    assert!(err.contains("non-finite"), "{err}");
    // Finite in float32 but beyond float16's ±65504: stored, it would be Inf.
    let big = env.p("big");
    std::fs::create_dir_all(&big).unwrap();
    let plain = fixtures().join("llama/adapters/plain");
    std::fs::copy(
        plain.join("adapter_model.safetensors"),
        big.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["lora_alpha"] = serde_json::json!(8e6);
    std::fs::write(big.join("adapter_config.json"), cfg.to_string()).unwrap();
    let model = fixtures().join("llama_fp16/dynamo/model.onnx");
    let err = fold_fails(&model, &big, &env.p("out16.onnx"), &[]);
    assert!(err.contains("beyond float16's range"), "{err}");
    // A dry run computes the merges too, so it refuses what the real run refuses.
    let o = onnx_lora(&[
        "fold",
        model.to_str().unwrap(),
        big.to_str().unwrap(),
        "--dry-run",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("beyond float16's range") && err.contains("module '"),
        "{err}"
    );
    // inject's factors and scale go through the same writer.
    let out = env.p("inj16.onnx");
    let o = onnx_lora(&inject_args(&model, &big, &out, &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("beyond float16's range"), "{err}");
    assert!(!out.exists());
    // A merged bias too (lora_bias): the error names the module.
    let mut t = lora("fc", 8, 4, 0.1);
    t.push(("fc.lora_B.bias".into(), vec![4], vec![1e6; 4]));
    let mut cfg = config();
    cfg["lora_bias"] = true.into();
    let ad = write_adapter(&env.p("adb"), cfg, &refs(&t));
    let err = env.fold_fails("linear_bias_fp16.onnx", &ad);
    assert!(
        err.contains("module 'fc': the merged bias's value")
            && err.contains("beyond float16's range"),
        "{err}"
    );
}

/// Nodes without names give candidates without module paths; they are no calls of one module
/// (a fresh inject on every linear layer works, and --verify passes).
#[test]
fn nameless_nodes_are_not_one_module() {
    let env = Env::new();
    let out = env.p("anon_inj.onnx");
    let o = onnx_lora(&[
        "inject",
        env.p("anon.onnx").to_str().unwrap(),
        "--rank",
        "2",
        "-o",
        out.to_str().unwrap(),
        "--verify",
        "--ep",
        "tract",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let branches = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "branch")
        .count();
    assert_eq!(branches, 2, "{stdout}");
}

/// Outputs that are NaN throughout on both sides compare equal (numpy's equal_nan), and verify
/// says that this checked nothing.
#[test]
fn verify_notes_outputs_with_no_finite_element() {
    let env = Env::new();
    let nan = |shape: Vec<usize>| {
        let n = shape.iter().product::<usize>();
        onnx_lora::verify::ArrayData::from_f64(
            onnx_lora::onnx::DataType::Float,
            shape,
            &vec![f64::NAN; n],
        )
        .unwrap()
    };
    let feeds = env.p("nan_in.npz");
    let expect = env.p("nan_out.npz");
    onnx_lora::verify::npz::write_npz(&feeds, &[("x".into(), nan(vec![2, 8]))]).unwrap();
    onnx_lora::verify::npz::write_npz(&expect, &[("y".into(), nan(vec![2, 4]))]).unwrap();
    let model = env.p("linear.onnx");
    let o = onnx_lora(&[
        "verify",
        model.to_str().unwrap(),
        "--inputs",
        feeds.to_str().unwrap(),
        "--expect",
        expect.to_str().unwrap(),
        "--ep",
        "tract",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("output 'y' has no element finite in both"),
        "{err}"
    );
}

#[test]
fn quantized_and_grouped_weights_are_refused() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    for m in ["nbits.onnx", "dq.onnx"] {
        let err = env.fold_fails(m, &ad);
        assert!(
            err.contains("quantized") && err.contains("inject"),
            "{m}: {err}"
        );
    }
    let ad = env.grouped_conv_adapter();
    let err = env.fold_fails("grouped.onnx", &ad);
    assert!(err.contains("group"), "{err}");
    // inject takes it as a branch; its --verify reference folds, so it says how to check
    // instead, and writes nothing.
    let out = env.p("g.onnx");
    let (m, a) = (env.p("grouped.onnx"), ad.to_str().unwrap().to_string());
    let args = [
        "inject",
        m.to_str().unwrap(),
        "--adapter",
        &a,
        "-o",
        out.to_str().unwrap(),
    ];
    onnx_lora_ok(&args);
    std::fs::remove_file(&out).unwrap();
    let err = onnx_lora_fails(&[&args[..], &["--verify", "--ep", "cpu"]].concat(), &out);
    assert!(
        err.contains("group") && err.contains("inject without --verify"),
        "{err}"
    );
}

#[test]
fn base_changing_inits_are_refused() {
    let env = Env::new();
    let mut cfg = config();
    cfg["init_lora_weights"] = "pissa_niter_4".into();
    let ad = write_adapter(&env.p("ad"), cfg, &refs(&lora("fc", 8, 4, 0.1)));
    let err = env.fold_fails("linear.onnx", &ad);
    assert!(
        err.contains("pissa_niter_4") && err.contains("changed the base weights"),
        "{err}"
    );
}

#[test]
fn shared_initializer_gets_a_private_copy() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("a", 8, 4, 0.1)));
    let out = env.p("out.onnx");
    let o = onnx_lora(&fold_args(&env.p("shared.onnx"), &[&ad], &out, &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("shared with"));
    let diff: serde_json::Value =
        serde_json::from_str(&py("ort_diff.py", &[&env.p("shared.onnx"), &out])).unwrap();
    assert!(diff["ya"].as_f64().unwrap() > 1e-3, "{diff}");
    assert_eq!(diff["yb"].as_f64().unwrap(), 0.0, "{diff}");
}

#[test]
fn quantized_bases_get_a_float_branch() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    for (quant, float) in [
        ("nbits.onnx", "nbits_float.onnx"),
        ("dq.onnx", "dq_float.onnx"),
    ] {
        let branched = env.p(&format!("{quant}.branched.onnx"));
        let folded = env.p(&format!("{quant}.folded.onnx"));
        let fresh = env.p(&format!("{quant}.fresh.onnx"));
        onnx_lora_ok(&[
            "inject",
            env.p(quant).to_str().unwrap(),
            "--adapter",
            ad.to_str().unwrap(),
            "-o",
            branched.to_str().unwrap(),
        ]);
        fold_ok(&env.p(float), &[&ad], &folded, &[]);
        onnx_lora_ok(&[
            "inject",
            env.p(quant).to_str().unwrap(),
            "--rank",
            "2",
            "-o",
            fresh.to_str().unwrap(),
        ]);
        // The quantized model with the branch computes what the float twin with the fold does...
        let d: serde_json::Value =
            serde_json::from_str(&py("ort_diff.py", &[&branched, &folded])).unwrap();
        assert!(d["y"].as_f64().unwrap() < 1e-4, "{quant}: {d}");
        // ...the float twin really is the quantized base (onnxruntime may run the plain
        // DequantizeLinear -> MatMul pattern through an approximate quantized kernel)...
        let d: serde_json::Value =
            serde_json::from_str(&py("ort_diff.py", &[&env.p(quant), &env.p(float)])).unwrap();
        assert!(d["y"].as_f64().unwrap() < 1e-2, "{quant} twin: {d}");
        // ...and fresh branches leave the quantized model as it was.
        let d: serde_json::Value =
            serde_json::from_str(&py("ort_diff.py", &[&env.p(quant), &fresh])).unwrap();
        assert_eq!(d["y"].as_f64().unwrap(), 0.0, "{quant} fresh: {d}");
    }
}

#[test]
fn weighted_adapters_add_up() {
    let env = Env::new();
    let a = write_adapter(&env.p("a"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let b = write_adapter(&env.p("b"), config(), &refs(&lora("fc", 8, 4, -0.3)));
    let m = env.p("linear.onnx");
    let both = env.p("both.onnx");
    let step1 = env.p("step1.onnx");
    let step2 = env.p("step2.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    onnx_lora_ok(&[
        "fold",
        &s(&m),
        &s(&a),
        &s(&b),
        "--weight",
        "0.5",
        "--weight",
        "2",
        "--scale",
        "0.5",
        "-o",
        &s(&both),
    ]);
    onnx_lora_ok(&["fold", &s(&m), &s(&a), "--scale", "0.25", "-o", &s(&step1)]);
    onnx_lora_ok(&["fold", &s(&step1), &s(&b), "-o", &s(&step2)]);
    let d: serde_json::Value = serde_json::from_str(&py("ort_diff.py", &[&both, &step2])).unwrap();
    assert!(d["y"].as_f64().unwrap() < 1e-5, "{d}");
    let d: serde_json::Value = serde_json::from_str(&py("ort_diff.py", &[&both, &m])).unwrap();
    assert!(d["y"].as_f64().unwrap() > 1e-2, "{d}");
    // One --weight per adapter or none: one for two is ambiguous, refused.
    let err = fold_fails(&m, &a, &env.p("o.onnx"), &[&s(&b), "--weight", "0.5"]);
    assert!(err.contains("1 --weight values for 2 adapters"), "{err}");
}

/// A q/k/v module whose layer holds no packed weight, or whose width does not fit the packed
/// weight, is refused with a message naming the module and the packed weights.
#[test]
fn packed_qkv_that_cannot_be_placed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("bert/ort_optimized/model.onnx");
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"]});
    let run = |name: &str, t: Vec<(String, Vec<usize>, Vec<f32>)>| {
        let ad = write_adapter(&dir.path().join(name), cfg.clone(), &refs(&t));
        fold_fails(&model, &ad, &dir.path().join("out.onnx"), &[])
    };
    let err = run(
        "layer7",
        lora("encoder.layer.7.attention.self.query", 32, 32, 0.1),
    );
    assert!(
        err.contains("encoder.layer.7.attention.self.query")
            && err.contains("packs q/k/v")
            && err.contains("Attention_0_qkv_weight"),
        "{err}"
    );
    let err = run(
        "narrow",
        lora("encoder.layer.0.attention.self.query", 32, 16, 0.1),
    );
    assert!(
        err.contains("Attention_0_qkv_weight")
            && err.contains("encoder.layer.0.attention.self.query"),
        "{err}"
    );
}

/// A closed stdout (`| head`) ends the process without a panic message.
/// A write that fails midway (here past a file-size limit, as a full disk would) is one line
/// naming the output, exit code 2, and leaves neither the output nor a temp file.
#[cfg(unix)]
#[test]
fn a_failed_write_names_the_output_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("unet/torchscript/model.onnx"); // ~1 MB, weights inline
    let adapter = fixtures().join("unet/adapters/no_alpha.safetensors");
    let out = dir.path().join("out.onnx");
    // (`ulimit -f` counts 512- or 1024-byte blocks: 100 of them is far below the model)
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 100 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_onnx-lora"))
        .arg("fold")
        .args([&model, &adapter])
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("{}: File too large", out.display())),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
        .args(["inspect", "--json"])
        .arg(fixtures().join("bert/ort_optimized/model.onnx"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(o.status.code(), Some(101), "{err}");
}

/// PEFT's trainable tokens: the rows need their indices from the config, one row per index,
/// indices inside the weight and listed once, and an adapter holding them folds at weight 1
/// only. Each case is one clear line naming what is wrong, and no output.
#[test]
fn trainable_tokens_errors_name_the_module() {
    let env = Env::new();
    // linear.onnx: fc is [8 in, 4 out]; a linear layer's tokens are its output channels.
    let tokens = |rows: usize| {
        let mut t = lora("fc", 8, 4, 0.1);
        t.push((
            "fc.token_adapter.trainable_tokens_delta".into(),
            vec![rows, 8],
            vec![0.5; rows * 8],
        ));
        t
    };
    let with = |indices: serde_json::Value| {
        let mut c = config();
        c["trainable_token_indices"] = indices;
        c
    };
    let cases: [(&str, serde_json::Value, usize, &str); 5] = [
        ("none", config(), 2, "no trainable_token_indices"),
        (
            "count",
            with(serde_json::json!([0, 1, 2])),
            2,
            "lists 3 tokens",
        ),
        ("twice", with(serde_json::json!([1, 1])), 2, "token 1 twice"),
        (
            "entry",
            with(serde_json::json!({"embed": [0, 1]})),
            2,
            "no entry for module 'fc'",
        ),
        (
            "range",
            with(serde_json::json!({"fc": [0, 4]})),
            2,
            "token 4 is outside",
        ),
    ];
    for (name, cfg, rows, expect) in cases {
        let ad = write_adapter(&env.p(name), cfg, &refs(&tokens(rows)));
        let err = env.fold_fails("linear.onnx", &ad);
        assert!(err.contains(expect) && err.contains("fc"), "{name}: {err}");
    }
    let ad = write_adapter(
        &env.p("weighted"),
        with(serde_json::json!([0, 3])),
        &refs(&tokens(2)),
    );
    let err = fold_fails(
        &env.p("linear.onnx"),
        &ad,
        &env.p("w.onnx"),
        &["--weight", "0.5"],
    );
    assert!(err.contains("cannot be weighted"), "{err}");
    // At weight 1 the same adapter folds.
    let out = env.p("ok.onnx");
    fold_ok(&env.p("linear.onnx"), &[&ad], &out, &[]);
}

/// `fold --verify` needs the adapters unmerged for its reference; where that cannot be built
/// (a DoRA adapter on a packed q/k/v weight another adapter changes too), it says so before
/// writing anything. Its inputs file is checked first too, and its runtime flags need it.
#[test]
fn verify_without_a_possible_reference_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixtures().join("llama_genai");
    let model = root.join("model.onnx");
    let (plain, dora) = (root.join("adapter"), root.join("adapter_dora"));
    let out = dir.path().join("out.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let err = onnx_lora_fails(
        &fold_args(&model, &[&plain, &dora], &out, &["--verify"]),
        &out,
    );
    assert!(
        err.contains("--verify cannot build its unmerged reference")
            && err.contains("model.layers.0.self_attn.q_proj")
            && err.contains("one is DoRA"),
        "{err}"
    );
    let err = onnx_lora_fails(
        &fold_args(
            &model,
            &[&plain],
            &out,
            &["--verify", "--inputs", &s(&dir.path().join("none.npz"))],
        ),
        &out,
    );
    assert!(
        err.contains("--inputs") && err.contains("none.npz"),
        "{err}"
    );
    let o = onnx_lora(&fold_args(&model, &[&plain], &out, &["--dim", "x=1"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());
}

/// LoRA factors with fewer than two dimensions are a malformed adapter: one line naming the
/// key, exit 2, never a panic.
#[test]
fn malformed_factor_shapes_are_refused() {
    let env = Env::new();
    let t = vec![
        ("fc.lora_A.weight".to_string(), vec![], vec![0.1]),
        ("fc.lora_B.weight".to_string(), vec![4, 2], vec![0.1; 8]),
    ];
    let ad = write_adapter(&env.p("bad"), config(), &refs(&t));
    let err = env.fold_fails("linear.onnx", &ad);
    assert!(
        err.contains("fc.lora_A.weight") && err.contains("at least 2 dimensions"),
        "{err}"
    );
}

/// A trainable-tokens adapter for tokens 2 and 5 of `module`'s [16, 8] table (config
/// `indices`, LoRA `target`), and the rows it holds.
fn token_adapter(
    env: &Env,
    module: &str,
    target: &str,
    indices: serde_json::Value,
) -> (PathBuf, Vec<f32>) {
    let rows: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": [target], "trainable_token_indices": indices});
    let key = format!("{module}.token_adapter.trainable_tokens_delta");
    let ad = write_adapter(
        &env.p("tok"),
        cfg,
        &[(key.as_str(), vec![2, 8], rows.clone())],
    );
    (ad, rows)
}

/// A [16, 8] table's values: `before` with the rows of tokens 2 and 5 replaced by `rows`.
fn assert_token_rows(before: &[f32], after: &[f32], rows: &[f32]) {
    for r in 0..16 {
        let expect = match r {
            2 => &rows[..8],
            5 => &rows[8..],
            _ => &before[r * 8..r * 8 + 8],
        };
        assert_eq!(&after[r * 8..r * 8 + 8], expect, "row {r}");
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Trainable tokens on an embedding module its call sites share (T5's `shared`): the export
/// names the Gathers after the call sites, and only the table after the module. The tokens go
/// into that table, once, for both readers. A LoRA on `shared` still matches nothing: PEFT's
/// LoRA on it leaves the call sites (the same nn.Embedding) as they are.
#[test]
fn trainable_tokens_find_a_table_by_its_module_name() {
    let env = Env::new();
    let (ad, rows) = token_adapter(&env, "shared", "q", serde_json::json!({"shared": [2, 5]}));
    let model = env.p("shared_table.onnx");
    let out = env.p("shared_table.out.onnx");
    fold_ok(&model, &[&ad], &out, &[]);
    let table = |path: &Path| -> Vec<f32> {
        let m = onnx_lora::onnx::load(path).unwrap();
        let g = m.proto.graph.as_ref().unwrap();
        assert_eq!(g.initializer.len(), 1, "{}: one table", path.display());
        f32s(&m.tensor_bytes(&g.initializer[0]).unwrap())
    };
    assert_token_rows(&table(&model), &table(&out), &rows);
    let t = vec![
        (
            "shared.lora_embedding_A".to_string(),
            vec![2, 16],
            vec![0.1; 32],
        ),
        (
            "shared.lora_embedding_B".to_string(),
            vec![8, 2],
            vec![0.1; 16],
        ),
    ];
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["shared"]});
    let ad = write_adapter(&env.p("emb"), cfg, &refs(&t));
    let err = fold_fails(&model, &ad, &env.p("x.onnx"), &[]);
    assert!(
        err.contains("module 'shared' matches no weight")
            && err.contains("embed_tokens, which PEFT's LoRA on 'shared' does not reach")
            && err.contains("--allow-unmatched leaves it out"),
        "{err}"
    );
    // ... and left out, the fold is PEFT's: the table as it was.
    let kept = env.p("kept.onnx");
    fold_ok(&model, &[&ad], &kept, &["--allow-unmatched"]);
    assert_eq!(table(&model), table(&kept));
}

/// Trainable tokens on a table stored once for the embedding and a tied output layer (Gemm
/// transB=1 on the same initializer): the shared table changes in place, for both readers, as
/// PEFT's tied token adapter has it; a quantized output layer of the table's shape is noted.
#[test]
fn trainable_tokens_follow_a_tied_output_layer() {
    let env = Env::new();
    let (ad, rows) = token_adapter(&env, "embed", "fc", serde_json::json!([2, 5]));
    let out = env.p("tied.out.onnx");
    let o = onnx_lora(&fold_args(&env.p("tied.onnx"), &[&ad], &out, &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("lm_head") && err.contains("tied embeddings"),
        "{err}"
    );
    assert!(!err.contains("shared with"), "no private copy: {err}");
    let table = |path: &Path| -> Vec<f32> {
        let m = onnx_lora::onnx::load(path).unwrap();
        let g = m.proto.graph.as_ref().unwrap();
        let floats: Vec<_> = g.initializer.iter().filter(|t| t.dims == [16, 8]).collect();
        assert_eq!(floats.len(), 1, "{}: one table", path.display());
        let readers = g
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == floats[0].name()))
            .count();
        assert_eq!(readers, 2, "{}: Gather and Gemm read it", path.display());
        f32s(&m.tensor_bytes(floats[0]).unwrap())
    };
    assert_token_rows(&table(&env.p("tied.onnx")), &table(&out), &rows);
    // Equal only at the trained tokens' rows (zero in both): not tied, lm_head stays.
    let untied = env.p("untied.out.onnx");
    let o = onnx_lora(&fold_args(
        &env.p("untied_equal_rows.onnx"),
        &[&ad],
        &untied,
        &[],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("tied embeddings"), "{err}");
    let init = |path: &Path, name: &str| -> Vec<u8> {
        let m = onnx_lora::onnx::load(path).unwrap();
        let g = m.proto.graph.as_ref().unwrap();
        let t = g.initializer.iter().find(|t| t.name() == name).unwrap();
        m.tensor_bytes(t).unwrap().to_vec()
    };
    let src = env.p("untied_equal_rows.onnx");
    assert_eq!(init(&untied, "H"), init(&src, "H"), "lm_head untouched");
    assert_ne!(
        init(&untied, "E"),
        init(&src, "E"),
        "the table took the rows"
    );
    let o = onnx_lora(&fold_args(
        &env.p("tied_nbits.onnx"),
        &[&ad],
        &env.p("nbits.out.onnx"),
        &[],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("quantized output layer"), "{err}");
}

/// A trained bias (PEFT's bias="lora_only" / "all") replaces the layer's; when an exporter
/// deduplicated the bias tensor, the adapted layer gets its own copy and the other keeps its bias.
#[test]
fn a_trained_bias_on_a_shared_bias_tensor_changes_one_layer() {
    let env = Env::new();
    let mut t = lora("a", 8, 4, 0.1);
    t.push(("a.base_layer.bias".into(), vec![4], vec![0.25; 4]));
    let ad = write_adapter(&env.p("ad"), config(), &refs(&t));
    let out = env.p("out.onnx");
    fold_ok(&env.p("shared_bias.onnx"), &[&ad], &out, &[]);
    let diff: serde_json::Value =
        serde_json::from_str(&py("ort_diff.py", &[&env.p("shared_bias.onnx"), &out])).unwrap();
    assert!(diff["ya"].as_f64().unwrap() > 1e-3, "{diff}");
    assert_eq!(diff["yb"].as_f64().unwrap(), 0.0, "{diff}");
    // The same adapter at another weight: its bias cannot be weighted.
    let err = fold_fails(
        &env.p("shared_bias.onnx"),
        &ad,
        &env.p("w.onnx"),
        &["--weight", "0.5"],
    );
    assert!(
        err.contains("a trained bias") && err.contains("cannot be weighted"),
        "{err}"
    );
    // A trained bias alone leaves the layer's weight as it is: shared with another layer, it
    // is not copied.
    let ad = write_adapter(
        &env.p("bias_only"),
        config(),
        &[("a.bias", vec![4], vec![0.5; 4])],
    );
    let out = env.p("bias_only.onnx");
    let o = fold_ok(&env.p("shared.onnx"), &[&ad], &out, &[]);
    let m = onnx_lora::onnx::load(&out).unwrap();
    let g = m.proto.graph.as_ref().unwrap();
    let reads = |node: &str| g.node.iter().find(|n| n.name() == node).unwrap().input[1].clone();
    assert_eq!(
        (reads("/a/MatMul"), reads("/b/MatMul")),
        ("W".into(), "W".into()),
        "{o}"
    );
    let diff: serde_json::Value =
        serde_json::from_str(&py("ort_diff.py", &[&env.p("shared.onnx"), &out])).unwrap();
    assert!((diff["ya"].as_f64().unwrap() - 0.5).abs() < 1e-6, "{diff}");
    assert_eq!(diff["yb"].as_f64().unwrap(), 0.0, "{diff}");
    // A trained bias of a module that is no weight's (a norm layer, with bias="all") is named.
    let ad = write_adapter(
        &env.p("norm"),
        config(),
        &[("encoder.norm.bias", vec![4], vec![0.25; 4])],
    );
    let err = fold_fails(&env.p("linear.onnx"), &ad, &env.p("norm.onnx"), &[]);
    assert!(
        err.contains("encoder.norm.bias") && err.contains("normalization layers"),
        "{err}"
    );
}

/// PEFT's bias="all" trains norm layers' biases, and modules_to_save can hold a norm layer:
/// they replace the layer's scale and bias. A tensor other layers read too (deduplicated) is
/// copied for this layer; a layer without a bias cannot take one.
#[test]
fn trained_norm_values_replace_the_layers_own() {
    let env = Env::new();
    let model = env.p("norms.onnx");
    let params_of = |out: &Path, node: &str| -> Vec<(String, Vec<f32>)> {
        let m = onnx_lora::onnx::load(out).unwrap();
        let g = m.proto.graph.as_ref().unwrap();
        let n = g.node.iter().find(|n| n.name() == node).unwrap();
        n.input[1..]
            .iter()
            .map(|v| {
                // (through the Identity nodes in between)
                let mut v = v.clone();
                while let Some(id) = g
                    .node
                    .iter()
                    .find(|n| n.output[0] == v && n.op_type() == "Identity")
                {
                    v = id.input[0].clone();
                }
                let t = g.initializer.iter().find(|t| t.name() == v).unwrap();
                let b = m.tensor_bytes(t).unwrap();
                let vals = b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()));
                (v, vals.collect())
            })
            .collect()
    };
    let before = params_of(&model, "/b/norm/LayerNormalization");
    let bias = (0..8).map(|i| i as f32 * 0.25).collect::<Vec<_>>();
    let scale = vec![1.5; 8];
    type Tensors<'a> = Vec<(&'a str, Vec<usize>, Vec<f32>)>;
    let cases: [(&str, Tensors); 2] = [
        ("bias", vec![("a.norm.bias", vec![8], bias.clone())]),
        (
            "whole",
            vec![
                ("a.norm.weight", vec![8], scale.clone()),
                ("a.norm.bias", vec![8], bias.clone()),
            ],
        ),
    ];
    for (name, tensors) in cases {
        let ad = write_adapter(&env.p(name), config(), &tensors);
        let out = env.p(&format!("{name}.onnx"));
        fold_ok(&model, &[&ad], &out, &[]);
        let a = params_of(&out, "/a/norm/LayerNormalization");
        assert_eq!(a[1].1, bias, "{name}: /a/norm's bias");
        assert_eq!(
            a[1].0, "a.norm.bias.lora_folded",
            "{name}: /a/norm reads its own copy"
        );
        if name == "whole" {
            assert_eq!(a[0].1, scale, "{name}: /a/norm's scale");
        }
        assert_eq!(
            params_of(&out, "/b/norm/LayerNormalization"),
            before,
            "{name}: /b/norm"
        );
        let diff: serde_json::Value =
            serde_json::from_str(&py("ort_diff.py", &[&model, &out])).unwrap();
        assert!(diff["ya"].as_f64().unwrap() > 0.1, "{name}: {diff}");
        assert_eq!(diff["yb"].as_f64().unwrap(), 0.0, "{name}: {diff}");
        assert_eq!(diff["yc"].as_f64().unwrap(), 0.0, "{name}: {diff}");
    }
    let ad = write_adapter(
        &env.p("nobias"),
        config(),
        &[("c.norm.bias", vec![8], bias)],
    );
    let err = env.fold_fails("norms.onnx", &ad);
    assert!(
        err.contains("module 'c.norm'") && err.contains("has no constant bias"),
        "{err}"
    );
}

/// LoRA variants whose forward is not W + s·B·A on the base are refused by their config key.
#[test]
fn unsupported_lora_variants_are_refused_by_name() {
    let env = Env::new();
    let t = lora("fc", 8, 4, 0.1);
    for (key, value) in [
        ("alora_invocation_tokens", serde_json::json!([5, 6])),
        ("use_qalora", serde_json::json!(true)),
        ("use_bdlora", serde_json::json!({"nblocks": 2})),
        ("layer_replication", serde_json::json!([[0, 1], [0, 1]])),
        (
            "target_parameters",
            serde_json::json!(["experts.gate_up_proj"]),
        ),
        ("kasa_config", serde_json::json!({})),
        ("arrow_config", serde_json::json!({"top_k": 2})),
        ("monteclora_config", serde_json::json!({"n": 4})),
    ] {
        let mut cfg = config();
        cfg[key] = value.clone();
        let ad = write_adapter(&env.p(key), cfg, &refs(&t));
        if value == serde_json::json!({}) {
            // An empty config object is no variant: the adapter folds.
            fold_ok(
                &env.p("linear.onnx"),
                &[&ad],
                &env.p(&format!("{key}.onnx")),
                &[],
            );
            continue;
        }
        let err = env.fold_fails("linear.onnx", &ad);
        assert!(err.contains(key) && err.contains("not supported"), "{err}");
    }
}

/// Runs `inject MODEL ARGS... -o OUT` expecting failure: exit 2, one line, no output.
fn inject_fails(env: &Env, model: &str, args: &[&str]) -> String {
    let out = env.p("inj_out.onnx");
    let model = env.p(model);
    let mut all: Vec<String> = vec!["inject".into(), model.to_str().unwrap().into()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["-o".to_string(), out.to_str().unwrap().to_string()]);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let o = onnx_lora(&refs);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists(), "no output on error");
    err
}

/// `--form weight` refuses what has no weight form (quantized weights, grouped convolutions,
/// serving inputs), and on a weight shared by two nodes changes only the targeted one, before
/// and after fold-back.
#[test]
fn weight_form_refusals_and_shared_weights() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let ad_s = ad.to_str().unwrap();
    for m in ["nbits.onnx", "dq.onnx"] {
        let err = inject_fails(&env, m, &["--adapter", ad_s, "--form", "weight"]);
        assert!(
            err.contains("quantized") && err.contains("branch form"),
            "{m}: {err}"
        );
    }
    let err = inject_fails(
        &env,
        "linear.onnx",
        &["--adapter", ad_s, "--form", "weight", "--as-inputs"],
    );
    assert!(err.contains("--as-inputs"), "{err}");
    let adc = env.grouped_conv_adapter();
    let err = inject_fails(
        &env,
        "grouped.onnx",
        &["--adapter", adc.to_str().unwrap(), "--form", "weight"],
    );
    assert!(err.contains("grouped"), "{err}");

    let ada = write_adapter(&env.p("ada"), config(), &refs(&lora("a", 8, 4, 0.1)));
    let (shared, inj, back, folded) = (
        env.p("shared.onnx"),
        env.p("shared_w.onnx"),
        env.p("shared_w_back.onnx"),
        env.p("shared_folded.onnx"),
    );
    let p = |x: &PathBuf| x.to_str().unwrap().to_string();
    onnx_lora_ok(&[
        "inject",
        &p(&shared),
        "--adapter",
        ada.to_str().unwrap(),
        "--form",
        "weight",
        "-o",
        &p(&inj),
    ]);
    onnx_lora_ok(&["fold", &p(&inj), "-o", &p(&back)]);
    onnx_lora_ok(&[
        "fold",
        &p(&shared),
        ada.to_str().unwrap(),
        "-o",
        &p(&folded),
    ]);
    let diff = |a: &Path, b: &Path| -> serde_json::Value {
        serde_json::from_str(&py("ort_diff.py", &[a, b])).unwrap()
    };
    let d = diff(&shared, &inj);
    assert!(d["ya"].as_f64().unwrap() > 1e-3, "{d}");
    assert_eq!(d["yb"].as_f64().unwrap(), 0.0, "{d}");
    for m in [&inj, &back] {
        let d = diff(&folded, m);
        assert!(d["ya"].as_f64().unwrap() < 1e-5, "{}: {d}", m.display());
        assert_eq!(d["yb"].as_f64().unwrap(), 0.0, "{}: {d}", m.display());
    }
}

/// A base weight saved beside a LoRA (PEFT's `base_layer.weight`, written for embeddings) that
/// is not the model's means the adapter was trained on another base: fold and inject refuse it,
/// naming the module. The fixtures' own saved bases (equal, or rounded to fp16) pass elsewhere.
#[test]
fn saved_base_weight_must_be_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama/adapters/embedding");
    let dst = dir.path().join("other_base");
    let mut perturbed = false;
    copy_adapter(&src, &dst, |k, data| {
        if k.ends_with("base_layer.weight") {
            let x = f32::from_le_bytes(data[..4].try_into().unwrap());
            data[..4].copy_from_slice(&(x + 1.0).to_le_bytes());
            perturbed = true;
        }
        true
    });
    assert!(perturbed, "the fixture saves no base weight");
    let model = fixtures().join("llama/dynamo/model.onnx");
    let out = dir.path().join("out.onnx");
    let err = fold_fails(&model, &dst, &out, &[]);
    assert!(
        err.contains("model.embed_tokens") && err.contains("another base"),
        "{err}"
    );
    let o = onnx_lora(&[
        "inject",
        model.to_str().unwrap(),
        "--adapter",
        dst.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("another base"), "{err}");
    assert!(!out.exists());
}

/// A base weight saved beside a LoRA on a GPT-2 Conv1D is in torch's (in, out) layout, the one
/// the export stores: it is the model's, and the fold is byte for byte the one without it, for a
/// non-square layer (c_attn) and a square one (c_proj); changed, it is still refused (review42
/// L5: it was read as (out, in), and a saved c_attn refused as another base).
#[test]
fn saved_conv1d_base_weight_is_read_in_torch_layout() {
    let dir = tempfile::tempdir().unwrap();
    for exporter in ["dynamo", "torchscript"] {
        let model = fixtures().join(format!("gpt2/{exporter}/model.onnx"));
        let loaded = onnx_lora::onnx::io::load(&model).unwrap();
        let stored = |name: &str| -> Vec<f32> {
            let g = loaded.proto.graph.as_ref().unwrap();
            let t = g.initializer.iter().find(|t| t.name() == name).unwrap();
            let b = loaded.tensor_bytes(t).unwrap();
            b.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
            "fan_in_fan_out": true, "target_modules": ["c_attn", "c_proj"]});
        let mut tensors = Vec::new();
        for (m, n_in, n_out) in [("attn.c_attn", 32, 96), ("attn.c_proj", 32, 32)] {
            let path = format!("transformer.h.0.{m}");
            for (k, s, v) in lora(&path, n_in, n_out, 0.05) {
                tensors.push((k, s, v));
            }
        }
        let without = write_adapter(
            &dir.path().join(format!("{exporter}_lora")),
            config.clone(),
            &refs(&tensors),
        );
        for (m, n_in, n_out) in [("attn.c_attn", 32, 96), ("attn.c_proj", 32, 32)] {
            let path = format!("transformer.h.0.{m}");
            let w = stored(&format!("{path}.weight"));
            assert_eq!(w.len(), n_in * n_out);
            tensors.push((format!("{path}.base_layer.weight"), vec![n_in, n_out], w));
        }
        let with = write_adapter(
            &dir.path().join(format!("{exporter}_with_base")),
            config.clone(),
            &refs(&tensors),
        );
        let out = |name: &str| {
            let d = dir.path().join(format!("{exporter}_{name}"));
            std::fs::create_dir_all(&d).unwrap();
            d.join("out.onnx")
        };
        let (a, b) = (out("without"), out("with"));
        fold_ok(&model, &[&without], &a, &[]);
        fold_ok(&model, &[&with], &b, &[]);
        for suffix in ["", ".data"] {
            let read = |p: &Path| std::fs::read(format!("{}{suffix}", p.display())).ok();
            assert!(read(&a) == read(&b), "{exporter}: out.onnx{suffix} differs");
        }
        // c_attn's saved base changed in one value: another base
        let k = "transformer.h.0.attn.c_attn.base_layer.weight";
        let i = tensors.iter().position(|t| t.0 == k).unwrap();
        tensors[i].2[5] += 1.0;
        let other = write_adapter(
            &dir.path().join(format!("{exporter}_other")),
            config,
            &refs(&tensors),
        );
        let err = fold_fails(&model, &other, &out("other"), &[]);
        assert!(
            err.contains("transformer.h.0.attn.c_attn") && err.contains("another base"),
            "{err}"
        );
    }
}

/// adapter_config.json values of the wrong type, factors of another rank than the config gives,
/// non-finite factors and empty adapters are refused by fold and inject alike, naming the key.
#[test]
fn adapter_config_values_and_factors_are_checked() {
    let env = Env::new();
    let t = lora("fc", 8, 4, 0.1);
    let with = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = config();
        edit(&mut c);
        write_adapter(&env.p(name), c, &refs(&t))
    };
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            with("a1", &|c| c["lora_alpha"] = "16".into()),
            "lora_alpha is \"16\", not a number",
        ),
        (
            with("a2", &|c| c["lora_alpha"] = serde_json::Value::Null),
            "lora_alpha is null",
        ),
        (
            with("a3", &|c| c["use_rslora"] = "true".into()),
            "use_rslora is \"true\"",
        ),
        (
            with("a4", &|c| {
                c["alpha_pattern"] = serde_json::json!({"fc": "32"})
            }),
            "alpha_pattern['fc']",
        ),
        (
            with("a5", &|c| c["r"] = 4.into()),
            "rank 2 but adapter_config.json gives it r = 4",
        ),
        (
            with("a6", &|c| *c = serde_json::json!([1, 2, 3])),
            "not a JSON object",
        ),
        (
            with("a7", &|c| c["lora_alpha"] = 1e39.into()),
            "not a number",
        ),
        (
            with("a10", &|c| {
                c["alpha_pattern"] = serde_json::json!({"(?!x).*fc": 32})
            }),
            "alpha_pattern key '(?!x).*fc' is not a regular expression onnx-lora can evaluate",
        ),
        (
            write_adapter(&env.p("a8"), config(), &[]),
            "holds no adapter tensors",
        ),
        (
            write_adapter(&env.p("a9"), config(), &refs(&lora("fc", 8, 4, f32::NAN))),
            "non-finite",
        ),
    ];
    for (ad, expect) in &cases {
        let err = env.fold_fails("linear.onnx", ad);
        assert!(err.contains(expect), "{}: {err}", ad.display());
        let err = inject_fails(&env, "linear.onnx", &["--adapter", ad.to_str().unwrap()]);
        assert!(err.contains(expect), "{}: {err}", ad.display());
    }
    let err = inject_fails(&env, "linear.onnx", &["--rank", "100000"]);
    assert!(
        err.contains("rank 100000 is larger than both sides of 'fc'"),
        "{err}"
    );
    let err = inject_fails(&env, "linear.onnx", &["--alpha", "nan"]);
    assert!(err.contains("not a finite number"), "{err}");
}

/// No output path of any writer may land on an input: the model, an adapter's files, or the
/// serving model export-adapter reads.
#[test]
fn no_writer_overwrites_an_adapter_or_model() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let weights = ad.join("adapter_model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = env.p("linear.onnx");
    let o = onnx_lora(&["fold", &s(&model), &s(&ad), "-o", &s(&weights)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("overwrite the input"), "{err}");
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    // --adapter-out over the input model: refused before the serving model is written.
    let err = inject_fails(
        &env,
        "linear.onnx",
        &[
            "--as-inputs",
            "--adapter",
            &s(&ad),
            "--adapter-out",
            &s(&model),
        ],
    );
    assert!(err.contains("overwrite the input"), "{err}");
    let serving = env.p("serving.onnx");
    onnx_lora_ok(&[
        "inject",
        &s(&model),
        "--as-inputs",
        "--target",
        "fc",
        "-o",
        &s(&serving),
    ]);
    let served = std::fs::read(&serving).unwrap();
    for out in [&serving, &weights] {
        let o = onnx_lora(&[
            "export-adapter",
            &s(&ad),
            "--model",
            &s(&serving),
            "-o",
            &s(out),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("overwrite the input"), "{err}");
    }
    assert_eq!(std::fs::read(&serving).unwrap(), served);
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}

/// Whole tensors that match no layer: each is listed, and where whole tensors can go is said
/// once, after the list (it used to follow every module).
#[test]
fn unmatched_whole_tensors_say_where_they_fit_once() {
    let env = Env::new();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["other"], "modules_to_save": ["n1", "n2"]});
    let ad = write_adapter(
        &env.p("mts"),
        cfg,
        &[
            ("n1.weight", vec![4], vec![1.0; 4]),
            ("n2.weight", vec![4], vec![1.0; 4]),
        ],
    );
    let err = env.fold_fails("linear.onnx", &ad);
    assert!(
        err.contains("module 'n1' matches no weight")
            && err.contains("module 'n2' matches no weight"),
        "{err}"
    );
    assert_eq!(err.matches("Whole tensors fold into").count(), 1, "{err}");
    // With --allow-unmatched: warnings, and the same hint once, as a note.
    let o = onnx_lora(&[
        "fold",
        env.p("linear.onnx").to_str().unwrap(),
        ad.to_str().unwrap(),
        "--dry-run",
        "--allow-unmatched",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("Whole tensors fold into").count(), 1, "{err}");
}

/// PEFT's LoRA on a torch.nn.MultiheadAttention nests its out_proj's factors under the
/// module's base_layer, and PEFT 0.21 adds that delta twice (huggingface/peft#3774; the
/// fixtures check fold and inject against PEFT's outputs). Here: the version gate, lora_bias,
/// a file without the in_proj's factors, and a LoRA on the out_proj Linear alone, which
/// PEFT's forward never runs.
#[test]
fn multihead_attention_loras_follow_peft() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let model = fixtures().join("mha/torchscript/model.onnx");
    let mha = |cfg: serde_json::Value, name: &str| {
        let mut t = lora("attn", 16, 48, 0.1);
        t.extend(lora("attn.base_layer.out_proj", 16, 16, 0.1));
        write_adapter(&p(name), cfg, &refs(&t))
    };
    // A PEFT newer than the one checked is refused, naming both; none named is taken as
    // PEFT's current behaviour.
    for v in ["0.22.0", "0.21.3.dev0", "x"] {
        let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
            "target_modules": ["attn"], "peft_version": v});
        let err = fold_fails(&model, &mha(cfg, v), &p("out.onnx"), &[]);
        assert!(
            err.contains(&format!("saved by PEFT {v}"))
                && err.contains("huggingface/peft#3774")
                && !err.contains("PEFT does not load them"),
            "{err}"
        );
    }
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["attn"], "lora_bias": true});
    let mut t = lora("attn", 16, 48, 0.1);
    t.extend(lora("attn.base_layer.out_proj", 16, 16, 0.1));
    t.push(("attn.lora_B.bias".into(), vec![48], vec![0.1; 48]));
    let biased = write_adapter(&p("bias"), cfg, &refs(&t));
    let err = fold_fails(&model, &biased, &p("out.onnx"), &[]);
    assert!(err.contains("with lora_bias"), "{err}");
    // Accepted: the in_proj at alpha / r = 2, the out_proj at twice that, with a note.
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["attn"], "peft_version": "0.21.2"});
    let ad = mha(cfg.clone(), "ok");
    let o = onnx_lora(&fold_args(&model, &[&ad], &p("f.onnx"), &["--json"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // (with --json the note is in the report)
    let stdout = String::from_utf8_lossy(&o.stdout);
    let report = json_records(&stdout, "report");
    assert!(
        report[0]["notes"][0].as_str().unwrap().contains(
            "PEFT's LoRA on a torch.nn.MultiheadAttention; its out_proj delta counts twice"
        ),
        "{stdout}"
    );
    let scales = |stdout: &str| -> Vec<(String, f64)> {
        json_records(stdout, "module")
            .iter()
            .map(|r| {
                (
                    r["module"].as_str().unwrap().to_string(),
                    r["scale"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let mut got = scales(&String::from_utf8_lossy(&o.stdout));
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, [("attn".into(), 2.0), ("attn.out_proj".into(), 4.0)]);
    // Without the in_proj's factors (PEFT starts them at B = 0), the out_proj still counts twice.
    let only_out = write_adapter(
        &p("only_out"),
        cfg.clone(),
        &refs(&lora("attn.base_layer.out_proj", 16, 16, 0.1)),
    );
    let out = fold_ok(&model, &[&only_out], &p("g.onnx"), &["--json"]);
    assert_eq!(scales(&out), [("attn.out_proj".into(), 4.0)]);
    // With the in_proj's factors alone no out_proj delta is applied: no note, in fold or inject.
    let only_in = write_adapter(
        &p("only_in"),
        cfg.clone(),
        &refs(&lora("attn", 16, 48, 0.1)),
    );
    let o = onnx_lora(&fold_args(&model, &[&only_in], &p("h.onnx"), &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains("counts twice"), "{err}");
    let o = onnx_lora(&inject_args(&model, &only_in, &p("i.onnx"), &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains("counts twice"), "{err}");
    let o = onnx_lora(&inject_args(&model, &ad, &p("j.onnx"), &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("counts twice"), "{err}");
    // A LoRA PEFT put on the out_proj Linear itself, which PEFT's forward never runs: left out
    // with a warning, the rest folded (as the fold of the rest alone) and injected; alone,
    // refused.
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["out_proj", "fc"]});
    let fc = lora("fc", 16, 10, 0.1);
    let mut t = lora("attn.out_proj", 16, 16, 0.1);
    t.extend(fc.clone());
    let with_fc = write_adapter(&p("with_fc"), cfg.clone(), &refs(&t));
    let fc_only = write_adapter(&p("fc_only"), cfg.clone(), &refs(&fc));
    let o = onnx_lora(&fold_args(&model, &[&with_fc], &p("k.onnx"), &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("ignoring module 'attn.out_proj'")
            && err.contains(
                "the torch.nn.MultiheadAttention 'attn' reads its out_proj Linear's weight itself"
            )
            && err.contains("PEFT's forward never runs this LoRA")
            && !err.contains("counts twice"),
        "{err}"
    );
    fold_ok(&model, &[&fc_only], &p("l.onnx"), &[]);
    assert_eq!(
        std::fs::read(p("k.onnx")).unwrap(),
        std::fs::read(p("l.onnx")).unwrap()
    );
    let o = onnx_lora(&inject_args(&model, &with_fc, &p("m.onnx"), &["--json"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("ignoring module 'attn.out_proj'"),
        "{err}"
    );
    let branches = json_records(&String::from_utf8_lossy(&o.stdout), "branch");
    assert_eq!(branches.len(), 1, "{branches:?}");
    assert_eq!(branches[0]["module"], "fc");
    let alone = write_adapter(&p("alone"), cfg, &refs(&lora("attn.out_proj", 16, 16, 0.1)));
    let err = fold_fails(&model, &alone, &p("out.onnx"), &[]);
    assert!(
        err.contains("holds no module whose LoRA PEFT's forward runs: module 'attn.out_proj'")
            && err.contains("PEFT's forward never runs this LoRA"),
        "{err}"
    );
}

/// An out_proj whose parent reads its weight itself (a cross-attention's, which the export
/// shows in the attention's scope under the Linear's weight name): PEFT's forward never runs a
/// LoRA on it, so it is left out of fold and inject, with a warning, and an adapter of nothing
/// else is refused. Another layer read so is refused, saying why.
#[test]
fn lora_on_a_layer_its_parent_reads_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // (one 16 × 16 MatMul named `node`, reading `weight`)
    let one_matmul = |path: &Path, node: &str, weight: &str| {
        let raw: Vec<u8> = (0..16 * 16)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect();
        write_matmul_model(path, node, weight, 16, 16, raw);
    };
    let model = p("m.onnx");
    one_matmul(
        &model,
        "/head/attention/MatMul",
        "head.attention.out_proj.weight",
    );
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["out_proj"]});
    let ad = write_adapter(
        &p("ad"),
        cfg,
        &refs(&lora("head.attention.out_proj", 16, 16, 0.1)),
    );
    for args in [
        fold_args(&model, &[&ad], &p("out.onnx"), &[]),
        inject_args(&model, &ad, &p("out.onnx"), &[]),
    ] {
        let err = onnx_lora_fails(&args, &p("out.onnx"));
        assert!(
            err.contains("holds no module whose LoRA PEFT's forward runs: module 'head.attention.out_proj'")
                && err.contains("its parent 'head.attention' (a torch.nn.MultiheadAttention) reads the layer's weight 'head.attention.out_proj.weight' itself (MatMul /head/attention/MatMul)"),
            "{err}"
        );
    }
    // Another layer read in its parent's scope may be called there by its forward
    // (`self.fc.forward(x)`, which PEFT runs) as well as by its weight: refused, saying both.
    let other = p("other.onnx");
    one_matmul(&other, "/blk/MatMul", "blk.fc.weight");
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["fc"]});
    let ad = write_adapter(&p("ad_fc"), cfg, &refs(&lora("blk.fc", 16, 16, 0.1)));
    let err = fold_fails(&other, &ad, &p("out.onnx"), &[]);
    assert!(
        err.contains("module 'blk.fc' has no layer of its own in the export: its parent 'blk' reads the layer's weight 'blk.fc.weight' itself")
            && err.contains("--allow-unmatched leaves it out as PEFT does"),
        "{err}"
    );
}

/// PEFT's MultiheadAttention LoRA on a scope that holds no packed in-projection (as a
/// cross-attention's export, which splits it): both of its modules are unmatched with the
/// MultiheadAttention explanation, not fitted to another layer in that scope (here `fc`, a
/// 16 → 16 Linear the in-projection's [48, r] lora_B cannot fit), also under
/// --allow-unmatched, where the rest folds and no out_proj note is printed.
#[test]
fn multihead_attention_lora_without_its_in_projection_is_unmatched() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["fc", "head"], "peft_version": "0.21.2"});
    let mut t = lora("fc", 16, 48, 0.1);
    t.extend(lora("fc.base_layer.out_proj", 16, 16, 0.1));
    t.extend(lora("head", 16, 10, 0.1));
    let ad = write_adapter(&p("ad"), cfg, &refs(&t));
    let in_proj = "module 'fc' is the packed in-projection of PEFT's LoRA on the torch.nn.MultiheadAttention 'fc', which this export does not show";
    let out_proj = "module 'fc.out_proj' is the out_proj of PEFT's LoRA on the torch.nn.MultiheadAttention 'fc'";
    for exporter in ["torchscript", "dynamo"] {
        let model = fixtures().join(format!("twins/{exporter}/model.onnx"));
        let err = fold_fails(&model, &ad, &p("out.onnx"), &[]);
        assert!(
            err.contains(in_proj) && err.contains(out_proj) && !err.contains("do not fit"),
            "{exporter}: {err}"
        );
        // (inject names both too)
        let out = p("inj.onnx");
        let err = onnx_lora_fails(&inject_args(&model, &ad, &out, &[]), &out);
        assert!(
            err.contains("2 adapter modules fit no layer")
                && err.contains(in_proj)
                && err.contains(out_proj),
            "{exporter}: {err}"
        );
        for cmd in [["fold", "-"], ["inject", "--adapter"]] {
            let out = p(&format!("{exporter}_{}.onnx", cmd[0]));
            let mut args = vec![cmd[0], model.to_str().unwrap()];
            if cmd[1] != "-" {
                args.push(cmd[1]);
            }
            args.extend([
                ad.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--allow-unmatched",
            ]);
            let o = onnx_lora(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{exporter} {}: {err}", cmd[0]);
            assert!(
                err.contains("warning: unmatched adapter module:")
                    && err.contains(in_proj)
                    && err.contains(out_proj)
                    && !err.contains("counts twice"),
                "{exporter} {}: {err}",
                cmd[0]
            );
            assert!(out.exists());
        }
    }
}

/// export-peft writes branches on a MultiheadAttention's projections as PEFT's LoRA on that
/// module: the out_proj's nested under its base_layer with B rescaled for PEFT's double
/// count, and zero in_proj factors when only the out_proj has a branch. Folding the export
/// gives what folding the trained branches back gives.
#[test]
fn multihead_attention_branches_export_as_peft_saves_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = fixtures().join("mha/torchscript/model.onnx");
    let inputs = fixtures().join("mha/io/inputs.npz");
    for (tag, target, keys) in [
        (
            "both",
            "attn|attn\\.out_proj",
            ["attn", "attn.base_layer.out_proj"],
        ),
        ("out", "out_proj", ["attn", "attn.base_layer.out_proj"]),
    ] {
        let inj = p(&format!("{tag}.onnx"));
        let out = onnx_lora_ok(&[
            "inject",
            &s(&model),
            "-t",
            target,
            "--rank",
            "2",
            "--alpha",
            "6",
            "--inline",
            "-o",
            &s(&inj),
            "--json",
        ]);
        // "Train": give every B values.
        let bs: Vec<String> = json_records(&out, "branch")
            .iter()
            .map(|r| r["lora_b"].as_str().unwrap().to_string())
            .collect();
        let trained = p(&format!("{tag}_trained.onnx"));
        {
            use prost::Message;
            let mut m = onnx_lora::onnx::load(&inj).unwrap().proto;
            for t in &mut m.graph.as_mut().unwrap().initializer {
                if bs.iter().any(|b| b == t.name()) {
                    let n: i64 = t.dims.iter().product();
                    let v: Vec<u8> = (0..n)
                        .flat_map(|i| (0.05 * ((i % 7) as f32 - 3.0)).to_le_bytes())
                        .collect();
                    t.raw_data = Some(v.into());
                    t.float_data.clear();
                }
            }
            std::fs::write(&trained, m.encode_to_vec()).unwrap();
        }
        let back = p(&format!("{tag}_back.onnx"));
        onnx_lora_ok(&["fold", &s(&trained), "-o", &s(&back)]);
        let peft = p(&format!("{tag}_peft"));
        onnx_lora_ok(&["export-peft", &s(&trained), "-o", &s(&peft)]);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(
            cfg["target_modules"],
            serde_json::json!(["attn"]),
            "{tag}: {cfg}"
        );
        let bytes = std::fs::read(peft.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        let mut want: Vec<String> = keys
            .iter()
            .flat_map(|k| {
                ["lora_A.weight", "lora_B.weight"].map(|w| format!("base_model.model.{k}.{w}"))
            })
            .collect();
        want.sort();
        assert_eq!(names, want, "{tag}");
        if tag == "out" {
            let b = st.tensor("base_model.model.attn.lora_B.weight").unwrap();
            assert!(
                b.data().iter().all(|&x| x == 0),
                "{tag}: in_proj B must be zero"
            );
        }
        let refold = p(&format!("{tag}_refold.onnx"));
        onnx_lora_ok(&["fold", &s(&model), &s(&peft), "-o", &s(&refold)]);
        assert_verify(&refold, &back, &inputs, &["--atol", "1e-5"], 0);
        // ...and differs from the base: the trained values went somewhere.
        assert_verify(&refold, &model, &inputs, &["--atol", "1e-5"], 1);
    }
}

/// An adapter rooted above the export (`model.decoder...` in the adapter, `decoder...` in an
/// OPT export) whose modules_to_save sits outside that root (`lm_head`): inject and
/// fold --verify write the replaced values apart from the LoRA, and that part has no path
/// under the root; it must not be refused for it. Same result as the adapter without the root.
#[test]
fn a_whole_module_outside_the_settled_root_is_taken() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = s(&fixtures().join("bert/torchscript/model.onnx"));
    let inputs = s(&fixtures().join("bert/io/inputs.npz"));
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["query"], "modules_to_save": ["position_embeddings"]});
    let table: Vec<f32> = (0..64 * 32).map(|i| (i % 7) as f32 * 0.01).collect();
    let adapter = |dir: &str, root: &str| {
        let q = format!("{root}encoder.layer.0.attention.self.query");
        let t = lora(&q, 32, 32, 0.05);
        let mut t = refs(&t);
        t.push((
            "embeddings.position_embeddings.weight",
            vec![64, 32],
            table.clone(),
        ));
        s(&write_adapter(&env.p(dir), cfg.clone(), &t))
    };
    let (rooted, plain) = (adapter("rooted", "wrap."), adapter("plain", ""));
    let (a, b) = (env.p("a.onnx"), env.p("b.onnx"));
    let o = onnx_lora_ok(&[
        "inject",
        &model,
        "--adapter",
        &rooted,
        "-o",
        &s(&a),
        "--json",
    ]);
    assert_eq!(json_records(&o, "branch").len(), 1, "{o}");
    assert_eq!(json_records(&o, "replaced").len(), 1, "{o}");
    onnx_lora_ok(&["inject", &model, "--adapter", &plain, "-o", &s(&b)]);
    assert_verify(
        &a,
        &b,
        Path::new(&inputs),
        &["--atol", "0", "--rtol", "0"],
        0,
    );
    // The injected model records the module whose values went into its weights, by the
    // adapter's name for it; export-peft gives it back under the adapter's key, with its
    // modules_to_save entry. Folded back, the record goes.
    let replaced = |p: &Path| {
        let m = onnx_lora::onnx::load(p).unwrap();
        onnx_lora::rewrite::inject::replaced_modules(&m.proto)
    };
    assert_eq!(replaced(&a), ["embeddings.position_embeddings"]);
    // Only what was written: a whole module --allow-unmatched left out is not recorded.
    let mut t = lora("encoder.layer.0.attention.self.query", 32, 32, 0.05);
    t.push(("nope.weight".into(), vec![4], vec![1.0; 4]));
    t.push((
        "embeddings.position_embeddings.weight".into(),
        vec![64, 32],
        table.clone(),
    ));
    let mut cfg_extra = cfg.clone();
    cfg_extra["modules_to_save"] = serde_json::json!(["position_embeddings", "nope"]);
    let extra = write_adapter(&env.p("extra"), cfg_extra, &refs(&t));
    let c = env.p("c.onnx");
    onnx_lora_ok(&[
        "inject",
        &model,
        "--adapter",
        &s(&extra),
        "-o",
        &s(&c),
        "--allow-unmatched",
    ]);
    assert_eq!(replaced(&c), ["embeddings.position_embeddings"]);
    let back = env.p("back");
    let o = onnx_lora(&["export-peft", &s(&a), "-o", &s(&back), "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("does not hold them"), "{err}");
    let report = &json_records(&String::from_utf8_lossy(&o.stdout), "report")[0];
    assert_eq!(report["left_out"], serde_json::json!([]));
    let st_bytes = std::fs::read(back.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let saved = st
        .tensor("base_model.model.embeddings.position_embeddings.weight")
        .unwrap();
    assert_eq!(saved.shape(), [64, 32]);
    let values: Vec<f32> = saved
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, table);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(back.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["position_embeddings"])
    );
    let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
    keys.sort();
    // (the adapter's own paths, its root with them)
    assert_eq!(
        keys,
        [
            "base_model.model.embeddings.position_embeddings.weight",
            "base_model.model.wrap.encoder.layer.0.attention.self.query.lora_A.weight",
            "base_model.model.wrap.encoder.layer.0.attention.self.query.lora_B.weight",
        ]
    );
    // A model injected before the record existed (its list of replaced modules only): export-peft
    // names the module as left out.
    let mut old = onnx_lora::onnx::load(&a).unwrap();
    old.proto
        .metadata_props
        .retain(|p| p.key() != "onnx-lora.whole_values");
    let old_path = env.p("old.onnx");
    onnx_lora::onnx::save(&old, &old_path, &Default::default()).unwrap();
    let o = onnx_lora(&[
        "export-peft",
        &s(&old_path),
        "-o",
        &s(&env.p("old_back")),
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("'embeddings.position_embeddings'") && err.contains("does not hold them"),
        "{err}"
    );
    let report = &json_records(&String::from_utf8_lossy(&o.stdout), "report")[0];
    assert_eq!(
        report["left_out"],
        serde_json::json!(["embeddings.position_embeddings"])
    );
    let merged = env.p("merged.onnx");
    onnx_lora_ok(&["fold", &s(&a), "-o", &s(&merged)]);
    let m = onnx_lora::onnx::load(&merged).unwrap();
    assert!(
        m.proto
            .metadata_props
            .iter()
            .all(|p| { p.key() != "onnx-lora.replaced" && p.key() != "onnx-lora.whole_values" })
    );
    let f = s(&env.p("f.onnx"));
    onnx_lora_ok(&["fold", &model, &rooted, "-o", &f, "--verify", "--ep", "cpu"]);
}

/// An adapter injected over an injected model: what it writes where export-peft cannot give it
/// back is named as left out even where the first adapter's recorded tensor has that module's
/// path (a LoHa on a layer whose trained bias is recorded), and trainable tokens whose indices
/// clash with the recorded ones are left out rather than exported under the wrong indices; the
/// rest is given back (review44 M1, M2). A trained bias for a layer the first adapter gave a
/// branch goes under the wrapped layer's key.
#[test]
fn export_peft_names_what_a_later_adapter_wrote_over_a_record() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let export = |model: &Path, name: &str| {
        let dir = env.p(name);
        let o = onnx_lora(&["export-peft", &s(model), "-o", &s(&dir), "--json"]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        let report = json_records(&String::from_utf8_lossy(&o.stdout), "report")[0].clone();
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let keys: Vec<String> = st.names().into_iter().map(String::from).collect();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap())
                .unwrap();
        (err, report, keys, config)
    };
    // A LoHa over a layer whose trained bias bias="all" recorded.
    let bert = fixtures().join("bert/torchscript/model.onnx");
    let a = env.p("a.onnx");
    onnx_lora_ok(&[
        "inject",
        &s(&bert),
        "--adapter",
        &s(&fixtures().join("bert/adapters/bias_all")),
        "-o",
        &s(&a),
    ]);
    let key = "encoder.layer.0.attention.self.key";
    let factor = |shape: [usize; 2]| (shape.to_vec(), vec![0.05f32; shape[0] * shape[1]]);
    let t: Vec<(String, Vec<usize>, Vec<f32>)> = [
        ("hada_w1_a", [32, 2]),
        ("hada_w1_b", [2, 32]),
        ("hada_w2_a", [32, 2]),
        ("hada_w2_b", [2, 32]),
    ]
    .iter()
    .map(|(n, sh)| {
        let (shape, v) = factor(*sh);
        (format!("{key}.{n}"), shape, v)
    })
    .collect();
    let loha = write_adapter(
        &env.p("loha"),
        serde_json::json!({"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["key"]}),
        &refs(&t),
    );
    let b = env.p("b.onnx");
    onnx_lora_ok(&["inject", &s(&a), "--adapter", &s(&loha), "-o", &s(&b)]);
    let (err, report, keys, _) = export(&b, "b_peft");
    assert!(
        err.contains(&format!("'{key}'")) && err.contains("does not hold them"),
        "{err}"
    );
    assert_eq!(report["left_out"], serde_json::json!([key]));
    // (the other recorded biases are given back, the key layer's is not)
    assert!(
        keys.iter()
            .any(|k| k.ends_with("encoder.layer.1.attention.self.key.bias")),
        "{keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.contains(&format!("{key}.bias"))),
        "{keys:?}"
    );
    // Trainable tokens at other indices than those recorded, on the same table.
    let llama = fixtures().join("llama/dynamo/model.onnx");
    let c = env.p("c.onnx");
    onnx_lora_ok(&[
        "inject",
        &s(&llama),
        "--adapter",
        &s(&fixtures().join("llama/adapters/trainable_tokens")),
        "-o",
        &s(&c),
    ]);
    let mut t = lora("model.layers.0.self_attn.k_proj", 32, 16, 0.05);
    t.push((
        "model.embed_tokens.token_adapter.trainable_tokens_delta".into(),
        vec![2, 32],
        vec![0.25; 64],
    ));
    let tokens = write_adapter(
        &env.p("tokens"),
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
            "target_modules": ["k_proj"], "trainable_token_indices": [16, 7]}),
        &refs(&t),
    );
    let d = env.p("d.onnx");
    onnx_lora_ok(&["inject", &s(&c), "--adapter", &s(&tokens), "-o", &s(&d)]);
    let (err, report, keys, config) = export(&d, "d_peft");
    assert!(
        err.contains("'model.embed_tokens'") && err.contains("does not hold them"),
        "{err}"
    );
    assert_eq!(
        report["left_out"],
        serde_json::json!(["model.embed_tokens"])
    );
    assert!(
        !keys.iter().any(|k| k.contains("trainable_tokens_delta")),
        "{keys:?}"
    );
    assert!(config["trainable_token_indices"].is_null(), "{config}");
    assert!(keys.iter().any(|k| k.contains("k_proj.lora_A")), "{keys:?}");
    // A trained bias (bias="all", saved as `query.bias`) for a layer the first adapter gave a
    // branch: exported as the wrapped layer's `query.base_layer.bias`, where PEFT loads it.
    let e = env.p("e.onnx");
    onnx_lora_ok(&[
        "inject",
        &s(&bert),
        "--adapter",
        &s(&fixtures().join("bert/adapters/plain")),
        "-o",
        &s(&e),
    ]);
    let q = "encoder.layer.0.attention.self.query";
    let mut t = lora("encoder.layer.0.attention.self.key", 32, 32, 0.05);
    t.push((format!("{q}.bias"), vec![32], vec![0.5; 32]));
    let biased = write_adapter(
        &env.p("biased"),
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
            "target_modules": ["key"], "bias": "all"}),
        &refs(&t),
    );
    let f = env.p("f.onnx");
    onnx_lora_ok(&["inject", &s(&e), "--adapter", &s(&biased), "-o", &s(&f)]);
    let (err, report, keys, _) = export(&f, "f_peft");
    assert!(!err.contains("does not hold them"), "{err}");
    let wrapped = format!("base_model.model.{q}.base_layer.bias");
    assert_eq!(report["whole_values"], serde_json::json!([wrapped]));
    assert!(keys.contains(&wrapped), "{keys:?}");
    let refold = env.p("refold.onnx");
    onnx_lora_ok(&["fold", &s(&bert), &s(&env.p("f_peft")), "-o", &s(&refold)]);
    let inputs = fixtures().join("bert/io/inputs.npz");
    assert_verify(&refold, &f, &inputs, &["--atol", "1e-5"], 0);
    // A whole module (modules_to_save: weight and bias), its bias written again by a later
    // adapter (bias="all"): the first's weight and the second's bias are given back (review45:
    // the later entry dropped the weight's).
    let dense = "encoder.layer.0.output.dense";
    let mut t = lora("encoder.layer.0.attention.self.query", 32, 32, 0.05);
    t.push((format!("{dense}.weight"), vec![32, 64], vec![0.01; 32 * 64]));
    t.push((format!("{dense}.bias"), vec![32], vec![0.1; 32]));
    let saved = write_adapter(
        &env.p("saved"),
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
            "target_modules": ["query"], "modules_to_save": [dense]}),
        &refs(&t),
    );
    let mut t = lora("encoder.layer.0.attention.self.key", 32, 32, 0.05);
    t.push((format!("{dense}.bias"), vec![32], vec![0.3; 32]));
    let later = write_adapter(
        &env.p("later"),
        serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
            "target_modules": ["key"], "bias": "all"}),
        &refs(&t),
    );
    let (g, h) = (env.p("g.onnx"), env.p("h.onnx"));
    onnx_lora_ok(&["inject", &s(&bert), "--adapter", &s(&saved), "-o", &s(&g)]);
    onnx_lora_ok(&["inject", &s(&g), "--adapter", &s(&later), "-o", &s(&h)]);
    let (err, report, keys, config) = export(&h, "h_peft");
    assert!(!err.contains("does not hold them"), "{err}");
    for k in ["weight", "bias"] {
        let key = format!("base_model.model.{dense}.{k}");
        assert!(keys.contains(&key), "{keys:?}");
    }
    assert_eq!(report["left_out"], serde_json::json!([]));
    assert_eq!(config["modules_to_save"], serde_json::json!([dense]));
    assert_eq!(config["bias"], "all");
    let refold = env.p("refold_h.onnx");
    onnx_lora_ok(&["fold", &s(&bert), &s(&env.p("h_peft")), "-o", &s(&refold)]);
    assert_verify(&refold, &h, &inputs, &["--atol", "1e-5"], 0);
}

/// A square whole weight of another size than its layer's, saved for a layer whose weight is
/// not named after it: refused as a resized layer, not a crash (review45: the layout check read
/// past the layer's values).
#[test]
fn a_square_whole_weight_of_another_size_is_refused() {
    let env = Env::new();
    let t = vec![("fc.weight", vec![6, 6], vec![0.1f32; 36])];
    let mut cfg = config();
    cfg["modules_to_save"] = serde_json::json!(["fc"]);
    let ad = write_adapter(&env.p("square"), cfg, &t);
    let err = env.fold_fails("linear.onnx", &ad);
    assert!(err.contains("resized layers cannot be folded"), "{err}");
}

/// A whole weight (modules_to_save) comes in torch's layout for its layer, whatever the
/// adapter's fan_in_fan_out says about its LoRA targets: a Linear's (out, in) goes into a
/// MatMul's (in, out) weight transposed.
#[test]
fn whole_weights_follow_their_layer_not_fan_in_fan_out() {
    let env = Env::new();
    let values: Vec<f32> = (0..32).map(|i| i as f32).collect();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["other"], "fan_in_fan_out": true, "modules_to_save": ["fc"]});
    let ad = write_adapter(
        &env.p("mts"),
        cfg,
        &[("fc.weight", vec![4, 8], values.clone())],
    );
    let out = env.p("mts.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    onnx_lora_ok(&["fold", &s(&env.p("linear.onnx")), &s(&ad), "-o", &s(&out)]);
    let m = onnx_lora::onnx::load(&out).unwrap();
    let w = m
        .proto
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name() == "W")
        .unwrap();
    let got: Vec<f32> = m
        .tensor_bytes(w)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // W [8, 4] (in, out) holds the Linear weight [4, 8] (out, in) transposed.
    for i in 0..8 {
        for o in 0..4 {
            assert_eq!(got[i * 4 + o], values[o * 8 + i], "W[{i}][{o}]");
        }
    }
}

/// lora_bias on a Conv without a bias: the weight form adds s·b per output channel after the
/// node, like the branch form (onnxruntime runs both; their outputs agree).
#[test]
fn weight_form_lora_bias_on_a_biasless_conv_is_per_channel() {
    let env = Env::new();
    let mut t = lora("conv", 2 * 3 * 3, 3, 0.1);
    t[0].1 = vec![2, 2, 3, 3];
    t[1].1 = vec![3, 2, 1, 1];
    t.push(("conv.lora_B.bias".into(), vec![3], vec![0.5, -1.0, 2.0]));
    let mut cfg = config();
    cfg["lora_bias"] = true.into();
    cfg["target_modules"] = serde_json::json!(["conv"]);
    let ad = write_adapter(&env.p("adb"), cfg, &refs(&t));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = env.p("conv_nobias.onnx");
    for (form, out) in [("branch", "b.onnx"), ("weight", "w.onnx")] {
        onnx_lora_ok(&[
            "inject",
            &s(&model),
            "--adapter",
            &s(&ad),
            "--form",
            form,
            "-o",
            &s(&env.p(out)),
        ]);
    }
    let o = onnx_lora(&[
        "verify",
        &s(&env.p("w.onnx")),
        &s(&env.p("b.onnx")),
        "--ep",
        "cpu",
    ]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{text}");
    // and both differ from the base by the bias, per channel
    let o = onnx_lora(&["verify", &s(&env.p("w.onnx")), &s(&model), "--ep", "cpu"]);
    assert_eq!(o.status.code(), Some(1));
    // Folded back, and exported to PEFT then folded, it is the adapter folded.
    onnx_lora_ok(&["fold", &s(&model), &s(&ad), "-o", &s(&env.p("f.onnx"))]);
    onnx_lora_ok(&["fold", &s(&env.p("w.onnx")), "-o", &s(&env.p("back.onnx"))]);
    onnx_lora_ok(&[
        "export-peft",
        &s(&env.p("w.onnx")),
        "-o",
        &s(&env.p("exported")),
    ]);
    fold_ok(&model, &[&env.p("exported")], &env.p("re.onnx"), &[]);
    for other in ["back.onnx", "re.onnx"] {
        let o = onnx_lora(&[
            "verify",
            &s(&env.p(other)),
            &s(&env.p("f.onnx")),
            "--ep",
            "cpu",
        ]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{other}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

/// Options that only shape fresh branches conflict with --adapter (they would be ignored);
/// --strip-prefix removes whole leading components, and one that strips nothing is an error;
/// --weight and --scale take negative numbers.
#[test]
fn inject_options_are_checked_and_weights_may_be_negative() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for extra in [
        ["--target", "fc"],
        ["--rank", "4"],
        ["--init", "gaussian"],
        ["--strip-prefix", "f"],
    ] {
        let mut args = vec!["--adapter", ad.to_str().unwrap()];
        args.extend(extra);
        let err = inject_fails(&env, "linear.onnx", &args);
        assert!(err.contains("cannot be used with"), "{err}");
    }
    let err = inject_fails(&env, "linear.onnx", &["--strip-prefix", "f"]);
    assert!(
        err.contains("--strip-prefix 'f' is no leading dotted component"),
        "{err}"
    );
    // Options that only mean something with another are refused without it, not ignored.
    let err = inject_fails(&env, "linear.onnx", &["--allow-unmatched"]);
    assert!(err.contains("--adapter"), "{err}");
    let o = onnx_lora(&[
        "convert",
        &s(&env.p("linear.onnx")),
        "-o",
        &s(&env.p("c.onnx")),
        "--inline",
        "--threshold",
        "10",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    assert!(!env.p("c.onnx").exists());
    // --weight -1 undoes the adapter: equal to --weight 1 --scale -1, not to the plain fold.
    let fold_to = |name: &str, extra: &[&str]| {
        let out = env.p(name);
        let mut args = vec![
            "fold".to_string(),
            s(&env.p("linear.onnx")),
            s(&ad),
            "-o".into(),
            s(&out),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        onnx_lora_ok(&args);
        out
    };
    let neg = fold_to("neg.onnx", &["--weight", "-1"]);
    let scaled = fold_to("scaled.onnx", &["--weight", "1", "--scale", "-1"]);
    let plain = fold_to("plain.onnx", &[]);
    let verify = |a: &Path, b: &Path| {
        onnx_lora(&["verify", &s(a), &s(b), "--ep", "cpu"])
            .status
            .code()
    };
    assert_eq!(verify(&neg, &scaled), Some(0));
    assert_eq!(verify(&neg, &plain), Some(1));
}

/// export-peft refuses what PEFT could not load: a serving model's rank-0 default factors.
#[test]
fn export_peft_refuses_a_serving_models_empty_factors() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let serving = env.p("serving.onnx");
    onnx_lora_ok(&[
        "inject",
        &s(&env.p("linear.onnx")),
        "--as-inputs",
        "-o",
        &s(&serving),
    ]);
    let out = env.p("exported");
    let o = onnx_lora(&["export-peft", &s(&serving), "-o", &s(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("serving.onnx") && err.contains("rank-0 factors"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `inject --adapter --verify` on a quantized base says why it cannot build its reference (the
/// adapter folded into the weights) and what to do instead; nothing is written.
#[test]
fn verify_of_a_branch_beside_a_quantized_weight_says_why_not() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    for model in ["nbits.onnx", "dq.onnx"] {
        let err = inject_fails(
            &env,
            model,
            &["--adapter", ad.to_str().unwrap(), "--verify"],
        );
        assert!(
            err.contains("has a quantized weight") && err.contains("inject without --verify"),
            "{err}"
        );
    }
}

/// A folder given as the model, and a file that is no safetensors given as the adapter, are
/// named as such.
#[test]
fn wrong_kinds_of_input_are_named() {
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = onnx_lora(&["fold", &s(&ad), &s(&ad), "-o", &s(&env.p("o.onnx"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is a folder, not a file"), "{err}");
    let model = env.p("linear.onnx");
    let err = fold_fails(&model, &model, &env.p("o.onnx"), &[]);
    assert!(err.contains("linear.onnx: not a safetensors file"), "{err}");
}

/// Every writer's JSON report names what it wrote in `output`.
#[test]
fn writer_reports_name_their_output() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let last = |out: &str| -> serde_json::Value {
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let train = env.p("train.onnx");
    let out = onnx_lora_ok(&[
        "inject",
        &s(&env.p("linear.onnx")),
        "-o",
        &s(&train),
        "--json",
    ]);
    assert_eq!(last(&out)["output"], s(&train));
    assert_eq!(last(&out)["external_data"], serde_json::Value::Null);
    assert_eq!(last(&out)["adapter_out"], serde_json::Value::Null);
    // A serving model's report names its adapter file and its external data.
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let (srv, file) = (env.p("srv.onnx"), env.p("srv.onnx_adapter"));
    let out = onnx_lora_ok(&[
        "inject",
        &s(&env.p("linear.onnx")),
        "--as-inputs",
        "--adapter",
        &s(&ad),
        "--adapter-out",
        &s(&file),
        "--external-data",
        "--threshold",
        "0",
        "-o",
        &s(&srv),
        "--json",
    ]);
    assert_eq!(last(&out)["adapter_out"], s(&file));
    assert_eq!(last(&out)["external_data"], format!("{}.data", s(&srv)));
    // An adapter over a module the serving model has no inputs for is refused by name.
    let other = write_adapter(&env.p("ad2"), config(), &refs(&lora("gc", 8, 4, 0.1)));
    let o = onnx_lora(&[
        "export-adapter",
        &s(&other),
        "--model",
        &s(&srv),
        "-o",
        &s(&env.p("x.onnx_adapter")),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("module 'gc' has no LoRA input in"), "{err}");
    let conv = env.p("conv.onnx");
    let out = onnx_lora_ok(&["convert", &s(&train), "-o", &s(&conv), "--json"]);
    assert_eq!(last(&out)["output"], s(&conv));
    let peft = env.p("peft");
    let out = onnx_lora_ok(&["export-peft", &s(&train), "-o", &s(&peft), "--json"]);
    assert_eq!(last(&out)["output"], s(&peft));
    assert_eq!(last(&out)["type"], "report");
}

/// A branch whose scale is not one finite number (a hand-edited or corrupted model) is refused
/// by fold-back and export-peft, naming the branch, in either form (the weight form's scale
/// broadcasts over A's rank columns, so a vector would scale each one differently).
#[test]
fn a_branch_scale_must_be_one_finite_number() {
    use prost::Message;
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let train = env.p("train.onnx");
    onnx_lora_ok(&[
        "inject",
        &s(&env.p("linear.onnx")),
        "-o",
        &s(&train),
        "--inline",
    ]);
    let weight_form = env.p("train_w.onnx");
    onnx_lora_ok(&[
        "inject",
        &s(&env.p("linear.onnx")),
        "--form",
        "weight",
        "-o",
        &s(&weight_form),
        "--inline",
    ]);
    for (train, name, values) in [
        (&train, "nan.onnx", vec![f32::NAN]),
        (&train, "vec.onnx", vec![1.0, 2.0]),
        (&weight_form, "nan.onnx", vec![f32::NAN]),
        (&weight_form, "vec.onnx", vec![2.0, 3.0]),
    ] {
        let mut m = onnx_lora::onnx::load(train).unwrap().proto;
        let g = m.graph.as_mut().unwrap();
        let t = g
            .initializer
            .iter_mut()
            .find(|t| t.name() == "fc.lora_scale")
            .unwrap();
        t.raw_data = Some(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        );
        t.dims = vec![values.len() as i64];
        let bad = env.p(name);
        std::fs::write(&bad, m.encode_to_vec()).unwrap();
        for args in [
            vec![
                "fold".to_string(),
                s(&bad),
                "-o".into(),
                s(&env.p("back.onnx")),
            ],
            vec![
                "export-peft".to_string(),
                s(&bad),
                "-o".into(),
                s(&env.p("peft")),
            ],
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let o = onnx_lora(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{err}");
            assert!(
                err.contains("injected branch 'fc'") && err.contains("must be one finite number"),
                "{err}"
            );
        }
        assert!(!env.p("back.onnx").exists() && !env.p("peft").exists());
    }
}

/// `--verify` that cannot run writes nothing: an onnxruntime library that does not load, or a
/// CUDA EP that does not register (the test venv's onnxruntime is CPU-only), is found before
/// anything is written (one line, exit 2). (What a check that fails after the write removes
/// is unit-tested in `cli`, and an interrupt during the check in `tests/interrupt.rs`.)
#[test]
fn failed_verify_leaves_no_output() {
    let case = cases()
        .into_iter()
        .find(|c| c.model == "llama" && c.exporter == "dynamo")
        .unwrap();
    let plain = case.adapters.iter().find(|a| a.name == "plain").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let data = dir.path().join("out.onnx.data");
    let file = dir.path().join("out.onnx_adapter");
    let bad_lib = ["--ep", "cpu", "--ort-lib", "/nonexistent/libonnxruntime.so"];
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let fold = |extra: &[&str]| {
        let mut a = vec![
            "fold".to_string(),
            s(&case.onnx),
            s(&plain.dir),
            "-o".into(),
            s(&out),
            "--verify".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let inject = |extra: &[&str]| {
        let mut a = vec![
            "inject".to_string(),
            s(&case.onnx),
            "--as-inputs".into(),
            "--adapter".into(),
            s(&plain.dir),
            "--adapter-out".into(),
            s(&file),
            "-o".into(),
            s(&out),
            "--verify".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    for args in [fold(&bad_lib), inject(&bad_lib)] {
        let o = onnx_lora(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("--verify") && err.contains("/nonexistent"),
            "{err}"
        );
        assert!(!out.exists() && !data.exists() && !file.exists(), "{err}");
    }
    for args in [fold(&["--ep", "cuda"]), inject(&["--ep", "cuda"])] {
        let o = onnx_lora(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&o.stderr);
        match o.status.code() {
            Some(0) => assert!(out.exists(), "{err}"), // a CUDA onnxruntime with a GPU
            Some(2) => {
                assert_eq!(err.trim().lines().count(), 1, "{err}");
                assert!(err.contains("--verify") && err.contains("CUDA"), "{err}");
                assert!(!out.exists() && !data.exists() && !file.exists(), "{err}");
            }
            c => panic!("{c:?}: {err}"),
        }
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(&data);
        let _ = std::fs::remove_file(&file);
    }
}

/// Runs the binary, failing the test if it has not ended within 30 s (an open that blocks).
#[cfg(unix)]
fn onnx_lora_within_30s(args: &[&str]) -> std::process::Output {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("onnx-lora {args:?} still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Special files: an output path that is a FIFO or a device (or a link to one) is refused, not
/// replaced by the renamed output; an input that is one is refused before it is opened (a FIFO
/// would block the open, `/dev/zero` would be read forever).
#[cfg(unix)]
#[test]
fn special_files_are_refused_as_outputs_and_inputs() {
    use std::os::unix::fs::FileTypeExt;
    let env = Env::new();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = s(&env.p("linear.onnx"));
    let fifo = env.p("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // (a link, so that a regression would replace the link rather than the machine's /dev/null)
    let null = env.p("null");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    let refused = |args: &[&str], what: &str| {
        let o = onnx_lora_within_30s(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(what), "{args:?}: {err}");
    };
    let adapter = s(&ad);
    let serving = s(&env.p("serving.onnx"));
    for (out, what) in [(&fifo, "is a FIFO"), (&null, "is a device")] {
        let o = s(out);
        refused(&["fold", &model, &adapter, "-o", &o], what);
        refused(&["convert", &model, "-o", &o], what);
        refused(
            &[
                "inject",
                &model,
                "--as-inputs",
                "--adapter",
                &adapter,
                "--adapter-out",
                &o,
                "-o",
                &serving,
            ],
            what,
        );
        assert!(!env.p("serving.onnx").exists());
        let name = out.file_name().unwrap().to_str().unwrap();
        let folded = s(&env.p("folded.onnx"));
        refused(
            &["convert", &model, "-o", &folded, "--external-data", name],
            what,
        );
        assert!(!env.p("folded.onnx").exists());
    }
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&null).unwrap().is_symlink());
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );

    // Inputs: the model, the adapter's config and weights, stored inputs for verify.
    let out = s(&env.p("out.onnx"));
    refused(&["fold", &s(&fifo), &s(&ad), "-o", &out], "is a FIFO");
    refused(&["inspect", &s(&null)], "is a device");
    for (file, target) in [
        ("adapter_config.json", &fifo),
        ("adapter_config.json", &PathBuf::from("/dev/zero")),
        ("adapter_model.safetensors", &fifo),
    ] {
        let bad = env.p("bad_adapter");
        let _ = std::fs::remove_dir_all(&bad);
        std::fs::create_dir(&bad).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            if f == file {
                std::os::unix::fs::symlink(target, bad.join(f)).unwrap();
            } else {
                std::fs::copy(ad.join(f), bad.join(f)).unwrap();
            }
        }
        refused(&["fold", &model, &s(&bad), "-o", &out], file);
    }
    refused(
        &[
            "verify",
            &model,
            &model,
            "--inputs",
            &s(&fifo),
            "--ep",
            "tract",
        ],
        "is a FIFO",
    );
    // An onnxruntime adapter for verify, and an adapter file (kohya's form) for fold.
    for (bad, what) in [(&fifo, "is a FIFO"), (&null, "is a device")] {
        refused(
            &[
                "verify",
                &model,
                &model,
                "--adapter",
                &s(bad),
                "--ep",
                "cpu",
            ],
            what,
        );
        refused(&["fold", &model, &s(bad), "-o", &out], what);
    }
    refused(
        &[
            "verify",
            &model,
            &model,
            "--adapter",
            &s(&env.p("none.onnx_adapter")),
            "--ep",
            "cpu",
        ],
        "none.onnx_adapter: No such file",
    );
    // A .safetensors file that is neither kohya's nor beside a PEFT config names itself.
    let lone = env.p("lone");
    std::fs::create_dir(&lone).unwrap();
    std::fs::copy(
        ad.join("adapter_model.safetensors"),
        lone.join("w.safetensors"),
    )
    .unwrap();
    refused(
        &["fold", &model, &s(&lone.join("w.safetensors")), "-o", &out],
        "w.safetensors: neither a kohya LoRA file",
    );
    assert!(!env.p("out.onnx").exists());
}

/// Tensors and layers that say something impossible are refused in one line (or, for a layer,
/// not taken as a target), never a panic or a misread: a shape too large to exist or negative in
/// external data, strings or untyped bytes in external data, a tensor stored in segments, raw_data set but empty beside typed values, a
/// Conv group that overflows, a Gemm with alpha = 0, a conv LoRA whose kernel is not the layer's.
#[test]
fn impossible_tensors_and_layers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    py("make_malformed_models.py", &[dir.path()]);
    let p = |n: &str| dir.path().join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (model, what) in [
        ("ext_huge.onnx", "is too large"),
        ("ext_negative.onnx", "negative dimension"),
        ("segment.onnx", "stored in segments"),
        ("raw_empty.onnx", "holds 0 bytes of raw data"),
        ("ext_string.onnx", "cannot be stored as external data"),
        ("ext_undefined.onnx", "cannot be stored as external data"),
    ] {
        let o = onnx_lora(&["inspect", &s(&p(model))]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{model}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{model}: {err}");
        assert!(
            err.contains("fc.weight") && err.contains(what),
            "{model}: {err}"
        );
        let out = p("out.onnx");
        let o = onnx_lora(&["convert", &s(&p(model)), "-o", &s(&out)]);
        assert_eq!(o.status.code(), Some(2), "{model}");
        assert!(!out.exists());
    }
    // A group that overflows the input width: no valid Conv, so no candidate.
    let o = onnx_lora(&["inspect", &s(&p("huge_group.onnx")), "--json"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("\"candidates\":0"), "{stdout}");

    let fc = write_adapter(&p("fc"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let err = fold_fails(&p("gemm_alpha0.onnx"), &fc, &p("out.onnx"), &[]);
    assert!(err.contains("Gemm alpha = 0"), "{err}");
    // PEFT's conv LoRA: lora_A has the layer's kernel (here 3×3 against the layer's 1×9, the
    // same 18 values per output once flattened), lora_B is 1×1.
    let conv = write_adapter(
        &p("conv"),
        config(),
        &[
            ("conv.lora_A.weight", vec![2, 2, 3, 3], vec![0.1; 36]),
            ("conv.lora_B.weight", vec![4, 2, 1, 1], vec![0.1; 8]),
        ],
    );
    let err = fold_fails(&p("conv_1x9.onnx"), &conv, &p("out.onnx"), &[]);
    assert!(err.contains("do not fit weight 'conv.weight'"), "{err}");
    let o = onnx_lora(&[
        "inject",
        &s(&p("conv_1x9.onnx")),
        "--adapter",
        &s(&conv),
        "-o",
        &s(&p("out.onnx")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!p("out.onnx").exists());
    // The layer's own 1×9 kernel fits.
    let conv = write_adapter(
        &p("conv19"),
        config(),
        &[
            ("conv.lora_A.weight", vec![2, 2, 1, 9], vec![0.1; 36]),
            ("conv.lora_B.weight", vec![4, 2, 1, 1], vec![0.1; 8]),
        ],
    );
    fold_ok(&p("conv_1x9.onnx"), &[&conv], &p("out.onnx"), &[]);
    // A weight that is also a graph output keeps its value there: the layer gets a copy.
    let out = p("out.onnx");
    let report = fold_ok(&p("weight_output.onnx"), &[&fc], &out, &["--json"]);
    assert!(report.contains("\"copy\":\"fc.weight"), "{report}");
    let folded = onnx_lora::onnx::load(&out).unwrap();
    let g = folded.proto.graph.as_ref().unwrap();
    let kept = g
        .initializer
        .iter()
        .find(|t| t.name() == "fc.weight")
        .unwrap();
    let ones: Vec<u8> = (0..32).flat_map(|_| 1f32.to_le_bytes()).collect();
    assert_eq!(kept.raw_data.as_deref(), Some(&ones[..]));
    assert!(g.output.iter().any(|o| o.name() == "fc.weight"));
}

/// `inject MODEL ARGS... -o OUT` (inline) on an edge model; returns the injected model's path.
fn injected(env: &Env, model: &str, args: &[&str], out: &str) -> PathBuf {
    let out = env.p(out);
    let mut all: Vec<String> = vec!["inject".into(), env.p(model).to_str().unwrap().into()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["--inline".into(), "-o".into(), out.to_str().unwrap().into()]);
    onnx_lora_ok(&all.iter().map(String::as_str).collect::<Vec<_>>());
    out
}

/// A copy of the adapter folder `src` at `dst` with `edit` applied to its adapter_config.json.
fn with_config(src: &Path, dst: &Path, edit: &dyn Fn(&mut serde_json::Value)) -> PathBuf {
    copy_adapter(src, dst, |_, _| true);
    let path = dst.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&path, c.to_string()).unwrap();
    dst.to_path_buf()
}

/// A copy of `model` at `out` (in `env`) with `edit` applied to its proto.
fn edited(
    env: &Env,
    model: &Path,
    out: &str,
    edit: impl FnOnce(&mut onnx_lora::onnx::pb::GraphProto),
) -> PathBuf {
    use prost::Message;
    let mut m = onnx_lora::onnx::load(model).unwrap().proto;
    edit(m.graph.as_mut().unwrap());
    let out = env.p(out);
    std::fs::write(&out, m.encode_to_vec()).unwrap();
    out
}

/// Runs fold (no adapter), export-peft and inject on an injected model expecting each to
/// refuse it: exit 2, one line containing every one of `expect`, nothing written. (A layer in
/// weight form is no target, so inject of a one-layer model in weight form finds no target
/// before it reads the branch: only its exit and line are checked there.)
fn every_reader_refuses(env: &Env, model: &Path, expect: &[&str]) {
    let nodes = onnx_lora::onnx::load(model)
        .unwrap()
        .proto
        .graph
        .unwrap()
        .node;
    let weight_form = nodes.iter().any(|n| role_of(n) == "weight_add");
    // Convolutions are targeted by name (the default targets are linear layers).
    let target = if nodes.iter().any(|n| n.op_type() == "Conv") {
        "conv"
    } else {
        ".*"
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (out, dir) = (env.p("back.onnx"), env.p("peft"));
    for args in [
        vec!["fold".to_string(), s(model), "-o".into(), s(&out)],
        vec!["export-peft".to_string(), s(model), "-o".into(), s(&dir)],
        vec![
            "inject".to_string(),
            s(model),
            "-t".into(),
            target.into(),
            "-o".into(),
            s(&out),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = onnx_lora(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        for e in expect
            .iter()
            .filter(|_| !(weight_form && args[0] == "inject"))
        {
            assert!(err.contains(e), "{args:?}: expected '{e}' in: {err}");
        }
        assert!(!out.exists() && !dir.exists(), "{args:?}: wrote output");
    }
}

fn set_tensor(g: &mut onnx_lora::onnx::pb::GraphProto, name: &str, dims: &[i64], values: &[f32]) {
    let t = g.initializer.iter_mut().find(|t| t.name() == name).unwrap();
    t.raw_data = Some(
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
    );
    t.dims = dims.to_vec();
}

fn role_of(n: &onnx_lora::onnx::pb::NodeProto) -> &str {
    n.metadata_props
        .iter()
        .find(|p| p.key() == "onnx-lora.role")
        .map_or("", |p| p.value())
}

/// A branch factor that is no matrix (a scalar lora_A or lora_B, in either form, on a linear
/// layer or a convolution) is refused by every reader of injected models, naming the tensor.
#[test]
fn injected_factors_must_have_their_layers_dimensions() {
    let env = Env::new();
    let lin = injected(&env, "linear.onnx", &[], "lin.onnx");
    let conv = injected(&env, "conv_nobias.onnx", &["-t", "conv"], "conv.onnx");
    let wf = injected(&env, "linear.onnx", &["--form", "weight"], "wf.onnx");
    for (model, tensor) in [
        (&lin, "fc.lora_A.weight"),
        (&lin, "fc.lora_B.weight"),
        (&conv, "conv.lora_A.weight"),
        (&conv, "conv.lora_B.weight"),
        (&wf, "fc.lora_A.weight"),
        (&wf, "fc.lora_B.weight"),
    ] {
        let bad = edited(&env, model, "bad.onnx", |g| {
            set_tensor(g, tensor, &[], &[0.5])
        });
        every_reader_refuses(&env, &bad, &["injected branch", tensor, "shape []"]);
    }
    // Factors of the wrong size for the layer: named with the layer's weight.
    let bad = edited(&env, &lin, "bad.onnx", |g| {
        set_tensor(g, "fc.lora_A.weight", &[4, 2], &[0.5; 8])
    });
    every_reader_refuses(&env, &bad, &["module 'fc'", "do not fit weight"]);
}

/// The weight form's scale Mul commutes: with its inputs swapped the model is the same, and
/// fold-back and export-peft read it as before.
#[test]
fn a_weight_form_scale_mul_with_swapped_inputs_is_the_same_branch() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let wf = injected(
        &env,
        "linear.onnx",
        &["--form", "weight", "--rank", "2"],
        "wf.onnx",
    );
    // "Train" it: B is zero after inject.
    let trained = edited(&env, &wf, "trained.onnx", |g| {
        let v: Vec<f32> = (0..8).map(|i| i as f32 * 0.1 - 0.5).collect();
        set_tensor(g, "fc.lora_B.weight", &[2, 4], &v)
    });
    let swapped = edited(&env, &trained, "swapped.onnx", |g| {
        let n = g
            .node
            .iter_mut()
            .find(|n| role_of(n) == "weight_scale")
            .unwrap();
        n.input.swap(0, 1);
    });
    for m in [&trained, &swapped] {
        let stem = m.file_stem().unwrap().to_str().unwrap();
        onnx_lora_ok(&[
            "fold",
            &s(m),
            "-o",
            &s(&env.p(&format!("{stem}_back.onnx"))),
        ]);
        onnx_lora_ok(&[
            "export-peft",
            &s(m),
            "-o",
            &s(&env.p(&format!("{stem}_peft"))),
        ]);
    }
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    assert_eq!(
        read(env.p("trained_back.onnx")),
        read(env.p("swapped_back.onnx"))
    );
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            read(env.p("trained_peft").join(f)),
            read(env.p("swapped_peft").join(f))
        );
    }
}

fn tag(n: &mut onnx_lora::onnx::pb::NodeProto, branch: &str, role: &str) {
    use onnx_lora::onnx::pb::StringStringEntryProto as E;
    let e = |k: &str, v: &str| E {
        key: Some(k.into()),
        value: Some(v.into()),
    };
    n.metadata_props = vec![e("onnx-lora.branch", branch), e("onnx-lora.role", role)];
}

/// Adds `node` (op, inputs, output) to the graph, its output a graph output.
fn add_node(
    g: &mut onnx_lora::onnx::pb::GraphProto,
    op: &str,
    inputs: &[&str],
    output: &str,
) -> usize {
    g.node.push(onnx_lora::onnx::pb::NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("extra_{output}")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    });
    g.output.push(onnx_lora::onnx::pb::ValueInfoProto {
        name: Some(output.into()),
        ..Default::default()
    });
    g.node.len() - 1
}

/// Fold-back removes a branch's nodes and tensors: when something outside the branch reads
/// them (a node, a graph output), or a node carries branch metadata without being part of a
/// branch, every reader refuses, naming the tensor or node.
#[test]
fn branch_values_used_outside_the_branch_are_refused() {
    let env = Env::new();
    let lin = injected(&env, "linear.onnx", &[], "lin.onnx");
    let wf = injected(&env, "linear.onnx", &["--form", "weight"], "wf.onnx");
    type Edit = Box<dyn Fn(&mut onnx_lora::onnx::pb::GraphProto)>;
    let cases: Vec<(&PathBuf, Edit, Vec<&str>)> = vec![
        (
            &lin,
            Box::new(|g| {
                add_node(g, "Identity", &["fc.lora_A.weight"], "leak");
            }),
            vec!["'fc.lora_A.weight'", "extra_leak"],
        ),
        (
            &lin,
            Box::new(|g| {
                add_node(g, "Mul", &["y", "fc.lora_scale"], "z");
            }),
            vec!["'fc.lora_scale'", "extra_z"],
        ),
        (
            &lin,
            Box::new(|g| {
                add_node(g, "Identity", &["y.base"], "leak");
            }),
            vec!["'y.base'", "extra_leak"],
        ),
        (
            &lin,
            Box::new(|g| {
                let lb = g.node.iter().find(|n| role_of(n) == "lora_B").unwrap();
                let out = lb.output[0].clone();
                g.output.push(onnx_lora::onnx::pb::ValueInfoProto {
                    name: Some(out),
                    ..Default::default()
                });
            }),
            vec!["graph output"],
        ),
        (
            &lin,
            Box::new(|g| {
                let i = add_node(g, "Softmax", &["y"], "z");
                tag(&mut g.node[i], "fc", "lora_A");
            }),
            vec!["extra_z", "is a Softmax, not"],
        ),
        (
            &lin,
            Box::new(|g| {
                let i = add_node(g, "Add", &["y", "y"], "z");
                tag(&mut g.node[i], "fc", "lora_bias");
            }),
            vec!["extra_z", "not part of a branch"],
        ),
        (
            &wf,
            Box::new(|g| {
                add_node(g, "Identity", &["fc.lora_A.weight"], "leak");
            }),
            vec!["'fc.lora_A.weight'", "extra_leak"],
        ),
        (
            &wf,
            Box::new(|g| {
                let i = add_node(g, "Mul", &["y", "y"], "z");
                tag(&mut g.node[i], "fc", "weight_dora");
            }),
            vec!["extra_z", "not part of a branch"],
        ),
    ];
    for (model, edit, expect) in cases {
        let bad = edited(&env, model, "bad.onnx", edit);
        every_reader_refuses(&env, &bad, &expect);
    }
}

/// A node is read as the branch part its role names only when it is that op (and a conv
/// lora_A convolves as its layer): a branch whose Add became a Sub, or whose scale Mul a Div,
/// computes something else, and every reader refuses it.
#[test]
fn branch_nodes_must_be_the_ops_their_roles_say() {
    let env = Env::new();
    let lin = injected(&env, "linear.onnx", &[], "lin.onnx");
    let conv = injected(&env, "conv_nobias.onnx", &["-t", "conv"], "conv.onnx");
    let wf = injected(&env, "linear.onnx", &["--form", "weight"], "wf.onnx");
    for (model, role, op) in [
        (&lin, "add", "Sub"),
        (&lin, "scale", "Div"),
        (&lin, "lora_B", "Gemm"),
        (&wf, "weight_add", "Sub"),
        (&wf, "weight_scale", "Div"),
        (&wf, "weight_delta", "Add"),
    ] {
        let bad = edited(&env, model, "bad.onnx", |g| {
            let n = g.node.iter_mut().find(|n| role_of(n) == role).unwrap();
            n.op_type = Some(op.into());
        });
        every_reader_refuses(&env, &bad, &[&format!(" {op}, not ")]);
    }
    let bad = edited(&env, &conv, "bad.onnx", |g| {
        let n = g.node.iter_mut().find(|n| role_of(n) == "lora_A").unwrap();
        n.attribute.retain(|a| a.name() != "pads");
    });
    every_reader_refuses(&env, &bad, &["injected branch 'conv'", "does not convolve"]);
}

/// Branch names are module names: two branches with one name are refused by every reader,
/// and export-peft refuses names that are no module path (which it would write as keys).
#[test]
fn branch_names_must_be_distinct_module_paths() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let two = injected(&env, "shared_bias.onnx", &[], "two.onnx");
    let rename = |from: &Path, out: &str, name: &'static str| {
        edited(&env, from, out, move |g| {
            for p in g.node.iter_mut().flat_map(|n| n.metadata_props.iter_mut()) {
                if p.key() == "onnx-lora.branch" {
                    p.value = Some(name.into());
                }
            }
        })
    };
    let same = rename(&two, "same.onnx", "same.module");
    every_reader_refuses(&env, &same, &["both named 'same.module'"]);
    let lin = injected(&env, "linear.onnx", &[], "lin.onnx");
    for name in ["", "a..b", ".a", "a/b", "a b", "a\nb", "../x"] {
        let bad = rename(&lin, "bad.onnx", name);
        let dir = env.p("peft");
        let o = onnx_lora(&["export-peft", &s(&bad), "-o", &s(&dir)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name:?}: {err}");
        assert!(
            err.contains(&format!("injected branch {name:?}"))
                && err.contains("no module path PEFT can load"),
            "{name:?}: {err}"
        );
        assert!(!dir.exists());
    }
}

/// Branches in the main graph and in an If body fold back to the base everywhere: the body is
/// found again after the main graph lost its branch nodes.
#[test]
fn branches_in_subgraphs_fold_back() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = env.p("subgraph.onnx");
    let (inj, back) = (env.p("inj.onnx"), env.p("back.onnx"));
    let report = onnx_lora_ok(&[
        "inject",
        &s(&model),
        "--target",
        "a|b",
        "--rank",
        "2",
        "-o",
        &s(&inj),
        "--json",
    ]);
    assert_eq!(report.matches("\"type\":\"branch\"").count(), 2, "{report}");
    onnx_lora_ok(&["fold", &s(&inj), "-o", &s(&back)]);
    fn ops(g: &onnx_lora::onnx::pb::GraphProto, out: &mut Vec<String>) {
        for n in &g.node {
            out.push(n.op_type().to_string());
            assert!(
                n.metadata_props
                    .iter()
                    .all(|p| !p.key().starts_with("onnx-lora")),
                "{} kept its branch metadata",
                n.name()
            );
            for a in &n.attribute {
                a.g.iter().chain(&a.graphs).for_each(|g| ops(g, out));
            }
        }
    }
    let ops_of = |p: &Path| {
        let m = onnx_lora::onnx::load(p).unwrap();
        let mut out = Vec::new();
        ops(m.proto.graph.as_ref().unwrap(), &mut out);
        out
    };
    assert_eq!(ops_of(&back), ops_of(&model));
}

/// An injected DoRA branch whose factor does not have one value per output channel (a
/// broadcast [1]) is refused when read back, not cut short.
#[test]
fn injected_dora_factor_must_cover_the_outputs() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let inj = dir.path().join("inj.onnx");
    let llama = fixtures().join("llama");
    onnx_lora_ok(&[
        "inject",
        &s(&llama.join("torchscript/model.onnx")),
        "--adapter",
        &s(&llama.join("adapters/dora")),
        "-o",
        &s(&inj),
        "-q",
    ]);
    let mut m = onnx_lora::onnx::load(&inj).unwrap().proto;
    let t = m
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name() == "model.layers.0.self_attn.q_proj.dora_scale")
        .unwrap();
    t.dims = vec![1];
    t.raw_data = Some(1.5f32.to_le_bytes().to_vec().into());
    let bad = dir.path().join("bad.onnx");
    std::fs::write(&bad, m.encode_to_vec()).unwrap();
    let out = dir.path().join("out");
    for args in [
        vec!["fold", bad.to_str().unwrap(), "-o", out.to_str().unwrap()],
        vec![
            "export-peft",
            bad.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    ] {
        let o = onnx_lora(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("DoRA factor has 1 values"), "{err}");
        assert!(!out.exists());
    }
}

/// A `target_modules` regex onnx-lora cannot evaluate as Python does (look-around, as ms-swift
/// writes) selects nothing out: the file's modules fold, with a warning naming the rule.
#[test]
fn an_unevaluable_target_regex_keeps_the_files_modules() {
    let dir = tempfile::tempdir().unwrap();
    let plain = fixtures().join("llama/adapters/plain");
    let ad = dir.path().join("swift");
    std::fs::create_dir(&ad).unwrap();
    std::fs::copy(
        plain.join("adapter_model.safetensors"),
        ad.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("adapter_config.json")).unwrap())
            .unwrap();
    config["target_modules"] = r"^(model(?=\.).*\.(q_proj|v_proj))$".into();
    std::fs::write(ad.join("adapter_config.json"), config.to_string()).unwrap();
    let model = fixtures().join("llama/torchscript/model.onnx");
    let (direct, swift) = (
        dir.path().join("direct.onnx"),
        dir.path().join("swift.onnx"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    onnx_lora_ok(&["fold", &s(&model), &s(&plain), "-o", &s(&direct)]);
    let o = onnx_lora(&["fold", &s(&model), &s(&ad), "-o", &s(&swift)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("target_modules pattern") && err.contains("cannot evaluate it as Python does"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&direct).unwrap(),
        std::fs::read(&swift).unwrap()
    );
}

/// Runs onnx-lora with its address space limited to `kib` KiB (`ulimit -v`), in `dir`.
fn onnx_lora_limited(kib: u64, args: &[&str], dir: &Path) -> std::process::Output {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {kib} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_onnx-lora"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A run that needs more memory than it may have ends with one line saying so (what it was
/// running, the size) and exit 2, not Rust's abort, and removes what it was writing: here the
/// output `--verify` was checking.
#[test]
fn running_out_of_memory_is_one_line_and_leaves_no_output() {
    let env = Env::new();
    // huge_output.onnx makes 512 MiB each run: over a 1 GiB address space with its copies.
    let model = env.p("huge_output.onnx");
    let model = model.to_str().unwrap();
    let out = env.p("out.onnx");
    let o = onnx_lora_limited(
        1 << 20,
        &[
            "inject",
            model,
            "--rank",
            "2",
            "-o",
            out.to_str().unwrap(),
            "--verify",
            "--ep",
            "tract",
        ],
        env.dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("onnx-lora: error: out of memory while running ")
            && last.contains("could not be allocated")
            && last.contains(&format!("removed {}", out.display())),
        "{err}"
    );
    assert!(
        !err.contains("memory allocation of"),
        "Rust's abort message: {err}"
    );
    assert!(!out.exists(), "the unverified output is left");
    let temps: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".onnx-lora-"))
        .collect();
    assert!(temps.is_empty(), "temps left: {temps:?}");
    // verify alone, same model: the line names what it was running.
    let o = onnx_lora_limited(
        1 << 20,
        &["verify", model, model, "--ep", "tract"],
        env.dir.path(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.lines().count() <= 2
            && err.contains(&format!(
                "onnx-lora: error: out of memory while running {model}: "
            )),
        "{err}"
    );
    // Under the same limit a small model passes: what fails is the huge one's memory.
    let small = env.p("linear.onnx");
    let small = small.to_str().unwrap();
    let o = onnx_lora_limited(
        1 << 20,
        &["verify", small, small, "--ep", "tract"],
        env.dir.path(),
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// onnxruntime's quantize_dynamic (MatMulInteger on DynamicQuantizeLinear's int8 activations,
/// then a Cast and a scale Mul; an int8 embedding table dequantized after its Gather): inspect
/// lists the layers as quantized; inject puts float branches beside them, reading the float
/// input and adding to the float output. The oracle is the float model with the same branches,
/// quantized by quantize_dynamic with the branch nodes left float: the same graph, built by
/// onnxruntime's own tool. fold refuses (int8 weights take no merge), naming the way that works.
#[test]
fn quantize_dynamic_layers_take_float_branches() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let llama = fixtures().join("llama/torchscript/model.onnx");
    let inputs = s(&fixtures().join("llama/io/inputs.npz"));
    let q = p("qdyn.onnx");
    py("quantize_dynamic.py", &[&llama, &q]);
    let out = onnx_lora_ok(&["inspect", &s(&q), "--json"]);
    let cands = json_records(&out, "candidate");
    let of = |op: &str| cands.iter().filter(|c| c["op"] == op).count();
    assert_eq!(of("MatMulInteger"), 15, "{out}");
    assert!(cands.iter().all(|c| c["quantized"] == true), "{out}");
    assert!(
        cands
            .iter()
            .any(|c| c["op"] == "Gather" && c["module"] == "model.embed_tokens"),
        "{out}"
    );
    for adapter in ["plain", "embedding"] {
        let ad = s(&fixtures().join("llama/adapters").join(adapter));
        let ours = p(&format!("{adapter}.onnx"));
        let o = onnx_lora_ok(&[
            "inject",
            &s(&q),
            "--adapter",
            &ad,
            "-o",
            &s(&ours),
            "--json",
        ]);
        let branches = json_records(&o, "branch");
        let op = if adapter == "plain" {
            "MatMulInteger"
        } else {
            "Gather"
        };
        assert!(
            !branches.is_empty()
                && branches
                    .iter()
                    .all(|b| b["op"] == op && b["dtype"] == "float32"),
            "{o}"
        );
        // The twin: the same adapter as branches on the float model, then quantized with the
        // branch nodes (their names hold "lora") left float.
        let float = p(&format!("{adapter}_float.onnx"));
        onnx_lora_ok(&["inject", &s(&llama), "--adapter", &ad, "-o", &s(&float)]);
        let twin = p(&format!("{adapter}_twin.onnx"));
        py("quantize_dynamic.py", &[&float, &twin, Path::new("lora")]);
        assert_verify(&ours, &twin, Path::new(&inputs), &["--ep", "cpu"], 0);
        // ... and the adapter changes the quantized model's output.
        assert_verify(&ours, &q, Path::new(&inputs), &["--ep", "cpu"], 1);
        // export-peft gives the adapter back: folded into the float model, it gives what
        // the original gives, bit for bit.
        let back = p(&format!("{adapter}_peft"));
        onnx_lora_ok(&["export-peft", &s(&ours), "-o", &s(&back)]);
        let (f1, f2) = (
            p(&format!("{adapter}_f1.onnx")),
            p(&format!("{adapter}_f2.onnx")),
        );
        onnx_lora_ok(&["fold", &s(&llama), &s(&back), "-o", &s(&f1)]);
        onnx_lora_ok(&["fold", &s(&llama), &ad, "-o", &s(&f2)]);
        assert_verify(
            &f1,
            &f2,
            Path::new(&inputs),
            &["--atol", "0", "--rtol", "0"],
            0,
        );
        // fold cannot merge into the int8 weights, of the model or of its branches.
        for args in [vec![s(&q), ad.clone()], vec![s(&ours)]] {
            let f = p("f.onnx");
            let mut args: Vec<&str> = std::iter::once("fold")
                .chain(args.iter().map(String::as_str))
                .collect();
            args.extend(["-o", f.to_str().unwrap()]);
            let err = onnx_lora_fails(&args, &f);
            assert!(
                err.contains("quantized weight (") && err.contains("cannot be folded into"),
                "{err}"
            );
        }
    }
    // onnxruntime's fusions of those layers, as a saved optimized model holds them
    // (DynamicQuantizeMatMul, MatMulIntegerToFloat): the same branches, the same outputs.
    let opt = p("qdyn_opt.onnx");
    py("ort_optimize.py", &[&q, &opt]);
    let out = onnx_lora_ok(&["inspect", &s(&opt), "--json"]);
    let cands = json_records(&out, "candidate");
    for op in ["DynamicQuantizeMatMul", "MatMulIntegerToFloat"] {
        assert!(cands.iter().any(|c| c["op"] == op), "{op}: {out}");
    }
    let all = s(&fixtures().join("llama/adapters/all_linear"));
    let (on_opt, on_q) = (p("on_opt.onnx"), p("on_q.onnx"));
    let o = onnx_lora_ok(&[
        "inject",
        &s(&opt),
        "--adapter",
        &all,
        "-o",
        &s(&on_opt),
        "--json",
    ]);
    assert!(
        json_records(&o, "branch")
            .iter()
            .any(|b| b["op"] == "DynamicQuantizeMatMul"),
        "{o}"
    );
    onnx_lora_ok(&["inject", &s(&q), "--adapter", &all, "-o", &s(&on_q)]);
    assert_verify(&on_opt, &on_q, Path::new(&inputs), &["--ep", "cpu"], 0);
    assert_verify(&on_opt, &opt, Path::new(&inputs), &["--ep", "cpu"], 1);
    onnx_lora_ok(&["export-peft", &s(&on_opt), "-o", &s(&p("opt_peft"))]);
    // A serving model: checked idle against the base and active against the branches.
    let served = p("served.onnx");
    let ad = s(&fixtures().join("llama/adapters/plain"));
    let o = onnx_lora(&[
        "inject",
        &s(&q),
        "--adapter",
        &ad,
        "--as-inputs",
        "--adapter-out",
        &s(&p("served.onnx_adapter")),
        "-o",
        &s(&served),
        "--verify",
        "--ep",
        "cpu",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out.matches("PASS").count(), 2, "{out}");
    // Values that replace a layer's (trainable tokens) cannot go into int8 weights either.
    let tok = s(&fixtures().join("llama/adapters/trainable_tokens"));
    let f = p("tok.onnx");
    let err = onnx_lora_fails(&["inject", &s(&q), "--adapter", &tok, "-o", &s(&f)], &f);
    assert!(
        err.contains("nor take values that replace it") && err.contains("float model"),
        "{err}"
    );
    // DoRA needs the weight's norm, which an int8 weight does not give.
    let dora = s(&fixtures().join("llama/adapters/dora"));
    let f = p("dora.onnx");
    let err = onnx_lora_fails(&["inject", &s(&q), "--adapter", &dora, "-o", &s(&f)], &f);
    assert!(err.contains("nor give DoRA its norm"), "{err}");
    // A fresh inject takes every linear layer, the quantized ones too.
    let f = p("fresh.onnx");
    let o = onnx_lora_ok(&[
        "inject",
        &s(&q),
        "--rank",
        "4",
        "-o",
        &s(&f),
        "--json",
        "--verify",
        "--ep",
        "cpu",
    ]);
    assert_eq!(json_records(&o, "branch").len(), 14, "{o}");
}

/// torch's exporters fold a BatchNorm after a Conv into its weight (W·γ/σ); an adapter trained
/// on the conv would need that γ/σ. fold and inject refuse it, naming the way out; inspect
/// flags the layer. A computed weight beside the conv's own bias (weight normalization) is no
/// fusion: it folds.
#[test]
fn batchnorm_folded_into_a_conv_is_refused() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let t = vec![
        (
            "conv.lora_A.weight".to_string(),
            vec![2, 3, 3, 3],
            vec![0.1; 54],
        ),
        (
            "conv.lora_B.weight".to_string(),
            vec![4, 2, 1, 1],
            vec![0.1; 8],
        ),
    ];
    let ad = s(&write_adapter(&env.p("ad"), config(), &refs(&t)));
    for model in ["conv_bn_ts.onnx", "conv_bn_dynamo.onnx"] {
        let m = s(&env.p(model));
        let out = onnx_lora_ok(&["inspect", &m, "--json"]);
        let cands = json_records(&out, "candidate");
        assert!(cands.len() == 1 && cands[0]["norm_folded"] == true, "{out}");
        // (dynamo scopes the fused node to the BatchNorm: the weight's name places the conv)
        assert_eq!(cands[0]["module"], "conv", "{out}");
        let o = env.p("o.onnx");
        for args in [
            vec!["fold", &m, &ad, "-o", o.to_str().unwrap()],
            vec!["inject", &m, "--adapter", &ad, "-o", o.to_str().unwrap()],
        ] {
            let err = onnx_lora_fails(&args, &o);
            assert!(
                err.contains("module 'conv': the exporter folded the BatchNorm")
                    && err.contains("TrainingMode.PRESERVE"),
                "{model}: {err}"
            );
        }
    }
    // Fresh branches train after the folded scaling: they fold back into this model, but
    // export-peft refuses to give them to PEFT, whose conv acts before the BatchNorm.
    // A warning says so when they are injected.
    let (t, back) = (env.p("train.onnx"), env.p("back"));
    for model in ["conv_bn_dynamo.onnx", "conv_bn_ts.onnx"] {
        let m = s(&env.p(model));
        let o = onnx_lora(&[
            "inject",
            &m,
            "--target",
            "conv",
            "--rank",
            "2",
            "-o",
            &s(&t),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success()
                && err.contains("warning: 1 targeted layer(s) hold the BatchNorm after them, which the exporter folded into their weights (conv)")
                && err.contains("`export-peft` refuses them"),
            "{model}: {err}"
        );
    }
    let err = onnx_lora_fails(&["export-peft", &s(&t), "-o", &s(&back)], &back);
    assert!(err.contains("folded the BatchNorm"), "{err}");
    onnx_lora_ok(&["fold", &s(&t), "-o", &s(&env.p("t_folded.onnx"))]);
    let m = s(&env.p("conv_wn_ts.onnx"));
    let out = onnx_lora_ok(&["inspect", &m, "--json"]);
    assert!(
        json_records(&out, "candidate")[0]
            .get("norm_folded")
            .is_none(),
        "{out}"
    );
    onnx_lora_ok(&["fold", &m, &ad, "-o", &s(&env.p("wn.onnx"))]);
}

/// A conv that pads its input itself by reflection (torch's `padding_mode="reflect"`): PEFT's
/// LoRA conv pads with zeros, so its forward and its merge differ; fold and inject compute the
/// merge and say so (inspect flags the layer). A Pad in the parent's scope (F.pad before the
/// conv) is the input PEFT's LoRA reads too: nothing to say.
#[test]
fn convs_padding_inside_their_module_are_noted() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let t = vec![
        ("conv.lora_A.weight", vec![2, 3, 3, 3], vec![0.1; 54]),
        ("conv.lora_B.weight", vec![4, 2, 1, 1], vec![0.1; 8]),
    ];
    let ad = write_adapter(&env.p("ad"), config(), &t);
    let says = "module 'conv': the layer pads its input itself (Pad '/conv/Pad' (reflect)), and PEFT's LoRA conv pads the same input with zeros";
    let m = env.p("conv_reflect.onnx");
    let out = onnx_lora_ok(&["inspect", &s(&m)]);
    assert!(out.contains("padded-inside"), "{out}");
    let out = fold_ok(&m, &[&ad], &env.p("f.onnx"), &["--json"]);
    let report = json_records(&out, "report");
    assert!(
        report[0]["notes"][0].as_str().unwrap().starts_with(says),
        "{out}"
    );
    let o = onnx_lora(&inject_args(&m, &ad, &env.p("i.onnx"), &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains(says), "{err}");
    let m = env.p("conv_reflect_outside.onnx");
    let out = onnx_lora_ok(&["inspect", &s(&m)]);
    assert!(!out.contains("padded-inside"), "{out}");
    let out = fold_ok(&m, &[&ad], &env.p("g.onnx"), &["--json"]);
    assert!(!out.contains("pads its input itself"), "{out}");
    let o = onnx_lora(&inject_args(&m, &ad, &env.p("j.onnx"), &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !err.contains("pads its input itself"),
        "{err}"
    );
}

/// A MatMulInteger whose float values are not where quantize_dynamic puts them (here its
/// output is a graph output: no Cast + scale Mul) takes no branch: the refusal says why.
#[test]
fn matmul_integer_without_float_values_is_refused() {
    let env = Env::new();
    let m = env.p("mmi.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = env.p("o.onnx");
    let err = onnx_lora_fails(&["inject", &s(&m), "--rank", "2", "-o", &s(&out)], &out);
    assert!(
        err.contains("MatMulInteger") && err.contains("finds no float values"),
        "{err}"
    );
}

/// A weight-only quantized layer (DequantizeLinear of a constant → MatMul with float
/// activations) cannot be loaded by onnxruntime inside an If: `--idle-gate` refuses it in one
/// line; the flat serving model is written.
#[test]
fn idle_gate_refuses_weight_only_quantized_layers() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let gated = env.p("dq_gated.onnx");
    let model = s(&env.p("dq.onnx"));
    let err = onnx_lora_fails(
        &[
            "inject",
            &model,
            "--rank",
            "2",
            "--as-inputs",
            "--idle-gate",
            "-o",
            &s(&gated),
        ],
        &gated,
    );
    assert!(
        err.contains("'/fc/MatMul'")
            && err.contains("weight-only")
            && err.contains("without --idle-gate"),
        "{err}"
    );
    let flat = env.p("dq_flat.onnx");
    onnx_lora_ok(&[
        "inject",
        &model,
        "--rank",
        "2",
        "--as-inputs",
        "-o",
        &s(&flat),
    ]);
    assert!(flat.exists());
}

/// Layers inside model-local functions (TorchScript's export_modules_as_functions) are no
/// targets: inspect says so, and fold's error names the function and how to inline it,
/// instead of only "matches no weight".
#[test]
fn layers_inside_local_functions_are_named_in_the_error() {
    let env = Env::new();
    let model = env.p("funcs.onnx");
    let o = onnx_lora(&["inspect", model.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("model-local functions") && err.contains("'Block': 1"),
        "{err}"
    );
    let ad = write_adapter(&env.p("adf"), config(), &refs(&lora("blocks.0", 8, 8, 0.1)));
    let err = env.fold_fails("funcs.onnx", &ad);
    assert!(
        err.contains("'Block': 1") && err.contains("inline_local_functions"),
        "{err}"
    );
}

/// One file of an encoder-decoder export names its layers without `model.encoder.`: the
/// adapter's decoder modules (`model.decoder.layers.0.fc1`) must not be taken for the encoder's
/// layers of the same name. The root that leaves no module of its own missing wins; when two fit
/// alike, `--root` says which.
#[test]
fn one_part_of_an_encoder_decoder_export_takes_only_its_own_modules() {
    let env = Env::new();
    let model = env.p("encoder.onnx");
    let m = model.to_str().unwrap();
    // (each module its own values, so that a decoder module folded in place of the encoder's
    // changes the result)
    let lora_of = |paths: &[&str]| -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let fill = |p: &str| {
            0.1 + if p.contains("decoder") { 0.2 } else { 0.0 }
                + if p.ends_with("q_proj") { 0.05 } else { 0.0 }
        };
        paths.iter().flat_map(|p| lora(p, 8, 8, fill(p))).collect()
    };
    let enc = [
        "model.encoder.layers.0.fc1",
        "model.encoder.layers.0.self_attn.q_proj",
    ];
    let dec = [
        "model.decoder.layers.0.fc1",
        "model.decoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.0.encoder_attn.q_proj",
    ];
    let adapter =
        |name: &str, paths: &[&str]| write_adapter(&env.p(name), config(), &refs(&lora_of(paths)));
    let only_enc = adapter("enc", &enc);
    let both = adapter("both", &[&enc[..], &dec[..]].concat());
    let want = env.p("want.onnx");
    onnx_lora_ok(&[
        "fold",
        m,
        only_enc.to_str().unwrap(),
        "-o",
        want.to_str().unwrap(),
    ]);
    // The decoder's modules are not in this file: named, as unmatched.
    let err = fold_fails(&model, &both, &env.p("no.onnx"), &[]);
    assert!(
        err.contains("3 adapter module(s) match no weight")
            && err.contains("model.decoder.layers.0.fc1")
            && err.contains("under 'model.encoder'"),
        "{err}"
    );
    let same = |out: &Path| {
        let diff: serde_json::Value =
            serde_json::from_str(&py("ort_diff.py", &[&want, out])).unwrap();
        assert_eq!(diff["y"].as_f64().unwrap(), 0.0, "{diff}");
    };
    let got = env.p("got.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    onnx_lora_ok(&["fold", m, &s(&both), "-o", &s(&got), "--allow-unmatched"]);
    same(&got);
    // inject --verify folds its reference with --allow-unmatched too.
    let inj = env.p("inj.onnx");
    onnx_lora_ok(&[
        "inject",
        m,
        "--adapter",
        &s(&both),
        "-o",
        &s(&inj),
        "--allow-unmatched",
        "--verify",
    ]);
    // fc1 alone fits under either root: said, and --root decides.
    let tie = adapter("tie", &[enc[0], dec[0]]);
    let err = fold_fails(&model, &tie, &env.p("no.onnx"), &["--allow-unmatched"]);
    assert!(
        err.contains("--root") && err.contains("'model.decoder'"),
        "{err}"
    );
    let fc1 = adapter("fc1", &[enc[0]]);
    onnx_lora_ok(&["fold", m, &s(&fc1), "-o", &s(&want)]);
    let args = [
        "fold",
        m,
        &s(&tie),
        "-o",
        &s(&got),
        "--allow-unmatched",
        "--root",
        "model.encoder",
    ];
    onnx_lora_ok(&args);
    same(&got);
    // An adapter on the decoder alone fits the encoder's file under 'model.decoder' as well as
    // the decoder's: the encoder's file takes no encoder states, so it is not taken for the
    // decoder (PEFT leaves the encoder as it is); the decoder's file is. --root overrides.
    let only_dec = adapter("dec", &dec[..2]);
    let err = fold_fails(&model, &only_dec, &env.p("no.onnx"), &[]);
    assert!(
        err.contains("fit this file under 'model.decoder'")
            && err.contains("no input of this file is named for them nor feeds layers of its own (it may be the encoder)")
            && err.contains("say so with --root model.decoder"),
        "{err}"
    );
    let o = onnx_lora(&inject_args(&model, &only_dec, &env.p("no.onnx"), &[]));
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!env.p("no.onnx").exists());
    let decoder = env.p("decoder.onnx");
    let report = fold_ok(&decoder, &[&only_dec], &got, &["--json"]);
    assert!(
        report.contains("this export's module paths are the adapter's under 'model.decoder'")
            && json_records(&report, "module").len() == 2,
        "{report}"
    );
    fold_ok(&model, &[&only_dec], &got, &["--root", "model.decoder"]);
    // and the other way round: an adapter on the encoder alone is not taken for the decoder's
    let err = fold_fails(&decoder, &only_enc, &env.p("no.onnx"), &[]);
    assert!(
        err.contains("fit this file under 'model.encoder'")
            && err.contains("its input 'encoder_hidden_states' is named for an encoder's states"),
        "{err}"
    );
    // A decoder whose encoder states have another name shows them by a layer that reads them
    // alone (the cross-attention's key projection).
    let memory = env.p("decoder_memory.onnx");
    let report = fold_ok(&memory, &[&only_dec], &got, &["--json"]);
    assert_eq!(json_records(&report, "module").len(), 2, "{report}");
    let err = fold_fails(&memory, &only_enc, &env.p("no.onnx"), &[]);
    assert!(
        err.contains(
            "layers /layers.0/fc1/MatMul and /layers.0/encoder_attn/k_proj/MatMul read separate inputs"
        ),
        "{err}"
    );
    // export-adapter checks the same for a serving model of the encoder alone.
    let serving = env.p("serving.onnx");
    let sv = serving.to_str().unwrap();
    onnx_lora_ok(&["inject", m, "--as-inputs", "--rank", "2", "-o", sv]);
    let exported = env.p("enc.onnx_adapter");
    let export = |ad: &Path, extra: &[&str]| {
        let mut args = vec![
            "export-adapter",
            ad.to_str().unwrap(),
            "--model",
            serving.to_str().unwrap(),
            "-o",
            exported.to_str().unwrap(),
        ];
        args.extend(extra);
        onnx_lora(&args)
    };
    let o = export(&only_enc, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&exported).unwrap();
    let o = export(&only_dec, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2)
            && err.contains("fit this file under 'model.decoder'")
            && !exported.exists(),
        "{err}"
    );
    // --root says which part it is; the other part's modules are left out with --allow-unmatched
    let o = export(&only_dec, &["--root", "model.decoder"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&exported).unwrap();
    let o = export(&both, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2)
            && err.contains("module 'model.decoder.layers.0.")
            && err.contains("has no LoRA input")
            && err.contains("under 'model.encoder'"),
        "{err}"
    );
    let o = export(&both, &["--allow-unmatched", "--json"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let params = &json_records(&stdout, "report")[0]["parameters"];
    assert_eq!(params.as_array().map(Vec::len), Some(4), "{stdout}");
    // An If between an encoder's layers (a body reading the layer before) is one stream.
    let with_if = env.p("encoder_if.onnx");
    fold_ok(&with_if, &[&only_enc], &got, &[]);
    let err = fold_fails(&with_if, &only_dec, &env.p("no.onnx"), &[]);
    assert!(err.contains("(it may be the encoder)"), "{err}");
    // An adapter for a decoder-only model (PEFT's CAUSAL_LM, OPT's `model.decoder`) names a
    // model with no encoder: its decoder needs no encoder states.
    let mut causal = config();
    causal["task_type"] = "CAUSAL_LM".into();
    let causal = write_adapter(&env.p("causal"), causal, &refs(&lora_of(&dec[..2])));
    let report = fold_ok(&model, &[&causal], &got, &["--json"]);
    assert_eq!(json_records(&report, "module").len(), 2, "{report}");
    // Every component of the root counts: a bert2bert's decoder is 'decoder.bert'.
    let b2b = adapter("b2b", &["decoder.bert.layers.0.fc1"]);
    let err = fold_fails(&model, &b2b, &env.p("no.onnx"), &[]);
    assert!(
        err.contains("under 'decoder.bert'") && err.contains("(it may be the encoder)"),
        "{err}"
    );
}

/// bias="all" on a SEQ_CLS model also saves the classifier's bias as
/// `classifier.modules_to_save.bias` (the trained copy, as `classifier.bias`) and
/// `classifier.original_module.bias` (the base's own): PEFT loads the folder, and so does fold.
#[test]
fn a_modules_to_save_layers_wrapper_keys_are_read_as_peft_does() {
    let env = Env::new();
    let weight = (0..32).map(|i| i as f32 * 0.01).collect::<Vec<_>>();
    let plain = write_adapter(
        &env.p("plain"),
        config(),
        &[
            ("a.weight", vec![4, 8], weight.clone()),
            ("a.bias", vec![4], vec![0.5; 4]),
        ],
    );
    let wrapped = write_adapter(
        &env.p("wrapped"),
        config(),
        &[
            ("a.weight", vec![4, 8], weight),
            ("a.bias", vec![4], vec![0.5; 4]),
            ("a.modules_to_save.bias", vec![4], vec![0.5; 4]),
            ("a.original_module.bias", vec![4], vec![-3.0; 4]),
        ],
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = s(&env.p("shared_bias.onnx"));
    let (a, b) = (env.p("plain.onnx"), env.p("wrapped.onnx"));
    onnx_lora_ok(&["fold", &model, &s(&plain), "-o", &s(&a)]);
    onnx_lora_ok(&["fold", &model, &s(&wrapped), "-o", &s(&b)]);
    let diff: serde_json::Value = serde_json::from_str(&py("ort_diff.py", &[&a, &b])).unwrap();
    assert_eq!(diff["ya"].as_f64().unwrap(), 0.0, "{diff}");
    // A trained copy that disagrees with the module's own tensor is two tensors for one place.
    let bad = write_adapter(
        &env.p("bad"),
        config(),
        &[
            ("a.bias", vec![4], vec![0.5; 4]),
            ("a.modules_to_save.bias", vec![4], vec![0.7; 4]),
        ],
    );
    let err = fold_fails(&env.p("shared_bias.onnx"), &bad, &env.p("no.onnx"), &[]);
    assert!(err.contains("the same tensor twice"), "{err}");
}

/// A merged decoder holds each layer once per If body (with and without past), one of which
/// runs per call: inject's refusal says so, and what to do instead.
#[test]
fn inject_on_a_merged_decoder_says_why_not() {
    let env = Env::new();
    let out = env.p("out.onnx");
    let m = env.p("merged.onnx");
    let err = onnx_lora_fails(
        &[
            "inject",
            m.to_str().unwrap(),
            "--rank",
            "2",
            "-o",
            out.to_str().unwrap(),
        ],
        &out,
    );
    assert!(
        err.contains("module 'fc' is in 2 subgraphs")
            && err.contains("decoder_with_past_model.onnx"),
        "{err}"
    );
}

/// verify runs a model with a generated one-element bool input (a merged decoder's
/// `use_cache_branch`) with both values, so a difference in either If body is found, whichever
/// value the seed gives.
#[test]
fn verify_compares_both_sides_of_a_switch_input() {
    let env = Env::new();
    let (a, b) = (env.p("merged.onnx"), env.p("merged_other.onnx"));
    for seed in ["0", "1", "2", "3"] {
        let o = onnx_lora(&[
            "verify",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--seed",
            seed,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "seed {seed}: {err}");
        assert!(err.contains("flipped (use_cache_branch="), "{err}");
    }
    let o = onnx_lora(&["verify", a.to_str().unwrap(), a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// onnxruntime's O2 optimization of a merged decoder packed q/k/v into one Attention weight in
/// one If body only: a q_proj module folds into both bodies (the separate MatMul and its slice
/// of the packed weight), so each value of the switch runs the adapted layer, and `--verify`
/// checks both; inject, which cannot branch a slice, refuses it by name.
#[test]
fn a_layer_packed_in_one_if_body_only_folds_into_both() {
    let env = Env::new();
    let model = env.p("merged_packed.onnx");
    let ad = write_adapter(
        &env.p("q"),
        config(),
        &refs(&lora("layers.0.self_attn.q_proj", 8, 8, 0.2)),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = env.p("out.onnx");
    let json = onnx_lora_ok(&["fold", &s(&model), &s(&ad), "-o", &s(&out), "--json"]);
    assert!(
        json.contains("\"op\":\"Attention\"") && json.contains("\"projection\":\"q\""),
        "{json}"
    );
    assert!(
        json.contains("\"node\":\"/layers.0/self_attn/q_proj/MatMul\""),
        "{json}"
    );
    // (ort_diff takes the larger difference over both values of the switch)
    let diff: serde_json::Value =
        serde_json::from_str(&py("ort_diff.py", &[&model, &out])).unwrap();
    assert!(diff["y"].as_f64().unwrap() > 1e-3, "{diff}");
    // Both bodies changed: verify runs each value of the switch, and both differ from the base.
    let o = onnx_lora(&["verify", &s(&out), &s(&model), "--json"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let failed: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["type"] == "output" && r["passed"] == false)
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    // --verify's reference: a branch on the MatMul in one body, the packed weight plus the
    // runtime's B·A in the other; each value of the switch is compared.
    let checked = env.p("checked.onnx");
    let json = fold_ok(&model, &[&ad], &checked, &["--verify", "--json"]);
    let switched = json_records(&json, "output")
        .iter()
        .filter(|r| r["passed"] == true)
        .count();
    assert_eq!(switched, 2, "{json}");
    let inj = env.p("inj.onnx");
    let err = onnx_lora_fails(
        &["inject", &s(&model), "--adapter", &s(&ad), "-o", &s(&inj)],
        &inj,
    );
    assert!(
        err.contains("packed q/k/v weight 'Wqkv'") && err.contains("another If body"),
        "{err}"
    );
}

/// Malformed or unusual inputs from a fuzzing campaign: each ends in one line (or succeeds),
/// never a hang or a panic.
#[test]
fn fuzzed_inputs_end_in_one_line() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = env.p("out.onnx");
    // A weight behind an Identity that feeds itself: no candidate, found at once.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
        .args(["inspect", &s(&env.p("cycle.onnx"))])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("inspect of a pass-through cycle did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A 70000-character name prints in the table (a format width that large would panic).
    let table = onnx_lora_ok(&["inspect", &s(&env.p("long_name.onnx"))]);
    assert!(table.contains(&"w".repeat(70000)), "{}", &table[..200]);
    // Branches need opset 7's Add; the gate needs IR 4.
    let err = onnx_lora_fails(&["inject", &s(&env.p("opset6.onnx")), "-o", &s(&out)], &out);
    assert!(err.contains("opset 6: inject needs opset 7"), "{err}");
    let gate = [
        "inject",
        &s(&env.p("ir3.onnx")),
        "--as-inputs",
        "--idle-gate",
        "-o",
        &s(&out),
    ];
    let err = onnx_lora_fails(&gate, &out);
    assert!(
        err.contains("IR version 3: --idle-gate needs IR version 4"),
        "{err}"
    );
    // Integer weights take no weight-form branch either.
    let args = [
        "inject",
        &s(&env.p("int_weight.onnx")),
        "--form",
        "weight",
        "-o",
        &s(&out),
    ];
    let err = onnx_lora_fails(&args, &out);
    assert!(err.contains("int32 weights cannot be adapted"), "{err}");
    let err = onnx_lora_fails(
        &["inject", &s(&env.p("int_weight.onnx")), "-o", &s(&out)],
        &out,
    );
    assert!(
        err.contains("module 'fc' (MatMul /fc/MatMul): int32 layers take no branch"),
        "{err}"
    );
    // (a model with nothing to export is named once)
    let peft = env.p("peft");
    let err = onnx_lora_fails(
        &["export-peft", &s(&env.p("linear.onnx")), "-o", &s(&peft)],
        &peft,
    );
    assert_eq!(err.matches("linear.onnx").count(), 1, "{err}");
    // A conv-shaped lora_A on a MatMul names the layer and the shapes.
    let conv = write_adapter(
        &env.p("conv"),
        config(),
        &[
            ("fc.lora_A.weight", vec![2, 8, 1], vec![0.1; 16]),
            ("fc.lora_B.weight", vec![4, 2], vec![0.1; 8]),
        ],
    );
    let err = fold_fails(&env.p("linear.onnx"), &conv, &out, &[]);
    assert!(
        err.contains("module 'fc' is MatMul /fc/MatMul") && err.contains("A [2, 8, 1], B [4, 2]"),
        "{err}"
    );
    // A NaN weight or scale is refused by the parser, before anything is read.
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    for opt in ["--weight", "--scale"] {
        let args = [
            "fold",
            &s(&env.p("linear.onnx")),
            &s(&ad),
            "-o",
            &s(&out),
            opt,
            "nan",
        ];
        let err = onnx_lora_fails(&args, &out);
        assert!(err.contains("'nan' is not a finite number"), "{err}");
        // finite, but no float32: said as such
        let mut big = args;
        big[6] = "1e39";
        let err = onnx_lora_fails(&big, &out);
        assert!(err.contains("'1e39' is beyond float32's range"), "{err}");
    }
}

/// What the CLI reports is what happened: a `--root` no adapter path starts with is refused
/// (and `--root` on a kohya file), `inspect --json` still tells on stderr how many branches a
/// model has, folding those back says where the deltas came from, and a report names the
/// external data beside the output as the output was given.
#[test]
fn reports_say_what_happened() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = s(&env.p("linear.onnx"));
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let out = env.p("out.onnx");
    let err = onnx_lora_fails(
        &[
            "fold",
            &model,
            &s(&ad),
            "-o",
            &s(&out),
            "--root",
            "nonsense",
        ],
        &out,
    );
    assert!(
        err.contains("--root 'nonsense': none of the adapters' module paths begins with it"),
        "{err}"
    );
    let unet = fixtures().join("unet/torchscript/model.onnx");
    let kohya = fixtures().join("unet/adapters/locon.safetensors");
    let err = onnx_lora_fails(
        &fold_args(&unet, &[&kohya], &out, &["--root", "unet"]),
        &out,
    );
    assert!(err.contains("applies to PEFT adapters"), "{err}");

    let inj = env.p("inj.onnx");
    onnx_lora_ok(&["inject", &model, "--rank", "2", "-o", &s(&inj)]);
    let o = onnx_lora(&["inspect", &s(&inj), "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 LoRA branches injected by onnx-lora"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"branches\":1"));
    let o = onnx_lora(&["fold", &s(&inj), "-o", &s(&env.p("back.onnx"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("folded 1 weight from its injected branches into"),
        "{err}"
    );

    // (run in the models' folder, with a bare output name)
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
        .current_dir(env.p(""))
        .args([
            "convert",
            "linear.onnx",
            "-o",
            "ext.onnx",
            "--external-data",
        ])
        .args(["--threshold", "0", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("\"external_data\":\"ext.onnx.data\""),
        "{stdout}"
    );
}

/// A 4-bit packed q/k/v projection (a model builder's int4 `qkv_proj` MatMulNBits) cannot be
/// folded into, but takes one float branch for its q and v modules: the model then computes
/// what folding the adapter into its float twin's packed weight does.
#[test]
fn a_quantized_packed_projection_takes_one_float_branch() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut t = lora("layers.0.self_attn.q_proj", 8, 4, 0.1);
    t.extend(lora("layers.0.self_attn.v_proj", 8, 4, -0.2));
    let ad = write_adapter(&env.p("qv"), config(), &refs(&t));
    let inspect = onnx_lora_ok(&["inspect", &s(&env.p("qkv_nbits.onnx"))]);
    assert!(inspect.contains("quantized,packed-qkv"), "{inspect}");
    let branched = env.p("branched.onnx");
    let json = onnx_lora_ok(&[
        "inject",
        &s(&env.p("qkv_nbits.onnx")),
        "--adapter",
        &s(&ad),
        "-o",
        &s(&branched),
        "--json",
    ]);
    assert!(
        json.contains("\"op\":\"MatMulNBits\"") && json.contains("\"rank\":4"),
        "{json}"
    );
    let folded = env.p("folded.onnx");
    let json = fold_ok(&env.p("qkv_nbits_float.onnx"), &[&ad], &folded, &["--json"]);
    assert!(json.contains("\"projection\":\"v\""), "{json}");
    let d: serde_json::Value =
        serde_json::from_str(&py("ort_diff.py", &[&branched, &folded])).unwrap();
    assert!(d["y"].as_f64().unwrap() < 1e-4, "{d}");
    // (the adapter changes the output; the twin is the quantized base)
    let d: serde_json::Value =
        serde_json::from_str(&py("ort_diff.py", &[&env.p("qkv_nbits.onnx"), &branched])).unwrap();
    assert!(d["y"].as_f64().unwrap() > 1e-2, "{d}");
    let d: serde_json::Value = serde_json::from_str(&py(
        "ort_diff.py",
        &[&env.p("qkv_nbits.onnx"), &env.p("qkv_nbits_float.onnx")],
    ))
    .unwrap();
    assert!(d["y"].as_f64().unwrap() < 1e-2, "{d}");
}

/// What `--verify` needs is checked before a rewrite writes anything, and the check covers
/// what was written: `--inputs` that is a FIFO and a `--dim` no input has are refused; a
/// serving model's `--adapter-out` file on a quantized base is checked active against the
/// adapter as branches (no fold can be its reference); `--root` is taken by the adapters whose
/// paths begin with it, not forced on the others; and two adapters with lora_bias on one
/// packed weight sum in the reference.
#[test]
fn verify_options_and_references_cover_what_is_written() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let out = env.p("out.onnx");
    let fifo = env.p("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let linear = s(&env.p("linear.onnx"));
    // (an inputs file without the model's input x, and one whose x has the wrong shape: the
    // check would fail on them, so nothing is written)
    use onnx_lora::onnx::DataType;
    use onnx_lora::verify::ArrayData;
    let x = |shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        ArrayData::from_f64(DataType::Float, shape, &vec![0.5; n]).unwrap()
    };
    let lacking = env.p("lacking.npz");
    onnx_lora::verify::npz::write_npz(&lacking, &[("z".to_string(), x(vec![2, 8]))]).unwrap();
    let misshapen = env.p("misshapen.npz");
    onnx_lora::verify::npz::write_npz(&misshapen, &[("x".to_string(), x(vec![2, 7]))]).unwrap();
    for (extra, what) in [
        (vec!["--inputs", fifo.to_str().unwrap()], "is a FIFO"),
        (vec!["--dim", "nope=3"], "--dim nope"),
        (
            vec!["--inputs", lacking.to_str().unwrap()],
            "lacking.npz: no array 'x' for the model input of that name",
        ),
        (
            vec!["--inputs", misshapen.to_str().unwrap()],
            "misshapen.npz: ",
        ),
    ] {
        let mut args = vec![
            "fold",
            &linear,
            ad.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.push("--verify");
        args.extend(extra);
        let o = onnx_lora_within_30s(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(what), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(o.stdout.is_empty(), "{err}");
        assert!(!out.exists());
    }

    let serving = env.p("serving.onnx");
    let file = env.p("fc.onnx_adapter");
    let json = onnx_lora_ok(&[
        "inject",
        &s(&env.p("nbits.onnx")),
        "--as-inputs",
        "--adapter",
        &s(&ad),
        "--adapter-out",
        &s(&file),
        "-o",
        &s(&serving),
        "--verify",
        "--ep",
        "cpu",
        "--json",
    ]);
    let verdicts = json_records(&json, "verdict");
    assert_eq!(verdicts.len(), 2, "{json}");
    assert!(verdicts.iter().all(|v| v["passed"] == true), "{json}");
    assert!(
        verdicts[1]["models"][1]["model"]
            .as_str()
            .unwrap()
            .contains("adapter as branches"),
        "{json}"
    );

    // One adapter under the encoder's root, one with the export's own paths.
    let model = s(&env.p("encoder.onnx"));
    let rooted = write_adapter(
        &env.p("rooted"),
        config(),
        &refs(&lora("model.encoder.layers.0.fc1", 8, 8, 0.1)),
    );
    let own = write_adapter(
        &env.p("own"),
        config(),
        &refs(&lora("layers.0.self_attn.q_proj", 8, 8, 0.1)),
    );
    let json = onnx_lora_ok(&[
        "fold",
        &model,
        &s(&rooted),
        &s(&own),
        "-o",
        &s(&out),
        "--root",
        "model.encoder",
        "--json",
    ]);
    assert!(json.contains("\"modules\":2"), "{json}");

    // lora_bias from two adapters on one packed q/k/v weight.
    let with_bias = |name: &str, fill: f32| {
        let mut t = lora("layers.0.self_attn.q_proj", 8, 4, fill);
        t.push((
            "layers.0.self_attn.q_proj.lora_B.bias".into(),
            vec![4],
            vec![fill; 4],
        ));
        write_adapter(
            &env.p(name),
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_bias": true}),
            &refs(&t),
        )
    };
    let (b1, b2) = (with_bias("b1", 0.1), with_bias("b2", -0.3));
    let json = fold_ok(
        &env.p("qkv_nbits_float.onnx"),
        &[&b1, &b2],
        &out,
        &["--verify", "--json"],
    );
    assert!(json.contains("\"passed\":true"), "{json}");

    // Trainable tokens after an embedding LoRA: fold replaces the rows the LoRA changed, which
    // the reference (LoRA beside the weights) cannot follow, so it refuses; the other order
    // checks.
    let bert = fixtures().join("bert/torchscript/model.onnx");
    let (emb, tok) = (
        fixtures().join("bert/adapters/embedding"),
        fixtures().join("bert/adapters/trainable_tokens"),
    );
    let out = env.p("tokens.onnx");
    let err = onnx_lora_fails(&fold_args(&bert, &[&emb, &tok], &out, &["--verify"]), &out);
    assert!(err.contains("cannot follow that order"), "{err}");
    fold_ok(&bert, &[&tok, &emb], &out, &["--verify"]);
}

/// A Gemm with alpha ≠ 1 applies alpha·W: DoRA's norm is that of alpha·W + s·B·A, and a
/// lora_B bias adds s·b whatever alpha is. The same layer stored as alpha = 0.5 on the doubled
/// weight and as alpha = 1 (the encoding torch exports, checked against PEFT by the fixtures)
/// gives the same results under fold, inject in both forms, and fold-back.
#[test]
fn gemm_alpha_scales_the_weight_only() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut dora = lora("fc", 8, 4, 0.1);
    dora.push((
        "fc.lora_magnitude_vector".into(),
        vec![4],
        vec![0.5, 1.5, 2.0, 0.7],
    ));
    let mut biased = lora("fc", 8, 4, -0.2);
    biased.push(("fc.lora_B.bias".into(), vec![4], vec![0.3, -0.1, 0.2, 0.4]));
    let adapters = [
        write_adapter(
            &env.p("dora"),
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}),
            &refs(&dora),
        ),
        write_adapter(
            &env.p("lora_bias"),
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_bias": true}),
            &refs(&biased),
        ),
    ];
    for ad in &adapters {
        let run = |model: &str, how: &str| {
            let out = env.p(&format!("{model}.{how}.onnx"));
            let m = s(&env.p(&format!("{model}.onnx")));
            match how {
                "fold" => onnx_lora_ok(&["fold", &m, &s(ad), "-o", &s(&out)]),
                "branch" => onnx_lora_ok(&["inject", &m, "--adapter", &s(ad), "-o", &s(&out)]),
                "weight" => onnx_lora_ok(&[
                    "inject",
                    &m,
                    "--adapter",
                    &s(ad),
                    "--form",
                    "weight",
                    "-o",
                    &s(&out),
                ]),
                _ => {
                    let branched = s(&env.p(&format!("{model}.branch.onnx")));
                    onnx_lora_ok(&["fold", &branched, "-o", &s(&out)])
                }
            };
            out
        };
        for how in ["fold", "branch", "weight", "back"] {
            let (half, one) = (run("gemm_half", how), run("gemm_one", how));
            let d: serde_json::Value =
                serde_json::from_str(&py("ort_diff.py", &[&half, &one])).unwrap();
            assert!(d["y"].as_f64().unwrap() < 1e-5, "{ad:?} {how}: {d}");
            let d: serde_json::Value =
                serde_json::from_str(&py("ort_diff.py", &[&env.p("gemm_one.onnx"), &one])).unwrap();
            assert!(
                d["y"].as_f64().unwrap() > 1e-2,
                "{ad:?} {how}: no effect {d}"
            );
        }
    }
}

/// Adapters on different projections of one packed q/k/v weight, one of them DoRA: PEFT rescales
/// only the DoRA module's outputs, so `fold --verify`'s reference takes both (stacked branches
/// on a `qkv_proj`, one summed weight-space delta inside an Attention) and passes, in either
/// order. Two modules of one adapter on the same projection are refused.
#[test]
fn dora_on_one_projection_of_a_packed_weight_stacks_with_others() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let dora_k = |name: &str, n: usize| {
        let mut t = lora("layers.0.self_attn.k_proj", 8, n, 0.1);
        t.push((
            "layers.0.self_attn.k_proj.lora_magnitude_vector".into(),
            vec![n],
            (0..n).map(|i| 0.5 + i as f32 * 0.1).collect(),
        ));
        write_adapter(
            &env.p(name),
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}),
            &refs(&t),
        )
    };
    let plain_q = |name: &str, n: usize| {
        write_adapter(
            &env.p(name),
            config(),
            &refs(&lora("layers.0.self_attn.q_proj", 8, n, -0.2)),
        )
    };
    for (model, width) in [("qkv_nbits_float.onnx", 4), ("merged_packed.onnx", 8)] {
        let (dk, pq) = (
            dora_k(&format!("dk{width}"), width),
            plain_q(&format!("pq{width}"), width),
        );
        for (first, second) in [(&dk, &pq), (&pq, &dk)] {
            let out = env.p(&format!("{model}.out.onnx"));
            let json = fold_ok(
                &env.p(model),
                &[first, second],
                &out,
                &["--verify", "--json"],
            );
            assert!(
                json.contains("\"type\":\"verdict\"") && !json.contains("\"passed\":false"),
                "{model}: {json}"
            );
        }
    }
    let mut t = lora("layers.0.self_attn.q_proj", 8, 4, 0.1);
    t.extend(lora("layers.0.attn.q_proj", 8, 4, 0.2));
    let twice = write_adapter(&env.p("twice"), config(), &refs(&t));
    let out = env.p("twice.onnx");
    let err = onnx_lora_fails(
        &[
            "inject",
            &s(&env.p("qkv_nbits_float.onnx")),
            "--adapter",
            &s(&twice),
            "-o",
            &s(&out),
        ],
        &out,
    );
    assert!(err.contains("are both the q projection"), "{err}");
}

/// A merged decoder whose two If bodies onnxruntime both fused, each with an Attention on the
/// outer graph's one packed weight: a q_proj module folds into its columns once (one weight),
/// so both values of the switch run the adapted layer, and `--verify` checks both; inject,
/// one branch per module, refuses it by name.
#[test]
fn a_layer_packed_in_both_if_bodies_folds_once() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = env.p("merged_packed_both.onnx");
    let ad = write_adapter(
        &env.p("q"),
        config(),
        &refs(&lora("layers.0.self_attn.q_proj", 8, 8, 0.2)),
    );
    let out = env.p("out.onnx");
    let json = fold_ok(&model, &[&ad], &out, &["--verify", "--json"]);
    let modules = json_records(&json, "module").len();
    assert_eq!(modules, 1, "one write of the shared packed weight: {json}");
    let passed = json_records(&json, "output")
        .iter()
        .filter(|r| r["passed"] == true)
        .count();
    assert_eq!(passed, 2, "{json}");
    // Both bodies changed: each value of the switch differs from the base.
    let o = onnx_lora(&["verify", &s(&out), &s(&model), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let failed = json_records(&String::from_utf8_lossy(&o.stdout), "output")
        .iter()
        .filter(|r| r["passed"] == false)
        .count();
    assert_eq!(failed, 2);
    let inj = env.p("inj.onnx");
    let err = onnx_lora_fails(
        &["inject", &s(&model), "--adapter", &s(&ad), "-o", &s(&inj)],
        &inj,
    );
    assert!(err.contains("Attention"), "{err}");
}

/// TorchScript merges equal weights of two modules and scopes a module's later call like a
/// module of its own (`fc_1`). Where the parameters a node reads tell them apart (a bias
/// named after its module, read through an Identity of the main graph also from inside an
/// If's bodies; a module's own bias beside a bias-less call of `fc`, in either node order), or
/// the adapter names `fc_1` (also a bias-less one in both bodies of an If), fold gives each
/// module its own delta: it computes what the same model with module `fc_1` named `proj`
/// computes with the same factors, where nothing needs telling apart.
#[test]
fn merged_twins_fold_as_their_renamed_models() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let adapter = |name: &str, modules: &[(&str, f32)]| {
        let mut t = Vec::new();
        for (m, fill) in modules {
            t.extend(lora(m, 8, 8, *fill));
        }
        write_adapter(&env.p(name), config(), &refs(&t))
    };
    let mut checked = 0;
    for model in [
        "if_twins",
        "if_twins_nobias",
        "collide",
        "collide_own_first",
        "distinct",
        "distinct_nobias",
        "main_if_module",
    ] {
        let (m, renamed) = (
            env.p(&format!("{model}.onnx")),
            env.p(&format!("{model}_renamed.onnx")),
        );
        for (tag, ours, theirs) in [
            (
                "both",
                vec![("fc", 0.3), ("fc_1", -0.2)],
                vec![("fc", 0.3), ("proj", -0.2)],
            ),
            ("second", vec![("fc_1", -0.2)], vec![("proj", -0.2)]),
            ("first", vec![("fc", 0.3)], vec![("fc", 0.3)]),
        ] {
            // (a bias-less fc_1 that no adapter names is taken as fc's later call: README)
            if model == "if_twins_nobias" && tag == "first" {
                continue;
            }
            let case = format!("{model}_{tag}");
            let (out, want) = (
                env.p(&format!("{case}.onnx")),
                env.p(&format!("{case}_r.onnx")),
            );
            let a = adapter(&format!("{case}_a"), &ours);
            let b = adapter(&format!("{case}_b"), &theirs);
            let report = fold_ok(&m, &[&a], &out, &["--verify", "--ep", "cpu", "--json"]);
            fold_ok(&renamed, &[&b], &want, &[]);
            let o = onnx_lora(&["verify", &s(&out), &s(&want), "--ep", "cpu"]);
            assert!(
                o.status.success(),
                "{case}: {}\n{report}",
                String::from_utf8_lossy(&o.stderr)
            );
            // (the adapter acts)
            let o = onnx_lora(&["verify", &s(&m), &s(&out), "--ep", "cpu"]);
            assert_eq!(o.status.code(), Some(1), "{case}");
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
    // inspect: the two bodies of an If are not two calls; a later call inside one body is, and
    // a call in each body after one in the main graph makes two calls per run; calls are
    // numbered in the order they run, a body's at its If.
    for (model, calls) in [
        ("if_twins", vec![None; 4]),
        (
            "if_twins_nobias",
            vec![Some((1, 2)), Some((2, 2)), Some((1, 2)), Some((2, 2))],
        ),
        (
            "main_if_calls",
            vec![Some((1, 2)), Some((2, 2)), Some((2, 2))],
        ),
        (
            "if_then_main_call",
            vec![Some((2, 2)), Some((1, 2)), Some((1, 2))],
        ),
    ] {
        let out = onnx_lora_ok(&["inspect", &s(&env.p(&format!("{model}.onnx"))), "--json"]);
        let got: Vec<Option<(u64, u64)>> = json_records(&out, "candidate")
            .iter()
            .map(|c| Some((c["call"].as_u64()?, c["calls"].as_u64()?)))
            .collect();
        assert_eq!(got, calls, "{model}: {out}");
        // (a later call is listed under the module it calls, also where the main graph lists
        // it before the bodies)
        if model != "if_twins" {
            for c in json_records(&out, "candidate") {
                assert_eq!(c["module"], "fc", "{model}: {out}");
            }
        }
        // (the bodies' copies are told apart: no scope is ambiguous)
        assert!(!out.contains("ambiguous_scope"), "{model}: {out}");
    }
}

/// A module's calls are found, and numbered in the order they run, whatever order the graph
/// lists them in (a later call first, one in a Loop listed first, the copies of a layer in an
/// If's two bodies on different copies of its weight, either body first); a scope is looked up
/// at its own path before a module deeper down with the same name (`fc_1`, not
/// `blocks.0.fc_1`), also under a wrapper scope and whatever its kind, and `inspect` flags what
/// fold refuses.
#[test]
fn calls_are_found_whatever_their_order() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    type Row = (String, Option<(u64, u64)>, bool);
    let row = |m: &str, call: Option<(u64, u64)>, amb: bool| -> Row { (m.into(), call, amb) };
    for (model, want) in [
        (
            "union_scopes",
            vec![
                row("fc", Some((1, 3)), false),
                row("fc", Some((2, 3)), true),
                row("fc", Some((3, 3)), true),
                row("blocks.0.fc_1", None, false),
            ],
        ),
        (
            "later_call_first",
            vec![
                row("fc", Some((1, 2)), false),
                row("fc", Some((2, 2)), false),
            ],
        ),
        (
            "later_call_in_loop_first",
            vec![
                row("fc", Some((2, 2)), false),
                row("fc", Some((1, 2)), false),
            ],
        ),
        (
            "collide_nobias_reordered",
            vec![
                row("fc", Some((1, 3)), true),
                row("fc", Some((2, 3)), true),
                row("fc", Some((3, 3)), false),
            ],
        ),
        (
            "union_scopes_wrapped",
            vec![
                row("m.fc", Some((1, 3)), false),
                row("m.fc", Some((2, 3)), true),
                row("m.fc", Some((3, 3)), true),
                row("m.blocks.0.fc_1", None, false),
            ],
        ),
        (
            "if_copies_calls",
            vec![
                row("fc", Some((1, 2)), false),
                row("fc", Some((2, 2)), false),
                row("fc", Some((1, 2)), false),
                row("fc", Some((2, 2)), false),
            ],
        ),
        (
            "if_local_copy_then_first",
            vec![
                row("fc", Some((2, 2)), false),
                row("fc", Some((1, 2)), false),
                row("fc", Some((1, 2)), false),
            ],
        ),
        (
            "if_local_copy_else_first",
            vec![
                row("fc", Some((2, 2)), false),
                row("fc", Some((1, 2)), false),
                row("fc", Some((1, 2)), false),
            ],
        ),
    ] {
        let out = onnx_lora_ok(&["inspect", &s(&env.p(&format!("{model}.onnx"))), "--json"]);
        let got: Vec<Row> = json_records(&out, "candidate")
            .iter()
            .map(|c| {
                (
                    c["module"].as_str().unwrap_or_default().to_string(),
                    c["call"].as_u64().zip(c["calls"].as_u64()),
                    c["ambiguous_scope"] == true,
                )
            })
            .collect();
        assert_eq!(got, want, "{model}: {out}");
    }
    // fold refuses the root's ambiguous fc_1 (it used to take blocks.0.fc_1 for it), and fc with
    // it; under --allow-unmatched blocks.0.fc_1 alone is folded; the same under a wrapper scope
    let ad = write_adapter(&env.p("fc_1"), config(), &refs(&lora("fc_1", 8, 8, 0.3)));
    let mut t = lora("fc", 8, 8, 0.3);
    t.extend(lora("fc_1", 8, 8, -0.2));
    t.extend(lora("blocks.0.fc_1", 8, 8, 0.1));
    let all = write_adapter(&env.p("all"), config(), &refs(&t));
    for (model, prefix) in [("union_scopes", ""), ("union_scopes_wrapped", "m.")] {
        let m = env.p(&format!("{model}.onnx"));
        let err = fold_fails(&m, &ad, &env.p("no.onnx"), &[]);
        assert!(
            err.contains("module 'fc_1' is ambiguous in this TorchScript export"),
            "{model}: {err}"
        );
        let out = env.p(&format!("{model}_u.onnx"));
        let report = fold_ok(&m, &[&all], &out, &["--allow-unmatched", "--json"]);
        let records = json_records(&report, "module");
        let folded: Vec<&str> = records
            .iter()
            .filter_map(|r| r["module"].as_str())
            .collect();
        assert_eq!(
            folded,
            [format!("{prefix}blocks.0.fc_1")],
            "{model}: {report}"
        );
    }
    // under a wrapper, `fc_1` is the outer module of its own, not blocks.0.fc's later call
    // scoped blocks.0.fc_1 (which reads blocks.0.fc's weight)
    let report = fold_ok(
        &env.p("deep_call_wrapped.onnx"),
        &[&ad],
        &env.p("deep.onnx"),
        &["--json"],
    );
    let records = json_records(&report, "module");
    let folded: Vec<&str> = records.iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(folded, ["/m/fc_1/MatMul"], "{report}");
    // the module the path names is found before its kind is checked: inject refuses fc_1, a
    // MatMulInteger with no float values, rather than branch the float blocks.0.fc_1
    let ad = write_adapter(&env.p("fc_1_84"), config(), &refs(&lora("fc_1", 8, 4, 0.3)));
    let m = env.p("mmi_beside_deeper.onnx");
    let out = env.p("mmi_out.onnx");
    let err = onnx_lora_fails(&inject_args(&m, &ad, &out, &[]), &out);
    assert!(
        err.contains(
            "module 'fc_1': its input and output are quantized (MatMulInteger /fc_1/MatMul_quant)"
        ),
        "{err}"
    );
    // a merged decoder with a weight copy per body: fc's later call is found in both bodies
    let fc = write_adapter(&env.p("fc_only"), config(), &refs(&lora("fc", 8, 8, 0.3)));
    let report = fold_ok(
        &env.p("if_copies_calls.onnx"),
        &[&fc],
        &env.p("copies.onnx"),
        &["--json"],
    );
    assert!(
        report.contains("is also changed at /fc_1/MatMul, /fc_1/MatMul, taken as its later calls")
            && !report.contains("\"copy\""),
        "{report}"
    );
    // fold takes /fc_1/MatMul as fc's later call in either body order, and the two compute alike
    let ad = write_adapter(&env.p("fc"), config(), &refs(&lora("fc", 8, 8, 0.3)));
    let mut outs = Vec::new();
    for first in ["then", "else"] {
        let m = env.p(&format!("if_local_copy_{first}_first.onnx"));
        let out = env.p(&format!("if_{first}_out.onnx"));
        let report = fold_ok(&m, &[&ad], &out, &["--json"]);
        assert!(
            report.contains("is also changed at /fc_1/MatMul, taken as its later call"),
            "{first}: {report}"
        );
        outs.push(s(&out));
    }
    let o = onnx_lora(&["verify", &outs[0], &outs[1], "--ep", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// inject takes a TorchScript scope that an adapter names as the module its lookup finds:
/// `fc_1` beside `fc`'s call in the same scope is one branch, computing what fold computes;
/// `fc`, called twice, is refused.
#[test]
fn inject_branches_a_module_scoped_like_a_later_call() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for model in ["collide", "collide_own_first"] {
        let m = env.p(&format!("{model}.onnx"));
        let ad = write_adapter(
            &env.p(&format!("{model}_a")),
            config(),
            &refs(&lora("fc_1", 8, 8, -0.2)),
        );
        let (inj, folded) = (
            env.p(&format!("{model}_inj.onnx")),
            env.p(&format!("{model}_f.onnx")),
        );
        let report = onnx_lora_ok(&inject_args(&m, &ad, &inj, &["--json"]));
        assert_eq!(
            json_records(&report, "branch").len(),
            1,
            "{model}: {report}"
        );
        fold_ok(&m, &[&ad], &folded, &[]);
        let o = onnx_lora(&["verify", &s(&inj), &s(&folded), "--ep", "cpu"]);
        assert!(
            o.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let ad = write_adapter(
            &env.p(&format!("{model}_b")),
            config(),
            &refs(&lora("fc", 8, 8, 0.3)),
        );
        let out = env.p("no.onnx");
        let err = onnx_lora_fails(&inject_args(&m, &ad, &out, &[]), &out);
        assert!(
            err.contains("module 'fc' is called 2 times"),
            "{model}: {err}"
        );
    }
}

/// Where nothing tells a TorchScript scope `fc_1` from `fc`'s later call (no bias; two nodes on
/// the one weight that may run in one pass, also one in the main graph and one in an If
/// body), an adapter naming `fc_1` is refused as ambiguous, and so is `fc`, whose calls it
/// leaves unknown (also under a wrapper scope): under --allow-unmatched neither is folded.
#[test]
fn an_ambiguous_scope_leaves_both_modules_unmatched() {
    let env = Env::new();
    let mut t = lora("fc", 8, 8, 0.3);
    t.extend(lora("fc_1", 8, 8, -0.2));
    let ad = write_adapter(&env.p("ad"), config(), &refs(&t));
    for model in ["collide_nobias", "main_if_twins", "collide_nobias_prefixed"] {
        let m = env.p(&format!("{model}.onnx"));
        // inspect flags the scope's nodes, listed as fc's calls
        let o = onnx_lora(&["inspect", m.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{model}");
        let out = String::from_utf8_lossy(&o.stdout);
        let flagged: Vec<bool> = json_records(&out, "candidate")
            .iter()
            .map(|c| c["ambiguous_scope"] == true)
            .collect();
        assert_eq!(flagged, [false, true, true], "{model}: {out}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("flagged ambiguous-scope (scope "),
            "{model}"
        );
        let err = fold_fails(&m, &ad, &env.p("no.onnx"), &[]);
        assert!(
            err.contains("2 adapter module(s) match no weight")
                && err.contains("is ambiguous in this TorchScript export")
                && err.contains("fc' may also be called at node /"),
            "{model}: {err}"
        );
        let out = env.p(&format!("{model}_out.onnx"));
        let o = onnx_lora(&fold_args(&m, &[&ad], &out, &["--allow-unmatched"]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{model}: {err}");
        assert_eq!(
            err.matches("warning: unmatched adapter module").count(),
            2,
            "{model}: {err}"
        );
        let o = onnx_lora(&[
            "verify",
            m.to_str().unwrap(),
            out.to_str().unwrap(),
            "--ep",
            "cpu",
        ]);
        assert!(
            o.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// The same ambiguous scopes on a table that onnxruntime's EmbedLayerNormalization reads (a
/// layer `--verify`'s reference takes in weight space): under --allow-unmatched both modules
/// stay unmatched there too, and `--verify` checks the output against the base.
#[test]
fn an_ambiguous_scope_in_a_fused_op_is_unmatched_under_verify() {
    let env = Env::new();
    let emb = |module: &str, fill: f32| {
        vec![
            (
                format!("{module}.lora_embedding_A"),
                vec![2, 10],
                vec![fill; 20],
            ),
            (
                format!("{module}.lora_embedding_B"),
                vec![8, 2],
                vec![fill; 16],
            ),
        ]
    };
    let mut t = emb("emb", 0.3);
    t.extend(emb("emb_1", -0.2));
    let ad = write_adapter(&env.p("ad"), config(), &refs(&t));
    let m = env.p("emb_collide_nobias.onnx");
    let err = fold_fails(&m, &ad, &env.p("no.onnx"), &[]);
    assert!(
        err.contains("2 adapter module(s) match no weight")
            && err.contains("is ambiguous in this TorchScript export"),
        "{err}"
    );
    let out = env.p("out.onnx");
    let o = onnx_lora(&fold_args(
        &m,
        &[&ad],
        &out,
        &["--allow-unmatched", "--verify", "--ep", "cpu"],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        err.matches("warning: unmatched adapter module").count(),
        2,
        "{err}"
    );
}

/// inject's refusal of a module that fits no layer says how to inject the others, when there
/// are others.
#[test]
fn inject_refusal_hints_at_the_rest_only_when_there_is_a_rest() {
    let env = Env::new();
    let model = env.p("linear.onnx");
    let out = env.p("out.onnx");
    let mut t = lora("fc", 8, 4, 0.1);
    t.extend(lora("nope", 8, 4, 0.1));
    let both = write_adapter(&env.p("both"), config(), &refs(&t));
    let err = onnx_lora_fails(&inject_args(&model, &both, &out, &[]), &out);
    assert!(
        err.contains("module 'nope' matches no weight")
            && err.contains("(use --allow-unmatched to inject the rest)"),
        "{err}"
    );
    let alone = write_adapter(&env.p("alone"), config(), &refs(&lora("nope", 8, 4, 0.1)));
    let err = onnx_lora_fails(&inject_args(&model, &alone, &out, &[]), &out);
    assert!(
        err.contains("module 'nope' matches no weight") && !err.contains("--allow-unmatched"),
        "{err}"
    );
}

/// A layer called many times (an unrolled loop): one write of its weight, each call's record
/// naming 16 of its weight's other readers and counting them, one `readers` record listing them
/// all (inspect's output grows with the calls, not with their square), and messages that name
/// a few calls and count the rest.
#[test]
fn a_layer_called_many_times_is_one_write_and_brief_messages() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let m = env.p("many_calls.onnx");
    let out = onnx_lora_ok(&["inspect", &s(&m), "--json"]);
    let cands = json_records(&out, "candidate");
    assert_eq!(cands.len(), 40, "{out}");
    for (i, c) in cands.iter().enumerate() {
        assert_eq!(c["module"], "fc", "{c}");
        assert_eq!(c["calls"], 40, "{c}");
        let others = c["shared_with"].as_array().expect("shared_with");
        assert_eq!(others.len(), 16, "{c}");
        assert_eq!(c["shared_with_total"], 39, "{c}");
        assert!(!others.iter().any(|o| *o == c["node"]), "{i}: {c}");
    }
    let readers = json_records(&out, "readers");
    assert_eq!(readers.len(), 1, "{out}");
    assert_eq!(readers[0]["weight"], cands[0]["weight"], "{out}");
    let all: Vec<&serde_json::Value> = readers[0]["readers"].as_array().unwrap().iter().collect();
    let nodes: Vec<&serde_json::Value> = cands.iter().map(|c| &c["node"]).collect();
    assert_eq!(all, nodes, "every call, in order");
    let ad = write_adapter(&env.p("fc"), config(), &refs(&lora("fc", 8, 8, 0.3)));
    let folded = env.p("many_out.onnx");
    let report = fold_ok(&m, &[&ad], &folded, &["--json"]);
    assert!(
        report.contains(
            "is also changed at /fc_1/MatMul, /fc_2/MatMul, /fc_3/MatMul, /fc_4/MatMul, /fc_5/MatMul, /fc_6/MatMul, /fc_7/MatMul, /fc_8/MatMul, … and 31 more, taken as its later calls"
        ) && !report.contains("/fc_39/")
            && !report.contains("\"copy\""),
        "{report}"
    );
    assert_eq!(json_records(&report, "module").len(), 1, "{report}");
    // the calls still read one weight: changed once, in place
    let after = onnx_lora_ok(&["inspect", &s(&folded), "--json"]);
    let weights: std::collections::BTreeSet<String> = json_records(&after, "candidate")
        .iter()
        .map(|c| c["weight"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(weights.len(), 1, "{after}");
    // a second fold of the same adapter doubles the change: one write per fold, not 40
    let twice = env.p("many_twice.onnx");
    fold_ok(&folded, &[&ad], &twice, &[]);
    let doubled = env.p("many_doubled.onnx");
    fold_ok(&m, &[&ad, &ad], &doubled, &[]);
    let o = onnx_lora(&["verify", &s(&twice), &s(&doubled), "--ep", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = onnx_lora(&["verify", &s(&folded), &s(&doubled), "--ep", "cpu"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // inject refuses the shared layer, naming a few of its calls
    let inj = env.p("many_inj.onnx");
    let err = onnx_lora_fails(&inject_args(&m, &ad, &inj, &[]), &inj);
    assert!(
        err.contains(
            "module 'fc' is called 40 times in this export (nodes /fc/MatMul, /fc_1/MatMul,"
        ) && err.contains("… and 32 more: one layer shared across calls"),
        "{err}"
    );
}

/// An adapter path that ends several module paths names the shortest (`layers.0.fc1`, not
/// `encoder.layers.0.fc1`, also under a wrapper `m.`): fold and inject say which they took and
/// what they left unchanged, and say nothing when the adapter names the deeper module too.
#[test]
fn a_path_beside_a_deeper_match_says_which_it_took() {
    let env = Env::new();
    let one = write_adapter(
        &env.p("one"),
        config(),
        &refs(&lora("layers.0.fc1", 8, 8, 0.2)),
    );
    let mut t = lora("layers.0.fc1", 8, 8, 0.2);
    t.extend(lora("encoder.layers.0.fc1", 8, 8, 0.2));
    let both = write_adapter(&env.p("both"), config(), &refs(&t));
    for (model, pre, taken) in [
        (
            "nested_stacks",
            "",
            "adapter path 'layers.0.fc1' is the export's module 'layers.0.fc1'",
        ),
        (
            "nested_stacks_wrapped",
            "m.",
            "adapter path 'layers.0.fc1' is taken as 'm.layers.0.fc1', the shortest module path ending with it",
        ),
    ] {
        let m = env.p(&format!("{model}.onnx"));
        let note =
            format!("{taken}; '{pre}encoder.layers.0.fc1' ends with it too and is left unchanged");
        let out = env.p(&format!("{model}_f.onnx"));
        let report = fold_ok(&m, &[&one], &out, &["--json"]);
        let modules: Vec<String> = json_records(&report, "module")
            .iter()
            .map(|r| r["module"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(modules, [format!("{pre}layers.0.fc1")], "{report}");
        assert!(report.contains(&note), "{model}: {report}");
        let inj = env.p(&format!("{model}_i.onnx"));
        let o = onnx_lora(&inject_args(&m, &one, &inj, &[]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.contains(&note), "{model}: {err}");
        // the adapter names both: both change, and nothing is left to note
        let report = fold_ok(&m, &[&both], &out, &["--json"]);
        assert_eq!(json_records(&report, "module").len(), 2, "{report}");
        assert!(!report.contains("left unchanged"), "{model}: {report}");
        let o = onnx_lora(&inject_args(&m, &both, &inj, &[]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && !err.contains("left unchanged"),
            "{model}: {err}"
        );
    }
}

/// A graph in which two nodes write one value, or with two initializers of one name, is no
/// ONNX graph: fold and inject refuse it, naming the value and the nodes, rather than rewrite
/// one of them (a fold into one copy of W would be lost wherever the other is read).
#[test]
fn a_value_written_twice_is_refused() {
    let env = Env::new();
    let m = env.p("written_twice.onnx");
    let ad = write_adapter(&env.p("ad"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let out = env.p("out.onnx");
    let want = "value 'y' is written by two nodes (/fc/MatMul and /fc/MatMul)";
    let err = fold_fails(&m, &ad, &out, &[]);
    assert!(err.contains(want), "{err}");
    for extra in [
        &["--adapter", ad.to_str().unwrap()][..],
        &["--rank", "2"][..],
    ] {
        let mut args = vec!["inject", m.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend(extra);
        let err = onnx_lora_fails(&args, &out);
        assert!(err.contains(want), "{err}");
    }
    // (two initializers of one name, an initializer a node writes: refused by every command
    // that reads or rewrites weights by name)
    for (file, want) in [
        (
            "init_twice.onnx",
            "graph 'linear' has two initializers named 'W'; an ONNX graph assigns each value once (onnxruntime reads the last copy; a rewrite of one copy could be lost)",
        ),
        (
            "init_written.onnx",
            "value 'y' is both an initializer and written by node /fc/MatMul",
        ),
    ] {
        let m = env.p(file);
        let err = fold_fails(&m, &ad, &out, &[]);
        assert!(err.contains(want), "{err}");
        // (verify runs it, as the runtimes do, and says why their verdicts may differ)
        let o = onnx_lora(&[
            "verify",
            m.to_str().unwrap(),
            m.to_str().unwrap(),
            "--ep",
            "tract",
        ]);
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(
            text.contains("is no valid ONNX graph: ") && text.contains(want),
            "{text}"
        );
        let dir = env.p("peft_out");
        for args in [
            vec![
                "inject",
                m.to_str().unwrap(),
                "--rank",
                "2",
                "-o",
                out.to_str().unwrap(),
            ],
            vec![
                "export-peft",
                m.to_str().unwrap(),
                "-o",
                dir.to_str().unwrap(),
            ],
        ] {
            let err = onnx_lora_fails(&args, &out);
            assert!(err.contains(want), "{err}");
            assert!(!dir.exists());
        }
    }
}

/// adapter_config.json without target_modules: PEFT would target its defaults for the model's
/// type, which an ONNX file does not say; every module of the file is applied, with a warning
/// that says so and how to make PEFT agree.
#[test]
fn a_config_without_target_modules_is_applied_whole_with_a_warning() {
    let env = Env::new();
    for (name, cfg) in [
        (
            "absent",
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4}),
        ),
        (
            "null",
            serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": null}),
        ),
    ] {
        let ad = write_adapter(&env.p(name), cfg, &refs(&lora("fc", 8, 4, 0.1)));
        let out = env.p(&format!("{name}.onnx"));
        let o = onnx_lora(&fold_args(&env.p("linear.onnx"), &[&ad], &out, &[]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        assert!(
            err.contains("ignoring PEFT's default target_modules: adapter_config.json gives none")
                && err.contains("onnx-lora applies every module the file holds (1, 'fc' first)"),
            "{name}: {err}"
        );
    }
    // with target_modules, no such warning
    let ad = write_adapter(&env.p("given"), config(), &refs(&lora("fc", 8, 4, 0.1)));
    let o = onnx_lora(&fold_args(
        &env.p("linear.onnx"),
        &[&ad],
        &env.p("given.onnx"),
        &[],
    ));
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("target_modules"));
}

/// A config naming modules_to_save or trainable tokens the file saved nothing of is refused,
/// as PEFT fails to load it; a config naming several modules_to_save of which the file holds
/// one (PEFT's SEQ_CLS adds both `classifier` and `score`) is not.
#[test]
fn configs_naming_whole_modules_the_file_lacks_are_refused() {
    let env = Env::new();
    let t = lora("fc", 8, 4, 0.1);
    for (key, value, says) in [
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "names modules_to_save [\"lm_head\"] but the file holds the weights of none of them",
        ),
        (
            "modules_to_save",
            serde_json::json!(["fc"]),
            "names modules_to_save [\"fc\"] but the file holds the weights of none of them",
        ),
        (
            "trainable_token_indices",
            serde_json::json!([1, 2]),
            "gives trainable_token_indices [1,2] but the file holds no trainable token rows",
        ),
    ] {
        let mut cfg = config();
        cfg[key] = value;
        let ad = write_adapter(&env.p(&format!("{key}_missing")), cfg, &refs(&t));
        let err = env.fold_fails("linear.onnx", &ad);
        assert!(
            err.contains(says) && err.contains("PEFT fails to load it"),
            "{err}"
        );
    }
    let mut cfg = config();
    cfg["modules_to_save"] = serde_json::json!(["classifier", "fc"]);
    let whole = vec![("fc.weight", vec![4, 8], vec![0.5; 32])];
    let ad = write_adapter(&env.p("one_of_two"), cfg, &whole);
    let o = onnx_lora(&fold_args(
        &env.p("linear.onnx"),
        &[&ad],
        &env.p("one.onnx"),
        &[],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // ... but a named module this model has, with no weights in the file, is refused
    let mut cfg = config();
    cfg["modules_to_save"] = serde_json::json!(["a", "b"]);
    let ad = write_adapter(
        &env.p("a_not_b"),
        cfg,
        &[("a.weight", vec![4, 8], vec![0.5; 32])],
    );
    let err = env.fold_fails("shared.onnx", &ad);
    assert!(
        err.contains("names modules_to_save 'b', which is this model's 'b' (MatMul /b/MatMul)")
            && err.contains("PEFT fails to load it"),
        "{err}"
    );
}

/// Given the folder save_pretrained wrote for an adapter not named "default", the error points
/// at the subfolder holding it.
#[test]
fn a_named_adapters_parent_folder_points_at_its_subfolder() {
    let env = Env::new();
    let parent = env.p("saved");
    write_adapter(
        &parent.join("myad"),
        config(),
        &refs(&lora("fc", 8, 4, 0.1)),
    );
    let err = env.fold_fails("linear.onnx", &parent);
    assert!(
        err.contains("holds an adapter (save_pretrained puts an adapter not named 'default' in a subfolder of its name): give that folder")
            && err.contains("myad"),
        "{err}"
    );
}

/// export-peft --root puts the torch model's top module before the export's paths (a
/// TorchScript export of OPT names `decoder.layers.0…` where PEFT's model has
/// `model.decoder.layers.0…`): keys, target_modules and patterns all carry it.
#[test]
fn export_peft_root_prefixes_every_module_path() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let injected = env.p("inj.onnx");
    onnx_lora_ok(&[
        "inject",
        &s(&env.p("linear.onnx")),
        "--rank",
        "2",
        "-o",
        &s(&injected),
    ]);
    let dir = env.p("exported");
    onnx_lora_ok(&[
        "export-peft",
        &s(&injected),
        "--root",
        "model.",
        "-o",
        &s(&dir),
    ]);
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "base_model.model.model.fc.lora_A.weight",
            "base_model.model.model.fc.lora_B.weight"
        ]
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["model.fc"]),
        "{cfg}"
    );
    // a root that is no module path is refused
    let err = onnx_lora_fails(
        &[
            "export-peft",
            &s(&injected),
            "--root",
            "a b",
            "-o",
            &s(&env.p("bad")),
        ],
        &env.p("bad"),
    );
    assert!(err.contains("no module path PEFT can load"), "{err}");
}

/// A bias saved beside a LoRA that equals the layer's own (PEFT saves `base_layer.bias` with
/// the base weight of an output layer it targets, Phi's lm_head, whatever `bias` says) is no
/// trained value: a serving model takes the adapter; a bias that differs is still refused there.
#[test]
fn a_saved_bias_equal_to_the_layers_is_no_trained_value() {
    let env = Env::new();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = env.p("shared_bias.onnx");
    let m = onnx_lora::onnx::load(&model).unwrap();
    let g = m.proto.graph.as_ref().unwrap();
    let add = g
        .node
        .iter()
        .find(|n| n.op_type() == "Add" && n.name().starts_with("/a/"))
        .expect("/a/ Add");
    let bias = g
        .initializer
        .iter()
        .find(|t| add.input.iter().any(|i| i == t.name()))
        .expect("the Add's bias");
    let own = f32s(&m.tensor_bytes(bias).unwrap());
    let serve = |name: &str, b: Vec<f32>| {
        let mut t = lora("a", 8, 4, 0.1);
        t.push(("a.base_layer.bias".into(), vec![4], b));
        let ad = write_adapter(&env.p(name), config(), &refs(&t));
        onnx_lora(&[
            "inject",
            &s(&model),
            "--as-inputs",
            "--adapter",
            &s(&ad),
            "--adapter-out",
            &s(&env.p(&format!("{name}.onnx_adapter"))),
            "-o",
            &s(&env.p(&format!("{name}.onnx"))),
        ])
    };
    let o = serve("same", own.clone());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = serve("trained", own.iter().map(|v| v + 0.5).collect());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("a trained bias") && err.contains("no branch form"),
        "{err}"
    );
}

/// A module the export has no layer for at all is said to be absent from the model, with the
/// likely reason: BERT's pooler, which an export of last_hidden_state alone prunes, and a layer
/// beyond the model's depth. `--allow-unmatched` applies the rest.
#[test]
fn modules_of_parts_the_export_lacks_say_so() {
    let env = Env::new();
    let model = common::fixtures().join("llama/torchscript/model.onnx");
    let out = env.p("out.onnx");
    let mut t = lora("model.layers.0.self_attn.q_proj", 32, 32, 0.1);
    t.extend(lora("model.pooler.dense", 32, 32, 0.1));
    t.extend(lora("model.layers.7.mlp.down_proj", 32, 32, 0.1));
    let adapter = write_adapter(&env.p("a"), config(), &refs(&t));
    let err = fold_fails(&model, &adapter, &out, &[]);
    assert!(
        err.contains("module 'model.pooler.dense' matches no weight in the model: this model has no layer under 'model.pooler' (the export may have left it out")
            && err.contains("module 'model.layers.7.mlp.down_proj' matches no weight in the model: this model has no layer under 'model.layers.7' (was the adapter trained on a model with more layers?)")
            && !err.contains("no layer under 'model.layers.0"),
        "{err}"
    );
    fold_ok(&model, &[&adapter], &out, &["--allow-unmatched"]);
    assert!(out.exists());
}

/// A file too large to map within the process's address space is an error that says so,
/// naming the file, not a failure to open it.
#[test]
fn a_file_too_large_to_map_says_so() {
    let env = Env::new();
    let big = env.p("big.onnx");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4000000 && exec \"$0\" inspect \"$1\"")
        .arg(env!("CARGO_BIN_EXE_onnx-lora"))
        .arg(&big)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("big.onnx: cannot map its 68719476736 bytes into memory: "),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// An `--inputs` array's declared shape is checked against its input before its data is read
/// (a compressed array declaring 4 TiB is refused at once, named), and arrays that feed no
/// input are left unread (an unreadable one is only noted as ignored).
#[test]
fn input_arrays_are_checked_by_their_headers_first() {
    let env = Env::new();
    py("make_npz_edge.py", &[env.dir.path()]);
    let linear = env.p("linear.onnx");
    let l = linear.to_str().unwrap();
    // (the exit code, and stdout and stderr together)
    let verify_with = |npz: &str| {
        let inputs = env.p(npz);
        let o = onnx_lora_within_30s(&[
            "verify",
            l,
            l,
            "--inputs",
            inputs.to_str().unwrap(),
            "--ep",
            "tract",
        ]);
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        (o.status.code(), text)
    };
    let (code, err) = verify_with("bad_shape.npz");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "bad_shape.npz: array 'x' has shape [1, 1099511627776] but the model input takes [2, 8]"
        ),
        "{err}"
    );
    let (code, text) = verify_with("junk.npz");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("'junk' in --inputs is not a model input: ignored")
            && text.contains("'words' in --inputs is not a model input: ignored"),
        "{text}"
    );
    let (code, err) = verify_with("huge_header.npz");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("x.npy: .npy header of 2147483660 bytes"),
        "{err}"
    );
}

/// `target_parameters` naming a layer's 2-D weight is applied as PEFT's ParamWrapper applies
/// it, W + s·B·A on the parameter, which for a Linear's weight is what `target_modules` gives
/// (PEFT 0.21.2's outputs agree, checked in review31): the fold equals the plain adapter's,
/// `rank_pattern` / `alpha_pattern` keys match the parameter's name (`q_proj.weight`), not the
/// module's. Refused, each named: other parameters (MoE experts' stacked weights), a square
/// weight read as stored with no transpose shown (x·W: a Linear's update there would be
/// transposed), whatever its name, an embedding table's parameter, a module targeted both ways
/// and `target_parameters` given as one string.
#[test]
fn target_parameters_on_weights_fold_as_their_layers() {
    let env = Env::new();
    let model = common::fixtures().join("llama/torchscript/model.onnx");
    let plain = common::fixtures().join("llama/adapters/plain");
    let edit =
        |name: &str, f: &dyn Fn(&mut serde_json::Value)| with_config(&plain, &env.p(name), f);
    let fold_bytes = |adapter: &Path, out: &str| {
        let out = env.p(out);
        fold_ok(&model, &[adapter], &out, &["--quiet"]);
        std::fs::read(out).unwrap()
    };
    let by_module = fold_bytes(&plain, "m.onnx");
    let params = edit("params", &|c| {
        c["target_modules"] = serde_json::json!([]);
        c["target_parameters"] = serde_json::json!(["q_proj.weight", "v_proj.weight"]);
    });
    assert_eq!(fold_bytes(&params, "p.onnx"), by_module);
    // (target_modules absent: the parameters alone, with no warning about PEFT's defaults)
    let alone = edit("alone", &|c| {
        c.as_object_mut().unwrap().remove("target_modules");
        c["target_parameters"] = serde_json::json!(["q_proj.weight", "v_proj.weight"]);
    });
    let o = onnx_lora(&fold_args(
        &model,
        &[&alone],
        &env.p("a.onnx"),
        &["--quiet"],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !err.contains("default target_modules"),
        "{err}"
    );
    assert_eq!(std::fs::read(env.p("a.onnx")).unwrap(), by_module);
    // (alpha_pattern: the parameter's name is matched, as PEFT matches it)
    let module_key = edit("module_key", &|c| {
        c["alpha_pattern"] = serde_json::json!({"q_proj": 16});
    });
    let param_key = edit("param_key", &|c| {
        c["target_modules"] = serde_json::json!([]);
        c["target_parameters"] = serde_json::json!(["q_proj.weight", "v_proj.weight"]);
        c["alpha_pattern"] = serde_json::json!({"q_proj.weight": 16});
    });
    let unmatched_key = edit("unmatched_key", &|c| {
        c["target_modules"] = serde_json::json!([]);
        c["target_parameters"] = serde_json::json!(["q_proj.weight", "v_proj.weight"]);
        c["alpha_pattern"] = serde_json::json!({"q_proj": 16});
    });
    let patterned = fold_bytes(&module_key, "mk.onnx");
    assert_ne!(patterned, by_module);
    assert_eq!(fold_bytes(&param_key, "pk.onnx"), patterned);
    assert_eq!(fold_bytes(&unmatched_key, "uk.onnx"), by_module);
    // (experts' stacked weights: refused, named)
    let experts = edit("experts", &|c| {
        c["target_parameters"] = serde_json::json!(["q_proj.weight", "gate_up_proj"]);
    });
    let err = fold_fails(&model, &experts, &env.p("e.onnx"), &[]);
    assert!(
        err.contains(
            "target_parameters names 'gate_up_proj', a parameter other than a layer's weight"
        ),
        "{err}"
    );
    // (a square parameter read as stored: refused; as a target module it is a Linear's)
    let m = env.p("param_matmul.onnx");
    let t = lora("fc", 8, 8, 0.1);
    let cfg = |key: &str, value: serde_json::Value| {
        let mut c = config();
        c.as_object_mut().unwrap().remove("target_modules");
        c[key] = value;
        c
    };
    let by_param = write_adapter(
        &env.p("fc_param"),
        cfg("target_parameters", serde_json::json!(["fc.weight"])),
        &refs(&t),
    );
    let err = fold_fails(&m, &by_param, &env.p("f.onnx"), &[]);
    assert!(
        err.contains("module 'fc' is adapted through target_parameters, and /fc/MatMul reads its square weight 'fc.weight' as stored, with nothing showing whether"),
        "{err}"
    );
    let by_name = write_adapter(
        &env.p("fc_module"),
        cfg("target_modules", serde_json::json!(["fc"])),
        &refs(&t),
    );
    fold_ok(&m, &[&by_name], &env.p("f.onnx"), &["--quiet"]);
    // (named otherwise, it shows no transpose either)
    let err = fold_fails(
        &env.p("param_renamed.onnx"),
        &by_param,
        &env.p("g.onnx"),
        &[],
    );
    assert!(
        err.contains("reads its square weight 'W8' as stored"),
        "{err}"
    );
    // (an embedding table's parameter: refused, named)
    let emb = write_adapter(
        &env.p("emb_param"),
        cfg("target_parameters", serde_json::json!(["embed.weight"])),
        &refs(&lora("embed", 8, 16, 0.1)),
    );
    let err = fold_fails(&env.p("tied.onnx"), &emb, &env.p("g.onnx"), &[]);
    assert!(
        err.contains(
            "module 'embed' is adapted through target_parameters on the embedding table 'E'"
        ),
        "{err}"
    );
    // (targeted both ways, or parameters as one string: refused, as PEFT refuses them)
    let mut c = cfg("target_parameters", serde_json::json!(["fc.weight"]));
    c["target_modules"] = serde_json::json!(["fc"]);
    let both = write_adapter(&env.p("both"), c, &refs(&t));
    let err = fold_fails(&m, &both, &env.p("g.onnx"), &[]);
    assert!(
        err.contains("module 'fc' is targeted both by target_modules and by target_parameters"),
        "{err}"
    );
    let string = write_adapter(
        &env.p("string"),
        cfg("target_parameters", serde_json::json!("fc.weight")),
        &refs(&t),
    );
    let err = fold_fails(&m, &string, &env.p("g.onnx"), &[]);
    assert!(
        err.contains("target_parameters is \"fc.weight\", not a list of parameter names"),
        "{err}"
    );
}

/// DoRA on an embedding has no branch form in onnx-lora: `inject --adapter` refuses it, saying
/// to fold instead, and fold takes it.
#[test]
fn dora_on_an_embedding_is_folded_not_injected() {
    let env = Env::new();
    let model = env.p("tied.onnx");
    let t = vec![
        (
            "embed.lora_embedding_A".to_string(),
            vec![2, 16],
            vec![0.1; 32],
        ),
        (
            "embed.lora_embedding_B".to_string(),
            vec![8, 2],
            vec![0.1; 16],
        ),
        (
            "embed.lora_magnitude_vector".to_string(),
            vec![8],
            vec![1.5; 8],
        ),
    ];
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["embed"], "use_dora": true});
    let ad = write_adapter(&env.p("dora_emb"), cfg, &refs(&t));
    let out = env.p("out.onnx");
    let err = onnx_lora_fails(&inject_args(&model, &ad, &out, &[]), &out);
    assert!(
        err.contains("module 'embed': DoRA embedding branches are not supported; use fold"),
        "{err}"
    );
    fold_ok(&model, &[&ad], &out, &["--quiet"]);
    // What writing the adapter's whole values notes (a bias added to a layer that had none)
    // is said once the output is written: a refusal after it stays one line.
    let mut t = t;
    t.push(("lm_head.bias".to_string(), vec![16], vec![0.5; 16]));
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
        "target_modules": ["embed"], "use_dora": true, "bias": "all"});
    let ad = write_adapter(&env.p("dora_emb_bias"), cfg, &refs(&t));
    let out = env.p("out2.onnx");
    let err = onnx_lora_fails(&inject_args(&model, &ad, &out, &[]), &out);
    assert!(
        err.contains("DoRA embedding branches are not supported"),
        "{err}"
    );
    let o = onnx_lora(&fold_args(&model, &[&ad], &out, &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("had no bias"), "{err}");
}

/// export-peft gives a `target_parameters` module back as one: a branch `inject --adapter`
/// made for a parameter (PEFT's ParamWrapper, which wraps a router or any module with a 2-D
/// weight) is written under `target_parameters` as `<module>.weight`, its pattern keys on that
/// name, beside `target_modules` (an empty list when there are no modules: PEFT would otherwise
/// add its defaults for the model's type and refuse the parameters of those layers); folding
/// the exported adapter gives what folding the original gives. Both branch forms.
#[test]
fn export_peft_gives_target_parameters_back_as_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let model = common::fixtures().join("llama/torchscript/model.onnx");
    let plain = common::fixtures().join("llama/adapters/plain");
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| with_config(&plain, &p(name), f);
    let config = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let q = |l: u8| format!("model.layers.{l}.self_attn.q_proj");
    let v = |l: u8| format!("model.layers.{l}.self_attn.v_proj");
    let params = edit("params", &|c| {
        c["target_modules"] = serde_json::json!([]);
        c["target_parameters"] = serde_json::json!(["q_proj.weight", "v_proj.weight"]);
    });
    // (v_proj by module, q_proj by parameter, q_proj's alpha keyed on the parameter)
    let mixed = edit("mixed", &|c| {
        c["target_modules"] = serde_json::json!(["v_proj"]);
        c["target_parameters"] = serde_json::json!(["q_proj.weight"]);
        c["alpha_pattern"] = serde_json::json!({"q_proj.weight": 16});
    });
    for form in ["branch", "weight"] {
        for (name, adapter) in [("params", &params), ("mixed", &mixed)] {
            let injected = p(&format!("{name}_{form}.onnx"));
            let exported = p(&format!("{name}_{form}_peft"));
            onnx_lora_ok(&[
                "inject",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--form",
                form,
                "-o",
                injected.to_str().unwrap(),
                "--quiet",
            ]);
            onnx_lora_ok(&[
                "export-peft",
                injected.to_str().unwrap(),
                "-o",
                exported.to_str().unwrap(),
            ]);
            let c = config(&exported);
            let strings = |k: &str| -> Vec<String> {
                let mut v: Vec<String> = c[k]
                    .as_array()
                    .unwrap_or_else(|| panic!("{name} {form}: {k} is {}", c[k]))
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect();
                v.sort();
                v
            };
            let weight = |m: String| format!("{m}.weight");
            if name == "params" {
                assert_eq!(strings("target_modules"), Vec::<String>::new(), "{form}");
                assert_eq!(
                    strings("target_parameters"),
                    [weight(q(0)), weight(v(0)), weight(q(1)), weight(v(1))],
                    "{form}"
                );
            } else {
                assert_eq!(strings("target_modules"), [v(0), v(1)], "{form}");
                assert_eq!(
                    strings("target_parameters"),
                    [weight(q(0)), weight(q(1))],
                    "{form}"
                );
                // (q_proj's alpha 16 and v_proj's 8: one is lora_alpha, the other's pattern
                // keys name the parameter for q_proj, the module for v_proj)
                let alphas = c["alpha_pattern"].as_object().unwrap();
                let alpha = |m: &str, key: String| {
                    alphas
                        .get(&key.replace('.', r"\."))
                        .unwrap_or(&c["lora_alpha"])
                        .as_f64()
                        .unwrap_or_else(|| panic!("{form}: {m}: {c}"))
                };
                for l in [0, 1] {
                    assert_eq!(alpha("q", weight(q(l))), 16.0, "{form}: {alphas:?}");
                    assert_eq!(alpha("v", v(l)), 8.0, "{form}: {alphas:?}");
                }
                assert_eq!(alphas.len(), 2, "{form}: {alphas:?}");
            }
            let (a, b) = (p("a.onnx"), p("b.onnx"));
            fold_ok(&model, &[adapter], &a, &["--quiet"]);
            fold_ok(&model, &[&exported], &b, &["--quiet"]);
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{name} {form}: the exported adapter folds otherwise"
            );
        }
    }
}

/// A tensor that declares more values than any adapter of the model could hold in one (four
/// times its largest tensor, at least 16 Mi) is refused before it is decoded, naming it: a
/// sparse file declaring 128 MiB for q_proj's lora_A costs no memory (review32 F1: it was
/// decoded in full before the shapes were checked). PEFT folders and kohya files alike.
#[test]
fn a_tensor_too_large_for_the_model_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("llama/torchscript/model.onnx");
    let n = 2usize << 24;
    // (a safetensors file whose first tensor's data is a hole: the file is sparse)
    let write = |path: &Path, a_key: &str, b_key: &str| {
        let a_bytes = n * 4;
        let header = serde_json::json!({
            a_key: {"dtype": "F32", "shape": [2, n / 2], "data_offsets": [0, a_bytes]},
            b_key: {"dtype": "F32", "shape": [32, 2], "data_offsets": [a_bytes, a_bytes + 256]},
        })
        .to_string();
        let mut h = header.into_bytes();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        std::fs::write(path, &bytes).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len((bytes.len() + a_bytes + 256) as u64).unwrap();
    };
    let peft = dir.path().join("peft");
    std::fs::create_dir(&peft).unwrap();
    write(
        &peft.join("adapter_model.safetensors"),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    );
    std::fs::write(
        peft.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let kohya = dir.path().join("kohya.safetensors");
    write(
        &kohya,
        "lora_unet_model_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_unet_model_layers_0_self_attn_q_proj.lora_up.weight",
    );
    for adapter in [&peft, &kohya] {
        let out = dir.path().join("out.onnx");
        let err = fold_fails(&model, adapter, &out, &[]);
        assert!(
            err.contains("lora_")
                && err.contains(&format!("declares {n} values ([2, {}])", n / 2))
                && err.contains("it fits no layer of the model"),
            "{err}"
        );
    }
}
