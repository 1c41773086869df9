//! Adapter formats: reading PEFT LoRA adapters (`adapter_config.json` +
//! `adapter_model.safetensors`), diffusers LoRA files (`diffusers`) and kohya LoRA files (LyCORIS LoHa / LoKr too; SDXL's sgm
//! UNet names mapped to diffusers' in `sgm`, Flux's original names in `bfl`) into
//! per-module factors with their scaling.

pub mod bfl;
pub mod diffusers;
pub mod kohya;
pub mod lycoris;
pub mod ort_format;
pub mod peft;
pub mod pyregex;
pub mod scope;
pub mod sgm;

pub use peft::{Adapter, AdapterConfig, ModuleAdapter, ModuleKind, TokenRows};
