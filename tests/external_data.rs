//! External data: what we write is page-aligned, one file, only location/offset/length keys,
//! and onnxruntime loads it; references that leave the model's folder, in-memory addresses and
//! out-of-range offsets are refused with one line naming the tensor, and nothing is written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use bytes::Bytes;
use common::*;
use onnx_lora::onnx::pb::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    tensor_proto::DataLocation,
};
use prost::Message;

/// A one-MatMul model `y = x @ W` with W [4, 3] float32.
fn matmul_model(w: TensorProto) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: vec![onnx_lora::onnx::pb::NodeProto {
                input: vec!["x".into(), "W".into()],
                output: vec!["y".into()],
                op_type: Some("MatMul".into()),
                name: Some("/fc/MatMul".into()),
                ..Default::default()
            }],
            initializer: vec![w],
            input: vec![float_info("x", &[2, 4])],
            output: vec![float_info("y", &[2, 3])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The bytes of W [4, 3] float32: 0, 1, ..., 11.
fn weight_bytes() -> Vec<u8> {
    (0..12u32).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

/// W [4, 3] float32 inline (raw_data).
fn inline_weight() -> TensorProto {
    TensorProto {
        name: Some("W".into()),
        dims: vec![4, 3],
        data_type: Some(1),
        raw_data: Some(weight_bytes().into()),
        ..Default::default()
    }
}

fn external_weight(location: &str, offset: u64, length: u64) -> TensorProto {
    let e = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    TensorProto {
        name: Some("W".into()),
        dims: vec![4, 3],
        data_type: Some(1),
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            e("location", location.into()),
            e("offset", offset.to_string()),
            e("length", length.to_string()),
        ],
        ..Default::default()
    }
}

fn write_model(dir: &Path, name: &str, m: &ModelProto) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

#[test]
fn written_external_data_is_aligned_and_loads_in_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    // Two weights' worth of data in one file, at unaligned offsets, like onnx's Python writer.
    let data: Vec<u8> = (0..24u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    std::fs::write(dir.path().join("in.bin"), &data).unwrap();
    let src = write_model(
        dir.path(),
        "in.onnx",
        &matmul_model(external_weight("in.bin", 48, 48)),
    );
    let out = dir.path().join("out.onnx");
    onnx_lora_ok(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--external-data",
        "--threshold",
        "0",
    ]);
    let m = onnx_lora::onnx::load(&out).unwrap();
    let w = &m.proto.graph.as_ref().unwrap().initializer[0];
    let keys: Vec<&str> = w.external_data.iter().map(|e| e.key()).collect();
    assert_eq!(keys, ["location", "offset", "length"]);
    assert_eq!(w.external_data[0].value(), "out.onnx.data");
    let offset: u64 = w.external_data[1].value().parse().unwrap();
    assert_eq!(offset % 4096, 0);
    // The bytes are the second half of in.bin.
    assert_eq!(
        m.tensor_bytes(w).unwrap(),
        Bytes::copy_from_slice(&data[48..])
    );
    py("ort_run.py", &[&src, &out]);
}

#[test]
fn large_tensors_go_external_small_stay_inline() {
    let dir = tempfile::tempdir().unwrap();
    let w = inline_weight();
    let src = write_model(dir.path(), "in.onnx", &matmul_model(w));
    let out = dir.path().join("a.onnx");
    // 48 bytes: under the default 1 KiB threshold, so it stays inline and no data file appears.
    onnx_lora_ok(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--external-data",
    ]);
    assert!(!dir.path().join("a.onnx.data").exists());
    let out2 = dir.path().join("b.onnx");
    onnx_lora_ok(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
        "--external-data",
        "x.bin",
        "--threshold",
        "48",
    ]);
    assert!(dir.path().join("x.bin").exists());
    py("ort_run.py", &[&src, &out2]);
}

fn assert_refused(location: &str, offset: u64, length: u64, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), vec![0u8; 48]).unwrap();
    let src = write_model(
        dir.path(),
        "bad.onnx",
        &matmul_model(external_weight(location, offset, length)),
    );
    let out = dir.path().join("out.onnx");
    let o = onnx_lora(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("tensor 'W'") && err.contains(expect), "{err}");
    assert!(err.contains("bad.onnx"), "names the file: {err}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".onnx-lora-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn bad_locations_are_refused() {
    assert_refused("../w.bin", 0, 48, "leaves the model's folder");
    assert_refused("sub/../../w.bin", 0, 48, "leaves the model's folder");
    assert_refused("/etc/passwd", 0, 48, "absolute");
    assert_refused("*/_ORT_MEM_ADDR_/*", 0, 48, "in-memory address");
    assert_refused("w.bin", 4, 48, "outside");
    assert_refused("w.bin", 0, 40, "needs 48");
    assert_refused("missing.bin", 0, 48, "cannot open");
}

/// A data file that links to outside the model's folder is refused, as onnxruntime refuses
/// it: a planted link would copy any file into the output. The Hugging Face cache's layout (the
/// model and its data both links into one blobs folder) and links inside the folder are read.
#[test]
fn data_links_may_not_leave_the_models_folder() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let folder = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let (blobs, snap, planted) = (folder("blobs"), folder("snap"), folder("planted"));
    std::fs::write(blobs.join("w.bin"), weight_bytes()).unwrap();
    let model = matmul_model(external_weight("w.bin", 0, 48));
    let blob_model = write_model(&blobs, "m.onnx", &model);
    symlink(&blob_model, snap.join("m.onnx")).unwrap();
    symlink(blobs.join("w.bin"), snap.join("w.bin")).unwrap();
    let out = dir.path().join("out.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let convert = |m: &Path| onnx_lora(&["convert", &s(m), "-o", &s(&out)]);
    let o = convert(&snap.join("m.onnx"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // a regular model file whose data file links out of its folder
    let m = write_model(&planted, "m.onnx", &model);
    symlink(blobs.join("w.bin"), planted.join("w.bin")).unwrap();
    std::fs::remove_file(&out).unwrap();
    for o in [convert(&m), onnx_lora(&["inspect", &s(&m)])] {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("tensor 'W'") && err.contains("outside the model's folder"),
            "{err}"
        );
    }
    assert!(!out.exists());
    // a link that stays inside the folder is followed
    std::fs::remove_file(planted.join("w.bin")).unwrap();
    std::fs::write(planted.join("real.bin"), weight_bytes()).unwrap();
    symlink(planted.join("real.bin"), planted.join("w.bin")).unwrap();
    let o = convert(&m);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn output_never_overwrites_input() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), vec![0u8; 48]).unwrap();
    let src = write_model(
        dir.path(),
        "m.onnx",
        &matmul_model(external_weight("w.bin", 0, 48)),
    );
    let before = std::fs::read(&src).unwrap();
    let o = onnx_lora(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        src.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("overwrite the input"));
    assert_eq!(std::fs::read(&src).unwrap(), before);
}

#[test]
fn garbage_input_is_one_line_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk.onnx");
    std::fs::write(&p, b"\xff\xff\xff\xff not a model").unwrap();
    let o = onnx_lora(&["inspect", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("junk.onnx") && err.contains("not a valid ONNX model"),
        "{err}"
    );
    let o = onnx_lora(&["inspect", "/nonexistent/model.onnx"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model.onnx"));
}

#[test]
fn weights_go_external_automatically_past_the_protobuf_limit() {
    // The real limit is 2 GiB; the same decision is exercised with a limit below this model.
    let dir = tempfile::tempdir().unwrap();
    let raw = weight_bytes();
    let w = inline_weight();
    // An extra 4 KiB initializer, so going external saves more than the references cost.
    let mut m = matmul_model(w);
    let big: Vec<u8> = (0..1024u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    m.graph.as_mut().unwrap().initializer.push(TensorProto {
        name: Some("big".into()),
        dims: vec![1024],
        data_type: Some(1),
        raw_data: Some(big.clone().into()),
        ..Default::default()
    });
    let src = write_model(dir.path(), "in.onnx", &m);
    let model = onnx_lora::onnx::load(&src).unwrap();
    // Under the limit, Auto keeps an inline model inline...
    let fits = dir.path().join("fits.onnx");
    let r = onnx_lora::onnx::save(&model, &fits, &onnx_lora::onnx::SaveOptions::default()).unwrap();
    assert!(r.external_data.is_none());
    // ...and with a limit below its inline size, the large tensor goes external.
    let limit = r.model_bytes - 1000;
    let small = |layout| onnx_lora::onnx::SaveOptions {
        layout,
        threshold: 16,
        protobuf_limit: limit,
        ..Default::default()
    };
    // ...over it, the large tensors go external.
    let auto = dir.path().join("auto.onnx");
    let r =
        onnx_lora::onnx::save(&model, &auto, &small(onnx_lora::onnx::TensorLayout::Auto)).unwrap();
    assert_eq!(r.external_data, Some(dir.path().join("auto.onnx.data")));
    assert!(r.model_bytes <= limit);
    let back = onnx_lora::onnx::load(&auto).unwrap();
    let inits = &back.proto.graph.as_ref().unwrap().initializer;
    assert_eq!(back.tensor_bytes(&inits[0]).unwrap(), Bytes::from(raw));
    assert!(inits[1].external_data.iter().any(|e| e.key() == "location"));
    assert_eq!(back.tensor_bytes(&inits[1]).unwrap(), Bytes::from(big));
    // Forcing inline past the limit is refused, and nothing is left behind.
    let inline = dir.path().join("inline.onnx");
    let e = onnx_lora::onnx::save(
        &model,
        &inline,
        &small(onnx_lora::onnx::TensorLayout::Inline),
    )
    .unwrap_err();
    assert!(e.to_string().contains("over the protobuf limit"), "{e}");
    assert!(!inline.exists());
    py("ort_run.py", &[&src, &auto]);
}

/// Large untouched tensors are copied file to file (`copy_file_range` on Linux) from the
/// `.onnx` file itself and from an external data file at an unaligned offset; the copies are
/// byte-exact and aligned in the output, and come from the files that were loaded even when a
/// path has been replaced since.
#[test]
fn large_untouched_tensors_copy_exactly_from_every_source_file() {
    let dir = tempfile::tempdir().unwrap();
    let n = 600 * 1024; // 2.4 MB per tensor, over the copy threshold
    let values = |seed: u32| -> Vec<u8> {
        (0..n as u32)
            .flat_map(|i| ((i.wrapping_mul(2654435761) ^ seed) as f32).to_le_bytes())
            .collect()
    };
    let (inline_raw, ext_raw) = (values(1), values(2));
    // The external tensor sits 100 bytes into its file, after some unrelated bytes.
    let mut data = vec![7u8; 100];
    data.extend_from_slice(&ext_raw);
    std::fs::write(dir.path().join("w.bin"), &data).unwrap();
    let mut ext = external_weight("w.bin", 100, ext_raw.len() as u64);
    ext.name = Some("ext".into());
    ext.dims = vec![n as i64];
    let w = TensorProto {
        name: Some("W".into()),
        dims: vec![4, 3],
        data_type: Some(1),
        raw_data: Some(
            (0..12u32)
                .flat_map(|i| (i as f32).to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        ..Default::default()
    };
    let mut m = matmul_model(w);
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(TensorProto {
        name: Some("inline".into()),
        dims: vec![n as i64],
        data_type: Some(1),
        raw_data: Some(inline_raw.clone().into()),
        ..Default::default()
    });
    g.initializer.push(ext);
    let src = write_model(dir.path(), "in.onnx", &m);
    let model = onnx_lora::onnx::load(&src).unwrap();
    // The data file is replaced (a new inode at the same path) after loading: what is written
    // is what was loaded, not what the path holds now.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, vec![9u8; data.len()]).unwrap();
    std::fs::rename(&other, dir.path().join("w.bin")).unwrap();
    let out = dir.path().join("out.onnx");
    let opts = onnx_lora::onnx::SaveOptions {
        layout: onnx_lora::onnx::TensorLayout::External { name: None },
        ..Default::default()
    };
    let r = onnx_lora::onnx::save(&model, &out, &opts).unwrap();
    assert_eq!(r.external_tensors, 2);
    let back = onnx_lora::onnx::load(&out).unwrap();
    let inits = &back.proto.graph.as_ref().unwrap().initializer;
    for (t, expect) in inits[1..].iter().zip([&inline_raw, &ext_raw]) {
        let offset: u64 = t
            .external_data
            .iter()
            .find(|e| e.key() == "offset")
            .unwrap()
            .value()
            .parse()
            .unwrap();
        assert_eq!(offset % 4096, 0);
        assert_eq!(back.tensor_bytes(t).unwrap(), Bytes::from(expect.clone()));
    }
}

/// A weight in a typed field (`float_data`, as `onnx.helper.make_tensor` writes without
/// `raw=True`) goes external like a `raw_data` one, with the same values; inline output keeps
/// the typed field as it was.
#[test]
fn typed_field_tensors_go_external_with_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let typed = TensorProto {
        name: Some("W".into()),
        dims: vec![4, 3],
        data_type: Some(1),
        float_data: (0..12).map(|i| i as f32 * 0.5 - 2.0).collect(),
        ..Default::default()
    };
    let src = write_model(dir.path(), "typed.onnx", &matmul_model(typed.clone()));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = dir.path().join("ext.onnx");
    onnx_lora_ok(&[
        "convert",
        &s(&src),
        "-o",
        &s(&out),
        "--external-data",
        "--threshold",
        "0",
    ]);
    let m = onnx_lora::onnx::load(&out).unwrap();
    let w = &m.proto.graph.as_ref().unwrap().initializer[0];
    assert!(w.float_data.is_empty() && w.raw_data.is_none(), "{w:?}");
    assert_eq!(w.external_data[0].value(), "ext.onnx.data");
    let want: Vec<u8> = typed
        .float_data
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(m.tensor_bytes(w).unwrap(), Bytes::from(want));
    py("ort_run.py", &[&src, &out]);
    // Inline, the typed field stays as it was.
    let again = dir.path().join("again.onnx");
    onnx_lora_ok(&["convert", &s(&src), "-o", &s(&again)]);
    let m = onnx_lora::onnx::load(&again).unwrap();
    assert_eq!(m.proto.graph.as_ref().unwrap().initializer[0], typed);
}

/// The progress total counts only what goes external: a 4-bit tensor in typed fields, which
/// stays inline, is not in it, so the bar ends at its total.
#[test]
fn progress_ends_at_its_total_when_a_typed_tensor_stays_inline() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = matmul_model(TensorProto {
        float_data: (0..12).map(|i| i as f32).collect(),
        raw_data: None,
        ..inline_weight()
    });
    let int4 = TensorProto {
        name: Some("packed".into()),
        dims: vec![64],
        data_type: Some(22), // INT4, two per int32_data entry
        int32_data: vec![0x21; 32],
        ..Default::default()
    };
    m.graph.as_mut().unwrap().initializer.push(int4.clone());
    let src = write_model(dir.path(), "in.onnx", &m);
    let model = onnx_lora::onnx::load(&src).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let opts = onnx_lora::onnx::io::SaveOptions {
        layout: onnx_lora::onnx::io::TensorLayout::External { name: None },
        threshold: 0,
        progress: Some(onnx_lora::onnx::io::Progress(std::sync::Arc::new(
            move |done, total| log.lock().unwrap().push((done, total)),
        ))),
        ..Default::default()
    };
    let out = dir.path().join("out.onnx");
    let report = onnx_lora::onnx::save(&model, &out, &opts).unwrap();
    assert_eq!(report.external_tensors, 1);
    assert_eq!(*seen.lock().unwrap(), vec![(48, 48)]);
    let written = onnx_lora::onnx::load(&out).unwrap();
    assert_eq!(written.proto.graph.as_ref().unwrap().initializer[1], int4);
}

/// `--threshold 0` moves every float tensor out but keeps the small int64 shape / axes
/// constants inline, which onnxruntime's shape inference must read: the model still runs.
#[test]
fn threshold_zero_keeps_shape_constants_inline() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama/dynamo/model.onnx");
    let out = dir.path().join("t0.onnx");
    onnx_lora_ok(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--external-data",
        "--threshold",
        "0",
    ]);
    let back = onnx_lora::onnx::load(&out).unwrap();
    let inits = &back.proto.graph.as_ref().unwrap().initializer;
    let ext = |t: &TensorProto| t.external_data.iter().any(|e| e.key() == "location");
    assert!(
        inits.iter().filter(|t| t.data_type() == 7).all(|t| !ext(t)),
        "int64 tensors stay inline"
    );
    assert!(
        inits.iter().any(|t| t.data_type() == 7),
        "the model has int64 initializers"
    );
    assert!(
        inits.iter().filter(|t| t.data_type() == 1).all(ext),
        "every float tensor goes out at threshold 0"
    );
    py("ort_run.py", &[&src, &out]);
}

/// Runs onnx-lora expecting exit 2 with one line containing `expect`; returns stderr.
fn fails_with(args: &[&str], expect: &str) -> String {
    let o = onnx_lora(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(expect),
        "{args:?}: expected '{expect}' in: {err}"
    );
    err
}

#[test]
fn outputs_never_replace_any_input_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), weight_bytes()).unwrap();
    let src = write_model(
        dir.path(),
        "m.onnx",
        &matmul_model(external_weight("w.bin", 0, 48)),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let other = dir.path().join("other.onnx");
    let data = dir.path().join("w.bin");
    let before: Vec<Vec<u8>> = [&src, &data]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        names
    };
    let files = listing();
    // The output's data file named like the input's data file.
    fails_with(
        &[
            "convert",
            &s(&src),
            "-o",
            &s(&other),
            "--external-data",
            "w.bin",
        ],
        "overwrite the input",
    );
    // The output itself over the input's data file.
    fails_with(
        &["convert", &s(&src), "-o", &s(&data), "--inline"],
        "overwrite the input",
    );
    // The data file named like the output.
    fails_with(
        &[
            "convert",
            &s(&src),
            "-o",
            &s(&other),
            "--external-data",
            "other.onnx",
        ],
        "one file",
    );
    // A folder as the output, and a folder that does not exist.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    fails_with(
        &["convert", &s(&src), "-o", &s(&dir.path().join("sub"))],
        "is a folder",
    );
    fails_with(
        &[
            "convert",
            &s(&src),
            "-o",
            &s(&dir.path().join("nodir/x.onnx")),
        ],
        "does not exist",
    );
    // A file where the folder should be; an external data name that leaves the folder.
    fails_with(
        &["convert", &s(&src), "-o", &s(&src.join("x.onnx"))],
        "is not a folder",
    );
    for name in ["../esc.data", "/tmp/esc.data"] {
        fails_with(
            &[
                "convert",
                &s(&src),
                "-o",
                &s(&dir.path().join("o.onnx")),
                "--external-data",
                name,
            ],
            "o.onnx: external data name refused: location",
        );
    }
    std::fs::remove_dir(dir.path().join("sub")).unwrap();
    assert_eq!(listing(), files, "nothing written");
    for (p, b) in [&src, &data].iter().zip(&before) {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} untouched", p.display());
    }
}

#[test]
fn inline_tensors_must_hold_what_their_shape_needs() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = dir.path().join("out.onnx");
    let cases: [(&str, TensorProto); 4] = [
        (
            "holds 40 bytes of raw data",
            TensorProto {
                raw_data: Some(vec![0u8; 40].into()),
                ..external_weight("x", 0, 0)
            },
        ),
        (
            "holds 96 bytes of raw data",
            TensorProto {
                raw_data: Some(vec![0u8; 96].into()),
                ..external_weight("x", 0, 0)
            },
        ),
        (
            "holds 11 values",
            TensorProto {
                float_data: vec![0.0; 11],
                ..external_weight("x", 0, 0)
            },
        ),
        (
            "too large",
            TensorProto {
                dims: vec![1 << 40, 1 << 40],
                raw_data: Some(vec![0u8; 48].into()),
                ..external_weight("x", 0, 0)
            },
        ),
    ];
    for (expect, mut w) in cases {
        w.data_location = None;
        w.external_data.clear();
        let m = write_model(dir.path(), "m.onnx", &matmul_model(w));
        for cmd in ["inspect", "convert"] {
            let mut args = vec![cmd.to_string(), s(&m)];
            if cmd == "convert" {
                args.extend(["-o".into(), s(&out)]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let err = fails_with(&args, expect);
            assert!(
                err.contains("m.onnx") && err.contains("tensor 'W'"),
                "{err}"
            );
            assert!(!out.exists());
        }
    }
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    fails_with(&["inspect", &s(&empty)], "it has no graph");
    fails_with(&["convert", &s(&empty), "-o", &s(&out)], "it has no graph");
    assert!(!out.exists());
}

/// A field this schema does not define (a newer ONNX's) cannot be kept by a rewrite: the run
/// says so on stderr and still writes the fields it knows.
#[test]
fn unknown_fields_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let w = inline_weight();
    let mut bytes = matmul_model(w).encode_to_vec();
    let known = write_model(
        dir.path(),
        "known.onnx",
        &ModelProto::decode(&bytes[..]).unwrap(),
    );
    bytes.extend_from_slice(&[0x98, 0x06, 0x01]); // field 99, varint 1
    let p = dir.path().join("newer.onnx");
    std::fs::write(&p, &bytes).unwrap();
    let out = dir.path().join("out.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = onnx_lora(&["convert", &s(&p), "-o", &s(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("newer.onnx: 3 bytes of the file are not fields"),
        "{err}"
    );
    let o = onnx_lora(&["convert", &s(&known), "-o", &s(&out)]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
    // A run that fails says only its error, on one line (nothing was written to warn about).
    let bad = dir.path().join("adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("adapter_config.json"), "{").unwrap();
    std::fs::write(bad.join("adapter_model.safetensors"), b"").unwrap();
    let out2 = dir.path().join("out2.onnx");
    let o = onnx_lora(&["fold", &s(&p), &s(&bad), "-o", &s(&out2)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("adapter_config.json") && !err.contains("warning"),
        "{err}"
    );
    assert!(!out2.exists());
}

/// Rewriting an output inline where an earlier run wrote `<output>.data`: the old data file is
/// not this run's to delete, so it stays, and the run says it is unused (stderr, and JSON).
#[test]
fn an_earlier_data_file_left_unused_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = write_model(dir.path(), "in.onnx", &matmul_model(inline_weight()));
    let (src, out) = (src.to_str().unwrap(), dir.path().join("out.onnx"));
    let out = out.to_str().unwrap();
    let data = dir.path().join("out.onnx.data");
    let convert = |extra: &[&str]| {
        let mut args = vec!["convert", src, "-o", out];
        args.extend(extra);
        onnx_lora(&args)
    };
    let first = convert(&["--external-data", "--threshold", "0"]);
    assert!(first.status.success());
    assert!(!String::from_utf8_lossy(&first.stderr).contains("note:"));
    let second = convert(&["--inline"]);
    assert!(second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!(
            "note: {} is left from an earlier output",
            data.display()
        )),
        "{stderr}"
    );
    assert!(data.exists(), "the earlier data file is not removed");
    let json = convert(&["--inline", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["stale_data"], serde_json::json!(data));
    // Written with its data again, the file is in use: no note.
    let third = convert(&["--external-data", "--threshold", "0"]);
    assert!(!String::from_utf8_lossy(&third.stderr).contains("note:"));
    py("ort_run.py", &[Path::new(src), Path::new(out)]);
}

/// A model and its external data are put in place under an exclusive lock on the output folder
/// (`flock`): a run writing the same output at the same moment places its pair before or after,
/// never one's model beside the other's data. Here the test holds the lock: the run says it
/// waits for it, with both files written, and finishes once it is released.
#[cfg(target_os = "linux")]
#[test]
fn a_model_and_its_data_are_put_in_place_under_a_folder_lock() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("m.onnx");
    let held = std::fs::File::open(&out_dir).unwrap();
    // SAFETY: a descriptor `held` owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    let model = fixtures().join("llama/dynamo/model.onnx");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
        .args([
            "convert",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .args(["--external-data", "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A waiter on a lock shows in /proc/locks as "N: -> FLOCK ADVISORY WRITE <pid> ...".
    let waiting = |pid: u32| {
        std::fs::read_to_string("/proc/locks")
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&"->")
                    && f.get(2) == Some(&"FLOCK")
                    && f.get(5) == Some(&pid.to_string().as_str())
            })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !waiting(child.id()) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished while the folder was locked"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the run never waited for the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(!out.exists() && !out_dir.join("m.onnx.data").exists());
    drop(held);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("note: waiting for another process's lock on"),
        "{err}"
    );
    assert!(out.exists() && out_dir.join("m.onnx.data").exists());
    onnx_lora::onnx::load(&out).unwrap();
}

/// Layout flags that change nothing say so: `--threshold` on an output written inline, and
/// `--external-data` with a threshold no tensor reaches (no data file is written).
#[test]
fn layout_flags_without_effect_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    let inline = fixtures().join("llama/torchscript/model.onnx");
    let out = dir.path().join("m.onnx");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "convert",
            inline.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = onnx_lora(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{args:?}: {err}");
        err
    };
    let err = run(&["--threshold", "64"]);
    assert!(err.contains("note: --threshold had no effect"), "{err}");
    assert!(!out.with_file_name("m.onnx.data").exists());
    let err = run(&["--external-data", "--threshold", "1000000000"]);
    assert!(
        err.contains("note: no tensor went to external data at --threshold 1000000000 bytes"),
        "{err}"
    );
    assert!(!out.with_file_name("m.onnx.data").exists());
    let err = run(&["--external-data", "--threshold", "64"]);
    assert!(!err.contains("note:"), "{err}");
    assert!(out.with_file_name("m.onnx.data").exists());
    let err = run(&[]);
    assert!(!err.contains("note: --threshold"), "{err}");
    // An input with external data keeps it by default: a threshold no tensor reaches decided
    // that the output has none, and the note says so (not that it had no effect).
    let external = fixtures().join("llama/dynamo/model.onnx");
    let out2 = dir.path().join("e.onnx");
    let o = onnx_lora(&[
        "convert",
        external.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
        "--threshold",
        "1000000000",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("no tensor went to external data at --threshold 1000000000 bytes")
            && !err.contains("had no effect"),
        "{err}"
    );
}

/// Without a `length` key a tensor is the bytes its type and shape need from its offset, as
/// onnxruntime reads it, whatever follows in the file; a file too short for them is refused.
#[test]
fn a_tensor_without_length_takes_the_bytes_its_shape_needs() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = external_weight("w.bin", 8, 0);
    w.external_data.retain(|e| e.key() != "length");
    let mut data = vec![0xAAu8; 8];
    data.extend(weight_bytes());
    data.extend([0x55u8; 30]); // more after the tensor
    std::fs::write(dir.path().join("w.bin"), &data).unwrap();
    let src = write_model(dir.path(), "in.onnx", &matmul_model(w.clone()));
    let m = onnx_lora::onnx::load(&src).unwrap();
    let t = &m.proto.graph.as_ref().unwrap().initializer[0];
    assert_eq!(
        m.tensor_bytes(t).unwrap().as_ref(),
        weight_bytes().as_slice()
    );
    py("ort_run.py", &[&src, &src]);
    // 8 + 48 bytes needed, 40 there
    std::fs::write(dir.path().join("w.bin"), vec![0u8; 40]).unwrap();
    let o = onnx_lora(&["inspect", src.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("tensor 'W'") && err.contains("bytes 8..56 are outside"),
        "{err}"
    );
}

/// Runs onnx-lora with stderr on a pseudo-terminal (as in an interactive shell); returns what
/// it wrote there.
fn stderr_on_a_terminal(args: &[&str]) -> String {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the given integers.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: each descriptor was just opened and is owned by one File from here on.
    let (mut master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let status = {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-lora"));
        cmd.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(slave));
        cmd.status().unwrap()
    };
    assert!(status.success());
    let mut text = Vec::new();
    // (the read ends with EIO once the terminal's last writer is gone)
    let _ = master.read_to_end(&mut text);
    String::from_utf8_lossy(&text).to_string()
}

/// On a terminal the progress bar shows the bytes going to external data; an output written
/// inline has none, and shows no bar.
#[test]
fn the_progress_bar_shows_only_bytes_going_external() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama/torchscript/model.onnx");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let inline = dir.path().join("inline.onnx");
    let said = stderr_on_a_terminal(&["convert", &s(&src), "-o", &s(&inline), "--inline"]);
    assert!(
        said.contains("wrote ") && !said.contains("writing ["),
        "{said}"
    );
    let external = dir.path().join("external.onnx");
    let said = stderr_on_a_terminal(&[
        "convert",
        &s(&src),
        "-o",
        &s(&external),
        "--external-data",
        "--threshold",
        "0",
    ]);
    assert!(said.contains("writing [") && said.contains("KiB"), "{said}");
}
