//! Choosing candidates: PEFT's `target_modules` semantics (a list matches a module by exact
//! name or dotted suffix; a string is a full regex match; `all-linear` is every linear layer
//! but the output head), `--target` regexes, and resolving one adapter module path to the one
//! weight it adapts. Exports add wrapper prefixes (`m.model.layers.0...`) or drop the root's,
//! so every comparison works on dotted suffixes.

use regex::Regex;

use super::Candidate;
use crate::error::{Error, Result};

/// What to target, as PEFT's `target_modules` says it.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// Module names: exact or dotted-suffix match (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    Names(Vec<String>),
    /// A regex that must match a whole module path (or a dotted suffix of it).
    Regex(String),
    /// Every linear candidate except the output head.
    AllLinear,
}

/// `path` and each of its dotted suffixes, longest first.
pub fn dotted_suffixes(path: &str) -> impl Iterator<Item = &str> {
    std::iter::once(path).chain(path.match_indices('.').map(move |(i, _)| &path[i + 1..]))
}

/// True when `name` is `module` or a dotted suffix of it.
pub fn name_matches(module: &str, name: &str) -> bool {
    module == name
        || (module.len() > name.len()
            && module.ends_with(name)
            && module.as_bytes()[module.len() - name.len() - 1] == b'.')
}

/// The shortest leading part of module path `path` (`pooler` of `pooler.dense`,
/// `encoder.layer.5` of `encoder.layer.5.output.dense` in a two-layer model) under which no
/// candidate of a model that names its modules lies, anywhere in its paths; None when every
/// ancestor of `path` is there (the module itself is what is missing) or nothing is named.
fn absent_ancestor<'a>(cands: &[Candidate], path: &'a str) -> Option<&'a str> {
    if !cands.iter().any(|c| c.module.contains('.')) {
        return None;
    }
    // (`p` whole components of a module path: at its start, end or between dots)
    let present = |p: &str| {
        cands.iter().any(|c| {
            let m = c.module.as_str();
            std::iter::once(0)
                .chain(m.match_indices('.').map(|(i, _)| i + 1))
                .any(|i| {
                    m[i..].starts_with(p)
                        && m.as_bytes().get(i + p.len()).is_none_or(|&b| b == b'.')
                })
        })
    };
    path.match_indices('.')
        .map(|(i, _)| &path[..i])
        .find(|p| !present(p))
}

/// Compiles a user regex so that it must match the whole string. An error names the pattern
/// as the user wrote it, in one line.
pub fn full_regex(pattern: &str) -> Result<Regex> {
    full_regex_or_why(pattern)
        .map_err(|why| Error::Usage(format!("invalid target pattern '{pattern}': {why}")))
}

/// [`full_regex`], its error what is wrong with the pattern as the user wrote it (one line).
pub fn full_regex_or_why(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        // (the pattern alone, for an error about what the user wrote; its last line says what)
        let e = Regex::new(pattern).err().unwrap_or(e);
        let what = e.to_string();
        let what = what.lines().last().unwrap_or_default().trim();
        what.strip_prefix("error: ").unwrap_or(what).to_string()
    })
}

fn regex_matches(re: &Regex, module: &str) -> bool {
    !module.is_empty() && dotted_suffixes(module).any(|s| re.is_match(s))
}

/// The output head that PEFT's `all-linear` leaves out: `lm_head`, or a linear layer whose
/// weight is tied to an embedding table.
pub fn is_output_head(c: &Candidate, all: &[Candidate]) -> bool {
    let last = c.module.rsplit('.').next().unwrap_or("");
    last == "lm_head"
        || (c.shared
            && all
                .iter()
                .any(|o| o.op == "Gather" && o.source == c.source && o.source.is_some()))
}

/// A MoE router that transformers implements as a class of its own (`…TopKRouter`: Mixtral,
/// Qwen2-MoE, OLMoE), not an `nn.Linear`: PEFT's `all-linear` leaves it out. (Llama 4's
/// `Llama4Router` subclasses `nn.Linear`, and PEFT takes it.) Only the dynamo exporter records
/// module classes; a TorchScript export's router counts as linear.
pub fn is_router(c: &Candidate) -> bool {
    c.module_class
        .as_deref()
        .and_then(|k| k.rsplit('.').next())
        .is_some_and(|k| k.ends_with("TopKRouter"))
}

/// Candidates chosen by `spec` (if any) and by every `--target` regex (if any); with neither,
/// all candidates.
pub fn select<'a>(
    cands: &'a [Candidate],
    spec: Option<&TargetSpec>,
    patterns: &[String],
) -> Result<Vec<&'a Candidate>> {
    let spec_re = match spec {
        Some(TargetSpec::Regex(p)) => Some(full_regex(p)?),
        _ => None,
    };
    let res: Vec<Regex> = patterns
        .iter()
        .map(|p| full_regex(p))
        .collect::<Result<_>>()?;
    Ok(cands
        .iter()
        .filter(|c| match spec {
            None => true,
            Some(TargetSpec::Names(names)) => names.iter().any(|n| name_matches(&c.module, n)),
            Some(TargetSpec::Regex(_)) => spec_re
                .as_ref()
                .is_some_and(|re| regex_matches(re, &c.module)),
            Some(TargetSpec::AllLinear) => {
                c.is_linear() && !is_output_head(c, cands) && !is_router(c)
            }
        })
        .filter(|c| res.is_empty() || res.iter().any(|re| regex_matches(re, &c.module)))
        .collect())
}

/// Known differences between exporters' scope names for the same module.
const ALIASES: [(&str, &str); 2] = [("self_attn", "attn"), ("attn", "self_attn")];

/// `path` with each known scope-name difference applied (`self_attn` → `attn`), where it changes.
fn aliases(path: &str) -> impl Iterator<Item = String> + '_ {
    ALIASES.iter().filter_map(move |(from, to)| {
        let alias = path
            .split('.')
            .map(|s| if s == *from { *to } else { s })
            .collect::<Vec<_>>()
            .join(".");
        (alias != path).then_some(alias)
    })
}

/// Whether module path `module` is `path` or ends with it, as it is or under a scope-name
/// alias (what `resolve_module` matches by name).
pub(crate) fn matches_path(module: &str, path: &str) -> bool {
    !module.is_empty()
        && (name_matches(module, path) || aliases(path).any(|a| name_matches(module, &a)))
}

/// The candidates whose module path `path` names: those at exactly that path, else those at
/// it under the shortest wrapper prefix where that prefix begins every other match's
/// (`m.fc_1`, not `m.blocks.0.fc_1`), else every module path ending with it.
fn named_by<'a>(cands: impl Iterator<Item = &'a Candidate>, path: &str) -> Vec<&'a Candidate> {
    let mut found: Vec<&Candidate> = cands
        .filter(|c| !c.module.is_empty() && name_matches(&c.module, path))
        .collect();
    // (the prefix each match adds to the path: none where it is exact)
    let outer = found
        .iter()
        .map(|c| &c.module[..c.module.len() - path.len()])
        .min_by_key(|w| w.len());
    if let Some(outer) = outer
        && found.iter().all(|c| c.module.starts_with(outer))
    {
        found.retain(|c| c.module.len() - path.len() == outer.len());
    }
    found
}

/// The module paths that `path` names ([`named_by`]), as it is or else under a scope-name
/// alias; several where it is ambiguous.
pub fn modules_named<'a>(cands: &'a [Candidate], path: &str) -> Vec<&'a str> {
    for p in std::iter::once(path.to_string()).chain(aliases(path)) {
        let mut found: Vec<&str> = named_by(cands.iter(), &p)
            .into_iter()
            .map(|c| c.module.as_str())
            .collect();
        found.sort_unstable();
        found.dedup();
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// Whether some candidate has module path `path` as it is (or a path it is a dotted suffix
/// of), or under a scope-name alias: what `resolve_module` finds without an export root.
pub fn found_as_is(cands: &[Candidate], path: &str) -> bool {
    let found = |p: &str| {
        cands
            .iter()
            .any(|c| !c.module.is_empty() && name_matches(&c.module, p))
    };
    found(path) || aliases(path).any(|a| found(&a))
}

/// Where an export's module paths sit in an adapter's: the prefix (ending in `.`) that the
/// adapter's `paths` lose in the export, when the export's root is below PEFT's (`layers.0.fc1`
/// in a file of the encoder alone, `model.encoder.layers.0.fc1` in the adapter); None when every
/// path is found as it is. One root serves the whole adapter, so that the decoder's
/// `model.decoder.layers.0.fc1` is not taken for the encoder's layer. Of several roots that fit,
/// the one under which no adapter module is missing wins, then the one that fits more modules;
/// a tie is an error unless `forced` names the root.
pub fn export_root(
    paths: &[&str],
    cands: &[Candidate],
    forced: Option<&str>,
) -> Result<Option<String>> {
    if let Some(r) = forced
        .map(|r| r.trim_end_matches('.'))
        .filter(|r| !r.is_empty())
    {
        let root = format!("{r}.");
        if !paths.iter().any(|p| p.starts_with(&root)) {
            return Err(Error::Usage(format!(
                "--root '{r}': none of the adapter's module paths starts with it (they are like '{}')",
                paths.first().copied().unwrap_or_default()
            )));
        }
        return Ok(Some(root));
    }
    // (a q/k/v projection the export packed into one weight counts as there)
    let packed = |s: &str| matches!(super::packed::resolve_all(cands, s), Some(Ok(_)));
    let direct = |p: &str| found_as_is(cands, p) || packed(p);
    let is_module = |s: &str| cands.iter().any(|c| c.module == s) || packed(s);
    let rest: Vec<&str> = paths.iter().copied().filter(|p| !direct(p)).collect();
    let mut roots: Vec<&str> = rest
        .iter()
        .filter_map(|p| {
            dotted_suffixes(p)
                .skip(1)
                .filter(|s| s.contains('.'))
                .find(|s| is_module(s))
                .map(|s| &p[..p.len() - s.len()])
        })
        .collect();
    roots.sort_unstable();
    roots.dedup();
    // (modules missing under the root, modules it fits), the best first
    let score = |r: &str| {
        let under: Vec<&str> = rest.iter().filter_map(|p| p.strip_prefix(r)).collect();
        let fits = under.iter().filter(|s| is_module(s)).count();
        (under.len() - fits, std::cmp::Reverse(fits))
    };
    roots.sort_by_key(|r| score(r));
    match roots.as_slice() {
        [] => Ok(None),
        [best, next, ..] if score(best) == score(next) => Err(Error::Target(format!(
            "the adapter's modules fit this export under '{}' and under '{}' alike (the export's module paths lack the part that tells them apart, as in one file of an encoder-decoder export); say which part this file is with --root",
            best.trim_end_matches('.'),
            next.trim_end_matches('.')
        ))),
        [best, ..] => Ok(Some(best.to_string())),
    }
}

/// The candidates that a PEFT module path (without `base_model.model.`) adapts, among those
/// `accept` allows (by op kind): every call of the module. A module called several times (a
/// layer shared across calls, as ALBERT's) has a node per call; TorchScript suffixes the later
/// calls' scopes `_1`, `_2`, and they read the same weight. The calls read one weight, or copies
/// with equal values (`same_values`, which dynamo exports make).
///
/// A module at exactly `path` is taken before modules whose paths end with it, also under a
/// scope-name alias. Where TorchScript gave a later call of `x` the scope of a module `x_1`,
/// what each node reads tells them apart: a node reading only `x`'s parameters beside a node
/// of `x_1`'s own is `x`'s call; so is a node on `x`'s weight beside one that cannot be a call
/// of `x` (it reads `x_1`'s parameters, or a weight that `x` does not read). It is an error
/// when nothing matches, when the matches read different weights, or when two nodes of such a
/// scope on `x`'s weight, either of which may be `x`'s call, may run in one pass; nodes in
/// the two bodies of an If are taken as copies of one layer (a merged decoder's), which an
/// export where one body holds `x`'s call and the other the module `x_1` would break. The
/// message lists what was found.
pub fn resolve_module<'a>(
    cands: &'a [Candidate],
    path: &str,
    accept: impl Fn(&Candidate) -> bool,
    same_values: impl Fn(&Candidate, &Candidate) -> bool,
) -> Result<Vec<&'a Candidate>> {
    let pool: Vec<&Candidate> = cands.iter().filter(|c| accept(c)).collect();
    // (a module at exactly that path is the one named: `fc_1`, not `blocks.0.fc_1`, also
    // under a wrapper: `m.fc_1`, not `m.blocks.0.fc_1`; then, in each scope, a node that reads
    // another module's parameters is that module's call where a node of the scope's own
    // module competes for its name: `fc`'s second call beside the module `fc_1`)
    // (the path names a module among all candidates, then `accept` filters its nodes: a
    // module of another kind is no reason to take a deeper one)
    let by_exact_first = |p: &str| -> Vec<&'a Candidate> {
        let mut found = named_by(cands.iter(), p);
        found.retain(|c| accept(c));
        let mut scopes: Vec<&str> = found.iter().map(|c| c.module.as_str()).collect();
        scopes.sort_unstable();
        scopes.dedup();
        let kept: Vec<&Candidate> = scopes
            .into_iter()
            .flat_map(|m| scope_nodes(found.iter().copied().filter(|c| c.module == m).collect()))
            .collect();
        found.retain(|c| kept.iter().any(|k| std::ptr::eq(*k, *c)));
        found
    };
    let mut found = by_exact_first(path);
    if found.is_empty() {
        for alias in aliases(path) {
            found = by_exact_first(&alias);
            if !found.is_empty() {
                break;
            }
        }
    }
    if found.is_empty() {
        let leaf = path.rsplit('.').next().unwrap_or(path);
        // T5's and BART's `shared`: their encoder and decoder look tokens up through their own
        // embed_tokens modules, so PEFT's LoRA on `shared` is never called.
        if leaf == "shared"
            && pool.iter().any(|c| {
                c.op == "Gather"
                    && (c.module.ends_with("encoder.embed_tokens")
                        || c.module.ends_with("decoder.embed_tokens"))
            })
        {
            return Err(Error::Target(format!(
                "module '{path}' matches no weight in the model: in T5 and BART the encoder and decoder look tokens up through their own embed_tokens, which PEFT's LoRA on '{path}' does not reach, so it changes no output and the export has no lookup of its own; --allow-unmatched leaves it out, as it changes nothing"
            )));
        }
        let near: Vec<String> = pool
            .iter()
            .filter(|c| c.module.rsplit('.').next() == Some(leaf))
            .take(8)
            .map(|c| format!("{} ({} {})", c.module, c.op, c.node))
            .collect();
        let (absent, part) = absent_ancestor(cands, path)
            .map(|a| {
                let last = a.rsplit('.').next().unwrap_or(a);
                let words: Vec<String> =
                    last.split('_').map(str::to_ascii_lowercase).collect();
                let part = ["encoder", "decoder", "text", "vision", "audio", "image", "unet", "vae"]
                    .iter()
                    .any(|w| words.iter().any(|x| x == w));
                let why = if last.parse::<u64>().is_ok() {
                    "was the adapter trained on a model with more layers?"
                } else if part {
                    "a model exported in parts (as Optimum's encoder.onnx and decoder.onnx) holds one part's layers in each file; --allow-unmatched applies the modules of this one"
                } else {
                    "the export may have left it out, as an exporter drops the modules no exported output depends on (BERT's pooler when only last_hidden_state is exported), its layer may compute its weight in the graph (weight normalization, as a TorchScript export of HuBERT's pos_conv_embed: no constant weight to change; a dynamo export keeps it constant), or the adapter names it otherwise"
                };
                (format!(": this model has no layer under '{a}' ({why})"), part)
            })
            .unwrap_or_default();
        // (layers of the same name in another part are no hint where that part is absent)
        let near = if part { Vec::new() } else { near };
        return Err(Error::Target(if near.is_empty() {
            format!(
                "module '{path}' matches no weight in the model{absent} ({} candidates; see `onnx-lora inspect`)",
                pool.len()
            )
        } else {
            format!(
                "module '{path}' matches no weight in the model{absent}; similar: {}",
                near.join(", ")
            )
        }));
    }
    // TorchScript scopes a module's later call `x_1` as it scopes a module `x_1`, and numbers
    // the nodes of one scope apart. Of the nodes of such a scope, one that cannot be a later
    // call (it reads a parameter named after the scope, or a weight that no `x` reads) is the
    // module's, and the others, each on the weight of an `x` it may be a later call of, are
    // those calls. Where every node may be, two nodes on one weight that may run in one pass
    // (not the two bodies of an If) may be either.
    if found.len() > 1 && found.iter().all(|c| c.module == found[0].module) {
        if found.iter().any(|c| call_of_in(&pool, c).is_none()) {
            found.retain(|c| call_of_in(&pool, c).is_none());
        } else if let Some(x) = ambiguous_scope_call(&pool, &found) {
            let nodes: Vec<&str> = found.iter().map(|c| c.node.as_str()).collect();
            return Err(Error::Target(format!(
                "module '{path}' is ambiguous in this TorchScript export: it scopes nodes {} alike, on the weight that '{}' ({}) reads too, and one of them may be a later call of '{}'; nothing the export names (a bias) tells which (a dynamo export names calls by their module)",
                super::list_names(nodes.iter().copied(), nodes.len(), 8),
                x.module,
                x.node,
                x.module
            )));
        }
    }
    // (later calls of any node found, not only the first: where the copies of a layer in an
    // If's two bodies read copies of its weight, a later call reads one of them)
    let first = found[0];
    let scope = found.len();
    for c in &pool {
        if !found.iter().any(|f| std::ptr::eq(*f, *c))
            && found[..scope]
                .iter()
                .any(|f| f.source.is_some() && c.source == f.source && later_call_of(f, c))
        {
            found.push(c);
        }
    }
    if found
        .iter()
        .any(|c| (c.source != first.source || c.window != first.window) && !same_values(first, c))
    {
        let list: Vec<String> = found
            .iter()
            .map(|c| format!("{} ({} {}, weight {})", c.module, c.op, c.node, c.weight))
            .collect();
        return Err(Error::Target(format!(
            "module '{path}' is ambiguous: it matches {} weights: {}",
            list.len(),
            super::list_names(list.iter().map(String::as_str), list.len(), 8)
        )));
    }
    Ok(found)
}

/// The nodes of a scope as its lookup keeps them: a node reading another module's parameters
/// is that module's call, unless every node does.
fn scope_nodes(all: Vec<&Candidate>) -> Vec<&Candidate> {
    if all.iter().any(|c| !reads_others_params(c)) {
        all.into_iter()
            .filter(|c| !reads_others_params(c))
            .collect()
    } else {
        all
    }
}

/// The `x` whose later call node `n` may be by TorchScript's scope names: a candidate of
/// `pool` on `n`'s weight whose scope `n`'s extends (`fc` for `/fc_1/MatMul`).
fn call_of_in<'a>(pool: &[&'a Candidate], n: &Candidate) -> Option<&'a Candidate> {
    pool.iter()
        .copied()
        .find(|c| c.source.is_some() && c.source == n.source && later_call_of(c, n))
}

/// Whether every node scoped `module` may be a later call of another module (TorchScript's
/// `x_1` on `x`'s weight): then the scope need not be a module of its own.
pub(crate) fn may_be_calls_only(cands: &[Candidate], module: &str) -> bool {
    let pool: Vec<&Candidate> = cands.iter().collect();
    let mut nodes = cands.iter().filter(|c| c.module == module).peekable();
    nodes.peek().is_some() && nodes.all(|n| call_of_in(&pool, n).is_some())
}

/// Where the nodes of one scope (`found`), each of which may be a later call of a module `x`,
/// hold two on one weight that may run in one pass: nothing tells which is `x`'s call and
/// which the scope's own module (see [`resolve_module`]). Returns that `x`.
fn ambiguous_scope_call<'a>(
    pool: &[&'a Candidate],
    found: &[&'a Candidate],
) -> Option<&'a Candidate> {
    if found.iter().any(|c| call_of_in(pool, c).is_none()) {
        return None;
    }
    let x = call_of_in(pool, found.first()?)?;
    found
        .iter()
        .enumerate()
        .any(|(i, a)| {
            found[i + 1..]
                .iter()
                .any(|b| b.source == a.source && !a.graph_loc.alternative_to(&b.graph_loc))
        })
        .then_some(x)
}

/// For each candidate, whether its TorchScript scope is one that [`resolve_module`] refuses as
/// ambiguous when an adapter names it: the scope's nodes may each be a later call of another
/// module on their weight, and nothing (a bias) tells which is the scope's own module.
pub fn ambiguous_scopes(cands: &[Candidate]) -> Vec<bool> {
    let pool: Vec<&Candidate> = cands.iter().collect();
    let mut out = vec![false; cands.len()];
    let mut scopes: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, c) in cands.iter().enumerate() {
        if !c.module.is_empty() {
            scopes.entry(&c.module).or_default().push(i);
        }
    }
    for nodes in scopes.values().filter(|n| n.len() > 1) {
        let found = scope_nodes(nodes.iter().map(|&i| &cands[i]).collect());
        if found.len() > 1 && ambiguous_scope_call(&pool, &found).is_some() {
            for &i in nodes {
                out[i] |= found.iter().any(|f| std::ptr::eq(*f, &cands[i]));
            }
        }
    }
    out
}

/// The module paths the candidates name, sorted, each once.
pub fn module_paths_in(cands: &[Candidate]) -> Vec<&str> {
    let mut paths: Vec<&str> = cands
        .iter()
        .map(|c| c.module.as_str())
        .filter(|m| !m.is_empty())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    paths
}

/// One call of a module called several times (a layer shared across calls, as ALBERT's): its
/// nodes carry the module's path (dynamo), or TorchScript scopes the later calls `_1`, `_2`
/// and they read the first call's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// A candidate at the module's own path (the first call in a TorchScript export, unless
    /// an optimizer reordered the graph): the path the calls are listed under.
    pub first: usize,
    /// Which call this is, from 1, in the order the calls run.
    pub number: usize,
    /// How many calls the module has.
    pub of: usize,
}

/// For each candidate, the call of a shared module it is (None for a module called once): the
/// calls are the nodes that [`resolve_module`] finds for the module's path, as fold takes them
/// (a scope refused as ambiguous makes no group of its own; its nodes stay with the module
/// whose later calls they may be). Nodes in the two bodies of an If (a merged decoder's with
/// and without past), of which a run executes one, are not calls of each other, and their
/// weights are not compared: a call's number follows the calls before it (in the order the
/// nodes run, a body's at its If or Loop) that may run with it.
pub fn module_calls(
    cands: &[Candidate],
    same_values: impl Fn(&Candidate, &Candidate) -> bool,
) -> Vec<Option<Call>> {
    let mut out: Vec<Option<Call>> = vec![None; cands.len()];
    let same = |a: &Candidate, b: &Candidate| {
        a.graph_loc.alternative_to(&b.graph_loc) || same_values(a, b)
    };
    let index = |c: &Candidate| cands.iter().position(|d| std::ptr::eq(d, c));
    // (a module's path sorts before its later calls' scopes, `fc` before `fc_1`: a node found
    // for both is the module's call)
    for path in module_paths_in(cands) {
        let Ok(found) = resolve_module(cands, path, |_| true, same) else {
            continue;
        };
        let mut group: Vec<usize> = found
            .iter()
            .filter_map(|c| index(c))
            .filter(|&i| out[i].is_none())
            .collect();
        group.sort_by_cached_key(|&i| run_position(&cands[i]));
        // (one more than the calls before it that may run with it: copies of a call in an
        // If's two bodies are one call)
        let mut numbers: Vec<usize> = Vec::with_capacity(group.len());
        for &j in &group {
            let loc = &cands[j].graph_loc;
            let before = group
                .iter()
                .zip(&numbers)
                .filter(|&(&e, _)| !cands[e].graph_loc.alternative_to(loc))
                .map(|(_, &n)| n)
                .max();
            numbers.push(1 + before.unwrap_or(0));
        }
        let of = numbers.iter().copied().max().unwrap_or(1);
        if of == 1 {
            continue;
        }
        let first = group
            .iter()
            .copied()
            .find(|&i| cands[i].module == path)
            .unwrap_or(group[0]);
        for (&j, &number) in group.iter().zip(&numbers) {
            out[j] = Some(Call { first, number, of });
        }
    }
    out
}

/// Where a candidate's node runs in the model, for ordering calls: the index of each
/// enclosing If / Loop node in its graph, outermost first, then the node's own index (a graph's
/// nodes are listed in an order they can run in).
fn run_position(c: &Candidate) -> Vec<usize> {
    c.graph_loc
        .0
        .iter()
        .map(|(node, _, _)| *node)
        .chain([c.node_index])
        .collect()
}

/// Whether candidate `later` is a later call of the module of candidate `first` by
/// TorchScript's scope names ([`is_later_call`]). The dynamo exporter names every call of a
/// module by the module's own path, so there a scope `attn_1` is another module, also when
/// the exporter merged its weight with `attn`'s because their values are equal.
pub(crate) fn later_call_of(first: &Candidate, later: &Candidate) -> bool {
    first.evidence == super::Evidence::NodeName
        && later.evidence == super::Evidence::NodeName
        && is_later_call(&first.module, &later.module)
        && !reads_own_params(later)
}

/// Whether a TorchScript-scoped layer reads a parameter of the module of which its scope names
/// a later call (`fc.bias` at scope `fc_1`): then it is that call, also where a module of its
/// own named `fc_1` exists and TorchScript gave the call's node that scope too
/// (`/fc_1/MatMul` beside the module's `/fc_1/MatMul_1`). A layer that also reads a
/// parameter of its own (a bias beside a tied weight) is its own module's.
pub(crate) fn reads_others_params(c: &Candidate) -> bool {
    let depth = c.module.split('.').count();
    // (a module whose weight is tied to another's reads that one's and its own bias: its own)
    c.evidence == super::Evidence::NodeName
        && !reads_own_params(c)
        && c.params.iter().any(|p| {
            p.rsplit_once('.').is_some_and(|(owner, _)| {
                let at_depth: Vec<&str> = owner.split('.').take(depth).collect();
                !owns(&c.module, owner) && is_later_call(&at_depth.join("."), &c.module)
            })
        })
}

/// Whether parameter owner `owner` is module `module` or inside it.
fn owns(module: &str, owner: &str) -> bool {
    owner == module
        || owner
            .strip_prefix(module)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// Whether a layer reads a parameter named under its own module path (`fc_1.bias` at scope
/// `fc_1`, `attn_1.out_proj.weight` at `attn_1`): TorchScript names a module's later call
/// `fc_1` too, but that call reads `fc`'s parameters, and no `fc_1.*` exists unless a module
/// `fc_1` does.
fn reads_own_params(c: &Candidate) -> bool {
    c.params.iter().any(|p| {
        p.rsplit_once('.')
            .is_some_and(|(owner, _)| owns(&c.module, owner))
    })
}

/// Whether `later` names a later call of the module at `first` as TorchScript scopes it:
/// the same path with `_N` added to one or more components (`attention.query` →
/// `attention.query_1`, `attention_2.query`). `conv_1` and `conv_2` are different modules.
pub(crate) fn is_later_call(first: &str, later: &str) -> bool {
    // (without collecting the parts: the lookup asks this of every pair of candidates)
    first != later
        && first.split('.').count() == later.split('.').count()
        && first.split('.').zip(later.split('.')).all(|(a, b)| {
            a == b
                || b.strip_prefix(a)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::target::test_candidate as cand;

    #[test]
    fn all_linear_leaves_out_routers_dynamo_names_by_class() {
        let class = |mut c: Candidate, k: &str| {
            c.module_class = Some(k.into());
            c
        };
        let cands = [
            class(
                cand("mlp.gate", "G"),
                "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter",
            ),
            class(cand("mlp.up", "U"), "torch.nn.modules.linear.Linear"),
            // (no class recorded: a TorchScript export's router counts as linear)
            cand("ts.mlp.gate", "T"),
            // (an nn.Linear subclass: PEFT's all-linear takes it)
            class(
                cand("l4.mlp.router", "R"),
                "transformers.models.llama4.modeling_llama4.Llama4Router",
            ),
        ];
        let chosen: Vec<&str> = select(&cands, Some(&TargetSpec::AllLinear), &[])
            .unwrap()
            .iter()
            .map(|c| c.module.as_str())
            .collect();
        assert_eq!(chosen, ["mlp.up", "ts.mlp.gate", "l4.mlp.router"]);
        // (named, a router is a target like any other)
        let named = select(&cands, None, &["mlp\\.gate".to_string()]).unwrap();
        assert!(named.iter().any(|c| c.module == "mlp.gate"));
    }

    #[test]
    fn module_calls_group_repeated_and_scoped_paths() {
        let cands = [
            cand("a.query", "W"),
            cand("a.key", "K"),
            cand("a.query_1", "W"),
            cand("a.query_2", "X"), // another weight: a different module
            cand("a.key", "K2"),    // the same path over an equal copy: a second call
            cand("conv_1", "C1"),
            cand("conv_2", "C2"),
            cand("mlp", "M1"),
            cand("mlp", "M2"), // the same path over other values: no shared layer
        ];
        let calls = module_calls(&cands, |a, b| {
            a.weight.starts_with('K') && b.weight.starts_with('K')
        });
        let got: Vec<Option<(usize, usize, usize)>> = calls
            .iter()
            .map(|c| c.map(|c| (c.first, c.number, c.of)))
            .collect();
        assert_eq!(
            got,
            [
                Some((0, 1, 2)),
                Some((1, 1, 2)),
                Some((0, 2, 2)),
                None,
                Some((1, 2, 2)),
                None,
                None,
                None,
                None
            ]
        );
    }

    /// Calls are numbered in the order they run: a call inside an If or Loop body runs at its
    /// If or Loop, also where the main graph lists a later call before the body's graph.
    #[test]
    fn module_calls_follow_run_order_across_bodies() {
        let at = |module: &str, loc: &[(usize, &str)], node: usize| {
            let mut c = cand(module, "W");
            c.graph_loc =
                crate::graph::GraphLoc(loc.iter().map(|&(n, a)| (n, a.to_string(), 0)).collect());
            c.graph = usize::from(!loc.is_empty());
            c.node_index = node;
            c
        };
        let numbers = |cands: &[Candidate]| -> Vec<Option<(usize, usize, usize)>> {
            module_calls(cands, |_, _| false)
                .iter()
                .map(|c| c.map(|c| (c.first, c.number, c.of)))
                .collect()
        };
        // (the main graph's `fc_1` after a Loop whose body calls `fc` first)
        let cands = [at("fc_1", &[], 7), at("fc", &[(5, "body")], 0)];
        assert_eq!(numbers(&cands), [Some((1, 2, 2)), Some((1, 1, 2))]);
        // (`fc`, an If whose two bodies hold copies of its second call, then a third call)
        let cands = [
            at("fc", &[], 0),
            at("fc_2", &[], 5),
            at("fc_1", &[(3, "then_branch")], 1),
            at("fc_1", &[(3, "else_branch")], 1),
        ];
        assert_eq!(
            numbers(&cands),
            [
                Some((0, 1, 3)),
                Some((0, 3, 3)),
                Some((0, 2, 3)),
                Some((0, 2, 3))
            ]
        );
    }

    /// A module at exactly the adapter's path is the one it names, before modules whose paths
    /// end with it (`fc_1` and `blocks.0.fc_1` over different weights), and so is one under the
    /// shortest wrapper prefix where that prefix begins the others'.
    #[test]
    fn an_exact_path_is_taken_before_suffix_matches() {
        let cands = [cand("blocks.0.fc_1", "A"), cand("fc_1", "B")];
        let found = resolve_module(&cands, "fc_1", |_| true, |_, _| false).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].module, "fc_1");
        let found = resolve_module(&cands, "0.fc_1", |_| true, |_, _| false).unwrap();
        assert_eq!(found[0].module, "blocks.0.fc_1");
        // (under a wrapper prefix, the shortest where it begins the others'; else ambiguous)
        let cands = [cand("m.blocks.0.fc_1", "A"), cand("m.fc_1", "B")];
        let found = resolve_module(&cands, "fc_1", |_| true, |_, _| false).unwrap();
        assert_eq!((found.len(), found[0].module.as_str()), (1, "m.fc_1"));
        assert_eq!(modules_named(&cands, "fc_1"), ["m.fc_1"]);
        let cands = [cand("dec.blocks.0.fc_1", "A"), cand("enc.fc_1", "B")];
        let err = resolve_module(&cands, "fc_1", |_| true, |_, _| false).unwrap_err();
        assert!(err.to_string().contains("matches 2 weights"), "{err}");
        assert_eq!(modules_named(&cands, "fc_1").len(), 2);
    }

    /// A module none of whose leading parts the model has (a pooler the export pruned, a layer
    /// beyond the model's depth) is said to be absent as such; a module whose parent is there
    /// (its own layer missing) and a model that names nothing get no such word.
    #[test]
    fn a_missing_part_of_the_model_is_named() {
        let cands = [
            cand("bert.encoder.layer.0.attention.self.query", "A"),
            cand("bert.encoder.layer.1.output.dense", "B"),
        ];
        let err = |p: &str| {
            resolve_module(&cands, p, |_| true, |_, _| false)
                .unwrap_err()
                .to_string()
        };
        let pooler = err("pooler.dense");
        assert!(
            pooler.contains(
                "this model has no layer under 'pooler' (the export may have left it out"
            ) && pooler.contains("similar: bert.encoder.layer.1.output.dense"),
            "{pooler}"
        );
        let decoder = err("decoder.layer.0.output.dense");
        assert!(
            decoder.contains("no layer under 'decoder' (a model exported in parts")
                && !decoder.contains("similar:"),
            "{decoder}"
        );
        assert!(
            err("bert.pooler.dense").contains("no layer under 'bert.pooler' ("),
            "{}",
            err("bert.pooler.dense")
        );
        let deep = err("encoder.layer.5.output.dense");
        assert!(
            deep.contains("no layer under 'encoder.layer.5' (was the adapter trained on a model with more layers?)"),
            "{deep}"
        );
        // (a part named inside another component is no part: "ba.a" has no component "a.a")
        let odd = [cand("ba.a.a.x", "C"), cand("q.r", "D")];
        assert_eq!(absent_ancestor(&odd, "a.a.y"), None);
        assert_eq!(absent_ancestor(&odd, "b.y"), Some("b"));
        let here = err("encoder.layer.1.output.fc");
        assert!(!here.contains("no layer under"), "{here}");
        let nameless = [cand("", "A"), cand("fc", "B")];
        let e = resolve_module(&nameless, "pooler.dense", |_| true, |_, _| false)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("no layer under"), "{e}");
    }

    /// Under a scope-name alias too, a module at exactly the path is taken first.
    #[test]
    fn an_exact_alias_path_is_taken_before_suffix_matches() {
        let cands = [cand("x.attn.q", "A"), cand("attn.q", "B")];
        let found = resolve_module(&cands, "self_attn.q", |_| true, |_, _| false).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].module, "attn.q");
    }

    /// A bias-less `fc` called twice beside a module `fc_1` with a bias, on one merged weight:
    /// TorchScript scopes `fc`'s second call like the module. In either node order, the node
    /// reading `fc_1.bias` is `fc_1`, the other `fc`'s call; with no bias to tell them apart,
    /// two such nodes in one graph are refused, and the copies of one node in an If's two
    /// bodies are one node.
    #[test]
    fn a_scope_shared_with_a_later_call_is_told_apart_by_its_own_parameters() {
        let mut own = cand("fc_1", "W");
        own.params = vec!["fc_1.bias".into()];
        own.node_index = 2;
        let mut call = cand("fc_1", "W");
        call.node_index = 1;
        for order in [[own.clone(), call.clone()], [call.clone(), own.clone()]] {
            let cands = [cand("fc", "W"), order[0].clone(), order[1].clone()];
            let found = resolve_module(&cands, "fc_1", |_| true, |_, _| false).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].node_index, 2);
            let found = resolve_module(&cands, "fc", |_| true, |_, _| false).unwrap();
            let nodes: Vec<usize> = found.iter().map(|c| c.node_index).collect();
            assert_eq!(nodes, [0, 1]);
        }
        let mut bare = own.clone();
        bare.params.clear();
        let cands = [cand("fc", "W"), bare.clone(), call.clone()];
        let err = resolve_module(&cands, "fc_1", |_| true, |_, _| false).unwrap_err();
        assert!(
            err.to_string()
                .contains("ambiguous in this TorchScript export"),
            "{err}"
        );
        // (one node in each body of an If)
        let (mut then, mut other) = (bare.clone(), bare);
        (then.graph, other.graph) = (1, 2);
        then.graph_loc = crate::graph::GraphLoc(vec![(3, "then_branch".into(), 0)]);
        other.graph_loc = crate::graph::GraphLoc(vec![(3, "else_branch".into(), 0)]);
        let cands = [cand("fc", "W"), then, other];
        let found = resolve_module(&cands, "fc_1", |_| true, |_, _| false).unwrap();
        assert_eq!(found.len(), 2);
        // (inspect flags the scope the lookup refuses, and only that one)
        assert_eq!(ambiguous_scopes(&cands), [false, false, false]);
        let mut bare = own.clone();
        bare.params.clear();
        let cands = [cand("fc", "W"), bare, call.clone()];
        assert_eq!(ambiguous_scopes(&cands), [false, true, true]);
        let cands = [cand("fc", "W"), own, call];
        assert_eq!(ambiguous_scopes(&cands), [false, false, false]);
    }

    /// A scope whose nodes all read another module's parameters (an export that names merged
    /// parameters after the first module) is still found by its name.
    #[test]
    fn a_scope_of_others_params_alone_is_found_by_name() {
        let mut fc = cand("fc", "W");
        fc.params = vec!["fc.bias".into()];
        let mut fc_1 = cand("fc_1", "W");
        fc_1.params = vec!["fc.bias".into()];
        let cands = [fc, fc_1];
        let found = resolve_module(&cands, "fc_1", |_| true, |_, _| false).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].module, "fc_1");
    }

    /// A scope that looks like a later call but reads a parameter named under its own path
    /// (TorchScript's Identity `fc_1.bias` of a merged `fc.bias`) is a module of its own; one
    /// reading the first call's parameters, or unnamed constants, is a later call.
    #[test]
    fn own_named_parameters_make_a_module() {
        let cand = |module: &str, params: &[&str]| {
            let mut c = cand(module, "W");
            c.params = params.iter().map(|p| p.to_string()).collect();
            c
        };
        let first = cand("fc", &["fc.bias"]);
        assert!(later_call_of(&first, &cand("fc_1", &["fc.bias"])));
        assert!(later_call_of(&first, &cand("fc_1", &["onnx::MatMul_21"])));
        assert!(later_call_of(&first, &cand("fc_1", &[])));
        assert!(!later_call_of(&first, &cand("fc_1", &["fc_1.bias"])));
        // (an out_proj Linear whose weight its attention reads, scoped to the attention)
        let attn = cand("attn", &["attn.out_proj.weight"]);
        assert!(!later_call_of(
            &attn,
            &cand("attn_1", &["attn_1.out_proj.weight"])
        ));
        assert!(later_call_of(
            &attn,
            &cand("attn_1", &["attn.out_proj.weight"])
        ));
        // (a prefix of the path that is no dotted parent is no owner)
        assert!(later_call_of(&attn, &cand("attn_1", &["attn_10.bias"])));
        // Reading the other module's parameters makes a node that module's call, whatever its
        // scope, unless it reads one of its own too (a weight tied to `fc`'s, its own bias).
        assert!(reads_others_params(&cand("fc_1", &["fc.bias"])));
        assert!(reads_others_params(&cand(
            "attn_1.out_proj",
            &["attn.out_proj.weight"]
        )));
        assert!(!reads_others_params(&cand(
            "fc_1",
            &["fc.weight", "fc_1.bias"]
        )));
        assert!(!reads_others_params(&cand("fc_1", &["head.bias"])));
    }

    #[test]
    fn later_calls_are_scoped_with_suffixes() {
        assert!(is_later_call("a.attention.query", "a.attention.query_1"));
        assert!(is_later_call("a.attention.query", "a.attention_2.query_2"));
        assert!(!is_later_call("a.conv_1", "a.conv_2"));
        assert!(!is_later_call("a.query", "a.query"));
        assert!(!is_later_call("a.query", "a.query_x"));
        assert!(!is_later_call("a.query", "b.query_1"));
    }

    #[test]
    fn suffix_matching() -> Result<(), Box<dyn std::error::Error>> {
        assert!(name_matches("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(name_matches(
            "m.model.layers.0.q_proj",
            "model.layers.0.q_proj"
        ));
        assert!(!name_matches("model.layers.0.xq_proj", "q_proj"));
        assert_eq!(
            dotted_suffixes("a.b.c").collect::<Vec<_>>(),
            vec!["a.b.c", "b.c", "c"]
        );
        let re = full_regex(r"layers\.[0-1]\..*")?;
        assert!(regex_matches(&re, "m.model.layers.1.mlp.up_proj"));
        assert!(!regex_matches(&re, "m.model.layers.2.mlp.up_proj"));
        let re = full_regex("q_proj|v_proj")?;
        assert!(regex_matches(&re, "model.layers.0.self_attn.v_proj"));
        assert!(!regex_matches(&re, "model.layers.0.self_attn.o_proj"));
        Ok(())
    }
}
