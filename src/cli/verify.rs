//! `onnx-lora verify`: run two models (or one against stored outputs) on the same inputs and
//! compare every output; exit 1 when they differ.

use std::path::PathBuf;

use anyhow::Context;
use onnx_lora::verify::compare::Side;
use onnx_lora::verify::{self, Ep, OutputComparison, Status, VerifyOptions, VerifyReport};
use serde::Serialize;

use super::output::{json_line, table};

/// Run two models (or one model against stored outputs) on the same inputs and compare every
/// output by name: shape, type, max abs/rel difference, pass or fail.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  onnx-lora verify base.onnx folded.onnx
  onnx-lora verify model.onnx --inputs feeds.npz --expect outputs.npz
  onnx-lora verify a.onnx b.onnx --ep tract --dim sequence_length=32 --runs 10 --json
  onnx-lora verify serving.onnx --adapter fr.onnx_adapter --inputs in.npz --expect fr.npz

Comparison: an element passes when |a - b| <= atol + rtol * |b| (numpy.allclose; B or the
--expect file is the reference b; NaN equals NaN, and an output NaN or Inf throughout passes
with a note). Default tolerances by the compared type (the
less precise side), on CPU and when CUDA ran:
  float32    atol 1e-4  rtol 1e-4   (CUDA 5e-4, 5e-4)
  float16    atol 1e-2  rtol 1e-2   (CUDA 2e-2, 2e-2)
  bfloat16   atol 5e-2  rtol 5e-2   (CUDA 1e-1, 5e-2)
  float64    atol 1e-7  rtol 1e-6   (CUDA 1e-6, 1e-5)
  integers and bool: exact
A float output of a more precise type than the models compute in (float16 weights or casts
behind float32 inputs and outputs, as keep_io_types conversions make) takes the tolerances of
the type they compute in, and a note says so.
--atol / --rtol replace the defaults for every output.

--inputs must hold every model input, as arrays of the input's kind: float64 may feed a float32
input, any integer type an integer one (when every value fits), uint16 bits a bfloat16 one;
integers never feed float inputs, nor floats integer ones. A and B must take the same inputs (names, element types,
fixed dims).

Generated inputs (without --inputs), repeatable with --seed: symbolic dims come from --dim
(which must name a symbolic dim of the inputs), else a name containing 'batch' is 1, 'past'
0, 'seq', 'len' or 'total' 8, any other 8 on a token axis (a non-leading axis of ids that
index an embedding table, or of a mask) and 1 elsewhere ('past_sequence_length + 1' style sums
are added up); inputs named *mask* are all ones; integer inputs that index a Gather table are drawn
below its size, other integers in 0..4, bools at random; floats are N(0, 1). bfloat16 in .npz
files is uint16 bits.

--ep auto runs on CUDA when onnxruntime can register it (onnxruntime-gpu), on onnxruntime's CPU
otherwise, and on the embedded tract when no onnxruntime library is found. onnxruntime is
looked for with --ort-lib, ORT_DYLIB_PATH, the Python onnxruntime package ($ONNX_LORA_PYTHON,
./.venv/bin/python, python3), ./.venv, then the system library paths; a library named with
--ort-lib or ORT_DYLIB_PATH that does not load is an error, never a fallback to tract.

Exit codes: 0 every output equal within tolerance, 1 different (values, shapes or a missing
output: STATUS says MISSING in A / B, or SHAPE a vs b), 2 error.")]
pub struct Args {
    /// The model to check.
    a: PathBuf,
    /// The reference model (omitted with --expect).
    #[arg(required_unless_present = "expect", conflicts_with = "expect")]
    b: Option<PathBuf>,
    /// Where to run: auto (CUDA, else CPU, else tract), cuda, cpu (onnxruntime), tract.
    #[arg(long, value_enum, default_value_t = Ep::Auto)]
    ep: Ep,
    /// Inputs by name from an .npz (it must hold every input).
    #[arg(long, value_name = "FILE.npz")]
    inputs: Option<PathBuf>,
    /// Compare A's outputs with these stored ones instead of running B (.npz by output name,
    /// or .npy for a single-output model or the one --output names).
    #[arg(long, value_name = "FILE")]
    expect: Option<PathBuf>,
    /// Value of a symbolic dimension of the inputs, for generated inputs (repeatable).
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim)]
    dims: Vec<(String, usize)>,
    /// Seed of the generated inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Absolute tolerance for every output (default: by type, see below).
    #[arg(long, value_name = "X", allow_negative_numbers = true, value_parser = parse_tolerance)]
    atol: Option<f64>,
    /// Relative tolerance for every output (default: by type, see below).
    #[arg(long, value_name = "Y", allow_negative_numbers = true, value_parser = parse_tolerance)]
    rtol: Option<f64>,
    /// Run each model N times and report the mean time per run (the first run, which pays for
    /// one-time setup, is left out of the mean when N > 1).
    #[arg(long, value_name = "N", default_value_t = 1, allow_negative_numbers = true, value_parser = parse_runs)]
    runs: usize,
    /// Compare only this output (repeatable; default: every output of either side), e.g.
    /// when the --expect file holds some of the model's outputs.
    #[arg(long = "output", value_name = "NAME")]
    outputs: Vec<String>,
    /// JSON Lines on stdout: one "output" record per output, then a "verdict".
    #[arg(long)]
    json: bool,
    /// The onnxruntime shared library to load (libonnxruntime.so).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    /// Activate this onnxruntime LoRA adapter (.onnx_adapter) while running A (repeatable;
    /// for serving models made with `inject --as-inputs`).
    #[arg(long = "adapter", value_name = "FILE")]
    adapters: Vec<PathBuf>,
}

fn parse_dim(s: &str) -> Result<(String, usize), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=VALUE"))?;
    // (0 is a size: an empty KV cache's past length)
    let value: usize =
        value
            .trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| match e.kind() {
                std::num::IntErrorKind::PosOverflow => format!("'{value}' is too large"),
                _ => format!("'{value}' is not a non-negative integer"),
            })?;
    Ok((name.trim().to_string(), value))
}

/// `--runs`: at least 1.
fn parse_runs(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{s}' is not a number of runs (1 or more)")),
    }
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let opts = VerifyOptions {
        ep: args.ep,
        inputs: args.inputs,
        dims: args.dims,
        seed: args.seed,
        atol: args.atol,
        rtol: args.rtol,
        runs: args.runs,
        ort_lib: args.ort_lib,
        adapters: args.adapters,
        reference_label: None,
        outputs: args.outputs,
    };
    let report = match (&args.b, &args.expect) {
        (_, Some(expected)) => verify::verify_expected(&args.a, expected, &opts)?,
        (Some(b), None) => verify::verify_models(&args.a, b, &opts)?,
        (None, None) => anyhow::bail!("give model B or --expect FILE"),
    };
    verdict(&report, args.json)
}

/// Prints the notes (stderr) and the comparison (text or JSON Lines); returns the exit code.
fn verdict(report: &VerifyReport, json: bool) -> anyhow::Result<u8> {
    for note in &report.notes {
        eprintln!("onnx-lora: note: {note}");
    }
    if json {
        print_json(report)?;
    } else {
        print_text(report);
    }
    Ok(if report.passed {
        super::EXIT_OK
    } else {
        super::EXIT_MISMATCH
    })
}

/// The final JSON record.
#[derive(Serialize)]
struct Verdict<'r> {
    ep: &'r str,
    passed: bool,
    outputs: usize,
    failed: usize,
    models: &'r [verify::ModelRun],
}

fn print_json(r: &VerifyReport) -> anyhow::Result<()> {
    for o in &r.outputs {
        json_line("output", o)?;
    }
    json_line(
        "verdict",
        &Verdict {
            ep: &r.ep,
            passed: r.passed,
            outputs: r.outputs.len(),
            failed: r.outputs.iter().filter(|o| !o.passed).count(),
            models: &r.models,
        },
    )
}

fn print_text(r: &VerifyReport) {
    // With --expect only A ran: the reference is the stored file.
    let reference = if r.models.len() == 1 { "--expect" } else { "B" };
    let rows: Vec<Vec<String>> = r.outputs.iter().map(|o| row(o, reference)).collect();
    print!(
        "{}",
        table(
            &[
                "OUTPUT", "STATUS", "SHAPE", "DTYPE", "MAX_ABS", "MAX_REL", "MISMATCH", "ATOL",
                "RTOL"
            ],
            &rows
        )
    );
    for m in &r.models {
        if m.runs == 1 {
            println!("{}: {}, {:.3} ms per run (1 run)", m.model, m.ep, m.mean_ms);
        } else if m.runs == 2 {
            println!(
                "{}: {}, {:.3} ms per run (the second run; the first took {:.3} ms)",
                m.model, m.ep, m.mean_ms, m.first_ms
            );
        } else {
            println!(
                "{}: {}, {:.3} ms per run (mean of runs 2 to {}; the first took {:.3} ms)",
                m.model, m.ep, m.mean_ms, m.runs, m.first_ms
            );
        }
    }
    let failed = r.outputs.iter().filter(|o| !o.passed).count();
    let n = r.outputs.len();
    let outputs = if n == 1 { "output" } else { "outputs" };
    if r.passed {
        println!("PASS: {n} {outputs} equal within tolerance (ep {})", r.ep);
    } else {
        println!("FAIL: {failed} of {n} {outputs} differ (ep {})", r.ep);
    }
}

/// A table row; `reference` names the reference side in a missing output's status.
fn row(o: &OutputComparison, reference: &str) -> Vec<String> {
    let both = |a: Option<String>, b: Option<String>| match (a, b) {
        (Some(a), Some(b)) if a == b => a,
        (a, b) => format!(
            "{} vs {}",
            a.unwrap_or_else(|| "-".into()),
            b.unwrap_or_else(|| "-".into())
        ),
    };
    let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3e}"));
    let shape = |s: &Option<Vec<usize>>| s.as_ref().map_or("-".into(), |s| format!("{s:?}"));
    let status = match (o.status, o.missing_in) {
        (Status::Missing, Some(Side::A)) => "MISSING in A".to_string(),
        (Status::Missing, _) => format!("MISSING in {reference}"),
        (Status::ShapeMismatch, _) => {
            format!("SHAPE {} vs {}", shape(&o.shape_a), shape(&o.shape_b))
        }
        (status, _) => serde_json::to_value(status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    };
    vec![
        o.name.clone(),
        status,
        both(
            o.shape_a.as_ref().map(|s| format!("{s:?}")),
            o.shape_b.as_ref().map(|s| format!("{s:?}")),
        ),
        both(o.dtype_a.clone(), o.dtype_b.clone()),
        // (NaN or infinity against another value: no finite difference says it)
        if o.nonfinite_mismatches.unwrap_or(0) > 0 {
            "non-finite".into()
        } else {
            num(o.max_abs_diff)
        },
        if o.nonfinite_mismatches.unwrap_or(0) > 0 {
            "non-finite".into()
        } else {
            num(o.max_rel_diff)
        },
        o.mismatches
            .map_or("-".into(), |m| format!("{m}/{}", o.numel)),
        format!("{:e}", o.atol),
        format!("{:e}", o.rtol),
    ]
}

/// `--verify` of fold and inject: compares `model` with `reference` on generated inputs,
/// prints the verdict (text or JSON Lines) and returns the exit code.
/// Where `fold --verify` and `inject --verify` run the models.
#[derive(clap::Args, Clone, Debug)]
pub struct RuntimeArgs {
    /// Where --verify runs the models: auto (CUDA, else CPU, else tract), cuda, cpu, tract.
    #[arg(long, value_enum, default_value_t = Ep::Auto)]
    pub ep: Ep,
    /// The onnxruntime shared library --verify loads (libonnxruntime.so; default: see
    /// `onnx-lora verify --help`).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// --verify's absolute tolerance for every output (default: by type, see `onnx-lora
    /// verify --help`).
    #[arg(long, value_name = "X", requires = "verify", allow_negative_numbers = true, value_parser = parse_tolerance)]
    pub atol: Option<f64>,
    /// --verify's relative tolerance for every output (default: by type).
    #[arg(long, value_name = "Y", requires = "verify", allow_negative_numbers = true, value_parser = parse_tolerance)]
    pub rtol: Option<f64>,
    /// --verify's inputs by name from an .npz (it must hold every input; default: generated).
    #[arg(long, value_name = "FILE.npz", requires = "verify")]
    pub inputs: Option<PathBuf>,
    /// Value of a symbolic dimension of --verify's generated inputs (repeatable), e.g. a KV
    /// cache's head size.
    #[arg(long = "dim", value_name = "NAME=VALUE", value_parser = parse_dim, requires = "verify")]
    pub dims: Vec<(String, usize)>,
}

/// A tolerance: a finite number >= 0, checked before a rewrite writes anything.
fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a finite number >= 0")),
    }
}

impl RuntimeArgs {
    /// `--inputs` and `--dim`, checked against the model a rewrite reads before it writes
    /// anything (a FIFO, a folder, a file that is no .npz, a dim name the inputs lack).
    pub(super) fn check_feeds(
        &self,
        model: &onnx_lora::onnx::LoadedModel,
        path: &std::path::Path,
    ) -> anyhow::Result<()> {
        onnx_lora::verify::check_feed_options(
            model,
            &path.display().to_string(),
            self.inputs.as_deref(),
            &self.dims,
        )
        .map_err(|e| anyhow::anyhow!("--verify: {e}"))
    }

    /// What --verify needs that can be checked before a rewrite writes anything (the
    /// onnxruntime library; for --ep cuda, the CUDA EP), so that a check that cannot run
    /// leaves nothing written.
    pub(super) fn preflight(&self) -> anyhow::Result<()> {
        onnx_lora::verify::backend::preflight(self.ep, self.ort_lib.as_deref())
            .map_err(|e| anyhow::anyhow!("--verify: {e}"))
    }
}

pub(super) fn check(
    model: &std::path::Path,
    reference: &std::path::Path,
    runtime: &RuntimeArgs,
    json: bool,
) -> anyhow::Result<u8> {
    check_labeled(model, reference, None, runtime, json, &[])
}

/// `check`, with messages naming the reference by `label` instead of its path.
fn check_labeled(
    model: &std::path::Path,
    reference: &std::path::Path,
    label: Option<&str>,
    runtime: &RuntimeArgs,
    json: bool,
    adapters: &[PathBuf],
) -> anyhow::Result<u8> {
    let opts = VerifyOptions {
        adapters: adapters.to_vec(),
        ep: runtime.ep,
        ort_lib: runtime.ort_lib.clone(),
        atol: runtime.atol,
        rtol: runtime.rtol,
        inputs: runtime.inputs.clone(),
        dims: runtime.dims.clone(),
        reference_label: label.map(str::to_string),
        ..VerifyOptions::default()
    };
    verdict(&verify::verify_models(model, reference, &opts)?, json)
}

/// `check` against a model in memory, written to a scratch folder first (runtimes take paths)
/// that is gone when this returns: messages name it by `label` (what the reference is), never
/// by that path. `adapters` (onnxruntime LoRA files) are active while `model` runs.
pub(super) fn check_against(
    model: &std::path::Path,
    reference: &onnx_lora::onnx::LoadedModel,
    label: &str,
    runtime: &RuntimeArgs,
    json: bool,
    adapters: &[PathBuf],
) -> anyhow::Result<u8> {
    // Registered, so an interrupt removes it (and the reference in it) too.
    let dir = onnx_lora::cleanup::temp_dir_in(&std::env::temp_dir())?;
    let path = dir.path().join("reference.onnx");
    onnx_lora::onnx::save(reference, &path, &super::save_args::SaveArgs::scratch())
        .with_context(|| format!("--verify: writing {label}"))?;
    check_labeled(model, &path, Some(label), runtime, json, adapters)
}
