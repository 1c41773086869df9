//! numpy `.npy` / `.npz` files: reading what `np.save`, `np.savez` and `np.savez_compressed`
//! write (stored or deflated zip entries, zip64 records, C or Fortran order, either byte
//! order), and writing uncompressed `.npz` that `np.load` reads. The zip container is parsed
//! and written here; only inflating uses `flate2`.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::onnx::DataType;

use super::tensor::{ArrayData, Tensors, elem_size, numel};

const NPY_MAGIC: &[u8] = b"\x93NUMPY";
/// The longest `.npy` header read (numpy's default limit is 10000 bytes).
const MAX_NPY_HEADER: usize = 1 << 20;
const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_EOCD64: u32 = 0x0606_4b50;
const SIG_EOCD64_LOCATOR: u32 = 0x0706_4b50;
/// A 32-bit zip field at this value means "see the zip64 extra field".
const ZIP64_MARK: u32 = u32::MAX;

fn npz_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Npz {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads every array of an `.npz` file, in the archive's order, named as `np.savez` keyed
/// them (the `.npy` suffix of the entry names is dropped).
pub fn read_npz(path: &Path) -> Result<Tensors> {
    read_arrays_where(path, |_, _| Ok(true)).map(|(arrays, _)| arrays)
}

/// Reads the arrays of an `.npz` (or a single-array `.npy`, named after the file stem) that
/// `keep` takes, shown each array's name and declared shape before its data is inflated:
/// `Ok(false)` leaves the array out unread, an error ends the read (a compressed entry
/// declaring gigabytes that the caller cannot use is refused without inflating it). Returns
/// the arrays read and the names of all the file's arrays, in the archive's order.
pub fn read_arrays_where(
    path: &Path,
    mut keep: impl FnMut(&str, &[usize]) -> Result<bool>,
) -> Result<(Tensors, Vec<String>)> {
    if is_npy(path)? {
        let stem = path.file_stem().map(|s| s.to_string_lossy().to_string());
        let name = stem.unwrap_or_default();
        let arr = read_npy(path)?;
        let kept = if keep(&name, &arr.shape)? {
            vec![(name.clone(), arr)]
        } else {
            Vec::new()
        };
        return Ok((kept, vec![name]));
    }
    let buf = crate::onnx::io::read_input(path)?;
    let entries = central_directory(&buf).map_err(|r| npz_err(path, r))?;
    let (mut out, mut names) = (Vec::new(), Vec::<String>::new());
    for e in entries {
        let in_entry = |r: String| npz_err(path, format!("{}: {r}", e.name));
        let name = e.name.strip_suffix(".npy").unwrap_or(&e.name).to_string();
        if names.contains(&name) {
            // (numpy reads the last one, a zip reader may take the first)
            return Err(npz_err(path, format!("holds two arrays named '{name}'")));
        }
        // (the header's length is in its first 12 bytes; the header follows: its shape alone
        // is read before the caller decides, so that an array it leaves out may have a dtype
        // onnx-lora does not read)
        let start = entry_head(&buf, &e, 12).map_err(in_entry)?;
        let (at, len) = match start.get(6) {
            Some(1) if start.len() >= 10 => {
                (10, 10 + u16::from_le_bytes([start[8], start[9]]) as usize)
            }
            Some(2 | 3) if start.len() >= 12 => {
                (12, 12 + read_u32(&start, 8).map_err(in_entry)? as usize)
            }
            Some(2 | 3) => return Err(in_entry(".npy header is truncated".into())),
            _ => (start.len(), start.len()),
        };
        if len > MAX_NPY_HEADER {
            // (numpy reads headers of up to 10000 bytes unless told otherwise)
            return Err(in_entry(format!(
                ".npy header of {len} bytes: more than any array's needs"
            )));
        }
        let head = entry_head(&buf, &e, len).map_err(in_entry)?;
        let text = head
            .get(at.min(head.len())..)
            .and_then(|h| std::str::from_utf8(h).ok())
            .unwrap_or_default();
        let shape = match parse_shape(text) {
            Ok(shape) => shape,
            // (no readable shape: the full parse says what is wrong)
            Err(_) => npy_header(&head).map_err(in_entry)?.0.shape,
        };
        if keep(&name, &shape)? {
            let bytes = entry_data(&buf, &e).map_err(in_entry)?;
            out.push((name.clone(), parse_npy(&bytes).map_err(in_entry)?));
        }
        names.push(name);
    }
    Ok((out, names))
}

/// Reads one `.npy` file.
pub fn read_npy(path: &Path) -> Result<ArrayData> {
    let buf = crate::onnx::io::read_input(path)?;
    parse_npy(&buf).map_err(|r| npz_err(path, r))
}

/// Whether the file is a `.npy` (by its magic bytes, whatever its name).
pub fn is_npy(path: &Path) -> Result<bool> {
    let mut head = [0u8; 6];
    let n = crate::onnx::io::open_input(path)?
        .read(&mut head)
        .map_err(|e| Error::io(path, e))?;
    Ok(head[..n] == *NPY_MAGIC)
}

/// Reads an `.npz` or, by its magic bytes, a single-array `.npy` (named after the file stem).
pub fn read_arrays(path: &Path) -> Result<Tensors> {
    read_arrays_where(path, |_, _| Ok(true)).map(|(arrays, _)| arrays)
}

/// Writes `arrays` as an uncompressed `.npz` (`np.load(path)[name]` gives each back). bfloat16
/// is written as its uint16 bits, since numpy has no bfloat16.
pub fn write_npz(path: &Path, arrays: &[(String, ArrayData)]) -> Result<()> {
    let mut zip = ZipWriter::default();
    for (name, arr) in arrays {
        zip.add(&format!("{name}.npy"), &npy_bytes(arr))
            .map_err(|r| npz_err(path, r))?;
    }
    let bytes = zip.finish().map_err(|r| npz_err(path, r))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

// ---------------------------------------------------------------------------------------------
// .npy

type Res<T> = std::result::Result<T, String>;

/// The header of a `.npy` image (of which `buf` may hold only the start) and where its data
/// begins.
fn npy_header(buf: &[u8]) -> Res<(NpyHeader, usize)> {
    if !buf.starts_with(NPY_MAGIC) || buf.len() < 10 {
        return Err("not a .npy array (bad magic)".into());
    }
    let (header_len, start) = match buf[6] {
        1 => (u16::from_le_bytes([buf[8], buf[9]]) as usize, 10),
        2 | 3 => (read_u32(buf, 8)? as usize, 12),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let header = buf
        .get(start..start + header_len)
        .ok_or(".npy header is truncated")?;
    let header = std::str::from_utf8(header).map_err(|_| ".npy header is not text")?;
    Ok((NpyHeader::parse(header)?, start + header_len))
}

/// Parses a whole `.npy` image.
fn parse_npy(buf: &[u8]) -> Res<ArrayData> {
    let (h, data_start) = npy_header(buf)?;
    let size = elem_size(h.dtype).ok_or("unsupported dtype")?;
    let n = numel(&h.shape).map_err(|e| e.to_string())?;
    let body = &buf[data_start..];
    let len = n.checked_mul(size).ok_or("array is too large")?;
    let mut data = body
        .get(..len)
        .ok_or_else(|| format!("data is truncated: {} bytes for {len}", body.len()))?
        .to_vec();
    if h.big_endian {
        data.chunks_exact_mut(size).for_each(<[u8]>::reverse);
    }
    if h.fortran_order {
        data = fortran_to_c(&data, &h.shape, size);
    }
    ArrayData::new(h.dtype, h.shape, data).map_err(|e| e.to_string())
}

struct NpyHeader {
    dtype: DataType,
    big_endian: bool,
    fortran_order: bool,
    shape: Vec<usize>,
}

impl NpyHeader {
    /// Reads the Python dict literal numpy writes: `{'descr': '<f4', 'fortran_order': False,
    /// 'shape': (2, 3), }`.
    fn parse(h: &str) -> Res<Self> {
        let descr = dict_value(h, "descr")?;
        let descr = descr.trim_matches(|c| c == '\'' || c == '"');
        let (big_endian, dtype) = parse_descr(descr)?;
        let fortran_order = match dict_value(h, "fortran_order")? {
            "True" => true,
            "False" => false,
            v => return Err(format!("fortran_order is '{v}'")),
        };
        let shape = parse_shape(h)?;
        Ok(NpyHeader {
            dtype,
            big_endian,
            fortran_order,
            shape,
        })
    }
}

/// The `shape` of a `.npy` header's dict literal.
fn parse_shape(h: &str) -> Res<Vec<usize>> {
    dict_value(h, "shape")?
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension '{s}'"))
        })
        .collect()
}

/// The literal after `'key':` up to the next top-level comma (tuples are kept whole).
fn dict_value<'h>(h: &'h str, key: &str) -> Res<&'h str> {
    let at = h
        .find(&format!("'{key}'"))
        .ok_or_else(|| format!(".npy header has no '{key}'"))?;
    let rest = h[at + key.len() + 2..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .ok_or(".npy header is malformed")?
        .trim_start();
    if rest.starts_with('[') {
        return Err("structured dtypes are not supported".into());
    }
    let end = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else {
        rest.find([',', '}'])
    }
    .ok_or(".npy header is malformed")?;
    Ok(rest[..end].trim())
}

/// `'<f4'` -> (big endian?, type). Sizes that do not match the kind are refused.
fn parse_descr(d: &str) -> Res<(bool, DataType)> {
    let err = || format!("dtype '{d}' is not supported");
    let mut chars = d.chars();
    let order = chars.next().ok_or_else(err)?;
    let big_endian = match order {
        '<' | '|' | '=' => false,
        '>' => true,
        _ => return Err(err()),
    };
    let code = chars.as_str();
    let dtype = match code {
        "f2" => DataType::Float16,
        "f4" => DataType::Float,
        "f8" => DataType::Double,
        "i1" => DataType::Int8,
        "i2" => DataType::Int16,
        "i4" => DataType::Int32,
        "i8" => DataType::Int64,
        "u1" => DataType::Uint8,
        "u2" => DataType::Uint16,
        "u4" => DataType::Uint32,
        "u8" => DataType::Uint64,
        "b1" => DataType::Bool,
        _ => return Err(err()),
    };
    Ok((big_endian, dtype))
}

/// Reorders elements from Fortran (first index fastest) to C order.
fn fortran_to_c(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u8; data.len()];
    let mut idx = vec![0usize; shape.len()];
    for c in 0..n {
        // Fortran offset of the multi-index `idx` (which walks in C order).
        let mut f = 0;
        for d in (0..shape.len()).rev() {
            f = f * shape[d] + idx[d];
        }
        out[c * size..(c + 1) * size].copy_from_slice(&data[f * size..(f + 1) * size]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// The `.npy` image of an array (format 1.0, or 2.0 when the header needs it).
fn npy_bytes(a: &ArrayData) -> Vec<u8> {
    let descr = match a.dtype {
        DataType::Float16 => "<f2",
        DataType::Float => "<f4",
        DataType::Double => "<f8",
        DataType::Int8 => "|i1",
        DataType::Int16 => "<i2",
        DataType::Int32 => "<i4",
        DataType::Int64 => "<i8",
        DataType::Uint8 => "|u1",
        DataType::Uint16 | DataType::Bfloat16 => "<u2",
        DataType::Uint32 => "<u4",
        DataType::Uint64 => "<u8",
        _ => "|b1",
    };
    let dims: Vec<String> = a.shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // numpy pads the header with spaces so that the data starts 64-byte aligned.
    let v2 = header.len() + 11 > u16::MAX as usize;
    let prefix = if v2 { 12 } else { 10 };
    let pad = (64 - (prefix + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = Vec::with_capacity(prefix + header.len() + a.data.len());
    out.extend_from_slice(NPY_MAGIC);
    if v2 {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&a.data);
    out
}

// ---------------------------------------------------------------------------------------------
// zip container

fn read_u16(b: &[u8], at: usize) -> Res<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| "zip structure is truncated".into())
}

fn read_u32(b: &[u8], at: usize) -> Res<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| "zip structure is truncated".into())
}

fn read_u64(b: &[u8], at: usize) -> Res<u64> {
    Ok(read_u32(b, at)? as u64 | (read_u32(b, at + 4)? as u64) << 32)
}

/// One file of the archive, as its central directory entry describes it.
struct ZipEntry {
    name: String,
    method: u16,
    flags: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    local_offset: u64,
}

/// Finds the end-of-central-directory record (it ends the file, before a comment of up to
/// 64 KiB) and lists the entries.
fn central_directory(buf: &[u8]) -> Res<Vec<ZipEntry>> {
    let lo = buf.len().saturating_sub(22 + u16::MAX as usize);
    let eocd = (lo..=buf.len().saturating_sub(22))
        .rev()
        .find(|&i| read_u32(buf, i) == Ok(SIG_EOCD))
        .ok_or("not a zip archive (.npz): no end of central directory")?;
    let mut count = read_u16(buf, eocd + 10)? as u64;
    let mut offset = read_u32(buf, eocd + 16)? as u64;
    if count == u16::MAX as u64 || offset == ZIP64_MARK as u64 {
        let loc = eocd.checked_sub(20).ok_or("zip64 locator is missing")?;
        if read_u32(buf, loc)? != SIG_EOCD64_LOCATOR {
            return Err("zip64 locator is missing".into());
        }
        let rec = read_u64(buf, loc + 8)? as usize;
        if read_u32(buf, rec)? != SIG_EOCD64 {
            return Err("zip64 end of central directory is missing".into());
        }
        count = read_u64(buf, rec + 32)?;
        offset = read_u64(buf, rec + 48)?;
    }
    let mut at = usize::try_from(offset).map_err(|_| "bad central directory offset")?;
    let mut entries = Vec::new();
    for _ in 0..count {
        let (e, next) = central_entry(buf, at)?;
        entries.push(e);
        at = next;
    }
    Ok(entries)
}

/// Parses the central directory entry at `at`; returns it and where the next one starts.
fn central_entry(buf: &[u8], at: usize) -> Res<(ZipEntry, usize)> {
    if read_u32(buf, at)? != SIG_CENTRAL {
        return Err("central directory is corrupt".into());
    }
    let name_len = read_u16(buf, at + 28)? as usize;
    let extra_len = read_u16(buf, at + 30)? as usize;
    let comment_len = read_u16(buf, at + 32)? as usize;
    let name = buf
        .get(at + 46..at + 46 + name_len)
        .ok_or("central directory is truncated")?;
    let mut e = ZipEntry {
        name: String::from_utf8_lossy(name).into_owned(),
        flags: read_u16(buf, at + 8)?,
        method: read_u16(buf, at + 10)?,
        crc: read_u32(buf, at + 16)?,
        compressed: read_u32(buf, at + 20)? as u64,
        size: read_u32(buf, at + 24)? as u64,
        local_offset: read_u32(buf, at + 42)? as u64,
    };
    let extra_at = at + 46 + name_len;
    let extra = buf
        .get(extra_at..extra_at + extra_len)
        .ok_or("central directory is truncated")?;
    apply_zip64_extra(&mut e, extra)?;
    Ok((e, extra_at + extra_len + comment_len))
}

/// Replaces the 32-bit fields marked 0xFFFFFFFF with the zip64 extra field's 64-bit values
/// (numpy writes every entry with zip64 records).
fn apply_zip64_extra(e: &mut ZipEntry, extra: &[u8]) -> Res<()> {
    let mut i = 0;
    while i + 4 <= extra.len() {
        let id = read_u16(extra, i)?;
        let len = read_u16(extra, i + 2)? as usize;
        if id == 1 {
            let mut p = i + 4;
            for field in [&mut e.size, &mut e.compressed, &mut e.local_offset] {
                if *field == ZIP64_MARK as u64 {
                    *field = read_u64(extra, p)?;
                    p += 8;
                }
            }
        }
        i += 4 + len;
    }
    Ok(())
}

/// The entry's uncompressed bytes, CRC-checked.
/// An entry's stored (possibly compressed) bytes.
fn entry_raw<'b>(buf: &'b [u8], e: &ZipEntry) -> Res<&'b [u8]> {
    if e.flags & 1 != 0 {
        return Err("encrypted entries are not supported".into());
    }
    let at = usize::try_from(e.local_offset).map_err(|_| "bad entry offset")?;
    if read_u32(buf, at)? != SIG_LOCAL {
        return Err("local header is corrupt".into());
    }
    let start = at + 30 + read_u16(buf, at + 26)? as usize + read_u16(buf, at + 28)? as usize;
    let end = usize::try_from(e.compressed)
        .ok()
        .and_then(|len| start.checked_add(len))
        .ok_or("entry is too large")?;
    Ok(buf.get(start..end).ok_or("entry data is truncated")?)
}

fn entry_data(buf: &[u8], e: &ZipEntry) -> Res<Vec<u8>> {
    let raw = entry_raw(buf, e)?;
    let data = match e.method {
        0 => raw.to_vec(),
        8 => {
            // The declared size is only a hint: a corrupt header must not allocate gigabytes.
            let hint = usize::try_from(e.size)
                .unwrap_or(0)
                .min(raw.len().saturating_mul(64));
            let mut out = Vec::with_capacity(hint);
            flate2::read::DeflateDecoder::new(raw)
                .read_to_end(&mut out)
                .map_err(|err| format!("inflating failed: {err}"))?;
            out
        }
        m => {
            return Err(format!(
                "zip compression method {m} is not supported (only stored and deflate)"
            ));
        }
    };
    if data.len() as u64 != e.size || crc32fast::hash(&data) != e.crc {
        return Err("CRC or size check failed (corrupt archive)".into());
    }
    Ok(data)
}

/// The first `n` bytes of an entry's content (fewer where it is shorter), inflating no more
/// than that.
fn entry_head(buf: &[u8], e: &ZipEntry, n: usize) -> Res<Vec<u8>> {
    let raw = entry_raw(buf, e)?;
    let mut out = Vec::with_capacity(n.min(1 << 20));
    match e.method {
        0 => out.extend_from_slice(&raw[..n.min(raw.len())]),
        8 => {
            flate2::read::DeflateDecoder::new(raw)
                .take(n as u64)
                .read_to_end(&mut out)
                .map_err(|err| format!("inflating failed: {err}"))?;
        }
        m => {
            return Err(format!(
                "zip compression method {m} is not supported (only stored and deflate)"
            ));
        }
    }
    Ok(out)
}

/// A minimal writer of stored (uncompressed) zip entries.
#[derive(Default)]
struct ZipWriter {
    out: Vec<u8>,
    central: Vec<u8>,
    count: u16,
}

impl ZipWriter {
    fn add(&mut self, name: &str, data: &[u8]) -> Res<()> {
        let too_big = |what: &str| format!("{name}: {what} is too large for a zip without zip64");
        let size = u32::try_from(data.len()).map_err(|_| too_big("the array"))?;
        let offset = u32::try_from(self.out.len()).map_err(|_| too_big("the archive"))?;
        self.count = self
            .count
            .checked_add(1)
            .ok_or_else(|| too_big("the entry count"))?;
        let crc = crc32fast::hash(data);
        // Fields shared by the local header and the central entry, from "version needed" on:
        // version 2.0, no flags, stored, DOS time 00:00 on 1980-01-01, crc, sizes, name length,
        // no extra field.
        let mut common = Vec::with_capacity(26);
        for v in [20u16, 0, 0, 0, 0x21] {
            common.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size, size] {
            common.extend_from_slice(&v.to_le_bytes());
        }
        common.extend_from_slice(&(name.len() as u16).to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes());

        self.out.extend_from_slice(&SIG_LOCAL.to_le_bytes());
        self.out.extend_from_slice(&common);
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(data);

        self.central.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
        self.central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        self.central.extend_from_slice(&common);
        // comment length, disk number, internal and external attributes, local offset
        for v in [0u16, 0, 0] {
            self.central.extend_from_slice(&v.to_le_bytes());
        }
        self.central.extend_from_slice(&0u32.to_le_bytes());
        self.central.extend_from_slice(&offset.to_le_bytes());
        self.central.extend_from_slice(name.as_bytes());
        Ok(())
    }

    fn finish(mut self) -> Res<Vec<u8>> {
        let cd_offset = u32::try_from(self.out.len()).map_err(|_| "the archive is too large")?;
        let cd_size = self.central.len() as u32;
        self.out.extend_from_slice(&self.central);
        self.out.extend_from_slice(&SIG_EOCD.to_le_bytes());
        for v in [0u16, 0, self.count, self.count] {
            self.out.extend_from_slice(&v.to_le_bytes());
        }
        self.out.extend_from_slice(&cd_size.to_le_bytes());
        self.out.extend_from_slice(&cd_offset.to_le_bytes());
        self.out.extend_from_slice(&0u16.to_le_bytes());
        Ok(self.out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("a.npz");
        let arrays = vec![
            (
                "x".to_string(),
                ArrayData::from_f64(DataType::Float, vec![2, 3], &[1., 2., 3., 4., 5., 6.])?,
            ),
            (
                "ids".to_string(),
                ArrayData::from_f64(DataType::Int64, vec![4], &[0., 7., 9., 1.])?,
            ),
            (
                "s".to_string(),
                ArrayData::from_f64(DataType::Bool, vec![], &[1.])?,
            ),
        ];
        write_npz(&path, &arrays)?;
        assert_eq!(read_npz(&path)?, arrays);
        Ok(())
    }

    #[test]
    fn fortran_order_is_reordered() {
        // [[1, 2, 3], [4, 5, 6]] in Fortran order is 1 4 2 5 3 6.
        let f: Vec<u8> = [1u8, 4, 2, 5, 3, 6].to_vec();
        assert_eq!(fortran_to_c(&f, &[2, 3], 1), vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn header_values() -> Res<()> {
        let h = "{'descr': '>i4', 'fortran_order': True, 'shape': (3, 1), }";
        let p = NpyHeader::parse(h)?;
        assert!(p.big_endian && p.fortran_order);
        assert_eq!((p.dtype, p.shape), (DataType::Int32, vec![3, 1]));
        let p = NpyHeader::parse("{'descr': '<f2', 'fortran_order': False, 'shape': (), }")?;
        assert!(p.shape.is_empty());
        Ok(())
    }
}
