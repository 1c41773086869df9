//! Which part of a model a file holds, where its module paths cannot tell: an encoder-decoder's
//! encoder and decoder (or a text and a vision tower) have the same paths below their roots,
//! and an export of one part alone drops the root. A root inferred from an adapter's paths
//! (`export_root`) that names such a part is only taken where the file's inputs fit that part.

use std::collections::{HashMap, HashSet};

use super::Candidate;
use crate::graph::ModelGraph;
use crate::onnx::DataType;
use crate::onnx::pb::{GraphProto, ModelProto};

/// Why the file does not look like the part that `root` names (`model.decoder.` is a decoder,
/// `decoder.bert.` too, `text_model.` a text tower); None where it does, or where no component
/// of the root names a part. Components are read word by word (`text_model`: text).
///
/// - a decoder (of an encoder-decoder) takes the encoder's states: an input named for them
///   (`encoder_hidden_states`, Optimum's files), or, whatever the names, layers fed by two
///   separate inputs (its cross-attention projects the encoder's states alone); not asked
///   where the adapter is for a decoder-only model (`decoder_only`, PEFT's CAUSAL_LM: OPT's
///   `model.decoder` is no choice between parts);
/// - an encoder shows neither;
/// - a text part takes integer token ids; a vision / image / audio / speech part takes values
///   (floating-point, or uint8 pixels).
pub fn not_the_part(
    root: &str,
    model: &ModelProto,
    graph: &ModelGraph,
    cands: &[Candidate],
    decoder_only: bool,
) -> Option<String> {
    let words: Vec<String> = root
        .trim_end_matches('.')
        .split(['.', '_'])
        .map(str::to_ascii_lowercase)
        .collect();
    let has = |w: &[&str]| words.iter().any(|x| w.contains(&x.as_str()));
    let g = model.graph.as_ref()?;
    let inputs = data_inputs(g);
    let decoder_sign = || -> Option<String> {
        if let Some((n, _)) = inputs
            .iter()
            .find(|(n, _)| n.to_ascii_lowercase().contains("encoder"))
        {
            return Some(format!("its input '{n}' is named for an encoder's states"));
        }
        two_streams(g, graph, cands, &inputs).map(|(a, b)| {
            format!("layers {a} and {b} read separate inputs, as a decoder's self- and cross-attention do")
        })
    };
    if has(&["decoder"]) && !decoder_only && decoder_sign().is_none() {
        return Some(
            "a decoder of an encoder-decoder model takes the encoder's states, and no input of this file is named for them nor feeds layers of its own (it may be the encoder)"
                .into(),
        );
    }
    if has(&["encoder"])
        && !has(&["decoder"])
        && let Some(sign) = decoder_sign()
    {
        return Some(format!("{sign} (it may be the decoder)"));
    }
    let integer = inputs
        .iter()
        .any(|(_, t)| matches!(t, DataType::Int64 | DataType::Int32));
    if has(&["text"]) && !integer {
        return Some("a text model takes token ids, and this file has no integer input".into());
    }
    let values = inputs.iter().any(|(_, t)| {
        matches!(
            t,
            DataType::Float
                | DataType::Float16
                | DataType::Bfloat16
                | DataType::Double
                | DataType::Uint8
        )
    });
    if has(&["vision", "visual", "image", "audio", "speech"]) && !values {
        return Some(
            "a vision or audio part takes pixel or audio values, and this file has no floating-point or uint8 input"
                .into(),
        );
    }
    None
}

/// The graph's inputs that carry data: not initializers (listed as inputs before IR 4), nor the
/// LoRA factors a serving model (`inject --as-inputs`) takes.
fn data_inputs(g: &GraphProto) -> Vec<(&str, DataType)> {
    use crate::onnx::pb::type_proto::Value;
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    g.input
        .iter()
        .filter(|i| {
            !inits.contains(i.name())
                && !i.name().ends_with(".lora_A.weight")
                && !i.name().ends_with(".lora_B.weight")
        })
        .map(|i| {
            let dtype = match i.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(Value::TensorType(t)) => DataType::from_i32(t.elem_type()),
                _ => DataType::Other(0),
            };
            (i.name(), dtype)
        })
        .collect()
}

/// Two layers of the main graph whose inputs depend on disjoint sets of the graph's data
/// inputs (by node label): a decoder's cross-attention keys and values read the encoder's
/// states alone, its self-attention the tokens. Embedding lookups are left out (token and
/// position ids are separate inputs in an encoder too). A node with subgraphs (If, Loop)
/// depends on what its bodies read from this graph too.
fn two_streams(
    g: &GraphProto,
    graph: &ModelGraph,
    cands: &[Candidate],
    inputs: &[(&str, DataType)],
) -> Option<(String, String)> {
    // (which data inputs each value depends on: one bit per input)
    type Bits = Vec<u64>;
    let words = inputs.len().div_ceil(64).max(1);
    let main = graph.main()?;
    let mut deps: HashMap<&str, Bits> = HashMap::new();
    for (i, (n, _)) in inputs.iter().enumerate() {
        let mut b = vec![0u64; words];
        b[i / 64] |= 1 << (i % 64);
        deps.insert(n, b);
    }
    let reads = |node: &'_ crate::onnx::pb::NodeProto, deps: &HashMap<&str, Bits>| -> Bits {
        let mut m = vec![0u64; words];
        let bodies = node
            .attribute
            .iter()
            .flat_map(|a| a.g.iter().chain(&a.graphs))
            .flat_map(crate::graph::outer_reads);
        for v in node.input.iter().map(String::as_str).chain(bodies) {
            if let Some(d) = deps.get(v) {
                m.iter_mut().zip(d).for_each(|(x, y)| *x |= y);
            }
        }
        m
    };
    for ni in main.topo_order() {
        let Some(node) = g.node.get(ni) else { continue };
        let mask = reads(node, &deps);
        for o in &node.output {
            deps.insert(o, mask.clone());
        }
    }
    let mut seen: Vec<(Bits, &str)> = Vec::new();
    for c in cands.iter().filter(|c| c.graph == 0 && c.op != "Gather") {
        let Some(node) = g.node.get(c.node_index) else {
            continue;
        };
        let mask = reads(node, &deps);
        if mask.iter().all(|&w| w == 0) || seen.iter().any(|(m, _)| *m == mask) {
            continue;
        }
        let disjoint = |m: &Bits| m.iter().zip(&mask).all(|(x, y)| x & y == 0);
        if let Some((_, other)) = seen.iter().find(|(m, _)| disjoint(m)) {
            return Some((other.to_string(), c.node.clone()));
        }
        seen.push((mask, &c.node));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part named by an inferred root is taken only where the file's inputs fit it.
    #[test]
    fn an_inferred_root_needs_inputs_that_fit_its_part() {
        use crate::onnx::pb::{GraphProto, ModelProto, TypeProto, ValueInfoProto, type_proto};
        let model = |inputs: &[(&str, i32)]| ModelProto {
            graph: Some(GraphProto {
                input: inputs
                    .iter()
                    .map(|&(name, elem)| ValueInfoProto {
                        name: Some(name.into()),
                        r#type: Some(TypeProto {
                            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                                elem_type: Some(elem),
                                shape: None,
                            })),
                            denotation: None,
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (float, int64) = (1, 7);
        let encoder = model(&[("input_ids", int64), ("attention_mask", int64)]);
        let decoder = model(&[("input_ids", int64), ("encoder_hidden_states", float)]);
        let vision = model(&[("pixel_values", float)]);
        let fits = |root: &str, m: &ModelProto| {
            not_the_part(root, m, &ModelGraph::build(m), &[], false).is_none()
        };
        assert!(fits("model.encoder.", &encoder) && !fits("model.decoder.", &encoder));
        assert!(fits("decoder.", &decoder) && !fits("model.encoder.", &decoder));
        assert!(fits("text_model.", &encoder) && !fits("text_model.", &vision));
        assert!(fits("vision_model.", &vision) && !fits("vision_model.", &encoder));
        // (every component counts: a bert2bert's decoder; words, not substrings)
        assert!(!fits("decoder.bert.", &encoder) && fits("decoder.bert.", &decoder));
        assert!(fits("context_model.", &vision) && fits("speecht5.", &encoder));
        // (a decoder-only model's adapter: its decoder needs no encoder states)
        assert!(
            not_the_part(
                "model.decoder.",
                &encoder,
                &ModelGraph::build(&encoder),
                &[],
                true
            )
            .is_none()
        );
        let pixels = model(&[("pixel_values", 2)]);
        assert!(fits("vision_tower.", &pixels));
        // (a root that names no such part: a wrapper, taken as before)
        assert!(fits("model.", &vision) && fits("bert.", &decoder));
    }
}
