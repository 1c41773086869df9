//! Exports out of injected models: a PEFT adapter folder from trained fresh branches
//! (`export-peft`), and an onnxruntime `.onnx_adapter` for a serving model made with
//! `inject --as-inputs` (`export-adapter`), with exactly the names and layouts its inputs have.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, tensor::TensorView};
use serde::Serialize;

use super::unbranch::{Found, find_all};
use crate::adapter::ort_format::AdapterParam;
use crate::adapter::peft::F32Tensor;
use crate::adapter::{Adapter, ModuleAdapter, kohya};
use crate::error::{Error, Result};
use crate::onnx::pb::type_proto;
use crate::onnx::{DataType, LoadedModel};
use crate::target::select::name_matches;
use crate::tensor::{Matrix, from_f32};

#[derive(Clone, Debug, Serialize)]
pub struct PeftExport {
    pub modules: Vec<String>,
    /// The parameters (`<module>.weight`) of branches an adapter's `target_parameters` made.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<String>,
    pub r: usize,
    pub lora_alpha: f32,
    /// Modules whose values inject wrote into the weights (no branch form) and that are not
    /// given back (see `whole_record`).
    pub left_out: Vec<String>,
    /// The keys of the whole tensors given back (modules_to_save, trained biases, token rows).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub whole_values: Vec<String>,
}

/// Writes the model's injected branches as a PEFT adapter folder (adapter_config.json +
/// adapter_model.safetensors, float32), with the whole values `inject --adapter` wrote into the
/// weights (modules_to_save, trained biases, trainable tokens) under the adapter's own keys, as
/// the weights hold them now. Branch names are the module paths PEFT will look up,
/// so inject with `--strip-prefix` when the export wrapped the model; `root` is put before every
/// one of them when the export's paths lack the model's top module (`model.` of a causal LM's
/// `model.decoder.…`).
pub fn export_peft(model: &LoadedModel, dir: &Path, root: Option<&str>) -> Result<PeftExport> {
    // Weight-space branches are read by taking them out of a copy (tensors are shared).
    let mut model = model.clone();
    let (graph, found) = find_all(&mut model)?;
    if found.is_empty() {
        let replaced = super::inject::replaced_modules(&model.proto);
        return Err(Error::Target(match replaced.first() {
            None => "no injected LoRA branches to export".to_string(),
            Some(first) => format!(
                "no injected LoRA branches to export: inject wrote what its adapter gave {} module(s) ('{first}'{}) into the weights (LoHa / LoKr deltas, modules_to_save, trained biases, trainable tokens), and a PEFT LoRA adapter needs at least one LoRA module",
                replaced.len(),
                match replaced.len() {
                    1 => String::new(),
                    n => format!(" and {} more", n - 1),
                }
            ),
        }));
    }
    // What inject wrote into the weights (modules_to_save, trained biases, trainable tokens),
    // read as the weights hold it now, with the branches out.
    let whole = match super::whole_record::read(&model.proto) {
        Some(rec) if !rec.tensors.is_empty() => {
            let mut bare = model.clone();
            super::unbranch::remove_branches(&mut bare, &graph, &found);
            let (tensors, failed) = super::whole_record::read_back(&bare, &rec);
            Some((rec, tensors, failed))
        }
        _ => None,
    };
    // A branch on a packed q/k/v weight gives back the adapter modules it carries.
    let mut split = Vec::with_capacity(found.len());
    for f in found {
        if f.slices.is_empty() {
            split.push(f);
        } else {
            split.extend(per_slice(&f)?);
        }
    }
    let mut found = peft_mha(join_in_proj(split)?)?;
    if let Some(root) = root {
        let root = root.trim_end_matches('.');
        check_module_path(root)?;
        for f in &mut found {
            f.module.path = format!("{root}.{}", f.module.path);
            if let Some(outer) = &mut f.module.mha_outer {
                *outer = format!("{root}.{outer}");
            }
        }
    }
    let r = found[0].module.rank();
    let lora_alpha = found[0].scale * r as f32;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let mut modules = Vec::new();
    // (branches from an adapter's `target_parameters`: `<path>.weight`, which PEFT wraps
    // whatever the module is; target_modules would make it wrap the module as a Linear)
    let mut parameters = Vec::new();
    let mut conv1d = false;
    let (mut use_dora, mut lora_bias) = (false, false);
    let raw = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for f in &found {
        let m = &f.module;
        let (Some(a), Some(b)) = (&m.a, &m.b) else {
            continue;
        };
        // What PEFT could not load is refused here: no factors (a serving model's empty
        // defaults), factors that do not fit the layer or each other, a non-finite scale.
        if m.rank() == 0 {
            return Err(Error::Target(format!(
                "module '{}': its branch has rank-0 factors (an `inject --as-inputs` serving model's empty defaults), so there is nothing trained to export",
                m.path
            )));
        }
        check_module_path(&m.path)?;
        if f.cand.norm_folded {
            return Err(Error::Target(format!(
                "module '{}': the exporter folded the BatchNorm after its layer into the weight ('{}' holds W·γ/σ), so the branch learned its delta after that scaling, while PEFT's module acts before the BatchNorm: the factors would compute something else there; fold the branches into this model instead (`onnx-lora fold MODEL -o OUT`)",
                m.path, f.cand.weight
            )));
        }
        if !f.scale.is_finite() || f.scale == 0.0 {
            return Err(Error::Target(format!(
                "module '{}': its branch scale is {} (lora_alpha cannot be recovered from it)",
                m.path, f.scale
            )));
        }
        let (ka, kb) = if f.cand.op == "Gather" {
            ("lora_embedding_A", "lora_embedding_B")
        } else {
            ("lora_A.weight", "lora_B.weight")
        };
        let key = |k: &str| format!("base_model.model.{}.{k}", m.path);
        tensors.insert(
            key(ka),
            (
                a.shape.clone(),
                a.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        );
        // PEFT's conv lora_B is a 1x1 conv weight: (out, r, 1, 1).
        let mut b_shape = b.shape.clone();
        if f.cand.op == "Conv" {
            b_shape.extend(std::iter::repeat_n(1, f.cand.shape.len().saturating_sub(2)));
        }
        tensors.insert(
            key(kb),
            (
                b_shape,
                b.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        );
        if let Some(mag) = &m.magnitude {
            // PEFT keeps conv magnitudes as (1, out, 1, 1).
            let shape = if f.cand.op == "Conv" {
                let mut s = vec![1, mag.data.len()];
                s.extend(std::iter::repeat_n(1, f.cand.shape.len().saturating_sub(2)));
                s
            } else {
                vec![mag.data.len()]
            };
            tensors.insert(key("lora_magnitude_vector"), (shape, raw(&mag.data)));
            use_dora = true;
        }
        if let Some(bias) = &m.bias_b {
            tensors.insert(key("lora_B.bias"), (vec![bias.data.len()], raw(&bias.data)));
            lora_bias = true;
        }
        let alpha = f.scale * m.rank() as f32;
        // (an out_proj nested under its MultiheadAttention takes that module's r and alpha)
        if m.mha_outer.is_some() {
            continue;
        }
        if m.rank() != r {
            rank_pattern.insert(m.pattern_path().into_owned(), m.rank().into());
        }
        if (alpha - lora_alpha).abs() > 1e-6 * lora_alpha.abs().max(1.0) {
            alpha_pattern.insert(m.pattern_path().into_owned(), serde_json::json!(alpha));
        }
        // GPT-2 style Conv1D exports as Gemm(transB=0) with the torch weight's own layout.
        conv1d |= f.cand.op == "Gemm" && f.cand.layout == crate::target::Layout::InOut;
        if m.via_parameter {
            parameters.push(m.pattern_path().into_owned());
        } else {
            modules.push(m.path.clone());
        }
    }
    // PEFT matches a pattern key as `(.*\.)?(key)$`: a module path that ends another exported
    // one (a model's own `proj_out` and its blocks' `single_transformer_blocks.0.proj_out`) is
    // anchored at the start so that it names that module only.
    let keyed = |patterns: serde_json::Map<String, serde_json::Value>| {
        patterns
            .into_iter()
            .map(|(path, v)| {
                let key = regex::escape(&path);
                let ends_another = modules
                    .iter()
                    .chain(&parameters)
                    .any(|other| other.len() > path.len() && other.ends_with(&format!(".{path}")));
                (if ends_another { format!("^{key}") } else { key }, v)
            })
            .collect::<serde_json::Map<_, _>>()
    };
    let (rank_pattern, alpha_pattern) = (keyed(rank_pattern), keyed(alpha_pattern));
    // (the adapter's own keys and config entries; --root is for the branches' paths, read
    // from the export, not for keys PEFT wrote)
    let mut given_back: Vec<String> = Vec::new();
    let mut whole_values: Vec<String> = Vec::new();
    let mut whole_config = serde_json::Map::new();
    if let Some((rec, values, failed)) = &whole {
        for (key, shape, bytes) in values {
            // A layer's trained bias saved for a module that is a LoRA target here (an adapter
            // injected over another that gave it branches): PEFT holds it in the wrapped layer.
            let stripped = key.strip_prefix("base_model.model.").unwrap_or(key);
            // (a target_parameters module is wrapped too; the parameter keeps its own name:
            // a MultiheadAttention's in_proj_bias)
            let wrapped = |module: &str| {
                modules.iter().any(|m| m == module)
                    || parameters
                        .iter()
                        .any(|p| p.strip_suffix(".weight") == Some(module))
            };
            let key = match crate::adapter::peft::split_key(stripped) {
                Some((module, crate::adapter::peft::Part::Full("bias")))
                    if !stripped.contains(".base_layer.") && wrapped(module) =>
                {
                    let param = stripped.rsplit('.').next().unwrap_or("bias");
                    format!("base_model.model.{module}.base_layer.{param}")
                }
                _ => key.clone(),
            };
            tensors.insert(key.clone(), (shape.clone(), bytes.clone()));
            whole_values.push(key);
        }
        given_back.extend(
            rec.tensors
                .iter()
                .map(|e| e.module.clone())
                .filter(|m| !failed.contains(m)),
        );
        if !values.is_empty() {
            whole_config = rec.config.clone();
            // (token rows all left out: PEFT would look for them)
            if !values
                .iter()
                .any(|(k, _, _)| k.contains(".trainable_tokens_delta"))
            {
                whole_config.remove("trainable_token_indices");
            }
            // Names (PEFT matches them as path suffixes) that only left-out modules have.
            let only_left_out = |name: &str| {
                let hits = |m: &String| m == name || m.ends_with(&format!(".{name}"));
                failed.iter().any(hits) && !given_back.iter().any(hits)
            };
            if let Some(serde_json::Value::Array(list)) = whole_config.get_mut("modules_to_save") {
                list.retain(|v| !v.as_str().is_some_and(only_left_out));
            }
            if let Some(serde_json::Value::Object(map)) =
                whole_config.get_mut("trainable_token_indices")
            {
                map.retain(|name, _| !only_left_out(name));
            }
        }
    }
    let config_of = |k: &str, none: serde_json::Value| whole_config.get(k).cloned().unwrap_or(none);
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora_alpha,
        // (an empty list, not null, beside target_parameters: PEFT would otherwise target its
        // defaults for the model's type, Llama's q_proj and v_proj, and refuse the parameters
        // of those layers as targeted twice)
        "target_modules": modules,
        "target_parameters": if parameters.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(parameters)
        },
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": false,
        "use_dora": use_dora,
        "lora_bias": lora_bias,
        "fan_in_fan_out": conv1d,
        "lora_dropout": 0.0,
        "bias": config_of("bias", "none".into()),
        "init_lora_weights": true,
        "modules_to_save": config_of("modules_to_save", serde_json::Value::Null),
        "trainable_token_indices": config_of("trainable_token_indices", serde_json::Value::Null),
        "task_type": config_of("task_type", serde_json::Value::Null),
        "inference_mode": true,
    });
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (shape, bytes))| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::tensor(k, e.to_string()))
        })
        .collect::<Result<_>>()?;
    let st = safetensors::serialize(views, None)
        .map_err(|e| Error::Usage(format!("safetensors: {e}")))?;
    write_dir(
        dir,
        &[
            ("adapter_model.safetensors", st),
            (
                "adapter_config.json",
                serde_json::to_vec_pretty(&config).unwrap_or_default(),
            ),
        ],
    )?;
    Ok(PeftExport {
        modules,
        parameters,
        r,
        lora_alpha,
        left_out: super::inject::replaced_modules(&model.proto)
            .into_iter()
            .filter(|m| !given_back.contains(m))
            .collect(),
        whole_values,
    })
}

/// The branches of a cross-attention's in-projection, one per layer (`in_proj_rows`), joined
/// into the attention's one module, as PEFT saves it: their A, which must be one (branches
/// trained apart are no PEFT module), and their rows of B stacked, which must cover the
/// packed weight's rows from 0. Other branches pass as they are.
fn join_in_proj(found: Vec<Found>) -> Result<Vec<Found>> {
    let (parts, mut out): (Vec<Found>, Vec<Found>) = found
        .into_iter()
        .partition(|f| f.module.in_proj_rows.is_some());
    let mut by_path: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for f in parts {
        by_path.entry(f.module.path.clone()).or_default().push(f);
    }
    for (path, mut parts) in by_path {
        parts.sort_by_key(|f| f.module.in_proj_rows);
        let first = &parts[0];
        let nodes = || {
            parts
                .iter()
                .map(|f| f.cand.node.as_str())
                .collect::<Vec<_>>()
                .join("', '")
        };
        let mut next = 0;
        let mut b = Vec::new();
        for f in &parts {
            let [s, e] = f.module.in_proj_rows.unwrap_or_default();
            let (Some(fa), Some(fb), Some(a)) = (&f.module.a, &f.module.b, &first.module.a) else {
                continue;
            };
            if s != next || fb.shape.first() != Some(&(e - s)) {
                return Err(Error::Target(format!(
                    "module '{path}': its branches on the layers '{}' carry rows of the attention's in-projection that do not join into one (rows {s}-{e} after {next})",
                    nodes()
                )));
            }
            if fa != a || f.scale != first.scale {
                return Err(Error::Target(format!(
                    "module '{path}': its branches on the layers '{}' (the attention's in-projection computed in parts) no longer share one {}, so they are no PEFT module, whose LoRA on the attention has one A and one scale (were they trained apart?); fold them into this model instead (`onnx-lora fold MODEL -o OUT`)",
                    nodes(),
                    if fa != a { "lora_A" } else { "scale" }
                )));
            }
            b.extend_from_slice(&fb.data);
            next = e;
        }
        let (Some(a), Some(rank)) = (
            first.module.a.clone(),
            first
                .module
                .b
                .as_ref()
                .map(|b| b.shape.get(1).copied().unwrap_or(0)),
        ) else {
            continue;
        };
        let module = ModuleAdapter {
            a: Some(a),
            b: Some(F32Tensor {
                shape: vec![next, rank],
                data: b,
            }),
            in_proj_rows: None,
            ..first.module.clone()
        };
        let mut joined = first.carrying(module, first.scale);
        joined.cand.mha_rows = None;
        joined.cand.out_features = next as i64;
        out.push(joined);
    }
    Ok(out)
}

/// Branches on a torch `nn.MultiheadAttention`'s projections (`target::mark_mha`) as PEFT's
/// LoRA on that module saves them: the in-projection's factors at the attention module `S`,
/// the out-projection's nested at `S.base_layer.out_proj` with `S`'s rank and scale, which
/// PEFT adds twice (`adapter::MHA_OUT_PROJ_TIMES`): its B is rescaled for that. An
/// out-projection without an in-projection branch gets zero in-projection factors, so that
/// `S` is targeted. The nested module is marked with `mha_outer`; other branches pass as
/// they are.
fn peft_mha(found: Vec<Found>) -> Result<Vec<Found>> {
    use crate::target::MhaPart;
    let outer_of = |f: &Found| -> Result<String> {
        f.module
            .path
            .strip_suffix(".out_proj")
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Target(format!(
                    "branch '{}' is on the out_proj of a torch.nn.MultiheadAttention ('{}'), and PEFT adapts that layer through its attention module, but the branch name does not end in '.out_proj' to say which module that is",
                    f.module.path, f.cand.weight
                ))
            })
    };
    let mut nested: BTreeMap<usize, Found> = BTreeMap::new();
    let mut extra = Vec::new();
    for (i, f) in found.iter().enumerate() {
        if f.cand.mha != Some(MhaPart::OutProj) {
            continue;
        }
        let outer = outer_of(f)?;
        let m = &f.module;
        if m.magnitude.is_some() || m.bias_b.is_some() {
            return Err(Error::Target(format!(
                "branch '{}' is on the out_proj of a torch.nn.MultiheadAttention and has {}, which PEFT's LoRA on that module does not support",
                m.path,
                if m.magnitude.is_some() {
                    "a DoRA magnitude"
                } else {
                    "a lora_B bias"
                }
            )));
        }
        let inner = found
            .iter()
            .find(|g| g.cand.mha == Some(MhaPart::InProj) && g.module.path == outer);
        let (Some(a), Some(b)) = (&m.a, &m.b) else {
            continue;
        };
        let in_scale = match inner {
            Some(g) => {
                if g.module.rank() != m.rank() {
                    return Err(Error::Target(format!(
                        "branches '{outer}' (rank {}) and '{}' (rank {}) are on one torch.nn.MultiheadAttention, whose PEFT LoRA has one rank for its in_proj and out_proj",
                        g.module.rank(),
                        m.path,
                        m.rank()
                    )));
                }
                g.scale
            }
            None => {
                // zero in_proj factors (E → 3E) at half the out_proj's scale
                let (r, e) = (m.rank(), f.cand.in_features.max(0) as usize);
                let zeros = |shape: Vec<usize>| F32Tensor {
                    data: vec![0.0; shape.iter().product()],
                    shape,
                };
                let module = ModuleAdapter {
                    a: Some(zeros(vec![r, e])),
                    b: Some(zeros(vec![3 * e, r])),
                    keys: vec![outer.clone()],
                    ..ModuleAdapter::empty(&outer, crate::adapter::ModuleKind::Lora, None)
                };
                let s = f.scale / crate::adapter::peft::MHA_OUT_PROJ_TIMES;
                extra.push(f.carrying(module, s));
                s
            }
        };
        let by = f.scale / (crate::adapter::peft::MHA_OUT_PROJ_TIMES * in_scale);
        let path = format!("{outer}.base_layer.out_proj");
        let module = ModuleAdapter {
            a: Some(a.clone()),
            b: Some(F32Tensor {
                shape: b.shape.clone(),
                data: b.data.iter().map(|v| v * by).collect(),
            }),
            keys: vec![path.clone()],
            mha_outer: Some(outer),
            ..ModuleAdapter::empty(&path, crate::adapter::ModuleKind::Lora, None)
        };
        nested.insert(i, f.carrying(module, in_scale));
    }
    let mut out: Vec<Found> = found
        .into_iter()
        .enumerate()
        .map(|(i, f)| nested.remove(&i).unwrap_or(f))
        .collect();
    out.extend(extra);
    Ok(out)
}

/// The modules a branch on a packed q/k/v weight carries, each with its rows of A, its block
/// of B (unscaled by its own scale, which the module's scale takes), and its columns of the
/// magnitude and lora_B bias. B must be zero outside the blocks (as inject writes it): a branch
/// trained as one has no per-module factors.
fn per_slice(f: &Found) -> Result<Vec<Found>> {
    let m = &f.module;
    let (Some(a), Some(b)) = (&m.a, &m.b) else {
        return Ok(Vec::new());
    };
    let (rank, n_in, total) = (a.shape[0], a.shape.get(1).copied().unwrap_or(0), b.shape[0]);
    let at = |i: usize, j: usize| b.data[i * rank + j];
    let broken = |why: String| {
        Error::Target(format!(
            "injected branch '{}' on packed weight '{}': {why}",
            m.path, f.cand.weight
        ))
    };
    // The slices are distinct modules whose ranks tile A's rows and whose columns do not
    // overlap: nothing trained is left out, nothing given twice.
    let mut by_rank: Vec<&super::branch::Slice> = f.slices.iter().collect();
    by_rank.sort_by_key(|s| s.ranks[0]);
    let mut next = 0;
    for s in &by_rank {
        if s.ranks[0] != next || s.ranks[1] <= s.ranks[0] {
            return Err(broken(format!(
                "its slices' ranks do not tile its {rank} rows of A (module '{}' has {:?})",
                s.module, s.ranks
            )));
        }
        next = s.ranks[1];
    }
    if next != rank {
        return Err(broken(format!(
            "its slices' ranks cover {next} of its {rank} rows of A"
        )));
    }
    for (i, s) in f.slices.iter().enumerate() {
        for t in &f.slices[..i] {
            if t.module == s.module || (s.columns[0] < t.columns[1] && t.columns[0] < s.columns[1])
            {
                return Err(broken(format!(
                    "slices '{}' and '{}' name one module or overlap in columns",
                    t.module, s.module
                )));
            }
        }
    }
    let mut out = Vec::with_capacity(f.slices.len());
    for s in &f.slices {
        let ([r0, r1], [c0, c1]) = (s.ranks, s.columns);
        if r0 > r1 || r1 > rank || c0 > c1 || c1 > total || s.scale == 0.0 || !s.scale.is_finite() {
            return Err(broken(format!(
                "its slice for module '{}' (ranks {:?}, columns {:?}, scale {}) does not fit its factors ([{rank}, {n_in}], [{total}, {rank}])",
                s.module, s.ranks, s.columns, s.scale
            )));
        }
        let outside = (0..total)
            .filter(|i| !(c0..c1).contains(i))
            .any(|i| (r0..r1).any(|j| at(i, j) != 0.0));
        if outside {
            return Err(broken(format!(
                "module '{}' has lora_B values outside its columns {:?} (trained as one branch?), so it has no factors of its own; fold the model instead",
                s.module, s.columns
            )));
        }
        if let Some(v) = b
            .data
            .iter()
            .enumerate()
            .filter(|(k, _)| (c0..c1).contains(&(k / rank)) && (r0..r1).contains(&(k % rank)))
            .map(|(_, v)| v / s.scale)
            .find(|v| !v.is_finite())
        {
            return Err(broken(format!(
                "module '{}': its lora_B over its scale {} gives {v}",
                s.module, s.scale
            )));
        }
        let a_s = F32Tensor {
            shape: vec![r1 - r0, n_in],
            data: a.data[r0 * n_in..r1 * n_in].to_vec(),
        };
        let b_s = F32Tensor {
            shape: vec![c1 - c0, r1 - r0],
            data: (c0..c1)
                .flat_map(|i| (r0..r1).map(move |j| (i, j)))
                .map(|(i, j)| at(i, j) / s.scale)
                .collect(),
        };
        // Its columns of a per-channel tensor (DoRA's magnitude, the lora_B bias).
        let part = |t: &Option<F32Tensor>, on: bool, by: f32, what: &str| {
            t.as_ref()
                .filter(|_| on)
                .map(|t| match t.data.get(c0..c1) {
                    Some(d) => Ok(F32Tensor {
                        shape: vec![c1 - c0],
                        data: d.iter().map(|v| v / by).collect(),
                    }),
                    None => Err(broken(format!(
                        "its {what} has {} values, too few for module '{}' (columns {:?})",
                        t.data.len(),
                        s.module,
                        s.columns
                    ))),
                })
                .transpose()
        };
        let module = ModuleAdapter {
            a: Some(a_s),
            b: Some(b_s),
            magnitude: part(&m.magnitude, s.dora, 1.0, "magnitude")?,
            bias_b: part(&m.bias_b, s.lora_bias, s.scale, "lora_B bias")?,
            keys: vec![s.module.clone()],
            ..ModuleAdapter::empty(&s.module, crate::adapter::ModuleKind::Lora, None)
        };
        out.push(f.carrying(module, f.scale * s.scale));
    }
    Ok(out)
}

/// A branch name PEFT can look a module up by (and a key in the safetensors file can carry):
/// dotted names, none empty, without whitespace, control characters, '/' or a backslash.
fn check_module_path(path: &str) -> Result<()> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || c == '/' || c == '\\';
    if path
        .split('.')
        .any(|part| part.is_empty() || part.contains(bad))
    {
        return Err(Error::Target(format!(
            "injected branch {path:?}: its name is no module path PEFT can load (dotted names, none empty, without whitespace, control characters, '/' or '\\'); rename its nodes' onnx-lora.branch to the module's path"
        )));
    }
    Ok(())
}

/// Creates `dir` with these files atomically. Each file is written into a temp beside `dir`
/// (unnamed where the system allows it, [`crate::cleanup::temp_file_in`]: a run killed while
/// writing leaves nothing), then, all written, they are put into a temp folder beside `dir`,
/// which is renamed: a kill leaves that folder only in the moments those renames take. Every
/// temp is registered in [`crate::cleanup`] until it is in place.
fn write_dir(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    if dir.exists() {
        return Err(Error::Usage(format!(
            "{}: already exists; choose a new folder",
            dir.display()
        )));
    }
    let parent = crate::onnx::io::output_dir(dir)?;
    let mut written = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let dest = dir.join(name);
        let mut t = crate::cleanup::temp_file_in(&parent, ".tmp", &dest)
            .map_err(|e| Error::io(&parent, e))?;
        std::io::Write::write_all(t.as_file_mut(), bytes).map_err(|e| Error::io(&dest, e))?;
        t.as_file().sync_data().map_err(|e| Error::io(&dest, e))?;
        crate::onnx::io::make_readable(t.as_file(), &dest)?;
        written.push((name, t));
    }
    let tmp = crate::cleanup::temp_dir_in(&parent).map_err(|e| Error::io(&parent, e))?;
    for (name, t) in written {
        // (inside the registered temp folder once there: an interrupt removes it with it)
        let inside = tmp.path().join(name);
        t.commit(Vec::new(), |f| f.persist(&inside))
            .map_err(|e| Error::io(dir.join(name), e))?;
    }
    tmp.commit(Vec::new(), |t| {
        let kept = t.keep();
        std::fs::rename(&kept, dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(&kept);
            Error::io(dir, e)
        })
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    Ok(())
}

/// A serving model's LoRA inputs: branch name -> (A dims, B dims, dtype), with the rank
/// axis as 0.
fn serving_inputs(model: &LoadedModel) -> BTreeMap<String, ([i64; 2], [i64; 2], DataType)> {
    let mut out = BTreeMap::new();
    let Some(g) = model.proto.graph.as_ref() else {
        return out;
    };
    let dims = |name: &str| -> Option<([i64; 2], DataType)> {
        let vi = g.input.iter().find(|v| v.name() == name)?;
        let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
            return None;
        };
        let d: Vec<i64> = t
            .shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(crate::onnx::pb::tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                _ => 0,
            })
            .collect();
        (d.len() == 2).then(|| ([d[0], d[1]], DataType::from_i32(t.elem_type())))
    };
    for vi in &g.input {
        if let Some(name) = vi.name().strip_suffix(".lora_A.weight")
            && let (Some((a, dt)), Some((b, _))) =
                (dims(vi.name()), dims(&format!("{name}.lora_B.weight")))
        {
            out.insert(name.to_string(), (a, b, dt));
        }
    }
    out
}

/// The `.onnx_adapter` parameters that carry `adapter` into `serving` (made with
/// `inject --as-inputs`): A [in, r] and s·B [r, out] per module, named as the model's inputs.
pub fn serving_adapter_params(
    serving: &LoadedModel,
    adapter: &Adapter,
    allow_unmatched: bool,
) -> Result<(Vec<AdapterParam>, Vec<String>)> {
    adapter.check_foldable()?;
    let inputs = serving_inputs(serving);
    if inputs.is_empty() {
        return Err(Error::Target(format!(
            "{}: no LoRA inputs (make the serving model with `onnx-lora inject --as-inputs`)",
            serving.path.display()
        )));
    }
    // PEFT modules by the path fold looks them up by (under the export root the serving
    // model's paths lack, `settle_root`: one part of an encoder-decoder served alone); kohya's
    // by underscored name (as `module_paths` binds them), leaving out a pipeline part (lora_te_*,
    // ...) none of whose modules is in this model.
    // (kohya's SDXL files name UNet modules by the original blocks: mapped to the model's.)
    let graph = crate::graph::ModelGraph::build(&serving.proto);
    let cands = crate::target::find_candidates(&serving.proto, &graph);
    let (lookup, kohya_names) = if adapter.modules.iter().all(|m| m.part.is_none()) {
        (super::module_paths(adapter, &cands)?.0, Vec::new())
    } else {
        let paths = crate::target::select::module_paths_in(&cands);
        (
            vec![None; adapter.modules.len()],
            super::kohya_names(adapter, &paths)?,
        )
    };
    let fits = |i: usize, n: &str| {
        let m = &adapter.modules[i];
        match m.part {
            None => name_matches(n, lookup[i].as_deref().unwrap_or(&m.path)),
            part @ Some(_) => kohya::fit_part(part, &kohya_names[i], n).is_some(),
        }
    };
    let parts_in_model: Vec<&str> = adapter
        .modules
        .iter()
        .enumerate()
        .filter(|&(i, _)| inputs.keys().any(|n| fits(i, n)))
        .filter_map(|(_, m)| m.part)
        .collect();
    let mut params = Vec::new();
    let mut unmatched = Vec::new();
    for (i, m) in adapter.modules.iter().enumerate() {
        if m.part
            .is_some_and(|p| !parts_in_model.is_empty() && !parts_in_model.contains(&p))
        {
            continue;
        }
        if m.has_no_branch_form() {
            return Err(Error::Adapter {
                path: adapter.path.clone(),
                reason: format!(
                    "module '{}' ({}) has no branch form: a serving model swaps LoRA factors only",
                    m.path,
                    m.replaced_what()
                ),
            });
        }
        if m.magnitude.is_some() || m.bias_b.is_some() {
            return Err(Error::Adapter {
                path: adapter.path.clone(),
                reason: format!(
                    "module '{}': DoRA and lora_bias cannot be served through LoRA inputs",
                    m.path
                ),
            });
        }
        let mut matches: Vec<&String> = inputs.keys().filter(|n| fits(i, n)).collect();
        if let (Some(part), 2..) = (m.part, matches.len()) {
            // (a kohya name: its best fits only, as fold and inject bind it; `proj_out` is
            // the model's own before a block's)
            let fit = |n: &str| kohya::fit_part(Some(part), &kohya_names[i], n);
            let best = matches.iter().filter_map(|n| fit(n)).min();
            matches.retain(|n| fit(n) == best);
        }
        if m.part.is_none() && matches.len() > 1 {
            // (a module at exactly the path is the one named, as fold and inject take it:
            // `proj_out`, not `single_transformer_blocks.0.proj_out`)
            let path = lookup[i].as_deref().unwrap_or(&m.path);
            if matches.iter().any(|n| n.as_str() == path) {
                matches.retain(|n| n.as_str() == path);
            }
        }
        if matches.is_empty() {
            // (a kohya module by the file's name, and where an sgm name placed it)
            let shown = match (m.part, kohya_names.get(i)) {
                (Some(part), Some(std::borrow::Cow::Owned(at))) => {
                    format!("lora_{part}_{} (at {at} in this model)", m.path)
                }
                (Some(part), _) => format!("lora_{part}_{}", m.path),
                (None, _) => m.path.clone(),
            };
            if allow_unmatched {
                unmatched.push(shown);
                continue;
            }
            return Err(Error::Target(format!(
                "module '{shown}' has no LoRA input in {}: a serving model takes adapters over the modules it was made for, or some of them (--allow-unmatched leaves the others out){}",
                serving.path.display(),
                adapter
                    .root
                    .as_ref()
                    .map(|r| format!(
                        "; its module paths are the adapter's under '{}'",
                        r.trim_end_matches('.')
                    ))
                    .unwrap_or_default()
            )));
        }
        let [name] = matches.as_slice() else {
            return Err(Error::Target(format!(
                "module '{}' matches {} LoRA inputs of {} ({})",
                m.path,
                matches.len(),
                serving.path.display(),
                matches
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let (a_dims, b_dims, dtype) = inputs[*name];
        let (Some(a), Some(b)) = (&m.a, &m.b) else {
            continue;
        };
        let r = a.shape[0];
        let n_in: usize = a.shape[1..].iter().product();
        if a_dims[0] as usize != n_in || b_dims[1] as usize != b.shape[0] {
            return Err(Error::Target(format!(
                "module '{}': lora_A {:?} / lora_B {:?} do not fit the model's inputs [{}, r] / [r, {}]",
                m.path, a.shape, b.shape, a_dims[0], b_dims[1]
            )));
        }
        let s = adapter.scaling(m);
        let at = Matrix::new(r, n_in, a.data.clone())?.transposed();
        let bt = Matrix::new(b.shape[0], r, b.data.iter().map(|v| v * s).collect())?.transposed();
        let a_name = format!("{name}.lora_A.weight");
        let b_name = format!("{name}.lora_B.weight");
        params.push(AdapterParam {
            raw: from_f32(&at.data, dtype, &a_name)?,
            name: a_name,
            dims: vec![n_in as i64, r as i64],
            dtype,
        });
        params.push(AdapterParam {
            raw: from_f32(&bt.data, dtype, &b_name)?,
            name: b_name,
            dims: vec![r as i64, b.shape[0] as i64],
            dtype,
        });
    }
    Ok((params, unmatched))
}
