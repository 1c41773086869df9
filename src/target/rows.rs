//! The rows of a 2-D constant that a layer reads through a Split or a Slice on axis 0 (a
//! cross-attention's packed in-projection, `Candidate::window`), with the small integer
//! arithmetic that computes a Slice's bounds where they are shape arithmetic: the TorchScript
//! exporter with dynamic axes slices by `q.size(-1)`, a Shape of an activation whose last
//! dimension the graph fixes.

use crate::graph::ModelGraph;
use crate::onnx::dtype::DataType;
use crate::onnx::pb::{ModelProto, NodeProto, TensorProto};
use crate::onnx::pb_ext::NodeExt;

/// How many nodes an evaluation may look through (the shape arithmetic torch writes for a bound
/// is a few nodes; a malformed cycle ends here).
const MAX_STEPS: usize = 64;

/// The rows `[start, end)` of a 2-D constant of `dims` that `value`, an output of `node` (a
/// Split or a Slice reading the constant as its first input), holds; None when `node` is neither,
/// or does not take whole rows by bounds it fixes.
pub(super) fn window(
    model: &ModelProto,
    graph: &ModelGraph,
    gi: usize,
    node: &NodeProto,
    value: &str,
    dims: &[i64],
) -> Option<[usize; 2]> {
    let [rows, _] = dims else {
        return None;
    };
    let rows = usize::try_from(*rows).ok()?;
    let k = node.output.iter().position(|o| o == value)?;
    match node.op_type() {
        "Split" => split_rows(model, graph, gi, node, k, rows),
        "Slice" if k == 0 => slice_rows(&mut Eval::new(model, graph, gi), node, rows),
        _ => None,
    }
}

/// The rows that output `k` of `split` takes of `rows` rows, when it splits axis 0 by constant
/// sizes (its `split` input, or attribute before opset 13) or into equal parts.
fn split_rows(
    model: &ModelProto,
    graph: &ModelGraph,
    gi: usize,
    split: &NodeProto,
    k: usize,
    rows: usize,
) -> Option<[usize; 2]> {
    if !is_row_axis(split.attr_i("axis").unwrap_or(0)) {
        return None;
    }
    let sizes: Vec<i64> = match split.input.get(1).filter(|s| !s.is_empty()) {
        Some(v) => small_ints(graph.const_tensor(model, &graph.const_source(model, gi, v)?)?)?,
        None => match split.attr_ints("split") {
            Some(s) => s.to_vec(),
            None => {
                let n = split.output.len();
                (n > 0 && rows.is_multiple_of(n)).then(|| vec![(rows / n) as i64; n])?
            }
        },
    };
    let sizes: Vec<usize> = sizes
        .into_iter()
        .map(usize::try_from)
        .collect::<Result<_, _>>()
        .ok()?;
    // (sizes are the file's: a sum past usize is no split of these rows either)
    let total = sizes.iter().try_fold(0usize, |a, &b| a.checked_add(b));
    if sizes.len() != split.output.len() || total != Some(rows) {
        return None;
    }
    let start: usize = sizes[..k].iter().sum();
    Some([start, start + *sizes.get(k)?])
}

/// The rows a Slice of a 2-D tensor of `rows` rows takes: one bound pair on axis 0 (`axes`
/// [0] or [-2], or none with one bound), step 1, bounds clamped as ONNX clamps them; its
/// inputs (opset 10 and later) or its attributes (before).
fn slice_rows(ev: &mut Eval, slice: &NodeProto, rows: usize) -> Option<[usize; 2]> {
    let input = |i: usize| slice.input.get(i).filter(|s| !s.is_empty());
    let (starts, ends, axes, steps) = if slice.input.len() >= 3 {
        let known = |ev: &mut Eval, i: usize| match input(i) {
            Some(v) => ev.known(v).map(Some),
            None => Some(None),
        };
        (
            ev.known(input(1)?)?,
            ev.known(input(2)?)?,
            known(ev, 3)?,
            known(ev, 4)?,
        )
    } else {
        (
            slice.attr_ints("starts")?.to_vec(),
            slice.attr_ints("ends")?.to_vec(),
            slice.attr_ints("axes").map(<[i64]>::to_vec),
            None,
        )
    };
    let ([start], [end]) = (&starts[..], &ends[..]) else {
        return None;
    };
    if !axes.is_none_or(|a| matches!(a[..], [x] if is_row_axis(x)))
        || steps.is_some_and(|s| s != [1])
    {
        return None;
    }
    let rows_i = i64::try_from(rows).ok()?;
    let clamp = |b: i64| {
        let b = if b < 0 { b.saturating_add(rows_i) } else { b };
        b.clamp(0, rows_i) as usize
    };
    let (s, e) = (clamp(*start), clamp(*end));
    (s < e).then_some([s, e])
}

/// Axis 0 of a 2-D tensor.
fn is_row_axis(axis: i64) -> bool {
    axis == 0 || axis == -2
}

/// The values of a small inline int64 (or int32) tensor.
fn small_ints(t: &TensorProto) -> Option<Vec<i64>> {
    // (bounds and sizes: a few values; a large tensor is no shape arithmetic)
    let held =
        t.raw_data.as_ref().map_or(0, |r| r.len() / 4) + t.int64_data.len() + t.int32_data.len();
    if crate::onnx::pb_ext::numel(&t.dims) > 64 || held > 128 {
        return None;
    }
    match DataType::from_i32(t.data_type()) {
        DataType::Int64 => {
            if !t.int64_data.is_empty() {
                return Some(t.int64_data.clone());
            }
            t.raw_data
                .as_ref()?
                .chunks(8)
                .map(|c| Some(i64::from_le_bytes(c.try_into().ok()?)))
                .collect()
        }
        DataType::Int32 => {
            if !t.int32_data.is_empty() {
                return Some(t.int32_data.iter().map(|&v| i64::from(v)).collect());
            }
            t.raw_data
                .as_ref()?
                .chunks(4)
                .map(|c| Some(i64::from(i32::from_le_bytes(c.try_into().ok()?))))
                .collect()
        }
        _ => None,
    }
}

/// An integer vector the evaluation knows part of: `whole`, every element (each known or not);
/// otherwise the last elements of a vector of unknown length (a shape whose rank the graph does
/// not fix, of which a MatMul fixes the last dimension).
/// Only scalars (`scalar`) and vectors are evaluated: the shape arithmetic torch writes.
#[derive(Clone, Debug, PartialEq)]
struct Ints {
    v: Vec<Option<i64>>,
    whole: bool,
    scalar: bool,
}

impl Ints {
    fn known(v: Vec<i64>) -> Self {
        Ints::vector(v.into_iter().map(Some).collect())
    }

    /// A whole vector.
    fn vector(v: Vec<Option<i64>>) -> Self {
        Ints {
            v,
            whole: true,
            scalar: false,
        }
    }

    /// Elements `[start, end)` with ONNX's clamping (step 1).
    fn slice(&self, start: i64, end: i64) -> Option<Ints> {
        if self.whole {
            let n = i64::try_from(self.v.len()).ok()?;
            let clamp = |b: i64| (if b < 0 { b.saturating_add(n) } else { b }).clamp(0, n);
            let (s, e) = (clamp(start), clamp(end));
            return Some(Ints::vector(
                self.v.get(s as usize..e.max(s) as usize)?.to_vec(),
            ));
        }
        // Of a vector of unknown length n: only bounds counted from its end, `start` = -k and
        // `end` at or past n (any end a Slice takes as "to the end") or -j.
        let tail = i64::try_from(self.v.len()).ok()?;
        if !(start < 0 && start >= -tail) {
            return None;
        }
        let end = match end {
            e if e < 0 => e,
            // (torch writes INT64_MAX; a bound this large passes any real rank)
            e if e >= i64::from(i32::MAX) => 0,
            _ => return None,
        };
        let (s, e) = (
            usize::try_from(tail + start).ok()?,
            usize::try_from(tail.checked_add(end)?).ok()?,
        );
        Some(Ints::vector(self.v.get(s..e.max(s))?.to_vec()))
    }

    /// Element `i` (negative from the end).
    fn at(&self, i: i64) -> Option<Option<i64>> {
        let n = i64::try_from(self.v.len()).ok()?;
        let j = if i < 0 {
            n.checked_add(i)?
        } else if self.whole {
            i
        } else {
            return None;
        };
        self.v.get(usize::try_from(j).ok()?).copied()
    }
}

/// The evaluation of integer values from the constants and shapes a graph fixes.
struct Eval<'a> {
    model: &'a ModelProto,
    graph: &'a ModelGraph,
    gi: usize,
    steps: usize,
}

impl<'a> Eval<'a> {
    fn new(model: &'a ModelProto, graph: &'a ModelGraph, gi: usize) -> Self {
        Eval {
            model,
            graph,
            gi,
            steps: 0,
        }
    }

    /// `value`, when every element of it is known.
    fn known(&mut self, value: &str) -> Option<Vec<i64>> {
        let ints = self.eval(value)?;
        if !ints.whole {
            return None;
        }
        ints.v.into_iter().collect()
    }

    fn eval(&mut self, value: &str) -> Option<Ints> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return None;
        }
        let (model, graph, gi) = (self.model, self.graph, self.gi);
        if let Some(src) = graph.const_source(model, gi, value) {
            let t = graph.const_tensor(model, &src)?;
            let scalar = match t.dims.len() {
                0 => true,
                1 => false,
                _ => return None,
            };
            return small_ints(t).map(|v| Ints {
                scalar,
                ..Ints::known(v)
            });
        }
        let &p = graph.graphs[gi].producer.get(value)?;
        let n = graph.node(model, gi, p)?;
        if !n.domain().is_empty() && n.domain() != "ai.onnx" {
            return None;
        }
        let input = |i: usize| n.input.get(i).filter(|s| !s.is_empty());
        match n.op_type() {
            "Shape" => {
                let dims = self.dims(input(0)?)?;
                let start = n.attr_i("start").unwrap_or(0);
                match n.attr_i("end") {
                    Some(end) => dims.slice(start, end),
                    None if start == 0 => Some(dims),
                    None => dims.slice(start, i64::MAX),
                }
            }
            "Identity" => self.eval(input(0)?),
            // (a scalar made a vector of one and back; a reshape to a vector or a scalar)
            "Unsqueeze" => {
                let x = self.eval(input(0)?)?;
                x.scalar.then_some(Ints { scalar: false, ..x })
            }
            "Squeeze" => {
                let x = self.eval(input(0)?)?;
                (!x.scalar && x.whole && x.v.len() == 1).then_some(Ints { scalar: true, ..x })
            }
            "Reshape" => {
                let x = self.eval(input(0)?)?;
                let to = self.known(input(1)?)?;
                match to[..] {
                    [] => (x.whole && x.v.len() == 1).then_some(Ints { scalar: true, ..x }),
                    [_] => x.whole.then_some(Ints { scalar: false, ..x }),
                    _ => None,
                }
            }
            "Cast" => {
                let to = DataType::from_i32(i32::try_from(n.attr_i("to")?).ok()?);
                let x = self.eval(input(0)?)?;
                // (an int32 holds what it holds: a value past it is no bound read here)
                let fits = |v: &Option<i64>| v.is_none_or(|v| i32::try_from(v).is_ok());
                match to {
                    DataType::Int64 => Some(x),
                    DataType::Int32 => x.v.iter().all(fits).then_some(x),
                    _ => None,
                }
            }
            "Gather" => {
                if n.attr_i("axis").unwrap_or(0) != 0 {
                    return None;
                }
                let data = self.eval(input(0)?)?;
                let idx = self.eval(input(1)?)?;
                if data.scalar || !idx.whole {
                    return None;
                }
                let v = idx
                    .v
                    .iter()
                    .map(|i| data.at((*i)?))
                    .collect::<Option<Vec<_>>>()?;
                Some(Ints {
                    scalar: idx.scalar,
                    ..Ints::vector(v)
                })
            }
            "Slice" => {
                let data = self.eval(input(0)?)?;
                if data.scalar {
                    return None;
                }
                let starts = self.known(input(1)?)?;
                let ends = self.known(input(2)?)?;
                let axes_ok = match input(3) {
                    Some(a) => matches!(self.known(a)?[..], [0] | [-1]),
                    None => true,
                };
                let steps_ok = match input(4) {
                    Some(s) => self.known(s)? == [1],
                    None => true,
                };
                let ([s], [e]) = (&starts[..], &ends[..]) else {
                    return None;
                };
                (axes_ok && steps_ok).then(|| data.slice(*s, *e)).flatten()
            }
            "Concat" => {
                if !matches!(n.attr_i("axis"), Some(0 | -1)) {
                    return None;
                }
                let mut v = Vec::new();
                for i in n.input.iter().filter(|s| !s.is_empty()) {
                    let x = self.eval(i)?;
                    if !x.whole || x.scalar {
                        return None;
                    }
                    v.extend(x.v);
                }
                Some(Ints::vector(v))
            }
            op @ ("Add" | "Sub" | "Mul" | "Div" | "Max" | "Min") => {
                // (two operands: a Max or Min of more is not read here)
                let operands: Vec<&String> = n.input.iter().filter(|s| !s.is_empty()).collect();
                let [x, y] = operands[..] else {
                    return None;
                };
                let (a, b) = (self.eval(x)?, self.eval(y)?);
                if !(a.whole && b.whole) {
                    return None;
                }
                let f = |x: i64, y: i64| match op {
                    "Add" => x.checked_add(y),
                    "Sub" => x.checked_sub(y),
                    "Mul" => x.checked_mul(y),
                    // (ONNX's integer Div truncates, as Rust's does)
                    "Div" => x.checked_div(y),
                    "Max" => Some(x.max(y)),
                    _ => Some(x.min(y)),
                };
                let len = match (a.v.len(), b.v.len()) {
                    (x, y) if x == y || y == 1 => x,
                    (1, y) => y,
                    _ => return None,
                };
                let pick = |v: &[Option<i64>], i: usize| v[if v.len() == 1 { 0 } else { i }];
                let v = (0..len)
                    .map(|i| match (pick(&a.v, i), pick(&b.v, i)) {
                        (Some(x), Some(y)) => f(x, y).map(Some),
                        _ => Some(None),
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some(Ints {
                    scalar: a.scalar && b.scalar,
                    ..Ints::vector(v)
                })
            }
            _ => None,
        }
    }

    /// What the graph fixes of the shape of `value`: the shape its value info declares, a
    /// constant's dims, or, where neither fixes its last dimension, that dimension as the inner
    /// dimension of a MatMul (or Gemm) that multiplies it by a constant weight.
    fn dims(&mut self, value: &str) -> Option<Ints> {
        let (model, graph, gi) = (self.model, self.graph, self.gi);
        if let Some(src) = graph.const_source(model, gi, value) {
            return Some(Ints::known(graph.const_tensor(model, &src)?.dims.clone()));
        }
        let declared = graph
            .value_info(model, gi, value)
            .and_then(|vi| match vi.r#type.as_ref()?.value.as_ref()? {
                crate::onnx::pb::type_proto::Value::TensorType(t) => t.shape.as_ref(),
                _ => None,
            })
            .map(|s| {
                Ints::vector(
                    s.dim
                        .iter()
                        .map(|d| match d.value {
                            Some(
                                crate::onnx::pb::tensor_shape_proto::dimension::Value::DimValue(v),
                            ) => Some(v),
                            _ => None,
                        })
                        .collect(),
                )
            });
        if let Some(d) = declared
            .as_ref()
            .filter(|d| d.v.last().is_some_and(Option::is_some))
        {
            return Some(d.clone());
        }
        let inner = graph.graphs[gi]
            .consumers_of(value)
            .iter()
            .find_map(|&u| self.inner_dim(graph.node(model, gi, u)?, value));
        match (inner, declared) {
            (Some(k), Some(mut d)) if !d.v.is_empty() => {
                *d.v.last_mut()? = Some(k);
                Some(d)
            }
            (Some(k), _) => Some(Ints {
                whole: false,
                ..Ints::vector(vec![Some(k)])
            }),
            (None, d) => d,
        }
    }

    /// The dimension `x`'s last dimension must equal as input A of `node`: a MatMul's (or a
    /// Gemm's, not transposing A) inner dimension, where its B is a 2-D constant read whole or
    /// by rows (a Split or Slice on axis 0), through 2-D Transposes, Identities and Casts.
    fn inner_dim(&self, node: &NodeProto, x: &str) -> Option<i64> {
        let gemm = match node.op_type() {
            "MatMul" => false,
            "Gemm" if node.attr_i("transA").unwrap_or(0) == 0 => true,
            _ => return None,
        };
        if !node.domain().is_empty() || node.input.first().map(String::as_str) != Some(x) {
            return None;
        }
        let (model, graph, gi) = (self.model, self.graph, self.gi);
        let mut flipped = gemm && node.attr_i("transB").unwrap_or(0) != 0;
        let mut value = node.input.get(1)?.clone();
        for _ in 0..MAX_STEPS {
            if let Some(src) = graph.const_source(model, gi, &value) {
                let [rows, cols] = graph.const_tensor(model, &src)?.dims[..] else {
                    return None;
                };
                return Some(if flipped { cols } else { rows });
            }
            let &p = graph.graphs[gi].producer.get(&value)?;
            let n = graph.node(model, gi, p)?;
            match n.op_type() {
                "Transpose" => {
                    let perm = n.attr_ints("perm").unwrap_or(&[]);
                    if !(perm.is_empty() || perm == [1, 0]) {
                        return None;
                    }
                    flipped = !flipped;
                }
                "Identity" | "Cast" => {}
                // (a cut of B's rows, the inner dimension, fixes it no more)
                "Split" if flipped && is_row_axis(n.attr_i("axis").unwrap_or(0)) => {}
                "Slice" => {
                    // (axis 0 only, read as a constant: the bounds are what is asked about)
                    let axes = n.input.get(3).filter(|s| !s.is_empty());
                    let on_rows = match axes {
                        Some(a) => graph
                            .const_source(model, gi, a)
                            .and_then(|s| small_ints(graph.const_tensor(model, &s)?))
                            .is_some_and(|a| matches!(a[..], [x] if is_row_axis(x))),
                        None => false,
                    };
                    if !(on_rows && flipped) {
                        return None;
                    }
                }
                _ => return None,
            }
            value = n.input.first()?.clone();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_slice_from_the_end() {
        let tail = Ints {
            whole: false,
            ..Ints::vector(vec![Some(16)])
        };
        assert_eq!(tail.slice(-1, i64::MAX), Some(Ints::known(vec![16])));
        assert_eq!(tail.slice(-2, i64::MAX), None);
        assert_eq!(tail.slice(0, 1), None);
        assert_eq!(tail.at(-1), Some(Some(16)));
        assert_eq!(tail.at(0), None);
        let whole = Ints::vector(vec![None, None, Some(16)]);
        assert_eq!(tail.slice(i64::MIN, i64::MAX), None);
        assert_eq!(tail.slice(-1, i64::MIN), None);
        assert_eq!(whole.at(2), Some(Some(16)));
        assert_eq!(whole.at(-1), Some(Some(16)));
        assert_eq!(whole.slice(-1, i64::MAX), Some(Ints::known(vec![16])));
        assert_eq!(whole.slice(0, 2).map(|i| i.v), Some(vec![None, None]));
    }
}
