//! `inject` against PEFT and onnxruntime: fresh branches leave every fixture's output equal to
//! the base; `--adapter` matches PEFT's unmerged forward; the serving model (`--as-inputs`) is
//! the base when idle and PEFT's forward with the written `.onnx_adapter` active, adapters
//! swapping on one session (also behind the idle gate); fold(inject(adapter)) equals
//! fold(adapter); export-peft round-trips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Max abs difference per output between two models on the case's inputs.
fn ort_diff(a: &Path, b: &Path, inputs: &Path) -> serde_json::Value {
    serde_json::from_str(&py("ort_diff.py", &[a, b, inputs])).unwrap()
}

fn max_diff(v: &serde_json::Value) -> f64 {
    v.as_object()
        .unwrap()
        .values()
        .map(|x| x.as_f64().unwrap())
        .fold(0.0, f64::max)
}

/// Adapters `inject --adapter` takes (all but refused ones and those on a layer shared across
/// calls; values they replace outright, modules_to_save, trainable tokens and trained biases,
/// go into the weights).
fn branchable(ad: &AdapterCase) -> bool {
    !ad.refuse && !ad.has("shared_layer")
}

/// The model has layers shared across calls (ALBERT): inject refuses them (one branch per
/// module), so fresh branches on every linear layer are refused too.
fn has_shared_layers(case: &Case) -> bool {
    case.adapters.iter().any(|a| a.has("shared_layer"))
}

/// Serving inputs (`--as-inputs`) on every linear layer are refused too: a layer shared across
/// calls, or a cross-attention's in-projection as two layers (`split_in_proj`), whose one A
/// and rows of B an adapter of the attention's module cannot fill as inputs of their own.
fn serving_refused(case: &Case) -> bool {
    has_shared_layers(case) || case.adapters.iter().any(|a| a.has("split_in_proj"))
}

/// The adapter holds parts no branch can carry (modules_to_save, trainable tokens, trained
/// biases, LyCORIS deltas) besides or instead of LoRA factors.
fn has_whole(ad: &AdapterCase) -> bool {
    ad.features.iter().any(|f| {
        matches!(
            f.as_str(),
            "modules_to_save" | "trainable_tokens" | "bias_all" | "bias_lora_only" | "lycoris"
        )
    })
}

/// Adapters whose injected model has branches that fold back (LyCORIS files have none: they
/// go into the weights; branches on grouped convolutions cannot be merged, in PEFT either).
fn has_branches(ad: &AdapterCase) -> bool {
    branchable(ad)
        && !ad
            .features
            .iter()
            .any(|f| f == "lycoris" || f == "grouped_conv")
}

/// Adapters a serving model (graph inputs A and B) can carry: no DoRA, no lora_bias, no conv,
/// no whole values, no cross-attention in-projection in parts.
fn servable(ad: &AdapterCase) -> bool {
    branchable(ad)
        && !has_whole(ad)
        && !ad.has("split_in_proj")
        && !ad
            .features
            .iter()
            .any(|f| matches!(f.as_str(), "dora" | "lora_bias"))
        && !ad.kinds.iter().any(|k| k == "conv")
}

#[test]
fn fresh_branches_equal_the_base_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases().into_iter().filter(|c| !has_shared_layers(c)) {
        for init in ["kaiming", "gaussian"] {
            let out = dir
                .path()
                .join(format!("{}_{}_{init}.onnx", case.model, case.exporter));
            onnx_lora_ok(&[
                "inject",
                s(&case.onnx),
                "--rank",
                "4",
                "--init",
                init,
                "-o",
                s(&out),
            ]);
            let d = ort_diff(&case.onnx, &out, &case.inputs);
            assert_eq!(max_diff(&d), 0.0, "{} {init}: {d}", case.label());
        }
    }
}

#[test]
fn adapter_branches_match_peft_unmerged_forward() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases() {
        for ad in case.adapters.iter().filter(|a| branchable(a)) {
            let out = dir
                .path()
                .join(format!("{}_{}_{}.onnx", case.model, case.exporter, ad.name));
            let what = format!("{} {}", case.label(), ad.name);
            let Some(_) = onnx_lora_or_note(
                &[
                    "inject",
                    s(&case.onnx),
                    "--adapter",
                    s(&ad.dir),
                    "-o",
                    s(&out),
                ],
                &what,
                &mut failures,
            ) else {
                continue;
            };
            checked += 1;
            let (ok, msg) = ort_compare(
                &out,
                &case.inputs,
                &ad.unmerged,
                case.tol(),
                &["--differs", s(&case.base)],
            );
            if !ok {
                failures.push(format!("{} {}: {msg}", case.label(), ad.name));
            }
        }
    }
    assert!(checked >= 6, "only {checked} cases ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn serving_model_swaps_adapters_on_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = 0;
    let mut swapped = 0;
    for case in cases() {
        // The serving model is built for the adapter with the most targets; every other adapter
        // over a subset of them swaps in on the same session.
        let mut ads: Vec<&AdapterCase> = case.adapters.iter().filter(|a| servable(a)).collect();
        ads.sort_by_key(|a| std::cmp::Reverse(a.targets.len()));
        let Some(first) = ads.first() else { continue };
        let serving = dir
            .path()
            .join(format!("{}_{}_serving.onnx", case.model, case.exporter));
        let first_file = dir.path().join(format!(
            "{}_{}_{}.onnx_adapter",
            case.model, case.exporter, first.name
        ));
        let o = onnx_lora(&[
            "inject",
            s(&case.onnx),
            "--as-inputs",
            "--adapter",
            s(&first.dir),
            "--adapter-out",
            s(&first_file),
            "-o",
            s(&serving),
        ]);
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("--as-inputs supports"),
                "{}: {err}",
                case.label()
            );
            continue;
        }
        let mut args: Vec<PathBuf> = vec![
            serving.clone(),
            case.inputs.clone(),
            case.base.clone(),
            PathBuf::from(case.tol().to_string()),
        ];
        args.push(first_file);
        args.push(first.unmerged.clone());
        // A second adapter over the same modules (or a subset) swaps in on the same session.
        for other in ads.iter().skip(1) {
            let file = dir.path().join(format!(
                "{}_{}_{}.onnx_adapter",
                case.model, case.exporter, other.name
            ));
            let o = onnx_lora(&[
                "export-adapter",
                s(&other.dir),
                "--model",
                s(&serving),
                "-o",
                s(&file),
            ]);
            if o.status.success() {
                args.push(file);
                args.push(other.unmerged.clone());
                swapped += 1;
            } else {
                // (only an adapter over modules the serving model has no inputs for is refused)
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(
                    err.contains("has no LoRA input"),
                    "{} {}: {err}",
                    case.label(),
                    other.name
                );
            }
        }
        let refs: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
        py("ort_swap.py", &refs);
        // The idle-gated serving model takes the same adapter files: the base graph while
        // idle, PEFT's forward with each adapter active, on one session.
        let gated = dir
            .path()
            .join(format!("{}_{}_gated.onnx", case.model, case.exporter));
        onnx_lora_ok(&[
            "inject",
            s(&case.onnx),
            "--as-inputs",
            "--idle-gate",
            "--adapter",
            s(&first.dir),
            "-o",
            s(&gated),
        ]);
        let mut gated_args = args.clone();
        gated_args[0] = gated;
        let refs: Vec<&Path> = gated_args.iter().map(PathBuf::as_path).collect();
        py("ort_swap.py", &refs);
        // The same through the ort crate's Adapter (verify --adapter).
        let first_file = &args[4];
        // (the serving model with these adapter files active, against the first's outputs)
        let verify_with = |files: &[&Path]| {
            let mut a = vec!["verify", s(&serving)];
            for f in files {
                a.extend(["--adapter", s(f)]);
            }
            a.extend(["--inputs", s(&case.inputs), "--expect", s(&first.unmerged)]);
            a.extend(["--ep", "cpu"]);
            onnx_lora(&a)
        };
        let o = verify_with(&[first_file]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}: {}",
            case.label(),
            String::from_utf8_lossy(&o.stdout)
        );
        // Two adapter files setting the same inputs would not add up (onnxruntime takes the
        // last one's values): refused, naming both.
        if let Some(second) = args.get(6) {
            let o = verify_with(&[first_file, second]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{}: {err}", case.label());
            assert!(
                err.contains("both set '") && err.contains("would not add up"),
                "{}: {err}",
                case.label()
            );
        }
        served += 1;
    }
    assert!(served >= 3, "only {served} serving cases ran");
    assert!(swapped >= 3, "only {swapped} second adapters swapped in");
}

/// A serving model swaps LoRA factors only: an adapter replacing values outright
/// (modules_to_save, trainable tokens, trained biases) is refused by name, and nothing is
/// written.
#[test]
fn serving_refuses_whole_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut refused = 0;
    for case in cases().into_iter().filter(|c| !serving_refused(c)) {
        for ad in case.adapters.iter().filter(|a| has_whole(a) && !a.refuse) {
            let out = dir.path().join(format!(
                "{}_{}.onnx",
                case.label().replace('/', "_"),
                ad.name
            ));
            let o = onnx_lora(&[
                "inject",
                s(&case.onnx),
                "--as-inputs",
                "--adapter",
                s(&ad.dir),
                "-o",
                s(&out),
            ]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{}: {err}", case.label());
            assert!(
                err.contains("swaps LoRA factors only") && err.lines().count() == 1,
                "{err}"
            );
            assert!(!out.exists());
            refused += 1;
            // export-adapter refuses them the same way, for a serving model of the linear layers.
            if ad.kinds.iter().all(|k| k == "linear") {
                let serving = dir
                    .path()
                    .join(format!("{}_serving.onnx", case.label().replace('/', "_")));
                onnx_lora_ok(&["inject", s(&case.onnx), "--as-inputs", "-o", s(&serving)]);
                let file = dir.path().join("x.onnx_adapter");
                let o = onnx_lora(&[
                    "export-adapter",
                    s(&ad.dir),
                    "--model",
                    s(&serving),
                    "-o",
                    s(&file),
                ]);
                let err = String::from_utf8_lossy(&o.stderr);
                assert_eq!(o.status.code(), Some(2), "{err}");
                assert!(err.contains("swaps LoRA factors only"), "{err}");
                assert!(!file.exists());
            }
        }
    }
    assert!(refused >= 4, "only {refused} cases");
}

/// The float32 tensors of a PEFT adapter folder, keys without `base_model.model.`.
fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k}");
            let data = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let k = k
                .strip_prefix("base_model.model.")
                .unwrap_or(&k)
                .to_string();
            (k, v.shape().to_vec(), data)
        })
        .collect()
}

/// PEFT's `save_embedding_layers` saves the embedding table whole, trained or not: a table
/// equal to the model's is no trained value. fold changes the same weights as without it (to
/// the same bytes), and a serving model takes the adapter; a table that differs is a whole
/// value, which fold writes and a serving model refuses.
#[test]
fn saved_tables_equal_to_the_models_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let ads = fixtures().join("llama/adapters");
    let model = fixtures().join("llama/dynamo/model.onnx");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ads.join("plain/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let plain = adapter_tensors(&ads.join("plain"));
    let (_, shape, table) = adapter_tensors(&ads.join("embedding"))
        .into_iter()
        .find(|(k, _, _)| k == "model.embed_tokens.base_layer.weight")
        .unwrap();
    let with_table = |name: &str, table: Vec<f32>| {
        let mut t = plain.clone();
        t.push(("model.embed_tokens.weight".into(), shape.clone(), table));
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = t
            .iter()
            .map(|(k, s, v)| (k.as_str(), s.clone(), v.clone()))
            .collect();
        write_adapter(&p(name), config.clone(), &refs)
    };
    let same = with_table("same", table.clone());
    let mut changed = table.clone();
    changed[0] += 1.0;
    let changed = with_table("changed", changed);
    // (one step of float32 is a change)
    let mut nudged = table.clone();
    nudged[5] = f32::from_bits(nudged[5].to_bits() + 1);
    let nudged = with_table("nudged", nudged);
    let modules = |stdout: &str| -> Vec<String> {
        let mut m: Vec<String> = json_records(stdout, "module")
            .iter()
            .map(|r| r["module"].as_str().unwrap().to_string())
            .collect();
        m.sort();
        m
    };
    // (in two folders under one name: the model names its external data file)
    for d in ["out_bare", "out_same"] {
        std::fs::create_dir(p(d)).unwrap();
    }
    let bare = fold_ok(
        &model,
        &[&ads.join("plain")],
        &p("out_bare/out.onnx"),
        &["--json"],
    );
    let with_same = fold_ok(&model, &[&same], &p("out_same/out.onnx"), &["--json"]);
    assert_eq!(modules(&with_same), modules(&bare));
    for f in ["out.onnx", "out.onnx.data"] {
        let a = std::fs::read(p("out_same").join(f)).unwrap();
        assert!(
            a == std::fs::read(p("out_bare").join(f)).unwrap(),
            "{f} differs"
        );
    }
    for ad in [&changed, &nudged] {
        let out = fold_ok(&model, &[ad], &p("changed.onnx"), &["--json"]);
        assert!(
            modules(&out).contains(&"model.embed_tokens".to_string()),
            "{out}"
        );
    }
    // After another adapter, a table equal to the base still resets what that one changed, as
    // loading it after the other in PEFT does.
    let out = fold_ok(
        &model,
        &[&ads.join("embedding"), &same],
        &p("two.onnx"),
        &["--json"],
    );
    let embed = json_records(&out, "module")
        .into_iter()
        .find(|r| r["module"] == "model.embed_tokens");
    assert!(
        embed.is_some_and(|r| r["replaced"] == true),
        "the table is written: {out}"
    );
    // An adapter of nothing but unchanged tables is kept as it is (its fold changes nothing).
    let only = write_adapter(
        &p("only_table"),
        config.clone(),
        &[("model.embed_tokens.weight", shape.clone(), table)],
    );
    let out = fold_ok(&model, &[&only], &p("only.onnx"), &["--json"]);
    assert_eq!(modules(&out), ["model.embed_tokens"], "{out}");
    let serve = |ad: &Path| {
        onnx_lora(&[
            "inject",
            s(&model),
            "--as-inputs",
            "--adapter",
            s(ad),
            "-o",
            s(&p("serve.onnx")),
            "--adapter-out",
            s(&p("serve.onnx_adapter")),
        ])
    };
    let o = serve(&same);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = serve(&changed);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2) && err.contains("swaps LoRA factors only"),
        "{err}"
    );
}

#[test]
fn fold_of_inject_equals_fold() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        for ad in case.adapters.iter().filter(|a| has_branches(a)) {
            let tag = format!("{}_{}_{}", case.model, case.exporter, ad.name);
            let direct = dir.path().join(format!("{tag}_direct.onnx"));
            let inj = dir.path().join(format!("{tag}_inj.onnx"));
            let back = dir.path().join(format!("{tag}_back.onnx"));
            onnx_lora_ok(&["fold", s(&case.onnx), s(&ad.dir), "-o", s(&direct)]);
            onnx_lora_ok(&[
                "inject",
                s(&case.onnx),
                "--adapter",
                s(&ad.dir),
                "-o",
                s(&inj),
            ]);
            onnx_lora_ok(&["fold", s(&inj), "-o", s(&back)]);
            // Equal up to rounding the factors to the model's dtype on the way through inject.
            let d = ort_diff(&direct, &back, &case.inputs);
            let tol = if case.dtype == "float32" { 1e-5 } else { 2e-3 };
            assert!(max_diff(&d) <= tol, "{tag}: {d}");
            assert_base_structure(&case.onnx, &back, &tag);
        }
    }
}

#[test]
fn export_peft_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        for ad in case.adapters.iter().filter(|a| has_branches(a)) {
            let tag = format!("{}_{}_{}", case.model, case.exporter, ad.name);
            let inj = dir.path().join(format!("{tag}_inj.onnx"));
            onnx_lora_ok(&[
                "inject",
                s(&case.onnx),
                "--adapter",
                s(&ad.dir),
                "-o",
                s(&inj),
            ]);
            assert_export_refolds(&case, ad, &inj, dir.path(), &tag);
        }
    }
}

/// export-peft reads the whole values inject wrote as the weights hold them when it runs: every
/// float initializer of the injected model changed to 2·v + 0.5 (as a training run of the
/// modules_to_save layers, biases and token rows would change them), each exported whole tensor
/// is the original's changed so (review41 F7: they were left out).
#[test]
fn export_peft_gives_back_whole_values_as_trained() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in cases() {
        for ad in case
            .adapters
            .iter()
            .filter(|a| has_whole(a) && has_branches(a) && !a.refuse)
        {
            let tag = format!("{}_{}_{}", case.model, case.exporter, ad.name);
            let inj = dir.path().join(format!("{tag}_inj.onnx"));
            let trained = dir.path().join(format!("{tag}_trained.onnx"));
            let exported = dir.path().join(format!("{tag}_peft"));
            onnx_lora_ok(&inject_args(&case.onnx, &ad.dir, &inj, &[]));
            write_trained(&inj, &trained, |_, v| {
                v.iter_mut().for_each(|x| *x = 2.0 * *x + 0.5);
                true
            });
            onnx_lora_ok(&["export-peft", s(&trained), "-o", s(&exported)]);
            let (theirs, ours) = (whole_values(&ad.dir), whole_values(&exported));
            assert_eq!(
                theirs.keys().collect::<Vec<_>>(),
                ours.keys().collect::<Vec<_>>(),
                "{tag}"
            );
            for (k, (shape, v)) in &theirs {
                let (s2, w) = &ours[k];
                assert_eq!(shape, s2, "{tag}: {k}");
                for (a, b) in v.iter().zip(w) {
                    assert!(
                        (2.0 * a + 0.5 - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{tag}: {k}: {a} -> {b}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} cases");
}

/// Trainable tokens on a tied table (the llama fixture's output layer holds a copy of it): the
/// token rows are given back while the output layer's channels for them equal the table's
/// rows; trained apart, no PEFT token adapter gives both, so export-peft leaves the module out,
/// naming it (review43: it gave back the table's rows, and PEFT then computed something else).
#[test]
fn export_peft_leaves_out_tied_token_rows_trained_apart() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("llama/adapters/trainable_tokens");
    for exporter in ["dynamo", "torchscript"] {
        let inj = dir.path().join(format!("{exporter}_inj.onnx"));
        let model = fixtures().join(format!("llama/{exporter}/model.onnx"));
        onnx_lora_ok(&["inject", s(&model), "--adapter", s(&adapter), "-o", s(&inj)]);
        let base = onnx_lora::onnx::load(&inj).unwrap();
        let rec = onnx_lora::rewrite::whole_record::read(&base.proto).unwrap();
        let of = |what: onnx_lora::rewrite::whole_record::What| {
            let e = rec.tensors.iter().find(|e| e.what == what).unwrap();
            let g = base.proto.graph.as_ref().unwrap();
            let n = g.node.iter().find(|n| n.name() == e.node).unwrap();
            (n.input[e.input].clone(), e.rows.clone())
        };
        let (table, rows) = of(onnx_lora::rewrite::whole_record::What::Rows);
        let (head, _) = of(onnx_lora::rewrite::whole_record::What::HeadRows);
        // (adds 0.25 to the table's token rows, and with `both` to the head's channels for them)
        let trained = |both: bool, name: &str| {
            let path = dir.path().join(format!("{exporter}_{name}.onnx"));
            let changed = write_trained(&inj, &path, |t, v| {
                let is_table = t.name() == table;
                if !(is_table || both && t.name() == head) {
                    return false;
                }
                let (d0, d1) = (t.dims[0] as usize, t.dims[1] as usize);
                for &r in &rows {
                    if is_table {
                        v[r * d1..(r + 1) * d1].iter_mut().for_each(|x| *x += 0.25);
                    } else {
                        (0..d0).for_each(|i| v[i * d1 + r] += 0.25);
                    }
                }
                true
            });
            assert_eq!(changed, if both { 2 } else { 1 }, "{exporter}");
            path
        };
        let export = |model: &Path, name: &str| {
            let out = dir.path().join(format!("{exporter}_{name}_peft"));
            let o = onnx_lora(&["export-peft", s(model), "-o", s(&out), "--json"]);
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            assert!(o.status.success(), "{exporter}: {err}");
            let report = json_records(&String::from_utf8_lossy(&o.stdout), "report")[0].clone();
            (err, report, whole_values(&out))
        };
        let key = "model.embed_tokens.token_adapter.trainable_tokens_delta";
        let (_, _, untrained) = export(&inj, "untrained");
        let (err, report, values) = export(&trained(true, "both"), "both");
        assert!(!err.contains("does not hold them"), "{exporter}: {err}");
        assert_eq!(report["left_out"], serde_json::json!([]), "{exporter}");
        for (a, b) in untrained[key].1.iter().zip(&values[key].1) {
            assert_eq!(a + 0.25, *b, "{exporter}");
        }
        let (err, report, values) = export(&trained(false, "apart"), "apart");
        assert!(
            err.contains("'model.embed_tokens'") && err.contains("does not hold them"),
            "{exporter}: {err}"
        );
        assert_eq!(
            report["left_out"],
            serde_json::json!(["model.embed_tokens"]),
            "{exporter}"
        );
        assert!(!values.contains_key(key), "{exporter}");
    }
}

/// Writes `src` to `dst` (inline) with float32 initializers changed by `edit`, given each one
/// and its values; it returns whether it changed them (as a training run changes weights).
/// Returns how many were changed.
fn write_trained(
    src: &Path,
    dst: &Path,
    mut edit: impl FnMut(&onnx_lora::onnx::pb::TensorProto, &mut [f32]) -> bool,
) -> usize {
    let mut m = onnx_lora::onnx::load(src).unwrap();
    let mut changed = Vec::new();
    for (i, t) in m
        .proto
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .enumerate()
    {
        if t.data_type() != 1 {
            continue;
        }
        let mut v: Vec<f32> = m
            .tensor_bytes(t)
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if edit(t, &mut v) {
            changed.push((i, v));
        }
    }
    let count = changed.len();
    let g = m.proto.graph.as_mut().unwrap();
    for (i, v) in changed {
        let t = &mut g.initializer[i];
        t.raw_data = Some(
            v.iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        );
        t.float_data.clear();
        t.external_data.clear();
        t.data_location = None;
    }
    let opts = onnx_lora::onnx::io::SaveOptions {
        layout: onnx_lora::onnx::io::TensorLayout::Inline,
        ..Default::default()
    };
    onnx_lora::onnx::save(&m, dst, &opts).unwrap();
    count
}

/// The structure of `back` (an injected model folded back) is the base's again, plus private
/// copies of shared weights and the biases lora_bias gave bias-less layers; no node carries
/// onnx-lora metadata.
fn assert_base_structure(base: &Path, back: &Path, tag: &str) {
    let a = onnx_lora::onnx::load(base).unwrap();
    let b = onnx_lora::onnx::load(back).unwrap();
    let nodes = |m: &onnx_lora::onnx::LoadedModel| m.proto.graph.clone().unwrap().node;
    assert!(
        nodes(&b).iter().all(|n| n
            .metadata_props
            .iter()
            .all(|p| !p.key().starts_with("onnx-lora"))),
        "{tag}"
    );
    let ops_a: Vec<String> = nodes(&a).iter().map(|n| n.op_type().to_string()).collect();
    let ops_b: Vec<String> = nodes(&b)
        .iter()
        .filter(|n| !n.name().contains(".lora_folded") && !n.name().contains(".lora_bias_add"))
        .map(|n| n.op_type().to_string())
        .collect();
    assert_eq!(ops_a, ops_b, "{tag}");
    // No leftover branch constants: every initializer is the base's or a folded copy.
    let base_inits: std::collections::HashSet<String> = a
        .proto
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    for t in &b.proto.graph.as_ref().unwrap().initializer {
        assert!(
            base_inits.contains(t.name()) || t.name().contains(".lora_folded"),
            "{tag}: initializer '{}' left behind",
            t.name()
        );
    }
}

/// `export-peft` of the injected model gives the adapter's LoRA part under PEFT's keys and
/// shapes, and the whole values inject wrote into the weights (modules_to_save, trained
/// biases, trainable tokens) under the adapter's own keys, with the config entries that make
/// PEFT load them: folded into the base alone, it is PEFT's model.
fn assert_export_refolds(case: &Case, ad: &AdapterCase, injected: &Path, dir: &Path, tag: &str) {
    let exported = dir.join(format!("{tag}_peft"));
    let refold = dir.join(format!("{tag}_refold.onnx"));
    let o = onnx_lora(&["export-peft", s(injected), "-o", s(&exported)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{tag}: {err}");
    assert!(!err.contains("does not hold them"), "{tag}: {err}");
    assert!(exported.join("adapter_config.json").exists());
    assert_eq!(lora_keys(&exported), expected_keys(ad), "{tag}");
    if has_whole(ad) {
        assert_eq!(whole_values(&exported), whole_values(&ad.dir), "{tag}");
        let config = |d: &Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(d.join("adapter_config.json")).unwrap()).unwrap()
        };
        let (theirs, ours) = (config(&ad.dir), config(&exported));
        for k in [
            "modules_to_save",
            "bias",
            "trainable_token_indices",
            "task_type",
        ] {
            assert_eq!(ours[k], theirs[k], "{tag}: {k}");
        }
    }
    onnx_lora_ok(&["fold", s(&case.onnx), s(&exported), "-o", s(&refold)]);
    let (ok, msg) = ort_compare(&refold, &case.inputs, &ad.unmerged, case.tol(), &[]);
    assert!(ok, "{tag} exported: {msg}");
}

/// An adapter folder's whole tensors (not LoRA factors, nor the saved bases PEFT keeps beside
/// an embedding's LoRA or a modules_to_save layer's untouched original), by key (without
/// `base_model.model.`).
fn whole_values(dir: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    adapter_tensors(dir)
        .into_iter()
        .filter(|(k, _, _)| {
            !k.contains(".lora_")
                && !k.contains(".original_module.")
                && !k.ends_with(".base_layer.weight")
        })
        .map(|(k, shape, data)| (k, (shape, data)))
        .collect()
}

/// The PEFT keys and shapes an exported adapter must have: the original's, for a PEFT folder;
/// for a kohya file, its lora_down / lora_up (of the model's part) under the targets' dotted
/// module paths; for a diffusers file, its factors of the model's part.
fn expected_keys(ad: &AdapterCase) -> Vec<(String, Vec<usize>)> {
    if ad.dir.is_dir() && ad.has("edited") {
        // The file holds more than PEFT loads: the factors of the modules it targets (the
        // generator's `targets`, read from PEFT's loaded model), without DoRA / lora_bias
        // tensors its config does not enable.
        let mut keys = lora_keys(&ad.dir);
        keys.retain(|(k, _)| {
            ad.targets.iter().any(|t| {
                [".lora_A.weight", ".lora_B.weight"]
                    .iter()
                    .any(|part| *k == format!("base_model.model.{t}{part}"))
            })
        });
        return keys;
    }
    if ad.dir.is_dir() {
        return lora_keys(&ad.dir);
    }
    let bytes = std::fs::read(&ad.dir).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys = Vec::new();
    if ad.has("diffusers") {
        // (the file's keys for each target, as the generator read them back from diffusers)
        for t in &ad.targets {
            let file = &ad.file_keys[t];
            for (key, peft) in file.iter().zip(["lora_A", "lora_B"]) {
                let shape = st.tensor(key).unwrap().shape().to_vec();
                keys.push((format!("base_model.model.{t}.{peft}.weight"), shape));
            }
        }
        keys.sort();
        return keys;
    }
    for t in &ad.targets {
        // The file's name for the target, as the generator wrote it (SDXL files name the
        // original UNet's blocks).
        let stem = ad
            .kohya_names
            .get(t)
            .unwrap_or_else(|| panic!("{}: {t}: no kohya_name in the manifest", ad.name));
        for (kohya, peft) in [("lora_down", "lora_A"), ("lora_up", "lora_B")] {
            // (a fused layer's lora_up is split: each target has its rows)
            let shape = match ad.lora_up_shapes.get(t) {
                Some(rows) if kohya == "lora_up" => rows.clone(),
                _ => st
                    .tensor(&format!("{stem}.{kohya}.weight"))
                    .unwrap()
                    .shape()
                    .to_vec(),
            };
            keys.push((format!("base_model.model.{t}.{peft}.weight"), shape));
        }
    }
    keys.sort();
    keys
}

/// The LoRA keys of an adapter folder with their shapes (whole saved tensors left out).
fn lora_keys(dir: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k.contains(".lora_"))
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect();
    keys.sort();
    keys
}

#[test]
fn fused_shared_projections_match_peft_and_fold_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut fused_any = false;
    for case in cases().into_iter().filter(|c| !has_shared_layers(c)) {
        for ad in case.adapters.iter().filter(|a| has_branches(a)) {
            let tag = format!("{}_{}_{}", case.model, case.exporter, ad.name);
            let fused = dir.path().join(format!("{tag}_fused.onnx"));
            let back = dir.path().join(format!("{tag}_back.onnx"));
            let o = onnx_lora(&[
                "inject",
                s(&case.onnx),
                "--adapter",
                s(&ad.dir),
                "--fuse-shared",
                "-o",
                s(&fused),
            ]);
            assert!(
                o.status.success(),
                "{tag}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let m = onnx_lora::onnx::load(&fused).unwrap();
            fused_any |= m
                .proto
                .graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .any(|n| n.op_type() == "Split" && n.name().contains("lora_A_fused"));
            let (ok, msg) = ort_compare(&fused, &case.inputs, &ad.unmerged, case.tol(), &[]);
            assert!(ok, "{tag}: {msg}");
            onnx_lora_ok(&["fold", s(&fused), "-o", s(&back)]);
            let (ok, msg) = ort_compare(&back, &case.inputs, &ad.unmerged, case.tol(), &[]);
            assert!(ok, "{tag} folded back: {msg}");
            assert_base_structure(&case.onnx, &back, &format!("{tag} folded back"));
        }
        let fresh = dir
            .path()
            .join(format!("{}_{}_fresh_fused.onnx", case.model, case.exporter));
        onnx_lora_ok(&["inject", s(&case.onnx), "--fuse-shared", "-o", s(&fresh)]);
        assert_eq!(
            max_diff(&ort_diff(&case.onnx, &fresh, &case.inputs)),
            0.0,
            "{}",
            case.label()
        );
    }
    assert!(fused_any, "no fixture had branches sharing an input");
}

/// The q/k/v modules of a model that packs them into one `qkv_proj` MatMul (onnxruntime-genai's
/// model builder, grouped-query attention) become one branch on the packed weight, each
/// module's B at its columns: the branch form and the weight form match PEFT (also DoRA on a
/// slice), folding the branch back matches PEFT, and export-peft gives the adapter back bit
/// for bit. Serving inputs (one per module) are refused by name, and so is a packed weight
/// inside onnxruntime's Attention, whose projection is no graph value.
#[test]
fn packed_qkv_slices_take_one_branch_per_packed_weight() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixtures().join("llama_genai");
    let model = root.join("model.onnx");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("info.json")).unwrap()).unwrap();
    let inputs = root.join("inputs.npz");
    let base = root.join("base.npz");
    let mut checked = 0;
    for (name, ad) in info["adapters"].as_object().unwrap() {
        let adapter = root.join(ad["dir"].as_str().unwrap());
        let expected = root.join(ad["outputs"].as_str().unwrap());
        let p = |what: &str| dir.path().join(format!("{name}_{what}.onnx"));
        let stdout = onnx_lora_ok(&[
            "inject",
            s(&model),
            "--adapter",
            s(&adapter),
            "-o",
            s(&p("branch")),
            "--json",
        ]);
        // (one branch per layer's packed weight, named by it, listing the modules it carries)
        assert!(
            stdout.contains("\"module\":\"model.layers.0.attn.qkv_proj\""),
            "{name}: {stdout}"
        );
        assert!(
            stdout.contains("\"slices\":[{\"module\":\"model.layers.0.self_attn."),
            "{name}: {stdout}"
        );
        onnx_lora_ok(&[
            "inject",
            s(&model),
            "--adapter",
            s(&adapter),
            "--form",
            "weight",
            "-o",
            s(&p("weight")),
        ]);
        onnx_lora_ok(&["fold", s(&p("branch")), "-o", s(&p("back"))]);
        for form in ["branch", "weight", "back"] {
            let (ok, msg) =
                ort_compare(&p(form), &inputs, &expected, 1e-4, &["--differs", s(&base)]);
            assert!(ok, "{name} {form}: {msg}");
        }
        let exported = dir.path().join(format!("{name}_peft"));
        onnx_lora_ok(&["export-peft", s(&p("branch")), "-o", s(&exported)]);
        let tensors = |d: &Path| {
            let bytes = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut all: Vec<(String, Vec<usize>, Vec<u8>)> = st
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.shape().to_vec(), v.data().to_vec()))
                .collect();
            all.sort();
            all
        };
        assert!(
            tensors(&adapter) == tensors(&exported),
            "{name}: export-peft differs"
        );
        checked += 1;
    }
    assert_eq!(checked, 2);
    let out = dir.path().join("serving.onnx");
    let o = onnx_lora(&[
        "inject",
        s(&model),
        "--adapter",
        s(&root.join("adapter")),
        "--as-inputs",
        "-o",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "is a slice of the packed q/k/v weight 'model.layers.0.attn.qkv_proj.MatMul.weight'"
        ) && err.contains("without --as-inputs"),
        "{err}"
    );
    assert!(!out.exists());
    let o = onnx_lora(&[
        "inject",
        s(&fixtures().join("bert/ort_optimized/model.onnx")),
        "--adapter",
        s(&fixtures().join("bert/adapters/plain")),
        "-o",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("slice of the packed q/k/v weight 'Attention_0_qkv_weight'")
            && err.contains("onnx-lora fold"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Layers computed inside onnxruntime's fused ops (EmbedLayerNormalization) cannot take a
/// branch: both inject paths say so and point to fold.
#[test]
fn fused_ops_are_refused_with_a_pointer_to_fold() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = fixtures().join("distilbert/ort_optimized/model.onnx");
    let adapter = fixtures().join("distilbert/adapters/embedding");
    for args in [
        vec!["--adapter", adapter.to_str().unwrap()],
        vec!["--rank", "2", "--target", "word_embeddings"],
    ] {
        let mut argv = vec!["inject", model.to_str().unwrap()];
        argv.extend(args);
        argv.extend(["-o", out.to_str().unwrap()]);
        let o = onnx_lora(&argv);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("EmbedLayerNormalization") && err.contains("onnx-lora fold"),
            "{err}"
        );
        assert!(!out.exists());
    }
}

/// Op counts of the graph onnxruntime runs for `model` (after its constant folding).
fn ort_kernels(model: &Path) -> std::collections::BTreeMap<String, u64> {
    serde_json::from_str(&py("ort_kernels.py", &[model])).unwrap()
}

/// `--form weight`: every adapter's model matches PEFT's unmerged forward, onnxruntime runs
/// exactly the kernels of the folded model (the merge happens at load; except where a layer
/// reads its rows through a Slice by bounds computed at run time, which a note names), fold-back gives the
/// base's structure with the folded weights, and export-peft gives the adapter back.
/// Fresh weight-form branches leave the output equal to the base.
#[test]
fn weight_form_matches_peft_runs_base_kernels_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| !has_shared_layers(c)) {
        for ad in case.adapters.iter().filter(|a| has_branches(a)) {
            let tag = format!("{}_{}_{}", case.model, case.exporter, ad.name);
            let inj = dir.path().join(format!("{tag}_w.onnx"));
            let back = dir.path().join(format!("{tag}_w_back.onnx"));
            let o = onnx_lora(&[
                "inject",
                s(&case.onnx),
                "--adapter",
                s(&ad.dir),
                "--form",
                "weight",
                "-o",
                s(&inj),
            ]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{tag}: {err}");
            // (a cross-attention's rows read through Slices by bounds computed at run time, as
            // TorchScript with dynamic axes writes them: onnxruntime merges the weight form at
            // every run there, and the note says so)
            let at_run_time = case.model == "mha_cross" && case.exporter == "torchscript_dynamic";
            assert_eq!(
                err.contains("cannot merge its weight form at load"),
                at_run_time,
                "{tag}: {err}"
            );
            let (ok, msg) = ort_compare(
                &inj,
                &case.inputs,
                &ad.unmerged,
                case.tol(),
                &["--differs", s(&case.base)],
            );
            assert!(ok, "{tag}: {msg}");
            // Fold-back: PEFT's merged model, in the base's structure; onnxruntime runs the
            // same kernels for the weight form as for it.
            onnx_lora_ok(&["fold", s(&inj), "-o", s(&back)]);
            let (ok, msg) = ort_compare(&back, &case.inputs, &ad.unmerged, case.tol(), &[]);
            assert!(ok, "{tag} folded back: {msg}");
            if !at_run_time {
                assert_eq!(ort_kernels(&inj), ort_kernels(&back), "{tag}: kernels");
            }
            assert_base_structure(&case.onnx, &back, &format!("{tag} folded back"));
            assert_export_refolds(&case, ad, &inj, dir.path(), &format!("{tag}_w"));
            checked += 1;
        }
        let fresh = dir
            .path()
            .join(format!("{}_{}_w_fresh.onnx", case.model, case.exporter));
        onnx_lora_ok(&[
            "inject",
            s(&case.onnx),
            "--rank",
            "4",
            "--form",
            "weight",
            "-o",
            s(&fresh),
        ]);
        let d = ort_diff(&case.onnx, &fresh, &case.inputs);
        assert_eq!(max_diff(&d), 0.0, "{} fresh: {d}", case.label());
    }
    assert!(checked >= 20, "only {checked} adapters ran");
}

/// `inspect` of an injected model lists the model's layers, not the branch nodes onnx-lora
/// added, and says how many branches there are; a weight-form layer (its weight hidden behind
/// the merge) is counted there instead of listed.
#[test]
fn inspect_of_injected_models_lists_layers_not_branch_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("llama/dynamo/model.onnx");
    let adapter = fixtures().join("llama/adapters/plain");
    let count = |p: &Path| -> (usize, String) {
        let o = onnx_lora(&["inspect", s(p), "--json"]);
        assert!(o.status.success());
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let mut listed = 0;
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let m = v["module"].as_str().unwrap_or_default();
            assert!(!m.contains(".lora_"), "branch node listed: {line}");
            listed += usize::from(v["type"] == "candidate");
        }
        // The JSON report counts the branches too, as the text output's note does.
        let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let o = onnx_lora(&["inspect", s(p)]);
        let note = String::from_utf8_lossy(&o.stderr).to_string();
        let branches = report["branches"].as_u64().unwrap();
        assert_eq!(
            branches > 0,
            note.contains("LoRA branches injected"),
            "{report} / {note}"
        );
        (listed, note)
    };
    let (base, note) = count(&model);
    assert!(!note.contains("injected"), "{note}");
    for (form, hidden) in [("branch", 0), ("weight", 4)] {
        let out = dir.path().join(format!("{form}.onnx"));
        let report = onnx_lora_ok(&[
            "inject",
            s(&model),
            "--adapter",
            s(&adapter),
            "--form",
            form,
            "-o",
            s(&out),
            "--json",
        ]);
        let last: serde_json::Value = serde_json::from_str(report.lines().last().unwrap()).unwrap();
        assert_eq!(last["form"], form, "{report}");
        assert_eq!(last["branches"], 4, "{report}");
        let (n, note) = count(&out);
        assert_eq!(n, base - hidden, "{form}: {note}");
        assert!(note.contains("4 LoRA branches injected"), "{form}: {note}");
        assert_eq!(note.contains("weight form"), form == "weight", "{note}");
        // Merging into a weight-form layer again: refused, pointing to fold-back.
        let again = dir.path().join(format!("{form}_again.onnx"));
        let o = onnx_lora(&["fold", s(&out), s(&adapter), "-o", s(&again)]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.success(), form == "branch", "{form}: {err}");
        if form == "weight" {
            assert_eq!(o.status.code(), Some(2), "{err}");
            assert!(err.contains("4 of its layers are in weight form"), "{err}");
            assert!(!again.exists());
        }
    }
}

/// LoRA on grouped convolutions, in PEFT's layout (A over every input channel, B grouped):
/// branches match PEFT's unmerged forward (with the other fixtures), export-peft gives back
/// PEFT's keys and shapes with the same values, and folding (which PEFT refuses too) is refused.
#[test]
fn grouped_conv_branches_export_in_peft_layout() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in cases() {
        for ad in case.adapters.iter().filter(|a| a.has("grouped_conv")) {
            let tag = format!("{}_{}_{}", case.model, case.exporter, ad.name);
            let inj = dir.path().join(format!("{tag}_inj.onnx"));
            onnx_lora_ok(&[
                "inject",
                s(&case.onnx),
                "--adapter",
                s(&ad.dir),
                "-o",
                s(&inj),
            ]);
            let exported = dir.path().join(format!("{tag}_peft"));
            onnx_lora_ok(&["export-peft", s(&inj), "-o", s(&exported)]);
            assert_eq!(lora_keys(&exported), expected_keys(ad), "{tag}");
            let read = |d: &Path| {
                let bytes = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
                let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                st.tensors()
                    .into_iter()
                    .map(|(k, v)| (k, v.data().to_vec()))
                    .collect::<std::collections::BTreeMap<_, _>>()
            };
            let (want, got) = (read(&ad.dir), read(&exported));
            for (k, v) in &got {
                assert_eq!(Some(v), want.get(k), "{tag}: {k}");
            }
            let o = onnx_lora(&["fold", s(&inj), "-o", s(&dir.path().join("back.onnx"))]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{err}");
            assert!(err.contains("grouped convolution"), "{err}");
            checked += 1;
        }
    }
    assert!(checked >= 2, "{checked}");
}

/// The idle gate is the flat serving model inside an If: taking it off gives exactly the flat
/// model `inject --as-inputs` writes, putting it back and off again changes nothing, the idle
/// path is the base (onnxruntime and tract), and fold / inspect / a second inject see through it.
#[test]
fn idle_gate_wraps_the_flat_serving_model() {
    use onnx_lora::rewrite::{gate, is_gated, ungate};
    let dir = tempfile::tempdir().unwrap();
    let (mut checked, mut tract_checked) = (0, 0);
    for case in cases() {
        let Some(ad) = case.adapters.iter().find(|a| servable(a)) else {
            continue;
        };
        let tag = format!("{}_{}", case.model, case.exporter);
        // One file name in two folders: external data locations are then the same.
        let (flat, gated) = (
            dir.path().join(format!("{tag}_flat/model.onnx")),
            dir.path().join(format!("{tag}_gated/model.onnx")),
        );
        std::fs::create_dir_all(flat.parent().unwrap()).unwrap();
        std::fs::create_dir_all(gated.parent().unwrap()).unwrap();
        let common = [
            "inject",
            s(&case.onnx),
            "--as-inputs",
            "--adapter",
            s(&ad.dir),
        ];
        if !onnx_lora(&[&common[..], &["-o", s(&flat)]].concat())
            .status
            .success()
        {
            continue; // (a model --as-inputs cannot serve: tested above)
        }
        onnx_lora_ok(&[&common[..], &["--idle-gate", "-o", s(&gated)]].concat());
        let flat_model = onnx_lora::onnx::load(&flat).unwrap();
        let mut g = onnx_lora::onnx::load(&gated).unwrap();
        assert!(is_gated(&g) && !is_gated(&flat_model), "{tag}");
        let top = g.proto.graph.as_ref().unwrap();
        assert_eq!(top.node.last().unwrap().op_type(), "If", "{tag}");
        assert!(ungate(&mut g).unwrap(), "{tag}");
        assert!(g.proto == flat_model.proto, "{tag}: ungated != flat");
        let mut again = flat_model.clone();
        gate(&mut again).unwrap();
        assert!(ungate(&mut again).unwrap());
        assert!(
            again.proto == flat_model.proto,
            "{tag}: gate + ungate changed the model"
        );

        // A gate with a node of someone else's beside it is refused, and nothing changes.
        let mut tampered = onnx_lora::onnx::load(&gated).unwrap();
        let graph = tampered.proto.graph.as_mut().unwrap();
        let mut extra = graph.node[0].clone();
        extra.metadata_props.clear();
        graph.node.push(extra);
        let before = tampered.proto.clone();
        let err = ungate(&mut tampered).unwrap_err().to_string();
        assert!(err.contains("not one onnx-lora wrote"), "{err}");
        assert!(
            tampered.proto == before,
            "{tag}: a refused ungate changed the model"
        );

        // Idle: the base, through onnxruntime (to float rounding: it optimizes an If's body
        // on its own, and may pick other kernels there) and through tract.
        let d = ort_diff(&case.onnx, &gated, &case.inputs);
        assert!(max_diff(&d) <= 1e-6, "{tag}: {d}");
        // (tract cannot run some fp16 exports, gated or not)
        let tract_runs_base = onnx_lora(&["verify", s(&case.onnx), s(&case.onnx), "--ep", "tract"])
            .status
            .success();
        let o = onnx_lora(&["verify", s(&gated), s(&case.onnx), "--ep", "tract"]);
        assert_eq!(
            o.status.code(),
            Some(if tract_runs_base { 0 } else { 2 }),
            "{tag}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        tract_checked += usize::from(tract_runs_base);

        // inspect lists what the flat model has, and says the model is gated.
        let report = |m: &Path| {
            let out = onnx_lora_ok(&["inspect", s(m), "--json"]);
            let last: serde_json::Value =
                serde_json::from_str(out.lines().last().unwrap()).unwrap();
            (out.lines().count(), last)
        };
        let (n_flat, r_flat) = report(&flat);
        let (n_gated, r_gated) = report(&gated);
        assert_eq!(n_flat, n_gated, "{tag}");
        assert_eq!(r_gated["branches"], r_flat["branches"], "{tag}");
        assert_eq!(
            (
                r_gated["idle_gate"].as_bool(),
                r_flat["idle_gate"].as_bool()
            ),
            (Some(true), Some(false))
        );

        // fold (no adapter) takes the branches and the gate out: the base's structure (the
        // twins' less Identity nodes: a weight two layers share, each folded with its own delta,
        // gets a private copy of its pass-through chain, as `fc_1` does).
        let back = dir.path().join(format!("{tag}_back.onnx"));
        onnx_lora_ok(&["fold", s(&gated), "-o", s(&back)]);
        let back_model = onnx_lora::onnx::load(&back).unwrap();
        assert!(!is_gated(&back_model), "{tag}");
        let base_model = onnx_lora::onnx::load(&case.onnx).unwrap();
        // (only the twins' fixtures fold a weight two modules share)
        let shares_weights = matches!(case.model.as_str(), "twins" | "mha_twins");
        let ops = |m: &onnx_lora::onnx::LoadedModel| -> Vec<String> {
            m.proto
                .graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .map(|n| n.op_type().to_string())
                .filter(|op| !(shares_weights && op == "Identity"))
                .collect()
        };
        assert_eq!(ops(&back_model), ops(&base_model), "{tag}");

        // fold with the adapter keeps the gate (the model still serves LoRA inputs), and its
        // idle path is the base with the adapter folded in.
        let folded = dir.path().join(format!("{tag}_folded.onnx"));
        let folded_gated = dir.path().join(format!("{tag}_folded_gated.onnx"));
        onnx_lora_ok(&["fold", s(&case.onnx), s(&ad.dir), "-o", s(&folded)]);
        onnx_lora_ok(&["fold", s(&gated), s(&ad.dir), "-o", s(&folded_gated)]);
        assert!(
            is_gated(&onnx_lora::onnx::load(&folded_gated).unwrap()),
            "{tag}"
        );
        let d = ort_diff(&folded, &folded_gated, &case.inputs);
        assert!(max_diff(&d) <= 1e-5, "{tag}: {d}");

        // A second inject sees the branches behind the gate.
        let again_out = dir.path().join(format!("{tag}_again.onnx"));
        let o = onnx_lora(&[
            "inject",
            s(&gated),
            "--as-inputs",
            "--adapter",
            s(&ad.dir),
            "-o",
            s(&again_out),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{tag}: {err}");
        assert!(err.contains("already has a branch"), "{tag}: {err}");
        assert!(!again_out.exists());
        checked += 1;
    }
    assert!(
        checked >= 4 && tract_checked >= 2,
        "only {checked} cases, {tract_checked} in tract"
    );
}

/// The gate's Max over int64 sizes needs opset 12: an older model is refused, nothing written.
#[test]
fn idle_gate_refuses_old_opsets() {
    let dir = tempfile::tempdir().unwrap();
    let case = cases().into_iter().find(|c| c.model == "llama").unwrap();
    let mut m = onnx_lora::onnx::load(&case.onnx).unwrap();
    for o in &mut m.proto.opset_import {
        if o.domain().is_empty() {
            o.version = Some(11);
        }
    }
    let old = dir.path().join("opset11.onnx");
    onnx_lora::onnx::save(&m, &old, &Default::default()).unwrap();
    let out = dir.path().join("gated.onnx");
    let o = onnx_lora(&[
        "inject",
        s(&old),
        "--as-inputs",
        "--idle-gate",
        "-o",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("opset 12") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
    // --idle-gate needs --as-inputs.
    let o = onnx_lora(&["inject", s(&case.onnx), "--idle-gate", "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!out.exists());
}

/// Graph outputs no node computes (a graph input, an initializer) stay the main graph's own,
/// and an output listed twice is one output of the If: the gated model loads, its idle path
/// is the base on every output, and taking the gate off gives the flat serving model.
#[test]
fn idle_gate_keeps_outputs_that_no_node_computes() {
    use onnx_lora::onnx::pb::{
        TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto::Dimension,
        tensor_shape_proto::dimension::Value as DimValue, type_proto,
    };
    let dir = tempfile::tempdir().unwrap();
    let case = cases()
        .into_iter()
        .find(|c| c.model == "llama" && c.exporter == "torchscript")
        .unwrap();
    let mut m = onnx_lora::onnx::load(&case.onnx).unwrap();
    let g = m.proto.graph.as_mut().unwrap();
    let input = g.input[0].clone();
    let init = g.initializer.iter().find(|t| t.dims.len() == 1).unwrap();
    let init_out = ValueInfoProto {
        name: init.name.clone(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: init.data_type,
                shape: Some(TensorShapeProto {
                    dim: vec![Dimension {
                        value: Some(DimValue::DimValue(init.dims[0])),
                        denotation: None,
                    }],
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    };
    let first = g.output[0].clone();
    g.output.extend([input, init_out, first]);
    let base = dir.path().join("outputs.onnx");
    onnx_lora::onnx::save(&m, &base, &Default::default()).unwrap();

    let (flat, gated) = (
        dir.path().join("flat/model.onnx"),
        dir.path().join("gated/model.onnx"),
    );
    std::fs::create_dir_all(flat.parent().unwrap()).unwrap();
    std::fs::create_dir_all(gated.parent().unwrap()).unwrap();
    onnx_lora_ok(&["inject", s(&base), "--as-inputs", "-o", s(&flat)]);
    onnx_lora_ok(&[
        "inject",
        s(&base),
        "--as-inputs",
        "--idle-gate",
        "-o",
        s(&gated),
    ]);
    let d = ort_diff(&base, &gated, &case.inputs);
    assert_eq!(
        d.as_object().unwrap().len(),
        3,
        "four outputs, three names: {d}"
    );
    assert!(max_diff(&d) <= 1e-6, "{d}");
    let mut g = onnx_lora::onnx::load(&gated).unwrap();
    let iff = g.proto.graph.as_ref().unwrap().node.last().unwrap().clone();
    assert_eq!(
        iff.output,
        vec![first_name(&m)],
        "only the computed output, once"
    );
    assert!(onnx_lora::rewrite::ungate(&mut g).unwrap());
    assert!(g.proto == onnx_lora::onnx::load(&flat).unwrap().proto);

    // --adapter-out without an adapter to write is an error, not silently nothing.
    let ao = dir.path().join("a.onnx_adapter");
    let out = dir.path().join("x.onnx");
    let o = onnx_lora(&[
        "inject",
        s(&case.onnx),
        "--as-inputs",
        "--target",
        "k_proj",
        "--adapter-out",
        s(&ao),
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!ao.exists() && !out.exists());
}

fn first_name(m: &onnx_lora::onnx::LoadedModel) -> String {
    m.proto.graph.as_ref().unwrap().output[0].name().to_string()
}

/// Fresh A is kaiming-uniform (a = √5) as PEFT draws it: bound 1/√fan_in, where a conv's
/// fan_in counts its kernel (torch's rule for the `[r, in, kh, kw]` tensor).
#[test]
fn fresh_kaiming_bound_counts_a_convs_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("conv.onnx");
    let model = fixtures().join("convnet/torchscript/model.onnx");
    onnx_lora_ok(&[
        "inject",
        s(&model),
        "--rank",
        "4",
        "--target",
        "conv1",
        "--target",
        "conv3",
        "--target",
        "fc",
        "-o",
        s(&out),
    ]);
    let m = onnx_lora::onnx::load(&out).unwrap();
    let graph = m.proto.graph.as_ref().unwrap();
    let mut checked = 0;
    for (name, fan_in) in [
        ("conv1.lora_A.weight", 3 * 3 * 3),
        ("conv3.lora_A.weight", 8 * 3 * 3),
        ("fc.lora_A.weight", 16),
    ] {
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("no {name}"));
        let v = onnx_lora::tensor::to_f32(
            &m.tensor_bytes(t).unwrap(),
            onnx_lora::onnx::DataType::Float,
            name,
        )
        .unwrap();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        // (the draws fill the interval: the largest of 4·fan_in of them lies near the bound)
        assert!(
            max <= bound && max > 0.8 * bound,
            "{name}: max |A| {max}, bound {bound}"
        );
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// `inject --as-inputs --adapter --adapter-out --verify` checks the serving model idle against
/// the base, then with the written adapter file active against the adapter folded in: two
/// verdicts. tract, which cannot activate an adapter, is refused for it before writing.
#[test]
fn serving_verify_checks_the_written_adapter_active() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("llama/dynamo/model.onnx");
    let adapter = fixtures().join("llama/adapters/plain");
    let out = dir.path().join("serving.onnx");
    let file = dir.path().join("plain.onnx_adapter");
    let args = |ep: &'static str| {
        vec![
            "inject".to_string(),
            s(&model).into(),
            "--as-inputs".into(),
            "--adapter".into(),
            s(&adapter).into(),
            "--adapter-out".into(),
            s(&file).into(),
            "-o".into(),
            s(&out).into(),
            "--verify".into(),
            "--ep".into(),
            ep.into(),
            "--json".into(),
        ]
    };
    let refused = args("tract");
    let o = onnx_lora(&refused.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("tract cannot activate LoRA adapters"), "{err}");
    assert!(!out.exists() && !file.exists());
    let stdout = onnx_lora_ok(&args("cpu").iter().map(String::as_str).collect::<Vec<_>>());
    let verdicts = json_records(&stdout, "verdict");
    assert_eq!(verdicts.len(), 2, "{stdout}");
    assert!(verdicts.iter().all(|v| v["passed"] == true), "{stdout}");
    let reference =
        |v: &serde_json::Value| v["models"][1]["model"].as_str().unwrap_or("").to_string();
    assert!(reference(&verdicts[0]).ends_with("model.onnx"), "{stdout}");
    assert!(
        reference(&verdicts[1]).contains("adapter folded in"),
        "{stdout}"
    );
}

/// export-peft reads a packed branch's modules from its `onnx-lora.slices` metadata and refuses,
/// in one line, metadata that does not cover the branch exactly (a slice missing or given
/// twice), rather than dropping trained rows or writing a module twice.
#[test]
fn export_peft_refuses_slices_that_do_not_tile_a_packed_branch() {
    let dir = tempfile::tempdir().unwrap();
    let root = fixtures().join("llama_genai");
    let injected = dir.path().join("inj.onnx");
    onnx_lora_ok(&[
        "inject",
        s(&root.join("model.onnx")),
        "--adapter",
        s(&root.join("adapter")),
        "-o",
        s(&injected),
    ]);
    let key = "onnx-lora.slices";
    for (what, edit) in [("one slice left out", 0usize), ("one slice given twice", 1)] {
        let mut m = onnx_lora::onnx::load(&injected).unwrap();
        let graph = m.proto.graph.as_mut().unwrap();
        for n in &mut graph.node {
            for p in &mut n.metadata_props {
                if p.key() != key {
                    continue;
                }
                let mut v: Vec<serde_json::Value> = serde_json::from_str(p.value()).unwrap();
                if edit == 0 {
                    v.pop();
                } else {
                    let first = v[0].clone();
                    v.push(first);
                }
                p.value = Some(serde_json::to_string(&v).unwrap());
            }
        }
        let edited = dir.path().join(format!("edited{edit}.onnx"));
        onnx_lora::onnx::save(&m, &edited, &onnx_lora::onnx::SaveOptions::default()).unwrap();
        let out = dir.path().join(format!("peft{edit}"));
        let o = onnx_lora(&["export-peft", s(&edited), "-o", s(&out)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
        assert!(err.contains("qkv_proj"), "{what}: {err}");
        assert!(!out.exists(), "{what}");
    }
}

/// `verify --adapter` on a model that does not take the adapter's inputs (not a serving model)
/// says so in one line, rather than passing on onnxruntime's "Invalid input name".
#[test]
fn verify_adapter_on_a_model_without_its_inputs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("llama/dynamo/model.onnx");
    let adapter = fixtures().join("llama/adapters/plain");
    let serving = dir.path().join("serving.onnx");
    let file = dir.path().join("plain.onnx_adapter");
    onnx_lora_ok(&[
        "inject",
        s(&model),
        "--as-inputs",
        "--adapter",
        s(&adapter),
        "--adapter-out",
        s(&file),
        "-o",
        s(&serving),
    ]);
    let io = fixtures().join("llama/io");
    let o = onnx_lora(&[
        "verify",
        s(&model),
        "--adapter",
        s(&file),
        "--inputs",
        s(&io.join("inputs.npz")),
        "--expect",
        s(&io.join("plain.npz")),
        "--ep",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("which is no input of") && err.contains("inject MODEL --as-inputs"),
        "{err}"
    );
}

/// `inject --adapter` says what it put into the weights: a LoHa / LoKr module's delta (PEFT's
/// own LyCORIS tuners, and kohya's files), or the values a module replaces (trainable tokens).
#[test]
fn inject_names_what_went_into_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixtures();
    for (model, adapter, says) in [
        (
            "llama",
            "llama/adapters/peft_loha",
            "its LoHa delta added into",
        ),
        (
            "llama",
            "llama/adapters/peft_lokr",
            "its LoKr delta added into",
        ),
        (
            "llama",
            "llama/adapters/trainable_tokens",
            "whole values written into",
        ),
        (
            "unet",
            "unet/adapters/lokr.safetensors",
            "its LoKr delta added into",
        ),
    ] {
        let out = dir
            .path()
            .join(format!("{}.onnx", adapter.replace('/', "_")));
        let o = onnx_lora(&[
            "inject",
            s(&f.join(model).join("dynamo/model.onnx")),
            "--adapter",
            s(&f.join(adapter)),
            "-o",
            s(&out),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{adapter}: {err}");
        assert!(err.contains(says), "{adapter}: {err}");
        // (a LyCORIS delta is not reported as values written)
        assert!(
            says.starts_with("whole") || !err.contains("whole values"),
            "{adapter}: {err}"
        );
        assert!(out.exists(), "{adapter}");
        // (export-peft then has no branch to give back, and says where the adapter went)
        if adapter.ends_with("peft_loha") {
            let peft = dir.path().join("exported");
            let err = onnx_lora_fails(&["export-peft", s(&out), "-o", s(&peft)], &peft);
            assert!(
                err.contains("no injected LoRA branches to export: inject wrote what its adapter gave 8 module(s)")
                    && err.contains("LoHa / LoKr deltas"),
                "{err}"
            );
        }
    }
}

/// A cross-attention's in-projection, which every export computes as two layers (the query from
/// rows 0-E of `in_proj_weight`, the key and value from rows E-3E; review41 F2), and a query,
/// key and value projected apart, three layers (rows 0-E, E-2E, 2E-3E): inject gives each layer
/// a branch with its rows of B, all reading one lora_A initializer (PEFT's module has one A,
/// which training then trains as one), marked so that export-peft joins them into PEFT's one
/// module again, exactly, also after A was trained; fresh branches there share A the same way.
/// A model whose layers read different A's (edited by hand) is no PEFT module, and export-peft
/// says so; serving inputs there are refused.
#[test]
fn cross_attention_in_projection_parts_join_in_export_peft() {
    let dir = tempfile::tempdir().unwrap();
    let sorted = |d: &Path| {
        let mut t = adapter_tensors(d);
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    let a_of = |d: &Path| {
        adapter_tensors(d)
            .into_iter()
            .find(|(k, ..)| k == "attn.lora_A.weight")
            .unwrap()
            .2
    };
    let is_a = |t: &onnx_lora::onnx::pb::TensorProto| t.name().starts_with("attn.lora_A.weight");
    let mut seen = Vec::new();
    for case in cases()
        .into_iter()
        .filter(|c| c.model == "mha_cross" || c.model == "mha_qkv")
    {
        let tag = case.label();
        seen.push(tag.clone());
        let d = dir.path().join(&tag);
        std::fs::create_dir_all(&d).unwrap();
        // (the adapter, each layer's rows, and the rows of a layer other than the query's)
        let (adapter, rows, later): (&str, &[&str], &str) = if case.model == "mha_cross" {
            ("cross", &["0-16", "16-48"], "[16,48]")
        } else {
            ("qkv", &["0-16", "16-32", "32-48"], "[32,48]")
        };
        let ad = case.adapters.iter().find(|a| a.name == adapter).unwrap();
        let inspect = onnx_lora_ok(&["inspect", s(&case.onnx)]);
        for r in rows {
            assert!(
                inspect.contains(&format!("mha-in-proj rows {r}")),
                "{tag}: {inspect}"
            );
        }
        let inj = d.join("inj.onnx");
        onnx_lora_ok(&inject_args(&case.onnx, &ad.dir, &inj, &[]));
        let exported = d.join("peft");
        onnx_lora_ok(&["export-peft", s(&inj), "-o", s(&exported)]);
        assert_eq!(sorted(&exported), sorted(&ad.dir), "{tag}");

        // One A, trained (changed) as one: given back so.
        let trained = d.join("trained.onnx");
        let n = write_trained(&inj, &trained, |t, v| {
            is_a(t) && {
                v[0] += 0.25;
                true
            }
        });
        assert_eq!(n, 1, "{tag}: one lora_A initializer for the layers");
        let back = d.join("trained");
        onnx_lora_ok(&["export-peft", s(&trained), "-o", s(&back)]);
        let (a, orig) = (a_of(&back), a_of(&ad.dir));
        assert_eq!(a[0], orig[0] + 0.25, "{tag}");
        assert_eq!(a[1..], orig[1..], "{tag}");

        // A later layer's branch reading a changed copy of A: refused.
        let mut m = onnx_lora::onnx::load(&inj).unwrap();
        let g = m.proto.graph.as_mut().unwrap();
        let mut copy = g.initializer.iter().find(|t| is_a(t)).unwrap().clone();
        let mut v: Vec<f32> = m
            .tensor_bytes(&copy)
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        v[0] += 0.25;
        let a_name = copy.name().to_string();
        copy.name = Some("apart".into());
        copy.raw_data = Some(
            v.iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        );
        copy.external_data.clear();
        copy.data_location = None;
        let g = m.proto.graph.as_mut().unwrap();
        g.initializer.push(copy);
        let kv = g
            .node
            .iter_mut()
            .find(|n| {
                n.input.contains(&a_name)
                    && n.metadata_props
                        .iter()
                        .any(|p| p.key() == "onnx-lora.in_proj_rows" && p.value() == later)
            })
            .unwrap();
        for i in kv.input.iter_mut().filter(|i| **i == a_name) {
            *i = "apart".into();
        }
        let apart = d.join("apart.onnx");
        let opts = onnx_lora::onnx::io::SaveOptions {
            layout: onnx_lora::onnx::io::TensorLayout::Inline,
            ..Default::default()
        };
        onnx_lora::onnx::save(&m, &apart, &opts).unwrap();
        let o = onnx_lora(&["export-peft", s(&apart), "-o", s(&d.join("apart"))]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{tag}: {err}");
        assert!(
            err.contains("module 'attn'") && err.contains("no longer share one lora_A"),
            "{tag}: {err}"
        );
        assert!(!d.join("apart").exists());

        // The weight form too reads one A (which onnxruntime folds in at load).
        let weight_form = d.join("weight_form.onnx");
        onnx_lora_ok(&inject_args(
            &case.onnx,
            &ad.dir,
            &weight_form,
            &["--form", "weight"],
        ));
        let n = write_trained(&weight_form, &d.join("wf_trained.onnx"), |t, v| {
            is_a(t) && {
                v[0] += 0.25;
                true
            }
        });
        assert_eq!(n, 1, "{tag}: one lora_A initializer in the weight form");
        let wf_back = d.join("wf_trained");
        onnx_lora_ok(&[
            "export-peft",
            s(&d.join("wf_trained.onnx")),
            "-o",
            s(&wf_back),
        ]);
        assert_eq!(a_of(&wf_back)[0], orig[0] + 0.25, "{tag}");

        // Fresh branches: the base's outputs, one A, exported as one module.
        let fresh = d.join("fresh.onnx");
        onnx_lora_ok(&["inject", s(&case.onnx), "--target", "attn", "-o", s(&fresh)]);
        let (ok, msg) = ort_compare(&fresh, &case.inputs, &case.base, case.tol(), &[]);
        assert!(ok, "{tag}: {msg}");
        assert_eq!(write_trained(&fresh, &d.join("f2.onnx"), |t, _| is_a(t)), 1);
        let fresh_peft = d.join("fresh_peft");
        onnx_lora_ok(&["export-peft", s(&fresh), "-o", s(&fresh_peft)]);
        let keys: Vec<(String, Vec<usize>)> = sorted(&fresh_peft)
            .into_iter()
            .map(|(k, shape, _)| (k, shape))
            .collect();
        assert_eq!(
            keys,
            [
                ("attn.lora_A.weight".to_string(), vec![8, 16]),
                ("attn.lora_B.weight".to_string(), vec![48, 8]),
            ],
            "{tag}"
        );

        let serving = d.join("serving.onnx");
        let o = onnx_lora(&inject_args(
            &case.onnx,
            &ad.dir,
            &serving,
            &["--as-inputs"],
        ));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{tag}: {err}");
        assert!(err.contains("inject without --as-inputs"), "{tag}: {err}");
        assert!(!serving.exists());
    }
    // (both models, each in its three exports: TorchScript, dynamo, TorchScript with dynamic
    // axes)
    assert_eq!(seen.len(), 6, "{seen:?}");
}

/// A weight split into rows at run time that is no cross-attention's in-projection (a chunked
/// parameter, GLU-style: `w1, w2 = w.chunk(2)`) takes no branch, as before onnx-lora read
/// Split rows: fresh branches on every linear layer go to the other layers (review47 F1: they
/// were refused as "called 2 times").
#[test]
fn chunked_weights_are_no_layers() {
    use onnx_lora::onnx::pb::{
        AttributeProto, GraphProto, NodeProto, TensorProto, attribute_proto::AttributeType,
    };
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let node = |op: &str, name: &str, inputs: &[&str], outputs: &[&str]| NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut split = node("Split", "/blk/Split", &["blk.w", "sizes"], &["w1", "w2"]);
    split.attribute.push(AttributeProto {
        name: Some("axis".into()),
        i: Some(0),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    });
    let floats = |name: &str, dims: Vec<i64>| {
        let n: i64 = dims.iter().product();
        TensorProto {
            name: Some(name.into()),
            data_type: Some(1),
            raw_data: Some(
                (0..n)
                    .flat_map(|i| ((i % 5) as f32 * 0.1).to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            ),
            dims,
            ..Default::default()
        }
    };
    let m = model_of(GraphProto {
        name: Some("g".into()),
        node: vec![
            split,
            node("Transpose", "/blk/Transpose", &["w1"], &["w1t"]),
            node("Transpose", "/blk/Transpose_1", &["w2"], &["w2t"]),
            node("MatMul", "/blk/MatMul", &["x", "w1t"], &["y1"]),
            node("MatMul", "/blk/MatMul_1", &["x", "w2t"], &["y2"]),
            node("Mul", "/blk/Mul", &["y1", "y2"], &["h"]),
            node("MatMul", "/fc/MatMul", &["h", "fc.weight"], &["y"]),
        ],
        input: vec![float_info("x", &[1, 4])],
        output: vec![float_info("y", &[1, 3])],
        initializer: vec![
            floats("blk.w", vec![8, 4]),
            floats("fc.weight", vec![4, 3]),
            TensorProto {
                name: Some("sizes".into()),
                dims: vec![2],
                data_type: Some(7),
                int64_data: vec![4, 4],
                ..Default::default()
            },
        ],
        ..Default::default()
    });
    let model = dir.path().join("glu.onnx");
    std::fs::write(&model, m.encode_to_vec()).unwrap();
    let listed = onnx_lora_ok(&["inspect", s(&model), "--json"]);
    let cands = json_records(&listed, "candidate");
    assert_eq!(cands.len(), 1, "{listed}");
    assert_eq!(cands[0]["weight"], "fc.weight", "{listed}");
    let out = dir.path().join("out.onnx");
    let report = onnx_lora_ok(&["inject", s(&model), "--rank", "2", "-o", s(&out), "--json"]);
    let branches = json_records(&report, "branch");
    assert_eq!(branches.len(), 1, "{report}");
    assert_eq!(branches[0]["module"], "fc", "{report}");
}
