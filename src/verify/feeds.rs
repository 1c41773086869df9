//! Model inputs for verification: read from an npz, or generated repeatably from a seed.
//!
//! An npz given with `--inputs` must hold every input, each array of the input's kind: an
//! array may differ from the input's element type only within floats (float64 for a float32
//! input), within integers (int32 for int64 ids, when every value fits) or as uint16 bits for
//! bfloat16. Integers never stand in for floats, nor floats for integers.
//!
//! Generation rules (documented in `onnx-lora verify --help` too):
//! - Symbolic dimensions take the value given with `--dim NAME=VALUE`; otherwise a name
//!   containing `batch` is 1, one containing `past` is 0 (an empty KV cache), one containing
//!   `seq`, `len` or `total` is 8 ([`DEFAULT_SEQUENCE`]). Any other is 8 too where it sizes a
//!   token axis (a non-leading axis of an input that indexes an embedding table, or of a
//!   mask: TorchScript exports name them as their `dynamic_axes` say, `s`), and 1 elsewhere.
//!   A dim_param that is a sum such as `past_sequence_length + 1` is evaluated term by term.
//!   Unnamed dynamic dims are 1.
//! - Inputs whose name contains `mask` are all ones.
//! - Integer inputs that index a Gather over a constant table (directly or through Cast,
//!   Unsqueeze, Reshape, Squeeze, Flatten, Identity) are drawn uniformly below the table's
//!   size on the gathered axis; other integers uniformly in `0..4`; bools are fair coin flips.
//! - Floats are N(0, 1).
//!
//! Each input draws from its own stream (seed mixed with the input's name), so an input gets
//! the same values whichever model, or pair of models, it is generated for.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::graph::ModelGraph;
use crate::onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use crate::onnx::pb::type_proto::Value as TypeValue;
use crate::onnx::{DataType, LoadedModel};

use super::tensor::{ArrayData, Tensors, is_float};

/// Value of symbolic sequence-like dimensions when `--dim` does not set them.
pub const DEFAULT_SEQUENCE: usize = 8;
/// Value of symbolic batch dimensions (and of any other unnamed or unknown one).
pub const DEFAULT_BATCH: usize = 1;
/// Integers that feed no Gather are drawn from `0..DEFAULT_INT_RANGE`.
pub const DEFAULT_INT_RANGE: u64 = 4;

/// A model input as declared in the graph.
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<Dim>,
    /// Exclusive upper bound for values, when the input indexes a Gather table.
    pub index_bound: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    Fixed(usize),
    Param(String),
    Unknown,
}

/// The graph inputs that are not initializers, with their types, dims and Gather bounds.
pub fn model_inputs(model: &LoadedModel) -> Result<Vec<InputSpec>> {
    let invalid = |reason: String| Error::InvalidModel {
        path: model.path.clone(),
        reason,
    };
    let g = model
        .proto
        .graph
        .as_ref()
        .ok_or_else(|| invalid("the model has no graph".into()))?;
    let graph = ModelGraph::build(&model.proto);
    let mut specs = Vec::new();
    for vi in &g.input {
        if g.initializer.iter().any(|t| t.name() == vi.name()) {
            continue;
        }
        let Some(TypeValue::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(invalid(format!("input '{}' is not a tensor", vi.name())));
        };
        let dims = t
            .shape
            .iter()
            .flat_map(|s| s.dim.iter())
            .map(|d| match &d.value {
                Some(DimValue::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
                Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Param(p.clone()),
                _ => Dim::Unknown,
            })
            .collect();
        specs.push(InputSpec {
            name: vi.name().to_string(),
            dtype: DataType::from_i32(t.elem_type()),
            dims,
            index_bound: gather_bound(model, &graph, vi.name()),
        });
    }
    Ok(specs)
}

/// Ops that pass index values through unchanged (as input 0), so a Gather behind them still
/// bounds the model input.
const INDEX_PASSTHROUGH: [&str; 6] = [
    "Cast",
    "Unsqueeze",
    "Reshape",
    "Squeeze",
    "Flatten",
    "Identity",
];

/// The smallest table size among the Gathers `input` indexes in the main graph.
fn gather_bound(model: &LoadedModel, graph: &ModelGraph, input: &str) -> Option<u64> {
    let view = graph.main()?;
    let proto = model.proto.graph.as_ref()?;
    let mut bound: Option<u64> = None;
    let mut stack = vec![input.to_string()];
    let mut seen = std::collections::HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v.clone()) {
            continue;
        }
        for &ni in view.consumers_of(&v) {
            let node = &proto.node[ni];
            let op = node.op_type();
            if INDEX_PASSTHROUGH.contains(&op) && node.input.first() == Some(&v) {
                stack.extend(node.output.first().cloned());
            } else if op == "Gather"
                && node.input.get(1) == Some(&v)
                && let Some(rows) = table_rows(model, graph, node)
            {
                bound = Some(bound.map_or(rows, |b| b.min(rows)));
            }
        }
    }
    bound
}

/// Size of the Gather's constant table along its axis; the table may sit behind Cast,
/// Identity or DequantizeLinear (which keep its shape).
fn table_rows(
    model: &LoadedModel,
    graph: &ModelGraph,
    gather: &crate::onnx::pb::NodeProto,
) -> Option<u64> {
    use crate::onnx::pb_ext::NodeExt;
    let view = graph.main()?;
    let proto = model.proto.graph.as_ref()?;
    let mut value = gather.input.first()?.clone();
    let dims = loop {
        if let Some(src) = graph.const_source(&model.proto, 0, &value) {
            break graph.const_tensor(&model.proto, &src)?.dims.clone();
        }
        let node = &proto.node[*view.producer.get(&value)?];
        if !["Cast", "Identity", "DequantizeLinear"].contains(&node.op_type()) {
            return None;
        }
        value = node.input.first()?.clone();
    };
    let axis = gather.attr_i("axis").unwrap_or(0);
    let axis = if axis < 0 {
        axis + dims.len() as i64
    } else {
        axis
    };
    let rows = *dims.get(usize::try_from(axis).ok()?)?;
    u64::try_from(rows).ok().filter(|&r| r > 0)
}

/// Resolves an input's shape: fixed dims as declared, symbolic ones from `dims` (the
/// `--dim` values) or the defaults.
pub fn resolve_shape(spec: &InputSpec, dims: &HashMap<String, usize>) -> Result<Vec<usize>> {
    spec.dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => Ok(*v),
            Dim::Unknown => Ok(DEFAULT_BATCH),
            Dim::Param(p) => resolve_param(p, dims),
        })
        .collect()
}

/// A dim_param's value: `--dim` first, then a sum of terms (`past_sequence_length + 1`),
/// then the name-based default.
fn resolve_param(p: &str, dims: &HashMap<String, usize>) -> Result<usize> {
    if let Some(&v) = dims.get(p) {
        return Ok(v);
    }
    if p.contains('+') {
        return p
            .split('+')
            .map(str::trim)
            .map(|t| match t.parse::<usize>() {
                Ok(v) => Ok(v),
                Err(_) => resolve_param(t, dims),
            })
            .sum();
    }
    Ok(named_default(p).unwrap_or(DEFAULT_BATCH))
}

/// The default a dim_param's name gives it, when its name says what it is.
fn named_default(p: &str) -> Option<usize> {
    let lower = p.to_ascii_lowercase();
    if lower.contains("batch") {
        Some(DEFAULT_BATCH)
    } else if lower.contains("past") {
        Some(0)
    } else if ["seq", "len", "total"].iter().any(|k| lower.contains(k)) {
        Some(DEFAULT_SEQUENCE)
    } else {
        None
    }
}

/// `dims` (the `--dim` values) with [`DEFAULT_SEQUENCE`] added for each dim_param whose name
/// says nothing but which sizes a token axis: a non-leading axis of an integer input that
/// indexes an embedding table, or of a mask. So that a model exported with `dynamic_axes`
/// named `b` and `s` is checked on 8 tokens, not 1.
fn with_token_dims(specs: &[InputSpec], dims: &HashMap<String, usize>) -> HashMap<String, usize> {
    let mut out = dims.clone();
    for spec in specs {
        let tokens = spec.index_bound.is_some() || spec.name.to_ascii_lowercase().contains("mask");
        if !tokens {
            continue;
        }
        for d in spec.dims.iter().skip(1) {
            if let Dim::Param(p) = d
                && !p.contains('+')
                && named_default(p).is_none()
            {
                out.entry(p.clone()).or_insert(DEFAULT_SEQUENCE);
            }
        }
    }
    out
}

/// The most values one generated input may have (a typo in --dim should not exhaust memory).
const MAX_GENERATED: usize = 1 << 28;

/// Generates one input following the module's rules.
pub fn generate(spec: &InputSpec, dims: &HashMap<String, usize>, seed: u64) -> Result<ArrayData> {
    let shape = resolve_shape(spec, dims)?;
    let n = super::tensor::numel(&shape)?;
    if n > MAX_GENERATED {
        return Err(Error::Verify(format!(
            "input '{}' of shape {shape:?} would have {n} values, more than the {MAX_GENERATED} generated inputs may have; choose smaller --dim values or give --inputs",
            spec.name
        )));
    }
    let mut rng = Rng::new(seed ^ fnv1a(spec.name.as_bytes()));
    let values: Vec<f64> = if spec.name.to_ascii_lowercase().contains("mask") {
        vec![1.0; n]
    } else if is_float(spec.dtype) {
        (0..n).map(|_| rng.normal()).collect()
    } else if spec.dtype == DataType::Bool {
        (0..n).map(|_| rng.below(2) as f64).collect()
    } else {
        let hi = spec.index_bound.unwrap_or(DEFAULT_INT_RANGE);
        (0..n).map(|_| rng.below(hi) as f64).collect()
    };
    ArrayData::from_f64(spec.dtype, shape, &values)
        .map_err(|e| Error::Verify(format!("input '{}': {e}", spec.name)))
}

/// Feeds for `specs`: the arrays from `provided` (the `--inputs` file and its arrays), which
/// must hold every input (see the module doc for the types they may have), or generated ones
/// when no file is given.
pub fn make_feeds(
    specs: &[InputSpec],
    provided: Option<(&Path, &[(String, ArrayData)])>,
    dims: &HashMap<String, usize>,
    seed: u64,
) -> Result<Tensors> {
    let mut feeds = Vec::with_capacity(specs.len());
    let dims = &with_token_dims(specs, dims);
    for spec in specs {
        let arr = match provided {
            Some((path, arrays)) => given_input(spec, path, arrays)?,
            None => generate(spec, dims, seed)?,
        };
        feeds.push((spec.name.clone(), arr));
    }
    Ok(feeds)
}

/// Reads the arrays of an `--inputs` file that feed `specs`, each array's declared shape
/// checked against its input before its data is read (a compressed array declaring gigabytes
/// for a small input is refused unread); arrays the models do not take are left unread.
/// Returns them and notes naming those left out.
pub fn read_inputs(specs: &[InputSpec], path: &Path) -> Result<(Tensors, Vec<String>)> {
    let (arrays, names) = super::npz::read_arrays_where(path, |name, shape| {
        let Some(spec) = specs.iter().find(|s| s.name == name) else {
            return Ok(false);
        };
        if !shape_fits(spec, shape) {
            return Err(shape_refused(spec, path, shape));
        }
        Ok(true)
    })?;
    let notes = names
        .iter()
        .filter(|name| !specs.iter().any(|s| s.name == **name))
        .map(|name| format!("'{name}' in --inputs is not a model input: ignored"))
        .collect();
    Ok((arrays, notes))
}

/// Whether an array of `shape` may feed `spec`: the shape as declared, any size along a
/// symbolic dimension (onnxruntime refuses another; tract would broadcast it).
fn shape_fits(spec: &InputSpec, shape: &[usize]) -> bool {
    spec.dims.is_empty()
        || (shape.len() == spec.dims.len()
            && shape.iter().zip(&spec.dims).all(|(&n, d)| match d {
                Dim::Fixed(f) => n == *f,
                _ => true,
            }))
}

fn shape_refused(spec: &InputSpec, path: &Path, shape: &[usize]) -> Error {
    Error::Npz {
        path: path.to_path_buf(),
        reason: format!(
            "array '{}' has shape {:?} but the model input takes {}",
            spec.name,
            shape,
            format_dims(&spec.dims)
        ),
    }
}

/// The array of `path` that feeds `spec`, in the input's element type.
fn given_input(spec: &InputSpec, path: &Path, arrays: &[(String, ArrayData)]) -> Result<ArrayData> {
    let err = |reason: String| Error::Npz {
        path: path.to_path_buf(),
        reason,
    };
    let Some((_, arr)) = arrays.iter().find(|(n, _)| *n == spec.name) else {
        return Err(err(format!(
            "no array '{}' for the model input of that name ({} {}); --inputs must hold every input",
            spec.name,
            spec.dtype,
            format_dims(&spec.dims)
        )));
    };
    let refused = || {
        let store = if spec.dtype == DataType::Bfloat16 {
            "a float array, or as uint16 holding bfloat16's bits (numpy has no bfloat16)".into()
        } else {
            format!("{} (or a type of the same kind)", spec.dtype)
        };
        err(format!(
            "array '{}' is {} but the model input '{}' takes {}; store it as {store}",
            spec.name, arr.dtype, spec.name, spec.dtype
        ))
    };
    if !shape_fits(spec, &arr.shape) {
        return Err(shape_refused(spec, path, &arr.shape));
    }
    let (from, to) = (kind(arr.dtype), kind(spec.dtype));
    let bf16_bits = arr.dtype == DataType::Uint16 && spec.dtype == DataType::Bfloat16;
    if from != to && !bf16_bits {
        return Err(refused());
    }
    let cast = arr
        .cast(spec.dtype)
        .map_err(|e| err(format!("array '{}': {e}", spec.name)))?;
    if to == Kind::Float && from == Kind::Float && arr.dtype != spec.dtype {
        // A finite value the input's type cannot hold would reach the model as an infinity.
        let over = arr
            .values()?
            .zip(cast.values()?)
            .find(|(a, b)| a.is_finite() && !b.is_finite())
            .map(|(a, _)| a);
        if let Some(v) = over {
            return Err(err(format!(
                "array '{}' is {} and holds {v:e}, beyond what the model input's {} holds (it would be an infinity)",
                spec.name, arr.dtype, spec.dtype
            )));
        }
    }
    if to == Kind::Integer && arr.dtype != spec.dtype {
        // Integers convert only when every value survives (no saturation, no sign flip),
        // compared exactly (64-bit values beyond 2^53 included).
        let lost = match (arr.ints(), cast.ints()) {
            (Some(a), Some(b)) => a.zip(b).find(|(a, b)| a != b).map(|(a, _)| a.to_string()),
            _ => None,
        };
        if let Some(v) = lost {
            return Err(err(format!(
                "array '{}' is {} and holds {v}, which the model input's {} cannot hold",
                spec.name, arr.dtype, spec.dtype
            )));
        }
    }
    Ok(cast)
}

/// What an element type holds, for deciding which arrays may feed an input.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Float,
    Integer,
    Bool,
    Other,
}

fn kind(dtype: DataType) -> Kind {
    use DataType::*;
    match dtype {
        Float | Float16 | Bfloat16 | Double => Kind::Float,
        Int8 | Int16 | Int32 | Int64 | Uint8 | Uint16 | Uint32 | Uint64 => Kind::Integer,
        Bool => Kind::Bool,
        _ => Kind::Other,
    }
}

/// `[batch, 8, ?]`: fixed dims as numbers, symbolic ones by name, unnamed ones as `?`.
pub fn format_dims(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => v.to_string(),
            Dim::Param(p) => p.clone(),
            Dim::Unknown => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// The inputs of two models that must take the same feeds: the same names with the same
/// element types and compatible shapes (equal ranks and equal fixed dims; symbolic dims may
/// differ in name). The merged spec keeps A's order, takes a fixed dim where either model fixes
/// one, a symbolic dim by the name `dims` (`--dim`) sets, A's first, and the smaller Gather
/// bound. `Err` describes the difference: `x (float32) vs z (float32)`, or which side alone
/// takes an input (`only a takes ...`, where the caller names A and B).
pub fn common_inputs(
    a: &[InputSpec],
    b: &[InputSpec],
    dims: &HashMap<String, usize>,
) -> std::result::Result<Vec<InputSpec>, InputDifference> {
    let compatible = |x: &InputSpec, y: &InputSpec| {
        x.dtype == y.dtype
            && (x.dims.len() == y.dims.len() || x.dims.is_empty() || y.dims.is_empty())
            && x.dims.iter().zip(&y.dims).all(|p| match p {
                (Dim::Fixed(u), Dim::Fixed(v)) => u == v,
                _ => true,
            })
    };
    let counterpart = |x: &InputSpec, other: &[InputSpec]| {
        other
            .iter()
            .find(|y| y.name == x.name)
            .is_some_and(|y| compatible(x, y))
    };
    // Shapes are worth showing only where the name and type agree (the shape is the difference).
    let describe = |x: &InputSpec, other: &[InputSpec]| {
        let same_type = other.iter().any(|y| y.name == x.name && y.dtype == x.dtype);
        if same_type {
            format!("{} ({} {})", x.name, x.dtype, format_dims(&x.dims))
        } else {
            format!("{} ({})", x.name, x.dtype)
        }
    };
    let only_a: Vec<String> = a
        .iter()
        .filter(|x| !counterpart(x, b))
        .map(|x| describe(x, b))
        .collect();
    let only_b: Vec<String> = b
        .iter()
        .filter(|y| !counterpart(y, a))
        .map(|y| describe(y, a))
        .collect();
    if !only_a.is_empty() || !only_b.is_empty() {
        return Err(InputDifference { only_a, only_b });
    }
    let merged = a
        .iter()
        .map(|x| {
            let Some(y) = b.iter().find(|y| y.name == x.name) else {
                return x.clone();
            };
            let dims = if x.dims.is_empty() {
                y.dims.clone()
            } else if y.dims.is_empty() {
                x.dims.clone()
            } else {
                x.dims
                    .iter()
                    .zip(&y.dims)
                    .map(|p| match p {
                        (Dim::Fixed(v), _) | (_, Dim::Fixed(v)) => Dim::Fixed(*v),
                        (Dim::Param(p), Dim::Param(q))
                            if !dims.contains_key(p) && dims.contains_key(q) =>
                        {
                            Dim::Param(q.clone())
                        }
                        (Dim::Param(p), _) | (_, Dim::Param(p)) => Dim::Param(p.clone()),
                        (Dim::Unknown, Dim::Unknown) => Dim::Unknown,
                    })
                    .collect()
            };
            let index_bound = match (x.index_bound, y.index_bound) {
                (Some(u), Some(v)) => Some(u.min(v)),
                (u, v) => u.or(v),
            };
            InputSpec {
                name: x.name.clone(),
                dtype: x.dtype,
                dims,
                index_bound,
            }
        })
        .collect();
    Ok(merged)
}

/// How two models' inputs differ: each side's inputs the other does not take alike.
#[derive(Clone, Debug, PartialEq)]
pub struct InputDifference {
    pub only_a: Vec<String>,
    pub only_b: Vec<String>,
}

impl InputDifference {
    /// `x (float32) vs z (float32)`, or `only A takes x (float32)` when B has nothing in its
    /// place (`a`, `b` name the models).
    pub fn describe(&self, a: &str, b: &str) -> String {
        match (self.only_a.is_empty(), self.only_b.is_empty()) {
            (false, false) => format!("{} vs {}", self.only_a.join(", "), self.only_b.join(", ")),
            (false, true) => format!("only {a} takes {}", self.only_a.join(", ")),
            _ => format!("only {b} takes {}", self.only_b.join(", ")),
        }
    }
}

/// The symbolic dimension names `--dim` may set for these inputs: every dim_param, and each
/// named term of a sum such as `past_sequence_length + 1`, in order of appearance.
pub fn symbolic_dims(specs: &[InputSpec]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    };
    for spec in specs {
        for d in &spec.dims {
            let Dim::Param(p) = d else { continue };
            add(p);
            if p.contains('+') {
                p.split('+')
                    .map(str::trim)
                    .filter(|t| !t.is_empty() && t.parse::<usize>().is_err())
                    .for_each(&mut add);
            }
        }
    }
    out
}

/// FNV-1a, to give each input name its own random stream.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64: tiny, fast and good enough for test inputs; fixed so runs repeat across
/// versions and platforms.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `0..n` (multiply-shift; the bias is negligible for small n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal by Box-Muller (one value per pair of uniforms; simplicity over speed).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    type TestResult = Result<(), Box<dyn std::error::Error>>;

    use super::*;

    #[test]
    fn params_resolve() -> Result<()> {
        let mut dims = HashMap::new();
        assert_eq!(resolve_param("batch_size", &dims)?, 1);
        assert_eq!(resolve_param("sequence_length", &dims)?, DEFAULT_SEQUENCE);
        assert_eq!(resolve_param("past_sequence_length", &dims)?, 0);
        assert_eq!(resolve_param("past_sequence_length + 1", &dims)?, 1);
        assert_eq!(resolve_param("height", &dims)?, 1);
        dims.insert("past_sequence_length".to_string(), 5);
        assert_eq!(resolve_param("past_sequence_length + 1", &dims)?, 6);
        Ok(())
    }

    #[test]
    fn rng_is_repeatable_and_sane() {
        let a: Vec<u64> = {
            let mut r = Rng::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let mut r = Rng::new(7);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        let mut r = Rng::new(1);
        let xs: Vec<f64> = (0..20000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
        assert!((0..1000).all(|_| r.below(5) < 5));
    }

    fn spec(name: &str, dtype: DataType, dims: Vec<Dim>) -> InputSpec {
        InputSpec {
            name: name.into(),
            dtype,
            dims,
            index_bound: None,
        }
    }

    #[test]
    fn common_inputs_merge_alike_and_describe_differences() -> TestResult {
        let p = |n: &str| Dim::Param(n.into());
        let a = vec![spec(
            "x",
            DataType::Float,
            vec![p("batch"), p("seq"), p("h")],
        )];
        let b = vec![spec(
            "x",
            DataType::Float,
            vec![p("N"), Dim::Fixed(4), p("w")],
        )];
        let dims = HashMap::from([("w".to_string(), 3)]);
        let merged = common_inputs(&a, &b, &dims).map_err(|d| d.describe("a", "b"))?;
        // A fixed dim wins, then the name --dim sets, then A's name.
        assert_eq!(merged[0].dims, vec![p("batch"), Dim::Fixed(4), p("w")]);
        let b = vec![spec("z", DataType::Float, vec![])];
        let d = common_inputs(&a, &b, &dims).unwrap_err();
        assert_eq!(d.describe("a", "b"), "x (float32) vs z (float32)");
        let b = vec![spec(
            "x",
            DataType::Float,
            vec![Dim::Fixed(2), Dim::Fixed(3)],
        )];
        let a = vec![spec(
            "x",
            DataType::Float,
            vec![Dim::Fixed(3), Dim::Fixed(2)],
        )];
        let d = common_inputs(&a, &b, &dims).unwrap_err();
        assert_eq!(
            d.describe("a", "b"),
            "x (float32 [3, 2]) vs x (float32 [2, 3])"
        );
        let d = common_inputs(&a, &[], &dims).unwrap_err();
        assert_eq!(d.describe("a", "b"), "only a takes x (float32)");
        Ok(())
    }

    #[test]
    fn symbolic_dims_include_the_terms_of_sums() {
        let s = spec(
            "mask",
            DataType::Int64,
            vec![
                Dim::Param("batch".into()),
                Dim::Param("past_sequence_length + 1".into()),
                Dim::Fixed(2),
            ],
        );
        assert_eq!(
            symbolic_dims(&[s]),
            vec!["batch", "past_sequence_length + 1", "past_sequence_length"]
        );
    }

    #[test]
    fn given_arrays_keep_their_kind() -> TestResult {
        let path = Path::new("in.npz");
        let ids = spec("ids", DataType::Int64, vec![Dim::Fixed(2)]);
        let given = |dt, v: &[f64]| -> Result<Tensors, Box<dyn std::error::Error>> {
            Ok(vec![("ids".into(), ArrayData::from_f64(dt, vec![2], v)?)])
        };
        let got = given_input(&ids, path, &given(DataType::Int32, &[3.0, 4.0])?)?;
        assert_eq!(
            (got.dtype, got.values()?.collect::<Vec<_>>()),
            (DataType::Int64, vec![3.0, 4.0])
        );
        for dt in [DataType::Float, DataType::Double, DataType::Bool] {
            let e = given_input(&ids, path, &given(dt, &[3.0, 4.0])?).unwrap_err();
            assert!(e.to_string().contains(&format!("is {dt} but")), "{e}");
        }
        let u8_ids = spec("ids", DataType::Uint8, vec![Dim::Fixed(2)]);
        let e = given_input(&u8_ids, path, &given(DataType::Int64, &[3.0, -1.0])?).unwrap_err();
        assert!(e.to_string().contains("holds -1"), "{e}");
        let e = given_input(&ids, path, &[]).unwrap_err();
        assert!(e.to_string().starts_with("in.npz: no array 'ids'"), "{e}");
        Ok(())
    }

    /// TorchScript exports name dims as their `dynamic_axes` say (`b`, `s`): a dim of no
    /// known name on a token axis (after the first, of ids or a mask) is a sequence.
    #[test]
    fn unnamed_token_dims_are_sequences() -> Result<()> {
        let p = |n: &str| Dim::Param(n.into());
        let ids = InputSpec {
            name: "input_ids".into(),
            dtype: DataType::Int64,
            dims: vec![p("b"), p("s")],
            index_bound: Some(100),
        };
        let mask = InputSpec {
            name: "attention_mask".into(),
            dtype: DataType::Int64,
            dims: vec![p("b"), p("m")],
            index_bound: None,
        };
        let feat = InputSpec {
            name: "pixels".into(),
            dtype: DataType::Float,
            dims: vec![p("b"), p("h")],
            index_bound: None,
        };
        let given = HashMap::from([("m".to_string(), 3)]);
        let dims = with_token_dims(&[ids.clone(), mask, feat.clone()], &given);
        assert_eq!(resolve_shape(&ids, &dims)?, vec![1, DEFAULT_SEQUENCE]);
        assert_eq!(dims.get("m"), Some(&3), "--dim wins");
        assert_eq!(resolve_shape(&feat, &dims)?, vec![1, 1], "not a token axis");
        let feeds = make_feeds(&[ids], None, &HashMap::new(), 0)?;
        assert_eq!(feeds[0].1.shape, vec![1, DEFAULT_SEQUENCE]);
        Ok(())
    }

    #[test]
    fn masks_are_ones_and_ids_bounded() -> Result<()> {
        let dims = HashMap::new();
        let spec = |name: &str, bound| InputSpec {
            name: name.into(),
            dtype: DataType::Int64,
            dims: vec![Dim::Param("batch".into()), Dim::Param("sequence".into())],
            index_bound: bound,
        };
        let m = generate(&spec("attention_mask", None), &dims, 0)?;
        assert!(m.values()?.all(|v| v == 1.0));
        assert_eq!(m.shape, vec![1, DEFAULT_SEQUENCE]);
        let ids = generate(&spec("input_ids", Some(3)), &dims, 0)?;
        assert!(ids.values()?.all(|v| (0.0..3.0).contains(&v)));
        assert_eq!(ids, generate(&spec("input_ids", Some(3)), &dims, 0)?);
        Ok(())
    }
}
