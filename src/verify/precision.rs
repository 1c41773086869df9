//! The precision a model computes in, for choosing comparison tolerances: the least precise
//! float type among its stored tensors (but scalars and small constants) and its casts. A model converted to float16 with
//! float32 inputs and outputs (`keep_io_types`) computes in float16, and two such models
//! differ by float16 rounding even where their outputs are float32.

use crate::onnx::DataType;
use crate::onnx::pb::{GraphProto, ModelProto};
use crate::onnx::pb_ext::NodeExt;

/// The least precise float type the model holds tensors of or casts to (float16 before
/// float32), or None when it has neither.
pub fn compute_precision(model: &ModelProto) -> Option<DataType> {
    let mut coarsest = None;
    if let Some(g) = &model.graph {
        visit(g, &mut |d| coarsest = Some(coarser(coarsest, d)));
    }
    coarsest
}

/// How coarse a float type is (larger is less precise); None for other types.
pub(crate) fn coarseness(d: DataType) -> Option<u8> {
    match d {
        DataType::Double => Some(1),
        DataType::Float => Some(2),
        DataType::Float16 => Some(3),
        DataType::Bfloat16 => Some(4),
        _ => None,
    }
}

fn coarser(a: Option<DataType>, b: DataType) -> DataType {
    match a {
        Some(a) if coarseness(a) >= coarseness(b) => a,
        _ => b,
    }
}

/// Tensors smaller than this (scalars, small constants) say nothing of the precision a model
/// computes in: an fp32 model may hold a float16 epsilon.
const MIN_ELEMENTS: usize = 16;

/// Calls `f` with every float type of `g`'s initializers and Constant values (of at least
/// [`MIN_ELEMENTS`]) and Cast targets, in its subgraphs too.
fn visit(g: &GraphProto, f: &mut impl FnMut(DataType)) {
    let mut float = |code: i32| {
        let d = DataType::from_i32(code);
        if coarseness(d).is_some() {
            f(d);
        }
    };
    let sized = |t: &crate::onnx::pb::TensorProto| {
        crate::onnx::pb_ext::checked_numel(&t.dims).is_ok_and(|n| n >= MIN_ELEMENTS)
    };
    for t in g.initializer.iter().filter(|t| sized(t)) {
        float(t.data_type());
    }
    for n in &g.node {
        match n.op_type() {
            "Cast" => {
                if let Some(to) = n.attr_i("to") {
                    float(to as i32);
                }
            }
            "Constant" => {
                if let Some(t) = n
                    .attr("value")
                    .and_then(|a| a.t.as_ref())
                    .filter(|t| sized(t))
                {
                    float(t.data_type());
                }
            }
            _ => {}
        }
    }
    for n in &g.node {
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                visit(sub, f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::pb::{AttributeProto, NodeProto, TensorProto};

    fn model(inits: &[DataType], nodes: Vec<NodeProto>) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                initializer: inits
                    .iter()
                    .map(|d| TensorProto {
                        data_type: Some(d.to_i32()),
                        dims: vec![4, 4],
                        ..Default::default()
                    })
                    .collect(),
                node: nodes,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn cast(to: DataType) -> NodeProto {
        NodeProto {
            op_type: Some("Cast".into()),
            attribute: vec![AttributeProto {
                name: Some("to".into()),
                i: Some(i64::from(to.to_i32())),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_least_precise_float_wins() {
        assert_eq!(compute_precision(&model(&[], vec![])), None);
        let fp32 = model(&[DataType::Float, DataType::Int64], vec![]);
        assert_eq!(compute_precision(&fp32), Some(DataType::Float));
        // fp16 weights in a model whose inputs and outputs stay float32.
        let keep_io = model(
            &[DataType::Float16],
            vec![cast(DataType::Float16), cast(DataType::Float)],
        );
        assert_eq!(compute_precision(&keep_io), Some(DataType::Float16));
        // A Cast to float16 inside an If branch.
        let if_node = NodeProto {
            op_type: Some("If".into()),
            attribute: vec![AttributeProto {
                name: Some("then_branch".into()),
                g: model(&[], vec![cast(DataType::Float16)]).graph,
                ..Default::default()
            }],
            ..Default::default()
        };
        let outer = model(&[DataType::Float], vec![if_node]);
        assert_eq!(compute_precision(&outer), Some(DataType::Float16));
        let bf = model(&[DataType::Float16, DataType::Bfloat16], vec![]);
        assert_eq!(compute_precision(&bf), Some(DataType::Bfloat16));
        // A float16 scalar in a float32 model (an epsilon) says nothing.
        let mut eps = model(&[DataType::Float], vec![]);
        if let Some(g) = eps.graph.as_mut() {
            g.initializer.push(TensorProto {
                data_type: Some(DataType::Float16.to_i32()),
                ..Default::default()
            });
        }
        assert_eq!(compute_precision(&eps), Some(DataType::Float));
    }
}
