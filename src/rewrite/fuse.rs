//! Fusing the A projections of branches that read the same activation (q/k/v): one MatMul on
//! the concatenation of their A matrices, split back per branch.
//!
//! ```text
//!   x ── A_q ── …            x ── MatMul(Concat(A_q, A_k, A_v)) ── Split ─┬─ …(q)
//!   x ── A_k ── …     ==>                                                  ├─ …(k)
//!   x ── A_v ── …                                                          └─ …(v)
//! ```
//!
//! Each branch keeps its own A initializer (the Concat is constant-folded by onnxruntime), so
//! training, fold-back and export-peft see the same parameters as before.

use std::collections::BTreeMap;

use super::branch::{BRANCH_KEY, ROLE_KEY, meta};
use super::weights::{all_names, unique_name};
use crate::error::Result;
use crate::graph::ModelGraph;
use crate::onnx::LoadedModel;
use crate::onnx::pb::{AttributeProto, NodeProto, TensorProto, attribute_proto::AttributeType};
use crate::onnx::pb_ext::NodeExt;

/// Role of the Split that hands each fused branch its slice.
pub const SPLIT_ROLE: &str = "lora_A_split";
/// Role of the MatMul of the concatenated A's, and of that Concat.
pub const FUSED_ROLE: &str = "lora_A_fused";
pub const CONCAT_ROLE: &str = "lora_A_concat";
/// Branch value of the shared nodes (they belong to several branches).
pub const FUSED_BRANCH: &str = "(fused)";

/// Fuses every group of two or more MatMul lora_A nodes that read the same value; returns the
/// number of groups fused.
pub fn fuse_shared(model: &mut LoadedModel) -> Result<usize> {
    let opset = crate::onnx::pb_ext::default_opset(&model.proto).unwrap_or(13);
    let graph = ModelGraph::build(&model.proto);
    let mut taken = all_names(&model.proto);
    let mut fused = 0;
    for (gi, view) in graph.graphs.iter().enumerate().rev() {
        let Some(gp) = view.loc.get(&model.proto) else {
            continue;
        };
        let rank_of = |a: &str| -> Option<i64> {
            let t = gp.initializer.iter().find(|t| t.name() == a)?;
            (t.dims.len() == 2 && !gp.input.iter().any(|i| i.name() == a)).then(|| t.dims[1])
        };
        // lora_A MatMuls (by output name, with their rank) grouped by the activation they read.
        let mut groups: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
        for n in &gp.node {
            if n.op_type() == "MatMul"
                && n.metadata(ROLE_KEY) == Some("lora_A")
                && let Some(r) = n.input.get(1).and_then(|a| rank_of(a))
            {
                groups
                    .entry(n.input[0].clone())
                    .or_default()
                    .push((n.output[0].clone(), r));
            }
        }
        // Subgraphs first (reverse order), so editing a graph never moves a node an unvisited
        // subgraph's location goes through.
        let Some(gp) = graph.graphs[gi].loc.get_mut(&mut model.proto) else {
            continue;
        };
        for (x, group) in groups.into_iter().filter(|(_, g)| g.len() > 1) {
            fuse_group(gp, &group, &x, opset, &mut taken);
            fused += 1;
        }
    }
    Ok(fused)
}

/// Replaces the lora_A nodes producing `group`'s values (found by output name, since earlier
/// edits move nodes) with Concat + MatMul + Split placed where the first of them was.
fn fuse_group(
    gp: &mut crate::onnx::pb::GraphProto,
    group: &[(String, i64)],
    x: &str,
    opset: i64,
    taken: &mut std::collections::HashSet<String>,
) {
    let pos = |gp: &crate::onnx::pb::GraphProto, out: &str| {
        gp.node
            .iter()
            .position(|n| n.output.first().map(String::as_str) == Some(out))
    };
    let mut idx: Vec<usize> = group.iter().filter_map(|(o, _)| pos(gp, o)).collect();
    if idx.len() != group.len() {
        return;
    }
    let members: Vec<NodeProto> = idx.iter().map(|&i| gp.node[i].clone()).collect();
    let stem = unique_name(&format!("{x}.lora_A_fused"), taken);
    let cat = format!("{stem}.weight");
    let prod = format!("{stem}.out");
    let node =
        |op: &str, inputs: Vec<String>, outputs: Vec<String>, name: String, role: &str| NodeProto {
            input: inputs,
            output: outputs,
            name: Some(name),
            op_type: Some(op.into()),
            domain: Some(String::new()),
            metadata_props: vec![meta(BRANCH_KEY, FUSED_BRANCH), meta(ROLE_KEY, role)],
            ..Default::default()
        };
    let mut concat = node(
        "Concat",
        members.iter().map(|m| m.input[1].clone()).collect(),
        vec![cat.clone()],
        format!("{stem}_concat"),
        CONCAT_ROLE,
    );
    concat.attribute.push(super::branch::int("axis", 1));
    let matmul = node(
        "MatMul",
        vec![x.to_string(), cat],
        vec![prod.clone()],
        format!("{stem}_matmul"),
        FUSED_ROLE,
    );
    let ranks: Vec<i64> = group.iter().map(|&(_, r)| r).collect();
    let mut split = node(
        "Split",
        vec![prod],
        members.iter().map(|m| m.output[0].clone()).collect(),
        format!("{stem}_split"),
        SPLIT_ROLE,
    );
    split.attribute.push(super::branch::int("axis", -1));
    if opset >= 13 {
        let sizes = format!("{stem}.split");
        split.input.push(sizes.clone());
        gp.initializer.push(TensorProto {
            name: Some(sizes),
            dims: vec![ranks.len() as i64],
            data_type: Some(7),
            raw_data: Some(
                ranks
                    .iter()
                    .flat_map(|r| r.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            ),
            ..Default::default()
        });
    } else {
        split.attribute.push(AttributeProto {
            name: Some("split".into()),
            ints: ranks,
            r#type: Some(AttributeType::Ints as i32),
            ..Default::default()
        });
    }
    // Remove the members (from the back), then put the fused nodes where the first one was.
    idx.sort_unstable_by(|a, b| b.cmp(a));
    let first = *idx.last().unwrap_or(&0);
    for i in idx {
        gp.node.remove(i);
    }
    for (k, n) in [concat, matmul, split].into_iter().enumerate() {
        gp.node.insert(first + k, n);
    }
}
