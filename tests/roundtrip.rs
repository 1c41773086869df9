//! Read -> write without a rewrite reproduces the model: `convert` of the onnx package's
//! backend test models, of every fixture, and of a model using rarely-set fields is
//! protobuf-equal (checked by the `onnx` Python package) in each tensor layout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Converts each model into `out` with `flags`, returning (original, converted) pairs.
fn convert_all(models: &[PathBuf], out: &Path, flags: &[&str]) -> Vec<PathBuf> {
    let mut pairs = Vec::new();
    for (i, m) in models.iter().enumerate() {
        // One folder each: external data files are named the same for every model.
        let sub = out.join(format!("m{i}"));
        std::fs::create_dir(&sub).unwrap();
        let dest = sub.join("model.onnx");
        let mut args = vec!["convert", m.to_str().unwrap(), "-o", dest.to_str().unwrap()];
        args.extend_from_slice(flags);
        onnx_lora_ok(&args);
        pairs.push(m.clone());
        pairs.push(dest);
    }
    pairs
}

fn assert_equal_pairs(pairs: &[PathBuf]) {
    let refs: Vec<&Path> = pairs.iter().map(PathBuf::as_path).collect();
    let out = py("proto_equal.py", &refs);
    assert!(out.contains(" 0 different"), "{out}");
}

#[test]
fn onnx_backend_corpus_round_trips() {
    let models = files_with_ext(&onnx_backend_data(), "onnx");
    assert!(
        models.len() > 100,
        "expected the onnx package's ~150 backend models, found {}",
        models.len()
    );
    for flags in [
        &[][..],
        &["--inline"][..],
        &["--external-data", "w.bin", "--threshold", "0"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let pairs = convert_all(&models, dir.path(), flags);
        assert_equal_pairs(&pairs);
    }
}

#[test]
fn fixtures_round_trip() {
    let models: Vec<PathBuf> = files_with_ext(&fixtures(), "onnx");
    assert!(!models.is_empty(), "no fixture models under fixtures/");
    for flags in [&[][..], &["--inline"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let pairs = convert_all(&models, dir.path(), flags);
        assert_equal_pairs(&pairs);
    }
}

#[test]
fn rarely_set_fields_survive() {
    let dir = tempfile::tempdir().unwrap();
    py("make_rich_model.py", &[dir.path()]);
    let rich = dir.path().join("rich.onnx");
    let mut pairs = Vec::new();
    for (name, flags) in [
        ("auto.onnx", &[][..]),
        ("inline.onnx", &["--inline"][..]),
        ("ext.onnx", &["--external-data", "--threshold", "16"][..]),
    ] {
        let dest = dir.path().join(name);
        let mut args = vec![
            "convert",
            rich.to_str().unwrap(),
            "-o",
            dest.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        onnx_lora_ok(&args);
        pairs.push(rich.clone());
        pairs.push(dest);
    }
    assert_equal_pairs(&pairs);
    // The rich model's fields really are there (the check above would pass on an empty model
    // compared with an empty model).
    let m = onnx_lora::onnx::load(dir.path().join("inline.onnx")).unwrap();
    assert_eq!(m.proto.training_info.len(), 1);
    assert_eq!(m.proto.functions.len(), 1);
    let g = m.proto.graph.as_ref().unwrap();
    assert_eq!(g.sparse_initializer.len(), 1);
    assert_eq!(g.quantization_annotation.len(), 1);
    assert_eq!(m.proto.metadata_props[0].key(), "model_key");
    assert_eq!(g.initializer[0].metadata_props[0].key(), "origin");
}
