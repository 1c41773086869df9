//! Packed q/k/v projections: one weight holding the query, key and value projections side by
//! side on its output axis, as onnxruntime's transformer optimizer leaves them (a
//! `com.microsoft.Attention` node with a `[hidden, q+k+v]` weight, node names gone) and as
//! model builders write them (a `qkv_proj` MatMul). A PEFT module `….q_proj` then has no weight
//! of its own: it is a column slice of the packed one, found by its layer.

use serde::Serialize;

use super::Candidate;
use super::evidence;
use crate::error::{Error, Result};
use crate::graph::ModelGraph;
use crate::onnx::pb::{ModelProto, NodeProto};
use crate::onnx::pb_ext::NodeExt;

/// Module names of the (query, key, value) projections, per model family.
pub const QKV_NAMES: [[&str; 3]; 8] = [
    ["q_proj", "k_proj", "v_proj"], // Llama, Mistral, Phi-3, OPT, Whisper, ...
    ["query", "key", "value"],      // BERT, RoBERTa, ViT
    ["q", "k", "v"],                // T5
    ["to_q", "to_k", "to_v"],       // diffusers attention
    ["q_lin", "k_lin", "v_lin"],    // DistilBERT
    ["wq", "wk", "wv"],             // Meta's reference Llama
    ["query_proj", "key_proj", "value_proj"], // DeBERTa
    ["q_linear", "k_linear", "v_linear"],
];

/// Module names of a layer that packs q, k and v in one weight (q | k | v along the output).
pub const PACKED_NAMES: [&str; 5] = ["qkv_proj", "qkv", "Wqkv", "to_qkv", "qkv_linear"];

/// What makes a candidate packed, and how its layer is known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Packed {
    /// The module path that places the packed weight in the model: its own (`…attn.qkv_proj`)
    /// or, for an Attention node, the nearest module downstream (`…attention.output.dense`).
    pub scope: String,
    /// Output widths of q, k and v when the node fixes them (Attention); otherwise they are
    /// inferred from the adapter's factors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub widths: Option<[usize; 3]>,
}

/// The packing of a candidate's node, if it packs q/k/v.
pub(crate) fn packing(
    model: &ModelProto,
    graph: &ModelGraph,
    gi: usize,
    node: &NodeProto,
    module: &str,
    out_features: i64,
) -> Option<Packed> {
    if node.domain() == "com.microsoft" && node.op_type() == "Attention" {
        let total = usize::try_from(out_features).ok()?;
        let widths = match node.attr_ints("qkv_hidden_sizes") {
            Some([q, k, v]) => Some([*q, *k, *v].map(|x| x.max(0) as usize)),
            _ => (total % 3 == 0).then_some([total / 3; 3]),
        };
        return Some(Packed {
            scope: downstream_scope(model, graph, gi, node).unwrap_or_default(),
            widths,
        });
    }
    let leaf = module.rsplit('.').next()?;
    (matches!(node.op_type(), "MatMul" | "Gemm" | "MatMulNBits") && PACKED_NAMES.contains(&leaf))
        .then(|| Packed {
            scope: module.to_string(),
            widths: None,
        })
}

/// The module path of the nearest node after `node` that names one: node evidence
/// (`name_scopes`, TorchScript node names) or a parameter-named weight it reads.
fn downstream_scope(
    model: &ModelProto,
    graph: &ModelGraph,
    gi: usize,
    node: &NodeProto,
) -> Option<String> {
    let view = &graph.graphs[gi];
    let mut queue: std::collections::VecDeque<&str> =
        node.output.iter().map(String::as_str).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(value) = queue.pop_front() {
        for &ni in view.consumers_of(value) {
            if !seen.insert(ni) || seen.len() > 64 {
                continue;
            }
            let Some(n) = graph.node(model, gi, ni) else {
                continue;
            };
            let named = n
                .metadata(evidence::NAME_SCOPES_KEY)
                .and_then(evidence::from_name_scopes)
                .or_else(|| evidence::from_node_name(n.name()))
                .or_else(|| {
                    n.input
                        .iter()
                        .filter(|i| view.initializers.contains_key(*i))
                        .find_map(|i| evidence::from_weight_name(i))
                });
            if let Some(path) = named {
                return Some(path);
            }
            queue.extend(n.output.iter().map(String::as_str));
        }
    }
    None
}

/// The parent path and q/k/v index of a module path that names a projection (`….q_proj` →
/// (`…`, 0)).
pub fn role(path: &str) -> Option<(&str, usize)> {
    let (parent, leaf) = path.rsplit_once('.')?;
    QKV_NAMES
        .iter()
        .find_map(|names| names.iter().position(|n| *n == leaf))
        .map(|r| (parent, r))
}

pub const ROLE_NAMES: [&str; 3] = ["q", "k", "v"];

/// Scope names that differ between exporters for the same module.
fn normalized(component: &str) -> &str {
    match component {
        "self_attn" | "attention" | "self_attention" => "attn",
        c => c,
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.split('.')
        .zip(b.split('.'))
        .take_while(|(x, y)| normalized(x) == normalized(y))
        .count()
}

/// Components up to and including the last numeric one (`model.layers.3.self_attn` → 3):
/// what a packed weight's scope must share with a module to be in the same layer.
fn layer_depth(path: &str) -> usize {
    path.split('.')
        .enumerate()
        .filter(|(_, c)| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
        .map(|(i, _)| i + 1)
        .last()
        .unwrap_or(0)
}

/// The packed candidate holding the projection `path` (a q/k/v module) and the projection's
/// index (0 q, 1 k, 2 v). `None` when `path` is no projection or the model packs nothing;
/// an error when packed weights exist but none (or more than one) lies in the module's layer.
pub fn resolve<'a>(cands: &'a [Candidate], path: &str) -> Option<Result<(&'a Candidate, usize)>> {
    resolve_all(cands, path).map(|r| {
        r.and_then(|(found, role)| match found.as_slice() {
            [c] => Ok((*c, role)),
            _ => Err(Error::Target(format!(
                "module '{path}' is packed into {} weights, one in each body of an If (nodes {})",
                found.len(),
                found
                    .iter()
                    .map(|c| c.node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        })
    })
}

/// `resolve`, where the layer's packed weight may be in several bodies of an If (a merged
/// decoder whose bodies onnxruntime both fused): one candidate per body, all holding the
/// projection at the same index.
pub fn resolve_all<'a>(
    cands: &'a [Candidate],
    path: &str,
) -> Option<Result<(Vec<&'a Candidate>, usize)>> {
    let (parent, role) = role(path)?;
    let packed: Vec<&Candidate> = cands.iter().filter(|c| c.packed.is_some()).collect();
    if packed.is_empty() {
        return None;
    }
    let depth = layer_depth(parent);
    let scored: Vec<(usize, &Candidate)> = packed
        .iter()
        .filter_map(|&c| {
            let scope = &c.packed.as_ref()?.scope;
            let cp = common_prefix(parent, scope);
            // The scope must share a block below the layer number with the module's parent
            // (`layers.0.self_attn` for `layers.0.self_attn.out_proj`): a layer's cross-attention
            // (`layers.0.encoder_attn.v_proj`) is not its packed self-attention.
            (!scope.is_empty() && (cp > depth || packed.len() == 1 && depth == 0))
                .then_some((cp, c))
        })
        .collect();
    let best = scored.iter().map(|(cp, _)| *cp).max();
    let top: Vec<&Candidate> = scored
        .iter()
        .filter(|(cp, _)| Some(*cp) == best)
        .map(|(_, c)| *c)
        .collect();
    let describe = |cs: &[&Candidate]| {
        cs.iter()
            .take(6)
            .map(|c| {
                let scope = c.packed.as_ref().map(|p| p.scope.as_str()).unwrap_or("");
                if scope.is_empty() {
                    format!("{} (weight {}, no module named near it)", c.node, c.weight)
                } else {
                    format!("{} (weight {}, near {scope})", c.node, c.weight)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    // (the same layer in each body of an If: same scope, one candidate per subgraph)
    let in_bodies = |cs: &[&Candidate]| {
        let mut graphs: Vec<usize> = cs.iter().map(|c| c.graph).collect();
        graphs.sort_unstable();
        graphs.dedup();
        graphs.len() == cs.len()
            && cs.iter().all(|c| c.in_subgraph)
            && cs.iter().all(|c| {
                c.packed.as_ref().map(|p| &p.scope) == cs[0].packed.as_ref().map(|p| &p.scope)
            })
    };
    Some(match top.as_slice() {
        [c] => Ok((vec![*c], role)),
        many if many.len() > 1 && in_bodies(many) => Ok((many.to_vec(), role)),
        [] => Err(Error::Target(format!(
            "module '{path}' matches no weight: the model packs q/k/v into {} weight(s) ({}), but none can be placed in '{parent}'",
            packed.len(),
            describe(&packed)
        ))),
        many => Err(Error::Target(format!(
            "module '{path}' is ambiguous: packed q/k/v weights {} all fit '{parent}'",
            describe(many)
        ))),
    })
}

/// The packed weight that computes the projection `path` in another body of an If than the
/// layers `found` for it there (onnxruntime fused q/k/v in one body of a merged decoder only),
/// with the projection's index; None when the found layers are not all in subgraphs, or no
/// packed weight in another subgraph holds the projection.
pub fn twin<'a>(
    cands: &'a [Candidate],
    path: &str,
    found: &[&Candidate],
) -> Option<(&'a Candidate, usize)> {
    if found.is_empty() || found.iter().any(|c| !c.in_subgraph) {
        return None;
    }
    let (c, role) = resolve(cands, path)?.ok()?;
    (c.in_subgraph && found.iter().all(|f| f.graph != c.graph)).then_some((c, role))
}

/// The q, k and v widths of a packed weight with `total` outputs, from the node's own sizes
/// or from the widths the adapter's modules have (`known[role]`): any two give the third; one
/// alone assumes k and v have the same width (true of multi-head and grouped-query attention).
pub fn widths(packed: &Packed, total: usize, known: [Option<usize>; 3]) -> Option<[usize; 3]> {
    if let Some(w) = packed.widths {
        return (w.iter().sum::<usize>() == total).then_some(w);
    }
    let rest = |used: usize| total.checked_sub(used);
    let w = match known {
        [Some(q), Some(k), Some(v)] => [q, k, v],
        [Some(q), Some(k), None] => [q, k, rest(q + k)?],
        [Some(q), None, Some(v)] => [q, rest(q + v)?, v],
        [None, Some(k), Some(v)] => [rest(k + v)?, k, v],
        [Some(q), None, None] => {
            let kv = rest(q)?;
            (kv % 2 == 0).then_some([q, kv / 2, kv / 2])?
        }
        [None, Some(x), None] | [None, None, Some(x)] => [rest(2 * x)?, x, x],
        [None, None, None] => return None,
    };
    (w.iter().sum::<usize>() == total && w.iter().all(|&x| x > 0)).then_some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_layers() {
        assert_eq!(
            role("model.layers.0.self_attn.k_proj"),
            Some(("model.layers.0.self_attn", 1))
        );
        assert_eq!(
            role("encoder.layer.1.attention.self.value"),
            Some(("encoder.layer.1.attention.self", 2))
        );
        assert_eq!(role("model.layers.0.mlp.up_proj"), None);
        assert_eq!(layer_depth("encoder.layer.1.attention.self"), 3);
        assert_eq!(layer_depth("attn"), 0);
        assert_eq!(
            common_prefix("model.layers.0.self_attn", "model.layers.0.attn.qkv_proj"),
            4
        );
        assert_eq!(
            common_prefix("model.layers.10.self_attn", "model.layers.1.attn.qkv_proj"),
            2
        );
    }

    #[test]
    fn widths_from_the_node_or_the_adapter() {
        let fixed = Packed {
            scope: "s".into(),
            widths: Some([4, 4, 4]),
        };
        assert_eq!(widths(&fixed, 12, [None; 3]), Some([4, 4, 4]));
        assert_eq!(widths(&fixed, 16, [None; 3]), None);
        let free = Packed {
            scope: "s".into(),
            widths: None,
        };
        // GQA: q 64, k = v = 32.
        assert_eq!(
            widths(&free, 128, [Some(64), None, None]),
            Some([64, 32, 32])
        );
        assert_eq!(
            widths(&free, 128, [None, None, Some(32)]),
            Some([64, 32, 32])
        );
        assert_eq!(
            widths(&free, 128, [Some(64), None, Some(32)]),
            Some([64, 32, 32])
        );
        assert_eq!(widths(&free, 128, [Some(64), Some(48), Some(32)]), None);
        assert_eq!(widths(&free, 127, [Some(64), None, None]), None);
        assert_eq!(widths(&free, 128, [None; 3]), None);
    }
}
