//! The safetensors header check that runs before an adapter's weights are read: the file's
//! size, the header's length, and every tensor's dtype, shape and byte range are checked
//! against the file and against a byte limit, so a hostile or broken file (a header that
//! declares a huge tensor, offsets past the end, overlapping ranges) is refused before any
//! large allocation.

use super::AdapterError;
use std::io::Read;
use std::path::Path;

/// Longest header accepted: a PEFT adapter for a 100-layer model with all seven projections
/// needs ~150 KB; 16 MiB leaves room for metadata while bounding the read.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// One tensor as the header declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub range: (u64, u64),
}

fn bad(msg: impl Into<String>) -> AdapterError {
    AdapterError::Weights(msg.into())
}

/// Bytes per element of a safetensors dtype name (`None`: unknown).
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Checks a whole safetensors image held in memory (`bytes`) without touching tensor data:
/// returns the declared tensors when the header is well formed, consistent with the file's
/// length, and declares at most `max_data_bytes` of tensor data.
pub fn check_bytes(bytes: &[u8], max_data_bytes: u64) -> Result<Vec<Declared>, AdapterError> {
    let n = header_len(
        bytes.get(..8).ok_or_else(|| bad("file shorter than the 8-byte header length"))?,
        bytes.len() as u64,
    )?;
    let header = &bytes[8..8 + n as usize];
    check_header(header, bytes.len() as u64 - 8 - n, max_data_bytes)
}

/// Reads and checks the header of the file at `path` (reading only the header).
pub fn check_file(path: &Path, max_data_bytes: u64) -> Result<Vec<Declared>, AdapterError> {
    let io = |source| AdapterError::Io { path: path.display().to_string(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad("file shorter than the 8-byte header length"))?;
    let n = header_len(&len, file_len)?;
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|_| bad("file ends inside its header"))?;
    check_header(&header, file_len - 8 - n, max_data_bytes)
}

/// The header length from the first 8 bytes, checked against the limit and the file.
fn header_len(first8: &[u8], file_len: u64) -> Result<u64, AdapterError> {
    let n = u64::from_le_bytes(
        first8.try_into().map_err(|_| bad("file shorter than the 8-byte header length"))?,
    );
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!("header of {n} bytes is over the {MAX_HEADER_BYTES}-byte limit")));
    }
    if n < 2 || 8 + n > file_len {
        return Err(bad(format!("header of {n} bytes does not fit a {file_len}-byte file")));
    }
    Ok(n)
}

/// Checks a header (JSON) against a data section of `data_len` bytes.
pub fn check_header(
    header: &[u8],
    data_len: u64,
    max_data_bytes: u64,
) -> Result<Vec<Declared>, AdapterError> {
    if data_len > max_data_bytes {
        return Err(bad(format!(
            "{data_len} bytes of tensor data, more than the {max_data_bytes} this adapter can need"
        )));
    }
    let text = std::str::from_utf8(header).map_err(|_| bad("header is not UTF-8"))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text.trim_end_matches(' '))
            .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| v.get(k).ok_or_else(|| bad(format!("tensor `{name}` lacks `{k}`")));
        let dtype = field("dtype")?
            .as_str()
            .ok_or_else(|| bad(format!("tensor `{name}`: `dtype` is not a string")))?
            .to_string();
        let size = dtype_size(&dtype)
            .ok_or_else(|| bad(format!("tensor `{name}` has unknown dtype `{dtype}`")))?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|a| {
                a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect()
            })
            .ok_or_else(|| bad(format!("tensor `{name}`: `shape` is not a list of sizes")))?;
        let range = match field("data_offsets")?
            .as_array()
            .map(|a| a.iter().map(serde_json::Value::as_u64).collect::<Vec<_>>())
        {
            Some(o) if o.len() == 2 && o.iter().all(Option::is_some) => {
                (o[0].unwrap_or(0), o[1].unwrap_or(0))
            }
            _ => return Err(bad(format!("tensor `{name}`: `data_offsets` is not two offsets"))),
        };
        let bytes = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d as u64))
            .filter(|&b| b <= max_data_bytes)
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` of shape {shape:?} declares more than {max_data_bytes} bytes"
                ))
            })?;
        if range.0 > range.1 || range.1 > data_len || range.1 - range.0 != bytes {
            return Err(bad(format!(
                "tensor `{name}`: bytes {}..{} do not hold {bytes} bytes inside {data_len}",
                range.0, range.1
            )));
        }
        out.push(Declared { name, dtype, shape, range });
    }
    // Ranges must not overlap (safetensors requires them to tile the data section).
    let mut ranges: Vec<(u64, u64)> = out.iter().map(|d| d.range).filter(|r| r.0 < r.1).collect();
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(bad("tensor byte ranges overlap"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: serde_json::Value, data_len: usize) -> Vec<u8> {
        let h = header.to_string().into_bytes();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(vec![0u8; data_len]);
        out
    }

    fn err(bytes: &[u8]) -> String {
        check_bytes(bytes, 1 << 20).unwrap_err().to_string()
    }

    #[test]
    fn accepts_a_well_formed_file() {
        let f = file(
            serde_json::json!({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "__metadata__": {"format": "pt"}}),
            24,
        );
        let d = check_bytes(&f, 1 << 20).unwrap();
        assert_eq!(
            d,
            vec![Declared {
                name: "a".into(),
                dtype: "F32".into(),
                shape: vec![2, 3],
                range: (0, 24)
            }]
        );
    }

    #[test]
    fn refuses_what_would_overflow_or_overlap() {
        let big = file(
            serde_json::json!({"a": {"dtype": "F64", "shape": [1u64 << 40, 1u64 << 40], "data_offsets": [0, 8]}}),
            8,
        );
        assert!(err(&big).contains("declares more than"));
        let overlap = file(
            serde_json::json!({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}, "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}),
            12,
        );
        assert!(err(&overlap).contains("overlap"));
        let wrong_len = file(
            serde_json::json!({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
            8,
        );
        assert!(err(&wrong_len).contains("do not hold"));
        assert!(err(&[1, 2, 3]).contains("8-byte"));
        assert!(err(&u64::MAX.to_le_bytes()).contains("over the"));
        let not_object = file(serde_json::json!([1, 2]), 0);
        assert!(err(&not_object).contains("JSON object"));
        let unknown_dtype = file(
            serde_json::json!({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}),
            1,
        );
        assert!(err(&unknown_dtype).contains("unknown dtype"));
        assert!(check_bytes(&file(serde_json::json!({}), 64), 16)
            .unwrap_err()
            .to_string()
            .contains("more than"));
    }
}
