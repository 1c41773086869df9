//! The command line: clap definitions, one module per subcommand, output helpers. The binary
//! only orchestrates; everything it does is in the library. Exit codes: 0 success, 1 the
//! models differ (verify), 2 any error (also running out of memory: `oom`), 128 + the signal
//! when interrupted (`interrupt`).

mod convert;
mod export;
mod fold;
mod inject;
mod inspect;
pub mod interrupt;
#[cfg(unix)]
pub mod oom;
mod output;
mod save_args;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status meanings, documented in README.
pub const EXIT_OK: u8 = 0;
pub const EXIT_MISMATCH: u8 = 1;
pub const EXIT_ERROR: u8 = 2;

#[derive(Parser)]
#[command(
    name = "onnx-lora",
    version,
    about = "LoRA for ONNX models: find targets, inject low-rank branches, fold PEFT adapters, verify",
    after_help = "Examples:
  onnx-lora inspect model.onnx
  onnx-lora inspect model.onnx --target 'q_proj|v_proj' --json
  onnx-lora inject model.onnx --rank 8 -o train.onnx
  onnx-lora fold model.onnx adapter/ -o model.tuned.onnx
  onnx-lora convert model.onnx -o out.onnx --external-data out.onnx.data
  onnx-lora verify base.onnx folded.onnx

Exit codes: 0 success, 1 models differ (verify), 2 error, 130 / 143 / 129 interrupted (SIGINT /
SIGTERM / SIGHUP; temporary files are removed). An output that does not pass --verify is removed."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Inspect(inspect::Args),
    Inject(inject::Args),
    Fold(fold::Args),
    Convert(convert::Args),
    ExportAdapter(export::AdapterArgs),
    ExportPeft(export::PeftArgs),
    Verify(verify::Args),
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = if e.use_stderr() { EXIT_ERROR } else { EXIT_OK };
            if !e.use_stderr() || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
            } else {
                // One line: clap's first paragraph (the message and what it lists), without the
                // usage and tips that follow.
                let text = e.render().to_string();
                let msg: Vec<&str> = text
                    .trim_start()
                    .lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                let msg = msg.join(" ");
                let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
                eprintln!("onnx-lora: error: {msg} (see --help)");
            }
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Inject(a) => inject::run(a),
        Command::Fold(a) => fold::run(a),
        Command::Convert(a) => convert::run(a),
        Command::ExportAdapter(a) => export::run_adapter(a),
        Command::ExportPeft(a) => export::run_peft(a),
        Command::Verify(a) => verify::run(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("onnx-lora: error: {}", one_line(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// A finite number, for options that scale values (NaN or infinity would make every output
/// NaN).
fn finite(s: &str) -> Result<f32, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && (x as f32).is_finite() => Ok(x as f32),
        Ok(x) if x.is_finite() => Err(format!(
            "'{s}' is beyond float32's range (±3.4e38), in which weights are scaled"
        )),
        _ => Err(format!("'{s}' is not a finite number")),
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Once the output of a rewrite of `model` (read from `path`) is written (`saved`): a warning
/// when the file held bytes the decoder did not read (fields of a newer ONNX), which the output
/// could not keep, and a note when an earlier `<output>.data` beside the output is now unused.
/// (Said after the write, so that a run that fails says only its error.)
fn warn_after_write(
    path: &std::path::Path,
    model: &onnx_lora::onnx::LoadedModel,
    saved: &onnx_lora::onnx::io::SaveReport,
) {
    if let Some(stale) = &saved.stale_data {
        eprintln!(
            "onnx-lora: note: {} is left from an earlier output; {} does not use it (delete it if nothing else does)",
            stale.display(),
            saved.model.display()
        );
    }
    if model.unread_bytes > 0 {
        eprintln!(
            "onnx-lora: warning: {}: {} bytes of the file are not fields this onnx-lora reads (a newer ONNX, or an unusual encoding); the output holds only the fields it knows",
            path.display(),
            model.unread_bytes
        );
    }
}

/// `n` and the noun for that many: "1 weight", "2 weights".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Loads a model whose values the commands that read or rewrite its weights look up by name,
/// refusing one whose graph assigns a value twice (`graph::assigned_twice`).
fn load_assigned_once(path: &std::path::Path) -> anyhow::Result<onnx_lora::onnx::LoadedModel> {
    let model = onnx_lora::onnx::load(path)?;
    if let Some(reason) = onnx_lora::graph::assigned_twice(&model.proto) {
        return Err(onnx_lora::Error::InvalidModel {
            path: path.to_path_buf(),
            reason,
        }
        .into());
    }
    Ok(model)
}

/// Loads a model that will be rewritten with its idle gate (`inject --idle-gate`) taken off, so
/// that passes see the flat serving graph; also says whether it had one.
fn load_ungated(path: &std::path::Path) -> anyhow::Result<(onnx_lora::onnx::LoadedModel, bool)> {
    let mut model = load_assigned_once(path)?;
    let gated = onnx_lora::rewrite::ungate(&mut model)?;
    Ok((model, gated))
}

/// Loads an adapter, saying on stderr what in it PEFT would not load and so is left out;
/// `root` is the user's `--root`, which a PEFT adapter some of whose module paths begin with it
/// takes (see `check_root`).
fn load_adapter(
    path: &std::path::Path,
    root: Option<&str>,
    model: &onnx_lora::onnx::LoadedModel,
) -> anyhow::Result<onnx_lora::adapter::Adapter> {
    // (a tensor larger than any this model's adapter holds is refused before it is decoded)
    let limit = onnx_lora::rewrite::adapter_tensor_limit(model);
    let mut adapter = onnx_lora::adapter::Adapter::load_within(path, Some(limit))?;
    let peft = adapter.modules.iter().all(|m| m.part.is_none());
    adapter.root = root
        .map(|r| r.trim_end_matches('.'))
        .filter(|r| {
            let prefix = format!("{r}.");
            // (a diffusers file's part is chosen later: any part's paths may take it)
            peft && (adapter.modules.iter().any(|m| m.path.starts_with(&prefix))
                || adapter
                    .diffusers
                    .as_ref()
                    .is_some_and(|f| f.parts.iter().any(|p| p.has_path_under(&prefix))))
        })
        .map(str::to_string);
    for what in &adapter.ignored {
        eprintln!("onnx-lora: warning: {}: ignoring {what}", path.display());
    }
    Ok(adapter)
}

/// Settles an adapter on the model (`rewrite::settle_root`), saying on stderr what of it
/// that left out (a diffusers file's other pipeline parts); `alpha_keys` and `part` are the
/// user's `--alpha-keys` and `--part`, for diffusers files only; `alone`, whether it is the
/// run's only adapter.
pub(crate) fn settle(
    model: &onnx_lora::onnx::io::LoadedModel,
    adapter: &mut onnx_lora::adapter::Adapter,
    alpha_keys: Option<&str>,
    part: Option<&str>,
    alone: bool,
) -> anyhow::Result<()> {
    if adapter.diffusers.is_some() {
        adapter.alpha_keys = alpha_keys.map(|how| how == "read");
        adapter.diffusers_part = part.map(str::to_string);
    }
    // (an error that names the adapter already is not prefixed with its path again)
    let path = adapter.path.display().to_string();
    let left_out = onnx_lora::rewrite::settle_root(model, adapter, alone).map_err(|e| {
        if e.to_string().starts_with(&path) {
            anyhow::Error::new(e)
        } else {
            anyhow::Error::new(e).context(path.clone())
        }
    })?;
    for what in &left_out {
        eprintln!(
            "onnx-lora: warning: {}: ignoring {what}",
            adapter.path.display()
        );
    }
    Ok(())
}

/// Refuses `--alpha-keys` and `--part` when no adapter is a diffusers LoRA file (a typo, or a
/// flag that would change nothing).
fn check_diffusers_flags(
    alpha_keys: Option<&str>,
    part: Option<&str>,
    adapters: &[onnx_lora::adapter::Adapter],
) -> anyhow::Result<()> {
    if adapters.iter().any(|a| a.diffusers.is_some()) {
        return Ok(());
    }
    if let Some(how) = alpha_keys {
        anyhow::bail!(
            "--alpha-keys {how} applies to diffusers LoRA files, and no adapter given is one (PEFT adapters take their scale from adapter_config.json; kohya files always read their alphas)"
        );
    }
    if let Some(name) = part {
        anyhow::bail!(
            "--part {name} applies to diffusers LoRA files, and no adapter given is one (a kohya file's parts are found by their modules)"
        );
    }
    Ok(())
}

/// Refuses a `--root` that no adapter took: none of the PEFT adapters' module paths begins
/// with it (a typo), or there is no PEFT adapter (kohya files bind their modules by name).
fn check_root(root: Option<&str>, adapters: &[onnx_lora::adapter::Adapter]) -> anyhow::Result<()> {
    let Some(root) = root else { return Ok(()) };
    if adapters.is_empty() || adapters.iter().any(|a| a.root.is_some()) {
        return Ok(());
    }
    let peft: Vec<&onnx_lora::adapter::Adapter> = adapters
        .iter()
        .filter(|a| a.modules.iter().all(|m| m.part.is_none()))
        .collect();
    match peft.first().and_then(|a| a.modules.first()) {
        None => anyhow::bail!(
            "--root '{root}' applies to PEFT adapters; a kohya file's modules are found by their own names"
        ),
        Some(m) => anyhow::bail!(
            "--root '{root}': none of the adapters' module paths begins with it (they are like '{}')",
            m.path
        ),
    }
}

/// Refuses, for `--verify`, an adapter module on a layer whose activations are quantized
/// (MatMulInteger) with no float values around it: no reference can be built with it, and
/// neither fold nor inject can take it, so the refusal is the layer's own, not advice to drop
/// `--verify`.
fn refuse_dynamically_quantized(
    path: &std::path::Path,
    model: &onnx_lora::onnx::LoadedModel,
    adapters: &[&onnx_lora::adapter::Adapter],
) -> anyhow::Result<()> {
    use onnx_lora::target;
    let graph = onnx_lora::graph::ModelGraph::build(&model.proto);
    let cands = target::find_candidates(&model.proto, &graph);
    for adapter in adapters {
        let (paths, _) = onnx_lora::rewrite::module_paths(adapter, &cands)?;
        for p in paths.iter().flatten() {
            let found = target::resolve_module(
                &cands,
                p,
                |c| c.dynamically_quantized() && !c.branchable(),
                |_, _| false,
            );
            if let Ok(found) = found {
                anyhow::bail!(
                    "{}: module '{p}': {}",
                    path.display(),
                    found[0].no_branch_reason()
                );
            }
        }
    }
    Ok(())
}

/// `--target REGEX`: a pattern that compiles, checked as the arguments are read.
fn parse_target(s: &str) -> Result<String, String> {
    onnx_lora::target::select::full_regex_or_why(s).map(|_| s.to_string())
}

/// What the summary line adds while `--verify` has yet to accept the output it names.
fn checking_note(verifying: bool) -> &'static str {
    if verifying {
        "; checking it (--verify): it is removed unless it passes"
    } else {
        ""
    }
}

/// Runs `--verify`'s `check` on the files this run wrote (`held` since they were put in place:
/// an interrupt removes them, as it does temps); when they do not pass (the models differ, or
/// the check itself fails) they are removed, so that no unverified output is left looking like
/// a result, and the run says which (with `json`, also as a `removed` record).
fn verify_written(
    held: onnx_lora::onnx::io::Provisional,
    written: &[std::path::PathBuf],
    json: bool,
    check: impl FnOnce() -> anyhow::Result<u8>,
) -> anyhow::Result<u8> {
    let result = check();
    if matches!(result, Ok(EXIT_OK)) {
        return result;
    }
    // Removed while still held, so that an interrupt in between removes them too; a file
    // another run has put at one of the paths since is that run's, and stays.
    let removed: Vec<&std::path::PathBuf> = written
        .iter()
        .filter(|f| held.still_ours(f) && std::fs::remove_file(f).is_ok())
        .collect();
    drop(held);
    if json {
        output::json_line("removed", &serde_json::json!({ "files": removed }))?;
    }
    let names = removed
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match result {
        Ok(code) => {
            eprintln!("onnx-lora: removed {names}: it did not pass --verify");
            Ok(code)
        }
        Err(e) => Err(e.context(format!(
            "--verify could not check the output, removed {names}"
        ))),
    }
}

/// The model's path for error messages, with a hint when some of its layers are in weight form
/// (`inject --form weight`): those are no targets until the model is folded back; or inside
/// model-local functions, which onnx-lora does not look into.
fn model_label(path: &std::path::Path, model: &onnx_lora::onnx::LoadedModel) -> String {
    let graph = onnx_lora::graph::ModelGraph::build(&model.proto);
    let mut label = path.display().to_string();
    if let (_, w @ 1..) = onnx_lora::rewrite::count_injected(model, &graph) {
        label.push_str(&format!(
            " ({w} of its layers are in weight form and no targets; `onnx-lora fold {} -o OUT` merges them first)",
            path.display()
        ));
    }
    if let Some(note) = functions_note(model) {
        label.push_str(&format!(" ({note})"));
    }
    label
}

/// Says which model-local functions hold layers onnx-lora does not look into, and how to make
/// them visible; None when none does.
fn functions_note(model: &onnx_lora::onnx::LoadedModel) -> Option<String> {
    let hidden = onnx_lora::target::layers_in_functions(&model.proto);
    if hidden.is_empty() {
        return None;
    }
    let list: Vec<String> = hidden.iter().map(|(f, n)| format!("'{f}': {n}")).collect();
    Some(format!(
        "MatMul / Gemm / Conv nodes inside model-local functions are no targets ({}); inline the functions first, e.g. with onnx.inliner.inline_local_functions",
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn written(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        let files = vec![dir.join("out.onnx"), dir.join("out.onnx.data")];
        for f in &files {
            std::fs::write(f, b"x")?;
        }
        Ok(files)
    }

    fn held() -> onnx_lora::onnx::io::Provisional {
        onnx_lora::onnx::io::Provisional::default()
    }

    #[test]
    fn verify_written_keeps_a_pass_and_removes_the_rest() -> TestResult {
        let dir = tempfile::tempdir()?;
        let files = written(dir.path())?;
        assert_eq!(
            verify_written(held(), &files, false, || Ok(EXIT_OK))?,
            EXIT_OK
        );
        assert!(files.iter().all(|f| f.exists()));
        // The models differ: exit 1, files gone.
        assert_eq!(
            verify_written(held(), &files, false, || Ok(EXIT_MISMATCH))?,
            EXIT_MISMATCH
        );
        assert!(files.iter().all(|f| !f.exists()));
        // The check fails: the error says what was removed.
        let files = written(dir.path())?;
        let err = verify_written(held(), &files, false, || anyhow::bail!("no CUDA"))
            .err()
            .ok_or("an error")?;
        let msg = format!("{err:#}");
        assert!(
            msg.contains("removed") && msg.contains("out.onnx.data") && msg.contains("no CUDA"),
            "{msg}"
        );
        assert!(files.iter().all(|f| !f.exists()));
        Ok(())
    }
}
