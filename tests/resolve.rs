//! Target resolution on real exports: every module a fixture adapter targets resolves to
//! exactly one weight whose shape fits its A and B (dynamo exports too, where node names carry
//! no module path), each candidate's module path equals the ground truth the fixture generator
//! recorded from torch, and `inspect --json` reports the documented fields.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use onnx_lora::adapter::{Adapter, ModuleKind};
use onnx_lora::graph::ModelGraph;
use onnx_lora::rewrite::module_paths;
use onnx_lora::target::{Candidate, find_candidates, resolve_module};

fn load(case: &Case) -> (onnx_lora::onnx::LoadedModel, ModelGraph, Vec<Candidate>) {
    let m = onnx_lora::onnx::load(&case.onnx).unwrap();
    let g = ModelGraph::build(&m.proto);
    let cands = find_candidates(&m.proto, &g);
    (m, g, cands)
}

#[test]
fn every_adapter_module_resolves_to_one_fitting_weight() {
    let mut resolved = 0;
    for case in cases() {
        let (model, graph, cands) = load(&case);
        let same =
            |a: &Candidate, b: &Candidate| onnx_lora::rewrite::same_values(&model, &graph, a, b);
        for ad in case.adapters.iter().filter(|a| !a.refuse) {
            let mut adapter = Adapter::load(&ad.dir).unwrap();
            // (as every command does: the adapter settled for this model, which maps Flux
            // files' original names onto a diffusers Flux export)
            onnx_lora::rewrite::settle_root(&model, &mut adapter, true).unwrap();
            // PEFT paths bind as they are; kohya's underscored names to the model's dotted
            // paths, with the parts of other models (the text encoder's lora_te_* in a UNet,
            // the UNet's lora_unet_* in a text encoder) left out.
            let (paths, _) = module_paths(&adapter, &cands).unwrap();
            for (m, path) in adapter.modules.iter().zip(&paths) {
                assert_eq!(
                    path.is_none(),
                    m.part.is_some_and(|p| p != case.kohya_part),
                    "{} {}: {}",
                    case.label(),
                    ad.name,
                    m.path
                );
            }
            for (m, path) in adapter
                .modules
                .iter()
                .zip(&paths)
                .filter(|(m, _)| matches!(m.kind, ModuleKind::Lora | ModuleKind::Embedding))
                .filter_map(|(m, p)| Some((m, p.as_deref()?)))
            {
                let (a, b) = (m.a.as_ref().unwrap(), m.b.as_ref().unwrap());
                // (a cross-attention's in-projection part: the layer computing its rows)
                let accept = |c: &Candidate| {
                    (m.in_proj_rows.is_none() || c.mha_rows == m.in_proj_rows)
                        && match m.kind {
                            ModuleKind::Embedding => c.op == "Gather",
                            _ if a.shape.len() >= 3 => c.op == "Conv",
                            _ => c.is_linear(),
                        }
                };
                if m.part.is_some() {
                    assert!(ad.targets.iter().any(|t| t == path), "{}: {path}", ad.name);
                }
                let found = resolve_module(&cands, path, accept, same)
                    .unwrap_or_else(|e| panic!("{} {}: {e}", case.label(), ad.name));
                let c = found[0];
                // PEFT's conv A reads every input channel, grouped layer or not.
                let n_in: i64 = if c.op == "Conv" {
                    c.in_features * c.shape[2..].iter().product::<i64>()
                } else {
                    c.in_features
                };
                let a_in: usize = a.shape[1..].iter().product();
                assert_eq!(
                    a_in as i64,
                    n_in,
                    "{} {}: {} A {:?} vs {:?}",
                    case.label(),
                    ad.name,
                    m.path,
                    a.shape,
                    c.shape
                );
                assert_eq!(
                    b.shape[0] as i64,
                    c.out_features,
                    "{} {}: {} B {:?} vs {:?}",
                    case.label(),
                    ad.name,
                    m.path,
                    b.shape,
                    c.shape
                );
                resolved += 1;
            }
        }
    }
    assert!(resolved > 100, "only {resolved} modules resolved");
}

#[test]
fn module_paths_match_the_generators_ground_truth() {
    for case in cases() {
        let truth_path = case.onnx.with_file_name("weights.json");
        let truth: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&truth_path).unwrap()).unwrap();
        let (_, _, cands) = load(&case);
        let mut checked = 0;
        for t in truth.as_array().unwrap() {
            let (Some(node), Some(module)) = (t["node"].as_str(), t["module"].as_str()) else {
                continue;
            };
            if module.is_empty() {
                continue;
            }
            let c = cands
                .iter()
                .find(|c| c.node == node)
                .unwrap_or_else(|| panic!("{}: node {node} is not a candidate", case.label()));
            // (an attention's call that computes its in-projection in parts beside another
            // call's packed layer: its parts take the attention's path, the call's scope stays
            // among the other paths)
            let part_of_call = c.mha_rows.is_some() && c.other_paths.iter().any(|p| p == module);
            if !part_of_call {
                assert_eq!(c.module, module, "{}: node {node}", case.label());
            }
            assert_eq!(
                c.weight,
                t["weight"].as_str().unwrap(),
                "{}: node {node}",
                case.label()
            );
            checked += 1;
        }
        assert!(checked > 0, "{}: no ground truth checked", case.label());
    }
}

#[test]
fn inspect_json_lines_have_the_documented_fields() {
    let case = cases()
        .into_iter()
        .find(|c| c.model == "llama" && c.exporter == "dynamo")
        .unwrap();
    let out = onnx_lora_ok(&["inspect", case.onnx.to_str().unwrap(), "--json"]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 10);
    // Candidates, then one report record with the counts.
    let (report, candidates) = lines.split_last().unwrap();
    assert_eq!(report["type"], "report", "{report}");
    assert_eq!(report["listed"], candidates.len(), "{report}");
    assert_eq!(report["branches"], 0, "{report}");
    for l in candidates {
        assert_eq!(l["type"], "candidate");
        for k in [
            "module", "node", "op", "weight", "shape", "layout", "dtype", "shared",
        ] {
            assert!(l.get(k).is_some(), "missing {k}: {l}");
        }
    }
    // --target is a full match on the path or a dotted suffix; all-linear leaves out lm_head.
    let out = onnx_lora_ok(&[
        "inspect",
        case.onnx.to_str().unwrap(),
        "--json",
        "--target",
        "q_proj|v_proj",
    ]);
    let modules: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "candidate")
        .map(|v| v["module"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !modules.is_empty()
            && modules
                .iter()
                .all(|m| m.ends_with("q_proj") || m.ends_with("v_proj")),
        "{modules:?}"
    );
    let out = onnx_lora_ok(&[
        "inspect",
        case.onnx.to_str().unwrap(),
        "--json",
        "--all-linear",
    ]);
    assert!(!out.contains("\"lm_head\"") && out.contains("mlp.down_proj"));
    let out = onnx_lora_ok(&[
        "inspect",
        case.onnx.to_str().unwrap(),
        "--json",
        "--target",
        r"model\.layers\.1\..*",
    ]);
    assert!(
        out.lines().count() >= 7 && !out.contains("layers.0."),
        "{out}"
    );
}

/// ALBERT calls its one layer three times. inspect lists every call under the module's own
/// path (the one PEFT names), for TorchScript's `query_1` / `query_2` scopes as for dynamo's
/// repeated paths, with `call` / `calls`; `--target` selects all calls of a module.
#[test]
fn inspect_lists_calls_of_a_shared_layer_under_its_module() {
    let mut per_exporter = Vec::new();
    for exporter in ["torchscript", "dynamo"] {
        let model = fixtures().join(format!("albert/{exporter}/model.onnx"));
        let model = model.to_str().unwrap();
        let out = onnx_lora_ok(&["inspect", model, "--json"]);
        let cands: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["type"] == "candidate")
            .collect();
        let mut modules = std::collections::BTreeMap::<String, Vec<u64>>::new();
        for c in &cands {
            let module = c["module"].as_str().unwrap().to_string();
            assert!(
                !module.rsplit('.').next().unwrap().ends_with("_1") && !module.contains("_2."),
                "{exporter}: a call's scope listed as a module: {c}"
            );
            if let Some(n) = c.get("call") {
                assert_eq!(c["calls"], 3, "{exporter}: {c}");
                modules.entry(module).or_default().push(n.as_u64().unwrap());
            }
        }
        // The six linear layers of the shared block, each called 3 times, calls 1, 2, 3.
        assert_eq!(modules.len(), 6, "{exporter}: {modules:?}");
        assert!(
            modules.values().all(|n| n == &[1, 2, 3]),
            "{exporter}: {modules:?}"
        );
        let out = onnx_lora_ok(&["inspect", model, "--target", "query"]);
        let rows: Vec<&str> = out.lines().skip(1).collect();
        assert_eq!(rows.len(), 3, "{exporter}: {out}");
        for (i, r) in rows.iter().enumerate() {
            assert!(
                r.starts_with("encoder.albert_layer_groups.0.albert_layers.0.attention.query ")
                    && r.contains(&format!("call {}/3", i + 1)),
                "{exporter}: {out}"
            );
        }
        per_exporter.push(modules.into_keys().collect::<Vec<_>>());
    }
    assert_eq!(per_exporter[0], per_exporter[1]);
}

/// A torch `nn.MultiheadAttention`'s out_proj takes its own path, and both projections are
/// marked, in both exports; in a dynamo export whose scope is some other class (a custom module
/// calling a child `out_proj`'s weight itself), nothing is relabelled.
#[test]
fn multihead_attention_projections_are_found_by_class_and_weight_name() {
    use onnx_lora::target::MhaPart;
    for exporter in ["torchscript", "dynamo"] {
        let path = fixtures().join(format!("mha/{exporter}/model.onnx"));
        let m = onnx_lora::onnx::load(&path).unwrap();
        let g = ModelGraph::build(&m.proto);
        let parts: Vec<(String, Option<MhaPart>)> = find_candidates(&m.proto, &g)
            .into_iter()
            .map(|c| (c.module, c.mha))
            .collect();
        assert_eq!(
            parts,
            [
                ("embed".into(), None),
                ("attn".into(), Some(MhaPart::InProj)),
                ("attn.out_proj".into(), Some(MhaPart::OutProj)),
                ("fc".into(), None)
            ],
            "{exporter}"
        );
    }
    let mut m = onnx_lora::onnx::load(fixtures().join("mha/dynamo/model.onnx")).unwrap();
    let mut edited = 0;
    for n in &mut m.proto.graph.as_mut().unwrap().node {
        for p in &mut n.metadata_props {
            if p.key() == "pkg.torch.onnx.class_hierarchy"
                && p.value().contains("MultiheadAttention")
            {
                p.value = Some(p.value().replace(
                    "torch.nn.modules.activation.MultiheadAttention",
                    "__main__.CustomAttn",
                ));
                edited += 1;
            }
        }
    }
    assert!(edited > 2);
    let g = ModelGraph::build(&m.proto);
    let cands = find_candidates(&m.proto, &g);
    assert!(cands.iter().all(|c| c.mha.is_none()));
    assert_eq!(cands.iter().filter(|c| c.module == "attn").count(), 2);
    // An out_proj weight named after another attention (the exporter merges equal weights
    // across modules, as in an untrained stack): dynamo's class record still places it.
    let mut m = onnx_lora::onnx::load(fixtures().join("mha/dynamo/model.onnx")).unwrap();
    let graph = m.proto.graph.as_mut().unwrap();
    for t in &mut graph.initializer {
        if t.name() == "attn.out_proj.weight" {
            t.name = Some("other.out_proj.weight".into());
        }
    }
    for n in &mut graph.node {
        for i in &mut n.input {
            if i == "attn.out_proj.weight" {
                *i = "other.out_proj.weight".into();
            }
        }
    }
    let g = ModelGraph::build(&m.proto);
    let out_proj: Vec<(String, Option<MhaPart>)> = find_candidates(&m.proto, &g)
        .into_iter()
        .filter(|c| c.weight == "other.out_proj.weight")
        .map(|c| (c.module, c.mha))
        .collect();
    assert_eq!(out_proj, [("attn.out_proj".into(), Some(MhaPart::OutProj))]);
}

/// dynamo names every call of a module by the module's own path, so a dynamo scope `attn_1` is
/// a module of its own, also when the exporter merged its weights with `attn`'s because their
/// values are equal: it is no later call of `attn` (TorchScript's `attn_1` is).
#[test]
fn a_dynamo_scope_with_a_call_suffix_is_a_module_of_its_own() {
    let mut m = onnx_lora::onnx::load(fixtures().join("mha_twice/dynamo/model.onnx")).unwrap();
    // the second call's nodes, renamed as a sibling module `attn_1` would be
    for n in &mut m.proto.graph.as_mut().unwrap().node {
        if matches!(n.name(), "node_MatMul_85" | "node_linear_3") {
            for p in &mut n.metadata_props {
                if p.key() == "pkg.torch.onnx.name_scopes" {
                    p.value = Some(p.value().replace("'attn'", "'attn_1'"));
                }
            }
        }
    }
    let g = ModelGraph::build(&m.proto);
    let cands = find_candidates(&m.proto, &g);
    let modules: Vec<&str> = cands.iter().map(|c| c.module.as_str()).collect();
    // (the merged out_proj weight is named after `attn`'s; dynamo's class record places the
    // second one in `attn_1`)
    assert_eq!(
        modules,
        [
            "embed",
            "attn",
            "attn.out_proj",
            "attn_1",
            "attn_1.out_proj",
            "fc"
        ]
    );
    let calls = onnx_lora::target::module_calls(&cands, |_, _| false);
    assert!(calls.iter().all(Option::is_none), "{calls:?}");
    for path in ["attn", "attn.out_proj"] {
        let found = resolve_module(&cands, path, |_| true, |_, _| false).unwrap();
        assert_eq!(found.len(), 1, "{path}");
    }
}

/// TorchScript scopes a sibling module `fc_1` whose weights equal `fc`'s as it scopes a later
/// call of `fc`, and merges the two weights; it reads the merged bias through an Identity named
/// `fc_1.bias`, which a later call (reading `fc.bias`) never has. So `fc_1` is a module of its
/// own, while an attention truly called twice keeps its later call.
#[test]
fn a_torchscript_sibling_with_its_own_parameter_names_is_no_later_call() {
    let calls = |path: &str| {
        let m = onnx_lora::onnx::load(fixtures().join(path)).unwrap();
        let g = ModelGraph::build(&m.proto);
        let cands = find_candidates(&m.proto, &g);
        let calls = onnx_lora::target::module_calls(&cands, |_, _| false);
        let found: Vec<String> = resolve_module(&cands, "fc", |_| true, |_, _| false)
            .unwrap()
            .iter()
            .map(|c| c.node.clone())
            .collect();
        (calls.iter().flatten().count(), found)
    };
    let (n, fc) = calls("twins/torchscript/model.onnx");
    assert_eq!((n, fc), (0, vec!["/fc/MatMul".to_string()]));
    // (both calls of the attention, in_proj and out_proj: 4 nodes in calls)
    let m = onnx_lora::onnx::load(fixtures().join("mha_twice/torchscript/model.onnx")).unwrap();
    let g = ModelGraph::build(&m.proto);
    let cands = find_candidates(&m.proto, &g);
    let calls = onnx_lora::target::module_calls(&cands, |_, _| false);
    assert_eq!(calls.iter().flatten().count(), 4, "{calls:?}");
}
