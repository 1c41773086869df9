//! `onnx-lora inspect`: the weights LoRA can target, resolved to module paths.

use std::path::PathBuf;

use anyhow::Context;
use onnx_lora::{graph::ModelGraph, onnx, target};

use super::output::{json_line, table};

/// List the weights LoRA can target (MatMul / Gemm / Conv / Gather with a constant weight),
/// with the module path each came from.
#[derive(clap::Args)]
#[command(after_help = "Examples:
  onnx-lora inspect model.onnx
  onnx-lora inspect model.onnx --target 'q_proj|v_proj'
  onnx-lora inspect model.onnx --target 'layers\\.[0-3]\\..*' --json | jq -r 'select(.type == \"candidate\") | .module'

--target is a regex that must match the whole module path or a dotted suffix of it, so it
works whatever prefix the export added. --json prints one JSON object per line.

FLAGS: shared (the weight also feeds other nodes; fold gives the target its own copy),
call N/M (the N-th of M calls of a layer shared across calls, as ALBERT's: TorchScript scopes
the later calls `query_1`, `query_2`; they are listed, and --target selects them, under the
module's own path, which adapters name),
subgraph (inside an If/Loop/Scan body), batchnorm-folded (the exporter folded the BatchNorm after
the layer into its weight: adapters trained on the layer are refused), quantized (fold refuses it; inject puts a float branch
beside it, for quantize_dynamic's MatMulInteger between the float values around it), packed-qkv (one weight holds the q, k and v projections side by side, as in
onnxruntime's Attention node or a qkv_proj layer; fold merges q/k/v adapter modules into its
column slices, placed by the module path named next to it), mha-in-proj / mha-out-proj (the
packed in-projection and the out_proj Linear of a torch nn.MultiheadAttention: the module's own
path names the first, as PEFT's LoRA on that module does; the out_proj, which the attention calls
by its weight and exporters scope to the attention, is listed under its own path; a
cross-attention computes the in-projection as two layers, its query from rows 0-E of the packed
weight and its key and value from rows E-3E, listed as `mha-in-proj rows A-B`).

On a model with injected branches, the branch nodes are not listed and their number is printed
on stderr; a layer in weight form (`inject --form weight`) reads W + s·A·B and is counted there
instead of listed.")]
pub struct Args {
    /// The ONNX model.
    model: PathBuf,
    /// Keep only modules matching this regex (repeatable; any may match).
    #[arg(long = "target", short = 't', value_name = "REGEX", value_parser = super::parse_target)]
    targets: Vec<String>,
    /// Keep only `all-linear` targets (PEFT's: every linear layer but the output head, and
    /// in dynamo exports, which record module classes, but `…TopKRouter` MoE routers).
    #[arg(long)]
    all_linear: bool,
    /// JSON Lines on stdout, one object per candidate.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut model = onnx::load(&args.model)?;
    // A gated serving model is inspected as the graph its If runs with an adapter active.
    let gated = onnx_lora::rewrite::ungate(&mut model)?;
    let graph = ModelGraph::build(&model.proto);
    let found = target::find_candidates(&model.proto, &graph);
    // A later call of a shared layer (`attention.query_1`) is listed, and selected, under the
    // module it calls: the path an adapter names.
    let calls = target::module_calls(&found, |a, b| {
        onnx_lora::rewrite::same_values(&model, &graph, a, b)
    });
    let cands: Vec<target::Candidate> = found
        .iter()
        .zip(&calls)
        .map(|(c, call)| match call {
            Some(call) => target::Candidate {
                module: found[call.first].module.clone(),
                ..c.clone()
            },
            None => c.clone(),
        })
        .collect();
    // (a scope that fold refuses as ambiguous when an adapter names it)
    let ambiguous = target::ambiguous_scopes(&found);
    let at = |c: &target::Candidate| cands.iter().position(|d| std::ptr::eq(d, c));
    let call_of = |c: &target::Candidate| calls[at(c)?];
    let is_ambiguous = |c: &target::Candidate| at(c).is_some_and(|i| ambiguous[i]);
    let spec = args.all_linear.then_some(target::TargetSpec::AllLinear);
    let chosen = target::select(&cands, spec.as_ref(), &args.targets)
        .with_context(|| args.model.display().to_string())?;
    let (branches, weight_form) = onnx_lora::rewrite::count_injected(&model, &graph);
    // (their scopes, for the note)
    let mut chosen_ambiguous: Vec<&str> = chosen
        .iter()
        .filter_map(|c| at(c).filter(|&i| ambiguous[i]))
        .map(|i| found[i].module.as_str())
        .collect();
    chosen_ambiguous.sort_unstable();
    chosen_ambiguous.dedup();
    if args.json {
        // (the same notes on stderr: stdout stays JSON)
        notes(&model, gated, branches, weight_form, &chosen_ambiguous);
        // (a weight a layer called thousands of times reads: each call's record lists a few
        // other readers, and one `readers` record lists them all, so the output grows with
        // the calls rather than with their square)
        let mut long_lists: Vec<(&str, &[String])> = Vec::new();
        for c in &chosen {
            let mut v = serde_json::to_value(c)?;
            // (`shared_with` lists the first SHARED_LISTED)
            if c.shared_with.len() > onnx_lora::target::SHARED_LISTED {
                v["shared_with_total"] = c.shared_with.len().into();
                let all = c.shared_with.all();
                if !long_lists.iter().any(|(_, l)| std::ptr::eq(*l, all)) {
                    long_lists.push((c.weight.as_str(), all));
                }
            }
            if let Some(call) = call_of(c) {
                v["call"] = call.number.into();
                v["calls"] = call.of.into();
            }
            if is_ambiguous(c) {
                v["ambiguous_scope"] = true.into();
            }
            json_line("candidate", &v)?;
        }
        for (weight, readers) in long_lists {
            json_line(
                "readers",
                &serde_json::json!({"weight": weight, "readers": readers}),
            )?;
        }
        json_line(
            "report",
            &serde_json::json!({
                "candidates": cands.len(),
                "listed": chosen.len(),
                "branches": branches + weight_form,
                "weight_form": weight_form,
                "idle_gate": gated,
            }),
        )?;
        return Ok(super::EXIT_OK);
    }
    let rows: Vec<Vec<String>> = chosen
        .iter()
        .map(|c| {
            let mut flags: Vec<String> = Vec::new();
            if c.shared {
                flags.push("shared".into());
            }
            if c.in_subgraph {
                flags.push("subgraph".into());
            }
            if c.quantized {
                flags.push("quantized".into());
            }
            if c.norm_folded {
                flags.push("batchnorm-folded".into());
            }
            if c.packed.is_some() {
                flags.push("packed-qkv".into());
            }
            if c.inner_pad.is_some() {
                flags.push("padded-inside".into());
            }
            match c.mha {
                Some(onnx_lora::target::MhaPart::InProj) => flags.push(match c.mha_rows {
                    Some([a, b]) => format!("mha-in-proj rows {a}-{b}"),
                    None => "mha-in-proj".into(),
                }),
                Some(onnx_lora::target::MhaPart::OutProj) => flags.push("mha-out-proj".into()),
                None => {}
            }
            if let Some(call) = call_of(c) {
                flags.push(format!("call {}/{}", call.number, call.of));
            }
            if is_ambiguous(c) {
                flags.push("ambiguous-scope".into());
            }
            vec![
                match (&c.packed, c.module.is_empty()) {
                    (Some(p), true) if !p.scope.is_empty() => format!("(q/k/v near {})", p.scope),
                    (_, true) => "?".into(),
                    _ => c.module.clone(),
                },
                c.op.clone(),
                format!("{:?}", c.shape),
                serde_json::to_value(c.layout)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                c.dtype.clone(),
                c.weight.clone(),
                c.node.clone(),
                flags.join(","),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "MODULE", "OP", "SHAPE", "LAYOUT", "DTYPE", "WEIGHT", "NODE", "FLAGS"
            ],
            &rows
        )
    );
    eprintln!("{} of {} candidates", chosen.len(), cands.len());
    notes(&model, gated, branches, weight_form, &chosen_ambiguous);
    Ok(super::EXIT_OK)
}

/// What stderr tells beside the list: model-local functions, the idle gate, injected branches.
fn notes(
    model: &onnx::LoadedModel,
    gated: bool,
    branches: usize,
    weight_form: usize,
    ambiguous: &[&str],
) {
    if let Some(note) = super::functions_note(model) {
        eprintln!("note: {note}");
    }
    if !ambiguous.is_empty() {
        eprintln!(
            "note: the nodes flagged ambiguous-scope (scope {}) are listed as calls of the module on their weight whose later calls they may be; nothing the export names (a bias) tells them from a module of that scope, so fold and inject refuse both modules if an adapter names the scope",
            ambiguous.join(", ")
        );
    }
    if gated {
        eprintln!(
            "idle gate: the graph is one If that runs the base graph while every LoRA input is empty (listed: the graph it runs with an adapter)"
        );
    }
    match (branches, weight_form) {
        (0, 0) => {}
        (n, 0) => eprintln!(
            "{n} LoRA branches injected by onnx-lora (their nodes are not listed; `onnx-lora fold MODEL -o OUT` merges them, except beside quantized weights, which take no merge)"
        ),
        (n, w) => eprintln!(
            "{} LoRA branches injected by onnx-lora, {w} of them in weight form: those layers read W + s·A·B and are not listed; `onnx-lora fold MODEL -o OUT` merges them",
            n + w
        ),
    }
}
