//! PEFT LoRA adapters. Keys are `base_model.model.<module>.lora_A.weight` (r, in) and
//! `.lora_B.weight` (out, r); embeddings use `lora_embedding_A` (r, num) / `lora_embedding_B`
//! (dim, r); DoRA adds `.lora_magnitude_vector`; `lora_bias` adds `.lora_B.bias`; other
//! tensors are whole replacements (`modules_to_save`, `base_layer.weight`), and
//! `.token_adapter.trainable_tokens_delta` holds whole rows of an embedding for the token
//! indices of `trainable_token_indices` (PEFT's trainable tokens). The scaling is
//! alpha / r, or alpha / sqrt(r) with rslora, where `rank_pattern` / `alpha_pattern` keys are
//! regexes matched as `(.*\.)?(KEY)$` against the module path, first match in file order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::onnx::io::map_file;

/// Initialisations that change the base weights during training: folding such an adapter onto
/// the original base is wrong.
const BASE_CHANGING_INITS: [&str; 5] = ["pissa", "olora", "corda", "lora_ga", "loftq"];

/// A tensor read from the adapter, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Which of PEFT's tuners wrote the adapter (`peft_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftType {
    /// LoRA: `lora_A` / `lora_B` factors (and its variants: DoRA, lora_bias, ...).
    Lora,
    /// LyCORIS LoHa (`hada_*` factors), config `LoHaConfig`.
    LoHa,
    /// LyCORIS LoKr (`lokr_*` factors), config `LoKrConfig`.
    LoKr,
}

impl PeftType {
    /// The tuner's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            PeftType::Lora => "LoRA",
            PeftType::LoHa => "LoHa",
            PeftType::LoKr => "LoKr",
        }
    }

    /// The name of PEFT's config class for it, for messages.
    pub fn config_class(self) -> &'static str {
        match self {
            PeftType::Lora => "LoraConfig",
            PeftType::LoHa => "LoHaConfig",
            PeftType::LoKr => "LoKrConfig",
        }
    }

    /// The fields of PEFT 0.21.2's config class for it (what `adapter_config.json` may hold).
    fn fields(self) -> &'static [&'static str] {
        match self {
            PeftType::Lora => &LORA_CONFIG_FIELDS,
            PeftType::LoHa => &LOHA_CONFIG_FIELDS,
            PeftType::LoKr => &LOKR_CONFIG_FIELDS,
        }
    }
}

/// The parts of `adapter_config.json` that define the math.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub peft_type: PeftType,
    pub r: usize,
    /// `lora_alpha` (LoHa / LoKr: `alpha`).
    pub lora_alpha: f32,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    pub rank_pattern: Vec<Pattern>,
    pub alpha_pattern: Vec<Pattern>,
    /// Which LoRA modules PEFT loads (`target_modules` and what narrows it).
    pub scope: super::scope::Scope,
    /// `lora_bias`: PEFT loads `lora_B.bias` tensors only then.
    pub lora_bias: bool,
    pub init_lora_weights: Value,
    /// The config's keys that PEFT 0.21.2's config class does not have (a newer PEFT's), in
    /// the file's order; PEFT leaves them out with a warning. For LoHa / LoKr they are left out
    /// of `raw` too (LoRA's keys among them: `use_dora`, `lora_bias`, ... mean nothing there).
    pub unknown: Vec<String>,
    pub raw: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// Linear / Conv1D / Conv: `lora_A`, `lora_B`.
    Lora,
    /// Embedding: `lora_embedding_A`, `lora_embedding_B`.
    Embedding,
    /// Only whole tensors (modules_to_save).
    Full,
    /// Whole rows of an embedding table (PEFT's trainable tokens): `tokens`.
    Tokens,
    /// A LyCORIS LoHa / LoKr delta (kohya files): `lycoris`.
    Lycoris,
}

/// New values for some rows of an embedding table, by token index.
#[derive(Clone, Debug)]
pub struct TokenRows {
    pub indices: Vec<usize>,
    /// (indices.len(), embedding dim)
    pub values: F32Tensor,
}

/// Everything the adapter holds for one module.
#[derive(Clone, Debug)]
pub struct ModuleAdapter {
    /// Module path without PEFT's `base_model.model.` prefix.
    pub path: String,
    pub kind: ModuleKind,
    pub a: Option<F32Tensor>,
    pub b: Option<F32Tensor>,
    pub magnitude: Option<F32Tensor>,
    pub bias_b: Option<F32Tensor>,
    /// Whole tensors by parameter name (`weight`, `bias`).
    pub full: BTreeMap<String, F32Tensor>,
    /// Trainable tokens: the rows this module's table takes.
    pub tokens: Option<TokenRows>,
    /// LyCORIS LoHa / LoKr factors.
    pub lycoris: Option<super::lycoris::Lycoris>,
    /// The adapter keys this module was built from (for reports and errors).
    pub keys: Vec<String>,
    /// The module's own alpha (kohya files store one per module); None: the config's.
    pub alpha: Option<f32>,
    /// kohya files: the part of the pipeline the module belongs to (`unet`, `te`, ...), whose
    /// `path` is then the underscored kohya name. None for PEFT's dotted module paths.
    pub part: Option<&'static str>,
    /// PEFT's LoRA on a torch `nn.MultiheadAttention`: for its out-projection (saved nested
    /// at `<attention>.base_layer.out_proj`, `path` then `<attention>.out_proj`), the
    /// attention module's path. PEFT gives that Linear the attention module's r and alpha,
    /// and its forward adds the delta twice (see [`MHA_OUT_PROJ_TIMES`]).
    pub mha_outer: Option<String>,
    /// PEFT's LoRA on a torch `nn.MultiheadAttention`: this module is the attention's own
    /// (its factors adapt the packed `in_proj_weight`, E → 3E), beside a nested out_proj.
    pub mha_in_proj: bool,
    /// The rows `[start, end)` of the attention's packed in-projection this module carries,
    /// where the export computes them as a layer of their own (a cross-attention's query or
    /// key and value, `target::Candidate::mha_rows`): `rewrite::settle_root` splits the
    /// attention's module into one per such layer, each with its rows of B (and of a trained
    /// weight or bias). None: the whole.
    pub in_proj_rows: Option<[usize; 2]>,
    /// The rank a LyCORIS module's alpha is divided by, where the config gives it (PEFT's LoHa
    /// and LoKr: `r`, or its `rank_pattern` entry, even for a LoKr of two whole factors);
    /// None: the factors' own (kohya files).
    pub scale_rank: Option<usize>,
    /// PEFT targets this module's weight through `target_parameters` (its `ParamWrapper`:
    /// `W + s·B·A` on the parameter as stored, whatever the module does with it), not through
    /// `target_modules`.
    pub via_parameter: bool,
}

/// How many times PEFT adds a MultiheadAttention LoRA's out_proj delta: its
/// `MultiheadAttention.merge` writes `W + ΔW` into the out_proj Linear and then calls that
/// Linear's own merge, which adds ΔW again; its forward merges that way for every call, and
/// `merge_and_unload` does too (checked with PEFT 0.21.2; the fix, huggingface/peft#3774,
/// was not released then). onnx-lora computes what PEFT computes.
pub const MHA_OUT_PROJ_TIMES: f32 = 2.0;

/// The newest PEFT release whose MultiheadAttention LoRA was checked against onnx-lora (see
/// [`MHA_OUT_PROJ_TIMES`]); adapters saved by a later one are refused until it is checked.
pub const MHA_CHECKED_PEFT: (u64, u64, u64) = (0, 21, 2);

impl ModuleAdapter {
    /// A module with no tensors yet.
    pub fn empty(path: &str, kind: ModuleKind, part: Option<&'static str>) -> ModuleAdapter {
        ModuleAdapter {
            path: path.to_string(),
            kind,
            a: None,
            b: None,
            magnitude: None,
            bias_b: None,
            full: BTreeMap::new(),
            tokens: None,
            lycoris: None,
            keys: Vec::new(),
            alpha: None,
            part,
            mha_outer: None,
            mha_in_proj: false,
            in_proj_rows: None,
            scale_rank: None,
            via_parameter: false,
        }
    }

    /// The file's own name (its keys' stem) for a kohya module that `adapter::bfl` renamed
    /// (a Flux module of the original model, or its share of a fused one); None when the
    /// module goes by the file's name.
    pub fn renamed_from(&self) -> Option<&str> {
        let part = self.part?;
        let key = self.keys.first()?;
        let kohya = super::kohya::as_kohya(key);
        let name = super::kohya::file_module(&kohya)
            .strip_prefix("lora_")?
            .strip_prefix(part)?
            .strip_prefix('_')?;
        (name != self.path).then(|| super::kohya::file_module(key))
    }

    /// The module path PEFT matches `target_modules` and the rank and alpha patterns
    /// against: a MultiheadAttention out_proj takes its attention module's.
    pub fn config_path(&self) -> &str {
        self.mha_outer.as_deref().unwrap_or(&self.path)
    }

    /// The name `rank_pattern` / `alpha_pattern` keys are matched against, as PEFT matches
    /// them: the module's path, or for a weight targeted through `target_parameters` the
    /// parameter's (`<path>.weight`).
    pub fn pattern_path(&self) -> std::borrow::Cow<'_, str> {
        if self.via_parameter {
            format!("{}.weight", self.path).into()
        } else {
            self.config_path().into()
        }
    }

    /// The rank alpha is divided by: rows of A; a LyCORIS module's factor rank (1 for a LoKr of
    /// two whole factors, whose scale is 1).
    pub fn rank(&self) -> usize {
        match &self.lycoris {
            Some(l) => self.scale_rank.or(l.rank()).unwrap_or(1),
            None => self
                .a
                .as_ref()
                .and_then(|a| a.shape.first().copied())
                .unwrap_or(0),
        }
    }

    /// The module replaces whole tensors or rows (modules_to_save, trainable tokens) rather
    /// than adding a low-rank delta.
    pub fn is_whole(&self) -> bool {
        matches!(self.kind, ModuleKind::Full | ModuleKind::Tokens)
    }

    /// The module replaces some values outright: it is whole, or it holds a trained bias beside
    /// its LoRA (PEFT's `bias="all"` / `"lora_only"`).
    pub fn replaces_values(&self) -> bool {
        self.is_whole() || self.full.contains_key("bias")
    }

    /// No branch can carry the module: it replaces values outright, or its delta is not
    /// low-rank (LyCORIS LoHa / LoKr).
    pub fn has_no_branch_form(&self) -> bool {
        self.replaces_values() || self.kind == ModuleKind::Lycoris
    }

    /// What the module is, when it is no LoRA a branch can carry, for messages.
    pub fn replaced_what(&self) -> &'static str {
        match (self.kind, &self.lycoris) {
            (ModuleKind::Tokens, _) => "trainable tokens",
            (ModuleKind::Full, _) => "modules_to_save",
            (ModuleKind::Lycoris, Some(l)) => l.name(),
            _ => "a trained bias",
        }
    }
}

/// A PEFT adapter loaded into memory.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub path: PathBuf,
    pub config: AdapterConfig,
    pub modules: Vec<ModuleAdapter>,
    /// What the file holds that PEFT does not load, and so is left out (for warnings).
    pub ignored: Vec<String>,
    /// The module path prefix under which the model's paths sit in the adapter's, when the
    /// user names it (`--root`, for one part of a model exported to several files); else it
    /// is found (`target::export_root`).
    pub root: Option<String>,
    /// A diffusers LoRA file: every pipeline part it holds, from which `settle_root` takes
    /// the one that is the model (`adapter::diffusers`); None for other formats.
    pub diffusers: Option<std::sync::Arc<super::diffusers::DiffusersFile>>,
    /// A diffusers file's `.alpha` keys: Some(true) read, Some(false) ignored, None as its
    /// model tells (`adapter::diffusers::settle`).
    pub alpha_keys: Option<bool>,
    /// A diffusers file's part the user named (`--part`); None: the one that fits the model.
    pub diffusers_part: Option<String>,
}

impl Adapter {
    /// An adapter read from `path` with nothing left out, its root and (for diffusers files)
    /// its part yet to be settled.
    pub fn new(path: &Path, config: AdapterConfig, modules: Vec<ModuleAdapter>) -> Adapter {
        Adapter {
            path: path.to_path_buf(),
            config,
            modules,
            ignored: Vec::new(),
            root: None,
            diffusers: None,
            alpha_keys: None,
            diffusers_part: None,
        }
    }

    /// Reads a PEFT adapter folder, an `.safetensors` file with `adapter_config.json` beside it,
    /// a kohya LoRA `.safetensors` file (recognised by its keys), or a diffusers LoRA file (a
    /// `.safetensors` file of LoRA keys without `adapter_config.json` beside it, or a folder
    /// holding `pytorch_lora_weights.safetensors` and no adapter).
    pub fn load(path: &Path) -> Result<Adapter> {
        Adapter::load_within(path, None)
    }

    /// [`Adapter::load`], refusing before decoding it any tensor of more than `limit` values
    /// (for a model: [`tensor_limit`] of its largest tensor).
    pub fn load_within(path: &Path, limit: Option<usize>) -> Result<Adapter> {
        // (an allocation that fails while its tensors are decoded names the adapter)
        let _doing = crate::cleanup::doing(format!("reading {}", path.display()));
        if path.exists() && !path.is_dir() && !path.is_file() {
            // (a FIFO or a device: refused by name before anything opens it)
            crate::onnx::io::open_input(path)?;
        }
        if path.is_dir()
            && !path.join("adapter_config.json").exists()
            && !path.join("adapter_model.safetensors").exists()
            && path.join(super::diffusers::WEIGHT_NAME).is_file()
        {
            return Adapter::load_within(&path.join(super::diffusers::WEIGHT_NAME), limit);
        }
        if path.is_file() {
            let buf = map_file(path)?;
            match SafeTensors::deserialize(&buf) {
                Ok(st) if super::kohya::is_kohya(&st) => {
                    return super::kohya::load(path, &buf, &st, limit);
                }
                Ok(st) if !peft_files(path).1.exists() && super::diffusers::is_diffusers(&st) => {
                    return super::diffusers::load(path, &buf, &st);
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::Adapter {
                        path: path.to_path_buf(),
                        reason: format!("not a safetensors file: {e}"),
                    });
                }
            }
        }
        let (weights, config_path) = peft_files(path);
        let err = |reason: String| Error::Adapter {
            path: path.to_path_buf(),
            reason,
        };
        if !weights.exists() {
            if path.join("adapter_model.bin").exists() {
                return Err(err("only adapter_model.bin (pickle) found: save the adapter with safe_serialization=True".into()));
            }
            // (save_pretrained writes an adapter not named "default" into a subfolder of
            // that name)
            let named: Vec<String> = std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().join("adapter_model.safetensors").is_file())
                .map(|e| e.path().display().to_string())
                .collect();
            return Err(err(match named.as_slice() {
                [] => format!("no {} found", weights.display()),
                [one] => format!(
                    "no {} found; {one} holds an adapter (save_pretrained puts an adapter not named 'default' in a subfolder of its name): give that folder",
                    weights.display()
                ),
                more => format!(
                    "no {} found; its subfolders {} hold adapters (save_pretrained puts each adapter not named 'default' in a subfolder of its name): give one",
                    weights.display(),
                    more.join(", ")
                ),
            }));
        }
        if path.is_file() && !config_path.exists() {
            return Err(err(format!(
                "neither a kohya LoRA file (lora_unet_* / lora_te_* keys), a diffusers LoRA file (<part>.<module>.lora_A.weight / .lora_B.weight keys) nor a PEFT adapter's weights (no {} beside it)",
                config_path.display()
            )));
        }
        let config_bytes = crate::onnx::io::read_input(&config_path)?;
        let config_text = String::from_utf8(config_bytes)
            .map_err(|_| err(format!("{}: is not UTF-8 text", config_path.display())))?;
        let config = AdapterConfig::parse(&config_text)
            .map_err(|r| err(format!("{}: {r}", config_path.display())))?;
        let buf = map_file(&weights)?;
        let st = SafeTensors::deserialize(&buf).map_err(|e| {
            err(format!(
                "{}: not a safetensors file: {e}",
                weights.display()
            ))
        })?;
        let mut names: Vec<(String, String)> = st
            .names()
            .into_iter()
            .map(|k| {
                let stripped = k.strip_prefix("base_model.model.").unwrap_or(k);
                (k.to_string(), stripped.to_string())
            })
            .collect();
        names.sort();
        let (modules, ignored) = from_tensors(
            &config,
            &names,
            |k| read_f32_within(&st, k, limit),
            &weights.display().to_string(),
            "adapter_config.json",
        )
        .map_err(err)?;
        let mut ignored = ignored;
        let lora = |m: &&ModuleAdapter| {
            matches!(
                m.kind,
                ModuleKind::Lora | ModuleKind::Embedding | ModuleKind::Lycoris
            )
        };
        if config.raw.get("target_modules").is_none_or(Value::is_null)
            && !config.scope.has_parameters()
            && let Some(first) = modules.iter().find(lora)
        {
            let n = modules.iter().filter(lora).count();
            ignored.insert(
                0,
                format!("PEFT's default target_modules: adapter_config.json gives none, and PEFT would then target its defaults for the model's type ({}) and leave out the file's other modules, but an ONNX file does not say its model type; onnx-lora applies every module the file holds ({n}, '{}' first). Write target_modules into the config to make PEFT load the same", match config.peft_type {
                    PeftType::Lora => "q_proj and v_proj for Llama, c_attn for GPT-2, query and value for BERT, ...",
                    PeftType::LoHa | PeftType::LoKr => "for Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, ...",
                }, first.path),
            );
        }
        if let Some(note) = unknown_keys_note(&config) {
            ignored.insert(
                0,
                format!("{note}: PEFT 0.21.2 leaves them out, with a warning, and so does onnx-lora (if a newer PEFT wrote them for a variant of {}, the result is not what that PEFT computes)", config.peft_type.name()),
            );
        }
        Ok(Adapter {
            ignored,
            ..Adapter::new(path, config, modules)
        })
    }

    /// The files it was read from (to be never overwritten): the adapter file, and the
    /// config and weights of an adapter folder.
    pub fn files(&self) -> Vec<PathBuf> {
        let (weights, config) = peft_files(&self.path);
        vec![weights, config]
    }

    /// The adapter split into its low-rank part and, if it has any, the part no branch can
    /// carry (values it replaces outright: modules_to_save, trainable tokens, trained biases
    /// saved beside a LoRA; LyCORIS deltas), each with the same config.
    pub fn split_whole(&self) -> (Adapter, Option<Adapter>) {
        let mut low = Vec::new();
        let mut whole = Vec::new();
        for m in &self.modules {
            if m.is_whole() || m.kind == ModuleKind::Lycoris {
                whole.push(m.clone());
                continue;
            }
            let mut m = m.clone();
            if let Some(bias) = m.full.remove("bias") {
                let mut w = ModuleAdapter::empty(&m.path, ModuleKind::Full, m.part);
                // (the layer it is on: an attention's projection, a part of its in-projection)
                w.mha_outer.clone_from(&m.mha_outer);
                w.mha_in_proj = m.mha_in_proj;
                w.in_proj_rows = m.in_proj_rows;
                w.keys = m
                    .keys
                    .iter()
                    .filter(|k| k.ends_with(".bias") && !k.contains(".lora_"))
                    .cloned()
                    .collect();
                w.full.insert("bias".into(), bias);
                whole.push(w);
            }
            low.push(m);
        }
        // (a part keeps the root only if some of its paths are under it: a root settled for
        // the whole adapter, `model.`, is none of `lm_head`'s)
        let part = |modules: Vec<ModuleAdapter>| Adapter {
            path: self.path.clone(),
            config: self.config.clone(),
            root: self.root.clone().filter(|r| {
                let under = format!("{}.", r.trim_end_matches('.'));
                modules.iter().any(|m| m.path.starts_with(&under))
            }),
            modules,
            ignored: Vec::new(),
            diffusers: self.diffusers.clone(),
            alpha_keys: self.alpha_keys,
            diffusers_part: self.diffusers_part.clone(),
        };
        let whole = (!whole.is_empty()).then(|| part(whole));
        (part(low), whole)
    }

    /// A note for an adapter with PEFT's MultiheadAttention LoRA whose out_proj deltas were
    /// applied (`applied`: the modules the model took): they count twice (see
    /// [`MHA_OUT_PROJ_TIMES`]). None when no such delta was applied.
    pub fn mha_note(&self, applied: impl Fn(&ModuleAdapter) -> bool) -> Option<String> {
        let mha: Vec<&str> = self
            .modules
            .iter()
            .filter(|m| m.kind == ModuleKind::Lora && applied(m))
            .filter_map(|m| m.mha_outer.as_deref())
            .collect();
        let first = mha.first()?;
        let more = match mha.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        Some(format!(
            "'{first}'{more}: PEFT's LoRA on a torch.nn.MultiheadAttention; its out_proj delta counts twice, as PEFT adds it (huggingface/peft#3774)"
        ))
    }

    /// The scaling for a module: alpha / r (or / sqrt(r) with rslora), with per-module alpha
    /// from `alpha_pattern`. r is the stored rank (rows of A), which `rank_pattern` already set.
    pub fn scaling(&self, m: &ModuleAdapter) -> f32 {
        let r = m.rank().max(1) as f32;
        let alpha = m
            .alpha
            .or_else(|| pattern_value(&self.config.alpha_pattern, &m.pattern_path()))
            .unwrap_or(self.config.lora_alpha);
        let times = if m.mha_outer.is_some() {
            MHA_OUT_PROJ_TIMES
        } else {
            1.0
        };
        if self.config.use_rslora {
            times * alpha / r.sqrt()
        } else {
            times * alpha / r
        }
    }

    /// Refuses adapters whose training changed the base weights, and LoRA variants whose
    /// forward is not `W + s·B·A` on the base model (their config names them).
    pub fn check_foldable(&self) -> Result<()> {
        let set = |k: &str| {
            self.config.raw.get(k).is_some_and(|v| match v {
                Value::Null | Value::Bool(false) => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            })
        };
        const VARIANTS: [(&str, &str); 7] = [
            (
                "alora_invocation_tokens",
                "activated LoRA (aLoRA) acts only on tokens from its invocation sequence on; merged or as a plain branch it would act on every token",
            ),
            (
                "use_qalora",
                "QA-LoRA averages the input over groups before lora_A",
            ),
            ("use_bdlora", "BD-LoRA stores block-diagonal factors"),
            (
                "layer_replication",
                "layer_replication builds a model with more layers than the base, which the export does not have",
            ),
            (
                "kasa_config",
                "KaSA truncates the base weight's singular values and scales the factors by a learned diagonal",
            ),
            (
                "arrow_config",
                "Arrow routes each token between several LoRAs",
            ),
            ("monteclora_config", "MonteCLoRA samples its factors"),
        ];
        if let Some((key, why)) = VARIANTS.iter().find(|(k, _)| set(k)) {
            return Err(Error::Adapter {
                path: self.path.clone(),
                reason: format!("{key} is set: {why}; this LoRA variant is not supported"),
            });
        }
        if let Value::String(init) = &self.config.init_lora_weights {
            let lower = init.to_ascii_lowercase();
            if BASE_CHANGING_INITS.iter().any(|k| lower.starts_with(k)) {
                return Err(Error::Adapter {
                    path: self.path.clone(),
                    reason: format!(
                        "init_lora_weights = \"{init}\" changed the base weights during training, so W + s*B@A on the original base is wrong; convert the adapter to plain LoRA first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// A `rank_pattern` / `alpha_pattern` entry: its key compiled as PEFT matches it,
/// `(.*\.)?(KEY)$` from the start of a module path, and its value.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub key: String,
    pub regex: Regex,
    pub value: f32,
}

impl Pattern {
    /// Refuses a key whose regex Python's `re` (PEFT) would read differently.
    pub fn new(key: &str, value: f32) -> std::result::Result<Pattern, String> {
        super::pyregex::check(key)?;
        Ok(Pattern {
            key: key.to_string(),
            regex: Regex::new(&format!(r"^(.*\.)?({key})$")).map_err(|e| e.to_string())?,
            value,
        })
    }
}

/// A PEFT adapter's weights and config: the folder's `adapter_model.safetensors` and
/// `adapter_config.json`, or a weights file and the config beside it.
fn peft_files(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        (
            path.join("adapter_model.safetensors"),
            path.join("adapter_config.json"),
        )
    } else {
        let dir = path.parent().unwrap_or(Path::new("."));
        (path.to_path_buf(), dir.join("adapter_config.json"))
    }
}

/// The value of the first pattern (file order) matching `path`.
pub fn pattern_value(patterns: &[Pattern], path: &str) -> Option<f32> {
    patterns
        .iter()
        .find_map(|p| p.regex.is_match(path).then_some(p.value))
}

/// The fields of PEFT 0.21.2's `LoHaConfig`.
const LOHA_CONFIG_FIELDS: [&str; 20] = [
    "alpha",
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "exclude_modules",
    "inference_mode",
    "init_weights",
    "layers_pattern",
    "layers_to_transform",
    "module_dropout",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "r",
    "rank_dropout",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_effective_conv2d",
];

/// The fields of PEFT 0.21.2's `LoKrConfig`: LoHa's and three of its own.
const LOKR_CONFIG_FIELDS: [&str; 23] = [
    "alpha",
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "decompose_both",
    "decompose_factor",
    "exclude_modules",
    "inference_mode",
    "init_weights",
    "layers_pattern",
    "layers_to_transform",
    "module_dropout",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "r",
    "rank_dropout",
    "rank_dropout_scale",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_effective_conv2d",
];

/// The fields of PEFT 0.21.2's `LoraConfig` (what `adapter_config.json` may hold).
const LORA_CONFIG_FIELDS: [&str; 42] = [
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "monteclora_config",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "runtime_config",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "use_rslora",
    "velora_config",
];

impl AdapterConfig {
    /// The keys of the config that PEFT 0.21.2's config class does not have (a newer PEFT's),
    /// in the file's order; PEFT leaves them out with a warning.
    pub fn unknown_keys(&self) -> Vec<&str> {
        self.unknown.iter().map(String::as_str).collect()
    }

    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let raw: Value = serde_json::from_str(text).map_err(|e| {
            // (Python's json writes NaN and infinities, which JSON has not; a value beyond
            // float64 cannot be read either: both are no scale a fold could use)
            let at = text
                .lines()
                .nth(e.line().saturating_sub(1))
                .and_then(|l| l.get(e.column().saturating_sub(1)..))
                .unwrap_or_default();
            let non_finite = ["NaN", "Infinity", "-Infinity"]
                .iter()
                .any(|t| at.starts_with(t));
            if non_finite || e.to_string().contains("number out of range") {
                format!("invalid JSON: {e}: a value there is not a finite number (Python's json writes NaN and infinities, which are no scale onnx-lora could use)")
            } else {
                format!("invalid JSON: {e}")
            }
        })?;
        Self::from_value(raw)
    }

    /// The config of a JSON object with `adapter_config.json`'s keys.
    /// A plain LoRA config scaling every module by `lora_alpha / r` (files without an
    /// `adapter_config.json`: kohya's, whose modules carry their own alphas), `raw` kept for
    /// reports.
    pub fn plain_lora(r: usize, lora_alpha: f32, raw: Value) -> AdapterConfig {
        AdapterConfig {
            peft_type: PeftType::Lora,
            r,
            lora_alpha,
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            scope: Default::default(),
            lora_bias: false,
            init_lora_weights: Value::Bool(true),
            unknown: Vec::new(),
            raw,
        }
    }

    pub fn from_value(raw: Value) -> std::result::Result<Self, String> {
        let peft_type = match raw.get("peft_type") {
            None | Some(Value::Null) => PeftType::Lora,
            Some(Value::String(t)) => match t.to_ascii_uppercase().as_str() {
                "LORA" => PeftType::Lora,
                "LOHA" => PeftType::LoHa,
                "LOKR" => PeftType::LoKr,
                _ => {
                    return Err(format!(
                        "peft_type {t} is not supported (LORA, LOHA and LOKR are)"
                    ));
                }
            },
            Some(v) => return Err(format!("peft_type is {v}, not a string")),
        };
        let Value::Object(mut fields) = raw else {
            return Err("the config is not a JSON object".into());
        };
        let unknown: Vec<String> = fields
            .keys()
            .filter(|k| !peft_type.fields().contains(&k.as_str()))
            .cloned()
            .collect();
        if peft_type != PeftType::Lora {
            // (LoRA's keys, `use_dora`, `lora_bias`, `trainable_token_indices`, ..., are no
            // fields of PEFT's LoHa / LoKr configs: it drops them, and so do these lines)
            fields.retain(|k, _| peft_type.fields().contains(&k.as_str()));
        }
        let raw = Value::Object(fields);
        // Keys whose type alone says the file is not what PEFT writes (PEFT would not load it).
        let shape_of = |k: &str, ok: fn(&Value) -> bool, what: &str| match raw.get(k) {
            Some(v) if !v.is_null() && !ok(v) => Err(format!("{k} is {v}, not {what}")),
            _ => Ok(()),
        };
        shape_of(
            "bias",
            |v| matches!(v.as_str(), Some("none" | "all" | "lora_only")),
            "\"none\", \"all\" or \"lora_only\"",
        )?;
        shape_of("ensure_weight_tying", Value::is_boolean, "true or false")?;
        shape_of(
            "layers_pattern",
            |v| v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            "a string or a list of strings",
        )?;
        shape_of(
            "init_lora_weights",
            |v| v.is_boolean() || v.is_string(),
            "true, false or a method name",
        )?;
        // (PEFT refuses any other task type when it reads the config)
        const TASK_TYPES: [&str; 6] = [
            "SEQ_CLS",
            "SEQ_2_SEQ_LM",
            "CAUSAL_LM",
            "TOKEN_CLS",
            "QUESTION_ANS",
            "FEATURE_EXTRACTION",
        ];
        shape_of(
            "task_type",
            |v| v.as_str().is_some_and(|t| TASK_TYPES.contains(&t)),
            &format!("a task type PEFT knows ({})", TASK_TYPES.join(", ")),
        )?;
        shape_of(
            "trainable_token_indices",
            |v| v.is_array() || v.is_object(),
            "a list of token ids or an object of them by module",
        )?;
        // A key that is present must have PEFT's type: silently falling back to a default
        // would merge with the wrong scale. Absent keys take PEFT's defaults.
        let present = |k: &str| raw.get(k).filter(|v| !v.is_null());
        let number = |k: &str, default: f64| -> std::result::Result<f64, String> {
            match raw.get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|&x| (x as f32).is_finite())
                    .ok_or_else(|| format!("{k} is {v}, not a number")),
            }
        };
        let flag = |k: &str| -> std::result::Result<bool, String> {
            match present(k) {
                None => Ok(false),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| format!("{k} is {v}, not true or false")),
            }
        };
        let patterns = |k: &str| -> std::result::Result<Vec<Pattern>, String> {
            let Some(v) = present(k) else {
                return Ok(Vec::new());
            };
            let o = v
                .as_object()
                .ok_or_else(|| format!("{k} is {v}, not an object of module patterns"))?;
            o.iter()
                .map(|(key, v)| {
                    let value = v
                        .as_f64()
                        .filter(|&x| (x as f32).is_finite())
                        .ok_or_else(|| format!("{k}['{key}'] is {v}, not a number"))?;
                    Pattern::new(key, value as f32).map_err(|e| {
                        format!(
                            "{k} key '{key}' is not a regular expression onnx-lora can evaluate as PEFT does (look-around and back-references are not supported): {e}"
                        )
                    })
                })
                .collect()
        };
        let r = match raw.get("r") {
            None => 8,
            Some(v) => v
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| format!("r is {v}, not a positive integer"))?
                as usize,
        };
        // The combinations PEFT's LoraConfig refuses when it is built (its words).
        let tm_regex = matches!(present("target_modules"), Some(Value::String(_)));
        let pattern_given = match present("layers_pattern") {
            Some(Value::String(p)) => !p.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            _ => false,
        };
        if tm_regex && present("layers_to_transform").is_some() {
            return Err(
                "layers_to_transform cannot be used when target_modules is a string (a regular expression); PEFT refuses this config"
                    .into(),
            );
        }
        if tm_regex && present("layers_pattern").is_some() {
            return Err(
                "layers_pattern cannot be used when target_modules is a string (a regular expression); PEFT refuses this config"
                    .into(),
            );
        }
        if pattern_given && present("layers_to_transform").is_none() {
            return Err(
                "layers_pattern is given without layers_to_transform, which PEFT requires with it; PEFT refuses this config"
                    .into(),
            );
        }
        if flag("lora_bias")? {
            if flag("use_dora")? {
                return Err(
                    "lora_bias is not supported with use_dora (PEFT: lora_bias=True is not supported for DoRA); PEFT refuses this config"
                        .into(),
                );
            }
            if let Some(init) = present("init_lora_weights").filter(|v| !v.is_boolean()) {
                return Err(format!(
                    "lora_bias needs init_lora_weights true or false, not {init}; PEFT refuses this config"
                ));
            }
        }
        // (PEFT's ParamWrapper on a 2-D `weight` computes W + s·B·A on it, as on a Linear; on
        // other parameters, such as MoE experts' stacked 3-D weights, it computes per expert)
        if let Some(Value::Array(list)) = present("target_parameters")
            && let Some(other) = list
                .iter()
                .filter_map(Value::as_str)
                .find(|t| t.rsplit('.').next() != Some("weight"))
        {
            return Err(format!(
                "target_parameters names '{other}', a parameter other than a layer's weight (such as a MoE layer's stacked expert weights, which no MatMul / Gemm of an export reads as one weight): LoRA on such parameters is not supported (onnx-lora applies target_parameters that name a layer's 2-D weight, as 'gate.weight')"
            ));
        }
        let rank_pattern = patterns("rank_pattern")?;
        if let Some(p) = rank_pattern
            .iter()
            .find(|p| p.value < 1.0 || p.value.fract() != 0.0)
        {
            return Err(format!(
                "rank_pattern['{}'] is {}, not a positive integer",
                p.key, p.value
            ));
        }
        Ok(AdapterConfig {
            peft_type,
            r,
            lora_alpha: match peft_type {
                PeftType::Lora => number("lora_alpha", 8.0)?,
                PeftType::LoHa | PeftType::LoKr => number("alpha", 8.0)?,
            } as f32,
            use_rslora: flag("use_rslora")?,
            use_dora: flag("use_dora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            rank_pattern,
            alpha_pattern: patterns("alpha_pattern")?,
            scope: super::scope::Scope::from_config(&raw)?,
            lora_bias: flag("lora_bias")?,
            init_lora_weights: raw
                .get("init_lora_weights")
                .cloned()
                .unwrap_or(Value::Bool(true)),
            unknown,
            raw,
        })
    }
}

/// Reads a tensor as f32 (F32, F16, BF16, F64).
pub(crate) fn read_f32(st: &SafeTensors, name: &str) -> std::result::Result<F32Tensor, String> {
    read_f32_within(st, name, None)
}

/// The most values one tensor of an adapter for a model may declare, where the model's largest
/// tensor holds `largest`: four times that (a factor's rank may exceed a small layer's width),
/// and never less than 16 Mi values (64 MiB in f32). A tensor beyond it cannot belong to an
/// adapter of the model, and is refused before it is decoded (a file that declares a huge
/// tensor would otherwise cost its size in memory before any shape is checked).
pub fn tensor_limit(largest: usize) -> usize {
    largest.saturating_mul(4).max(1 << 24)
}

/// [`read_f32`], refusing a tensor of more than `limit` values (see [`tensor_limit`]) before
/// decoding it.
pub(crate) fn read_f32_within(
    st: &SafeTensors,
    name: &str,
    limit: Option<usize>,
) -> std::result::Result<F32Tensor, String> {
    let view = st.tensor(name).map_err(|e| format!("{name}: {e}"))?;
    // (safetensors has checked that the data the shape declares is in the file)
    let n = view.shape().iter().product::<usize>();
    if let Some(limit) = limit
        && n > limit
    {
        return Err(format!(
            "{name}: declares {n} values ({:?}), more than an adapter of this model can hold in one tensor (four times its largest tensor, at least 16 Mi: {limit}); it fits no layer of the model",
            view.shape()
        ));
    }
    let dtype = match view.dtype() {
        Dtype::F32 => crate::onnx::DataType::Float,
        Dtype::F16 => crate::onnx::DataType::Float16,
        Dtype::BF16 => crate::onnx::DataType::Bfloat16,
        Dtype::F64 => crate::onnx::DataType::Double,
        other => return Err(format!("{name}: dtype {other:?} is not a float type")),
    };
    let data = crate::tensor::to_f32(view.data(), dtype, name).map_err(|e| e.to_string())?;
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "{name}: holds non-finite values ({} at index {i})",
            data[i]
        ));
    }
    Ok(F32Tensor {
        shape: view.shape().to_vec(),
        data,
    })
}

/// Leaves out what PEFT would not load from the file, as it does, and returns what was left
/// out: the LoRA modules the config does not target, DoRA magnitudes without `use_dora`, and
/// `lora_B` biases without `lora_bias`. A DoRA config whose module has no magnitude is refused
/// (PEFT would take the base weight's norm for it and warn of a missing key).
fn keep_what_peft_loads(
    modules: &mut Vec<ModuleAdapter>,
    config: &AdapterConfig,
) -> std::result::Result<Vec<String>, String> {
    let is_lora = |m: &ModuleAdapter| {
        matches!(
            m.kind,
            ModuleKind::Lora | ModuleKind::Embedding | ModuleKind::Lycoris
        )
    };
    // With weight tying PEFT also targets the layers the model ties to the input embedding
    // (`lm_head`), which only the model knows: LoRAs on such layers are kept.
    let ties = config.raw.get("ensure_weight_tying") == Some(&Value::Bool(true))
        && config.scope.targets_an_embedding();
    mha_out_projs(modules, config)?;
    let mut untargeted = Vec::new();
    let mut both: Option<String> = None;
    modules.retain_mut(|m| {
        // PEFT's own keys name the module as PEFT matches it; keys without its prefix (saved
        // by transformers or diffusers) may carry a wrapper prefix of their own.
        // (transformers saves its own module paths; diffusers one wrapper component more)
        let peft_keyed = m.keys.iter().all(|k| k.starts_with("base_model.model."));
        let mut paths = vec![m.config_path()];
        if !peft_keyed && let Some((_, rest)) = m.config_path().split_once('.') {
            paths.push(rest);
        }
        let tied = ties
            && m.path
                .rsplit('.')
                .next()
                .is_some_and(|l| super::scope::EMBEDDING_LAYER_NAMES.contains(&l));
        let by_module = !is_lora(m) || tied || config.scope.keeps(&paths);
        if is_lora(m) && by_module && config.scope.by_parameter(&paths) {
            both.get_or_insert_with(|| m.path.clone());
        }
        let by_parameter = !by_module && config.scope.by_parameter(&paths);
        let targeted = by_module || by_parameter;
        m.via_parameter = by_parameter;
        if !targeted {
            untargeted.push(m.path.clone());
        }
        targeted
    });
    // (PEFT: "Make sure that this layer is not also targeted with `target_modules`")
    if let Some(path) = both {
        return Err(format!(
            "module '{path}' is targeted both by target_modules and by target_parameters ('{path}.weight'); PEFT refuses such a config (a layer it wraps as a module cannot have its parameter wrapped too)"
        ));
    }
    let (mut magnitudes, mut biases) = (Vec::new(), Vec::new());
    for m in modules.iter_mut().filter(|m| is_lora(m)) {
        if !config.use_dora && m.magnitude.take().is_some() {
            magnitudes.push(m.path.clone());
        }
        if config.use_dora && m.magnitude.is_none() {
            return Err(format!(
                "use_dora is true but module '{}' has no lora_magnitude_vector (PEFT would take the base weight's norm for it and warn of a missing key); refusing an incomplete DoRA adapter",
                m.path
            ));
        }
        if !config.lora_bias && m.bias_b.take().is_some() {
            biases.push(m.path.clone());
        }
    }
    let mut ignored = Vec::new();
    for rule in &config.scope.unevaluable {
        ignored.push(format!(
            "{rule}: onnx-lora cannot evaluate it as Python does; the file's modules are applied as they are (PEFT saves only those it targeted)"
        ));
    }
    let mut note = |list: Vec<String>, what: &str| {
        if let Some(first) = list.first() {
            let more = match list.len() {
                1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            ignored.push(format!("{what} of {} module(s) ('{first}'{more}): PEFT does not load them, nor does onnx-lora", list.len()));
        }
    };
    let untargeted_what = format!(
        "the {} factors that adapter_config.json does not target (target_modules, {}layers_to_transform, exclude_modules, modules_to_save)",
        config.peft_type.name(),
        if config.peft_type == PeftType::Lora {
            "target_parameters, "
        } else {
            ""
        }
    );
    note(untargeted, &untargeted_what);
    note(magnitudes, "the DoRA magnitudes (use_dora is false)");
    note(biases, "the lora_B biases (lora_bias is false)");
    Ok(ignored)
}

/// PEFT's LoRA on a torch `nn.MultiheadAttention` at `S`: the factors at `S` adapt its
/// packed `in_proj_weight` (q, k, v stacked), an ordinary `[3E, E]` Linear weight as far as
/// the delta goes; those of its out_proj, saved nested at `S.base_layer.out_proj`, adapt the
/// `S.out_proj` Linear. The nested module is renamed to that Linear's own path, which is
/// where exports keep its weight (`S.out_proj.weight`), and takes `S`'s config (see
/// [`ModuleAdapter::mha_outer`]). DoRA is refused by PEFT itself; a lora_B bias and an
/// adapter from a PEFT newer than the one checked are refused here.
fn mha_out_projs(
    modules: &mut [ModuleAdapter],
    config: &AdapterConfig,
) -> std::result::Result<(), String> {
    let is_lora = |m: &ModuleAdapter| m.kind == ModuleKind::Lora;
    // (the nested out_proj's factors, or only its trained bias, as bias="all" saves it)
    let outers: Vec<(usize, String)> = modules
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.kind, ModuleKind::Lora | ModuleKind::Full))
        .filter_map(|(i, m)| {
            let outer = m.path.strip_suffix(".base_layer.out_proj")?;
            // (a file may leave the in_proj's factors out: PEFT then starts them with B = 0)
            (modules.iter().any(|o| o.path == outer && is_lora(o)) || config.scope.keeps(&[outer]))
                .then(|| (i, outer.to_string()))
        })
        .collect();
    let Some((_, first)) = outers.first() else {
        return Ok(());
    };
    let version = config.raw.get("peft_version").and_then(Value::as_str);
    if let Some(v) = version
        && parse_version(v).is_none_or(|got| got > MHA_CHECKED_PEFT)
    {
        let (a, b, c) = MHA_CHECKED_PEFT;
        return Err(format!(
            "module '{first}' is PEFT's LoRA on a torch.nn.MultiheadAttention, saved by PEFT {v}: PEFT {a}.{b}.{c} adds its out_proj delta twice (huggingface/peft#3774), as onnx-lora does, and onnx-lora has not checked what PEFT {v} does; merge it in torch (merge_and_unload) before exporting"
        ));
    }
    for (i, outer) in outers {
        let has_bias = |m: &ModuleAdapter| config.lora_bias && m.bias_b.is_some();
        if has_bias(&modules[i]) || modules.iter().any(|o| o.path == outer && has_bias(o)) {
            return Err(format!(
                "module '{outer}' is PEFT's LoRA on a torch.nn.MultiheadAttention with lora_bias, which onnx-lora does not support (PEFT's merge leaves the in_proj's lora_B bias out); merge it in torch (merge_and_unload) before exporting"
            ));
        }
        if let Some(o) = modules.iter_mut().find(|o| o.path == outer && is_lora(o)) {
            o.mha_in_proj = true;
        }
        let m = &mut modules[i];
        m.path = format!("{outer}.out_proj");
        m.mha_outer = Some(outer);
    }
    Ok(())
}

/// `major.minor.patch` of a version string (`0.21.2`, `0.22.0.dev0`); None when it has no
/// such numbers.
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.trim().split(['.', '+', '-']);
    let mut num = || -> Option<u64> {
        let p = parts.next()?;
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    Some((num()?, num()?, num().unwrap_or(0)))
}

/// "the config key(s) ... ('a', 'b')" for the config's keys PEFT 0.21.2's config class (LoraConfig,
/// LoHaConfig, LoKrConfig) does not have; None when it has them all.
pub(crate) fn unknown_keys_note(config: &AdapterConfig) -> Option<String> {
    let keys = config.unknown_keys();
    if keys.is_empty() {
        return None;
    }
    let list: Vec<String> = keys.iter().map(|k| format!("'{k}'")).collect();
    Some(format!(
        "the config key(s) PEFT 0.21.2's {} does not have ({})",
        config.peft_type.config_class(),
        list.join(", ")
    ))
}

/// The modules PEFT loads from an adapter's tensors under `config`, and what it leaves out:
/// `names` pairs each key of the weights file (`weights`, for messages) with the key as PEFT
/// reads it (without `base_model.model.` or a pipeline part's prefix), in the order to read
/// them; `read` decodes a file key; `config_name` names where the config came from. Errors
/// name `weights` unless it is empty.
pub(crate) fn from_tensors(
    config: &AdapterConfig,
    names: &[(String, String)],
    read: impl Fn(&str) -> std::result::Result<F32Tensor, String>,
    weights: &str,
    config_name: &str,
) -> std::result::Result<(Vec<ModuleAdapter>, Vec<String>), String> {
    // (`weights` empty: the adapter's path, which the caller's error names, is the file)
    let at = |r: String| match weights {
        "" => r,
        w => format!("{w}: {r}"),
    };
    let mut modules = group_modules(names, &read, config).map_err(at)?;
    let ignored = keep_what_peft_loads(&mut modules, config)?;
    // PEFT fails to load an adapter whose config names whole modules or token rows it saved
    // nothing of (a KeyError on the first missing tensor): the config and the file disagree.
    let listed = |k: &str| match config.raw.get(k) {
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        _ => false,
    };
    if listed("modules_to_save")
        && !modules
            .iter()
            .any(|m| m.kind == ModuleKind::Full || !m.full.is_empty())
    {
        return Err(at(format!(
            "{config_name} names modules_to_save {} but the file holds the weights of none of them (PEFT fails to load it); remove them from modules_to_save, or give the adapter they were saved with",
            config.raw["modules_to_save"]
        )));
    }
    if listed("trainable_token_indices") && !modules.iter().any(|m| m.kind == ModuleKind::Tokens) {
        return Err(at(format!(
            "{config_name} gives trainable_token_indices {} but the file holds no trainable token rows (PEFT fails to load it); remove them, or give the adapter they were saved with",
            config.raw["trainable_token_indices"]
        )));
    }
    if modules.is_empty() {
        let why = match ignored.first() {
            Some(what) => format!("holds no adapter tensors PEFT would load (it ignores {what})"),
            None => "holds no adapter tensors".into(),
        };
        return Err(at(why));
    }
    // PEFT refuses to load factors of another rank than the config gives the module.
    for m in &mut modules {
        let r =
            pattern_value(&config.rank_pattern, &m.pattern_path()).map_or(config.r, |r| r as usize);
        if let Some(l) = &m.lycoris {
            // (PEFT's LoHa / LoKr divide alpha by the config's r, whatever the factors show)
            if let Some(got) = l.ranks().into_iter().find(|&got| got != r) {
                return Err(format!(
                    "module '{}' has {} factors of rank {got} but {config_name} gives it r = {r}",
                    m.path,
                    l.name()
                ));
            }
            // PEFT's LoKr stores a factor whole only where r is at least half its larger
            // side (w1 always, unless decompose_both): a whole factor the config's r would
            // have made a product says that r is not the one the file was made with.
            if let super::lycoris::Lycoris::LoKr { w1, w2, .. } = l {
                let decompose_both = config.raw.get("decompose_both") == Some(&Value::Bool(true));
                for (name, f, decomposed) in
                    [("lokr_w1", w1, decompose_both), ("lokr_w2", w2, true)]
                {
                    if let super::lycoris::KronFactor::Whole(w) = f
                        && decomposed
                        && let [x, y, ..] = w.shape[..]
                        && (r as f64) < x.max(y) as f64 / 2.0
                    {
                        return Err(format!(
                            "module '{}' holds its {name} whole ({:?}), which PEFT's LoKr stores as a product of rank r when r < {} (half its larger side), but {config_name} gives it r = {r}: the config's r is not the adapter's",
                            m.path,
                            w.shape,
                            x.max(y) as f64 / 2.0
                        ));
                    }
                }
            }
            m.scale_rank = Some(r);
            continue;
        }
        if !matches!(m.kind, ModuleKind::Lora | ModuleKind::Embedding) {
            continue;
        }
        if m.rank() != r {
            return Err(format!(
                "module '{}' has factors of rank {} but {config_name} gives it r = {r}",
                m.path,
                m.rank()
            ));
        }
    }
    Ok((modules, ignored))
}

/// Groups the safetensors keys by module, in the order modules first appear.
fn group_modules(
    names: &[(String, String)],
    read: &dyn Fn(&str) -> std::result::Result<F32Tensor, String>,
    adapter_config: &AdapterConfig,
) -> std::result::Result<Vec<ModuleAdapter>, String> {
    let config = &adapter_config.raw;
    let mut modules: Vec<ModuleAdapter> = Vec::new();
    // LoHa / LoKr factors by module path, gathered before they are combined.
    let mut factors: BTreeMap<String, BTreeMap<String, F32Tensor>> = BTreeMap::new();
    for (key, stripped) in names {
        let stripped = stripped.as_str();
        if let Some((path, factor)) = lycoris_key(stripped) {
            let wanted = match adapter_config.peft_type {
                PeftType::LoHa => "hada_",
                PeftType::LoKr => "lokr_",
                PeftType::Lora => "",
            };
            if wanted.is_empty() || !factor.starts_with(wanted) {
                return Err(format!(
                    "key '{key}' is a LyCORIS {} factor, but the adapter is a {} one (peft_type {}): PEFT would leave it out",
                    if factor.starts_with("hada_") {
                        "LoHa"
                    } else {
                        "LoKr"
                    },
                    adapter_config.peft_type.name(),
                    config
                        .get("peft_type")
                        .and_then(Value::as_str)
                        .unwrap_or("LORA")
                ));
            }
            let t = read(key)?;
            match modules
                .iter_mut()
                .find(|m| m.path == path && m.kind != ModuleKind::Tokens)
            {
                Some(m) => {
                    m.kind = ModuleKind::Lycoris;
                    m.keys.push(key.clone());
                }
                None => {
                    let mut m = ModuleAdapter::empty(path, ModuleKind::Lycoris, None);
                    m.keys.push(key.clone());
                    modules.push(m);
                }
            }
            if factors
                .entry(path.to_string())
                .or_default()
                .insert(factor.to_string(), t)
                .is_some()
            {
                return Err(format!(
                    "module '{path}' has its {factor} twice (keys with and without PEFT's base_model.model. prefix?)"
                ));
            }
            continue;
        }
        if let Some(path) = token_module(stripped) {
            let values = read(key)?;
            let indices = token_indices(config, path).map_err(|r| format!("key '{key}': {r}"))?;
            if values.shape.len() != 2 || values.shape[0] != indices.len() {
                return Err(format!(
                    "key '{key}' has shape {:?}: trainable_token_indices lists {} tokens for this module, so it must be [{}, dim]",
                    values.shape,
                    indices.len(),
                    indices.len()
                ));
            }
            let mut m = ModuleAdapter::empty(path, ModuleKind::Tokens, None);
            m.keys.push(key.clone());
            m.tokens = Some(TokenRows { indices, values });
            modules.push(m);
            continue;
        }
        // bias="all" on a modules_to_save layer (SEQ_CLS's classifier) also saves the untouched
        // original's bias as `<module>.original_module.bias`: the base's own values, which
        // PEFT's trained copy does not use.
        if stripped
            .rsplit_once('.')
            .is_some_and(|(rest, _)| rest.ends_with(".original_module"))
        {
            continue;
        }
        let (path, part) = split_key(stripped)
            .ok_or_else(|| format!("key '{key}' is not a LoRA parameter key"))?;
        if adapter_config.peft_type != PeftType::Lora && !matches!(part, Part::Full(_)) {
            return Err(format!(
                "key '{key}' is a LoRA tensor, but the adapter is a {} one (peft_type {}): PEFT would leave it out",
                adapter_config.peft_type.name(),
                config
                    .get("peft_type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            ));
        }
        let idx = match modules
            .iter()
            .position(|m| m.path == path && m.kind != ModuleKind::Tokens)
        {
            Some(i) => i,
            None => {
                modules.push(ModuleAdapter::empty(path, ModuleKind::Full, None));
                modules.len() - 1
            }
        };
        let t = read(key)?;
        if matches!(part, Part::A | Part::B | Part::EmbA | Part::EmbB) && t.shape.len() < 2 {
            return Err(format!(
                "key '{key}' has shape {:?}: LoRA factors have at least 2 dimensions",
                t.shape
            ));
        }
        let m = &mut modules[idx];
        let taken = match &part {
            Part::A | Part::EmbA => m.a.is_some(),
            Part::B | Part::EmbB => m.b.is_some(),
            Part::Magnitude => m.magnitude.is_some(),
            Part::BiasB => m.bias_b.is_some(),
            Part::Full(p) => m.full.contains_key(*p),
        };
        // (and the trained copy's as `<module>.modules_to_save.bias`, as `<module>.bias` holds it)
        if taken
            && let Part::Full(p) = part
            && m.full.get(p).is_some_and(|had| *had == t)
        {
            m.keys.push(key.clone());
            continue;
        }
        if taken {
            return Err(format!(
                "keys {} give module '{path}' the same tensor twice (with and without PEFT's base_model.model. prefix?)",
                m.keys
                    .iter()
                    .chain([key])
                    .map(|k| format!("'{k}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Part::Full(p) = part
            && !matches!(p, "weight" | "bias")
        {
            return Err(format!(
                "key '{key}' is not a tensor onnx-lora can apply (LoRA factors, DoRA magnitudes, lora_B biases, trainable tokens, or a whole weight / bias)"
            ));
        }
        m.keys.push(key.clone());
        match part {
            Part::A => (m.a, m.kind) = (Some(t), ModuleKind::Lora),
            Part::B => (m.b, m.kind) = (Some(t), ModuleKind::Lora),
            Part::EmbA => (m.a, m.kind) = (Some(t), ModuleKind::Embedding),
            Part::EmbB => (m.b, m.kind) = (Some(t), ModuleKind::Embedding),
            Part::Magnitude => m.magnitude = Some(t),
            Part::BiasB => m.bias_b = Some(t),
            Part::Full(p) => {
                m.full.insert(p.to_string(), t);
            }
        }
    }
    for m in modules.iter_mut().filter(|m| m.kind == ModuleKind::Lycoris) {
        let l = super::lycoris::Lycoris::from_factors(
            &m.path,
            factors.remove(&m.path).unwrap_or_default(),
        )?;
        // (PEFT's LoHa / LoKr have no bias option and save no whole tensor of a module they
        // adapt: a `<module>.bias` key would be left out by PEFT, a `.base_layer.bias` one
        // loaded into the base layer; neither is a file PEFT wrote)
        if let Some(what) = m.full.keys().next() {
            let key = m
                .keys
                .iter()
                .find(|k| k.ends_with(&format!(".{what}")) && lycoris_key(k).is_none())
                .cloned()
                .unwrap_or_default();
            return Err(format!(
                "module '{}' has {} factors and a whole {what} (key '{key}'), which PEFT's {} never saves for a module it adapts; refusing a file PEFT did not write",
                m.path,
                l.name(),
                l.name()
            ));
        }
        m.lycoris = Some(l);
    }
    for m in &modules {
        if m.kind == ModuleKind::Lycoris {
            continue;
        }
        if !m.is_whole() && (m.a.is_none() || m.b.is_none()) {
            return Err(format!(
                "module '{}' has only one of lora_A / lora_B",
                m.path
            ));
        }
    }
    Ok(modules)
}

/// `<module>.<factor>` for a LyCORIS factor key (`hada_w1_a`, `lokr_w2`, ...), as PEFT's LoHa and
/// LoKr save them.
fn lycoris_key(key: &str) -> Option<(&str, &str)> {
    let (module, last) = key.rsplit_once('.')?;
    (!module.is_empty() && (last.starts_with("hada_") || last.starts_with("lokr_")))
        .then_some((module, last))
}

/// The module of a trainable-tokens key: `<module>.token_adapter.trainable_tokens_delta`,
/// optionally followed by an adapter name.
fn token_module(key: &str) -> Option<&str> {
    let (module, rest) = key.split_once(".token_adapter.trainable_tokens_delta")?;
    (rest.is_empty() || (rest.starts_with('.') && !rest[1..].contains('.'))).then_some(module)
}

/// The token indices `trainable_token_indices` gives the module at `path`: the list itself, or
/// the entry of the dict whose key is the path or a dotted suffix of it (PEFT's matching).
fn token_indices(config: &Value, path: &str) -> std::result::Result<Vec<usize>, String> {
    let list = |v: &Value| -> Option<Vec<usize>> {
        v.as_array()?
            .iter()
            .map(|i| i.as_u64().map(|i| i as usize))
            .collect()
    };
    let spec = config
        .get("trainable_token_indices")
        .filter(|v| !v.is_null());
    let indices = match spec {
        None => {
            return Err(
                "adapter_config.json has no trainable_token_indices to say which tokens these rows are"
                    .into(),
            );
        }
        Some(Value::Object(by_module)) => {
            let found: Vec<(&String, &Value)> = by_module
                .iter()
                .filter(|(k, _)| path == k.as_str() || path.ends_with(&format!(".{k}")))
                .collect();
            match found.as_slice() {
                [(_, v)] => list(v),
                [] => {
                    return Err(format!(
                        "trainable_token_indices has no entry for module '{path}' (entries: {})",
                        by_module.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
                _ => {
                    return Err(format!(
                        "several trainable_token_indices entries match module '{path}'"
                    ));
                }
            }
        }
        Some(v) => list(v),
    }
    .ok_or("trainable_token_indices is neither a list of token indices nor a dict of them")?;
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = indices.iter().find(|i| !seen.insert(**i)) {
        return Err(format!(
            "trainable_token_indices lists token {dup} twice for module '{path}'"
        ));
    }
    Ok(indices)
}

/// What a key of a PEFT adapter file holds for its module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part<'a> {
    A,
    B,
    EmbA,
    EmbB,
    Magnitude,
    BiasB,
    Full(&'a str),
}

/// Splits `<module>.<lora part>` (adapter-name segments like `.default` tolerated).
pub(crate) fn split_key(key: &str) -> Option<(&str, Part<'_>)> {
    const PARTS: [(&str, u8); 8] = [
        (".lora_A.weight", 0),
        (".lora_B.weight", 1),
        (".lora_embedding_A", 2),
        (".lora_embedding_B", 3),
        (".lora_magnitude_vector.weight", 4),
        (".lora_magnitude_vector", 4),
        (".lora_B.bias", 5),
        (".lora_A.bias", 6),
    ];
    for (suffix, p) in PARTS {
        if let Some(path) = key.strip_suffix(suffix) {
            let part = match p {
                0 => Part::A,
                1 => Part::B,
                2 => Part::EmbA,
                3 => Part::EmbB,
                4 => Part::Magnitude,
                5 => Part::BiasB,
                _ => return None,
            };
            return Some((path, part));
        }
    }
    // Whole tensors: `<module>.weight`, `<module>.base_layer.weight`,
    // `<module>.modules_to_save.<name>.weight`.
    let (rest, param) = key.rsplit_once('.')?;
    let module = rest
        .strip_suffix(".base_layer")
        .or_else(|| rest.split_once(".modules_to_save.").map(|(m, _)| m))
        .or_else(|| rest.strip_suffix(".modules_to_save"))
        .or_else(|| rest.strip_suffix(".original_module").map(|_| ""))
        .unwrap_or(rest);
    // torch's MultiheadAttention keeps its packed in-projection as parameters of its own:
    // they are the weight and bias of its in-projection layer (`target::mark_mha`).
    let param = match param {
        "in_proj_weight" => "weight",
        "in_proj_bias" => "bias",
        p => p,
    };
    (!module.is_empty()).then_some((module, Part::Full(param)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_peft() -> Result<(), String> {
        let p = vec![
            Pattern::new("layers.1.self_attn.q_proj", 16.0)?,
            Pattern::new(r".*\.0\..*", 2.0)?,
        ];
        assert_eq!(
            pattern_value(&p, "model.layers.1.self_attn.q_proj"),
            Some(16.0)
        );
        assert_eq!(pattern_value(&p, "model.layers.0.mlp.up_proj"), Some(2.0));
        assert_eq!(pattern_value(&p, "model.layers.11.self_attn.q_proj"), None);
        assert_eq!(pattern_value(&p, "model.xlayers.1.self_attn.q_proj"), None);
        Ok(())
    }

    #[test]
    fn config_keys_of_the_wrong_type_are_refused() {
        for (json, says) in [
            (r#"{"peft_type": 5}"#, "peft_type is 5, not a string"),
            (
                r#"{"task_type": [1, [2]]}"#,
                "task_type is [1,[2]], not a task type PEFT knows (SEQ_CLS, ",
            ),
            (
                r#"{"task_type": "causal"}"#,
                r#"task_type is "causal", not"#,
            ),
            (r#"{"bias": 1}"#, "bias is 1, not"),
            (r#"{"bias": "some"}"#, r#"bias is "some", not"#),
            (
                r#"{"ensure_weight_tying": "yes"}"#,
                "ensure_weight_tying is \"yes\"",
            ),
            (r#"{"init_lora_weights": 3}"#, "init_lora_weights is 3"),
            (r#"{"layers_pattern": 5}"#, "layers_pattern is 5"),
            (
                r#"{"trainable_token_indices": "x"}"#,
                "trainable_token_indices is \"x\"",
            ),
        ] {
            match AdapterConfig::parse(json) {
                Err(e) => assert!(e.contains(says), "{json}: {e}"),
                Ok(_) => panic!("{json} was accepted"),
            }
        }
        let fine = r#"{"bias": "all", "init_lora_weights": "gaussian", "layers_pattern": ["h"], "layers_to_transform": [0]}"#;
        assert!(AdapterConfig::parse(fine).is_ok(), "{fine}");
    }

    /// PEFT's LoHa / LoKr configs: `alpha` (not `lora_alpha`), and LoRA's keys, which their
    /// config classes do not have, left out as PEFT leaves them out.
    #[test]
    fn lycoris_configs_read_alpha_and_leave_lora_keys_out() -> Result<(), String> {
        let c = AdapterConfig::parse(
            r#"{"peft_type": "LOHA", "r": 2, "alpha": 4, "lora_alpha": 16, "use_dora": true, "lora_bias": true, "use_effective_conv2d": true}"#,
        )?;
        assert_eq!(c.peft_type, PeftType::LoHa);
        assert_eq!((c.r, c.lora_alpha), (2, 4.0));
        assert!(!c.use_dora && !c.lora_bias && !c.use_rslora);
        assert_eq!(c.unknown_keys(), ["lora_alpha", "use_dora", "lora_bias"]);
        assert!(c.raw.get("use_dora").is_none());
        let note = unknown_keys_note(&c).ok_or("no note")?;
        assert!(
            note.contains("LoHaConfig") && note.contains("'lora_alpha'"),
            "{note}"
        );
        let k = AdapterConfig::parse(r#"{"peft_type": "LOKR", "decompose_both": true}"#)?;
        assert_eq!((k.peft_type, k.lora_alpha), (PeftType::LoKr, 8.0));
        assert!(k.unknown_keys().is_empty());
        // (decompose_both is LoKr's own)
        let h = AdapterConfig::parse(r#"{"peft_type": "LOHA", "decompose_both": true}"#)?;
        assert_eq!(h.unknown_keys(), ["decompose_both"]);
        match AdapterConfig::parse(r#"{"peft_type": "IA3"}"#) {
            Err(e) => assert!(
                e.contains("peft_type IA3 is not supported (LORA, LOHA and LOKR are)"),
                "{e}"
            ),
            Ok(_) => panic!("IA3 accepted"),
        }
        Ok(())
    }

    /// A LoHa / LoKr adapter's factors make one LyCORIS module each, scaled by the config's r
    /// (PEFT's LoKr of two whole factors too); factors of another rank, another tuner's factors
    /// and LoRA tensors are refused.
    #[test]
    fn lycoris_factors_group_into_modules() -> Result<(), String> {
        let t = |shape: &[usize]| F32Tensor {
            shape: shape.to_vec(),
            data: vec![0.5; shape.iter().product()],
        };
        let tensors: BTreeMap<&str, F32Tensor> = [
            ("fc.hada_w1_a", t(&[4, 2])),
            ("fc.hada_w1_b", t(&[2, 3])),
            ("fc.hada_w2_a", t(&[4, 2])),
            ("fc.hada_w2_b", t(&[2, 3])),
            ("kr.lokr_w1", t(&[2, 2])),
            ("kr.lokr_w2", t(&[2, 3])),
            ("kr.lokr_t2", t(&[1, 1, 1, 1])),
            ("fc.bias", t(&[4])),
            ("gc.hada_w1_a", t(&[4, 2])),
            ("gc.hada_w1_b", t(&[2, 3])),
            ("gc.hada_w2_a", t(&[4, 1])),
            ("gc.hada_w2_b", t(&[1, 3])),
            ("lo.lora_A.weight", t(&[2, 3])),
        ]
        .into_iter()
        .collect();
        let load = |json: &str, keys: &[&str]| {
            let config = AdapterConfig::parse(json)?;
            let names: Vec<(String, String)> = keys
                .iter()
                .map(|k| (format!("base_model.model.{k}"), k.to_string()))
                .collect();
            let read = |k: &str| {
                let k = k.strip_prefix("base_model.model.").unwrap_or(k);
                tensors.get(k).cloned().ok_or(format!("no {k}"))
            };
            from_tensors(&config, &names, read, "", "adapter_config.json").map(|(m, _)| (config, m))
        };
        let loha = r#"{"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["fc"]}"#;
        let (config, modules) = load(
            loha,
            &[
                "fc.hada_w1_a",
                "fc.hada_w1_b",
                "fc.hada_w2_a",
                "fc.hada_w2_b",
            ],
        )?;
        assert_eq!(modules.len(), 1);
        assert_eq!(modules[0].kind, ModuleKind::Lycoris);
        assert_eq!(modules[0].keys.len(), 4);
        let adapter = Adapter::new(Path::new("a"), config, modules);
        assert_eq!(adapter.scaling(&adapter.modules[0]), 2.0);
        // LoKr of two whole factors: alpha / r all the same (kohya's files scale those by 1)
        let (config, modules) = load(
            r#"{"peft_type": "LOKR", "r": 8, "alpha": 4, "target_modules": ["kr"]}"#,
            &["kr.lokr_w1", "kr.lokr_w2"],
        )?;
        assert_eq!(modules[0].rank(), 8);
        let adapter = Adapter {
            config,
            modules,
            ..adapter
        };
        assert_eq!(adapter.scaling(&adapter.modules[0]), 0.5);
        for (json, keys, says) in [
            (
                r#"{"peft_type": "LOHA", "r": 4, "target_modules": ["fc"]}"#,
                &[
                    "fc.hada_w1_a",
                    "fc.hada_w1_b",
                    "fc.hada_w2_a",
                    "fc.hada_w2_b",
                ][..],
                "module 'fc' has LoHa factors of rank 2 but adapter_config.json gives it r = 4",
            ),
            (
                r#"{"peft_type": "LOKR", "target_modules": ["fc"]}"#,
                &["fc.hada_w1_a"][..],
                "is a LyCORIS LoHa factor, but the adapter is a LoKr one (peft_type LOKR)",
            ),
            (
                r#"{"target_modules": ["fc"]}"#,
                &["fc.hada_w1_a"][..],
                "is a LyCORIS LoHa factor, but the adapter is a LoRA one",
            ),
            (
                r#"{"peft_type": "LOHA", "target_modules": ["lo"]}"#,
                &["lo.lora_A.weight"][..],
                "is a LoRA tensor, but the adapter is a LoHa one",
            ),
            (
                loha,
                &["fc.hada_w1_a", "fc.hada_w1_b", "fc.hada_w2_a"][..],
                "LoHa module 'fc' lacks one of",
            ),
            // (a whole tensor beside the factors: PEFT's LoHa saves none)
            (
                loha,
                &[
                    "fc.bias",
                    "fc.hada_w1_a",
                    "fc.hada_w1_b",
                    "fc.hada_w2_a",
                    "fc.hada_w2_b",
                ][..],
                "module 'fc' has LoHa factors and a whole bias (key 'base_model.model.fc.bias'), which PEFT's LoHa never saves",
            ),
            // (halves of two ranks: PEFT makes both of r)
            (
                r#"{"peft_type": "LOHA", "r": 2, "target_modules": ["gc"]}"#,
                &[
                    "gc.hada_w1_a",
                    "gc.hada_w1_b",
                    "gc.hada_w2_a",
                    "gc.hada_w2_b",
                ][..],
                "module 'gc' has LoHa factors of rank 1 but adapter_config.json gives it r = 2",
            ),
            // (w2 (2, 3) whole needs r >= 1.5 in PEFT; w1 (2, 2) only with decompose_both)
            (
                r#"{"peft_type": "LOKR", "r": 1, "target_modules": ["kr"]}"#,
                &["kr.lokr_w1", "kr.lokr_w2"][..],
                "module 'kr' holds its lokr_w2 whole ([2, 3]), which PEFT's LoKr stores as a product of rank r when r < 1.5",
            ),
            (
                r#"{"peft_type": "LOKR", "r": 2, "target_modules": ["kr"]}"#,
                &["kr.lokr_t2", "kr.lokr_w1", "kr.lokr_w2"][..],
                "has a Tucker core lokr_t2 beside a whole lokr_w2",
            ),
        ] {
            match load(json, keys) {
                Err(e) => assert!(e.contains(says), "{json}: {e}"),
                Ok(_) => panic!("{json} {keys:?} accepted"),
            }
        }
        // (modules the config does not target are left out, as for LoRA)
        match load(
            r#"{"peft_type": "LOHA", "r": 2, "target_modules": ["other"]}"#,
            &[
                "fc.hada_w1_a",
                "fc.hada_w1_b",
                "fc.hada_w2_a",
                "fc.hada_w2_b",
            ],
        ) {
            Err(e) => assert!(
                e.contains("holds no adapter tensors PEFT would load"),
                "{e}"
            ),
            Ok(_) => panic!("an untargeted LoHa module was kept"),
        }
        Ok(())
    }

    #[test]
    fn non_finite_numbers_are_named() {
        for json in [
            r#"{"r": 8, "lora_alpha": NaN}"#,
            r#"{"r": 8, "lora_alpha": Infinity}"#,
            r#"{"r": 8, "lora_alpha": 1e400}"#,
        ] {
            match AdapterConfig::parse(json) {
                Err(e) => assert!(e.contains("not a finite number"), "{json}: {e}"),
                Ok(_) => panic!("{json} was accepted"),
            }
        }
        match AdapterConfig::parse(r#"{"r": 8,"#) {
            Err(e) => assert!(e.contains("invalid JSON") && !e.contains("finite"), "{e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    /// The combinations PEFT's LoraConfig refuses when it is built are refused too.
    #[test]
    fn combinations_peft_refuses_are_refused() {
        for (json, says) in [
            (
                r#"{"target_modules": ".*q_proj", "layers_to_transform": [1]}"#,
                "layers_to_transform cannot be used when target_modules is a string",
            ),
            (
                r#"{"target_modules": ".*q_proj", "layers_pattern": "layers"}"#,
                "layers_pattern cannot be used when target_modules is a string",
            ),
            (
                r#"{"target_modules": ["q_proj"], "layers_pattern": "layers"}"#,
                "layers_pattern is given without layers_to_transform",
            ),
            (
                r#"{"use_dora": true, "lora_bias": true}"#,
                "lora_bias is not supported with use_dora",
            ),
            (
                r#"{"lora_bias": true, "init_lora_weights": "gaussian"}"#,
                "lora_bias needs init_lora_weights true or false",
            ),
        ] {
            match AdapterConfig::parse(json) {
                Err(e) => assert!(
                    e.contains(says) && e.contains("PEFT refuses"),
                    "{json}: {e}"
                ),
                Ok(_) => panic!("{json} was accepted"),
            }
        }
        for fine in [
            r#"{"target_modules": ["q_proj"], "layers_pattern": "", "layers_to_transform": null}"#,
            r#"{"target_modules": ".*q_proj", "layers_to_transform": null, "layers_pattern": null}"#,
            r#"{"lora_bias": true, "init_lora_weights": false}"#,
        ] {
            assert!(AdapterConfig::parse(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn keys_split() -> Result<(), Box<dyn std::error::Error>> {
        let (p, part) = split_key("model.layers.0.q_proj.lora_A.weight").ok_or("not a LoRA key")?;
        assert!(p == "model.layers.0.q_proj" && matches!(part, Part::A));
        let (p, part) = split_key("model.embed_tokens.lora_embedding_B").ok_or("not a LoRA key")?;
        assert!(p == "model.embed_tokens" && matches!(part, Part::EmbB));
        let (p, part) =
            split_key("classifier.modules_to_save.default.weight").ok_or("not a LoRA key")?;
        assert!(p == "classifier" && matches!(part, Part::Full("weight")));
        let (p, part) = split_key("classifier.modules_to_save.bias").ok_or("not a LoRA key")?;
        assert!(p == "classifier" && matches!(part, Part::Full("bias")));
        let (p, _) = split_key("lm_head.base_layer.weight").ok_or("not a LoRA key")?;
        assert_eq!(p, "lm_head");
        // a MultiheadAttention's own packed in-projection parameters
        let (p, part) = split_key("attn.in_proj_weight").ok_or("not a LoRA key")?;
        assert!(p == "attn" && matches!(part, Part::Full("weight")));
        let (p, part) = split_key("attn.modules_to_save.default.in_proj_bias").ok_or("no key")?;
        assert!(p == "attn" && matches!(part, Part::Full("bias")));
        Ok(())
    }
}
