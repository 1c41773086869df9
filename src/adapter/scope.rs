//! Which of an adapter's LoRA modules PEFT loads: a module gets a LoRA layer only when
//! `adapter_config.json` targets it (`target_modules`, narrowed by `layers_to_transform` /
//! `layers_pattern`, less `exclude_modules` and `modules_to_save`, or `target_parameters`
//! names its weight); PEFT ignores the file's
//! tensors for any other module, and so does onnx-lora. The rules are PEFT's
//! `check_target_module_exists`, with its Python regexes checked by [`super::pyregex`].

use regex::Regex;
use serde_json::Value;

/// The layer names PEFT's weight tying looks for (its `EMBEDDING_LAYER_NAMES`).
pub const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];

/// The config's targeting rules, compiled.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    exclude: Option<Names>,
    modules_to_save: Vec<Regex>,
    target: Option<Target>,
    layers: Option<Layers>,
    /// `target_parameters` naming a layer's `weight` (`q_proj.weight`): PEFT wraps that
    /// parameter itself (whatever the module), whatever `target_modules` says.
    parameters: Vec<String>,
    /// The rules left out because their regex is one onnx-lora cannot evaluate as Python does
    /// (look-around, as ms-swift writes into `target_modules`), for a warning.
    pub unevaluable: Vec<String>,
}

/// A list of module names (exact or dotted suffix) or one regex over the whole module path.
#[derive(Clone, Debug)]
enum Names {
    List(Vec<String>),
    Regex(Regex),
}

#[derive(Clone, Debug)]
enum Target {
    Names(Names),
    /// `all-linear`: PEFT expands it to the model's linear layers when it creates the adapter
    /// (and saves the expanded list); a config still holding it targets every LoRA module.
    AllLinear,
}

/// `layers_to_transform`: the layer indices kept, and the `layers_pattern` regexes that find
/// a module's layer index (None: the first numbered path component).
#[derive(Clone, Debug)]
struct Layers {
    indices: Vec<u64>,
    patterns: Option<Vec<Regex>>,
}

impl Scope {
    /// Reads the rules from the config; a value of the wrong type is an error naming the key.
    /// A rule whose regex onnx-lora cannot evaluate as Python does is left out and named in
    /// `unevaluable`: PEFT saves only the modules it targeted, so the file's modules stand.
    pub fn from_config(raw: &Value) -> Result<Scope, String> {
        let present = |k: &str| raw.get(k).filter(|v| !v.is_null());
        let unevaluable = std::cell::RefCell::new(Vec::new());
        let regex = |k: &str, p: &str, wrap: &dyn Fn(&str) -> String| {
            let compiled = super::pyregex::check(p)
                .and_then(|()| Regex::new(&wrap(p)).map_err(|e| e.to_string()));
            match compiled {
                Ok(r) => Some(r),
                Err(e) => {
                    unevaluable
                        .borrow_mut()
                        .push(format!("{k} pattern '{p}' ({e})"));
                    None
                }
            }
        };
        let names = |k: &str| -> Result<Option<Names>, String> {
            match present(k) {
                None => Ok(None),
                Some(Value::String(p)) => {
                    Ok(regex(k, p, &|p| format!("^(?:{p})$")).map(Names::Regex))
                }
                Some(v) => strings(k, v).map(|l| Some(Names::List(l))),
            }
        };
        let parameters = match present("target_parameters") {
            None => Vec::new(),
            Some(v) if v.is_array() => strings("target_parameters", v)?,
            Some(v) => {
                return Err(format!(
                    "target_parameters is {v}, not a list of parameter names"
                ));
            }
        };
        let target = match present("target_modules") {
            // (PEFT compares it lowercased)
            Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
                Some(Target::AllLinear)
            }
            // (PEFT takes a config with target_parameters alone: no module is targeted)
            None if !parameters.is_empty() => Some(Target::Names(Names::List(Vec::new()))),
            _ => names("target_modules")?.map(Target::Names),
        };
        let modules_to_save = match present("modules_to_save") {
            None => Vec::new(),
            Some(v) => strings("modules_to_save", v)?
                .iter()
                .filter_map(|m| {
                    regex("modules_to_save", m, &|m| {
                        format!(r"^(?:(?:^|.*\.){m}(?:$|\..*))")
                    })
                })
                .collect(),
        };
        let layers = match present("layers_to_transform") {
            None => None,
            Some(v) => {
                let indices: Vec<u64> = match v {
                    Value::Array(a) => a.iter().map(Value::as_u64).collect::<Option<_>>(),
                    v => v.as_u64().map(|i| vec![i]),
                }
                .ok_or_else(|| {
                    format!("layers_to_transform is {v}, not a layer index or a list of them")
                })?;
                // Some(None): PEFT's default layer pattern; None: a pattern onnx-lora cannot
                // evaluate, so no narrowing by layer.
                let patterns = match present("layers_pattern") {
                    None => Some(None),
                    Some(Value::String(p)) if p.is_empty() => Some(None),
                    Some(Value::Array(a)) if a.is_empty() => Some(None),
                    Some(v) => {
                        let list = match v {
                            Value::String(p) => vec![p.clone()],
                            v => strings("layers_pattern", v)?,
                        };
                        list.iter()
                            .map(|p| {
                                regex("layers_pattern", p, &|p| {
                                    format!(r"^(?:(?:^|.*?\.){p}\.(?P<idx>\d+)\.)")
                                })
                            })
                            .collect::<Option<Vec<Regex>>>()
                            .map(Some)
                    }
                };
                // An empty list selects nothing in PEFT's check: no narrowing.
                patterns
                    .filter(|_| !indices.is_empty() || !v.is_array())
                    .map(|patterns| Layers { indices, patterns })
            }
        };
        let exclude = names("exclude_modules")?;
        Ok(Scope {
            exclude,
            modules_to_save,
            target,
            layers,
            parameters,
            unevaluable: unevaluable.into_inner(),
        })
    }

    /// Whether PEFT gives a module a LoRA layer, for a module that may be named by any of
    /// `paths` (its name in the base model, with and without a wrapper prefix): no name
    /// excludes it, and one selects it.
    pub fn keeps(&self, paths: &[&str]) -> bool {
        !paths.iter().any(|p| self.excluded(p)) && paths.iter().any(|p| self.selected(p))
    }

    /// Whether `target_parameters` names the `weight` of a module that may be named by any of
    /// `paths`, as PEFT matches it: `<path>.weight` is an entry or ends with `.` and one.
    pub fn by_parameter(&self, paths: &[&str]) -> bool {
        paths.iter().any(|p| {
            let key = format!("{p}.weight");
            self.parameters
                .iter()
                .any(|t| key == *t || key.ends_with(&format!(".{t}")))
        })
    }

    /// Whether the config has `target_parameters`.
    pub fn has_parameters(&self) -> bool {
        !self.parameters.is_empty()
    }

    fn excluded(&self, path: &str) -> bool {
        self.exclude.as_ref().is_some_and(|n| n.matches(path))
            || self.modules_to_save.iter().any(|r| r.is_match(path))
    }

    fn selected(&self, path: &str) -> bool {
        let names = match &self.target {
            None | Some(Target::AllLinear) => return true,
            Some(Target::Names(n)) => n,
        };
        match names {
            Names::Regex(r) => r.is_match(path),
            Names::List(list) if list.iter().any(|t| t == path) => true,
            Names::List(_) => names.matches(path) && self.layer_kept(path),
        }
    }

    /// Whether the targets name an embedding layer as PEFT's weight tying looks for one
    /// (`embed_tokens` or `lm_head`): with `ensure_weight_tying`, PEFT then also gives the
    /// layers tied to the input embedding (which the model decides) a LoRA of their own.
    pub fn targets_an_embedding(&self) -> bool {
        match &self.target {
            Some(Target::Names(Names::Regex(r))) => {
                EMBEDDING_LAYER_NAMES.iter().any(|n| r.is_match(n))
            }
            Some(Target::Names(Names::List(list))) => list
                .iter()
                .any(|t| EMBEDDING_LAYER_NAMES.contains(&t.rsplit('.').next().unwrap_or(t))),
            _ => false,
        }
    }

    fn layer_kept(&self, path: &str) -> bool {
        let Some(layers) = &self.layers else {
            return true;
        };
        let index = match &layers.patterns {
            None => first_numbered_component(path),
            Some(patterns) => patterns
                .iter()
                .find_map(|r| r.captures(path)?.name("idx")?.as_str().parse().ok()),
        };
        index.is_some_and(|i| layers.indices.contains(&i))
    }
}

impl Names {
    fn matches(&self, path: &str) -> bool {
        match self {
            Names::Regex(r) => r.is_match(path),
            Names::List(list) => list
                .iter()
                .any(|t| crate::target::select::name_matches(path, t)),
        }
    }
}

/// PEFT's default layer index (`.*?\.[^.]*\.(\d+)\.` from the start): the first component
/// that is a number, has at least two components before it and one after it.
fn first_numbered_component(path: &str) -> Option<u64> {
    let parts: Vec<&str> = path.split('.').collect();
    (2..parts.len().saturating_sub(1)).find_map(|i| {
        let p = parts[i];
        (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).then(|| p.parse().ok())?
    })
}

fn strings(k: &str, v: &Value) -> Result<Vec<String>, String> {
    v.as_array()
        .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect())
        .ok_or_else(|| format!("{k} is {v}, not a string or a list of strings"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(config: Value) -> Scope {
        Scope::from_config(&config).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn targets_like_peft() {
        let s = scope(serde_json::json!({"target_modules": ["q_proj", "v_proj"]}));
        assert!(s.keeps(&["model.layers.0.self_attn.q_proj"]));
        assert!(!s.keeps(&["model.layers.0.self_attn.k_proj"]));
        let s = scope(serde_json::json!({"target_modules": ".*\\.(q|k)_proj"}));
        assert!(s.keeps(&["model.layers.0.self_attn.k_proj"]));
        assert!(!s.keeps(&["model.layers.0.self_attn.v_proj"]));
        let s = scope(serde_json::json!({"target_modules": "q_proj"}));
        assert!(
            !s.keeps(&["model.layers.0.self_attn.q_proj"]),
            "a string is a full match"
        );
        let s =
            scope(serde_json::json!({"target_modules": ["q_proj"], "layers_to_transform": [1]}));
        assert!(s.keeps(&["model.layers.1.self_attn.q_proj"]));
        assert!(!s.keeps(&["model.layers.0.self_attn.q_proj"]));
        assert!(!s.keeps(&["model.layers.10.self_attn.q_proj"]));
        let s = scope(
            serde_json::json!({"target_modules": ["q_proj"], "layers_to_transform": 0,
            "layers_pattern": "layers"}),
        );
        assert!(s.keeps(&["model.layers.0.self_attn.q_proj"]));
        assert!(!s.keeps(&["model.layers.2.self_attn.q_proj"]));
        let s = scope(serde_json::json!({"target_modules": ["q_proj", "v_proj"],
            "exclude_modules": ["v_proj"], "modules_to_save": ["lm_head"]}));
        assert!(!s.keeps(&["model.layers.0.self_attn.v_proj"]));
        assert!(s.keeps(&["model.layers.0.self_attn.q_proj"]));
        let s = scope(serde_json::json!({"target_modules": ["lm_head", "q_proj"],
            "modules_to_save": ["lm_head"]}));
        assert!(!s.keeps(&["lm_head"]));
        let s = scope(serde_json::json!({"target_modules": "all-linear"}));
        assert!(s.keeps(&["anything"]));
        assert!(scope(serde_json::json!({})).keeps(&["anything"]));
    }

    #[test]
    fn default_layer_index_is_the_first_numbered_component() {
        assert_eq!(
            first_numbered_component("model.layers.3.mlp.experts.1.w"),
            Some(3)
        );
        assert_eq!(first_numbered_component("h.3.attn"), None); // needs `X.Y.` before it
        assert_eq!(first_numbered_component("a.h.3.attn"), Some(3));
        assert_eq!(first_numbered_component("a.h.3"), None); // needs a dot after it
    }

    #[test]
    fn bad_values_are_refused_and_unevaluable_rules_left_out() {
        for config in [
            serde_json::json!({"target_modules": 3}),
            serde_json::json!({"layers_to_transform": "1"}),
            serde_json::json!({"layers_to_transform": [1], "layers_pattern": 5}),
        ] {
            assert!(Scope::from_config(&config).is_err(), "{config}");
        }
        // A rule onnx-lora cannot evaluate as Python does selects nothing out, and is named.
        for config in [
            serde_json::json!({"target_modules": "^(model(?=\\.).*\\.(q_proj|v_proj))$"}),
            serde_json::json!({"target_modules": "[[:alpha:]]_proj"}),
            serde_json::json!({"target_modules": ["q_proj"], "exclude_modules": "(?i)Q.*"}),
            serde_json::json!({"target_modules": ["q_proj"], "layers_to_transform": [1],
                "layers_pattern": "(?<=model\\.)layers"}),
        ] {
            let s = scope(config.clone());
            assert_eq!(s.unevaluable.len(), 1, "{config}");
            assert!(s.keeps(&["model.layers.0.self_attn.q_proj"]), "{config}");
        }
        assert!(scope(serde_json::json!({"target_modules": "ALL-LINEAR"})).keeps(&["x"]));
    }

    #[test]
    fn unprefixed_paths_are_kept_by_any_name_and_excluded_by_any() {
        let s = scope(
            serde_json::json!({"target_modules": ["q_proj"], "layers_to_transform": [1],
            "exclude_modules": ["unet.blocks.1.q_proj"]}),
        );
        // (a diffusers key: the pipeline part before the model's own path)
        assert!(!s.keeps(&["unet.blocks.2.q_proj", "blocks.2.q_proj"]));
        assert!(!s.keeps(&["unet.blocks.1.q_proj", "blocks.1.q_proj"]));
        assert!(!s.keeps(&[
            "model.layers.0.self_attn.q_proj",
            "layers.0.self_attn.q_proj"
        ]));
        assert!(s.keeps(&[
            "model.layers.1.self_attn.q_proj",
            "layers.1.self_attn.q_proj"
        ]));
    }
}
