//! diffusers LoRA files (no adapter_config.json) as users hold them: in a folder under
//! diffusers' file name, saved by a model's own `save_lora_adapter` (no part prefixes), with
//! parts for other pipeline components (left out and reported) or parts that fit the model
//! alike (refused). (Folds, injects and serving models that match diffusers' own loaders on
//! the fixtures' diffusers_* files: tests/fold.rs, tests/inject.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Copies a safetensors file to `dst` with each key renamed by `rename` (None: left out).
fn rename_keys(src: &Path, dst: &Path, rename: impl Fn(&str) -> Option<String>) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter_map(|(k, v)| Some((rename(&k)?, v)))
        .collect();
    std::fs::write(dst, safetensors::serialize(views, None).unwrap()).unwrap();
    dst.to_path_buf()
}

fn flux() -> PathBuf {
    fixtures().join("flux")
}

fn clip() -> PathBuf {
    fixtures().join("clip_text/torchscript/model.onnx")
}

/// Writes, from the clip_text fixture's diffusers file, a file of its text-encoder part and a
/// `text_encoder_2` copy of those of its keys `second` keeps.
fn two_text_encoder_parts(dir: &Path, second: impl Fn(&str) -> bool) -> PathBuf {
    let src = fixtures().join("clip_text/adapters/diffusers_sd.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for (k, v) in st.tensors() {
        if let Some(rest) = k.strip_prefix("text_encoder.") {
            if second(rest) {
                views.push((format!("text_encoder_2.{rest}"), v.clone()));
            }
            views.push((k.clone(), v));
        }
    }
    let file = dir.join("two.safetensors");
    std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    file
}

/// Runs `fold` expecting success; returns stdout and stderr.
fn fold_reports(args: &[&str]) -> (String, String) {
    let o = onnx_lora(args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{args:?}: {stderr}");
    (String::from_utf8_lossy(&o.stdout).into_owned(), stderr)
}

/// Asserts that `out` computes diffusers' unmerged outputs `io/<reference>.npz` of the
/// fixture `model`.
fn computes(out: &Path, model: &str, reference: &str) {
    let io = fixtures().join(model).join("io");
    let (ok, msg) = ort_compare(
        out,
        &io.join("inputs.npz"),
        &io.join(format!("{reference}.npz")),
        1e-4,
        &[],
    );
    assert!(ok, "{}: {msg}", out.display());
}

/// Folds `adapter` into the Flux fixture (TorchScript export) and compares with diffusers'
/// unmerged outputs of `reference`.
fn folds_as(adapter: &Path, reference: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = flux().join("torchscript/model.onnx");
    let (_, stderr) = fold_reports(&["fold", s(&model), s(adapter), "-o", s(&out)]);
    computes(&out, "flux", reference);
    stderr
}

#[test]
fn a_folder_holding_diffusers_weights_is_read_as_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("lora");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(
        flux().join("adapters/diffusers_plain.safetensors"),
        folder.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    folds_as(&folder, "diffusers_plain");
}

/// A file saved by the transformer's own `save_lora_adapter` has no `transformer.` prefix:
/// diffusers loads it through the model's `load_lora_adapter` with the same config.
#[test]
fn a_file_without_part_prefixes_is_the_models_own() {
    let dir = tempfile::tempdir().unwrap();
    let file = rename_keys(
        &flux().join("adapters/diffusers_plain.safetensors"),
        &dir.path().join("own.safetensors"),
        |k| k.strip_prefix("transformer.").map(str::to_string),
    );
    folds_as(&file, "diffusers_plain");
}

/// On a Flux export the file's `.alpha` keys count, with diffusers' unanchored alpha patterns:
/// a single block's proj_out takes the top-level proj_out's alpha, and that is said.
#[test]
fn flux_alphas_count_as_diffusers_counts_them_and_shadowing_is_said() {
    let stderr = folds_as(
        &flux().join("adapters/diffusers_alpha.safetensors"),
        "diffusers_alpha",
    );
    assert!(
        stderr.contains(
            "'transformer.single_transformer_blocks.0.proj_out.alpha' = 4 takes 8 from pattern 'proj_out'"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("read them only for Flux.1"), "{stderr}");
}

/// The SD file holds a UNet part (older `.lora.down` keys, `.alpha` keys SD's loader ignores)
/// and a text-encoder part: on the UNet the text encoder's part is left out, and the reverse.
#[test]
fn the_part_that_is_the_model_is_taken_and_the_others_reported() {
    let dir = tempfile::tempdir().unwrap();
    for (model, other, n) in [("unet", "text_encoder", 12), ("clip_text", "unet", 48)] {
        let out = dir.path().join(format!("{model}.onnx"));
        let (_, stderr) = fold_reports(&[
            "fold",
            s(&fixtures().join(format!("{model}/torchscript/model.onnx"))),
            s(&fixtures().join(format!("{model}/adapters/diffusers_sd.safetensors"))),
            "-o",
            s(&out),
        ]);
        assert!(
            stderr.contains(&format!(
                "ignoring the file's '{other}' part ({n} module(s))"
            )),
            "{model}: {stderr}"
        );
        assert_eq!(
            stderr.contains("ignoring the .alpha keys of 48 module(s)"),
            model == "unet",
            "{model}: {stderr}"
        );
    }
}

#[test]
fn parts_that_fit_the_model_alike_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = two_text_encoder_parts(dir.path(), |_| true);
    let err = fold_fails(&clip(), &file, &dir.path().join("out.onnx"), &[]);
    assert!(
        err.contains("parts 'text_encoder' and 'text_encoder_2' fit this model alike")
            && err.contains("--part"),
        "{err}"
    );
    // (--part names the one this model is)
    let out = dir.path().join("named.onnx");
    let (_, stderr) = fold_reports(&[
        "fold",
        s(&clip()),
        s(&file),
        "-o",
        s(&out),
        "--part",
        "text_encoder_2",
    ]);
    assert!(
        stderr.contains("ignoring the file's 'text_encoder' part"),
        "{stderr}"
    );
    computes(&out, "clip_text", "diffusers_sd");
    let err = fold_fails(
        &clip(),
        &file,
        &dir.path().join("no.onnx"),
        &["--part", "unet"],
    );
    assert!(
        err.contains(
            "--part unet: the file has no such part (its parts: text_encoder, text_encoder_2)"
        ),
        "{err}"
    );
}

/// A part whose factors do not fit the model's layers is not the model's, however many of its
/// module paths the model has: SDXL's text encoders share their paths, not their widths.
#[test]
fn a_part_whose_factors_do_not_fit_is_not_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("clip_text/adapters/diffusers_sd.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // (text_encoder: layer 0 only; text_encoder_2: both layers, 48 wide where the model is 32)
    let mut wide: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for (k, v) in st.tensors() {
        let Some(rest) = k.strip_prefix("text_encoder.") else {
            continue;
        };
        let shape: Vec<usize> = v
            .shape()
            .iter()
            .map(|&d| if d == 32 { 48 } else { d })
            .collect();
        let n: usize = shape.iter().product();
        wide.push((format!("text_encoder_2.{rest}"), shape, vec![0u8; n * 4]));
        if rest.contains(".layers.0.") {
            views.push((k.clone(), v));
        }
    }
    for (k, shape, data) in &wide {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .unwrap();
        views.push((k.clone(), view));
    }
    let file = dir.path().join("wide.safetensors");
    std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    let out = dir.path().join("out.onnx");
    let (stdout, stderr) = fold_reports(&["fold", s(&clip()), s(&file), "-o", s(&out), "--json"]);
    assert!(
        stderr.contains("ignoring the file's 'text_encoder_2' part (12 module(s))"),
        "{stderr}"
    );
    let records = json_records(&stdout, "module");
    assert_eq!(records.len(), 6);
    assert!(records.iter().all(|r| {
        r["module"]
            .as_str()
            .unwrap()
            .starts_with("encoder.layers.0.")
    }));
}

/// A PEFT adapter's weights without their config stay refused: their scale is in the config.
#[test]
fn peft_keys_without_adapter_config_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = rename_keys(
        &flux().join("adapters/diffusers_plain.safetensors"),
        &dir.path().join("peft.safetensors"),
        |k| {
            Some(format!(
                "base_model.model.{}",
                k.strip_prefix("transformer.")?
            ))
        },
    );
    let err = fold_fails(
        &flux().join("torchscript/model.onnx"),
        &file,
        &dir.path().join("out.onnx"),
        &[],
    );
    assert!(err.contains("nor a PEFT adapter's weights (no "), "{err}");
}

/// The scale of every module record of a fold's `--json` output.
fn scales(stdout: &str) -> Vec<f64> {
    json_records(stdout, "module")
        .iter()
        .map(|r| r["scale"].as_f64().unwrap())
        .collect()
}

/// diffusers loads a file without part prefixes only through a model's own
/// `load_lora_adapter`, which reads no alphas: its `.alpha` keys are left out (every scale 1,
/// with a warning) unless `--alpha-keys read` says they count, which gives the Flux loader's
/// result on the same factors.
#[test]
fn alpha_keys_of_a_file_without_parts_count_only_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let file = rename_keys(
        &flux().join("adapters/diffusers_alpha.safetensors"),
        &dir.path().join("own.safetensors"),
        |k| k.strip_prefix("transformer.").map(str::to_string),
    );
    let model = flux().join("torchscript/model.onnx");
    let out = dir.path().join("out.onnx");
    let (stdout, stderr) = fold_reports(&["fold", s(&model), s(&file), "-o", s(&out), "--json"]);
    assert!(stderr.contains("which reads no alphas"), "{stderr}");
    let got = scales(&stdout);
    assert!(got.len() == 36 && got.iter().all(|s| *s == 1.0), "{got:?}");
    fold_reports(&[
        "fold",
        s(&model),
        s(&file),
        "-o",
        s(&out),
        "--alpha-keys",
        "read",
    ]);
    computes(&out, "flux", "diffusers_alpha");
}

/// `--alpha-keys ignore` leaves a Flux file's alphas out (every scale 1: diffusers' scale
/// without alphas); with no diffusers file among the adapters the flag is refused.
#[test]
fn alpha_keys_ignore_and_where_the_flag_does_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let model = flux().join("torchscript/model.onnx");
    let out = dir.path().join("out.onnx");
    let stdout = onnx_lora_ok(&[
        "fold",
        s(&model),
        s(&flux().join("adapters/diffusers_alpha.safetensors")),
        "-o",
        s(&out),
        "--alpha-keys",
        "ignore",
        "--json",
    ]);
    let got = scales(&stdout);
    assert!(got.len() == 36 && got.iter().all(|s| *s == 1.0), "{got:?}");
    let err = onnx_lora_fails(
        &[
            "fold",
            s(&model),
            s(&flux().join("adapters/bfl.safetensors")),
            "-o",
            s(&dir.path().join("no.onnx")),
            "--alpha-keys",
            "read",
        ],
        &dir.path().join("no.onnx"),
    );
    assert!(
        err.contains("--alpha-keys read applies to diffusers LoRA files"),
        "{err}"
    );
}

/// Of two text-encoder parts on the same module paths (SDXL's text_encoder and
/// text_encoder_2), the model takes the one it has more modules of among those it lacks none
/// of: here the part holding both layers of the CLIP export, not the one holding layer 0.
#[test]
fn the_part_with_more_of_the_models_modules_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = two_text_encoder_parts(dir.path(), |k| k.contains(".layers.0."));
    let out = dir.path().join("out.onnx");
    let (_, stderr) = fold_reports(&["fold", s(&clip()), s(&file), "-o", s(&out)]);
    assert!(
        stderr.contains("ignoring the file's 'text_encoder_2' part (6 module(s))"),
        "{stderr}"
    );
    computes(&out, "clip_text", "diffusers_sd");
}

/// Metadata keys PEFT 0.21.2's LoraConfig does not have (a newer PEFT's) are left out with a
/// warning that says diffusers 0.42 with PEFT 0.21.2 refuses such a file; the rest of the
/// metadata configures the part as before.
#[test]
fn metadata_keys_peft_does_not_have_are_left_out_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let src = flux().join("adapters/diffusers_meta.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap();
    config.insert(
        "transformer.future_variant_config".into(),
        serde_json::json!({"k": 2}),
    );
    meta.insert(
        "lora_adapter_metadata".into(),
        serde_json::to_string(&config).unwrap(),
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let file = dir.path().join("newer.safetensors");
    std::fs::write(
        &file,
        safetensors::serialize(st.tensors(), Some(meta)).unwrap(),
    )
    .unwrap();
    let stderr = folds_as(&file, "diffusers_meta");
    assert!(
        stderr.contains("ignoring the config key(s) PEFT 0.21.2's LoraConfig does not have ('future_variant_config') in its lora_adapter_metadata: diffusers 0.42 with PEFT 0.21.2 refuses"),
        "{stderr}"
    );
    // The committed file, all of whose keys PEFT has, gets no such warning.
    let stderr = folds_as(&src, "diffusers_meta");
    assert!(!stderr.contains("does not have"), "{stderr}");
}
