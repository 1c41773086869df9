//! Helpers shared by the integration tests: the built binary, the Python with onnx and
//! onnxruntime that `scripts/test.sh` installs, and paths to fixtures.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

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
/// The JSON Lines records of `kind` (`"verdict"`, `"output"`, `"module"`, ...) in a command's
/// stdout; lines that are no JSON object are skipped.
pub fn json_records(stdout: &str, kind: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == kind)
        .collect()
}

/// Runs `onnx-lora verify A B --inputs INPUTS EXTRA...` and asserts its exit code (0: the
/// outputs agree, 1: they differ), with verify's table in the message.
pub fn assert_verify(a: &Path, b: &Path, inputs: &Path, extra: &[&str], code: i32) {
    let (a, b, i) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        inputs.to_str().unwrap(),
    );
    let args: Vec<&str> = ["verify", a, b, "--inputs", i]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let o = onnx_lora(&args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "onnx-lora {args:?}:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

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

/// Runs the binary expecting an error: exit 2, one line on stderr, nothing at `out`. Returns
/// stderr.
pub fn onnx_lora_fails(args: &[&str], out: &Path) -> String {
    let o = onnx_lora(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "onnx-lora {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "onnx-lora {args:?}: {err}");
    assert!(!out.exists(), "onnx-lora {args:?} left {}", out.display());
    err
}

/// Runs the binary; on failure notes `what` with its stderr in `failures` and returns None, so
/// a loop over fixtures can report every failing case at once.
pub fn onnx_lora_or_note(args: &[&str], what: &str, failures: &mut Vec<String>) -> Option<Output> {
    let out = onnx_lora(args);
    if out.status.success() {
        return Some(out);
    }
    failures.push(format!(
        "{what}: onnx-lora {} failed: {}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&out.stderr)
    ));
    None
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

/// One exported model in fixtures/manifest.json, with its PEFT adapters and PEFT's outputs.
#[derive(Clone, Debug)]
pub struct Case {
    pub model: String,
    pub exporter: String,
    pub onnx: PathBuf,
    pub dtype: String,
    pub inputs: PathBuf,
    pub base: PathBuf,
    pub adapters: Vec<AdapterCase>,
    /// kohya cases: the part of a kohya file (`lora_<part>_*`) the model is (`unet`, `te`).
    pub kohya_part: String,
    /// Several of the adapters active at once in PEFT, in order, and its unmerged forward.
    pub combos: Vec<(Vec<String>, PathBuf)>,
}

#[derive(Clone, Debug)]
pub struct AdapterCase {
    pub name: String,
    pub dir: PathBuf,
    /// PEFT's unmerged forward on the case's inputs.
    pub unmerged: PathBuf,
    pub targets: Vec<String>,
    /// Layer kinds targeted: linear, conv1d, conv, embedding.
    pub kinds: Vec<String>,
    pub features: Vec<String>,
    /// The adapter must be refused (base-changing init).
    pub refuse: bool,
    /// kohya files: each target's name in the file (its keys' stem), by module path.
    pub kohya_names: std::collections::BTreeMap<String, String>,
    /// kohya files naming a fused layer (Flux's original q/k/v): each target's share of the
    /// fused lora_up, `[rows, r]`, by module path.
    pub lora_up_shapes: std::collections::BTreeMap<String, Vec<usize>>,
    /// diffusers files: each target's lora_A and lora_B keys in the file, by module path.
    pub file_keys: std::collections::BTreeMap<String, Vec<String>>,
}

impl AdapterCase {
    /// Whether the generator listed `feature` for this adapter.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

impl Case {
    pub fn label(&self) -> String {
        format!("{}/{}", self.model, self.exporter)
    }
    /// Tolerance relative to the output's scale: fp32 1e-4, fp16 4e-3.
    pub fn tol(&self) -> f64 {
        if self.dtype == "float32" { 1e-4 } else { 4e-3 }
    }
}

/// Every case of fixtures/manifest.json (PEFT adapters) and fixtures/kohya_manifest.json
/// (kohya LoRA files on a diffusers UNet), asserting there are some of each.
pub fn cases() -> Vec<Case> {
    let mut all = manifest_cases("manifest.json");
    all.extend(manifest_cases("kohya_manifest.json"));
    all
}

/// The cases of one manifest under fixtures/.
fn manifest_cases(file: &str) -> Vec<Case> {
    let path = fixtures().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (rebuild with fixtures/gen/generate.py and generate_kohya.py)",
            path.display()
        )
    });
    let v: serde_json::Value = serde_json::from_str(&text).expect("manifest.json is JSON");
    let list = v
        .get("cases")
        .or(Some(&v))
        .and_then(|c| c.as_array())
        .expect("a list of cases");
    let f = |x: &serde_json::Value, k: &str| {
        x.get(k).and_then(|s| s.as_str()).unwrap_or("").to_string()
    };
    let strings = |x: &serde_json::Value, k: &str| -> Vec<String> {
        x.get(k)
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let cases: Vec<Case> = list
        .iter()
        .map(|c| Case {
            model: f(c, "model"),
            exporter: f(c, "exporter"),
            onnx: fixtures().join(f(c, "onnx")),
            dtype: f(c, "dtype"),
            inputs: fixtures().join(f(c, "inputs")),
            base: fixtures().join(f(c, "base")),
            kohya_part: f(c, "kohya_part"),
            combos: c
                .get("combos")
                .and_then(|a| a.as_array())
                .map(|a| {
                    a.iter()
                        .map(|x| (strings(x, "adapters"), fixtures().join(f(x, "unmerged"))))
                        .collect()
                })
                .unwrap_or_default(),
            adapters: c
                .get("adapters")
                .and_then(|a| a.as_array())
                .map(|a| {
                    a.iter()
                        .map(|ad| AdapterCase {
                            name: f(ad, "name"),
                            dir: fixtures().join(f(ad, "dir")),
                            unmerged: fixtures().join(f(ad, "unmerged")),
                            targets: strings(ad, "targets"),
                            kinds: strings(ad, "kinds"),
                            features: strings(ad, "features"),
                            refuse: ad.get("refuse").and_then(|r| r.as_bool()).unwrap_or(false),
                            kohya_names: per_target(ad, |v| {
                                Some(v.get("kohya_name")?.as_str()?.to_string())
                            }),
                            file_keys: per_target(ad, |v| {
                                let keys = v.get("file_keys")?.as_array()?;
                                Some(
                                    keys.iter()
                                        .filter_map(|k| k.as_str().map(str::to_string))
                                        .collect(),
                                )
                            }),
                            lora_up_shapes: per_target(ad, |v| {
                                let shape = v.get("lora_up_shape")?.as_array()?;
                                Some(
                                    shape
                                        .iter()
                                        .filter_map(|d| d.as_u64())
                                        .map(|d| d as usize)
                                        .collect(),
                                )
                            }),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    assert!(!cases.is_empty(), "no cases in {}", path.display());
    cases
}

/// The onnxruntime-optimized models of fixtures/manifest.json (`optimized`): packed q/k/v
/// (Attention nodes) and fused embeddings (EmbedLayerNormalization nodes), with the adapters
/// (and PEFT outputs) of the model they were optimized from.
pub fn optimized_cases() -> Vec<(Case, Vec<serde_json::Value>, Vec<serde_json::Value>)> {
    let path = fixtures().join("manifest.json");
    let text = std::fs::read_to_string(&path).expect("manifest.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("manifest.json is JSON");
    let list = v["optimized"].as_array().expect("an `optimized` list");
    let all = cases();
    let out: Vec<(Case, Vec<serde_json::Value>, Vec<serde_json::Value>)> = list
        .iter()
        .map(|o| {
            let model = o["model"].as_str().expect("model");
            let names: Vec<&str> = o["adapters"]
                .as_array()
                .expect("adapters")
                .iter()
                .filter_map(|a| a.as_str())
                .collect();
            let src = all
                .iter()
                .find(|c| c.model == model)
                .expect("the optimized model's source case");
            let case = Case {
                model: model.to_string(),
                exporter: "ort_optimized".into(),
                onnx: fixtures().join(o["onnx"].as_str().expect("onnx")),
                dtype: o["dtype"].as_str().expect("dtype").to_string(),
                inputs: fixtures().join(o["inputs"].as_str().expect("inputs")),
                base: fixtures().join(o["base"].as_str().expect("base")),
                adapters: src
                    .adapters
                    .iter()
                    .filter(|a| names.contains(&a.name.as_str()))
                    .cloned()
                    .collect(),
                kohya_part: String::new(),
                combos: Vec::new(),
            };
            assert_eq!(case.adapters.len(), names.len(), "adapters of {model}");
            let packed = o["packed"].as_array().cloned().unwrap_or_default();
            let fused = o["fused_embeddings"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            (case, packed, fused)
        })
        .collect();
    assert!(!out.is_empty(), "no optimized models in {}", path.display());
    out
}

/// Runs tests/py/ort_compare.py; returns (passed, its one-line report).
pub fn ort_compare(
    model: &Path,
    inputs: &Path,
    expected: &Path,
    tol: f64,
    extra: &[&str],
) -> (bool, String) {
    let out = Command::new(python())
        .arg(root().join("tests/py/ort_compare.py"))
        .args([model, inputs, expected])
        .arg(tol.to_string())
        .args(extra)
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_string())
}

/// Writes a PEFT adapter folder with these float32 tensors (keys without `base_model.model.`).
pub fn write_adapter(
    dir: &Path,
    config: serde_json::Value,
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, s, v)| {
            (
                format!("base_model.model.{k}"),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

/// The arguments of `fold MODEL ADAPTER... -o OUT EXTRA...`.
pub fn fold_args<'a>(
    model: &'a Path,
    adapters: &[&'a Path],
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["fold", model.to_str().unwrap()];
    args.extend(adapters.iter().map(|a| a.to_str().unwrap()));
    args.extend(["-o", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    args
}

/// The arguments of `inject MODEL --adapter ADAPTER -o OUT EXTRA...`.
pub fn inject_args<'a>(
    model: &'a Path,
    adapter: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "inject",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs `fold MODEL ADAPTER... -o OUT EXTRA...` expecting success; returns stdout.
pub fn fold_ok(model: &Path, adapters: &[&Path], out: &Path, extra: &[&str]) -> String {
    onnx_lora_ok(&fold_args(model, adapters, out, extra))
}

/// Runs `fold MODEL ADAPTER -o OUT EXTRA...` expecting failure; returns stderr after checking
/// exit 2, one line, no output and the model file untouched.
pub fn fold_fails(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> String {
    let before = std::fs::read(model).unwrap();
    let o = onnx_lora(&fold_args(model, &[adapter], out, extra));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists(), "no output on error");
    assert_eq!(std::fs::read(model).unwrap(), before, "input untouched");
    err
}

/// Copies a PEFT adapter folder to `dst`, passing each tensor's key and raw bytes to `edit`,
/// which may change the bytes and returns whether to keep the tensor. Returns how many were kept.
pub fn copy_adapter(
    src: &Path,
    dst: &Path,
    mut edit: impl FnMut(&str, &mut Vec<u8>) -> bool,
) -> usize {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dst.join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, v) in st.tensors() {
        let mut data = v.data().to_vec();
        if edit(&k, &mut data) {
            kept.push((k, v.dtype(), v.shape().to_vec(), data));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(k, d, s, b)| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (k.clone(), view)
        })
        .collect();
    std::fs::write(
        dst.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    kept.len()
}

/// An adapter's `per_target` entries (by module path) that `field` reads a value from.
fn per_target<T>(
    ad: &serde_json::Value,
    field: impl Fn(&serde_json::Value) -> Option<T>,
) -> std::collections::BTreeMap<String, T> {
    ad.get("per_target")
        .and_then(|t| t.as_object())
        .map(|t| {
            t.iter()
                .filter_map(|(path, v)| Some((path.clone(), field(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// A float32 tensor's value info `name` with the given dims.
pub fn float_info(name: &str, dims: &[i64]) -> onnx_lora::onnx::pb::ValueInfoProto {
    use onnx_lora::onnx::pb::{
        TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto::Dimension,
        tensor_shape_proto::dimension::Value as DimValue, type_proto,
    };
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(DimValue::DimValue(d)),
                            denotation: None,
                        })
                        .collect(),
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

/// A one-MatMul model `y = x @ W`, x [1, rows], W [rows, cols] float32 inline (`raw`, little
/// endian), the node named `node` and the weight `weight`, written to `path`.
/// A model (IR 8, opset 17) of `graph`.
pub fn model_of(graph: onnx_lora::onnx::pb::GraphProto) -> onnx_lora::onnx::pb::ModelProto {
    onnx_lora::onnx::pb::ModelProto {
        ir_version: Some(8),
        opset_import: vec![onnx_lora::onnx::pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

pub fn write_matmul_model(
    path: &Path,
    node: &str,
    weight: &str,
    rows: i64,
    cols: i64,
    raw: Vec<u8>,
) {
    use onnx_lora::onnx::pb::{GraphProto, NodeProto, TensorProto};
    use prost::Message;
    let m = model_of(GraphProto {
        name: Some("g".into()),
        node: vec![NodeProto {
            input: vec!["x".into(), weight.into()],
            output: vec!["y".into()],
            op_type: Some("MatMul".into()),
            name: Some(node.into()),
            ..Default::default()
        }],
        input: vec![float_info("x", &[1, rows])],
        output: vec![float_info("y", &[1, cols])],
        initializer: vec![TensorProto {
            name: Some(weight.into()),
            dims: vec![rows, cols],
            data_type: Some(1),
            raw_data: Some(raw.into()),
            ..Default::default()
        }],
        ..Default::default()
    });
    std::fs::write(path, m.encode_to_vec()).unwrap();
}
