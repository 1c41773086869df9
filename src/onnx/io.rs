//! Loading and saving models. Loading memory-maps the `.onnx` file and every external data
//! file it names, and decodes zero-copy: `raw_data` and external tensors are `Bytes` slices of
//! those maps, so untouched weights are never copied in memory. Saving is atomic (temp files in
//! the destination folder, registered in [`crate::cleanup`] until renamed, then rename) and
//! streams tensor bytes straight from the maps into one page-aligned external data file when
//! the layout asks for it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::DataType;
use super::pb::{ModelProto, StringStringEntryProto, TensorProto, tensor_proto::DataLocation};
use super::pb_ext::{for_each_tensor_mut, is_external, numel};
use crate::error::{Error, Result};

/// Largest protobuf message the C++ and Python readers accept.
pub const PROTOBUF_LIMIT: u64 = (1u64 << 31) - 1;
/// Alignment of tensors in external data files we write (a page, so readers can mmap).
pub const EXTERNAL_ALIGN: u64 = 4096;
/// Tensors smaller than this stay inline when writing external data.
pub const DEFAULT_THRESHOLD: usize = 1024;

/// A model and the memory maps its tensors point into.
#[derive(Clone)]
pub struct LoadedModel {
    /// The `.onnx` file it came from (for messages and for runtimes that take a path).
    pub path: PathBuf,
    pub proto: ModelProto,
    /// Whole external data files by `location`, as validated at load time.
    external: HashMap<String, Bytes>,
    /// The model file's own bytes (the map inline tensors point into).
    source: Bytes,
    /// The open files behind `source` and `external` (the very inodes mapped, for copies
    /// made file to file even if a path is replaced meanwhile).
    source_file: Option<Arc<File>>,
    external_files: HashMap<String, Arc<File>>,
    /// Tensors a rewrite will compute when the model is written, by pending key.
    pending: HashMap<String, Arc<dyn LazyTensor>>,
    /// How far the file's size is from the size of what was decoded from it: fields this
    /// schema does not define (a newer ONNX), which a rewrite cannot keep, or another encoding
    /// of known ones. 0 for a model written by onnx / torch / onnxruntime.
    pub unread_bytes: u64,
}

/// A tensor value computed on demand: rewrites of many large weights register one per weight,
/// and saving computes each just before writing it, so they are never all in memory at once.
pub trait LazyTensor: Send + Sync {
    /// The tensor's bytes in the `raw_data` layout (`model` is the one being written, e.g. to
    /// `release` the inputs once read).
    fn compute(&self, model: &LoadedModel) -> Result<Bytes>;
}

/// Registers values computed when the model is written (see `LoadedModel::split_mut`).
pub struct PendingValues<'a> {
    map: &'a mut HashMap<String, Arc<dyn LazyTensor>>,
}

impl PendingValues<'_> {
    /// Points `t` at `value`, which saving computes just before writing it.
    pub fn set(&mut self, t: &mut TensorProto, value: Arc<dyn LazyTensor>) {
        let key = format!("{PENDING_PREFIX}{}", self.map.len());
        self.map.insert(key.clone(), value);
        t.raw_data = None;
        clear_typed_fields(t);
        t.external_data = vec![StringStringEntryProto {
            key: Some("location".into()),
            value: Some(key),
        }];
        t.data_location = Some(DataLocation::External as i32);
    }
}

/// Location prefix marking a pending tensor in memory; never written to a file (`check_location`
/// refuses it when reading one).
const PENDING_PREFIX: &str = "*onnx-lora-pending*/";

/// The pending key of a tensor whose value a `LazyTensor` will compute.
fn pending_key(t: &TensorProto) -> Option<&str> {
    if !is_external(t) {
        return None;
    }
    t.external_data
        .iter()
        .find(|e| e.key() == "location")
        .map(|e| e.value())
        .filter(|l| l.starts_with(PENDING_PREFIX))
}

/// Checks that an inline tensor holds as many values as its shape says (what onnxruntime
/// checks when it loads the model), so that no reader indexes past its data.
fn check_inline_len(t: &TensorProto) -> std::result::Result<(), String> {
    check_no_segment(t)?;
    let n = super::pb_ext::checked_numel(&t.dims)?;
    let dtype = DataType::from_i32(t.data_type());
    let typed = match dtype {
        DataType::Float => Some(t.float_data.len()),
        DataType::Double => Some(t.double_data.len()),
        DataType::Int64 => Some(t.int64_data.len()),
        DataType::Uint32 | DataType::Uint64 => Some(t.uint64_data.len()),
        DataType::String => Some(t.string_data.len()),
        DataType::Int32
        | DataType::Int16
        | DataType::Int8
        | DataType::Uint16
        | DataType::Uint8
        | DataType::Bool
        | DataType::Float16
        | DataType::Bfloat16 => Some(t.int32_data.len()),
        _ => None,
    };
    let raw = t.raw_data.as_ref().map_or(0, |r| r.len());
    // Set, raw_data is the data (onnxruntime reads it, even empty, before any typed field).
    if t.raw_data.is_some() {
        if let Some(expected) = dtype.raw_len(n)
            && raw != expected
        {
            return Err(format!(
                "holds {raw} bytes of raw data but a {dtype} tensor of shape {:?} needs {expected}",
                t.dims
            ));
        }
    } else if let Some(count) = typed
        && count != n
    {
        return Err(format!(
            "holds {count} values but its shape {:?} needs {n}",
            t.dims
        ));
    }
    Ok(())
}

/// Refuses a tensor stored in segments (`TensorProto.segment`, one part of a tensor split over
/// several protos): nothing writes them, and its data is not its shape's.
fn check_no_segment(t: &TensorProto) -> std::result::Result<(), String> {
    match t.segment {
        Some(_) => {
            Err("is stored in segments (TensorProto.segment), which onnx-lora does not read".into())
        }
        None => Ok(()),
    }
}

/// Bytes a tensor's data takes, from its dims and type (None for strings and unknown types).
fn expected_len(t: &TensorProto) -> Option<usize> {
    DataType::from_i32(t.data_type()).raw_len(numel(&t.dims))
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("path", &self.path)
            .field("external_files", &self.external.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Memory-maps a file as `Bytes` (empty files give an empty buffer: mmap refuses length 0).
pub fn map_file(path: &Path) -> Result<Bytes> {
    map_file_open(path).map(|(bytes, _)| bytes)
}

/// Opens a file the run reads, refusing anything but a regular file (through links) before
/// opening it: a folder, and a FIFO, device or socket, whose open or read may block or never
/// end (`/dev/zero`).
pub fn open_input(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::Usage(format!(
            "{}: is a folder, not a file",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(Error::Usage(format!(
            "{}: is {}, not a regular file",
            path.display(),
            special_kind(&meta)
        )));
    }
    File::open(path).map_err(|e| Error::io(path, e))
}

/// What a file that is neither a folder nor a regular file is, for messages.
fn special_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    let _ = meta;
    "a special file"
}

/// Reads a whole (small) input file, as [`open_input`] opens it.
pub fn read_input(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    open_input(path)?
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

/// `map_file`, also keeping the open file.
fn map_file_open(path: &Path) -> Result<(Bytes, Arc<File>)> {
    let file = open_input(path)?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let len = meta.len();
    if len == 0 {
        return Ok((Bytes::new(), Arc::new(file)));
    }
    // SAFETY: the map is read-only; like every mmap-based reader we rely on the file not being
    // truncated while it is open (onnx-lora never writes its inputs: outputs are new files).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| {
        // (an address-space limit, or a file larger than the address space)
        let why = format!("cannot map its {len} bytes into memory: {e}");
        Error::io(path, std::io::Error::new(e.kind(), why))
    })?;
    Ok((Bytes::from_owner(map), Arc::new(file)))
}

/// Loads a model: mmap, zero-copy decode, and validation of every external data reference.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedModel> {
    let path = path.as_ref();
    let _doing = crate::cleanup::doing(format!("reading {}", path.display()));
    let (buf, file) = map_file_open(path)?;
    let mut model = LoadedModel::from_bytes(path, buf)?;
    model.source_file = Some(file);
    Ok(model)
}

/// Where a slice of a model's maps lies on disk: the open file it was mapped from.
pub struct FileSpan {
    pub path: PathBuf,
    pub file: Arc<File>,
    pub offset: u64,
}

impl LoadedModel {
    /// Decodes a model from bytes; external data is resolved relative to `path`'s folder.
    pub fn from_bytes(path: &Path, buf: Bytes) -> Result<Self> {
        let proto = ModelProto::decode(buf.clone()).map_err(|err| Error::Decode {
            path: path.to_path_buf(),
            err,
        })?;
        let mut model = Self::from_proto(path, proto)?;
        model.unread_bytes = (buf.len() as u64).abs_diff(model.proto.encoded_len() as u64);
        model.source = buf;
        Ok(model)
    }

    /// Wraps a proto already in memory; external data is resolved relative to `path`'s folder.
    pub fn from_proto(path: &Path, mut proto: ModelProto) -> Result<Self> {
        if proto.graph.is_none() {
            return Err(Error::InvalidModel {
                path: path.to_path_buf(),
                reason: "not an ONNX model: it has no graph".into(),
            });
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut external: HashMap<String, Bytes> = HashMap::new();
        let mut external_files: HashMap<String, Arc<File>> = HashMap::new();
        for_each_tensor_mut(&mut proto, &mut |t: &mut TensorProto| -> Result<()> {
            if !is_external(t) {
                return check_inline_len(t).map_err(|reason| Error::InvalidModel {
                    path: path.to_path_buf(),
                    reason: format!("tensor '{}': {reason}", t.name()),
                });
            }
            let r = ExternalRef::parse(t).map_err(|reason| external_err(path, t, reason))?;
            if !external.contains_key(&r.location) {
                let file = dir.join(&r.location);
                check_contained(path, &dir, &file)
                    .map_err(|reason| external_err(path, t, reason))?;
                let (data, opened) = map_file_open(&file).map_err(|e| match e {
                    Error::Io { err: source, .. } => external_err(
                        path,
                        t,
                        format!("cannot open '{}': {source}", file.display()),
                    ),
                    // (a folder or special file: its message names only the file)
                    other => external_err(path, t, other.to_string()),
                })?;
                external.insert(r.location.clone(), data);
                external_files.insert(r.location.clone(), opened);
            }
            let file_len = external[&r.location].len() as u64;
            r.range(t, file_len)
                .map_err(|reason| external_err(path, t, reason))?;
            Ok(())
        })?;
        Ok(LoadedModel {
            path: path.to_path_buf(),
            proto,
            external,
            source: Bytes::new(),
            source_file: None,
            external_files,
            pending: HashMap::new(),
            unread_bytes: 0,
        })
    }

    /// Lets the kernel drop the pages behind `bytes` from this process's memory once they have
    /// been used, when they are a slice of one of the model's maps (they stay in the page cache
    /// and fault back in if read again). Streaming a model through keeps its RSS small this way.
    /// Anything else (heap buffers) is left alone.
    pub fn release(&self, bytes: &Bytes) {
        #[cfg(unix)]
        {
            let p = bytes.as_ptr() as usize;
            let end = p + bytes.len();
            let page = 4096;
            let inside = |m: &Bytes| {
                let start = m.as_ptr() as usize;
                !m.is_empty() && p >= start && end <= start + m.len()
            };
            if bytes.len() >= page && (inside(&self.source) || self.external.values().any(inside)) {
                // Whole pages inside the slice only: neighbours' pages stay.
                let first = p.div_ceil(page) * page;
                let last = end / page * page;
                if last > first {
                    // SAFETY: the range lies inside a read-only file mapping this model owns;
                    // MADV_DONTNEED on such a mapping only drops resident pages, which are
                    // read back from the file on the next access, so no data changes.
                    unsafe {
                        libc::madvise(
                            first as *mut libc::c_void,
                            last - first,
                            libc::MADV_DONTNEED,
                        );
                    }
                }
            }
        }
        #[cfg(not(unix))]
        let _ = bytes;
    }

    /// The open file and byte offset `bytes` were read from, when they are a slice of one of
    /// the model's maps (the `.onnx` file or an external data file), so that they can be
    /// copied file to file without passing through this process.
    pub fn file_span(&self, bytes: &Bytes) -> Option<FileSpan> {
        let p = bytes.as_ptr() as usize;
        let end = p + bytes.len();
        let offset_in = |m: &Bytes| {
            let start = m.as_ptr() as usize;
            (!m.is_empty() && p >= start && end <= start + m.len()).then(|| (p - start) as u64)
        };
        if let (Some(offset), Some(file)) = (offset_in(&self.source), &self.source_file) {
            return Some(FileSpan {
                path: self.path.clone(),
                file: file.clone(),
                offset,
            });
        }
        self.external.iter().find_map(|(loc, m)| {
            Some(FileSpan {
                offset: offset_in(m)?,
                file: self.external_files.get(loc)?.clone(),
                path: self.dir().join(loc),
            })
        })
    }

    /// Folder the model's external data is resolved against.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Whether any tensor of the model lives in an external file.
    pub fn has_external_data(&self) -> bool {
        !self.external.is_empty()
    }

    /// The proto and the registry of pending values, borrowed apart so that a tensor inside
    /// the proto can be pointed at a value computed when the model is written.
    pub fn split_mut(&mut self) -> (&mut ModelProto, PendingValues<'_>) {
        (
            &mut self.proto,
            PendingValues {
                map: &mut self.pending,
            },
        )
    }

    /// Computes every pending value the model still references, in the order writing it would,
    /// one tensor at a time, and drops each: a dry run's check, refusing what writing would
    /// refuse (non-finite results, values beyond a narrow type's range). Values a rewrite
    /// measures while computing (a fold's largest change) are set by it.
    pub fn compute_pending(&self) -> Result<()> {
        let mut proto = self.proto.clone();
        for_each_tensor_mut(&mut proto, &mut |t: &mut TensorProto| -> Result<()> {
            if pending_key(t).is_some() {
                self.tensor_bytes(t)?;
            }
            Ok(())
        })
    }

    /// The tensor's data as little-endian bytes in the `raw_data` layout: a zero-copy slice for
    /// `raw_data` and external tensors, an encoding of the typed fields otherwise, and for a
    /// pending tensor the value its `LazyTensor` computes (now).
    pub fn tensor_bytes(&self, t: &TensorProto) -> Result<Bytes> {
        if let Some(key) = pending_key(t) {
            let lazy = self
                .pending
                .get(key)
                .ok_or_else(|| Error::tensor(t.name(), "pending value was not registered"))?;
            return lazy.compute(self);
        }
        if is_external(t) {
            let r = ExternalRef::parse(t).map_err(|reason| external_err(&self.path, t, reason))?;
            let data = self.external.get(&r.location).ok_or_else(|| {
                external_err(&self.path, t, format!("'{}' was not loaded", r.location))
            })?;
            let range = r
                .range(t, data.len() as u64)
                .map_err(|reason| external_err(&self.path, t, reason))?;
            return Ok(data.slice(range));
        }
        if let Some(raw) = &t.raw_data {
            return Ok(raw.clone());
        }
        typed_fields_to_raw(t).map(Bytes::from)
    }
}

fn external_err(path: &Path, t: &TensorProto, reason: String) -> Error {
    Error::ExternalData {
        path: path.to_path_buf(),
        tensor: t.name().to_string(),
        reason,
    }
}

/// A validated `external_data` reference.
struct ExternalRef {
    location: String,
    offset: u64,
    length: Option<u64>,
}

impl ExternalRef {
    fn parse(t: &TensorProto) -> std::result::Result<Self, String> {
        let mut location = None;
        let mut offset = 0;
        let mut length = None;
        for e in &t.external_data {
            match e.key() {
                "location" => location = Some(e.value().to_string()),
                "offset" => {
                    offset = e
                        .value()
                        .parse()
                        .map_err(|_| format!("offset '{}' is not a number", e.value()))?
                }
                "length" => {
                    length = Some(
                        e.value()
                            .parse()
                            .map_err(|_| format!("length '{}' is not a number", e.value()))?,
                    )
                }
                _ => {}
            }
        }
        let location = location.ok_or("no 'location' key")?;
        check_location(&location)?;
        Ok(ExternalRef {
            location,
            offset,
            length,
        })
    }

    /// The byte range in a file of `file_len` bytes, checked against the file and the tensor.
    /// Without a `length` key the tensor is the bytes its type and shape need from `offset`,
    /// as onnxruntime reads it (the file may go on: other tensors, or padding).
    fn range(
        &self,
        t: &TensorProto,
        file_len: u64,
    ) -> std::result::Result<std::ops::Range<usize>, String> {
        check_no_segment(t)?;
        let n = super::pb_ext::checked_numel(&t.dims)?;
        let dtype = DataType::from_i32(t.data_type());
        // (as onnxruntime: strings are stored inline, and bytes of no known type have no size)
        let Some(expected) = dtype.raw_len(n) else {
            return Err(format!(
                "a {dtype} tensor cannot be stored as external data (strings are stored inline, and other types need a known element size)"
            ));
        };
        let end = self
            .offset
            .checked_add(self.length.unwrap_or(expected as u64))
            .ok_or("offset + length overflows")?;
        if self.offset > file_len || end > file_len {
            return Err(format!(
                "bytes {}..{} are outside '{}' ({} bytes)",
                self.offset, end, self.location, file_len
            ));
        }
        if (end - self.offset) as usize != expected {
            return Err(format!(
                "holds {} bytes but a {} tensor of shape {:?} needs {}",
                end - self.offset,
                dtype,
                t.dims,
                expected
            ));
        }
        Ok(self.offset as usize..end as usize)
    }
}

/// Where a data file's links lead, as onnxruntime (1.24 and later) checks: inside the model's
/// folder, or beside the file that the model's own path links to (the Hugging Face cache links
/// a snapshot's model and data files to `blobs/`). A link leading anywhere else would make a run
/// copy whatever file it names into its output. A file that does not resolve is left to the
/// open, which says so.
fn check_contained(model: &Path, dir: &Path, file: &Path) -> std::result::Result<(), String> {
    let Ok(real) = std::fs::canonicalize(file) else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let inside = |d: &Path| std::fs::canonicalize(d).is_ok_and(|d| real.starts_with(d));
    let beside_real_model = || {
        std::fs::canonicalize(model)
            .ok()
            .and_then(|m| m.parent().map(Path::to_path_buf))
            .is_some_and(|d| real.starts_with(d))
    };
    if inside(dir) || beside_real_model() {
        return Ok(());
    }
    Err(format!(
        "'{}' links to {}, outside the model's folder (and not beside the file the model's path links to); onnxruntime refuses such a link too",
        file.display(),
        real.display()
    ))
}

/// A location must stay inside the model's folder: relative, no `..`, no in-memory pointers.
pub fn check_location(location: &str) -> std::result::Result<(), String> {
    if location.is_empty() {
        return Err("empty location".into());
    }
    if location.contains("_ORT_MEM_ADDR_") || location.starts_with(PENDING_PREFIX) {
        return Err(format!(
            "location '{location}' is an in-memory address, not a file"
        ));
    }
    let p = Path::new(location);
    if p.is_absolute() || location.starts_with('/') || location.starts_with('\\') {
        return Err(format!(
            "location '{location}' is absolute; it must be relative to the model's folder"
        ));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
        || location.split(['/', '\\']).any(|c| c == "..")
    {
        return Err(format!(
            "location '{location}' leaves the model's folder ('..')"
        ));
    }
    Ok(())
}

/// Empties the typed data fields (`float_data`, `int32_data`, ...).
fn clear_typed_fields(t: &mut TensorProto) {
    t.float_data.clear();
    t.int32_data.clear();
    t.int64_data.clear();
    t.double_data.clear();
    t.uint64_data.clear();
}

/// Encodes the typed data fields (`float_data`, `int32_data`, ...) in the `raw_data` layout.
fn typed_fields_to_raw(t: &TensorProto) -> Result<Vec<u8>> {
    let dtype = DataType::from_i32(t.data_type());
    let n = numel(&t.dims);
    let mut out = Vec::with_capacity(dtype.raw_len(n).unwrap_or(0));
    match dtype {
        DataType::Float | DataType::Complex64 => {
            t.float_data
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        DataType::Double | DataType::Complex128 => {
            t.double_data
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        DataType::Int64 => t
            .int64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DataType::Uint64 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DataType::Uint32 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as u32).to_le_bytes())),
        DataType::Int32 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DataType::Int16 | DataType::Uint16 | DataType::Float16 | DataType::Bfloat16 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as u16).to_le_bytes())),
        DataType::Int8 | DataType::Uint8 | DataType::Bool | DataType::Float8(_) => {
            t.int32_data.iter().for_each(|v| out.push(*v as u8))
        }
        other => {
            return Err(Error::tensor(
                t.name(),
                format!("reading {other} data from typed fields is not supported"),
            ));
        }
    }
    Ok(out)
}

/// Where tensor data goes when a model is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorLayout {
    /// External data if the source had any or the protobuf would pass 2 GiB; inline otherwise.
    Auto,
    /// Everything inline (an error if that passes the 2 GiB protobuf limit).
    Inline,
    /// Initializers of at least `threshold` bytes go to one external file (default name
    /// `<output file name>.data`).
    External { name: Option<String> },
}

#[derive(Clone, Debug)]
pub struct SaveOptions {
    pub layout: TensorLayout,
    pub threshold: usize,
    /// fsync the files before renaming them into place.
    pub sync: bool,
    /// Told (bytes written, bytes to write) as external data is written.
    pub progress: Option<Progress>,
    /// Largest protobuf to write; `Auto` goes external above it (default: 2 GiB - 1, what the
    /// C++ and Python readers accept).
    pub protobuf_limit: u64,
    /// Other input files of the run (adapters), never to be overwritten; the model's own files
    /// are always protected.
    pub protect: Vec<PathBuf>,
    /// Told when the save waits for another process's lock on the output folder (a run putting
    /// the same output in place).
    pub notice: Option<Notice>,
}

/// A message for the user, from a save that has to wait (the CLI prints it on stderr).
#[derive(Clone)]
pub struct Notice(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notice")
    }
}

/// A progress callback: (done, total) in bytes.
#[derive(Clone)]
pub struct Progress(pub Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            layout: TensorLayout::Auto,
            threshold: DEFAULT_THRESHOLD,
            sync: true,
            progress: None,
            protobuf_limit: PROTOBUF_LIMIT,
            protect: Vec::new(),
            notice: None,
        }
    }
}

/// What `save` wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SaveReport {
    pub model: PathBuf,
    pub model_bytes: u64,
    pub external_data: Option<PathBuf>,
    pub external_bytes: u64,
    pub external_tensors: usize,
    /// `<output>.data` beside the output, left from an earlier write, which this output does
    /// not use (it is inline, or its data went elsewhere). Not removed: this run did not write it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_data: Option<PathBuf>,
}

impl SaveReport {
    /// The files written: the model and, if any, its external data file.
    pub fn files(&self) -> Vec<PathBuf> {
        std::iter::once(self.model.clone())
            .chain(self.external_data.clone())
            .collect()
    }
}

/// Writes `model` to `out` atomically with the requested tensor layout. Nothing is left at
/// `out` (or its data file) when this fails.
pub fn save(model: &LoadedModel, out: &Path, opts: &SaveOptions) -> Result<SaveReport> {
    save_impl(model, out, opts, false).map(|(report, _)| report)
}

/// Output files in place but not yet accepted (written by [`save_provisional`]): while this is
/// held, an interrupt removes them as it removes temps; dropped, they stay where they are.
#[must_use = "the output files are accepted when this is dropped"]
#[derive(Default)]
pub struct Provisional(#[allow(dead_code)] Vec<crate::cleanup::Guard>);

impl Provisional {
    /// Whether `path`, one of the files held, still holds what this run put there (another run
    /// writing the same output may have replaced it since); true for a path not held.
    pub fn still_ours(&self, path: &Path) -> bool {
        self.0
            .iter()
            .find(|g| g.path().as_deref() == Some(path))
            .is_none_or(crate::cleanup::Guard::still_ours)
    }

    /// Holds one more file this run put in place, registered when it was put there (by
    /// [`crate::cleanup::Tracked::stage`], e.g. an adapter written beside the model).
    pub fn hold(&mut self, guard: crate::cleanup::Guard) {
        self.0.push(guard);
    }
}

/// `save`, with the written files kept registered (see [`Provisional`]) from the moment they
/// are in place, for a check that runs on them before they count as a result.
pub fn save_provisional(
    model: &LoadedModel,
    out: &Path,
    opts: &SaveOptions,
) -> Result<(SaveReport, Provisional)> {
    save_impl(model, out, opts, true).map(|(report, held)| (report, Provisional(held)))
}

fn save_impl(
    model: &LoadedModel,
    out: &Path,
    opts: &SaveOptions,
    provisional: bool,
) -> Result<(SaveReport, Vec<crate::cleanup::Guard>)> {
    let _doing = crate::cleanup::doing(format!("writing {}", out.display()));
    let out_dir = output_dir(out)?;
    let file_name = out
        .file_name()
        .ok_or_else(|| Error::Usage(format!("'{}' is not a file path", out.display())))?
        .to_string_lossy()
        .to_string();

    let mut proto = model.proto.clone();
    let external_name = match &opts.layout {
        TensorLayout::Inline => None,
        TensorLayout::External { name } => Some(name.clone()),
        TensorLayout::Auto => {
            let needs = model.has_external_data()
                || inline_size_estimate(model, &proto)? > opts.protobuf_limit;
            needs.then_some(None)
        }
    }
    .map(|name| name.unwrap_or_else(|| format!("{file_name}.data")));
    if let Some(name) = &external_name {
        check_location(name).map_err(|e| {
            Error::Usage(format!(
                "{}: external data name refused: {e}; give a plain file name, written beside the output",
                out.display()
            ))
        })?;
        if name.contains(['/', '\\']) {
            return Err(Error::Usage(format!(
                "external data name '{name}' must be a plain file name beside the output"
            )));
        }
    }
    let data_path = external_name.as_ref().map(|name| out_dir.join(name));
    let mut inputs = model.files();
    inputs.extend(opts.protect.iter().cloned());
    let mut outputs = vec![out];
    outputs.extend(data_path.as_deref());
    check_outputs(&outputs, &inputs)?;

    let mut report = SaveReport {
        model: out.to_path_buf(),
        ..Default::default()
    };
    let mut data_tmp = None;
    // Everything inline first (zero-copy slices of the maps; pending values stay pending when
    // they may go external), then the large initializers out, computing pending ones there.
    inline_everything(model, &mut proto, external_name.is_some())?;
    match &external_name {
        None => {}
        Some(name) => {
            let tmp =
                crate::cleanup::temp_file_in(&out_dir, ".data.tmp", &out.with_file_name(name))
                    .map_err(|e| Error::io(&out_dir, e))?;
            let (bytes, count) = write_external(
                model,
                &mut proto,
                name,
                &out.with_file_name(name),
                opts.threshold,
                tmp.as_file(),
                opts.progress.as_ref(),
                opts.sync,
            )?;
            // Pending values that did not go external (small, or not initializers) come inline.
            materialize_pending(model, &mut proto)?;
            // (errors name the file being written, not its temp name)
            if opts.sync {
                tmp.as_file()
                    .sync_data()
                    .map_err(|e| Error::io(out.with_file_name(name), e))?;
            }
            if count > 0 {
                // (named beside `out` as the user wrote it: `out.onnx.data`, not `./out.onnx.data`)
                report.external_data = Some(out.with_file_name(name));
                report.external_bytes = bytes;
                report.external_tensors = count;
                data_tmp = Some(tmp);
            }
        }
    }

    let encoded_len = proto.encoded_len() as u64;
    if encoded_len > opts.protobuf_limit {
        return Err(Error::Usage(format!(
            "{}: the model would be {encoded_len} bytes, over the protobuf limit of {} bytes; write its weights as external data (--external-data)",
            out.display(),
            opts.protobuf_limit
        )));
    }
    let mut tmp = crate::cleanup::temp_file_in(&out_dir, ".onnx.tmp", out)
        .map_err(|e| Error::io(&out_dir, e))?;
    let mut buf = Vec::with_capacity(encoded_len as usize);
    proto
        .encode(&mut buf)
        .map_err(|e| Error::Usage(format!("{}: encoding failed: {e}", out.display())))?;
    tmp.as_file_mut()
        .write_all(&buf)
        .map_err(|e| Error::io(out, e))?;
    if opts.sync {
        tmp.as_file().sync_data().map_err(|e| Error::io(out, e))?;
    }
    report.model_bytes = encoded_len;
    let sidecar = out.with_file_name(format!("{file_name}.data"));
    if report.external_data.as_ref() != Some(&sidecar) && sidecar.symlink_metadata().is_ok() {
        report.stale_data = Some(sidecar);
    }
    make_readable(tmp.as_file(), out)?;
    // (two runs writing one output with external data put their pairs in place one after the
    // other: never one's model beside the other's data)
    let _placing = data_tmp
        .as_ref()
        .and_then(|_| placing_lock(&out_dir, opts.notice.as_ref()));
    if let (Some(_), Some(dest)) = (&data_tmp, &report.external_data)
        && dest.symlink_metadata().is_ok()
        && out.symlink_metadata().is_ok()
    {
        // An earlier model at `out` may read the data file about to be replaced: it goes
        // first, so that no moment (a SIGKILL between the two renames) leaves it beside data it
        // does not describe. Until the new model is in place, the output is missing instead.
        std::fs::remove_file(out).map_err(|e| Error::io(out, e))?;
    }
    // The data file is in place first so the model never points at a missing one; until the
    // model follows, the data file stays registered as a temp (an interrupt removes it), and if
    // the model cannot follow, the data file goes too.
    let mut staged = Vec::new();
    if let (Some(data), Some(dest)) = (data_tmp, &report.external_data) {
        make_readable(data.as_file(), dest)?;
        staged.push(data.stage(dest, |t| t.persist(dest).map_err(|e| Error::io(dest, e)))?);
    }
    let persist = |t: crate::cleanup::TempFile| {
        t.persist(out).map_err(|e| {
            if let Some(dest) = &report.external_data {
                let _ = std::fs::remove_file(dest);
            }
            Error::io(out, e)
        })
    };
    if provisional {
        staged.push(tmp.stage(out, persist)?);
        return Ok((report, staged));
    }
    tmp.commit(staged, persist)?;
    Ok((report, Vec::new()))
}

/// An exclusive advisory lock (`flock`) on the output folder, held while a model and its
/// external data file are put in place (released when dropped); None where it cannot be taken
/// (the placing then goes on without it).
/// `notice` is told when the lock is held elsewhere and the save waits for it.
#[cfg(unix)]
fn placing_lock(dir: &Path, notice: Option<&Notice>) -> Option<File> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).ok()?;
    // SAFETY: a descriptor `f` owns, open for the whole call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Some(f);
    }
    // (another run holds it for the moments its renames take, or a process holds it for good)
    if let Some(n) = notice {
        (n.0)(&format!(
            "waiting for another process's lock on {} (another onnx-lora run putting its output in place)",
            dir.display()
        ));
    }
    // SAFETY: as above.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    (rc == 0).then_some(f)
}

#[cfg(not(unix))]
fn placing_lock(_dir: &Path, _notice: Option<&Notice>) -> Option<File> {
    None
}

/// Temp files are created private (0600); the output gets the usual 0644.
pub(crate) fn make_readable(file: &File, dest: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(dest, e))?;
    }
    #[cfg(not(unix))]
    let _ = (file, dest);
    Ok(())
}

impl LoadedModel {
    /// The files this model was read from: the `.onnx` and its external data files.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        files.extend(self.external.keys().map(|loc| self.dir().join(loc)));
        files
    }
}

/// The folder an output file goes to (where its temp file is made), which must exist.
pub(crate) fn output_dir(out: &Path) -> Result<PathBuf> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is not a folder"
        } else {
            "does not exist"
        };
        return Err(Error::Usage(format!(
            "{}: the folder {} {what}",
            out.display(),
            dir.display()
        )));
    }
    Ok(dir)
}

/// Refuses a write that would replace one of the run's `inputs` (inputs are never modified),
/// put two `outputs` in one file, or write over a folder. Checked before anything is written.
pub fn check_outputs(outputs: &[&Path], inputs: &[PathBuf]) -> Result<()> {
    for (i, out) in outputs.iter().enumerate() {
        if let Ok(meta) = std::fs::metadata(out) {
            if meta.is_dir() {
                return Err(Error::Usage(format!(
                    "{}: is a folder; the output must be a file path",
                    out.display()
                )));
            }
            // The output is renamed onto its path when complete: that would replace a device
            // (`/dev/null`), FIFO or socket rather than write to it.
            if !meta.is_file() {
                return Err(Error::Usage(format!(
                    "{}: is {}; onnx-lora writes its output to a temp file and renames it onto the path, which would replace it: give a regular file path",
                    out.display(),
                    special_kind(&meta)
                )));
            }
            if let Some(input) = inputs.iter().find(|p| same_file(&meta, p)) {
                return Err(Error::Usage(format!(
                    "{}: the output would overwrite the input {}; choose another output path",
                    out.display(),
                    input.display()
                )));
            }
        }
        if let Some(other) = outputs[..i].iter().find(|o| same_path(o, out)) {
            return Err(Error::Usage(format!(
                "{}: two outputs of this run would be written to one file ({})",
                out.display(),
                other.display()
            )));
        }
    }
    Ok(())
}

/// Whether `path` names the file whose metadata is `meta` (the same inode, through any link).
fn same_file(meta: &std::fs::Metadata, path: &Path) -> bool {
    let Ok(other) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.dev() == other.dev() && meta.ino() == other.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (meta, other);
        false
    }
}

/// Whether two output paths (which may not exist yet) name one file.
fn same_path(a: &Path, b: &Path) -> bool {
    let resolve = |p: &Path| {
        let dir = output_dir(p).ok()?.canonicalize().ok()?;
        Some(dir.join(p.file_name()?))
    };
    match (resolve(a), resolve(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// Size of the protobuf if every tensor were inline.
fn inline_size_estimate(model: &LoadedModel, proto: &ModelProto) -> Result<u64> {
    let mut extra = 0u64;
    let mut proto = proto.clone();
    for_each_tensor_mut(&mut proto, &mut |t: &mut TensorProto| -> Result<()> {
        if is_external(t) {
            let len = match expected_len(t) {
                Some(n) => n,
                None => model.tensor_bytes(t)?.len(),
            };
            extra += len as u64 + 16;
        }
        Ok(())
    })?;
    Ok(proto.encoded_len() as u64 + extra)
}

/// Computes the pending values still in the proto into `raw_data`.
fn materialize_pending(model: &LoadedModel, proto: &mut ModelProto) -> Result<()> {
    for_each_tensor_mut(proto, &mut |t: &mut TensorProto| -> Result<()> {
        if pending_key(t).is_some() {
            t.raw_data = Some(model.tensor_bytes(t)?);
            t.external_data.clear();
            t.data_location = None;
        }
        Ok(())
    })
}

/// Moves every external tensor's bytes into `raw_data` (zero-copy slices of the maps); pending
/// values are computed too unless `keep_pending`.
fn inline_everything(
    model: &LoadedModel,
    proto: &mut ModelProto,
    keep_pending: bool,
) -> Result<()> {
    for_each_tensor_mut(proto, &mut |t: &mut TensorProto| -> Result<()> {
        if keep_pending && pending_key(t).is_some() {
            return Ok(());
        }
        if is_external(t) {
            let bytes = model.tensor_bytes(t)?;
            t.raw_data = Some(bytes);
            t.external_data.clear();
            t.data_location = None;
        }
        Ok(())
    })
}

/// Streams every initializer of at least `threshold` bytes into `file` at 4096-aligned offsets
/// and points the tensors there. Expects every tensor inline or pending (see
/// `inline_everything`). Pending values are computed on a second thread one tensor ahead of
/// the writer (a channel of one), so merging overlaps writing while at most two computed
/// tensors exist at a time. With `sync`, the disk starts writing what is done every few MB
/// (`Writeback`), so the final fsync finds little left and disk time overlaps the merging.
#[allow(clippy::too_many_arguments)]
fn write_external(
    model: &LoadedModel,
    proto: &mut ModelProto,
    location: &str,
    // (the data file as it will be, beside the output: what errors name)
    shown: &Path,
    threshold: usize,
    file: &File,
    progress: Option<&Progress>,
    sync: bool,
) -> Result<(u64, usize)> {
    // Small integer tensors (shapes, axes, indices) stay inline whatever the threshold:
    // onnxruntime's shape inference reads their values and cannot from external data.
    let goes_out = |t: &TensorProto| {
        expected_len(t).is_some_and(|n| {
            n >= threshold
                && !(matches!(
                    DataType::from_i32(t.data_type()),
                    DataType::Int64 | DataType::Int32
                ) && n < DEFAULT_THRESHOLD)
        })
    };
    // First what goes out, for the progress total and the merge thread's order. Typed fields
    // (`float_data`, ...) become the same values in the raw layout, which is what external data
    // holds; a type with no such encoding here (4-bit types) stays inline.
    let mut total = 0u64;
    let mut keys: Vec<String> = Vec::new();
    if let Some(g) = proto.graph.as_mut() {
        initializers_mut(g, &mut |t: &mut TensorProto| -> Result<()> {
            if !goes_out(t) {
                return Ok(());
            }
            if let Some(k) = pending_key(t) {
                keys.push(k.to_string());
            } else if DataType::from_i32(t.data_type()).bits().is_none() {
                return Ok(());
            } else if t.raw_data.is_none() {
                match typed_fields_to_raw(t) {
                    Ok(b) if Some(b.len()) == expected_len(t) => {
                        clear_typed_fields(t);
                        t.raw_data = Some(Bytes::from(b));
                    }
                    _ => return Ok(()),
                }
            }
            total += expected_len(t).unwrap_or(0) as u64;
            Ok(())
        })?;
    }
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Bytes>>(1);
        scope.spawn(move || {
            for key in keys {
                let value = match model.pending.get(&key) {
                    Some(lazy) => lazy.compute(model),
                    None => Err(Error::tensor(&key, "pending value was not registered")),
                };
                if tx.send(value).is_err() {
                    break; // the writer stopped (an error): nothing more is needed
                }
            }
        });
        let mut w = BufWriter::with_capacity(4 << 20, file);
        let mut copier = RangeCopier::default();
        let mut writeback = Writeback::new(sync);
        let mut pos = 0u64;
        let mut done = 0u64;
        let mut count = 0usize;
        let mut place = |t: &mut TensorProto| -> Result<()> {
            let fixed = DataType::from_i32(t.data_type()).bits().is_some();
            let bytes = match pending_key(t) {
                Some(_) if goes_out(t) => rx
                    .recv()
                    .map_err(|_| Error::tensor(t.name(), "the merge thread stopped"))??,
                Some(_) => return Ok(()),
                None if !(fixed && goes_out(t)) => return Ok(()),
                // (typed fields were made raw above, where they could be)
                None => match &t.raw_data {
                    Some(b) => b.clone(),
                    None => return Ok(()),
                },
            };
            let pad = (EXTERNAL_ALIGN - pos % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
            w.write_all(&vec![0u8; pad as usize])
                .map_err(|e| Error::io(shown, e))?;
            pos += pad;
            // Untouched tensors of a file go file to file in the kernel; the rest is written.
            let copied = bytes.len() >= COPY_RANGE_MIN
                && match model.file_span(&bytes) {
                    Some(span) => {
                        w.flush().map_err(|e| Error::io(shown, e))?;
                        copier.copy(&span, bytes.len() as u64, w.get_ref(), shown)?
                    }
                    None => false,
                };
            if !copied {
                w.write_all(&bytes).map_err(|e| Error::io(shown, e))?;
                model.release(&bytes);
            }
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.to_string()),
                value: Some(v),
            };
            t.external_data = vec![
                entry("location", location.to_string()),
                entry("offset", pos.to_string()),
                entry("length", bytes.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            t.raw_data = None;
            pos += bytes.len() as u64;
            done += bytes.len() as u64;
            count += 1;
            if writeback.due(pos) {
                w.flush().map_err(|e| Error::io(shown, e))?;
                writeback.start(w.get_ref(), pos);
            }
            if let Some(p) = progress {
                (p.0)(done, total);
            }
            Ok(())
        };
        // Initializers (of the main graph and of subgraphs) go external; tensors in
        // attributes, sparse initializers, functions and training graphs stay inline.
        if let Some(g) = proto.graph.as_mut() {
            initializers_mut(g, &mut place)?;
        }
        drop(rx);
        w.flush().map_err(|e| Error::io(shown, e))?;
        Ok((pos, count))
    })
}

/// Starts the disk writing the output's finished part every `WRITEBACK_STEP` bytes
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, Linux; asynchronous), instead of leaving the whole
/// file dirty in the page cache for the final fsync. Only when the output is fsynced anyway.
struct Writeback {
    enabled: bool,
    started: u64,
}

const WRITEBACK_STEP: u64 = 32 << 20;

impl Writeback {
    fn new(enabled: bool) -> Self {
        Writeback {
            enabled: enabled && cfg!(target_os = "linux"),
            started: 0,
        }
    }

    fn due(&self, pos: u64) -> bool {
        self.enabled && pos - self.started >= WRITEBACK_STEP
    }

    /// Asks for writeback of `[started, pos)`; a failure only turns this off (the fsync at
    /// the end still makes the file durable).
    fn start(&mut self, file: &File, pos: u64) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: an open file descriptor and a byte range of it; the call only schedules
            // writeback of dirty pages and touches no memory of this process.
            let rc = unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    self.started as libc::off64_t,
                    (pos - self.started) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if rc != 0 {
                self.enabled = false;
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = file;
        self.started = pos;
    }
}

/// Tensors at least this large are copied file to file (`copy_file_range`) when they can be.
const COPY_RANGE_MIN: usize = 1 << 20;

/// Copies byte ranges of input files to the end of the output file with `copy_file_range`
/// (Linux): the kernel moves the bytes between page caches (or shares the blocks, on
/// filesystems with reflinks) without mapping them into this process. Where the call is not
/// supported (another OS, kernel or filesystem) it says so once and the caller writes instead.
#[derive(Default)]
struct RangeCopier {
    unsupported: bool,
}

impl RangeCopier {
    /// Appends `len` bytes of the span's file from its offset to `out` at its current
    /// position. Ok(false) when nothing was copied and the caller must write the bytes itself.
    #[cfg(target_os = "linux")]
    fn copy(&mut self, span: &FileSpan, len: u64, out: &File, out_path: &Path) -> Result<bool> {
        use std::os::fd::AsRawFd;
        if self.unsupported {
            return Ok(false);
        }
        let path = &span.path;
        let src = span.file.as_raw_fd();
        let mut off_in = span.offset as libc::loff_t;
        let mut left = len;
        while left > 0 {
            let chunk = left.min(1 << 30) as usize;
            // SAFETY: both descriptors are open files owned by this process for the call;
            // `off_in` is a valid pointer to a local; a null `off_out` means "use and advance
            // the output's file position", which the buffered writer has flushed up to.
            let n = unsafe {
                libc::copy_file_range(
                    src,
                    &mut off_in,
                    out.as_raw_fd(),
                    std::ptr::null_mut(),
                    chunk,
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                let fallback = matches!(
                    err.raw_os_error(),
                    Some(
                        libc::ENOSYS | libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM
                    )
                );
                if fallback && left == len {
                    self.unsupported = true;
                    return Ok(false);
                }
                // (a full disk or a size limit is the output's; the rest, the input's)
                let full = matches!(
                    err.raw_os_error(),
                    Some(libc::ENOSPC | libc::EFBIG | libc::EDQUOT)
                );
                return Err(Error::io(if full { out_path } else { path }, err));
            }
            if n == 0 {
                return Err(Error::io(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file ended before the tensor's data",
                    ),
                ));
            }
            left -= n as u64;
        }
        Ok(true)
    }

    #[cfg(not(target_os = "linux"))]
    fn copy(&mut self, _span: &FileSpan, _len: u64, _out: &File, _out_path: &Path) -> Result<bool> {
        Ok(false)
    }
}

/// Calls `f` on the initializers of `g` and of every subgraph below it.
fn initializers_mut(
    g: &mut super::pb::GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                initializers_mut(sub, f)?;
            }
        }
    }
    Ok(())
}
