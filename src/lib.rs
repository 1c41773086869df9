//! onnx-lora: LoRA for ONNX models, directly on the exported graph.
//!
//! The pipeline: [`onnx::load`] memory-maps a model (and its external data) and decodes it
//! zero-copy; [`graph::ModelGraph`] indexes it; [`target::find_candidates`] finds the weights
//! LoRA can adapt and the module paths they came from; rewrites edit the proto; and
//! [`onnx::save`] writes the result atomically, streaming untouched tensors. Every temp file
//! a writer makes is registered in [`cleanup`], so an interrupted run can remove them.
//!
//! ```no_run
//! # fn main() -> onnx_lora::Result<()> {
//! let model = onnx_lora::onnx::load("model.onnx")?;
//! let graph = onnx_lora::graph::ModelGraph::build(&model.proto);
//! for c in onnx_lora::target::find_candidates(&model.proto, &graph) {
//!     println!("{} {} {:?}", c.module, c.op, c.shape);
//! }
//! # Ok(()) }
//! ```

pub mod adapter;
pub mod cleanup;
pub mod error;
pub mod graph;
pub mod onnx;
pub mod rewrite;
pub mod target;
pub mod tensor;
pub mod verify;

pub use error::{Error, Result};
