//! kohya LoRA files on bad or partial input: LyCORIS algorithms, half modules and non-scalar
//! alphas are refused with one line naming the key and no output; SDXL's original (sgm) UNet
//! block names are found in diffusers' blocks (unmatched where they have no place, refused when
//! mixed with diffusers' names); a text-encoder part the model lacks is left out and reported,
//! while a file with only such a part matches nothing. (Folds that match diffusers' own kohya
//! loader: tests/fold.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn unet() -> PathBuf {
    fixtures().join("unet/torchscript/model.onnx")
}

/// Writes a kohya-style file: the keys as given, float32.
fn write_kohya(path: &Path, tensors: &[(&str, Vec<usize>)]) -> PathBuf {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let v: Vec<u8> = (0..n)
                .flat_map(|i| (0.01 * i as f32).to_le_bytes())
                .collect();
            (k.to_string(), s.clone(), v)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (k.clone(), view.unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    path.to_path_buf()
}

/// A valid module of the fixture UNet (proj_in is a 16-channel 1x1 convolution).
const PROJ_IN: &str = "lora_unet_down_blocks_0_attentions_0_proj_in";

fn proj_in(extra: &[(&'static str, Vec<usize>)]) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        (format!("{PROJ_IN}.lora_down.weight"), vec![2, 16, 1, 1]),
        (format!("{PROJ_IN}.lora_up.weight"), vec![16, 2, 1, 1]),
        (format!("{PROJ_IN}.alpha"), vec![]),
    ];
    t.extend(extra.iter().map(|(k, s)| (k.to_string(), s.clone())));
    t
}

fn fails(name: &str, tensors: &[(String, Vec<usize>)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<(&str, Vec<usize>)> = tensors
        .iter()
        .map(|(k, s)| (k.as_str(), s.clone()))
        .collect();
    let file = write_kohya(&dir.path().join(name), &refs);
    fold_fails(&unet(), &file, &dir.path().join("out.onnx"), &[])
}

/// Folds a kohya file with these keys into the fixture UNet and checks the JSON report binds
/// it to `down_blocks.0.attentions.0.proj_in`.
fn binds_to_proj_in(tensors: &[(String, Vec<usize>)]) {
    let dir = tempfile::tempdir().unwrap();
    let refs: Vec<(&str, Vec<usize>)> = tensors
        .iter()
        .map(|(k, s)| (k.as_str(), s.clone()))
        .collect();
    let file = write_kohya(&dir.path().join("ok.safetensors"), &refs);
    let out = dir.path().join("out.onnx");
    let o = onnx_lora(&["fold", s(&unet()), s(&file), "-o", s(&out), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("\"module\":\"down_blocks.0.attentions.0.proj_in\""),
        "{stdout}"
    );
}

#[test]
fn the_fixture_module_folds() {
    binds_to_proj_in(&proj_in(&[]));
}

/// A file trained on a model with one more level above the UNet (`unet.down_blocks...`) binds
/// to the export's shorter paths.
#[test]
fn names_with_a_root_the_export_lacks_bind() {
    let stem = "lora_unet_unet_down_blocks_0_attentions_0_proj_in";
    binds_to_proj_in(&[
        (format!("{stem}.lora_down.weight"), vec![2, 16, 1, 1]),
        (format!("{stem}.lora_up.weight"), vec![16, 2, 1, 1]),
    ]);
}

/// LyCORIS LoHa / LoKr files fold (checked against LyCORIS itself in the fixtures); broken or
/// unsupported LyCORIS modules are refused with the key named.
#[test]
fn lycoris_parts_that_cannot_be_read_are_refused() {
    for (key, what) in [
        (format!("{PROJ_IN}.dora_scale"), "DoRA"),
        (format!("{PROJ_IN}.lora_mid.weight"), "lora_mid"),
    ] {
        let mut t = proj_in(&[]);
        t.push((key.clone(), vec![2, 16]));
        let err = fails("ly.safetensors", &t);
        assert!(
            err.contains(&key) && err.contains(what) && err.contains("LyCORIS"),
            "{err}"
        );
    }
    let out = "lora_unet_down_blocks_0_attentions_0_proj_out";
    for (tensors, expect) in [
        (
            vec![(format!("{out}.hada_w1_a"), vec![16, 2])],
            "lacks one of",
        ),
        (
            vec![(format!("{out}.lokr_w1"), vec![4, 4])],
            "needs lokr_w2",
        ),
        (
            {
                let mut t = proj_in(&[]);
                t.push((format!("{PROJ_IN}.hada_w1_a"), vec![16, 2]));
                t
            },
            "mixes LoRA",
        ),
    ] {
        let err = fails("ly.safetensors", &tensors);
        assert!(err.contains(expect), "{err}");
    }
    // Factors that do not fit together are refused naming the module, by a planning run
    // (--dry-run) as by a real one.
    let out = "lora_unet_down_blocks_0_attentions_0_proj_out";
    for (w1b, w2b, what) in [
        (vec![3, 16], vec![2, 16], "do not multiply"),
        (vec![2, 16], vec![2, 8], "LoHa halves of different sizes"),
    ] {
        let t: Vec<(String, Vec<usize>)> = vec![
            (format!("{out}.hada_w1_a"), vec![16, 2]),
            (format!("{out}.hada_w1_b"), w1b),
            (format!("{out}.hada_w2_a"), vec![16, 2]),
            (format!("{out}.hada_w2_b"), w2b),
        ];
        let err = fails("ly.safetensors", &t);
        assert!(err.contains("proj_out") && err.contains(what), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let refs: Vec<(&str, Vec<usize>)> =
            t.iter().map(|(k, s)| (k.as_str(), s.clone())).collect();
        let file = write_kohya(&dir.path().join("ly.safetensors"), &refs);
        let o = onnx_lora(&["fold", s(&unet()), s(&file), "--dry-run"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("proj_out") && err.contains(what), "{err}");
    }
}

/// A proj_in module's factors under `name` (the fixture UNet's 16-channel 1x1 convolutions),
/// without an alpha (scale 1: the delta is not zero).
fn proj_in_named(name: &str) -> Vec<(String, Vec<usize>)> {
    vec![
        (format!("{name}.lora_down.weight"), vec![2, 16, 1, 1]),
        (format!("{name}.lora_up.weight"), vec![16, 2, 1, 1]),
    ]
}

#[test]
fn original_unet_block_names_are_found_in_diffusers_blocks() {
    // The fixture UNet (one layer per block): input block 1 is down block 0's first layer, whose
    // attention is `_1`; input block 2 is its downsampler, which has no attention.
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, t: &[(String, Vec<usize>)]| {
        let refs: Vec<(&str, Vec<usize>)> =
            t.iter().map(|(k, s)| (k.as_str(), s.clone())).collect();
        write_kohya(&dir.path().join(name), &refs)
    };
    let sgm = write(
        "sgm.safetensors",
        &proj_in_named("lora_unet_input_blocks_1_1_proj_in"),
    );
    let diffusers = write("diffusers.safetensors", &proj_in_named(PROJ_IN));
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    let report = onnx_lora_ok(&fold_args(&unet(), &[&sgm], &a, &["--json"]));
    assert!(
        report.contains("1 UNet module(s) named as in SDXL's original (sgm) UNet"),
        "{report}"
    );
    // (it changed that module: the comparison below is not of two unchanged models)
    let record: serde_json::Value = report
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "module")
        .unwrap_or_else(|| panic!("no module record: {report}"));
    assert_eq!(
        record["module"], "down_blocks.0.attentions.0.proj_in",
        "{report}"
    );
    assert!(record["max_abs_delta"].as_f64().unwrap() > 0.0, "{report}");
    onnx_lora_ok(&fold_args(&unet(), &[&diffusers], &b, &[]));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());

    // a module with no place in the model's blocks (input block 2 is a downsampler), and one
    // whose place is a module the model lacks (a second transformer block): unmatched, named
    // by the file's keys and by where they were looked for; --allow-unmatched folds the rest
    let mut t = proj_in_named("lora_unet_input_blocks_1_1_proj_in");
    t.extend(proj_in_named("lora_unet_input_blocks_2_1_proj_in"));
    let deeper = "lora_unet_input_blocks_1_1_transformer_blocks_1_attn1_to_q";
    t.push((format!("{deeper}.lora_down.weight"), vec![2, 16]));
    t.push((format!("{deeper}.lora_up.weight"), vec![16, 2]));
    let err = fails("unplaced.safetensors", &t);
    assert!(
        err.contains("2 adapter module(s) match no weight")
            && err.contains("lora_unet_input_blocks_2_1_proj_in.lora_down.weight")
            && err.contains(&format!("{deeper}.lora_down.weight"))
            && err.contains("down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q"),
        "{err}"
    );
    let unplaced = write("unplaced.safetensors", &t);
    let c = dir.path().join("c.onnx");
    let o = onnx_lora(&fold_args(
        &unet(),
        &[&unplaced],
        &c,
        &["--allow-unmatched"],
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 UNet module(s) named as in SDXL's original (sgm) UNet")
            && err.matches("unmatched adapter module").count() == 2,
        "{err}"
    );
    assert!(std::fs::read(&c).unwrap() == std::fs::read(&b).unwrap());
    // both namings in one file: diffusers would drop the sgm half
    let err = fails(
        "mixed.safetensors",
        &proj_in(&[
            (
                "lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
                vec![2, 16, 1, 1],
            ),
            (
                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight",
                vec![16, 2, 1, 1],
            ),
        ]),
    );
    assert!(
        err.contains("lora_unet_input_blocks_1_1_proj_in") && err.contains("both"),
        "{err}"
    );
}

#[test]
fn half_modules_and_bad_alphas_are_refused() {
    let err = fails(
        "half.safetensors",
        &proj_in(&[(
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
            vec![2, 32, 1, 1],
        )]),
    );
    assert!(
        err.contains("lora_unet_mid_block_attentions_0_proj_in") && err.contains("only one of"),
        "{err}"
    );
    let mut t = proj_in(&[]);
    t[0].1 = vec![];
    let err = fails("scalar.safetensors", &t);
    assert!(
        err.contains(PROJ_IN) && err.contains("not LoRA factors"),
        "{err}"
    );
    let mut t = proj_in(&[]);
    t[2].1 = vec![2];
    let err = fails("alpha.safetensors", &t);
    assert!(
        err.contains(&format!("{PROJ_IN}.alpha")) && err.contains("scalar"),
        "{err}"
    );
}

#[test]
fn a_part_the_model_lacks_matches_nothing_on_its_own() {
    let err = fails(
        "te.safetensors",
        &[
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".to_string(),
                vec![2, 16],
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight".to_string(),
                vec![16, 2],
            ),
        ],
    );
    assert!(
        err.contains("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
            && err.contains("match no weight"),
        "{err}"
    );
}

#[test]
fn a_part_the_model_lacks_is_left_out_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let file = fixtures().join("unet/adapters/attn_fp16.safetensors");
    let o = onnx_lora(&["fold", s(&unet()), s(&file), "-o", s(&out), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "report")
        .unwrap();
    assert_eq!(report["modules"], 48);
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("left out 4 module(s) of the text encoder (lora_te_*)"),
        "{notes}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A serving model (linear layers only) has no input for a LoCon's convolutions: export-adapter
/// names each by the file's name and its place in the model, refused or (--allow-unmatched)
/// left out; the attention file's modules all find theirs.
#[test]
fn serving_adapters_name_sgm_modules_by_the_files_name_and_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let sdxl = fixtures().join("unet_sdxl");
    let model = sdxl.join("dynamo/model.onnx");
    let serving = dir.path().join("serving.onnx");
    onnx_lora_ok(&["inject", s(&model), "--as-inputs", "-o", s(&serving)]);
    let locon = sdxl.join("adapters/sgm_locon.safetensors");
    let out = dir.path().join("locon.onnx_adapter");
    let args = [
        "export-adapter",
        s(&locon),
        "--model",
        s(&serving),
        "-o",
        s(&out),
    ];
    let o = onnx_lora(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "module 'lora_unet_input_blocks_0_0 (at conv_in in this model)' has no LoRA input"
        ),
        "{err}"
    );
    assert!(!out.exists());
    let o = onnx_lora(&[&args[..], &["--allow-unmatched"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("lora_unet_input_blocks_1_0_in_layers_2 (at down_blocks_0_resnets_0_conv1 in this model)"),
        "{err}"
    );
    let attn = sdxl.join("adapters/sgm_attn.safetensors");
    let out = dir.path().join("attn.onnx_adapter");
    onnx_lora_ok(&[
        "export-adapter",
        s(&attn),
        "--model",
        s(&serving),
        "-o",
        s(&out),
    ]);
    assert!(out.exists());
}

/// A one-MatMul model `y = x @ W` (4 × 4) whose node is named `node`, as TorchScript names a
/// Linear's (`/decoder/mid_block/attentions.0/to_q/MatMul`), its weight anonymous.
fn matmul_model(path: &Path, node: &str) {
    let raw: Vec<u8> = (0..16).flat_map(|i| (i as f32).to_le_bytes()).collect();
    write_matmul_model(path, node, "onnx::MatMul_7", 4, 4, raw);
}

/// kohya files adapt the UNet, never a VAE, whose blocks carry the UNet's names under
/// `encoder.` / `decoder.`: a UNet module matches nothing in a VAE export (one file of a
/// pipeline exported part by part), while a UNet exported under a wrapper still binds.
/// (Before, the UNet's name bound under the VAE's `decoder.`.)
#[test]
fn unet_modules_match_nothing_in_a_vae() {
    let dir = tempfile::tempdir().unwrap();
    let stem = "lora_unet_mid_block_attentions_0_to_q";
    let file = write_kohya(
        &dir.path().join("unet.safetensors"),
        &[
            (&format!("{stem}.lora_down.weight"), vec![2, 4]),
            (&format!("{stem}.lora_up.weight"), vec![4, 2]),
        ],
    );
    for coder in ["decoder", "encoder"] {
        let out = dir.path().join(format!("{coder}.out.onnx"));
        let vae = dir.path().join(format!("{coder}.onnx"));
        matmul_model(
            &vae,
            &format!("/{coder}/mid_block/attentions.0/to_q/MatMul"),
        );
        let err = fold_fails(&vae, &file, &out, &[]);
        assert!(
            err.contains(stem) && err.contains("match no weight"),
            "{err}"
        );
        // (allowed: the VAE is written unchanged, the module reported unmatched)
        let o = onnx_lora(&[
            "fold",
            s(&vae),
            s(&file),
            "-o",
            s(&out),
            "--allow-unmatched",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("unmatched adapter module") && err.contains(stem),
            "{err}"
        );
        assert!(err.contains("folded 0 weights"), "{err}");
    }
    let out = dir.path().join("out.onnx");
    let wrapped = dir.path().join("wrapped.onnx");
    matmul_model(&wrapped, "/unet/mid_block/attentions.0/to_q/MatMul");
    let o = onnx_lora(&["fold", s(&wrapped), s(&file), "-o", s(&out), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("\"module\":\"unet.mid_block.attentions.0.to_q\""),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A Flux file on an export under a wrapper (`transformer.transformer_blocks…`): the mapped
/// modules bind from the wrapper's root, so the file's final_layer_linear is the transformer's
/// own `proj_out`, not a single block's `proj_out`; the fold equals diffusers' (before, the
/// name fitted all three and the run stopped).
#[test]
fn flux_names_bind_from_a_wrappers_root() {
    let dir = tempfile::tempdir().unwrap();
    let flux = fixtures().join("flux");
    let wrapped = dir.path().join("wrapped.onnx");
    py(
        "under_wrapper.py",
        &[
            &flux.join("torchscript/model.onnx"),
            &wrapped,
            Path::new("transformer"),
        ],
    );
    let out = dir.path().join("out.onnx");
    let adapter = flux.join("adapters/bfl.safetensors");
    let o = onnx_lora(&["fold", s(&wrapped), s(&adapter), "-o", s(&out), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("\"module\":\"transformer.proj_out\"")
            && stdout.contains("\"module\":\"transformer.single_transformer_blocks.1.proj_out\""),
        "{stdout}"
    );
    let (ok, msg) = ort_compare(
        &out,
        &flux.join("io/inputs.npz"),
        &flux.join("io/bfl.merged.npz"),
        1e-4,
        &[],
    );
    assert!(ok, "{msg}");
}

/// A fused module whose rows do not fit the model's layers (a single block's linear1 taller than
/// q, k, v and the MLP's input): the error names the part and the file's module it came from.
#[test]
fn a_fused_flux_module_that_does_not_fit_names_the_files_module() {
    let dir = tempfile::tempdir().unwrap();
    let stem = "lora_unet_single_blocks_0_linear1";
    // hidden 16: q, k, v 48 rows, the MLP's input 64; two rows too many
    let file = write_kohya(
        &dir.path().join("tall.safetensors"),
        &[
            (&format!("{stem}.lora_down.weight"), vec![4, 16]),
            (&format!("{stem}.lora_up.weight"), vec![114, 4]),
        ],
    );
    let err = fold_fails(
        &fixtures().join("flux/torchscript/model.onnx"),
        &file,
        &dir.path().join("out.onnx"),
        &[],
    );
    assert!(
        err.contains("single_transformer_blocks_0_proj_mlp")
            && err.contains(&format!("the file's module '{stem}'"))
            && err.contains("[66, 4]"),
        "{err}"
    );
}

/// fold's `--json` module records name the file's own module for each weight a kohya file
/// changed (the generator's `kohya_name`), also for each layer a Flux file's fused module was
/// split into and for SDXL's original block names.
#[test]
fn json_module_records_name_the_files_module() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.exporter == "torchscript") {
        for ad in case.adapters.iter().filter(|a| !a.kohya_names.is_empty()) {
            let out = dir.path().join(format!("{}_{}.onnx", case.model, ad.name));
            let stdout =
                onnx_lora_ok(&["fold", s(&case.onnx), s(&ad.dir), "-o", s(&out), "--json"]);
            for r in json_records(&stdout, "module") {
                let module = r["module"].as_str().unwrap();
                assert_eq!(
                    r["adapter_module"].as_str(),
                    Some(ad.kohya_names[module].as_str()),
                    "{} {}: {r}",
                    case.label(),
                    ad.name
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{checked}");
}

/// ComfyUI's names for a kohya Flux file (`diffusion_model.double_blocks.0.img_attn.qkv.
/// lora_down.weight`), which diffusers' Flux loader reads as sd-scripts' names with dots for
/// underscores: the fixture's file renamed so folds as diffusers' reference of the original.
#[test]
fn comfyui_names_fold_as_the_kohya_file() {
    let dir = tempfile::tempdir().unwrap();
    let flux = fixtures().join("flux");
    // (Flux's original module paths, dotted as ComfyUI writes them)
    let dotted = |stem: &str| -> String {
        let mut p = stem.to_string();
        for (from, to) in [
            ("double_blocks_", "double_blocks."),
            ("single_blocks_", "single_blocks."),
            ("_img_attn_", ".img_attn."),
            ("_txt_attn_", ".txt_attn."),
            ("_img_mlp_", ".img_mlp."),
            ("_txt_mlp_", ".txt_mlp."),
            ("_img_mod_lin", ".img_mod.lin"),
            ("_txt_mod_lin", ".txt_mod.lin"),
            ("_modulation_lin", ".modulation.lin"),
            ("_linear1", ".linear1"),
            ("_linear2", ".linear2"),
            ("_in_layer", ".in_layer"),
            ("_out_layer", ".out_layer"),
            (
                "final_layer_adaLN_modulation_1",
                "final_layer.adaLN_modulation.1",
            ),
            ("final_layer_linear", "final_layer.linear"),
        ] {
            p = p.replace(from, to);
        }
        p
    };
    let src = std::fs::read(flux.join("adapters/bfl.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let (module, suffix) = k.split_once('.').unwrap();
            let stem = module.strip_prefix("lora_unet_").unwrap();
            (format!("diffusion_model.{}.{suffix}", dotted(stem)), v)
        })
        .collect();
    assert!(
        views
            .iter()
            .any(|(k, _)| k == "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight")
    );
    let file = dir.path().join("comfy.safetensors");
    std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    let out = dir.path().join("out.onnx");
    let stdout = onnx_lora_ok(&[
        "fold",
        s(&flux.join("dynamo/model.onnx")),
        s(&file),
        "-o",
        s(&out),
        "--json",
    ]);
    let records = json_records(&stdout, "module");
    assert_eq!(records.len(), 36, "{stdout}");
    // (reported by the file's own names for the modules)
    assert!(
        records.iter().all(|r| r["adapter_module"]
            .as_str()
            .unwrap()
            .starts_with("diffusion_model.")),
        "{stdout}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["adapter_module"] == "diffusion_model.double_blocks.0.img_attn.qkv"),
        "{stdout}"
    );
    let (ok, msg) = ort_compare(
        &out,
        &flux.join("io/inputs.npz"),
        &flux.join("io/bfl.npz"),
        1e-4,
        &[],
    );
    assert!(ok, "{msg}");
}
