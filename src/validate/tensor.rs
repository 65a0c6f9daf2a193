//! Reading and writing the numeric payload of a `TensorProto`, just enough for the validator:
//! integer tensors of every width ONNX quantization uses (2, 4, 8, 16, 32, 64 bits) and the float
//! types scales and weights come in (f32, f16, bf16, f64).
//!
//! Storage rules (onnx.proto, IR 14): `raw_data` is little-endian fixed width; 4-bit values are
//! packed two per byte, first element in the low nibble; 2-bit values four per byte, LSB first.
//! Without `raw_data`, 8/16-bit ints, bools, f16 and bf16 sit one per `int32_data` entry, 4-bit
//! values two per entry and 2-bit values four per entry (packed like the bytes of `raw_data`).

use anyhow::{bail, ensure, Context, Result};

use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::TensorProto;

/// Element count of a tensor from its `dims`.
pub(crate) fn numel(t: &TensorProto) -> Result<usize> {
    t.dims.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d)
            .with_context(|| format!("tensor '{}' has negative dim {d}", t.name()))?;
        acc.checked_mul(d)
            .with_context(|| format!("tensor '{}' is too large", t.name()))
    })
}

pub(crate) fn data_type(t: &TensorProto) -> DataType {
    DataType::try_from(t.data_type()).unwrap_or(DataType::Undefined)
}

/// ONNX spelling of an element type, for messages.
pub(crate) fn dtype_name(code: i32) -> String {
    match DataType::try_from(code) {
        Ok(dt) => dt.as_str_name().to_ascii_lowercase(),
        Err(_) => format!("data type #{code}"),
    }
}

/// Bits per element for the sub-byte integer types (packed), `None` for the others.
fn sub_byte_bits(dt: DataType) -> Option<usize> {
    match dt {
        DataType::Int4 | DataType::Uint4 => Some(4),
        DataType::Int2 | DataType::Uint2 => Some(2),
        _ => None,
    }
}

fn unpack_sub_byte(
    bytes: impl Iterator<Item = u8>,
    bits: usize,
    signed: bool,
    n: usize,
) -> Vec<i64> {
    let per_byte = 8 / bits;
    let mask = (1u8 << bits) - 1;
    let mut out = Vec::with_capacity(n);
    'outer: for b in bytes {
        for k in 0..per_byte {
            if out.len() == n {
                break 'outer;
            }
            let v = (b >> (k * bits)) & mask;
            let v = if signed && v >= (1 << (bits - 1)) {
                i64::from(v) - (1i64 << bits)
            } else {
                i64::from(v)
            };
            out.push(v);
        }
    }
    out
}

/// Decodes an integer tensor (int2..int64, uint2..uint64, bool) to `i64` values.
pub(crate) fn decode_ints(t: &TensorProto) -> Result<Vec<i64>> {
    let n = numel(t)?;
    let dt = data_type(t);
    let name = t.name();
    if t.data_location == Some(1) {
        bail!("tensor '{name}' still points to external data; inline it before validating");
    }
    let raw = t.raw_data.as_deref().filter(|r| !r.is_empty());
    if let Some(bits) = sub_byte_bits(dt) {
        let signed = matches!(dt, DataType::Int4 | DataType::Int2);
        let per_byte = 8 / bits;
        let out = match raw {
            Some(r) => unpack_sub_byte(r.iter().copied(), bits, signed, n),
            None => unpack_sub_byte(t.int32_data.iter().map(|&v| v as u8), bits, signed, n),
        };
        ensure!(
            out.len() == n,
            "tensor '{name}' ({}) holds {} values, dims say {n} ({} per byte)",
            dtype_name(t.data_type()),
            out.len(),
            per_byte
        );
        return Ok(out);
    }
    let width = match dt {
        DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
        DataType::Int16 | DataType::Uint16 => 2,
        DataType::Int32 | DataType::Uint32 => 4,
        DataType::Int64 | DataType::Uint64 => 8,
        _ => bail!(
            "tensor '{name}' has type {}, expected an integer type",
            dtype_name(t.data_type())
        ),
    };
    let out: Vec<i64> = match raw {
        Some(r) => {
            ensure!(
                r.len() == n * width,
                "tensor '{name}' has {} raw bytes, expected {} for {n} values",
                r.len(),
                n * width
            );
            r.chunks_exact(width)
                .map(|c| match dt {
                    DataType::Int8 => i64::from(c[0] as i8),
                    DataType::Uint8 | DataType::Bool => i64::from(c[0]),
                    DataType::Int16 => i64::from(i16::from_le_bytes([c[0], c[1]])),
                    DataType::Uint16 => i64::from(u16::from_le_bytes([c[0], c[1]])),
                    DataType::Int32 => i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    DataType::Uint32 => i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    // uint64 above i64::MAX wraps; never a quantized weight.
                    _ => i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
                })
                .collect()
        }
        None => match dt {
            DataType::Int64 => t.int64_data.clone(),
            DataType::Uint64 => t.uint64_data.iter().map(|&v| v as i64).collect(),
            DataType::Uint32 => t.uint64_data.iter().map(|&v| v as i64).collect(),
            DataType::Int8 => t.int32_data.iter().map(|&v| i64::from(v as i8)).collect(),
            DataType::Uint8 | DataType::Bool => {
                t.int32_data.iter().map(|&v| i64::from(v as u8)).collect()
            }
            DataType::Int16 => t.int32_data.iter().map(|&v| i64::from(v as i16)).collect(),
            DataType::Uint16 => t.int32_data.iter().map(|&v| i64::from(v as u16)).collect(),
            _ => t.int32_data.iter().map(|&v| i64::from(v)).collect(),
        },
    };
    ensure!(
        out.len() == n,
        "tensor '{name}' holds {} values, dims say {n}",
        out.len()
    );
    Ok(out)
}

/// Decodes a float tensor (f32, f16, bf16, f64) to `f32` values (f64 is rounded), through the
/// IR's decoder (which checks the payload against the dims).
pub(crate) fn decode_floats(t: &TensorProto) -> Result<Vec<f32>> {
    let dt = data_type(t);
    ensure!(
        matches!(
            dt,
            DataType::Float | DataType::Double | DataType::Float16 | DataType::Bfloat16
        ),
        "tensor '{}' has type {}, expected a float type",
        t.name(),
        dtype_name(t.data_type())
    );
    if t.data_location == Some(1) {
        bail!(
            "tensor '{}' still points to external data; inline it before validating",
            t.name()
        );
    }
    Ok(crate::ir::tensor::to_f32(t)?.into_iter().collect())
}

/// A float tensor of element type `dt` (f32, f16 or bf16), stored as `raw_data`.
pub(crate) fn encode_floats(
    name: &str,
    dims: &[i64],
    values: &[f32],
    dt: DataType,
) -> Result<TensorProto> {
    let raw: Vec<u8> = match dt {
        DataType::Float => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Float16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DataType::Bfloat16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => bail!("cannot write tensor '{name}' as {}", dt.as_str_name()),
    };
    Ok(TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(dt as i32),
        raw_data: Some(raw.into()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dt: DataType, dims: &[i64], bytes: &[u8]) -> TensorProto {
        TensorProto {
            dims: dims.to_vec(),
            data_type: Some(dt as i32),
            raw_data: Some(bytes.to_vec().into()),
            ..Default::default()
        }
    }

    #[test]
    fn int4_low_nibble_first_sign_extended() {
        // 0x8F = [0xF, 0x8] -> [-1, -8]; 0x07 -> [7, 0]; odd count drops the pad nibble.
        let t = raw(DataType::Int4, &[3], &[0x8F, 0x07]);
        assert_eq!(decode_ints(&t).unwrap(), vec![-1, -8, 7]);
        let t = raw(DataType::Uint4, &[4], &[0x8F, 0x07]);
        assert_eq!(decode_ints(&t).unwrap(), vec![15, 8, 7, 0]);
        let t = TensorProto {
            dims: vec![2],
            data_type: Some(DataType::Int4 as i32),
            int32_data: vec![0x1E],
            ..Default::default()
        };
        assert_eq!(decode_ints(&t).unwrap(), vec![-2, 1]);
    }

    #[test]
    fn int8_and_f16_round_trip() {
        let t = raw(DataType::Int8, &[2], &[0xFF, 0x05]);
        assert_eq!(decode_ints(&t).unwrap(), vec![-1, 5]);
        let t = encode_floats("w", &[2], &[1.5, -0.25], DataType::Float16).unwrap();
        assert_eq!(decode_floats(&t).unwrap(), vec![1.5, -0.25]);
        let short = raw(DataType::Int16, &[2], &[1, 0, 2]);
        assert!(decode_ints(&short).is_err());
    }
}
