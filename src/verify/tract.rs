//! The embedded backend: tract, pure Rust, nothing to install. It covers common ops but not
//! all of ONNX (no bfloat16, few contrib ops); when it cannot run a model the error says so and
//! points at onnxruntime (`--ep cpu`).
//!
//! tract panics on some inputs (a Gather index beyond its table, for one): loading, optimizing
//! and running are each caught (`guarded`) and the panic becomes an error naming the model,
//! with Rust's panic message kept off stderr.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::DataType;

use super::backend::{Backend, Ep};
use super::tensor::{ArrayData, Tensors};

/// A model loaded in tract; the runnable plan is made for the feeds' concrete shapes.
pub struct TractBackend {
    /// How messages name the model (its path, or a description of a temporary file).
    label: String,
    /// Consumed by `prepare` (optimizing takes the model by value).
    model: Option<InferenceModel>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    plan: Option<(Vec<Vec<usize>>, Arc<TypedRunnableModel>)>,
    /// What to suggest when tract cannot run the model.
    hint: &'static str,
}

/// The suggestion when tract was chosen.
const HINT_CHOSEN: &str = "try onnxruntime (--ep cpu)";
/// The suggestion when tract runs because no onnxruntime library was found.
const HINT_FALLBACK: &str = "onnxruntime may (--ep cpu), but no onnxruntime library was found: install one with `pip install onnxruntime` or point --ort-lib / ORT_DYLIB_PATH at libonnxruntime.so";

impl TractBackend {
    /// Loads the model from its path; `label` names it in messages; `fallback` says tract
    /// stands in for a missing onnxruntime (errors then say how to get onnxruntime).
    pub fn open(path: &Path, label: &str, fallback: bool) -> Result<Self> {
        let hint = if fallback { HINT_FALLBACK } else { HINT_CHOSEN };
        let model = guarded(label, hint, || tract_onnx::onnx().model_for_path(path))?
            .map_err(|e| unsupported(label, &e, hint))?;
        let name_of = |o: &OutletId| {
            model
                .outlet_label(*o)
                .unwrap_or(&model.node(o.node).name)
                .to_string()
        };
        let inputs = inputs_or_outputs(label, model.input_outlets(), hint)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let outputs = inputs_or_outputs(label, model.output_outlets(), hint)?
            .iter()
            .map(name_of)
            .collect();
        Ok(TractBackend {
            label: label.to_string(),
            model: Some(model),
            inputs,
            outputs,
            plan: None,
            hint,
        })
    }

    fn err(&self, e: &anyhow::Error) -> Error {
        unsupported(&self.label, e, self.hint)
    }
}

fn inputs_or_outputs<'m>(
    label: &str,
    r: TractResult<&'m [OutletId]>,
    hint: &str,
) -> Result<&'m [OutletId]> {
    r.map_err(|e| unsupported(label, &e, hint))
}

fn unsupported(label: &str, e: &anyhow::Error, hint: &str) -> Error {
    let what = format!("{e:#}").replace('\n', " ");
    // (onnxruntime's CPU kernels lack most bfloat16 ops too: its CUDA EP has them)
    let hint = if what.contains("Bfloat16") {
        HINT_BF16
    } else {
        hint
    };
    Error::Backend(format!(
        "{label}: tract cannot run this model: {what}; {hint}"
    ))
}

/// The suggestion for a bfloat16 model, which tract has no type for.
const HINT_BF16: &str = "tract has no bfloat16; onnxruntime runs bfloat16 models on its CUDA EP (--ep cuda), while its CPU kernels lack most bfloat16 ops";

/// Runs `f` (a call into tract), turning a panic into an error naming the model, with nothing
/// printed for it: see [`quiet_panics`].
fn guarded<T>(label: &str, hint: &str, f: impl FnOnce() -> T) -> Result<T> {
    quiet_panics();
    QUIET.set(true);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.set(false);
    result.map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Error::Backend(format!(
            "tract failed on {label}: {}; {hint}",
            msg.replace('\n', " ")
        ))
    })
}

thread_local! {
    /// Set while this thread is inside [`guarded`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the panic hook, once per process, so that a panic on a thread inside [`guarded`]
/// prints nothing (the default hook would print the message and a backtrace hint on stderr);
/// every other panic goes to the previous hook as before.
fn quiet_panics() {
    static WRAPPED: std::sync::Once = std::sync::Once::new();
    WRAPPED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.get() {
                previous(info);
            }
        }));
    });
}

impl Backend for TractBackend {
    fn ep(&self) -> Ep {
        Ep::Tract
    }

    fn prepare(&mut self, feeds: &[(String, ArrayData)]) -> Result<()> {
        let ordered = self.ordered_feeds(feeds)?;
        let shapes: Vec<Vec<usize>> = ordered.iter().map(|a| a.shape.clone()).collect();
        if self.plan.as_ref().is_some_and(|(s, _)| *s == shapes) {
            return Ok(());
        }
        let Some(mut model) = self.model.take() else {
            return Err(Error::Verify(format!(
                "{}: tract was prepared for other input shapes",
                self.label
            )));
        };
        for (i, arr) in ordered.iter().enumerate() {
            let dt = datum_type(arr.dtype).ok_or_else(|| {
                Error::Backend(format!(
                    "{}: tract has no {} tensors; {}",
                    self.label, arr.dtype, self.hint
                ))
            })?;
            let fact = InferenceFact::dt_shape(dt, arr.shape.clone());
            model.set_input_fact(i, fact).map_err(|e| self.err(&e))?;
        }
        let plan = guarded(&self.label, self.hint, || {
            model.into_optimized().and_then(|m| m.into_runnable())
        })?
        .map_err(|e| self.err(&e))?;
        self.plan = Some((shapes, plan));
        Ok(())
    }

    fn run(&mut self, feeds: &[(String, ArrayData)]) -> Result<Tensors> {
        self.prepare(feeds)?;
        let inputs: TVec<TValue> = self
            .ordered_feeds(feeds)?
            .into_iter()
            .map(|a| to_tract(a).map(TValue::from))
            .collect::<Result<_>>()?;
        let Some((_, plan)) = &self.plan else {
            return Err(Error::Verify("tract plan missing".into()));
        };
        let outs =
            guarded(&self.label, self.hint, || plan.run(inputs))?.map_err(|e| self.err(&e))?;
        self.outputs
            .iter()
            .zip(outs)
            .map(|(name, v)| Ok((name.clone(), from_tract(name, &v)?)))
            .collect()
    }
}

impl TractBackend {
    /// The feeds in tract's input order.
    fn ordered_feeds<'f>(&self, feeds: &'f [(String, ArrayData)]) -> Result<Vec<&'f ArrayData>> {
        self.inputs
            .iter()
            .map(|name| {
                feeds
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, a)| a)
                    .ok_or_else(|| Error::Verify(format!("no value for model input '{name}'")))
            })
            .collect()
    }
}

fn datum_type(dtype: DataType) -> Option<DatumType> {
    use DataType::*;
    Some(match dtype {
        Float => DatumType::F32,
        Float16 => DatumType::F16,
        Double => DatumType::F64,
        Int8 => DatumType::I8,
        Int16 => DatumType::I16,
        Int32 => DatumType::I32,
        Int64 => DatumType::I64,
        Uint8 => DatumType::U8,
        Uint16 => DatumType::U16,
        Uint32 => DatumType::U32,
        Uint64 => DatumType::U64,
        Bool => DatumType::Bool,
        _ => return None,
    })
}

fn to_tract(a: &ArrayData) -> Result<Tensor> {
    let dt = datum_type(a.dtype)
        .ok_or_else(|| Error::Verify(format!("tract has no {} tensors", a.dtype)))?;
    // SAFETY: `ArrayData::new` checked that `data` holds exactly `shape`'s elements of this
    // type, in the little-endian C-order layout tract uses on the hosts we build for; bools
    // are 0/1 bytes as tract expects.
    unsafe { Tensor::from_raw_dt(dt, &a.shape, &a.data) }
        .map_err(|e| Error::Verify(format!("tract tensor: {e}")))
}

fn from_tract(name: &str, t: &Tensor) -> Result<ArrayData> {
    let err = |r: String| Error::Verify(format!("output '{name}': {r}"));
    // Shape-computing graphs may end in tract's symbolic integers: report them as int64.
    let t = if t.datum_type() == DatumType::TDim {
        t.cast_to_dt(DatumType::I64)
            .map_err(|e| err(e.to_string()))?
    } else {
        std::borrow::Cow::Borrowed(t)
    };
    let dtype = match t.datum_type() {
        DatumType::F32 => DataType::Float,
        DatumType::F16 => DataType::Float16,
        DatumType::F64 => DataType::Double,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::Bool => DataType::Bool,
        other => return Err(err(format!("tract type {other:?} is not supported"))),
    };
    ArrayData::new(dtype, t.shape().to_vec(), t.as_bytes().to_vec()).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bfloat16 model is not sent to onnxruntime's CPU kernels, which lack most bfloat16 ops
    /// too; other failures keep the hint the backend was opened with.
    #[test]
    fn bfloat16_gets_its_own_hint() {
        let bf16 = anyhow::anyhow!("Unknown DatumType Bfloat16");
        let said = unsupported("m.onnx", &bf16, HINT_CHOSEN).to_string();
        assert!(
            said.ends_with(HINT_BF16) && !said.contains(HINT_CHOSEN),
            "{said}"
        );
        let other = anyhow::anyhow!("no such op Foo");
        let said = unsupported("m.onnx", &other, HINT_CHOSEN).to_string();
        assert!(said.ends_with(HINT_CHOSEN), "{said}");
    }
}
