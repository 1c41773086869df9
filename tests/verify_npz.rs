//! The npz reader against files numpy wrote (tests/data/npz, made by make_npz.py there: one
//! per dtype, stored and deflated, .npy and .npz, Fortran order, big endian), and the writer
//! against numpy reading what it wrote.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use onnx_lora::onnx::DataType;
use onnx_lora::verify::ArrayData;
use onnx_lora::verify::npz::{read_arrays, write_npz};
use serde_json::Value;

fn npz_dir() -> std::path::PathBuf {
    root().join("tests/data/npz")
}

/// Asserts that `arr` is what numpy described (dtype name, shape, values in C order).
fn assert_described(what: &str, arr: &ArrayData, want: &Value) {
    assert_eq!(
        arr.dtype.name(),
        want["dtype"].as_str().unwrap(),
        "{what}: dtype"
    );
    let shape: Vec<usize> = want["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(arr.shape, shape, "{what}: shape");
    let values: Vec<f64> = arr.values().unwrap().collect();
    let want: Vec<f64> = want["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(values, want, "{what}: values");
}

#[test]
fn reads_what_numpy_wrote() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(npz_dir().join("expected.json")).unwrap())
            .unwrap();
    let files = expected.as_object().unwrap();
    assert!(files.len() >= 8, "{files:?}");
    for (file, arrays) in files {
        let got = read_arrays(&npz_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let want = arrays.as_object().unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        let mut want_names: Vec<&str> = want.keys().map(String::as_str).collect();
        let mut sorted = names.clone();
        sorted.sort();
        want_names.sort();
        assert_eq!(sorted, want_names, "{file}: names");
        for (name, arr) in &got {
            assert_described(&format!("{file}:{name}"), arr, &want[name]);
        }
    }
}

#[test]
fn bf16_stored_as_uint16_reads_as_bf16() {
    let got = read_arrays(&npz_dir().join("bf16.npz")).unwrap();
    let w = got[0].1.cast(DataType::Bfloat16).unwrap();
    assert_eq!(w.dtype, DataType::Bfloat16);
    assert_eq!(
        w.values().unwrap().collect::<Vec<_>>(),
        vec![1.0, -2.5, 0.15625, 3072.0]
    );
}

#[test]
fn numpy_reads_what_we_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.npz");
    let vals = [1.5, -2.0, 0.0, 3.0, 255.0, 7.0];
    let mut arrays = Vec::new();
    for (name, dt) in [
        ("f32", DataType::Float),
        ("f16", DataType::Float16),
        ("f64", DataType::Double),
        ("i64", DataType::Int64),
        ("i32", DataType::Int32),
        ("u8", DataType::Uint8),
        ("b", DataType::Bool),
    ] {
        arrays.push((
            name.to_string(),
            ArrayData::from_f64(dt, vec![2, 3], &vals).unwrap(),
        ));
    }
    arrays.push((
        "bf16".into(),
        ArrayData::from_f64(DataType::Bfloat16, vec![6], &vals).unwrap(),
    ));
    arrays.push((
        "scalar".into(),
        ArrayData::from_f64(DataType::Float, vec![], &[4.0]).unwrap(),
    ));
    arrays.push((
        "empty".into(),
        ArrayData::from_f64(DataType::Int64, vec![0, 2], &[]).unwrap(),
    ));
    write_npz(&path, &arrays).unwrap();
    let described: Value = serde_json::from_str(&py("npz_describe.py", &[path.as_path()])).unwrap();
    for (name, arr) in &arrays {
        // numpy has no bfloat16: the writer stores its bits as uint16.
        let arr = if arr.dtype == DataType::Bfloat16 {
            ArrayData {
                dtype: DataType::Uint16,
                ..arr.clone()
            }
        } else {
            arr.clone()
        };
        assert_described(name, &arr, &described[name]);
    }
    // And our reader reads it back unchanged.
    let back = read_arrays(Path::new(&path)).unwrap();
    assert_eq!(back.len(), arrays.len());
    assert_eq!(back[0], arrays[0]);
}
