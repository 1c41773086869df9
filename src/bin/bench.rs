//! `bench`: how fast onnx-lora folds, injects, inspects and converts, next to a file copy.
//!
//! ```text
//! cargo build --release && cargo run --release --bin bench -- [--size tiny|small|full] [--dir DIR] [--keep]
//! ```
//!
//! It generates a Llama-shaped fp32 model the way torch's dynamo exporter writes one (MatMul
//! nodes `node_linear_N` with `pkg.torch.onnx.name_scopes` metadata, anonymous `val_N` [in, out]
//! weights in a page-aligned `model.onnx.data`) and a matching PEFT adapter (r 16, alpha 32, the
//! seven projections of every layer), all without torch. Then it runs `cp` + fsync and each
//! `onnx-lora` command (the release binary beside this one, as a child process, its outputs
//! fsynced after it) a few times and prints the median wall time, the ratio to the copy and the child's peak
//! resident memory, against the goals of the performance issue. When a Python with onnx and
//! numpy is found (`$ONNX_LORA_PYTHON`, then `.venv/bin/python` of this checkout, then
//! `python3`), `benches/fold_reference.py` is timed as the "Python onnx" reference; with
//! onnxruntime too, `benches/serving_latency.py` measures the inference cost of the deployments.
//! Timings are reported, never asserted.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use onnx_lora::onnx::pb::{
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, tensor_proto::DataLocation,
    tensor_shape_proto::Dimension, tensor_shape_proto::dimension::Value as DimValue, type_proto,
};
use prost::Message;

const RANK: usize = 16;
const ALPHA: f32 = 32.0;
const SEQ: i64 = 16;
const ALIGN: u64 = 4096;
const PROJECTIONS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Size {
    /// H 64, 2 layers, vocab 256, intermediate 176 (a smoke test, ~1 MB).
    Tiny,
    /// H 512, 6 layers, vocab 8000, intermediate 1408 (~110 MB).
    Small,
    /// H 1536, 12 layers, vocab 32000, intermediate 4096 (~1.75 GB).
    Full,
}

/// Benchmark onnx-lora fold / inject / inspect / convert against `cp` (and Python onnx).
#[derive(Parser)]
#[command(name = "bench")]
struct Args {
    #[arg(long, value_enum, default_value = "small")]
    size: Size,
    /// Work folder (default: a new temporary folder, removed at the end unless --keep).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the generated model, adapter and outputs.
    #[arg(long)]
    keep: bool,
    /// Runs per operation (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed runs per operation before the timed ones (the first run after another
    /// operation pays for that one's leftovers: page cache, pending disk work).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs per model and round in the serving latency script (each deployment is
    /// measured against the base in 4 rounds, each a fresh process).
    #[arg(long, default_value_t = 40)]
    serving_runs: usize,
    /// Skip the Python references (fold_reference.py, serving_latency.py).
    #[arg(long)]
    no_python: bool,
    /// Measure this model instead of generating one (e.g. a real torch export made by
    /// `benches/export_llama.py`); needs --adapter. Its files are never modified.
    #[arg(long, requires = "adapter")]
    model: Option<PathBuf>,
    /// The PEFT adapter folder to fold and inject with --model.
    #[arg(long, requires = "model")]
    adapter: Option<PathBuf>,
}

/// A model's `.onnx` file and the external data files it references.
fn files_of(model: &Path) -> Result<Vec<PathBuf>> {
    let m = ModelProto::decode(fs::read(model)?.as_slice())?;
    let dir = model.parent().unwrap_or(Path::new("."));
    let mut files = vec![model.to_path_buf()];
    let mut seen = std::collections::BTreeSet::new();
    for t in m.graph.iter().flat_map(|g| &g.initializer) {
        for e in &t.external_data {
            if e.key() == "location" && seen.insert(e.value().to_string()) {
                files.push(dir.join(e.value()));
            }
        }
    }
    Ok(files)
}

#[derive(Clone, Copy)]
struct Dims {
    hidden: usize,
    layers: usize,
    vocab: usize,
    inter: usize,
}

impl Size {
    fn dims(self) -> Dims {
        match self {
            Size::Tiny => Dims {
                hidden: 64,
                layers: 2,
                vocab: 256,
                inter: 176,
            },
            Size::Small => Dims {
                hidden: 512,
                layers: 6,
                vocab: 8000,
                inter: 1408,
            },
            Size::Full => Dims {
                hidden: 1536,
                layers: 12,
                vocab: 32000,
                inter: 4096,
            },
        }
    }
}

impl Dims {
    fn proj_shape(&self, name: &str) -> (usize, usize) {
        match name {
            "gate_proj" | "up_proj" => (self.hidden, self.inter),
            "down_proj" => (self.inter, self.hidden),
            _ => (self.hidden, self.hidden),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic data

/// splitmix64: cheap, deterministic, good enough for weights nobody trains.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `out` with little-endian f32 uniform in [-bound, bound).
    fn fill_le(&mut self, out: &mut [u8], bound: f32) {
        const UNIT: f32 = 1.0 / (1u32 << 23) as f32;
        for pair in out.chunks_mut(8) {
            let r = self.next_u64();
            for (i, b) in pair.chunks_exact_mut(4).enumerate() {
                let bits = (r >> (32 * i + 9)) as u32 & 0x7F_FFFF;
                let v = (bits as f32 * UNIT * 2.0 - 1.0) * bound;
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model generator

fn entry(k: &str, v: impl Into<String>) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    }
}

fn value_info(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(DimValue::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Python's repr of a list of strings, as dynamo writes `name_scopes`.
fn py_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Builds the graph while streaming the weights into the external data file.
struct Builder {
    data: BufWriter<File>,
    pos: u64,
    rng: Rng,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    counter: usize,
    buf: Vec<u8>,
}

const DATA_NAME: &str = "model.onnx.data";
const FLOAT: i32 = 1;
const INT64: i32 = 7;

impl Builder {
    fn id(&mut self) -> usize {
        self.counter += 1;
        self.counter
    }

    /// Writes a [rows, cols] f32 weight of uniform(-bound, bound) values at the next aligned
    /// offset and records it as an external initializer.
    fn weight(&mut self, name: String, rows: usize, cols: usize, bound: f32) -> Result<String> {
        let pad = (ALIGN - self.pos % ALIGN) % ALIGN;
        self.data.write_all(&vec![0u8; pad as usize])?;
        self.pos += pad;
        let len = (rows * cols * 4) as u64;
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(self.buf.len());
            let chunk = &mut self.buf[..n];
            self.rng.fill_le(chunk, bound);
            self.data.write_all(chunk)?;
            left -= n;
        }
        self.inits.push(TensorProto {
            name: Some(name.clone()),
            dims: vec![rows as i64, cols as i64],
            data_type: Some(FLOAT),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                entry("location", DATA_NAME),
                entry("offset", self.pos.to_string()),
                entry("length", len.to_string()),
            ],
            ..Default::default()
        });
        self.pos += len;
        Ok(name)
    }

    fn node(&mut self, op: &str, kind: &str, inputs: &[&str], scopes: &[&str]) -> String {
        let n = self.id();
        let out = format!("{kind}_{n}");
        self.nodes.push(NodeProto {
            name: Some(format!("node_{out}")),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            metadata_props: vec![entry("pkg.torch.onnx.name_scopes", py_list(scopes))],
            ..Default::default()
        });
        out
    }

    /// `x @ W` for a Linear module at `path` (dynamo: `node_linear_N`, weight `val_N` [in, out]).
    fn linear(&mut self, x: &str, path: &str, fin: usize, fout: usize) -> Result<String> {
        let w = format!("val_{}", self.id());
        // Half of PyTorch's default init range keeps activations bounded over the layers.
        let w = self.weight(w, fin, fout, 0.5 * (3.0 / fin as f32).sqrt())?;
        let mut scopes = vec![""];
        let parts: Vec<&str> = path.split('.').collect();
        let prefixes: Vec<String> = (1..=parts.len()).map(|i| parts[..i].join(".")).collect();
        scopes.extend(prefixes.iter().map(String::as_str));
        scopes.push("linear");
        Ok(self.node("MatMul", "linear", &[x, &w], &scopes))
    }
}

/// Writes `model.onnx` + `model.onnx.data` into `dir`; returns their total size in bytes.
fn generate_model(dir: &Path, d: Dims) -> Result<u64> {
    let data = File::create(dir.join(DATA_NAME))?;
    let mut b = Builder {
        data: BufWriter::with_capacity(8 << 20, data),
        pos: 0,
        rng: Rng(0x5EED),
        nodes: Vec::new(),
        inits: Vec::new(),
        counter: 0,
        buf: vec![0u8; 4 << 20],
    };
    let (h, i) = (d.hidden, d.inter);
    let embed = b.weight("model.embed_tokens.weight".into(), d.vocab, h, 1.0)?;
    let mut x = b.node(
        "Gather",
        "embedding",
        &[&embed, "input_ids"],
        &["", "model", "model.embed_tokens", "embedding"],
    );
    for l in 0..d.layers {
        let layer = format!("model.layers.{l}");
        let attn = format!("{layer}.self_attn");
        let mlp = format!("{layer}.mlp");
        let sc = |m: &str| -> Vec<String> {
            vec![String::new(), "model".into(), layer.clone(), m.to_string()]
        };
        let q = b.linear(&x, &format!("{attn}.q_proj"), h, h)?;
        let k = b.linear(&x, &format!("{attn}.k_proj"), h, h)?;
        let v = b.linear(&x, &format!("{attn}.v_proj"), h, h)?;
        let s = sc(&attn);
        let mut s: Vec<&str> = s.iter().map(String::as_str).collect();
        s.push("add");
        let qk = b.node("Add", "add", &[&q, &k], &s);
        let qkv = b.node("Add", "add", &[&qk, &v], &s);
        let o = b.linear(&qkv, &format!("{attn}.o_proj"), h, h)?;
        let res = [String::new(), "model".into(), layer.clone(), "add".into()];
        let res: Vec<&str> = res.iter().map(String::as_str).collect();
        x = b.node("Add", "add", &[&x, &o], &res);
        let g = b.linear(&x, &format!("{mlp}.gate_proj"), h, i)?;
        let u = b.linear(&x, &format!("{mlp}.up_proj"), h, i)?;
        let s = sc(&mlp);
        let mut s: Vec<&str> = s.iter().map(String::as_str).collect();
        s.push("mul");
        let gu = b.node("Mul", "mul", &[&g, &u], &s);
        let down = b.linear(&gu, &format!("{mlp}.down_proj"), i, h)?;
        x = b.node("Add", "add", &[&x, &down], &res);
    }
    b.linear(&x, "lm_head", h, d.vocab)?;
    // The graph output is called `logits`: rename the last node's output.
    if let Some(last) = b.nodes.last_mut() {
        last.output = vec!["logits".into()];
    }
    b.data.flush()?;
    b.data.get_ref().sync_all()?;
    let data_len = b.pos;

    let model = ModelProto {
        ir_version: Some(10),
        producer_name: Some("onnx-lora bench".into()),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(20),
        }],
        graph: Some(onnx_lora::onnx::pb::GraphProto {
            name: Some("main_graph".into()),
            node: b.nodes,
            initializer: b.inits,
            input: vec![value_info("input_ids", INT64, &[1, SEQ])],
            output: vec![value_info("logits", FLOAT, &[1, SEQ, d.vocab as i64])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    fs::write(dir.join("model.onnx"), &bytes)?;
    // Sanity: the crate itself must load it (every external reference checked).
    onnx_lora::onnx::load(dir.join("model.onnx")).context("the generated model does not load")?;
    Ok(bytes.len() as u64 + data_len)
}

/// Writes a PEFT adapter folder for every projection of every layer.
fn generate_adapter(dir: &Path, d: Dims) -> Result<u64> {
    fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": null,
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": PROJECTIONS.iter().map(|(_, p)| *p).collect::<Vec<_>>(),
        "fan_in_fan_out": false,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let mut rng = Rng(0xADA97E2);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..d.layers {
        for (group, name) in PROJECTIONS {
            let (fin, fout) = d.proj_shape(name);
            let key = format!("base_model.model.model.layers.{l}.{group}.{name}");
            let mut a = vec![0u8; RANK * fin * 4];
            rng.fill_le(&mut a, (3.0 / fin as f32).sqrt());
            let mut bm = vec![0u8; fout * RANK * 4];
            rng.fill_le(&mut bm, 0.02);
            tensors.push((format!("{key}.lora_A.weight"), vec![RANK, fin], a));
            tensors.push((format!("{key}.lora_B.weight"), vec![fout, RANK], bm));
        }
    }
    let views = tensors
        .iter()
        .map(|(k, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let path = dir.join("adapter_model.safetensors");
    safetensors::tensor::serialize_to_file(views, None, &path)?;
    Ok(fs::metadata(&path)?.len())
}

// ---------------------------------------------------------------------------------------------
// Measuring a child process

#[derive(Clone, Copy, Debug)]
struct Sample {
    wall: f64,
    /// ru_maxrss of the child (wait4), bytes: anonymous memory plus mapped file pages touched.
    max_rss: u64,
    /// Largest RssAnon seen by polling `/proc/<pid>/status` every few ms (heap, not file maps).
    peak_anon: u64,
}

fn proc_status_kb(pid: i32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// fsync every file under `dir` and the folders themselves: `sync` restricted to what the
/// operation wrote (a global sync(2) would also flush other processes' dirty pages).
fn fsync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            fsync_tree(&p)?;
        } else {
            File::open(&p)?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Runs `cmd` (stdout and stderr to `log`), then fsyncs everything under `sync` when given,
/// timing both.
fn measure(cmd: &mut Command, log: &Path, sync: Option<&Path>) -> Result<Sample> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id() as i32;
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let poller = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kb) = proc_status_kb(pid, "RssAnon:") {
                    peak.fetch_max(kb * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let mut status = 0;
    // SAFETY: plain syscalls on our own child; `rusage` is plain data, zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let exited = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = poller.join();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if let Some(dir) = sync {
        fsync_tree(dir)?;
    }
    let wall = if sync.is_some() {
        start.elapsed()
    } else {
        exited
    };
    drop(child); // already reaped by wait4; dropping a Child never waits
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(8).collect();
        bail!(
            "{cmd:?} failed (status {status}):\n  {}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
        );
    }
    Ok(Sample {
        wall: wall.as_secs_f64(),
        max_rss: ru.ru_maxrss as u64 * 1024,
        peak_anon: peak.load(Ordering::Relaxed),
    })
}

struct Row {
    op: String,
    note: String,
    samples: Vec<Sample>,
    error: Option<String>,
}

impl Row {
    fn median_wall(&self) -> Option<f64> {
        let mut w: Vec<f64> = self.samples.iter().map(|s| s.wall).collect();
        if w.is_empty() {
            return None;
        }
        w.sort_by(f64::total_cmp);
        Some(w[w.len() / 2])
    }
    fn max_rss(&self) -> Option<u64> {
        self.samples.iter().map(|s| s.max_rss).max()
    }
    fn peak_anon(&self) -> Option<u64> {
        self.samples.iter().map(|s| s.peak_anon).max()
    }
}

/// Runs one operation `runs` times; `prepare` empties its output folder before each run.
/// Lets the disk finish what earlier runs left (written data, the previous output's
/// deletion) before a timed run starts: a global sync, then a short pause.
fn settle() {
    #[cfg(unix)]
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe {
        libc::sync();
    }
    std::thread::sleep(Duration::from_millis(300));
}

#[allow(clippy::too_many_arguments)]
fn run_op(
    op: &str,
    note: &str,
    warmup: usize,
    runs: usize,
    out_dir: &Path,
    logs: &Path,
    sync: bool,
    make: &dyn Fn(&Path) -> Command,
) -> Row {
    let mut row = Row {
        op: op.into(),
        note: note.into(),
        samples: Vec::new(),
        error: None,
    };
    eprint!("  {op:<28}");
    for r in 0..warmup + runs {
        let attempt = || -> Result<Sample> {
            if out_dir.exists() {
                fs::remove_dir_all(out_dir)?;
            }
            fs::create_dir_all(out_dir)?;
            settle();
            let log = logs.join(format!("{}.{r}.log", op.replace([' ', '/'], "_")));
            measure(&mut make(out_dir), &log, sync.then_some(out_dir))
        };
        match attempt() {
            Ok(s) if r < warmup => eprint!(" (warm-up {:.3}s)", s.wall),
            Ok(s) => {
                eprint!(" {:.3}s", s.wall);
                row.samples.push(s);
            }
            Err(e) => {
                eprint!(" error");
                row.error = Some(format!("{e:#}"));
                break;
            }
        }
    }
    eprintln!();
    row
}

// ---------------------------------------------------------------------------------------------
// Fold phases, in process

/// One `fold` through the library API, phase by phase: wall time, the largest RssAnon seen
/// during the phase (polled) and RssAnon at its end.
fn fold_phases(
    model: &Path,
    adapter: &Path,
    out: &Path,
) -> Result<Vec<(&'static str, f64, u64, u64)>> {
    use onnx_lora::onnx::{SaveOptions, load, save};
    use onnx_lora::rewrite::{FoldOptions, fold};
    let pid = std::process::id() as i32;
    let anon = move || proc_status_kb(pid, "RssAnon:").unwrap_or(0) * 1024;
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(anon()));
    let poller = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(anon(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut rows = Vec::new();
    let mut t = Instant::now();
    let mut mark = |name: &'static str, t: &mut Instant| {
        let now = anon();
        let p = peak.swap(now, Ordering::Relaxed).max(now);
        rows.push((name, t.elapsed().as_secs_f64(), p, now));
        *t = Instant::now();
    };
    let result = (|| -> Result<()> {
        let mut m = load(model)?;
        mark("load model (mmap + decode)", &mut t);
        let a = onnx_lora::adapter::Adapter::load(adapter)?;
        mark("load adapter", &mut t);
        fold(&mut m, &[a], &FoldOptions::default())?;
        mark("fold (merge into the proto)", &mut t);
        save(&m, out, &SaveOptions::default())?;
        mark("save (write + fsync)", &mut t);
        drop(m);
        mark("drop", &mut t);
        Ok(())
    })();
    done.store(true, Ordering::Relaxed);
    let _ = poller.join();
    result?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Environment

fn find_python(modules: &str) -> Option<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("ONNX_LORA_PYTHON") {
        cands.push(p.into());
    }
    cands.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    cands.push("python3".into());
    cands.into_iter().find(|p| {
        Command::new(p)
            .args(["-c", &format!("import {modules}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

/// Reads every file once so all operations start from a warm page cache.
fn warm(paths: &[PathBuf]) -> Result<()> {
    let mut buf = vec![0u8; 8 << 20];
    for p in paths {
        let mut f = File::open(p)?;
        while f.read(&mut buf)? > 0 {}
    }
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB RAM", kb as f64 / 1048576.0))
        .unwrap_or_default();
    format!("{cores} cores, {mem}")
}

/// /proc/loadavg's first three fields: other work on the machine skews every timing.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn du(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let args = Args::parse();
    let runs = args.runs.max(1);
    let dims = args.size.dims();
    let (root, _tmp) = match &args.dir {
        Some(d) => {
            fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("onnx-lora-bench-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let root = root.canonicalize()?;
    let model_dir = root.join("model");
    let gen_adapter_dir = root.join("adapter");
    let out_root = root.join("out");
    let logs = root.join("logs");
    for d in [&model_dir, &out_root, &logs] {
        fs::create_dir_all(d)?;
    }
    let (model, adapter_dir, model_files, model_bytes) = match (&args.model, &args.adapter) {
        (Some(m), Some(a)) => {
            let m = m.canonicalize().with_context(|| m.display().to_string())?;
            let files = files_of(&m)?;
            let bytes = du(&files);
            println!(
                "onnx-lora bench: given model {} ({:.1} MB in {} file(s)), adapter {}",
                m.display(),
                mb(bytes),
                files.len(),
                a.display()
            );
            println!("machine: {}; work folder {}", machine(), root.display());
            println!("load average at start: {}", loadavg());
            (m, a.canonicalize()?, files, bytes)
        }
        _ => {
            let model = model_dir.join("model.onnx");
            println!(
                "onnx-lora bench: {:?} model, hidden {}, {} layers, vocab {}, intermediate {}; LoRA r {RANK}, alpha {ALPHA}",
                args.size, dims.hidden, dims.layers, dims.vocab, dims.inter
            );
            println!("machine: {}; work folder {}", machine(), root.display());
            println!("load average at start: {}", loadavg());
            let t = Instant::now();
            let model_bytes = generate_model(&model_dir, dims)?;
            let adapter_bytes = generate_adapter(&gen_adapter_dir, dims)?;
            println!(
                "generated model {:.1} MB ({} weights) and adapter {:.1} MB ({} modules) in {:.1}s",
                mb(model_bytes),
                dims.layers * 7 + 2,
                mb(adapter_bytes),
                dims.layers * 7,
                t.elapsed().as_secs_f64()
            );
            let files = vec![model.clone(), model_dir.join(DATA_NAME)];
            (model, gen_adapter_dir.clone(), files, model_bytes)
        }
    };

    let exe = std::env::current_exe()?.with_file_name("onnx-lora");
    let have_cli = exe.is_file();
    if !have_cli {
        println!(
            "NOTE: {} is missing: build it with `cargo build --release` (onnx-lora rows skipped)",
            exe.display()
        );
    } else {
        println!("onnx-lora: {}", exe.display());
    }
    let py_fold = if args.no_python {
        None
    } else {
        find_python("onnx, numpy")
    };
    let py_serving = if args.no_python {
        None
    } else {
        find_python("onnx, numpy, onnxruntime")
    };
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");

    warm(&model_files)?;
    println!(
        "page cache: the model files were read once before measuring (caches cannot be dropped here), so every operation starts warm"
    );
    println!(
        "each operation runs {} untimed warm-up time(s), then {runs} timed; before each run the previous output is deleted and the disk settles (sync + 0.3 s); wall = median, including an fsync of every file written (sync restricted to the outputs); peak RSS = largest ru_maxrss (wait4) of the child, which counts touched pages of memory-mapped files; anon = largest RssAnon polled from /proc every 3 ms (heap only)\n",
        args.warmup
    );

    let mut rows: Vec<Row> = Vec::new();
    let o = |name: &str| out_root.join(name);
    {
        let files = model_files.clone();
        rows.push(run_op(
            "cp + sync",
            "cp model.onnx model.onnx.data; fsync",
            args.warmup,
            runs,
            &o("cp"),
            &logs,
            true,
            &|out| {
                let mut c = Command::new("cp");
                c.args(&files).arg(out);
                c
            },
        ));
    }
    let cli = |argv: Vec<OsString>| {
        let exe = exe.clone();
        move |_: &Path| {
            let mut c = Command::new(&exe);
            c.args(&argv);
            c
        }
    };
    let os = |s: &Path| OsString::from(s);
    if have_cli {
        let ops: Vec<(&str, &str, Vec<OsString>, bool)> = vec![
            (
                "fold",
                "fold model.onnx adapter/",
                vec![
                    "fold".into(),
                    os(&model),
                    os(&adapter_dir),
                    "-o".into(),
                    os(&o("fold").join("model.onnx")),
                ],
                true,
            ),
            (
                "inject fresh",
                "inject --rank 16",
                vec![
                    "inject".into(),
                    os(&model),
                    "--rank".into(),
                    RANK.to_string().into(),
                    "-o".into(),
                    os(&o("inject_fresh").join("model.onnx")),
                ],
                true,
            ),
            (
                "inject adapter",
                "inject --adapter adapter/",
                vec![
                    "inject".into(),
                    os(&model),
                    "--adapter".into(),
                    os(&adapter_dir),
                    "-o".into(),
                    os(&o("inject_adapter").join("model.onnx")),
                ],
                true,
            ),
            (
                "inject fused",
                "inject --adapter --fuse-shared",
                vec![
                    "inject".into(),
                    os(&model),
                    "--adapter".into(),
                    os(&adapter_dir),
                    "--fuse-shared".into(),
                    "-o".into(),
                    os(&o("inject_fused").join("model.onnx")),
                ],
                true,
            ),
            (
                "inject weight",
                "inject --adapter --form weight",
                vec![
                    "inject".into(),
                    os(&model),
                    "--adapter".into(),
                    os(&adapter_dir),
                    "--form".into(),
                    "weight".into(),
                    "-o".into(),
                    os(&o("inject_weight").join("model.onnx")),
                ],
                true,
            ),
            (
                "inject serving",
                "inject --as-inputs --adapter --adapter-out",
                vec![
                    "inject".into(),
                    os(&model),
                    "--as-inputs".into(),
                    "--adapter".into(),
                    os(&adapter_dir),
                    "--adapter-out".into(),
                    os(&o("inject_serving").join("model.onnx_adapter")),
                    "-o".into(),
                    os(&o("inject_serving").join("model.onnx")),
                ],
                true,
            ),
            (
                "inject gated",
                "inject --as-inputs --idle-gate --adapter",
                vec![
                    "inject".into(),
                    os(&model),
                    "--as-inputs".into(),
                    "--idle-gate".into(),
                    "--adapter".into(),
                    os(&adapter_dir),
                    "-o".into(),
                    os(&o("inject_gated").join("model.onnx")),
                ],
                true,
            ),
            (
                "inspect",
                "inspect model.onnx (stdout to a file)",
                vec!["inspect".into(), os(&model)],
                false,
            ),
            (
                "convert",
                "convert -o c.onnx --external-data",
                vec![
                    "convert".into(),
                    os(&model),
                    "-o".into(),
                    os(&o("convert").join("model.onnx")),
                    "--external-data".into(),
                ],
                true,
            ),
        ];
        for (op, note, argv, sync) in ops {
            let dir = o(&op.replace(' ', "_"));
            rows.push(run_op(
                op,
                note,
                args.warmup,
                runs,
                &dir,
                &logs,
                sync,
                &cli(argv),
            ));
        }
    }
    match &py_fold {
        Some(py) => {
            let script = scripts.join("fold_reference.py");
            let (py, model, adapter) = (py.clone(), model.clone(), adapter_dir.clone());
            rows.push(run_op(
                "python onnx fold",
                "benches/fold_reference.py",
                args.warmup,
                runs,
                &o("python_fold"),
                &logs,
                true,
                &move |out| {
                    let mut c = Command::new(&py);
                    c.arg(&script)
                        .arg(&model)
                        .arg(&adapter)
                        .arg(out.join("model.onnx"));
                    c
                },
            ));
        }
        None if !args.no_python => println!(
            "NOTE: no Python with onnx and numpy ($ONNX_LORA_PYTHON, .venv/bin/python, python3): the Python onnx reference is skipped"
        ),
        None => {}
    }

    // Table.
    let cp = rows
        .iter()
        .find(|r| r.op == "cp + sync")
        .and_then(Row::median_wall);
    println!(
        "\n{:<18} {:>9} {:>8} {:>10} {:>9} {:>9}  command",
        "op", "wall s", "vs cp", "peak RSS", "RSS/model", "anon MB"
    );
    for r in &rows {
        match (r.median_wall(), &r.error) {
            (Some(w), None) => {
                let rss = r.max_rss().unwrap_or(0);
                println!(
                    "{:<18} {:>9.3} {:>7.2}x {:>7.0} MB {:>8.0}% {:>9.0}  {}",
                    r.op,
                    w,
                    cp.map(|c| w / c).unwrap_or(f64::NAN),
                    mb(rss),
                    100.0 * rss as f64 / model_bytes as f64,
                    mb(r.peak_anon().unwrap_or(0)),
                    r.note
                );
            }
            (_, Some(e)) => println!("{:<18} FAILED: {e}", r.op),
            _ => {}
        }
    }
    println!(
        "model size: {:.1} MB; load average now: {} (other work on this machine skews timings)",
        mb(model_bytes),
        loadavg()
    );

    // Goals.
    let get = |op: &str| rows.iter().find(|r| r.op == op && r.error.is_none());
    let fold = get("fold");
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "n/a ",
    };
    let fold_w = fold.and_then(Row::median_wall);
    let py_w = get("python onnx fold").and_then(Row::median_wall);
    let fold_rss = fold.and_then(Row::max_rss);
    let inspect_w = get("inspect").and_then(Row::median_wall);
    let convert_w = get("convert").and_then(Row::median_wall);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let fold_cp = ratio(fold_w, cp);
    let py_fold = ratio(py_w, fold_w);
    let rss_frac = fold_rss.map(|r| r as f64 / model_bytes as f64);
    let conv_cp = ratio(convert_w, cp);
    let fmt = |v: Option<f64>, suffix: &str| {
        v.map(|v| format!("{v:.2}{suffix}"))
            .unwrap_or_else(|| "-".into())
    };
    println!("\ngoals (performance issue):");
    println!(
        "  [{}] fold <= 1.5x cp                      fold/cp = {}",
        verdict(fold_cp.map(|r| r <= 1.5)),
        fmt(fold_cp, "x")
    );
    println!(
        "  [{}] fold >= 5x faster than Python onnx   python/fold = {}",
        verdict(py_fold.map(|r| r >= 5.0)),
        fmt(py_fold, "x")
    );
    println!(
        "  [{}] fold peak RSS <= 25% of model size   {} (ru_maxrss: heap + touched pages of the mmapped input and output)",
        verdict(rss_frac.map(|r| r <= 0.25)),
        fmt(rss_frac.map(|r| 100.0 * r), "%"),
    );
    let anon_frac = fold
        .and_then(Row::peak_anon)
        .map(|a| a as f64 / model_bytes as f64);
    println!(
        "  [{}]   same, heap only (RssAnon)          {}",
        verdict(anon_frac.map(|r| r <= 0.25)),
        fmt(anon_frac.map(|r| 100.0 * r), "%"),
    );
    println!(
        "  [{}] inspect < 0.5 s                      {}",
        verdict(inspect_w.map(|w| w < 0.5)),
        fmt(inspect_w, " s")
    );
    println!(
        "  [{}] convert ~ cp (<= 1.25x)              convert/cp = {}",
        verdict(conv_cp.map(|r| r <= 1.25)),
        fmt(conv_cp, "x")
    );

    // Where fold's time and memory go.
    if have_cli {
        let dir = o("fold_phases");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        match fold_phases(&model, &adapter_dir, &dir.join("model.onnx")) {
            Ok(phases) => {
                println!(
                    "\nfold phases (library API in this process, 1 run; anon = RssAnon, heap only):"
                );
                println!(
                    "  {:<30} {:>8} {:>14} {:>12}",
                    "phase", "wall s", "peak anon MB", "end anon MB"
                );
                for (name, w, p, e) in phases {
                    println!("  {name:<30} {w:>8.3} {:>14.0} {:>12.0}", mb(p), mb(e));
                }
            }
            Err(e) => println!("\nfold phases: failed: {e:#}"),
        }
        let _ = fs::remove_dir_all(&dir);
    }

    // Serving latency.
    if have_cli && !args.no_python {
        let branches = o("inject_adapter").join("model.onnx");
        let serving = o("inject_serving").join("model.onnx");
        let adapter = o("inject_serving").join("model.onnx_adapter");
        let folded = o("fold").join("model.onnx");
        match &py_serving {
            Some(py) if branches.is_file() && serving.is_file() && adapter.is_file() => {
                println!("\nserving latency (benches/serving_latency.py):");
                let mut c = Command::new(py);
                c.arg(scripts.join("serving_latency.py"))
                    .arg("--base")
                    .arg(&model)
                    .arg("--branches")
                    .arg(&branches)
                    .arg("--serving")
                    .arg(&serving)
                    .arg("--adapter")
                    .arg(&adapter)
                    .arg("--seq")
                    .arg(SEQ.to_string())
                    .arg("--runs")
                    .arg(args.serving_runs.to_string());
                if folded.is_file() {
                    c.arg("--folded").arg(&folded);
                }
                let fused = o("inject_fused").join("model.onnx");
                if fused.is_file() {
                    c.arg("--fused").arg(&fused);
                }
                let weight = o("inject_weight").join("model.onnx");
                if weight.is_file() {
                    c.arg("--weight").arg(&weight);
                }
                let gated = o("inject_gated").join("model.onnx");
                if gated.is_file() {
                    c.arg("--gated").arg(&gated);
                }
                let status = c.status()?;
                if !status.success() {
                    println!("serving_latency.py failed ({status})");
                }
            }
            Some(_) => println!("\nNOTE: serving latency skipped: the inject outputs are missing"),
            None => println!(
                "\nNOTE: no Python with onnx, numpy and onnxruntime: serving latency skipped"
            ),
        }
    }

    let written = du(&[
        o("fold").join("model.onnx"),
        o("fold").join("model.onnx.data"),
    ]);
    if written > 0 {
        println!("\nfold output: {:.1} MB", mb(written));
    }
    if args.keep {
        if let Some(t) = _tmp {
            let kept = t.keep();
            println!("kept {}", kept.display());
        } else {
            println!("kept {}", root.display());
        }
    } else if args.dir.is_some() {
        // A folder the user named: remove what we wrote (never a given model), keep the folder.
        let mut ours = vec![&out_root, &logs];
        if args.model.is_none() {
            ours.extend([&model_dir, &gen_adapter_dir]);
        }
        for d in ours {
            let _ = fs::remove_dir_all(d);
        }
    }
    Ok(())
}
