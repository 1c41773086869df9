//! `fold` against PEFT itself: for every fixture model (both exporters) and adapter kind, the
//! folded model run through onnxruntime matches PEFT's unmerged forward and differs from the
//! base; refused and broken adapters produce their message and no file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn folded_models_match_peft_unmerged_forward() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases() {
        for ad in case.adapters.iter().filter(|a| !a.refuse) {
            let out = dir
                .path()
                .join(format!("{}_{}_{}.onnx", case.model, case.exporter, ad.name));
            if ad.has("grouped_conv") {
                // PEFT cannot merge LoRA into a grouped convolution; neither does fold.
                let err = fold_fails(&case.onnx, &ad.dir, &out, &[]);
                assert!(err.contains("grouped convolution"), "{err}");
                continue;
            }
            let what = format!("{} {}", case.label(), ad.name);
            let Some(_) = onnx_lora_or_note(
                &fold_args(&case.onnx, &[&ad.dir], &out, &[]),
                &what,
                &mut failures,
            ) else {
                continue;
            };
            let base = case.base.to_str().unwrap().to_string();
            let (ok, msg) = ort_compare(
                &out,
                &case.inputs,
                &ad.unmerged,
                case.tol(),
                &["--differs", &base],
            );
            checked += 1;
            if !ok {
                failures.push(format!("{} {}: {msg}", case.label(), ad.name));
            }
        }
    }
    assert!(checked >= 8, "only {checked} fold cases ran");
    assert!(
        failures.is_empty(),
        "{} of {checked} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `fold MODEL A B ...` equals PEFT's forward with those adapters all active in that order (a
/// DoRA adapter rescales what the earlier ones gave, its norm taken on the base plus its own
/// delta).
#[test]
fn several_adapters_match_peft_with_all_active() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in cases() {
        for (names, unmerged) in &case.combos {
            let dirs: Vec<String> = names
                .iter()
                .map(|n| {
                    let ad = case
                        .adapters
                        .iter()
                        .find(|a| &a.name == n)
                        .expect("combo adapter");
                    ad.dir.to_str().unwrap().to_string()
                })
                .collect();
            let out = dir.path().join(format!(
                "{}_{}_{}.onnx",
                case.model,
                case.exporter,
                names.join("+")
            ));
            let mut args = vec!["fold", case.onnx.to_str().unwrap()];
            args.extend(dirs.iter().map(String::as_str));
            args.extend(["-o", out.to_str().unwrap()]);
            let what = format!("{} {}", case.label(), names.join("+"));
            if onnx_lora_or_note(&args, &what, &mut failures).is_none() {
                continue;
            }
            let base = case.base.to_str().unwrap().to_string();
            let (ok, msg) = ort_compare(
                &out,
                &case.inputs,
                unmerged,
                case.tol(),
                &["--differs", &base],
            );
            checked += 1;
            if !ok {
                failures.push(format!("{what}: {msg}"));
            }
        }
    }
    assert!(checked >= 6, "only {checked} combos ran");
    assert!(
        failures.is_empty(),
        "{} of {checked} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The `packed` slices of every `module` record in fold's JSON Lines report.
fn packed_slices(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "module")
        .flat_map(|v| v["packed"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// onnxruntime's transformer optimizer packs q/k/v into one Attention weight and drops their
/// node names, and fuses embeddings into EmbedLayerNormalization: adapter modules on q/k/v land
/// in the right columns of the right layer, embedding adapters in the fused op's table.
/// `--verify` builds its reference with those layers in weight space (also DoRA and
/// lora_bias on a slice) and passes.
#[test]
fn packed_qkv_of_ort_optimized_models_match_peft() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut sliced = 0;
    let mut fused_embeddings = 0;
    let mut verified = 0;
    for (case, packed, fused) in optimized_cases() {
        assert!(!packed.is_empty(), "{}: no packed weights", case.label());
        for ad in &case.adapters {
            let out = dir.path().join(format!("{}_{}.onnx", case.model, ad.name));
            let what = format!("{} {}", case.label(), ad.name);
            let Some(o) = onnx_lora_or_note(
                &fold_args(&case.onnx, &[&ad.dir], &out, &["--json"]),
                &what,
                &mut failures,
            ) else {
                continue;
            };
            // Every q/k/v module of the adapter went into a slice of a packed weight (also
            // one that only trained its bias, with bias="all").
            let stdout = String::from_utf8_lossy(&o.stdout).to_string();
            let slices = packed_slices(&stdout);
            // q, k and v are thirds of the packed weight's outputs.
            let third = packed[0]["weight_shape"][1].as_u64().unwrap() / 3;
            let role = |t: &str| match t.rsplit('.').next().unwrap() {
                "query" | "q_lin" => Some(0),
                "key" | "k_lin" => Some(1),
                "value" | "v_lin" => Some(2),
                _ => None,
            };
            for t in ad.targets.iter().filter(|t| role(t).is_some()) {
                assert!(
                    slices.iter().any(|s| s["module"] == t.as_str()),
                    "{} {t}: {stdout}",
                    ad.name
                );
            }
            for s in &slices {
                let module = s["module"].as_str().unwrap();
                let col = s["columns"][0].as_u64().unwrap();
                assert_eq!(col, role(module).unwrap() * third, "{module} in {stdout}");
                sliced += 1;
            }
            // An embedding fused into EmbedLayerNormalization is folded into its table.
            if ad.kinds.iter().any(|k| k == "embedding") && !fused.is_empty() {
                assert!(
                    stdout.contains("\"op\":\"EmbedLayerNormalization\""),
                    "{}: {stdout}",
                    ad.name
                );
                fused_embeddings += 1;
            }
            let base = case.base.to_str().unwrap().to_string();
            let (ok, msg) = ort_compare(
                &out,
                &case.inputs,
                &ad.unmerged,
                case.tol(),
                &["--differs", &base],
            );
            if !ok {
                failures.push(format!("{} {}: {msg}", case.label(), ad.name));
            }
            // --verify's reference takes the packed and fused layers in weight space.
            let checked = dir
                .path()
                .join(format!("{}_{}_v.onnx", case.model, ad.name));
            let o = onnx_lora(&fold_args(
                &case.onnx,
                &[&ad.dir],
                &checked,
                &["--verify", "--json"],
            ));
            let err = String::from_utf8_lossy(&o.stderr);
            let verdicts = json_records(&String::from_utf8_lossy(&o.stdout), "verdict");
            match verdicts.first() {
                Some(v) if o.status.success() && v["passed"] == true => verified += 1,
                _ => failures.push(format!("{what} --verify: {err}")),
            }
        }
    }
    assert!(verified >= 8, "only {verified} folds were verified");
    assert!(sliced >= 8, "only {sliced} packed slices were folded");
    assert!(fused_embeddings >= 1, "no fused embedding was folded");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// onnxruntime-genai's model builder packs q/k/v into one `qkv_proj` MatMul per layer, with
/// grouped-query attention (q 64, k and v 32 wide): fold places each projection's columns from
/// the adapter's own widths and matches PEFT, and `--verify` passes.
#[test]
fn packed_qkv_of_genai_builder_model_matches_peft() {
    let root = fixtures().join("llama_genai");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("info.json")).unwrap()).unwrap();
    let w = &info["qkv_widths"];
    let (q, k) = (w["q"].as_u64().unwrap(), w["k"].as_u64().unwrap());
    let start = |proj: &str| match proj {
        "q" => 0,
        "k" => q,
        _ => q + k,
    };
    let dir = tempfile::tempdir().unwrap();
    let model = root.join("model.onnx");
    let adapters = info["adapters"].as_object().unwrap();
    assert!(adapters.len() >= 2);
    for (name, ad) in adapters {
        let out = dir.path().join(format!("{name}.onnx"));
        let stdout = fold_ok(
            &model,
            &[&root.join(ad["dir"].as_str().unwrap())],
            &out,
            &["--json"],
        );
        let slices = packed_slices(&stdout);
        let qkv = ad["config"]["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| ["q_proj", "k_proj", "v_proj"].contains(&t.as_str().unwrap()))
            .count();
        let layers = info["config"]["num_hidden_layers"].as_u64().unwrap() as usize;
        assert_eq!(slices.len(), qkv * layers, "{name}: {stdout}");
        for s in &slices {
            let proj = s["projection"].as_str().unwrap();
            assert_eq!(
                s["module"].as_str().unwrap().rsplit('.').next().unwrap(),
                format!("{proj}_proj")
            );
            assert_eq!(s["columns"][0].as_u64().unwrap(), start(proj), "{stdout}");
        }
        let (ok, msg) = ort_compare(
            &out,
            &root.join("inputs.npz"),
            &root.join(ad["outputs"].as_str().unwrap()),
            1e-4,
            &["--differs", root.join("base.npz").to_str().unwrap()],
        );
        assert!(ok, "{name}: {msg}");
        // --verify's reference reads the packed weight plus the runtime's B·A, on generated
        // inputs (the KV cache's head size set with --dim) and on the fixture's.
        let inputs = root.join("inputs.npz");
        let adapter = root.join(ad["dir"].as_str().unwrap());
        for feeds in [
            vec!["--dim", "kv_cache_dim=16"],
            vec!["--inputs", inputs.to_str().unwrap()],
        ] {
            let checked = dir.path().join(format!("{name}_v.onnx"));
            let mut args = vec![
                "fold",
                model.to_str().unwrap(),
                adapter.to_str().unwrap(),
                "-o",
                checked.to_str().unwrap(),
                "--verify",
                "--ep",
                "cpu",
                "--json",
            ];
            args.extend(feeds);
            let stdout = onnx_lora_ok(&args);
            assert!(
                stdout.contains("\"type\":\"verdict\"") && stdout.contains("\"passed\":true"),
                "{name}: {stdout}"
            );
        }
    }
}

#[test]
fn every_feature_is_covered_by_the_fixtures() {
    let all: Vec<String> = cases()
        .iter()
        .flat_map(|c| c.adapters.iter().flat_map(|a| a.features.clone()))
        .collect();
    for f in [
        "rslora",
        "dora",
        "rank_pattern",
        "alpha_pattern",
        "tied",
        "modules_to_save",
        "trainable_tokens",
        "bias_all",
        "bias_lora_only",
        "kohya",
        "conv3x3",
        "text_encoder_keys",
        "text_encoder",
        "unet_keys",
        "loha",
        "lokr",
        "tucker",
        "sgm",
        "adapter_bf16",
        "diffusers",
        "metadata",
        "diffusers_old_keys",
        "peft_loha",
        "peft_lokr",
        "lokr_whole",
    ] {
        assert!(
            all.iter().any(|x| x == f),
            "no fixture adapter exercises {f}"
        );
    }
    let exporters: Vec<String> = cases().iter().map(|c| c.exporter.clone()).collect();
    assert!(
        exporters.iter().any(|e| e == "torchscript") && exporters.iter().any(|e| e == "dynamo")
    );
    assert!(cases().iter().any(|c| c.dtype == "float16"));
}

#[test]
fn refused_adapters_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        for ad in case.adapters.iter().filter(|a| a.refuse) {
            let out = dir.path().join("refused.onnx");
            let o = onnx_lora(&fold_args(&case.onnx, &[&ad.dir], &out, &[]));
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{err}");
            // (PiSSA; an attention called in two forms, `mha_mixed`)
            let why = if case.model == "mha_mixed" {
                err.contains("compute its in-projection in different forms")
            } else {
                err.contains("init_lora_weights") && err.contains("changed the base weights")
            };
            assert!(why, "{}: {err}", case.label());
            assert!(!out.exists());
        }
    }
}

/// `--dry-run` checks the adapter against the model and reports what would change, writing
/// nothing; an adapter that does not fit fails the same way it would without it.
#[test]
fn dry_run_reports_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let case = cases()
        .into_iter()
        .find(|c| c.model == "llama" && c.exporter == "dynamo")
        .unwrap();
    let ad = case.adapters.iter().find(|a| a.name == "plain").unwrap();
    let before: Vec<_> = std::fs::read_dir(case.onnx.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let o = onnx_lora(&[
        "fold",
        case.onnx.to_str().unwrap(),
        ad.dir.to_str().unwrap(),
        "--dry-run",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let modules: Vec<_> = records.iter().filter(|r| r["type"] == "module").collect();
    assert_eq!(modules.len(), ad.targets.len(), "{stdout}");
    let report = records.last().unwrap();
    assert_eq!(report["dry_run"], true, "{stdout}");
    assert!(report["output"].is_null(), "{stdout}");
    // The merges are computed (and dropped): each module's largest change is the one the real
    // run reports.
    let out = dir.path().join("real.onnx");
    let o = onnx_lora(&fold_args(&case.onnx, &[&ad.dir], &out, &["--json"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let real = json_records(&String::from_utf8_lossy(&o.stdout), "module");
    assert_eq!(real.len(), modules.len());
    for (dry, real) in modules.iter().zip(&real) {
        let d = dry["max_abs_delta"]
            .as_f64()
            .expect("a dry run's max_abs_delta");
        assert!(d > 0.0, "{dry}");
        assert_eq!(
            dry["max_abs_delta"], real["max_abs_delta"],
            "{dry} vs {real}"
        );
    }
    let after: Vec<_> = std::fs::read_dir(case.onnx.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after);
    // An adapter for another model fails as it would without --dry-run.
    let other = cases()
        .into_iter()
        .find(|c| c.model == "bert")
        .unwrap()
        .adapters[0]
        .dir
        .clone();
    let o = onnx_lora(&[
        "fold",
        case.onnx.to_str().unwrap(),
        other.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("match no weight"));
    // --dry-run with -o is a usage error.
    let o = onnx_lora(&[
        "fold",
        case.onnx.to_str().unwrap(),
        ad.dir.to_str().unwrap(),
        "--dry-run",
        "-o",
        dir.path().join("x.onnx").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!dir.path().join("x.onnx").exists());
}

/// fold's JSON records say what a weight took besides a low-rank delta: the trainable tokens
/// whose rows it replaced (the table and its tied output layer) and a replaced bias.
#[test]
fn json_records_name_token_rows_and_replaced_biases() {
    let dir = tempfile::tempdir().unwrap();
    let run = |model: &str, adapter: &str| -> Vec<serde_json::Value> {
        let case = cases()
            .into_iter()
            .find(|c| c.model == model && c.exporter == "dynamo")
            .unwrap();
        let ad = case.adapters.iter().find(|a| a.name == adapter).unwrap();
        let out = dir.path().join(format!("{model}_{adapter}.onnx"));
        let stdout = fold_ok(&case.onnx, &[&ad.dir], &out, &["--json"]);
        stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["type"] == "module")
            .collect()
    };
    let tokens = run("llama", "trainable_tokens");
    let with_rows: Vec<&str> = tokens
        .iter()
        .filter(|r| r["tokens"] == serde_json::json!([16, 66, 100]))
        .map(|r| r["module"].as_str().unwrap())
        .collect();
    assert_eq!(with_rows, ["model.embed_tokens", "lm_head"], "{tokens:?}");
    let biases = run("bert", "bias_lora_only");
    assert!(!biases.is_empty());
    assert!(
        biases.iter().all(|r| r["bias_replaced"] == true),
        "{biases:?}"
    );
}

/// Two adapters on one layer: `--verify` stacks their branches in its reference (unique node and
/// value names, so onnxruntime loads it), but refuses a DoRA one stacked on another (PEFT's order
/// semantics); a second `inject` onto a layer that already has a branch is refused.
#[test]
fn stacked_adapters_in_references_and_second_injects() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("llama/dynamo/model.onnx");
    let ad = |n: &str| {
        fixtures()
            .join("llama/adapters")
            .join(n)
            .to_str()
            .unwrap()
            .to_string()
    };
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let out = dir.path().join("two.onnx");
    let o = onnx_lora(&[
        "fold",
        &s(&model),
        &ad("plain"),
        &ad("rslora_patterns"),
        "-o",
        &s(&out),
        "--verify",
        "--json",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A weight both adapters change reports each delta, in order (rslora: alpha / sqrt(r)).
    let q0 = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "module" && v["module"] == "model.layers.0.self_attn.q_proj")
        .unwrap();
    let steps: Vec<(u64, f64)> = q0["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| (st["rank"].as_u64().unwrap(), st["scale"].as_f64().unwrap()))
        .collect();
    assert_eq!(steps, vec![(4, 2.0), (4, 4.0)], "{q0}");
    let out = dir.path().join("dora.onnx");
    let o = onnx_lora(&[
        "fold",
        &s(&model),
        &ad("plain"),
        &ad("dora"),
        "-o",
        &s(&out),
        "--verify",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("one is DoRA") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
    let train = dir.path().join("train.onnx");
    onnx_lora_ok(&["inject", &s(&model), "-o", &s(&train)]);
    let again = dir.path().join("again.onnx");
    let o = onnx_lora(&[
        "inject",
        &s(&train),
        "--adapter",
        &ad("plain"),
        "-o",
        &s(&again),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("already has a branch from an earlier inject"),
        "{err}"
    );
    assert!(!again.exists());
}

/// A layer shared across calls (ALBERT's, a MultiheadAttention called twice): fold changes its
/// weight once for every call (checked against PEFT with the other fixtures) and `--verify`
/// builds its reference with a branch per call; inject, which puts one branch per module,
/// refuses it by name.
#[test]
fn shared_layers_fold_and_inject_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in cases() {
        for ad in case
            .adapters
            .iter()
            .filter(|a| a.has("shared_layer") && !a.refuse)
        {
            let out = dir.path().join("out.onnx");
            let o = onnx_lora(&fold_args(
                &case.onnx,
                &[&ad.dir],
                &out,
                &["--verify", "--json"],
            ));
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(0), "{}: {err}", case.label());
            let stdout = String::from_utf8_lossy(&o.stdout);
            let copies = stdout
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["type"] == "module" && !v["copy"].is_null())
                .count();
            // (twins_shared's `fc` weight is also its twin `fc_1`'s, which keeps its own copy)
            if case.model != "twins_shared" {
                assert_eq!(
                    copies,
                    0,
                    "{}: a shared layer's weight changes in place",
                    case.label()
                );
            }
            // TorchScript's later calls (`query_1`) could also be modules of their own whose
            // equal weights it merged: the report says which nodes were taken as calls.
            let report = json_records(&stdout, "report");
            let noted = report[0]["notes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n.as_str().unwrap().contains("taken as its later call"));
            assert_eq!(
                noted,
                case.exporter == "torchscript",
                "{}: {stdout}",
                case.label()
            );
            // With the adapter, and fresh (dynamo names every call alike; TorchScript's
            // `query_1` reads `query`'s weight): one branch per module cannot carry it, also
            // when the targets name only the first call (`query` matches no `query_1`).
            let onnx = case.onnx.to_str().unwrap();
            let out = dir.path().join("inj.onnx");
            // (ALBERT's layer is called 3 times; the MultiheadAttention twice, its in_proj
            // and its out_proj, which TorchScript scopes `attn_1` in the second call)
            let (calls, targets) = match case.model.as_str() {
                "albert" => (3, ["query", "ffn_output"]),
                "mha_twice" => (2, ["attn", "attn\\.out_proj"]),
                // (`fc`'s second call is scoped `fc_1`, as its twin is; `fc_1` alone takes a
                // branch, and so is no target here)
                "twins_shared" => (2, ["fc", "fc"]),
                other => panic!("{other}: which layers are shared?"),
            };
            for extra in [
                vec!["--adapter", ad.dir.to_str().unwrap()],
                vec![],
                vec!["--target", targets[0]],
                vec!["--target", targets[1]],
            ] {
                let mut args = vec!["inject", onnx, "-o", out.to_str().unwrap()];
                args.extend(extra);
                let o = onnx_lora(&args);
                let err = String::from_utf8_lossy(&o.stderr);
                assert_eq!(o.status.code(), Some(2), "{err}");
                assert!(
                    err.contains(&format!("is called {calls} times in this export")),
                    "{}: {err}",
                    case.label()
                );
                // (each call's node named once)
                let nodes: Vec<&str> = err
                    .split_once("(nodes ")
                    .and_then(|(_, rest)| rest.split_once(':'))
                    .map(|(list, _)| list.split(", ").collect())
                    .unwrap_or_default();
                let mut unique = nodes.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!((nodes.len(), unique.len()), (calls, calls), "{err}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked}");
}

/// fold notes every node it takes as a TorchScript later call, named parameters or not (the
/// evidence holds only where the exporter names a merged parameter after its module): here
/// mha_twice with its biases renamed away, whose fold is still PEFT's.
#[test]
fn later_calls_without_named_parameters_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("nobias_names.onnx");
    without_bias_names(&fixtures().join("mha_twice/torchscript/model.onnx"), &model);
    let out = dir.path().join("out.onnx");
    let ad = fixtures().join("mha_twice/adapters/mha");
    let stdout = fold_ok(&model, &[&ad], &out, &["--json"]);
    let report = json_records(&stdout, "report");
    let notes: Vec<&str> = report[0]["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .filter(|n| n.contains("taken as its later call"))
        .collect();
    assert_eq!(notes.len(), 2, "{stdout}");
    assert!(
        notes
            .iter()
            .any(|n| n
                .contains("module 'attn' (node /attn/MatMul) is also changed at /attn_1/MatMul")),
        "{notes:?}"
    );
    // (and the fold is PEFT's)
    let case = cases()
        .into_iter()
        .find(|c| c.model == "mha_twice" && c.exporter == "torchscript")
        .unwrap();
    let expected = &case.adapters[0].unmerged;
    let (ok, msg) = ort_compare(&out, &case.inputs, expected, case.tol(), &[]);
    assert!(ok, "{msg}");
}

/// Writes `model` with every tensor named like a bias renamed (`fc.bias` → `fc_bias`), as if
/// its layers had no bias: no parameter names tell TorchScript's later calls from modules.
fn without_bias_names(model: &std::path::Path, out: &std::path::Path) {
    let mut m = onnx_lora::onnx::load(model).unwrap();
    let rename = |n: &mut String| {
        if n.contains("bias") {
            *n = n.replace('.', "_");
        }
    };
    let g = m.proto.graph.as_mut().unwrap();
    g.initializer.iter_mut().for_each(|t| {
        let mut name = t.name().to_string();
        rename(&mut name);
        t.name = Some(name);
    });
    for n in &mut g.node {
        n.input.iter_mut().for_each(rename);
        n.output.iter_mut().for_each(rename);
    }
    onnx_lora::onnx::save(&m, out, &onnx_lora::onnx::SaveOptions::default()).unwrap();
}

/// `fc` called twice beside a module `fc_1` of equal weights: TorchScript scopes fc's second
/// call and the module alike (`/fc_1/MatMul`, `/fc_1/MatMul_1`). The bias each reads tells them
/// apart (the `twins_shared` fixtures match PEFT); without bias names an adapter naming `fc_1`
/// is refused as ambiguous, and one naming `fc` alone takes both nodes as its calls, noted.
#[test]
fn a_scope_shared_by_a_later_call_and_a_module_needs_parameter_names() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("nobias_names.onnx");
    without_bias_names(
        &fixtures().join("twins_shared/torchscript/model.onnx"),
        &model,
    );
    let ads = fixtures().join("twins_shared/adapters");
    let err = fold_fails(&model, &ads.join("both"), &dir.path().join("x.onnx"), &[]);
    assert!(
        err.contains("module 'fc_1' is ambiguous in this TorchScript export")
            && err.contains("/fc_1/MatMul, /fc_1/MatMul_1"),
        "{err}"
    );
    let out = dir.path().join("first.onnx");
    let stdout = fold_ok(&model, &[&ads.join("first")], &out, &["--json"]);
    let report = json_records(&stdout, "report");
    let notes = report[0]["notes"].to_string();
    assert!(
        notes.contains("is also changed at /fc_1/MatMul, /fc_1/MatMul_1, taken as its later calls"),
        "{notes}"
    );
}

/// A model converted to float16 with float32 inputs and outputs (keep_io_types) computes in
/// float16: `--verify` compares the fold with the unmerged reference at float16's tolerances
/// and passes (at float32's it failed a correct fold, and removed it); `--atol` / `--rtol`
/// set them, and need `--verify`.
#[test]
fn verify_of_a_float16_model_with_float32_io_passes_a_correct_fold() {
    let dir = tempfile::tempdir().unwrap();
    let keepio = dir.path().join("keepio.onnx");
    let base = fixtures().join("llama/dynamo/model.onnx");
    py("to_fp16_keepio.py", &[&base, &keepio]);
    let adapter = fixtures().join("llama/adapters/plain");
    let out = dir.path().join("out.onnx");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let fold = |extra: &[&str]| {
        let mut args = vec![
            "fold".to_string(),
            s(&keepio),
            s(&adapter),
            "-o".into(),
            s(&out),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        onnx_lora(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = fold(&["--verify", "--ep", "cpu"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("the models compute in float16"), "{err}");
    // The summary line says the output is still under check when it is printed.
    assert!(
        err.contains("into ")
            && err.contains("; checking it (--verify): it is removed unless it passes"),
        "{err}"
    );
    assert!(out.exists());
    // float32's defaults fail it: the difference is float16 rounding.
    let o = fold(&[
        "--verify", "--ep", "cpu", "--atol", "1e-4", "--rtol", "1e-4",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists(), "an output that did not pass is removed");
    let o = fold(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("folded ") && !err.contains("checking it"),
        "{err}"
    );
    std::fs::remove_file(&out).unwrap();
    let (m, a, o) = (s(&keepio), s(&adapter), s(&out));
    for (extra, want) in [
        (&["--atol", "1e-2"][..], "--verify"),
        (&["--verify", "--atol=-1"][..], "finite number >= 0"),
    ] {
        let mut args = vec!["fold", m.as_str(), a.as_str(), "-o", o.as_str()];
        args.extend_from_slice(extra);
        let err = onnx_lora_fails(&args, &out);
        assert!(err.contains(want), "{err}");
    }
}

/// `fold --verify`'s reference is checked against PEFT itself, not only against the fold: on
/// models that pack q/k/v (onnxruntime's Attention, a model builder's `qkv_proj`) and fuse
/// embeddings, where it takes those layers in weight space, the reference computes PEFT's
/// unmerged outputs (so a check that passes is not the fold compared with itself).
#[test]
fn the_unmerged_reference_of_packed_and_fused_layers_is_peft() {
    use onnx_lora::adapter::Adapter;
    let dir = tempfile::tempdir().unwrap();
    let reference = |model: &std::path::Path, adapter: &std::path::Path, out: &std::path::Path| {
        let m = onnx_lora::onnx::load(model).unwrap();
        let mut a = Adapter::load(adapter).unwrap();
        onnx_lora::rewrite::settle_root(&m, &mut a, true).unwrap();
        let r = onnx_lora::rewrite::unmerged_reference(&m, &[a], &[], 1.0).unwrap();
        onnx_lora::onnx::save(&r, out, &onnx_lora::onnx::SaveOptions::default()).unwrap();
    };
    let mut checked = 0;
    for (case, _, _) in optimized_cases() {
        for ad in &case.adapters {
            let out = dir
                .path()
                .join(format!("{}_{}_ref.onnx", case.model, ad.name));
            reference(&case.onnx, &ad.dir, &out);
            let (ok, msg) = ort_compare(
                &out,
                &case.inputs,
                &ad.unmerged,
                case.tol(),
                &["--differs", case.base.to_str().unwrap()],
            );
            assert!(ok, "{} {}: {msg}", case.label(), ad.name);
            checked += 1;
        }
    }
    let root = fixtures().join("llama_genai");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("info.json")).unwrap()).unwrap();
    for (name, ad) in info["adapters"].as_object().unwrap() {
        let out = dir.path().join(format!("genai_{name}_ref.onnx"));
        reference(
            &root.join("model.onnx"),
            &root.join(ad["dir"].as_str().unwrap()),
            &out,
        );
        let (ok, msg) = ort_compare(
            &out,
            &root.join("inputs.npz"),
            &root.join(ad["outputs"].as_str().unwrap()),
            1e-4,
            &["--differs", root.join("base.npz").to_str().unwrap()],
        );
        assert!(ok, "genai {name}: {msg}");
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} references checked");
}

/// An adapter_config.json key PEFT 0.21.2's LoraConfig does not have (a newer PEFT's) is left
/// out, as PEFT leaves it out, with a warning naming it: the fold is PEFT's.
#[test]
fn config_keys_peft_does_not_have_are_left_out_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("llama/adapters/plain");
    let adapter = dir.path().join("newer");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    config["future_variant_config"] = serde_json::json!({"k": 2});
    config["another_new_flag"] = serde_json::json!(true);
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    let model = fixtures().join("llama/dynamo/model.onnx");
    let out = dir.path().join("out.onnx");
    let o = onnx_lora(&fold_args(&model, &[&adapter], &out, &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let warning = err
        .lines()
        .find(|l| l.contains("LoraConfig does not have"))
        .unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(
        warning.starts_with("onnx-lora: warning: ")
            && warning.contains("('future_variant_config', 'another_new_flag')")
            && warning.contains("PEFT 0.21.2 leaves them out, with a warning"),
        "{warning}"
    );
    let io = fixtures().join("llama/io");
    let (ok, msg) = ort_compare(
        &out,
        &io.join("inputs.npz"),
        &io.join("plain.npz"),
        1e-4,
        &[],
    );
    assert!(ok, "{msg}");
}

/// A cross-attention's in-projection in a dynamo export: its query and key / value layers read
/// rows of `in_proj_weight` through a Split (TorchScript with dynamic axes: through Slices by
/// bounds computed from the query's shape). fold merges a LoRA's rows into the one tensor (the
/// generic tests check that against PEFT); values that replace the weight or bias there
/// (modules_to_save on the attention) are refused, naming the module, the layer and its rows,
/// by fold and inject alike, and nothing is written. The TorchScript export with static shapes,
/// a weight per layer, takes them.
#[test]
fn whole_values_on_split_rows_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let case = |exporter: &str| {
        cases()
            .into_iter()
            .find(|c| c.model == "mha_cross" && c.exporter == exporter)
            .unwrap()
    };
    let config = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc"],
        "modules_to_save": ["attn"], "peft_version": "0.21.2",
    });
    let ramp = |n: usize| (0..n).map(|i| (i % 7) as f32 * 0.05).collect::<Vec<f32>>();
    let adapter = write_adapter(
        &dir.path().join("mts"),
        config,
        &[
            ("fc.lora_A.weight", vec![4, 16], ramp(64)),
            ("fc.lora_B.weight", vec![10, 4], ramp(40)),
            (
                "attn.modules_to_save.default.in_proj_weight",
                vec![48, 16],
                ramp(768),
            ),
            (
                "attn.modules_to_save.default.in_proj_bias",
                vec![48],
                ramp(48),
            ),
        ],
    );
    let out = dir.path().join("out.onnx");
    for (exporter, op) in [("dynamo", "Split"), ("torchscript_dynamic", "Slice")] {
        let model = case(exporter).onnx;
        let fold = fold_fails(&model, &adapter, &out, &[]);
        let inject = onnx_lora_fails(&inject_args(&model, &adapter, &out, &[]), &out);
        for err in [&fold, &inject] {
            let rows = format!("rows 0-16 of 'attn.in_proj_weight' through a {op}");
            assert!(
                err.contains("module 'attn'") && err.contains(&rows),
                "{exporter}: {err}"
            );
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
    }
    fold_ok(&case("torchscript").onnx, &[&adapter], &out, &[]);
}

/// One attention called in two forms (`mha_mixed`: a self-attention, whose packed
/// in-projection is one layer, then with a key apart, three layers): PEFT merges its LoRA into
/// the one weight both calls read, which no merge of onnx-lora's fits both forms of. fold and
/// inject refuse it, naming the layers, on both exports (the second call's layers were once
/// left as they were, and the first call's merged alone); so do fresh branches on the
/// attention, which no PEFT module gives back.
#[test]
fn attention_called_in_two_forms_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let mut seen = 0;
    for case in cases().into_iter().filter(|c| c.model == "mha_mixed") {
        let tag = case.label();
        let ad = &case
            .adapters
            .iter()
            .find(|a| a.name == "mixed")
            .unwrap()
            .dir;
        let model = case.onnx.to_str().unwrap();
        let inspect = onnx_lora_ok(&["inspect", model]);
        for rows in ["0-16", "16-32", "32-48"] {
            assert!(
                inspect.contains(&format!("mha-in-proj rows {rows}")),
                "{tag}: {inspect}"
            );
        }
        let fold = fold_fails(&case.onnx, ad, &out, &[]);
        let inject = onnx_lora_fails(&inject_args(&case.onnx, ad, &out, &[]), &out);
        let fresh = onnx_lora_fails(
            &[
                "inject",
                model,
                "--target",
                "attn",
                "-o",
                out.to_str().unwrap(),
            ],
            &out,
        );
        for err in [&fold, &inject, &fresh] {
            assert!(
                err.contains("module 'attn'")
                    && err.contains("compute its in-projection in different forms"),
                "{tag}: {err}"
            );
            assert_eq!(err.trim_end().lines().count(), 1, "{tag}: {err}");
        }
        seen += 1;
    }
    assert_eq!(seen, 2);
}
