//! Verification: run two models (or one model against stored outputs) on the same feeds and
//! compare every output by name, with numpy `allclose` semantics and per-type default
//! tolerances (see [`compare`]). Backends are onnxruntime (CPU or CUDA, through `ort`) and the
//! embedded tract ([`backend`]); feeds come from an npz or are generated from a seed
//! ([`feeds`]). `fold --verify` and `inject --verify` reuse [`verify_models`].
//!
//! ```no_run
//! # fn main() -> onnx_lora::Result<()> {
//! use onnx_lora::verify::{VerifyOptions, verify_models};
//! let report = verify_models("base.onnx".as_ref(), "folded.onnx".as_ref(), &VerifyOptions::default())?;
//! println!("{} on {}", if report.passed { "equal" } else { "different" }, report.ep);
//! # Ok(()) }
//! ```

pub mod backend;
pub mod compare;
#[cfg(all(feature = "cuda", unix))]
mod cuda_libs;
pub mod feeds;
pub mod npz;
#[cfg(feature = "ort")]
pub mod ort;
pub mod precision;
pub mod tensor;
pub mod tract;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::onnx::{self, DataType};

pub use backend::{Backend, Ep};
pub use compare::{OutputComparison, Status, Tolerance, ToleranceOverride, default_tolerance};
pub use tensor::{ArrayData, Tensors};

/// How to verify. `Default` is: `--ep auto`, generated feeds with seed 0, default dims and
/// tolerances, one run.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub ep: Ep,
    /// Feeds from this `.npz`, which must hold every input (else feeds are generated).
    pub inputs: Option<PathBuf>,
    /// Values of symbolic dimensions (`--dim NAME=VALUE`).
    pub dims: Vec<(String, usize)>,
    pub seed: u64,
    /// Override the per-type default tolerances.
    pub atol: Option<f64>,
    pub rtol: Option<f64>,
    /// Timed runs per model (outputs of the first are compared).
    pub runs: usize,
    /// The onnxruntime library to load, before any other.
    pub ort_lib: Option<PathBuf>,
    /// onnxruntime `.onnx_adapter` files active while running the first model (A).
    pub adapters: Vec<PathBuf>,
    /// How messages and the report name model B instead of its path (for a temporary file,
    /// such as the reference `fold --verify` builds).
    pub reference_label: Option<String>,
    /// Compare only these outputs (`--output`; empty: every output).
    pub outputs: Vec<String>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            ep: Ep::Auto,
            inputs: None,
            dims: Vec::new(),
            seed: 0,
            atol: None,
            rtol: None,
            runs: 1,
            ort_lib: None,
            adapters: Vec::new(),
            reference_label: None,
            outputs: Vec::new(),
        }
    }
}

/// One model's run: where it ran and how long a run took.
#[derive(Clone, Debug, Serialize)]
pub struct ModelRun {
    /// The model's path, or the label it was given ([`VerifyOptions::reference_label`]).
    pub model: String,
    pub ep: Ep,
    pub runs: usize,
    /// Mean wall time of one run, in milliseconds (session creation and tract's plan
    /// optimization excluded). With more than one run, the first is left out: it pays for
    /// one-time work (onnxruntime's arena growth, CUDA's library handles and kernel choice).
    pub mean_ms: f64,
    /// Wall time of the first run, in milliseconds.
    pub first_ms: f64,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The execution provider that ran (`cpu`, `cuda`, `tract`; `cuda/cpu` when the two models
    /// ended up on different ones).
    pub ep: String,
    /// Every output within tolerance, none missing.
    pub passed: bool,
    pub outputs: Vec<OutputComparison>,
    pub models: Vec<ModelRun>,
    /// Things worth saying on stderr: fallbacks, generated or ignored inputs.
    pub notes: Vec<String>,
}

/// Runs `a` and `b` on the same feeds and compares their outputs; `b` is the reference.
pub fn verify_models(a: &Path, b: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    check_options(opts)?;
    let mut notes = Vec::new();
    let a = Model::new(a, None);
    let b = Model::new(b, opts.reference_label.as_deref());
    let feeds = prepare_feeds(&[&a, &b], opts, &mut notes)?;
    let (mut out_a, run_a) = run_model(&a, &feeds, opts, &opts.adapters, &mut notes)?;
    let (mut out_b, run_b) = run_model(&b, &feeds, opts, &[], &mut notes)?;
    // A generated one-element bool input is a switch (a merged decoder's `use_cache_branch`
    // picks an If body): the models run again with every switch flipped, so that both sides
    // of it are compared; those outputs are named with the switches' values.
    let switches: Vec<usize> = feeds
        .iter()
        .enumerate()
        .filter(|(_, (_, f))| f.dtype == DataType::Bool && f.data.len() == 1)
        .map(|(i, _)| i)
        .collect();
    if opts.inputs.is_some() {
        for &i in &switches {
            notes.push(format!(
                "--inputs sets the switch {}={}: only that value was run (generated inputs run both)",
                feeds[i].0,
                feeds[i].1.data[0] != 0
            ));
        }
    }
    if opts.inputs.is_none() && !switches.is_empty() {
        let mut flipped = feeds.clone();
        for &i in &switches {
            flipped[i].1.data[0] = u8::from(flipped[i].1.data[0] == 0);
        }
        let label = switches
            .iter()
            .map(|&i| format!("{}={}", flipped[i].0, flipped[i].1.data[0] != 0))
            .collect::<Vec<_>>()
            .join(", ");
        // (a bool that is no switch may not run the other way: then only the first run counts)
        let more = run_model(&a, &flipped, opts, &opts.adapters, &mut notes)
            .and_then(|(x, _)| run_model(&b, &flipped, opts, &[], &mut notes).map(|(y, _)| (x, y)));
        match more {
            Ok((more_a, more_b)) => {
                let named = |t: Tensors| t.into_iter().map(|(n, v)| (format!("{n} [{label}]"), v));
                out_a.extend(named(more_a));
                out_b.extend(named(more_b));
                notes.push(format!(
                    "the models also ran with the switch input(s) flipped ({label}): outputs marked [{label}]"
                ));
            }
            Err(e) => notes.push(format!(
                "a run with the bool input(s) flipped ({label}) failed, so only the generated values are compared: {e}"
            )),
        }
    }
    let (out_a, out_b) = select_outputs(out_a, out_b, &opts.outputs, "B")?;
    let compute = compute_precision(&[&a, &b])?;
    Ok(report(
        &out_a,
        &out_b,
        vec![run_a, run_b],
        opts,
        compute,
        notes,
    ))
}

/// Runs `a` and compares its outputs with those stored in `expected` (`.npz` by output name, or
/// a `.npy` for a single-output model). bfloat16 outputs may be stored as uint16 bits.
pub fn verify_expected(a: &Path, expected: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    check_options(opts)?;
    let mut notes = Vec::new();
    let stored = {
        let _doing = crate::cleanup::doing(format!("reading {}", expected.display()));
        npz::read_arrays(expected)?
    };
    let a = Model::new(a, None);
    let feeds = prepare_feeds(&[&a], opts, &mut notes)?;
    let (out_a, run_a) = run_model(&a, &feeds, opts, &opts.adapters, &mut notes)?;
    let stored = align_expected(expected, stored, &out_a, &opts.outputs)?;
    let (out_a, stored) = select_outputs(out_a, stored, &opts.outputs, "the --expect file")?;
    let compute = compute_precision(&[&a])?;
    Ok(report(&out_a, &stored, vec![run_a], opts, compute, notes))
}

/// Keeps only the outputs named in `names` (all of them when it is empty); a name that neither
/// side has is an error listing what they have.
fn select_outputs(
    a: Tensors,
    b: Tensors,
    names: &[String],
    b_is: &str,
) -> Result<(Tensors, Tensors)> {
    if names.is_empty() {
        return Ok((a, b));
    }
    let has = |t: &Tensors, n: &str| t.iter().any(|(m, _)| m == n);
    if let Some(n) = names.iter().find(|n| !has(&a, n) && !has(&b, n)) {
        let list = |t: &Tensors| {
            t.iter()
                .map(|(m, _)| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Error::Usage(format!(
            "--output {n}: neither A ({}) nor {b_is} ({}) has an output of that name",
            list(&a),
            list(&b)
        )));
    }
    // (an output of the run with a switch flipped is `NAME [switch=…]`)
    let keep = |t: Tensors| -> Tensors {
        t.into_iter()
            .filter(|(m, _)| {
                names.iter().any(|n| {
                    m == n
                        || m.strip_prefix(n.as_str())
                            .is_some_and(|r| r.starts_with(" ["))
                })
            })
            .collect()
    };
    Ok((keep(a), keep(b)))
}

/// The least precise float type the models compute in (see [`precision`]).
fn compute_precision(models: &[&Model]) -> Result<Option<DataType>> {
    let mut coarsest: Option<DataType> = None;
    for m in models {
        let d = precision::compute_precision(&onnx::load(m.path)?.proto);
        if d.and_then(precision::coarseness) > coarsest.and_then(precision::coarseness) {
            coarsest = d;
        }
    }
    Ok(coarsest)
}

/// A model file and how messages name it.
struct Model<'p> {
    path: &'p Path,
    label: String,
}

impl<'p> Model<'p> {
    fn new(path: &'p Path, label: Option<&str>) -> Self {
        Model {
            path,
            label: label.map_or_else(|| path.display().to_string(), str::to_string),
        }
    }
}

fn check_options(opts: &VerifyOptions) -> Result<()> {
    if opts.runs == 0 {
        return Err(Error::Usage("--runs must be at least 1".into()));
    }
    for (flag, v) in [("--atol", opts.atol), ("--rtol", opts.rtol)] {
        if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            return Err(Error::Usage(format!("{flag} must be a finite number >= 0")));
        }
    }
    // (onnxruntime would block on a FIFO, and name neither a missing file nor a device)
    for path in &opts.adapters {
        crate::onnx::io::open_input(path)?;
    }
    Ok(())
}

/// Feeds for the models' inputs, which must be alike (see [`feeds::common_inputs`]); `--dim`
/// must name a symbolic dimension of them.
fn prepare_feeds(
    models: &[&Model],
    opts: &VerifyOptions,
    notes: &mut Vec<String>,
) -> Result<Tensors> {
    let _doing = crate::cleanup::doing("making the models' inputs");
    let dims: HashMap<String, usize> = opts.dims.iter().cloned().collect();
    let mut per_model = Vec::with_capacity(models.len());
    for (i, m) in models.iter().enumerate() {
        let loaded = onnx::load(m.path)?;
        check_outputs_made(&loaded)?;
        if let Some(reason) = crate::graph::assigned_twice(&loaded.proto) {
            // (no ONNX graph; the runtimes may read it differently, so their verdicts may differ)
            notes.push(format!(
                "{} is no valid ONNX graph: {reason}; what it computes depends on the runtime",
                m.label
            ));
        }
        if i == 0 {
            check_adapters_fit(&loaded, &opts.adapters)?;
        }
        per_model.push(feeds::model_inputs(&loaded)?);
    }
    let named: Vec<String> = models.iter().map(|m| m.label.clone()).collect();
    check_dims(&opts.dims, &per_model, &named)?;
    let specs = match per_model.as_slice() {
        [a, b] => feeds::common_inputs(a, b, &dims).map_err(|d| {
            Error::Verify(format!(
                "{} and {} take different inputs: {}",
                named[0],
                named[1],
                d.describe(&named[0], &named[1])
            ))
        })?,
        _ => per_model.concat(),
    };
    let provided = match opts.inputs.as_deref() {
        Some(path) => {
            let _doing = crate::cleanup::doing(format!("reading {}", path.display()));
            let (arrays, more) = feeds::read_inputs(&specs, path)?;
            notes.extend(more);
            Some((path, arrays))
        }
        None => None,
    };
    let provided = provided.as_ref().map(|(p, a)| (*p, a.as_slice()));
    feeds::make_feeds(&specs, provided, &dims, opts.seed)
}

/// What a rewrite's `--verify` can check before writing anything: each `--dim` names a
/// symbolic dimension of `model`'s inputs, and its `--inputs` file reads as arrays that feed
/// every input of `model` (which the rewritten model takes too), as the check will feed them.
pub fn check_feed_options(
    model: &onnx::LoadedModel,
    label: &str,
    inputs: Option<&Path>,
    dims: &[(String, usize)],
) -> Result<()> {
    let specs = feeds::model_inputs(model)?;
    if !dims.is_empty() {
        check_dims(dims, std::slice::from_ref(&specs), &[label.to_string()])?;
    }
    if let Some(path) = inputs {
        let _doing = crate::cleanup::doing(format!("reading {}", path.display()));
        let dims: HashMap<String, usize> = dims.iter().cloned().collect();
        feeds::read_inputs(&specs, path)
            .and_then(|(arrays, _)| feeds::make_feeds(&specs, Some((path, &arrays)), &dims, 0))
            .map_err(|e| Error::Usage(format!("--inputs: {e}")))?;
    }
    Ok(())
}

/// Every parameter of the adapter files `--adapter` activates must be an input of the model
/// they run with (onnxruntime says only "Invalid input name"), and no two files may set the
/// same one: onnxruntime feeds an input from the last active adapter that sets it, so two
/// adapters on one module would not add up (the earlier one's values would go unused).
fn check_adapters_fit(model: &onnx::LoadedModel, adapters: &[PathBuf]) -> Result<()> {
    let Some(g) = model.proto.graph.as_ref() else {
        return Ok(());
    };
    let mut seen: HashMap<String, &Path> = HashMap::new();
    for path in adapters {
        let bytes = crate::onnx::io::map_file(path)?;
        let names = crate::adapter::ort_format::parameter_names(&bytes)
            .map_err(|e| Error::Usage(format!("--adapter {}: {e}", path.display())))?;
        for name in &names {
            if let Some(first) = seen.insert(name.clone(), path) {
                return Err(Error::Usage(format!(
                    "--adapter {} and --adapter {} both set '{name}': onnxruntime feeds each input from the last adapter that sets it, so the two would not add up; activate adapters of separate modules, or fold one adapter into the model first",
                    first.display(),
                    path.display()
                )));
            }
        }
        if let Some(name) = names
            .iter()
            .find(|n| !g.input.iter().any(|i| i.name() == *n))
        {
            let serving = g.input.iter().any(|i| i.name().ends_with(".lora_A.weight"));
            return Err(Error::Usage(format!(
                "--adapter {}: it sets '{name}', which is no input of {}{}",
                path.display(),
                model.path.display(),
                if serving {
                    " (the adapter was made for another serving model: make it for this one with `onnx-lora export-adapter ADAPTER --model SERVING.onnx`)"
                } else {
                    " (no serving model: make one with `onnx-lora inject MODEL --as-inputs`)"
                }
            )));
        }
    }
    Ok(())
}

/// A graph must have outputs, each made by a node, or an input or initializer: a runtime would
/// refuse the model otherwise (tract with a bare "no entry found for key"), or compare nothing.
fn check_outputs_made(model: &onnx::LoadedModel) -> Result<()> {
    let Some(g) = model.proto.graph.as_ref() else {
        return Ok(());
    };
    let made: std::collections::HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .chain(g.input.iter().map(|v| v.name()))
        .chain(g.initializer.iter().map(|t| t.name()))
        .collect();
    if g.output.is_empty() {
        return Err(Error::InvalidModel {
            path: model.path.clone(),
            reason: "the graph has no outputs: nothing to compare".into(),
        });
    }
    match g.output.iter().find(|o| !made.contains(o.name())) {
        Some(o) => Err(Error::InvalidModel {
            path: model.path.clone(),
            reason: format!(
                "graph output '{}' is made by no node and is no input or initializer, so no runtime can run it",
                o.name()
            ),
        }),
        None => Ok(()),
    }
}

/// Every `--dim NAME` must be a symbolic dimension of some model's inputs: a typo would
/// otherwise be ignored.
fn check_dims(
    dims: &[(String, usize)],
    per_model: &[Vec<feeds::InputSpec>],
    named: &[String],
) -> Result<()> {
    for (i, (name, v)) in dims.iter().enumerate() {
        if let Some((_, w)) = dims[..i].iter().find(|(n, w)| n == name && w != v) {
            return Err(Error::Usage(format!(
                "--dim {name} is given twice, as {w} and as {v}: give it once"
            )));
        }
    }
    let known = feeds::symbolic_dims(&per_model.concat());
    let Some((name, _)) = dims.iter().find(|(n, _)| !known.contains(n)) else {
        return Ok(());
    };
    let inputs_of = named.join(" or ");
    let have = if known.is_empty() {
        "they have none".to_string()
    } else {
        format!("they have {}", known.join(", "))
    };
    Err(Error::Usage(format!(
        "--dim {name}: no input of {inputs_of} has a symbolic dimension of that name ({have})"
    )))
}

/// Opens the model, runs it `opts.runs` times, and drops it before returning (two large
/// models are never loaded at once).
fn run_model(
    model: &Model,
    feeds: &Tensors,
    opts: &VerifyOptions,
    adapters: &[PathBuf],
    notes: &mut Vec<String>,
) -> Result<(Tensors, ModelRun)> {
    let _doing = crate::cleanup::doing(format!("running {}", model.label));
    let mut backend = backend::open(
        model.path,
        &model.label,
        opts.ep,
        opts.ort_lib.as_deref(),
        notes,
    )?;
    backend.activate_adapters(adapters)?;
    backend.prepare(feeds)?;
    let start = Instant::now();
    let outputs = backend.run(feeds)?;
    let first_ms = start.elapsed().as_secs_f64() * 1e3;
    let rest = Instant::now();
    for _ in 1..opts.runs {
        backend.run(feeds)?;
    }
    let mean_ms = if opts.runs > 1 {
        rest.elapsed().as_secs_f64() * 1e3 / (opts.runs - 1) as f64
    } else {
        first_ms
    };
    let run = ModelRun {
        model: model.label.clone(),
        ep: backend.ep(),
        runs: opts.runs,
        mean_ms,
        first_ms,
    };
    Ok((outputs, run))
}

/// Names a lone `.npy` after the model's only output (or the one `--output` names) and turns uint16 into bfloat16 where the
/// model's output is bfloat16.
fn align_expected(
    path: &Path,
    mut stored: Tensors,
    outputs: &Tensors,
    selected: &[String],
) -> Result<Tensors> {
    if npz::is_npy(path)? {
        // The array is the model's only output, or the one output `--output` names.
        let name = match (outputs.as_slice(), selected) {
            (_, [one]) => one.clone(),
            ([(only, _)], _) => only.clone(),
            _ => {
                return Err(Error::Npz {
                    path: path.to_path_buf(),
                    reason: format!(
                        "a .npy holds one array but the model has {} outputs; name the one it holds with --output, or store them in an .npz by name",
                        outputs.len()
                    ),
                });
            }
        };
        for (n, _) in &mut stored {
            n.clone_from(&name);
        }
    }
    for (name, arr) in &mut stored {
        let want = outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.dtype);
        if arr.dtype == DataType::Uint16 && want == Some(DataType::Bfloat16) {
            *arr = arr.cast(DataType::Bfloat16)?;
        }
    }
    Ok(stored)
}

fn report(
    a: &Tensors,
    b: &Tensors,
    models: Vec<ModelRun>,
    opts: &VerifyOptions,
    compute: Option<DataType>,
    notes: Vec<String>,
) -> VerifyReport {
    let _doing = crate::cleanup::doing("comparing the outputs");
    let gpu = models.iter().any(|m| m.ep == Ep::Cuda);
    let tol = ToleranceOverride {
        atol: opts.atol,
        rtol: opts.rtol,
        compute,
    };
    let outputs = compare::compare_all(a, b, tol, gpu);
    let mut eps: Vec<&str> = models.iter().map(|m| m.ep.name()).collect();
    eps.dedup();
    let mut notes = notes;
    // Float outputs more precise than the models compute took that type's tolerances: said,
    // since the table shows the output's own type.
    let loosened: Vec<&OutputComparison> = outputs
        .iter()
        .filter(|o| o.tolerance_of.is_some())
        .collect();
    if let Some(first) = loosened.first() {
        let of = first.tolerance_of.as_deref().unwrap_or_default();
        notes.push(format!(
            "the models compute in {of} (weights or casts of that type): {} compared with {of}'s default tolerances",
            loosened
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // NaN equals NaN (numpy's equal_nan): an output with no finite element on either side
    // passes, but says nothing about the models.
    for o in &outputs {
        if o.passed && o.numel > 0 && o.mismatches.is_some() && o.max_abs_diff.is_none() {
            notes.push(format!(
                "output '{}' has no element finite in both (NaN or Inf throughout): it compared equal, which checks nothing",
                o.name
            ));
        }
        if o.passed && o.numel == 0 {
            notes.push(format!(
                "output '{}' has no elements (a zero-size dimension): it compared equal, which checks nothing",
                o.name
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    VerifyReport {
        ep: eps.join("/"),
        passed: outputs.iter().all(|o| o.passed),
        outputs,
        models,
        notes,
    }
}
