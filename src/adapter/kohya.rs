//! kohya-ss (sd-scripts) LoRA files: one `.safetensors` whose keys are
//! `lora_<part>_<module path with '.' written '_'>.lora_down.weight` (r, in[, kh, kw]),
//! `.lora_up.weight` (out, r[, 1, 1]) and `.alpha` (scale alpha / r; without it 1), where
//! `<part>` is `unet`, `te`, `te1`, `te2` or `te3`; a module may instead hold LyCORIS LoHa
//! (`hada_*`) or LoKr (`lokr_*`) factors (see `lycoris`). The module paths stay in that
//! underscored form here; `rewrite` binds them to the model's dotted paths.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::SafeTensors;
use serde_json::Value;

use super::lycoris::Lycoris;
use super::peft::{Adapter, AdapterConfig, F32Tensor, ModuleAdapter, ModuleKind, read_f32_within};
use crate::error::{Error, Result};

/// The parts a kohya file can hold, by key prefix (longest first), with what each part is.
pub const PARTS: [(&str, &str, &str); 5] = [
    ("lora_unet_", "unet", "UNet / diffusion transformer"),
    ("lora_te1_", "te1", "first text encoder"),
    ("lora_te2_", "te2", "second text encoder"),
    // (sd-scripts' name for Flux's / SD3's T5 encoder)
    ("lora_te3_", "te3", "third text encoder (T5)"),
    ("lora_te_", "te", "text encoder"),
];

/// Key fragments of LyCORIS algorithms not supported, and what they are.
const LYCORIS: [(&str, &str); 6] = [
    (".lokr_t1", "LoKr with a Tucker core on w1 (lokr_t1)"),
    (".lora_mid.", "LoCon with a Tucker core (lora_mid)"),
    (".dora_scale", "DoRA (dora_scale)"),
    (".diff", "full-weight differences (diff)"),
    (".oft_", "OFT"),
    (".b1.weight", "(IA)^3 / GLoRA"),
];

/// ComfyUI's prefixes for kohya's parts: its module paths are dotted, after the model's name
/// in ComfyUI (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`).
const COMFY_PARTS: [(&str, &str); 3] = [
    ("diffusion_model.", "lora_unet_"),
    ("text_encoders.clip_l.transformer.", "lora_te1_"),
    ("text_encoders.t5xxl.transformer.", "lora_te3_"),
];

/// A key of kohya's layout split into its module and its parameter (`lora_down.weight`,
/// `lora_up.weight`, `alpha`, a LyCORIS `hada_*` / `lokr_*` factor); None for another key.
fn split_param(key: &str) -> Option<(&str, &str)> {
    if let Some(s) = [".lora_down.weight", ".lora_up.weight", ".alpha"]
        .iter()
        .find(|s| key.ends_with(*s))
    {
        return Some((&key[..key.len() - s.len()], &s[1..]));
    }
    let (module, last) = key.rsplit_once('.')?;
    (last.starts_with("hada_") || last.starts_with("lokr_")).then_some((module, last))
}

/// A key in ComfyUI's names as kohya writes it, as diffusers' Flux loader reads such files: the
/// part's prefix, and the module path's dots as underscores (`diffusion_model.double_blocks.0.
/// img_attn.qkv.lora_down.weight` → `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`);
/// None for a key in another layout.
fn from_comfy(key: &str) -> Option<String> {
    let (prefix, part) = COMFY_PARTS.iter().find(|(p, _)| key.starts_with(p))?;
    let (module, param) = split_param(&key[prefix.len()..])?;
    Some(format!("{part}{}.{param}", module.replace('.', "_")))
}

/// A key as kohya names it (ComfyUI's names turned into kohya's).
pub fn as_kohya(key: &str) -> std::borrow::Cow<'_, str> {
    match from_comfy(key) {
        Some(k) => std::borrow::Cow::Owned(k),
        None => std::borrow::Cow::Borrowed(key),
    }
}

/// The module a file's key belongs to, as the file names it (`lora_unet_…`, or ComfyUI's
/// `diffusion_model.…`).
pub fn file_module(key: &str) -> &str {
    split_param(key)
        .map(|(m, _)| m)
        .or_else(|| key.split_once('.').map(|(m, _)| m))
        .unwrap_or(key)
}

/// Whether the file's keys are kohya's (any key under a `lora_<part>_` prefix, or in ComfyUI's
/// names for them).
pub fn is_kohya(st: &SafeTensors) -> bool {
    st.names()
        .iter()
        .any(|k| PARTS.iter().any(|(p, _, _)| k.starts_with(p)) || from_comfy(k).is_some())
}

/// The part a module name belongs to, and the name without the prefix.
fn split_part(name: &str) -> Option<(&'static str, &str)> {
    PARTS
        .iter()
        .find_map(|(p, part, _)| name.strip_prefix(p).map(|rest| (*part, rest)))
}

/// What a part is, for messages.
pub fn part_description(part: &str) -> &'static str {
    PARTS
        .iter()
        .find(|(_, p, _)| *p == part)
        .map_or("part", |(_, _, d)| d)
}

/// Reads a kohya LoRA file from its bytes (`buf`, parsed as `st`).
pub fn load(path: &Path, buf: &[u8], st: &SafeTensors, limit: Option<usize>) -> Result<Adapter> {
    let err = |reason: String| Error::Adapter {
        path: path.to_path_buf(),
        reason,
    };
    // (each key as kohya names it, and the file's key; ComfyUI's names renamed)
    let mut names: Vec<(String, String)> = st
        .names()
        .into_iter()
        .map(|k| {
            (
                from_comfy(k).unwrap_or_else(|| k.to_string()),
                k.to_string(),
            )
        })
        .collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(err(format!(
            "keys '{}' and '{}' name the same tensor (kohya's and ComfyUI's names for one module)",
            w[0].1, w[1].1
        )));
    }
    let mut modules: BTreeMap<String, ModuleAdapter> = BTreeMap::new();
    let mut alphas: BTreeMap<String, f32> = BTreeMap::new();
    // LyCORIS factors by module, then by key suffix (`hada_w1_a`, `lokr_w2`, ...).
    let mut lyco: BTreeMap<String, BTreeMap<String, F32Tensor>> = BTreeMap::new();
    // (each module by the file's own name for it, for messages)
    let mut shown: BTreeMap<String, String> = BTreeMap::new();
    for (key, file_key) in &names {
        if let Some((_, what)) = LYCORIS.iter().find(|(frag, _)| key.contains(frag)) {
            return Err(err(format!(
                "key '{file_key}': LyCORIS {what} is not supported (plain LoRA only: lora_down / lora_up / alpha)"
            )));
        }
        let (module, suffix) = key.split_once('.').ok_or_else(|| {
            err(format!(
                "key '{file_key}' is not a kohya LoRA key (<module>.lora_down.weight)"
            ))
        })?;
        let Some((part, stem)) = split_part(module) else {
            return Err(err(format!(
                "key '{file_key}': unknown prefix (kohya keys start with lora_unet_, lora_te_, lora_te1_, lora_te2_ or lora_te3_)"
            )));
        };
        shown
            .entry(module.to_string())
            .or_insert_with(|| file_module(file_key).to_string());
        let t = read_f32_within(st, file_key, limit).map_err(&err)?;
        if suffix == "alpha" {
            let Some(&a) = t.data.first().filter(|_| t.data.len() == 1) else {
                return Err(err(format!(
                    "key '{file_key}': alpha has shape {:?}, not a scalar",
                    t.shape
                )));
            };
            alphas.insert(module.to_string(), a);
            continue;
        }
        let kind = if suffix.starts_with("hada_") || suffix.starts_with("lokr_") {
            ModuleKind::Lycoris
        } else {
            ModuleKind::Lora
        };
        let m = modules
            .entry(module.to_string())
            .or_insert_with(|| ModuleAdapter::empty(stem, kind, Some(part)));
        m.keys.push(file_key.clone());
        if m.kind != kind {
            return Err(err(format!(
                "module '{}' mixes LoRA (lora_down / lora_up) and LyCORIS (hada_* / lokr_*) keys",
                shown[module]
            )));
        }
        if kind == ModuleKind::Lycoris {
            lyco.entry(module.to_string())
                .or_default()
                .insert(suffix.to_string(), t);
            continue;
        }
        match suffix {
            "lora_down.weight" => m.a = Some(t),
            "lora_up.weight" => m.b = Some(t),
            _ => {
                return Err(err(format!(
                    "key '{file_key}' is not a kohya LoRA key (lora_down.weight, lora_up.weight, alpha)"
                )));
            }
        }
    }
    let mut out = Vec::with_capacity(modules.len());
    let mut max_rank = 0;
    for (name, mut m) in modules {
        if m.kind == ModuleKind::Lycoris {
            let l = Lycoris::from_factors(&shown[&name], lyco.remove(&name).unwrap_or_default())
                .map_err(&err)?;
            max_rank = max_rank.max(l.rank().unwrap_or(1));
            // Without an alpha, or for a LoKr of two whole factors, the scale is 1.
            m.alpha = match l.rank() {
                Some(r) => Some(alphas.remove(&name).unwrap_or(r as f32)),
                None => {
                    alphas.remove(&name);
                    Some(1.0)
                }
            };
            m.lycoris = Some(l);
            out.push(m);
            continue;
        }
        let (Some(a), Some(b)) = (&m.a, &m.b) else {
            return Err(err(format!(
                "module '{}' has only one of lora_down / lora_up",
                shown[&name]
            )));
        };
        if a.shape.len() < 2 || b.shape.len() < 2 || b.shape[1] != a.shape[0] {
            return Err(err(format!(
                "module '{}': lora_down {:?} and lora_up {:?} are not LoRA factors (r, in) and (out, r)",
                shown[&name], a.shape, b.shape
            )));
        }
        let r = a.shape[0];
        max_rank = max_rank.max(r);
        // Without an alpha the delta is B·A unscaled: alpha = r.
        m.alpha = Some(alphas.remove(&name).unwrap_or(r as f32));
        out.push(m);
    }
    if let Some(name) = alphas.keys().next() {
        return Err(err(format!(
            "'{}.alpha' has no lora_down / lora_up",
            shown[name]
        )));
    }
    if out.is_empty() {
        return Err(err("no LoRA modules in the file".into()));
    }
    // The file's `__metadata__` (training settings, for reports).
    let raw = SafeTensors::read_metadata(buf)
        .ok()
        .and_then(|(_, md)| md.metadata().clone())
        .map(|md| Value::Object(md.into_iter().map(|(k, v)| (k, Value::String(v))).collect()))
        .unwrap_or(Value::Null);
    Ok(Adapter::new(
        path,
        AdapterConfig::plain_lora(max_rank, max_rank as f32, raw),
        out,
    ))
}

/// A module path written kohya's way ('.' as '_').
pub fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

/// How a model's dotted module `path` fits a kohya module `name`, best first: the same when
/// underscored; the path ends with `.<name's modules>` (the export rooted above the trained model); the
/// name ends with `_<path>` for a path of two parts or more (rooted below it: a lone `conv1`
/// says nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    Same,
    RootedAbove,
    RootedBelow,
}

/// How `path` fits `name`, if it does.
pub fn fit(name: &str, path: &str) -> Option<Fit> {
    let u = underscored(path);
    if u == name {
        Some(Fit::Same)
    } else if u.ends_with(&format!("_{name}"))
        // (above at a module boundary: `single_transformer_blocks.0.attn.to_q` is not
        // `transformer_blocks_0_attn_to_q` rooted above)
        && path.as_bytes().get(path.len() - name.len() - 1) == Some(&b'.')
    {
        Some(Fit::RootedAbove)
    } else if path.contains('.') && name.ends_with(&format!("_{u}")) {
        Some(Fit::RootedBelow)
    } else {
        None
    }
}

/// How `path` fits the name of a module of the file's `part` (`lora_<part>_*`): as [`fit`],
/// except that a UNet module never fits under a VAE's `encoder.` / `decoder.`, whose blocks
/// have the UNet's names (`decoder.up_blocks.0.resnets.0.conv1`): kohya files adapt no VAE, and
/// a UNet file folded into a VAE export (one file of a pipeline exported part by part) must
/// match nothing there rather than change its convolutions.
pub fn fit_part(part: Option<&str>, name: &str, path: &str) -> Option<Fit> {
    let f = fit(name, path)?;
    if part == Some("unet") && f == Fit::RootedAbove && under_vae_coder(name, path) {
        return None;
    }
    Some(f)
}

/// Whether the dotted components of `path` above the ones that spell `name` end in `encoder`
/// or `decoder`.
fn under_vae_coder(name: &str, path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').collect();
    (1..parts.len())
        .find(|&k| underscored(&parts[k..].join(".")) == name)
        .is_some_and(|k| matches!(parts[k - 1], "encoder" | "decoder"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comfyui_names_read_as_kohyas() {
        assert_eq!(
            from_comfy("diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight").as_deref(),
            Some("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
        );
        assert_eq!(
            from_comfy(
                "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.alpha"
            )
            .as_deref(),
            Some("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha")
        );
        assert_eq!(
            from_comfy("diffusion_model.single_blocks.1.linear1.hada_w1_a").as_deref(),
            Some("lora_unet_single_blocks_1_linear1.hada_w1_a")
        );
        // (PEFT's layout under ComfyUI's prefix is not kohya's)
        assert_eq!(from_comfy("diffusion_model.x.lora_A.weight"), None);
        assert_eq!(from_comfy("lora_unet_x.lora_down.weight"), None);
    }

    #[test]
    fn parts_split_longest_prefix_first() {
        assert_eq!(
            split_part("lora_te1_text_model_encoder_layers_0_mlp_fc1"),
            Some(("te1", "text_model_encoder_layers_0_mlp_fc1"))
        );
        assert_eq!(
            split_part("lora_te_text_model_encoder_layers_0_mlp_fc1"),
            Some(("te", "text_model_encoder_layers_0_mlp_fc1"))
        );
        assert_eq!(
            split_part("lora_unet_mid_block_attentions_0_proj_in"),
            Some(("unet", "mid_block_attentions_0_proj_in"))
        );
        assert_eq!(split_part("base_model.model.x"), None);
        assert_eq!(
            underscored("down_blocks.0.attentions.0.proj_in"),
            "down_blocks_0_attentions_0_proj_in"
        );
    }

    #[test]
    fn rooted_above_only_at_a_module_boundary() {
        let name = "transformer_blocks_0_attn_to_q";
        assert_eq!(fit(name, "single_transformer_blocks.0.attn.to_q"), None);
        assert_eq!(
            fit(name, "transformer.transformer_blocks.0.attn.to_q"),
            Some(Fit::RootedAbove)
        );
        assert_eq!(fit(name, "transformer_blocks.0.attn.to_q"), Some(Fit::Same));
    }

    #[test]
    fn unet_modules_do_not_fit_a_vaes_blocks() {
        let unet = Some("unet");
        let name = "up_blocks_0_resnets_0_conv1";
        assert_eq!(
            fit_part(unet, name, "decoder.up_blocks.0.resnets.0.conv1"),
            None
        );
        assert_eq!(
            fit_part(unet, name, "vae.decoder.up_blocks.0.resnets.0.conv1"),
            None
        );
        assert_eq!(
            fit_part(
                unet,
                "down_blocks_1_resnets_0_conv2",
                "encoder.down_blocks.1.resnets.0.conv2"
            ),
            None
        );
        // A UNet under a wrapper, or the UNet itself, still fits; so do other parts' modules
        // (a text encoder's layers sit under `encoder.`).
        assert_eq!(
            fit_part(unet, name, "unet.up_blocks.0.resnets.0.conv1"),
            Some(Fit::RootedAbove)
        );
        assert_eq!(
            fit_part(unet, name, "up_blocks.0.resnets.0.conv1"),
            Some(Fit::Same)
        );
        assert_eq!(
            fit_part(Some("te"), "layers_0_mlp_fc1", "encoder.layers.0.mlp.fc1"),
            Some(Fit::RootedAbove)
        );
    }
}
