//! kohya files for Flux named by Black Forest Labs' original modules (as sd-scripts trains
//! Flux: `lora_unet_double_blocks_0_img_attn_qkv`, `single_blocks_0_linear1`, `img_in`,
//! `final_layer_adaLN_modulation_1`, ...) mapped onto an export of diffusers'
//! `FluxTransformer2DModel` (`transformer_blocks.0.attn.to_q`, `single_transformer_blocks.0.
//! proj_mlp`, `x_embedder`, `norm_out.linear`, ...). The original fuses what diffusers keeps
//! apart: a double block's q/k/v in one Linear (`img_attn_qkv` → `attn.to_q/to_k/to_v`,
//! `txt_attn_qkv` → `attn.add_q_proj/add_k_proj/add_v_proj`) and a single block's q/k/v and MLP
//! input in `linear1` (→ `attn.to_q/to_k/to_v`, `proj_mlp`). A LoRA on such a Linear is split by
//! rows: each part keeps the whole lora_down (A) and takes its rows of lora_up (B), which is
//! exactly the fused delta's rows. The final layer's modulation puts shift before scale, and
//! diffusers' `norm_out.linear` scale before shift: its B's two halves are swapped.

use super::peft::{Adapter, F32Tensor, ModuleAdapter, ModuleKind};
use crate::error::{Error, Result};

/// What one original module becomes in diffusers' layout.
enum Place {
    /// The same Linear under another name.
    Same(String),
    /// Row blocks of the fused Linear, in order: (diffusers name, share of the rows) where
    /// the share is `Third` (q/k/v of a double block) or, for `linear1`, `Hidden` (rows as
    /// many as the input features: q, k, v) and `Rest` (the MLP's input, the rows left).
    Split(Vec<(String, Rows)>),
    /// The final layer's modulation: B's halves swapped.
    Swapped(String),
}

#[derive(Clone, Copy)]
enum Rows {
    Third,
    Hidden,
    /// q, k and v together (a diffusers export whose projections were fused: `attn.to_qkv`).
    Qkv,
    Rest,
}

/// Where the original module `name` (the kohya name after `lora_unet_`) sits in diffusers'
/// Flux, if it is one of the original's; `fused`: the export's attention projections were fused
/// by diffusers (`fuse_qkv_projections`: `attn.to_qkv`, `attn.to_added_qkv`).
fn place(name: &str, fused: bool) -> Option<Place> {
    let same = |s: &str| Some(Place::Same(s.to_string()));
    let fixed = match name {
        "img_in" => return same("x_embedder"),
        "txt_in" => return same("context_embedder"),
        "time_in_in_layer" => return same("time_text_embed_timestep_embedder_linear_1"),
        "time_in_out_layer" => return same("time_text_embed_timestep_embedder_linear_2"),
        "vector_in_in_layer" => return same("time_text_embed_text_embedder_linear_1"),
        "vector_in_out_layer" => return same("time_text_embed_text_embedder_linear_2"),
        "guidance_in_in_layer" => return same("time_text_embed_guidance_embedder_linear_1"),
        "guidance_in_out_layer" => return same("time_text_embed_guidance_embedder_linear_2"),
        "final_layer_linear" => return same("proj_out"),
        "final_layer_adaLN_modulation_1" => {
            return Some(Place::Swapped("norm_out_linear".into()));
        }
        _ => None::<Place>,
    };
    if fixed.is_some() {
        return fixed;
    }
    let block = |prefix: &str| -> Option<(usize, &str)> {
        let rest = name.strip_prefix(prefix)?;
        let (i, what) = rest.split_once('_')?;
        Some((i.parse().ok()?, what))
    };
    if let Some((i, what)) = block("double_blocks_") {
        let b = format!("transformer_blocks_{i}");
        let qkv = |names: [&str; 3]| {
            Some(Place::Split(
                names
                    .iter()
                    .map(|n| (format!("{b}_{n}"), Rows::Third))
                    .collect(),
            ))
        };
        return match what {
            "img_attn_qkv" if fused => same(&format!("{b}_attn_to_qkv")),
            "txt_attn_qkv" if fused => same(&format!("{b}_attn_to_added_qkv")),
            "img_attn_qkv" => qkv(["attn_to_q", "attn_to_k", "attn_to_v"]),
            "txt_attn_qkv" => qkv(["attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj"]),
            "img_attn_proj" => same(&format!("{b}_attn_to_out_0")),
            "txt_attn_proj" => same(&format!("{b}_attn_to_add_out")),
            "img_mlp_0" => same(&format!("{b}_ff_net_0_proj")),
            "img_mlp_2" => same(&format!("{b}_ff_net_2")),
            "txt_mlp_0" => same(&format!("{b}_ff_context_net_0_proj")),
            "txt_mlp_2" => same(&format!("{b}_ff_context_net_2")),
            "img_mod_lin" => same(&format!("{b}_norm1_linear")),
            "txt_mod_lin" => same(&format!("{b}_norm1_context_linear")),
            _ => None,
        };
    }
    if let Some((i, what)) = block("single_blocks_") {
        let b = format!("single_transformer_blocks_{i}");
        return match what {
            "linear1" if fused => Some(Place::Split(vec![
                (format!("{b}_attn_to_qkv"), Rows::Qkv),
                (format!("{b}_proj_mlp"), Rows::Rest),
            ])),
            "linear1" => Some(Place::Split(vec![
                (format!("{b}_attn_to_q"), Rows::Hidden),
                (format!("{b}_attn_to_k"), Rows::Hidden),
                (format!("{b}_attn_to_v"), Rows::Hidden),
                (format!("{b}_proj_mlp"), Rows::Rest),
            ])),
            "linear2" => same(&format!("{b}_proj_out")),
            "modulation_lin" => same(&format!("{b}_norm_linear")),
            _ => None,
        };
    }
    None
}

/// How a diffusers Flux export lays its modules out.
struct Layout {
    /// What the export's paths put before the transformer's (`transformer.` under a wrapper;
    /// empty for the transformer exported alone).
    root: String,
    /// Its attention projections were fused before export (`attn.to_qkv`).
    fused: bool,
}

/// The layout of the model's module paths when they are diffusers' Flux (transformer blocks,
/// single transformer blocks) rather than the original's (double / single blocks) or another
/// model's; None otherwise, or when its single transformer blocks sit under several roots.
fn diffusers_flux(model_paths: &[&str]) -> Option<Layout> {
    let has = |frag: &str| {
        model_paths
            .iter()
            .any(|p| p.starts_with(frag) || p.contains(&format!(".{frag}")))
    };
    if has("double_blocks.") || has("single_blocks.") {
        return None;
    }
    let mut roots = model_paths.iter().filter_map(|p| {
        let at = p.find("single_transformer_blocks.")?;
        (at == 0 || p.as_bytes()[at - 1] == b'.').then(|| &p[..at])
    });
    let root = roots.next()?;
    if roots.any(|r| r != root) {
        return None;
    }
    let fused = model_paths
        .iter()
        .any(|p| p.ends_with(".attn.to_qkv") || p.ends_with(".attn.to_added_qkv"));
    Some(Layout {
        root: root.to_string(),
        fused,
    })
}

/// Rows `from..to` of a `[out, r]` lora_up.
fn rows(b: &F32Tensor, from: usize, to: usize) -> F32Tensor {
    let r = b.shape[1];
    let mut shape = b.shape.clone();
    shape[0] = to - from;
    F32Tensor {
        shape,
        data: b.data[from * r..to * r].to_vec(),
    }
}

/// Maps a kohya file's modules named by the original Flux onto a diffusers Flux export's
/// (`model_paths`: the model's module paths), splitting fused ones; the rest, and every module
/// when the model is not diffusers' Flux, stay as they are. Returns how many of the file's
/// modules were mapped. Its errors do not name the file (the caller does).
pub fn map_onto(adapter: &mut Adapter, model_paths: &[&str]) -> Result<usize> {
    let original = |m: &ModuleAdapter| m.part == Some("unet") && place(&m.path, false).is_some();
    if !adapter.modules.iter().any(original) {
        return Ok(0);
    }
    let Some(layout) = diffusers_flux(model_paths) else {
        return Ok(0);
    };
    // (named from the model's root: `proj_out` is then the transformer's own, not a block's)
    let root = super::kohya::underscored(&layout.root);
    // (the caller names the file: `settle_root`'s errors come with the adapter's path)
    let err = Error::Target;
    let mut mapped = 0;
    let mut out = Vec::with_capacity(adapter.modules.len() + 8);
    for m in std::mem::take(&mut adapter.modules) {
        let Some(place) = (m.part == Some("unet"))
            .then(|| place(&m.path, layout.fused))
            .flatten()
        else {
            out.push(m);
            continue;
        };
        mapped += 1;
        if let Place::Same(to) = &place {
            // (any module on an unfused Linear, LyCORIS too, moves as it is)
            out.push(ModuleAdapter {
                path: format!("{root}{to}"),
                ..m
            });
            continue;
        }
        let name = |p: &str| format!("lora_unet_{p}");
        let plain = m.kind == ModuleKind::Lora && m.lycoris.is_none();
        let (a, b) = match (&m.a, &m.b) {
            (Some(a), Some(b)) if plain && b.shape.len() == 2 && a.shape.len() == 2 => {
                (a.clone(), b.clone())
            }
            _ => {
                return Err(err(format!(
                    "kohya module '{}' (Flux's original {} Linear) cannot be split onto this diffusers export's separate layers: only plain LoRA factors (lora_down / lora_up) split by rows",
                    name(&m.path),
                    if matches!(place, Place::Swapped(_)) {
                        "final modulation"
                    } else {
                        "fused"
                    }
                )));
            }
        };
        let out_rows = b.shape[0];
        match place {
            // (moved above)
            Place::Same(_) => {}
            Place::Swapped(to) => {
                if out_rows % 2 != 0 {
                    return Err(err(format!(
                        "kohya module '{}': lora_up has {out_rows} rows, not the two halves (shift, scale) of Flux's final modulation",
                        name(&m.path)
                    )));
                }
                let h = out_rows / 2;
                let mut swapped = rows(&b, h, out_rows);
                swapped.shape[0] = out_rows;
                swapped.data.extend_from_slice(&rows(&b, 0, h).data);
                out.push(ModuleAdapter {
                    path: format!("{root}{to}"),
                    b: Some(swapped),
                    ..m
                });
            }
            Place::Split(parts) => {
                let hidden = a.shape[1];
                let fixed: usize = parts
                    .iter()
                    .map(|(_, r)| match r {
                        Rows::Third => out_rows / 3,
                        Rows::Hidden => hidden,
                        Rows::Qkv => 3 * hidden,
                        Rows::Rest => 0,
                    })
                    .sum();
                let thirds = parts.iter().any(|(_, r)| matches!(r, Rows::Third));
                if (thirds && out_rows % 3 != 0) || (!thirds && out_rows <= fixed) {
                    return Err(err(format!(
                        "kohya module '{}': lora_up has {out_rows} rows, which do not split into {}",
                        name(&m.path),
                        if thirds {
                            "q, k and v (three equal parts)".to_string()
                        } else {
                            format!(
                                "q, k, v ({hidden} rows each, the input's width) and the MLP's input"
                            )
                        }
                    )));
                }
                let mut at = 0;
                for (to, share) in parts {
                    let n = match share {
                        Rows::Third => out_rows / 3,
                        Rows::Hidden => hidden,
                        Rows::Qkv => 3 * hidden,
                        Rows::Rest => out_rows - fixed,
                    };
                    out.push(ModuleAdapter {
                        path: format!("{root}{to}"),
                        a: Some(a.clone()),
                        b: Some(rows(&b, at, at + n)),
                        ..m.clone()
                    });
                    at += n;
                }
            }
        }
    }
    adapter.modules = out;
    Ok(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(path: &str, r: usize, cols: usize, rows_: usize) -> ModuleAdapter {
        let mut m = ModuleAdapter::empty(path, ModuleKind::Lora, Some("unet"));
        m.a = Some(F32Tensor {
            shape: vec![r, cols],
            data: (0..r * cols).map(|i| i as f32).collect(),
        });
        m.b = Some(F32Tensor {
            shape: vec![rows_, r],
            data: (0..rows_ * r).map(|i| i as f32).collect(),
        });
        m.keys = vec![format!("lora_unet_{path}.lora_down.weight")];
        m.alpha = Some(2.0);
        m
    }

    fn adapter(modules: Vec<ModuleAdapter>) -> Adapter {
        Adapter::new(
            std::path::Path::new("flux.safetensors"),
            crate::adapter::peft::AdapterConfig::plain_lora(2, 2.0, serde_json::Value::Null),
            modules,
        )
    }

    const DIFFUSERS: [&str; 3] = [
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_q",
        "x_embedder",
    ];

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn fused_modules_split_by_rows() -> TestResult {
        // hidden 4: qkv 12 rows; linear1 12 + 16 (MLP) rows; final modulation 8 rows.
        let mut a = adapter(vec![
            module("double_blocks_0_img_attn_qkv", 2, 4, 12),
            module("single_blocks_0_linear1", 2, 4, 28),
            module("final_layer_adaLN_modulation_1", 2, 4, 8),
            module("img_in", 2, 3, 4),
            module("down_blocks_0_x", 2, 3, 4),
        ]);
        assert_eq!(map_onto(&mut a, &DIFFUSERS)?, 4);
        let paths: Vec<&str> = a.modules.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "transformer_blocks_0_attn_to_q",
                "transformer_blocks_0_attn_to_k",
                "transformer_blocks_0_attn_to_v",
                "single_transformer_blocks_0_attn_to_q",
                "single_transformer_blocks_0_attn_to_k",
                "single_transformer_blocks_0_attn_to_v",
                "single_transformer_blocks_0_proj_mlp",
                "norm_out_linear",
                "x_embedder",
                "down_blocks_0_x",
            ]
        );
        let b = |i: usize| a.modules[i].b.clone().ok_or("no lora_up");
        // to_k: rows 4..8 of the fused lora_up (r 2: values 8..16), the whole lora_down.
        assert_eq!(b(1)?.shape, [4, 2]);
        assert_eq!(b(1)?.data, (8..16).map(|v| v as f32).collect::<Vec<_>>());
        assert_eq!(a.modules[1].a.as_ref().map(|t| t.data.len()), Some(8));
        // proj_mlp: the 16 rows after q, k, v.
        assert_eq!(b(6)?.shape, [16, 2]);
        assert_eq!(b(6)?.data[0], 24.0);
        // norm_out.linear: (shift, scale) → (scale, shift).
        let swapped: Vec<f32> = (8..16).chain(0..8).map(|v| v as f32).collect();
        assert_eq!(b(7)?.data, swapped);
        assert!(a.modules.iter().all(|m| m.alpha == Some(2.0)));
        Ok(())
    }

    #[test]
    fn a_wrapped_export_gets_its_root_and_a_fused_one_its_fused_layers() -> TestResult {
        let paths = |a: &Adapter| a.modules.iter().map(|m| m.path.clone()).collect::<Vec<_>>();
        // Under a wrapper the model's own proj_out is named from the root, so that it is not
        // taken for a block's `…single_transformer_blocks.0.proj_out`.
        let mut a = adapter(vec![
            module("final_layer_linear", 2, 4, 4),
            module("double_blocks_0_img_attn_qkv", 2, 4, 12),
        ]);
        let wrapped = [
            "transformer.single_transformer_blocks.0.proj_out",
            "transformer.proj_out",
        ];
        assert_eq!(map_onto(&mut a, &wrapped)?, 2);
        assert_eq!(
            paths(&a),
            [
                "transformer_proj_out",
                "transformer_transformer_blocks_0_attn_to_q",
                "transformer_transformer_blocks_0_attn_to_k",
                "transformer_transformer_blocks_0_attn_to_v",
            ]
        );
        // diffusers' fuse_qkv_projections before export: q/k/v stay whole.
        let mut a = adapter(vec![
            module("double_blocks_0_img_attn_qkv", 2, 4, 12),
            module("double_blocks_0_txt_attn_qkv", 2, 4, 12),
            module("single_blocks_0_linear1", 2, 4, 28),
        ]);
        let fused = [
            "transformer_blocks.0.attn.to_qkv",
            "transformer_blocks.0.attn.to_added_qkv",
            "single_transformer_blocks.0.attn.to_qkv",
            "single_transformer_blocks.0.proj_mlp",
        ];
        assert_eq!(map_onto(&mut a, &fused)?, 3);
        assert_eq!(
            paths(&a),
            [
                "transformer_blocks_0_attn_to_qkv",
                "transformer_blocks_0_attn_to_added_qkv",
                "single_transformer_blocks_0_attn_to_qkv",
                "single_transformer_blocks_0_proj_mlp",
            ]
        );
        let rows: Vec<usize> = a
            .modules
            .iter()
            .filter_map(|m| Some(m.b.as_ref()?.shape[0]))
            .collect();
        assert_eq!(rows, [12, 12, 12, 16]);
        Ok(())
    }

    #[test]
    fn original_names_stay_on_an_original_export_or_another_model() -> TestResult {
        for paths in [
            &["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"][..],
            &["down_blocks.0.attentions.0.proj_in"][..],
        ] {
            let mut a = adapter(vec![module("double_blocks_0_img_attn_qkv", 2, 4, 12)]);
            assert_eq!(map_onto(&mut a, paths)?, 0);
            assert_eq!(a.modules[0].path, "double_blocks_0_img_attn_qkv");
        }
        Ok(())
    }

    #[test]
    fn rows_that_do_not_split_are_refused() {
        for m in [
            module("double_blocks_0_txt_attn_qkv", 2, 4, 10),
            module("single_blocks_1_linear1", 2, 4, 12),
            module("final_layer_adaLN_modulation_1", 2, 4, 7),
        ] {
            let name = format!("lora_unet_{}", m.path);
            let mut a = adapter(vec![m]);
            let e = map_onto(&mut a, &DIFFUSERS).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains(&name) && e.contains("rows")),
                "{e:?}"
            );
        }
    }
}
