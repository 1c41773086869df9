//! diffusers LoRA files (`pytorch_lora_weights.safetensors` from diffusers' training scripts
//! and `save_lora_weights`, ai-toolkit's Flux LoRAs, ...): PEFT's key layout
//! (`<module>.lora_A.weight`, `.lora_B.weight`, DoRA's `.lora_magnitude_vector`, `.lora_B.bias`)
//! under the name of the pipeline part the module belongs to (`transformer.`, `unet.`,
//! `text_encoder.`, ...; none in a file saved by a model's own `save_lora_adapter`), with
//! diffusers' older layouts (`.lora.down.weight`, `.processor.to_q_lora.up.weight`,
//! `.lora_linear_layer.down.weight`) and optional `.alpha` keys, and no adapter_config.json:
//! the LoraConfig is the file's `lora_adapter_metadata` (safetensors metadata) or is derived
//! from the tensors as diffusers 0.42 derives it (`get_peft_kwargs`). A file may hold several
//! parts; the one that is the model is taken when the adapter is settled on it (`settle`).

use std::path::Path;
use std::sync::Arc;

use safetensors::SafeTensors;
use serde_json::{Map, Value, json};

use bytes::Bytes;

use super::peft::{Adapter, AdapterConfig, read_f32};
use crate::error::{Error, Result};
use crate::target::Candidate;

/// The file name diffusers saves LoRA weights under (looked for in a folder without
/// adapter_config.json).
pub const WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";

/// The pipeline parts diffusers' loaders load LoRA into (`_lora_loadable_modules`).
pub const PARTS: [&str; 8] = [
    "transformer",
    "unet",
    "transformer_2",
    "transformer_ref",
    "text_encoder",
    "text_encoder_2",
    "text_conditioner",
    "connectors",
];

/// The safetensors metadata entry holding the parts' LoraConfig (JSON, keys under each
/// part's prefix).
const METADATA_KEY: &str = "lora_adapter_metadata";

/// Key endings that make a file a LoRA file in one of diffusers' layouts.
const LORA_KEYS: [&str; 6] = [
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora.down.weight",
    ".lora.up.weight",
    ".lora_linear_layer.down.weight",
    ".lora_linear_layer.up.weight",
];

/// The endings of the keys PEFT loads from a diffusers file (after its layout's conversion).
const LORA_PARAMS: [&str; 7] = [
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_magnitude_vector",
    ".lora_magnitude_vector.weight",
    ".lora_embedding_A",
    ".lora_embedding_B",
];

/// diffusers' `UNET_TO_DIFFUSERS`: its older UNet / transformer layouts (after
/// `.processor.` → `.`), the first pattern a key contains replaced.
const UNET_TO_PEFT: [(&str, &str); 11] = [
    (".to_out_lora.up", ".to_out.0.lora_B"),
    (".to_out_lora.down", ".to_out.0.lora_A"),
    (".to_q_lora.down", ".to_q.lora_A"),
    (".to_q_lora.up", ".to_q.lora_B"),
    (".to_k_lora.down", ".to_k.lora_A"),
    (".to_k_lora.up", ".to_k.lora_B"),
    (".to_v_lora.down", ".to_v.lora_A"),
    (".to_v_lora.up", ".to_v.lora_B"),
    (".lora.up", ".lora_B"),
    (".lora.down", ".lora_A"),
    (
        ".to_out.lora_magnitude_vector",
        ".to_out.0.lora_magnitude_vector",
    ),
];

/// The same for text encoders (diffusers' old and new text-encoder layouts onto PEFT's, as its
/// `convert_state_dict_to_diffusers` then `convert_state_dict_to_peft` map CLIP's modules).
const TEXT_ENCODER_TO_PEFT: [(&str, &str); 10] = [
    (".to_q_lora.up", ".q_proj.lora_B"),
    (".to_q_lora.down", ".q_proj.lora_A"),
    (".to_k_lora.up", ".k_proj.lora_B"),
    (".to_k_lora.down", ".k_proj.lora_A"),
    (".to_v_lora.up", ".v_proj.lora_B"),
    (".to_v_lora.down", ".v_proj.lora_A"),
    (".to_out_lora.up", ".out_proj.lora_B"),
    (".to_out_lora.down", ".out_proj.lora_A"),
    (".lora_linear_layer.up", ".lora_B"),
    (".lora_linear_layer.down", ".lora_A"),
];

/// The text-encoder modules whose ranks diffusers reads for the config (`rank` in its
/// `_load_lora_into_text_encoder`); a module of another name gets the config's `r`.
const TEXT_ENCODER_RANKED: [&str; 6] =
    [".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2"];

/// A diffusers LoRA file, every part of it read.
#[derive(Debug)]
pub struct DiffusersFile {
    /// The file's bytes (mapped): a part's tensors are decoded when it is built.
    buf: Bytes,
    pub parts: Vec<FilePart>,
    /// `lora_adapter_metadata`: LoraConfig entries under each part's prefix.
    metadata: Option<Map<String, Value>>,
}

/// One pipeline part's keys.
#[derive(Debug)]
pub struct FilePart {
    /// `transformer`, `unet`, ...; empty for a file without part prefixes.
    pub name: String,
    /// (file key, key under the part, shape), in the file's data order (the order diffusers
    /// reads them in, which decides ties in its config).
    tensors: Vec<(String, String, Vec<usize>)>,
    /// `.alpha` keys: (file key, module path, value).
    alphas: Vec<(String, String, f32)>,
    /// Its first key in data order (an `.alpha` key or a tensor's).
    first_key: String,
}

/// A module's path with the shapes of its lora_A and lora_B, where the file has them.
type ModuleShapes = (String, Option<Vec<usize>>, Option<Vec<usize>>);

impl FilePart {
    fn is_text_encoder(&self) -> bool {
        self.name.starts_with("text_")
    }

    /// Module paths of its LoRA factors (as the part's layout converts them).
    fn module_paths(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .converted(false)
            .iter()
            .filter_map(|(_, k, _)| Some(k.split_once(".lora_")?.0.to_string()))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether some module path of its factors begins with `prefix` (a `--root`).
    pub fn has_path_under(&self, prefix: &str) -> bool {
        self.module_paths().iter().any(|p| p.starts_with(prefix))
    }

    /// Its modules with the shapes of their lora_A and lora_B (as the layout converts them).
    fn module_shapes(&self) -> Vec<ModuleShapes> {
        let mut out: Vec<ModuleShapes> = Vec::new();
        for (_, key, shape) in self.converted(false) {
            let Some((module, rest)) = key.split_once(".lora_") else {
                continue;
            };
            let i = match out.iter().position(|(m, _, _)| m == module) {
                Some(i) => i,
                None => {
                    out.push((module.to_string(), None, None));
                    out.len() - 1
                }
            };
            match rest {
                "A.weight" => out[i].1 = Some(shape.to_vec()),
                "B.weight" => out[i].2 = Some(shape.to_vec()),
                _ => {}
            }
        }
        out
    }

    /// Its tensors under PEFT's key layout: (file key, PEFT key, tensor). A UNet /
    /// transformer part is converted when its first key (data order, with the `.alpha` keys
    /// unless `alphas_popped`) is not a `lora_A` key, as diffusers' `load_lora_adapter` does.
    fn converted(&self, alphas_popped: bool) -> Vec<(&str, String, &[usize])> {
        let map = |k: &str, table: &[(&str, &str)]| -> String {
            let k = k.replace(".processor.", ".");
            match table.iter().find(|(from, _)| k.contains(from)) {
                Some((from, to)) => k.replace(from, to),
                None => k,
            }
        };
        let first = match alphas_popped {
            true => self.tensors.first().map(|(k, _, _)| k.as_str()),
            false => Some(self.first_key.as_str()),
        };
        let convert = self.is_text_encoder() || first.is_some_and(|k| !k.contains("lora_A"));
        self.tensors
            .iter()
            .map(|(file, key, t)| {
                let key = match (convert, self.is_text_encoder()) {
                    (false, _) => key.clone(),
                    (true, false) => map(key, &UNET_TO_PEFT),
                    (true, true) => map(key, &TEXT_ENCODER_TO_PEFT),
                };
                (file.as_str(), key, t.as_slice())
            })
            .collect()
    }
}

/// Whether a safetensors file (without adapter_config.json beside it) is a diffusers LoRA
/// file: LoRA factor keys in one of diffusers' layouts, none of them PEFT's own
/// (`base_model.model.`), which needs its config.
pub fn is_diffusers(st: &SafeTensors) -> bool {
    let names = st.names();
    !names.iter().any(|k| k.starts_with("base_model.model."))
        && names
            .iter()
            .any(|k| LORA_KEYS.iter().any(|s| k.ends_with(s)) || k.contains("_lora.down."))
}

/// Reads a diffusers LoRA file (bytes `buf`, parsed as `st`). The adapter it returns holds
/// the file's first part (transformer / UNet first) as diffusers would load it alone; the
/// others stay in `Adapter::diffusers` for `settle`.
pub fn load(path: &Path, buf: &Bytes, st: &SafeTensors) -> Result<Adapter> {
    let err = |reason: String| Error::Adapter {
        path: path.to_path_buf(),
        reason,
    };
    let (_, meta) = SafeTensors::read_metadata(buf).map_err(|e| err(e.to_string()))?;
    // (the order the tensors' data lies in, which is the order torch's loader gives them)
    let mut names: Vec<(usize, String)> = meta
        .tensors()
        .into_iter()
        .map(|(k, info)| (info.data_offsets.0, k))
        .collect();
    names.sort();
    let metadata = match meta.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)) {
        None => None,
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => Some(m),
            Ok(_) | Err(_) => {
                return Err(err(format!(
                    "its {METADATA_KEY} (safetensors metadata) is not a JSON object"
                )));
            }
        },
    };
    let first = |k: &str| k.split_once('.').map_or(k, |(f, _)| f).to_string();
    let prefixed = names
        .iter()
        .filter(|(_, k)| PARTS.contains(&first(k).as_str()))
        .count();
    if prefixed != 0 && prefixed != names.len() {
        let (_, with) = names
            .iter()
            .find(|(_, k)| PARTS.contains(&first(k).as_str()))
            .unwrap_or(&names[0]);
        let (_, without) = names
            .iter()
            .find(|(_, k)| !PARTS.contains(&first(k).as_str()))
            .unwrap_or(&names[0]);
        return Err(err(format!(
            "key '{with}' names a pipeline part and key '{without}' does not: a diffusers LoRA file has either every key under a part ({}) or none",
            PARTS.join(", ")
        )));
    }
    let mut parts: Vec<FilePart> = Vec::new();
    for (_, key) in &names {
        let (part, rest) = match prefixed {
            0 => (String::new(), key.as_str()),
            _ => match key.split_once('.') {
                Some((p, rest)) => (p.to_string(), rest),
                None => (key.clone(), ""),
            },
        };
        let i = match parts.iter().position(|p| p.name == part) {
            Some(i) => i,
            None => {
                parts.push(FilePart {
                    name: part,
                    tensors: Vec::new(),
                    alphas: Vec::new(),
                    first_key: key.clone(),
                });
                parts.len() - 1
            }
        };
        if let Some(module) = rest.strip_suffix(".alpha") {
            let t = read_f32(st, key).map_err(&err)?;
            let Some(&a) = t.data.first().filter(|_| t.data.len() == 1) else {
                return Err(err(format!(
                    "key '{key}': alpha has shape {:?}, not a scalar",
                    t.shape
                )));
            };
            parts[i].alphas.push((key.clone(), module.to_string(), a));
        } else {
            let shape = st
                .tensor(key)
                .map_err(|e| err(format!("{key}: {e}")))?
                .shape()
                .to_vec();
            parts[i]
                .tensors
                .push((key.clone(), rest.to_string(), shape));
        }
    }
    parts.retain(|p| !p.tensors.is_empty());
    // (transformer / UNet parts first, then the file's order)
    parts.sort_by_key(|p| p.is_text_encoder());
    if parts.is_empty() {
        return Err(err("holds no LoRA factors".into()));
    }
    let file = Arc::new(DiffusersFile {
        buf: buf.clone(),
        parts,
        metadata,
    });
    let mut adapter = Adapter {
        diffusers: Some(file.clone()),
        ..Adapter::new(
            path,
            AdapterConfig::from_value(json!({"r": 1, "lora_alpha": 1})).map_err(&err)?,
            Vec::new(),
        )
    };
    // (the first part that diffusers could load alone; what a part leaves out is said once the
    // model has chosen the part: `settle`)
    let mut first_error = None;
    for at in 0..file.parts.len() {
        match build(&mut adapter, &file, at, false, false) {
            Ok(_) => {
                adapter.ignored.clear();
                return Ok(adapter);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| err("holds no LoRA factors".into())))
}

/// Whether a Flux.1 transformer is what the model's module paths are (diffusers'
/// `FluxTransformer2DModel`: its Linear `x_embedder` and its single blocks' `proj_mlp`):
/// diffusers' Flux loader is the one that reads `.alpha` keys.
fn is_flux(model_paths: &[&str]) -> bool {
    let ends = |p: &str, tail: &str| p == tail || p.ends_with(&format!(".{tail}"));
    model_paths.iter().any(|p| ends(p, "x_embedder"))
        && model_paths
            .iter()
            .any(|p| p.contains("single_transformer_blocks.") && p.ends_with(".proj_mlp"))
}

/// Takes, of a diffusers file's parts, the one that is the model (`cands`, with the module
/// paths `model_paths`): the part with the fewest modules the model lacks, then the most it
/// has; and sets the adapter's config and modules to that part's as diffusers loads it.
/// Returns what it leaves out (the other parts, `.alpha` keys diffusers ignores), for
/// warnings.
pub fn settle(
    adapter: &mut Adapter,
    cands: &[Candidate],
    model_paths: &[&str],
) -> Result<Vec<String>> {
    let Some(file) = adapter.diffusers.clone() else {
        return Ok(Vec::new());
    };
    // (a module is the model's where a layer at its path takes factors of its shapes: SDXL's
    // two text encoders share their module paths, not their widths; a path the model reaches
    // only through an alias or a packed layer counts by name)
    let fits = |p: &str, a: &Option<Vec<usize>>, b: &Option<Vec<usize>>| {
        let named: Vec<&Candidate> = cands
            .iter()
            .filter(|c| crate::target::select::name_matches(&c.module, p))
            .collect();
        match (a, b) {
            _ if named.is_empty() => crate::target::select::found_as_is(cands, p),
            (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => named.iter().any(|c| {
                c.out_features == b[0] as i64 && (a.len() != 2 || c.in_features == a[1] as i64)
            }),
            _ => true,
        }
    };
    let without_text_model = !model_paths.iter().any(|p| p.starts_with("text_model."));
    // (modules it lacks, modules it has) of each part
    let score = |part: &FilePart| {
        let modules = part.module_shapes();
        let found = modules
            .iter()
            .filter(|(p, a, b)| {
                fits(p, a, b)
                    || (without_text_model
                        && p.strip_prefix("text_model.").is_some_and(|q| fits(q, a, b)))
            })
            .count();
        (modules.len() - found, std::cmp::Reverse(found))
    };
    let scores: Vec<_> = file.parts.iter().map(score).collect();
    let mut order: Vec<usize> = (0..file.parts.len()).collect();
    order.sort_by_key(|&i| scores[i]);
    let named = match &adapter.diffusers_part {
        Some(name) => Some(part_named(&file, name)?),
        None => None,
    };
    let best = named.unwrap_or(order[0]);
    let found = |i: usize| scores[i].1.0;
    if let Some(&next) = order.get(1)
        && named.is_none()
        && found(best) > 0
        && scores[next] == scores[best]
    {
        return Err(Error::Adapter {
            path: adapter.path.clone(),
            reason: format!(
                "the file's parts '{}' and '{}' fit this model alike ({} of their modules found); diffusers loads each into its own pipeline part: say which this model is with --part",
                file.parts[best].name,
                file.parts[next].name,
                found(best)
            ),
        });
    }
    let part = &file.parts[best];
    // (diffusers' Flux.1 loader: the model is its transformer; a text encoder's part, when the
    // file's transformer part has single-stream blocks, which of the pipelines that load a
    // transformer and a text encoder only Flux's has)
    // (a file without part prefixes loads only through a model's own `load_lora_adapter`,
    // which takes no alphas)
    let flux = if let Some(read) = adapter.alpha_keys {
        read
    } else if part.name.is_empty() {
        false
    } else if part.is_text_encoder() {
        file.parts.iter().any(|p| {
            p.name == "transformer"
                && p.module_paths()
                    .iter()
                    .any(|m| m.starts_with("single_transformer_blocks."))
        })
    } else {
        is_flux(model_paths)
    };
    let strip_text_model = part.is_text_encoder() && without_text_model;
    let mut left_out = build(adapter, &file, best, flux, strip_text_model)?;
    for (_, other) in file.parts.iter().enumerate().filter(|(i, _)| *i != best) {
        left_out.push(format!(
            "the file's '{}' part ({} module(s)): diffusers loads it into the pipeline's {}; this model is taken as the '{}' part",
            other.name,
            other.module_paths().len(),
            other.name,
            part.name
        ));
    }
    Ok(left_out)
}

/// The index of the file's part `name` (`--part`).
fn part_named(file: &DiffusersFile, name: &str) -> Result<usize> {
    file.parts
        .iter()
        .position(|p| p.name == name)
        .ok_or_else(|| {
            let parts: Vec<&str> = file
                .parts
                .iter()
                .map(|p| match p.name.as_str() {
                    "" => "(none: keys without part prefixes)",
                    n => n,
                })
                .collect();
            Error::Usage(format!(
                "--part {name}: the file has no such part (its parts: {})",
                parts.join(", ")
            ))
        })
}

/// Sets the adapter's config and modules to those of the file's part `at`, as diffusers
/// loads it: `flux` when diffusers' Flux loader reads it (it alone takes `.alpha` keys) or the
/// user says the alphas count (`Adapter::alpha_keys`),
/// `strip_text_model` when the text encoder has no `text_model.` level (transformers 5's
/// CLIPTextModel), whose keys diffusers then reads without it. Returns what it ignores.
fn build(
    adapter: &mut Adapter,
    file: &DiffusersFile,
    at: usize,
    flux: bool,
    strip_text_model: bool,
) -> Result<Vec<String>> {
    let part = &file.parts[at];
    let err = |reason: String| Error::Adapter {
        path: adapter.path.clone(),
        reason,
    };
    let alphas: &[(String, String, f32)] = if flux { &part.alphas } else { &[] };
    let mut ignored = Vec::new();
    if !flux && let Some((key, _, _)) = part.alphas.first() {
        let why = if adapter.alpha_keys.is_some() {
            "--alpha-keys ignore; every module takes the scale it has without them"
        } else if part.name.is_empty() {
            "a file without pipeline-part prefixes loads through a model's own load_lora_adapter, which reads no alphas; every module gets the scale diffusers gives it"
        } else {
            "diffusers' loaders read them only for Flux.1, and this is not a Flux.1 transformer (nor a text encoder of a file with Flux's single-stream blocks; --alpha-keys read says it is); every module gets the scale diffusers gives it"
        };
        ignored.push(format!(
            "the .alpha keys of {} module(s) ('{key}', ...): {why}",
            part.alphas.len()
        ));
    }
    if part.is_text_encoder() {
        readable_text_encoder(part).map_err(&err)?;
    }
    let mut tensors = part.converted(flux);
    if strip_text_model {
        for (_, k, _) in &mut tensors {
            if let Some(rest) = k.strip_prefix("text_model.") {
                *k = rest.to_string();
            }
        }
    }
    let prefix = match part.name.as_str() {
        "" => String::new(),
        p => format!("{p}."),
    };
    let metadata = file.metadata.as_ref().map(|m| {
        m.iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix.as_str())?.to_string(), v.clone())))
            .collect::<Map<String, Value>>()
    });
    let (raw, source) = match metadata {
        Some(_) if !alphas.is_empty() => {
            return Err(err(format!(
                "it holds both {METADATA_KEY} and .alpha keys ('{}'), which diffusers' Flux loader refuses",
                alphas[0].0
            )));
        }
        Some(m) if m.is_empty() => {
            return Err(err(format!(
                "its {METADATA_KEY} has no entries for its '{}' part (diffusers would configure that part with LoraConfig's defaults, which target nothing)",
                part.name
            )));
        }
        Some(mut m) => {
            // (diffusers hands PEFT the state dict, and PEFT then adapts the modules the
            // state dict has factors for, whatever target_modules / exclude_modules say)
            m.insert("target_modules".into(), json!(module_list(&tensors)));
            for k in ["exclude_modules", "layers_to_transform", "layers_pattern"] {
                m.remove(k);
            }
            (Value::Object(m), format!("its {METADATA_KEY}"))
        }
        None => (
            derive_config(&tensors, alphas, part.is_text_encoder()).map_err(&err)?,
            "the config diffusers derives from its factors".to_string(),
        ),
    };
    let config = AdapterConfig::from_value(raw).map_err(|r| err(format!("{source}: {r}")))?;
    if let Some(note) = super::peft::unknown_keys_note(&config) {
        ignored.push(format!(
            "{note} in its {METADATA_KEY}: diffusers 0.42 with PEFT 0.21.2 refuses the file (LoraConfig cannot be built from them), a PEFT that has them may configure a LoRA variant; onnx-lora leaves them out, as PEFT does for adapter_config.json"
        ));
    }
    // (diffusers' alpha patterns are not anchored: a module whose path ends with an earlier
    // pattern's takes that pattern's alpha rather than its own)
    let shadowed: Vec<String> = alphas
        .iter()
        .filter_map(|(key, module, a)| {
            let p = config
                .alpha_pattern
                .iter()
                .find(|p| p.regex.is_match(module))?;
            (p.value != *a)
                .then(|| format!("'{key}' = {a} takes {} from pattern '{}'", p.value, p.key))
        })
        .collect();
    if let Some(first) = shadowed.first() {
        ignored.push(format!(
            "the own alpha of {} module(s) ({first}{}): diffusers matches its alpha patterns by the end of a module's path, so an earlier module whose path ends this one's gives it its alpha; onnx-lora scales as diffusers does",
            shadowed.len(),
            if shadowed.len() > 1 { ", ..." } else { "" }
        ));
    }
    // (keys that are no LoRA parameter reach PEFT as unexpected keys, which it leaves out)
    type Keys = Vec<(String, String)>;
    let (mut names, others): (Keys, Keys) = tensors
        .iter()
        .map(|(file, key, _)| (file.to_string(), key.clone()))
        .partition(|(_, key)| LORA_PARAMS.iter().any(|p| key.ends_with(p)));
    if let Some((first, _)) = others.first() {
        ignored.push(format!(
            "{} key(s) that are no LoRA parameter in diffusers' layouts ('{first}'{}): diffusers hands them to PEFT, which does not load them",
            others.len(),
            if others.len() > 1 { ", ..." } else { "" }
        ));
    }
    names.sort_by(|a, b| a.1.cmp(&b.1));
    // (only this part's factors are decoded, once; the modules of a part built before are
    // dropped first)
    adapter.modules.clear();
    let st = SafeTensors::deserialize(&file.buf).map_err(|e| err(e.to_string()))?;
    let read = |k: &str| read_f32(&st, k);
    let (modules, more) =
        super::peft::from_tensors(&config, &names, read, "", &source).map_err(err)?;
    ignored.extend(more);
    adapter.config = config;
    adapter.modules = modules;
    adapter.ignored = ignored.clone();
    Ok(ignored)
}

/// Refuses a text-encoder part diffusers cannot read: its conversion (`convert_state_dict_to_
/// diffusers`, then `_to_peft`) infers the layout from the attention projections' keys
/// (`to_out_lora`, PEFT's `q_proj.lora_A`…, `lora_linear_layer`) and fails without them.
fn readable_text_encoder(part: &FilePart) -> std::result::Result<(), String> {
    let keys = || part.tensors.iter().map(|(_, k, _)| k.as_str());
    let attention_peft = keys().any(|k| {
        [
            ".q_proj.lora_",
            ".k_proj.lora_",
            ".v_proj.lora_",
            ".out_proj.lora_",
            "to_k.lora_",
            "to_q.lora_",
            "to_v.lora_",
            "to_out.0.lora_",
        ]
        .iter()
        .any(|p| k.contains(p))
            && (k.contains("lora_A") || k.contains("lora_B"))
    });
    if keys().any(|k| k.contains("to_out_lora") || k.contains("lora_linear_layer"))
        || attention_peft
    {
        return Ok(());
    }
    Err(format!(
        "its '{}' part has no attention projection's factors in a layout diffusers can tell (to_out_lora, q_proj.lora_A…, lora_linear_layer): diffusers refuses such a text-encoder part (\"Could not automatically infer state dict type\")",
        part.name
    ))
}

/// The modules of a part's keys (`<module>.lora…`), as diffusers lists its `target_modules`.
fn module_list(tensors: &[(&str, String, &[usize])]) -> Vec<String> {
    let mut targets: Vec<String> = tensors
        .iter()
        .map(|(_, k, _)| k.split(".lora").next().unwrap_or(k).to_string())
        .collect();
    targets.sort_unstable();
    targets.dedup();
    targets
}

/// The LoraConfig diffusers 0.42's `get_peft_kwargs` builds for a part without metadata:
/// `r` the most common rank (ties: the first in file order), `rank_pattern` the other
/// modules' (`^`-anchored for a UNet / transformer); without alphas every module's alpha is
/// its rank (scale 1); with them `lora_alpha` is the first alpha and `alpha_pattern` every
/// module whose alpha differs from it (not anchored: diffusers' own keys), which PEFT matches
/// in that order; `target_modules` every module of the part.
fn derive_config(
    tensors: &[(&str, String, &[usize])],
    alphas: &[(String, String, f32)],
    text_encoder: bool,
) -> std::result::Result<Value, String> {
    let mut ranks: Vec<(String, usize)> = Vec::new();
    for (_, key, t) in tensors {
        let Some((module, _)) = key.split_once(".lora_B.") else {
            continue;
        };
        if t.len() < 2 {
            continue;
        }
        if text_encoder {
            if TEXT_ENCODER_RANKED.iter().any(|s| module.ends_with(s)) {
                ranks.push((module.to_string(), t[1]));
            }
        } else {
            ranks.push((format!("^{module}"), t[1]));
        }
    }
    let Some(&(_, first)) = ranks.first() else {
        return Err(
            match tensors
                .iter()
                .find_map(|(_, k, _)| k.split_once(".lora_A."))
            {
                Some((module, _)) => format!("module '{module}' has only one of lora_A / lora_B"),
                None => "no lora_B factor to take the rank from".into(),
            },
        );
    };
    let mut r = first;
    let mut lora_alpha = first as f64;
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    let mut distinct: Vec<(usize, usize)> = Vec::new();
    for (_, v) in &ranks {
        match distinct.iter_mut().find(|(r, _)| r == v) {
            Some((_, n)) => *n += 1,
            None => distinct.push((*v, 1)),
        }
    }
    if distinct.len() > 1 {
        // (Counter.most_common: the highest count, ties in first-seen order)
        let most = distinct.iter().map(|(_, n)| *n).max().unwrap_or(0);
        r = distinct
            .iter()
            .find(|(_, n)| *n == most)
            .map_or(first, |(v, _)| *v);
        for (k, v) in &ranks {
            if *v != r {
                rank_pattern.insert(k.clone(), json!(v));
            }
        }
        if alphas.is_empty() {
            lora_alpha = r as f64;
            alpha_pattern = rank_pattern.clone();
        }
    }
    if let Some((_, _, a0)) = alphas.first() {
        // (diffusers counts the alpha tensors by identity: with more than one, the first is
        // `lora_alpha` and every one of another value a pattern)
        lora_alpha = f64::from(*a0);
        for (_, module, a) in alphas.iter().skip(1) {
            if a != a0 {
                // (diffusers' two ways from the alpha's key to the module's)
                let k = format!("{module}.alpha");
                let key = if text_encoder {
                    let head = k.split(".down.").next().unwrap_or(&k);
                    head.rsplit_once('.').map_or("", |(m, _)| m).to_string()
                } else {
                    k.split(".lora_A.")
                        .next()
                        .unwrap_or(&k)
                        .replace(".alpha", "")
                };
                alpha_pattern.insert(key, json!(f64::from(*a)));
            }
        }
    }
    let targets = module_list(tensors);
    let dora = tensors
        .iter()
        .any(|(_, k, _)| k.contains("lora_magnitude_vector"));
    let bias = tensors
        .iter()
        .any(|(_, k, _)| k.contains("lora_B") && k.ends_with(".bias"));
    Ok(json!({
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "use_dora": dora,
        "lora_bias": bias,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), String>;

    /// A safetensors file of f32 tensors (shape; alphas get `value`) with optional metadata.
    fn file(tensors: &[(&str, Vec<usize>, f32)], meta: Option<&str>) -> Vec<u8> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(k, s, v)| {
                let n: usize = s.iter().product();
                let data = (0..n)
                    .flat_map(|i| (v + 0.01 * i as f32).to_le_bytes())
                    .collect();
                (k.to_string(), s.clone(), data)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(k, s, b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
                (k.clone(), view.expect("a view"))
            })
            .collect();
        let meta = meta.map(|m| {
            [(METADATA_KEY.to_string(), m.to_string())]
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>()
        });
        safetensors::serialize(views, meta).expect("serialized")
    }

    fn read(buf: &[u8]) -> Result<Adapter> {
        let buf = Bytes::copy_from_slice(buf);
        let st = SafeTensors::deserialize(&buf).map_err(|e| Error::Usage(e.to_string()))?;
        load(Path::new("lora.safetensors"), &buf, &st)
    }

    fn lora(module: &str, r: usize) -> Vec<(String, Vec<usize>, f32)> {
        vec![
            (format!("{module}.lora_A.weight"), vec![r, 8], 0.0),
            (format!("{module}.lora_B.weight"), vec![8, r], 0.5),
        ]
    }

    fn keys(list: &[(String, Vec<usize>, f32)]) -> Vec<(&str, Vec<usize>, f32)> {
        list.iter()
            .map(|(k, s, v)| (k.as_str(), s.clone(), *v))
            .collect()
    }

    /// A file read, then its first part built (`flux`: alphas read; `strip`: without
    /// `text_model.`): the adapter and what the build left out.
    fn built(buf: &[u8], flux: bool, strip: bool) -> Result<(Adapter, Vec<String>)> {
        let mut a = read(buf)?;
        let f = a.diffusers.clone().expect("a diffusers file");
        let said = build(&mut a, &f, 0, flux, strip)?;
        Ok((a, said))
    }

    /// The config `build` gives a file's first part (`flux`: alphas read).
    fn config_of(list: &[(String, Vec<usize>, f32)], flux: bool) -> Result<Adapter> {
        Ok(built(&file(&keys(list), None), flux, false)?.0)
    }

    fn scale(a: &Adapter, path: &str) -> f32 {
        let m = a
            .modules
            .iter()
            .find(|m| m.path == path)
            .expect("the module");
        a.scaling(m)
    }

    #[test]
    fn without_alphas_every_module_scales_by_one() -> TestResult {
        let mut list = lora("transformer.a.to_q", 4);
        list.extend(lora("transformer.a.ff", 8));
        list.extend(lora("transformer.b.to_q", 4));
        let a = config_of(&list, true).map_err(|e| e.to_string())?;
        assert_eq!(a.config.r, 4);
        for m in ["a.to_q", "a.ff", "b.to_q"] {
            assert_eq!(scale(&a, m), 1.0, "{m}");
        }
        // (the minority rank is a pattern anchored at the path's start)
        assert_eq!(a.config.rank_pattern[0].key, "^a.ff");
        Ok(())
    }

    #[test]
    fn alphas_count_only_for_flux_and_the_first_is_the_default() -> TestResult {
        let mut list = lora("transformer.a.to_q", 4);
        list.push(("transformer.a.to_q.alpha".into(), vec![], 2.0));
        list.extend(lora("transformer.b.to_q", 4));
        list.extend(lora("transformer.c.to_q", 4));
        list.push(("transformer.c.to_q.alpha".into(), vec![], 8.0));
        let flux = config_of(&list, true).map_err(|e| e.to_string())?;
        assert_eq!(scale(&flux, "a.to_q"), 0.5);
        // (no alpha of its own: the first alpha diffusers read)
        assert_eq!(scale(&flux, "b.to_q"), 0.5);
        assert_eq!(scale(&flux, "c.to_q"), 2.0);
        let other = config_of(&list, false).map_err(|e| e.to_string())?;
        assert!(other.modules.iter().all(|m| other.scaling(m) == 1.0));
        Ok(())
    }

    #[test]
    fn a_shorter_paths_alpha_pattern_shadows_a_deeper_modules_alpha() -> TestResult {
        let mut list = lora("transformer.a", 4);
        list.push(("transformer.a.alpha".into(), vec![], 2.0));
        list.extend(lora("transformer.proj_out", 4));
        list.push(("transformer.proj_out.alpha".into(), vec![], 8.0));
        list.extend(lora("transformer.single.0.proj_out", 4));
        list.push(("transformer.single.0.proj_out.alpha".into(), vec![], 4.0));
        let (a, said) = built(&file(&keys(&list), None), true, false).map_err(|e| e.to_string())?;
        assert_eq!(scale(&a, "single.0.proj_out"), 2.0);
        assert!(
            said.iter().any(|w| w.contains(
                "'transformer.single.0.proj_out.alpha' = 4 takes 8 from pattern 'proj_out'"
            )),
            "{said:?}"
        );
        Ok(())
    }

    #[test]
    fn text_encoder_ranks_are_read_from_its_projections_only() -> TestResult {
        let mut list = lora(
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
            4,
        );
        list.extend(lora("text_encoder.text_model.encoder.layers.0.mlp.fc1", 2));
        list.extend(lora("text_encoder.text_model.encoder.layers.0.mlp.fc2", 2));
        let (a, _) = built(&file(&keys(&list), None), false, true).map_err(|e| e.to_string())?;
        assert_eq!(a.config.r, 2);
        assert_eq!(
            a.config.rank_pattern[0].key,
            "encoder.layers.0.self_attn.q_proj"
        );
        assert!(a.modules.iter().all(|m| !m.path.starts_with("text_model.")));
        // (a module of another name takes r: factors of another rank are what PEFT refuses)
        let mut list = lora("text_encoder.text_projection", 4);
        list.extend(lora("text_encoder.encoder.layers.0.self_attn.q_proj", 2));
        list.extend(lora("text_encoder.encoder.layers.0.mlp.fc1", 2));
        list.extend(lora("text_encoder.encoder.layers.0.mlp.fc2", 2));
        let e = read(&file(&keys(&list), None))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'text_projection' has factors of rank 4") && e.contains("r = 2"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn older_layouts_are_read_as_diffusers_converts_them() -> TestResult {
        let list = [
            (
                "unet.b.attn1.processor.to_q_lora.down.weight",
                vec![4, 8],
                0.0,
            ),
            (
                "unet.b.attn1.processor.to_q_lora.up.weight",
                vec![8, 4],
                0.5,
            ),
            ("unet.b.proj_in.lora.down.weight", vec![4, 8], 0.0),
            ("unet.b.proj_in.lora.up.weight", vec![8, 4], 0.5),
        ];
        let a = read(&file(&list, None)).map_err(|e| e.to_string())?;
        let mut paths: Vec<&str> = a.modules.iter().map(|m| m.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["b.attn1.to_q", "b.proj_in"]);
        assert!(a.modules[0].keys[0].starts_with("unet.b."));
        Ok(())
    }

    #[test]
    fn metadata_is_the_config_of_each_part() -> TestResult {
        let mut list = lora("transformer.a.to_q", 4);
        list.extend(lora("transformer.a.to_k", 4));
        let meta = r#"{"transformer.r": 4, "transformer.lora_alpha": 16, "transformer.target_modules": ["to_q"]}"#;
        let a = read(&file(&keys(&list), Some(meta))).map_err(|e| e.to_string())?;
        // (PEFT, handed the state dict, adapts every module it has factors for)
        assert_eq!(
            a.modules.len(),
            2,
            "to_k is adapted though target_modules leaves it out"
        );
        assert_eq!(scale(&a, "a.to_q"), 4.0);
        assert_eq!(scale(&a, "a.to_k"), 4.0);
        // (entries for another part only: diffusers would use LoraConfig's defaults)
        let meta = r#"{"unet.r": 4, "unet.lora_alpha": 16}"#;
        let e = read(&file(&keys(&list), Some(meta)))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no entries for its 'transformer' part"), "{e}");
        // (with alphas, as diffusers' Flux loader refuses)
        list.push(("transformer.a.to_q.alpha".into(), vec![], 2.0));
        let meta = r#"{"transformer.r": 4, "transformer.lora_alpha": 16, "transformer.target_modules": ["to_q"]}"#;
        let e = built(&file(&keys(&list), Some(meta)), true, false)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("both lora_adapter_metadata and .alpha keys"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn parts_are_all_or_none_and_keys_without_parts_are_one_part() -> TestResult {
        let mut list = lora("transformer.a.to_q", 4);
        list.extend(lora("blocks.0.to_q", 4));
        let e = read(&file(&keys(&list), None))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'blocks.0.to_q.lora_A.weight' does not"), "{e}");
        let a = read(&file(&keys(&lora("blocks.0.to_q", 4)), None)).map_err(|e| e.to_string())?;
        assert_eq!(a.modules[0].path, "blocks.0.to_q");
        let f = a.diffusers.as_ref().expect("a diffusers file");
        assert_eq!(f.parts[0].name, "");
        Ok(())
    }
    #[test]
    fn a_file_without_part_prefixes_takes_no_alphas() -> TestResult {
        let mut list = lora("blocks.0.to_q", 4);
        list.push(("blocks.0.to_q.alpha".into(), vec![], 2.0));
        // (`settle` reads no alphas for a file without parts unless told: `flux` false)
        let (a, said) =
            built(&file(&keys(&list), None), false, false).map_err(|e| e.to_string())?;
        assert_eq!(scale(&a, "blocks.0.to_q"), 1.0);
        assert!(
            said.iter()
                .any(|w| w.contains("load_lora_adapter, which reads no alphas")),
            "{said:?}"
        );
        Ok(())
    }

    #[test]
    fn text_encoder_parts_diffusers_cannot_read_are_refused() {
        let mut list = lora("text_encoder.encoder.layers.0.mlp.fc1", 4);
        list.extend(lora("text_encoder.encoder.layers.0.mlp.fc2", 4));
        let e = read(&file(&keys(&list), None))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Could not automatically infer state dict type"),
            "{e}"
        );
        list.extend(lora("text_encoder.encoder.layers.0.self_attn.q_proj", 4));
        assert!(read(&file(&keys(&list), None)).is_ok());
    }

    #[test]
    fn a_module_with_only_lora_a_is_named() {
        let list = [("transformer.a.to_q.lora_A.weight", vec![4, 8], 0.0)];
        let e = read(&file(&list, None))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("module 'a.to_q' has only one of lora_A / lora_B"),
            "{e}"
        );
        assert_eq!(e.matches("lora.safetensors").count(), 1, "{e}");
    }
    #[test]
    fn the_first_key_in_data_order_decides_the_conversion() -> TestResult {
        // (diffusers converts a part whose first key is not a lora_A key: here an .alpha key,
        // which only Flux's loader takes out first)
        let mut list = vec![("unet.a.alpha".to_string(), vec![], 1.0)];
        list.extend(lora("unet.a", 4));
        list.push((
            "unet.b.processor.to_q_lora.down.weight".into(),
            vec![4, 8],
            0.0,
        ));
        list.push((
            "unet.b.processor.to_q_lora.up.weight".into(),
            vec![8, 4],
            0.5,
        ));
        let a = read(&file(&keys(&list), None)).map_err(|e| e.to_string())?;
        let mut paths: Vec<&str> = a.modules.iter().map(|m| m.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["a", "b.to_q"]);
        // (without it, b's keys stay in the older layout, which PEFT does not load)
        let (a, said) =
            built(&file(&keys(&list[1..]), None), false, false).map_err(|e| e.to_string())?;
        assert_eq!(a.modules.len(), 1);
        assert!(
            said.iter()
                .any(|w| w.contains("2 key(s) that are no LoRA parameter")
                    && w.contains("'unet.b.processor.to_q_lora.down.weight'")),
            "{said:?}"
        );
        Ok(())
    }
}
