//! Writing onnxruntime's `.onnx_adapter` files (and reading their parameter names back): a FlatBuffer (namespace
//! `onnxruntime.adapters`, file identifier "TORT") whose root `Adapter` table holds
//! format_version (1), adapter_version, model_version and a vector of `Parameter` tables
//! `{ name, dims: [int64], data_type: int32 (ONNX DataType), raw_data: [uint8] aligned to 8 }`.
//! onnxruntime feeds each parameter to the graph input of the same name.
//!
//! The buffer is laid out front to back (every offset points forward), which FlatBuffers
//! allows; scalars sit at their natural alignment and raw data at 16 bytes.

use std::path::Path;

use crate::error::{Error, Result};
use crate::onnx::DataType;

/// One named tensor for the adapter file.
#[derive(Clone, Debug)]
pub struct AdapterParam {
    pub name: String,
    pub dims: Vec<i64>,
    pub dtype: DataType,
    pub raw: Vec<u8>,
}

const FORMAT_VERSION: i32 = 1;

struct Buf(Vec<u8>);

impl Buf {
    fn align(&mut self, n: usize) {
        while !self.0.len().is_multiple_of(n) {
            self.0.push(0);
        }
    }
    fn pos(&self) -> usize {
        self.0.len()
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn set_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Points the uoffset slot at `slot` to the current position.
    fn point_here(&mut self, slot: usize) {
        let here = self.pos();
        self.set_u32(slot, (here - slot) as u32);
    }
    /// A vtable for a table of `n` 4-byte fields at offsets 4, 8, ...; returns its position.
    fn vtable(&mut self, n: u16) -> usize {
        self.align(4);
        let at = self.pos();
        self.u16(4 + 2 * n);
        self.u16(4 + 4 * n);
        for i in 0..n {
            self.u16(4 + 4 * i);
        }
        self.align(4);
        at
    }
    /// Starts a table whose vtable is at `vt`; returns the table position.
    fn table(&mut self, vt: usize) -> usize {
        self.align(4);
        let at = self.pos();
        self.i32((at - vt) as i32);
        at
    }
}

/// Encodes the adapter file.
pub fn encode(params: &[AdapterParam], adapter_version: i32, model_version: i32) -> Vec<u8> {
    let mut b = Buf(Vec::new());
    b.u32(0); // root offset, patched below
    b.0.extend_from_slice(b"TORT");
    let vt = b.vtable(4);
    let root = b.table(vt);
    b.set_u32(0, root as u32);
    b.i32(FORMAT_VERSION);
    b.i32(adapter_version);
    b.i32(model_version);
    let params_slot = b.pos();
    b.u32(0);
    // The parameters vector: length, then one uoffset per table.
    b.align(4);
    b.point_here(params_slot);
    b.u32(params.len() as u32);
    let slots: Vec<usize> = params
        .iter()
        .map(|_| {
            let s = b.pos();
            b.u32(0);
            s
        })
        .collect();
    let pvt = b.vtable(4);
    for (p, slot) in params.iter().zip(slots) {
        let t = b.table(pvt);
        b.point_here_from(slot, t);
        let name_slot = b.pos();
        b.u32(0);
        let dims_slot = b.pos();
        b.u32(0);
        b.i32(p.dtype.to_i32());
        let raw_slot = b.pos();
        b.u32(0);
        // name: length, bytes, NUL
        b.align(4);
        b.point_here(name_slot);
        b.u32(p.name.len() as u32);
        b.0.extend_from_slice(p.name.as_bytes());
        b.0.push(0);
        // dims: the int64 elements 8-aligned, so the length sits 4 bytes before that
        while !(b.pos() + 4).is_multiple_of(8) {
            b.0.push(0);
        }
        b.point_here(dims_slot);
        b.u32(p.dims.len() as u32);
        for d in &p.dims {
            b.0.extend_from_slice(&d.to_le_bytes());
        }
        // raw data: elements 16-aligned (the schema asks for 8)
        while !(b.pos() + 4).is_multiple_of(16) {
            b.0.push(0);
        }
        b.point_here(raw_slot);
        b.u32(p.raw.len() as u32);
        b.0.extend_from_slice(&p.raw);
    }
    b.align(8);
    b.0
}

impl Buf {
    fn point_here_from(&mut self, slot: usize, target: usize) {
        self.set_u32(slot, (target - slot) as u32);
    }
}

/// The names of an adapter file's parameters (the graph inputs it feeds), in file order; any
/// FlatBuffer of the schema, not only those [`encode`] lays out. An error says what is wrong.
pub fn parameter_names(buf: &[u8]) -> std::result::Result<Vec<String>, String> {
    names_in(buf).map_err(|e| {
        if e.starts_with("no TORT") {
            e
        } else {
            format!("not a valid onnxruntime adapter file: {e}")
        }
    })
}

fn names_in(buf: &[u8]) -> std::result::Result<Vec<String>, String> {
    let u32_at = |at: usize| -> std::result::Result<usize, String> {
        buf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| format!("offset {at} is past the end ({} bytes)", buf.len()))
    };
    let u16_at = |at: usize| -> std::result::Result<usize, String> {
        buf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| format!("offset {at} is past the end ({} bytes)", buf.len()))
    };
    // A table's field `i`: its position, or None where the vtable leaves it out.
    let field = |table: usize, i: usize| -> std::result::Result<Option<usize>, String> {
        let soffset = u32_at(table)? as u32 as i32 as i64;
        let vt = usize::try_from(table as i64 - soffset).map_err(|_| "a vtable before the file")?;
        let vt_len = u16_at(vt)?;
        if 4 + 2 * i + 2 > vt_len {
            return Ok(None);
        }
        Ok(match u16_at(vt + 4 + 2 * i)? {
            0 => None,
            off => Some(table + off),
        })
    };
    if buf.get(4..8) != Some(b"TORT".as_slice()) {
        return Err("no TORT file identifier: not an onnxruntime adapter file".into());
    }
    let root = u32_at(0)?;
    let Some(slot) = field(root, 3)? else {
        return Ok(Vec::new());
    };
    let vec = slot + u32_at(slot)?;
    let n = u32_at(vec)?;
    (0..n)
        .map(|k| {
            let at = vec + 4 + 4 * k;
            let table = at + u32_at(at)?;
            let name_slot = field(table, 0)?.ok_or("a parameter without a name")?;
            let s = name_slot + u32_at(name_slot)?;
            let len = u32_at(s)?;
            let bytes = buf.get(s + 4..s + 4 + len).ok_or("a name past the end")?;
            String::from_utf8(bytes.to_vec()).map_err(|_| "a name that is not UTF-8".to_string())
        })
        .collect()
}

/// Writes an adapter file atomically, never over one of the run's `inputs`.
pub fn write(path: &Path, params: &[AdapterParam], inputs: &[std::path::PathBuf]) -> Result<()> {
    encoded_temp(path, params, inputs)?.commit(Vec::new(), |t| {
        t.persist(path).map_err(|e| Error::io(path, e))
    })
}

/// [`write()`], with the file kept registered for removal on an interrupt from the moment it is
/// in place (see [`crate::cleanup::Tracked::stage`]) until the returned guard is dropped.
pub fn write_staged(
    path: &Path,
    params: &[AdapterParam],
    inputs: &[std::path::PathBuf],
) -> Result<crate::cleanup::Guard> {
    encoded_temp(path, params, inputs)?
        .stage(path, |t| t.persist(path).map_err(|e| Error::io(path, e)))
}

/// The encoded adapter in a registered temp file beside `path`.
fn encoded_temp(
    path: &Path,
    params: &[AdapterParam],
    inputs: &[std::path::PathBuf],
) -> Result<crate::cleanup::Tracked<crate::cleanup::TempFile>> {
    let dir = crate::onnx::io::output_dir(path)?;
    crate::onnx::io::check_outputs(&[path], inputs)?;
    let mut tmp =
        crate::cleanup::temp_file_in(&dir, ".adapter.tmp", path).map_err(|e| Error::io(&dir, e))?;
    std::io::Write::write_all(tmp.as_file_mut(), &encode(params, 1, 1))
        .map_err(|e| Error::io(path, e))?;
    crate::onnx::io::make_readable(tmp.as_file(), path)?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> usize {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
    }

    #[test]
    fn parameter_names_read_back() -> Result<(), Box<dyn std::error::Error>> {
        let param = |name: &str| AdapterParam {
            name: name.into(),
            dims: vec![2, 2],
            dtype: DataType::Float,
            raw: vec![0; 16],
        };
        let b = encode(&[param("q.lora_A.weight"), param("q.lora_B.weight")], 1, 1);
        assert_eq!(parameter_names(&b)?, ["q.lora_A.weight", "q.lora_B.weight"]);
        assert_eq!(parameter_names(&encode(&[], 1, 1))?, Vec::<String>::new());
        let cut = parameter_names(&b[..b.len() / 3]).unwrap_err();
        assert!(
            cut.starts_with("not a valid onnxruntime adapter file: "),
            "{cut}"
        );
        assert!(parameter_names(b"not an adapter file").is_err());
        Ok(())
    }

    #[test]
    fn layout_reads_back() -> Result<(), Box<dyn std::error::Error>> {
        let p = AdapterParam {
            name: "m.lora_A.weight".into(),
            dims: vec![4, 2],
            dtype: DataType::Float,
            raw: (0..32u8).collect(),
        };
        let b = encode(&[p], 1, 1);
        assert_eq!(&b[4..8], b"TORT");
        let root = u32_at(&b, 0);
        assert_eq!(root % 4, 0);
        assert_eq!(i32::from_le_bytes(b[root + 4..root + 8].try_into()?), 1);
        let vec_slot = root + 16;
        let vec_at = vec_slot + u32_at(&b, vec_slot);
        assert_eq!(u32_at(&b, vec_at), 1);
        let t = vec_at + 4 + u32_at(&b, vec_at + 4);
        let name_at = t + 4 + u32_at(&b, t + 4);
        assert_eq!(&b[name_at + 4..name_at + 4 + 15], b"m.lora_A.weight");
        let dims_at = t + 8 + u32_at(&b, t + 8);
        assert_eq!((dims_at + 4) % 8, 0);
        assert_eq!(u32_at(&b, dims_at), 2);
        let raw_at = t + 16 + u32_at(&b, t + 16);
        assert_eq!((raw_at + 4) % 8, 0);
        assert_eq!(
            &b[raw_at + 4..raw_at + 36],
            &(0..32u8).collect::<Vec<_>>()[..]
        );
        Ok(())
    }
}
