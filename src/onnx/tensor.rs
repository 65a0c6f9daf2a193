//! Tensor helpers over `TensorProto`: element types, decoding to ndarray, encoding back.
//!
//! Initializers stay `TensorProto`s in the IR (so untouched ones are re-emitted byte for byte);
//! passes decode the ones they rewrite with [`to_f32`] / [`to_f64`] and store results with
//! [`from_f32`] and friends, always as little-endian `raw_data`.

use crate::onnx::proto::{tensor_proto::DataType, TensorProto};
use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use ndarray::{ArrayD, IxDyn};

/// The ONNX element type of a tensor, with a readable error for unknown codes.
pub fn data_type(t: &TensorProto) -> Result<DataType> {
    DataType::try_from(t.data_type()).map_err(|_| {
        anyhow::anyhow!(
            "tensor '{}' has unknown data_type {}",
            t.name(),
            t.data_type()
        )
    })
}

/// Short lowercase name used in reports and the ONNX text syntax (`float`, `int8`, ...).
pub fn type_name(dt: DataType) -> &'static str {
    use DataType::*;
    match dt {
        Undefined => "undefined",
        Float => "float",
        Uint8 => "uint8",
        Int8 => "int8",
        Uint16 => "uint16",
        Int16 => "int16",
        Int32 => "int32",
        Int64 => "int64",
        String => "string",
        Bool => "bool",
        Float16 => "float16",
        Double => "double",
        Uint32 => "uint32",
        Uint64 => "uint64",
        Complex64 => "complex64",
        Complex128 => "complex128",
        Bfloat16 => "bfloat16",
        Float8e4m3fn => "float8e4m3fn",
        Float8e4m3fnuz => "float8e4m3fnuz",
        Float8e5m2 => "float8e5m2",
        Float8e5m2fnuz => "float8e5m2fnuz",
        Uint4 => "uint4",
        Int4 => "int4",
        Float4e2m1 => "float4e2m1",
        Float8e8m0 => "float8e8m0",
        Uint2 => "uint2",
        Int2 => "int2",
        Float6e2m3 => "float6e2m3",
        Float6e3m2 => "float6e3m2",
    }
}

/// Storage size of one element in bits (sub-byte types are packed).
pub fn bits_per_element(dt: DataType) -> usize {
    use DataType::*;
    match dt {
        Uint2 | Int2 => 2,
        Uint4 | Int4 | Float4e2m1 => 4,
        Float6e2m3 | Float6e3m2 => 6,
        Uint8 | Int8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz
        | Float8e8m0 => 8,
        Uint16 | Int16 | Float16 | Bfloat16 => 16,
        Float | Int32 | Uint32 => 32,
        Int64 | Uint64 | Double | Complex64 => 64,
        Complex128 => 128,
        String | Undefined => 0,
    }
}

/// Dimensions as usize, refusing negative ones.
pub fn shape(t: &TensorProto) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| anyhow::anyhow!("tensor '{}' has negative dimension {d}", t.name()))
        })
        .collect()
}

/// Number of elements, checked for overflow.
pub fn element_count(t: &TensorProto) -> Result<usize> {
    shape(t)?
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("tensor '{}': element count overflows", t.name()))
}

/// Bytes the tensor's payload occupies when stored raw (packed for sub-byte types).
pub fn payload_bytes(t: &TensorProto) -> Result<usize> {
    let dt = data_type(t)?;
    if dt == DataType::String {
        return Ok(t.string_data.iter().map(|s| s.len()).sum());
    }
    let bits = element_count(t)?
        .checked_mul(bits_per_element(dt))
        .with_context(|| format!("tensor '{}': size overflows", t.name()))?;
    Ok(bits.div_ceil(8))
}

/// True when the payload lives in an external file (not yet inlined by the loader).
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(crate::onnx::proto::tensor_proto::DataLocation::External as i32)
}

fn raw(t: &TensorProto, elem_bytes: usize, n: usize) -> Result<Option<&[u8]>> {
    ensure!(
        !is_external(t),
        "tensor '{}' still refers to external data",
        t.name()
    );
    match &t.raw_data {
        Some(r) => {
            ensure!(
                n.checked_mul(elem_bytes) == Some(r.len()),
                "tensor '{}' raw_data has {} bytes, expected {} bytes for {} elements",
                t.name(),
                r.len(),
                n.saturating_mul(elem_bytes),
                n
            );
            Ok(Some(r))
        }
        None => Ok(None),
    }
}

fn check_len(t: &TensorProto, got: usize, n: usize, field: &str) -> Result<()> {
    ensure!(
        got == n,
        "tensor '{}' has {got} values in {field}, expected {n} for shape {:?}",
        t.name(),
        t.dims
    );
    Ok(())
}

/// NaN and ±inf counts of a real-valued tensor. float32 is read in place (a weight of a 2 GiB
/// model is not decoded into a copy twice its size); other types go through [`to_f64`].
pub fn count_nonfinite(t: &TensorProto) -> Result<(usize, usize)> {
    let count = |values: &mut dyn Iterator<Item = f64>| {
        values.fold((0, 0), |(nan, inf), v| {
            (nan + v.is_nan() as usize, inf + v.is_infinite() as usize)
        })
    };
    if data_type(t)? == DataType::Float {
        if let Some(r) = raw(t, 4, element_count(t)?)? {
            return Ok(count(
                &mut r
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
            ));
        }
    }
    Ok(count(&mut to_f64(t)?.iter().copied()))
}

/// Decode any real-valued tensor to f64 (exact for every type up to 32 bits and for f64).
pub fn to_f64(t: &TensorProto) -> Result<ArrayD<f64>> {
    let dt = data_type(t)?;
    let shape = shape(t)?;
    let n = element_count(t)?;
    use DataType::*;
    let values: Vec<f64> = match dt {
        Float => match raw(t, 4, n)? {
            Some(r) => r
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            None => {
                check_len(t, t.float_data.len(), n, "float_data")?;
                t.float_data.iter().map(|&v| v as f64).collect()
            }
        },
        Double => match raw(t, 8, n)? {
            Some(r) => r
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")))
                .collect(),
            None => {
                check_len(t, t.double_data.len(), n, "double_data")?;
                t.double_data.clone()
            }
        },
        Float16 | Bfloat16 => {
            let bits: Vec<u16> = match raw(t, 2, n)? {
                Some(r) => r
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
                None => {
                    check_len(t, t.int32_data.len(), n, "int32_data")?;
                    t.int32_data.iter().map(|&v| v as u16).collect()
                }
            };
            if dt == Float16 {
                bits.iter()
                    .map(|&b| half::f16::from_bits(b).to_f64())
                    .collect()
            } else {
                bits.iter()
                    .map(|&b| half::bf16::from_bits(b).to_f64())
                    .collect()
            }
        }
        Int8 | Uint8 | Int16 | Uint16 | Int32 | Bool => {
            let size = bits_per_element(dt) / 8;
            match raw(t, size, n)? {
                Some(r) => r
                    .chunks_exact(size)
                    .map(|c| match dt {
                        Int8 => c[0] as i8 as f64,
                        Uint8 | Bool => c[0] as f64,
                        Int16 => i16::from_le_bytes([c[0], c[1]]) as f64,
                        Uint16 => u16::from_le_bytes([c[0], c[1]]) as f64,
                        _ => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                    })
                    .collect(),
                None => {
                    check_len(t, t.int32_data.len(), n, "int32_data")?;
                    t.int32_data.iter().map(|&v| v as f64).collect()
                }
            }
        }
        Int64 => match raw(t, 8, n)? {
            Some(r) => r
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8")) as f64)
                .collect(),
            None => {
                check_len(t, t.int64_data.len(), n, "int64_data")?;
                t.int64_data.iter().map(|&v| v as f64).collect()
            }
        },
        Uint32 | Uint64 => match raw(t, bits_per_element(dt) / 8, n)? {
            Some(r) if dt == Uint32 => r
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Some(r) => r
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("chunk of 8")) as f64)
                .collect(),
            None => {
                check_len(t, t.uint64_data.len(), n, "uint64_data")?;
                t.uint64_data.iter().map(|&v| v as f64).collect()
            }
        },
        Int4 | Uint4 | Int2 | Uint2 => {
            // Packed low bits first: two 4-bit or four 2-bit values per byte (per `int32_data`
            // entry without raw data), signed types sign-extended.
            let bits = bits_per_element(dt);
            let per_byte = 8 / bits;
            let bytes = n.div_ceil(per_byte);
            let packed = match raw(t, 1, bytes)? {
                Some(r) => r.to_vec(),
                None => {
                    check_len(t, t.int32_data.len(), bytes, "int32_data")?;
                    t.int32_data.iter().map(|&v| v as u8).collect()
                }
            };
            let signed = matches!(dt, Int4 | Int2);
            let mask = (1u8 << bits) - 1;
            (0..n)
                .map(|i| {
                    let v = (packed[i / per_byte] >> ((i % per_byte) * bits)) & mask;
                    if signed && v >= 1 << (bits - 1) {
                        f64::from(v) - f64::from(1u32 << bits)
                    } else {
                        f64::from(v)
                    }
                })
                .collect()
        }
        other => bail!(
            "tensor '{}' has element type {} which cannot be read as numbers",
            t.name(),
            type_name(other)
        ),
    };
    ArrayD::from_shape_vec(IxDyn(&shape), values)
        .with_context(|| format!("tensor '{}': shape {:?}", t.name(), shape))
}

/// Decode any real-valued tensor to f32. A float32 payload is read straight into the result
/// (no f64 copy twice its size), and its mapped pages are released once read: the decoded copy
/// is what the caller works on.
pub fn to_f32(t: &TensorProto) -> Result<ArrayD<f32>> {
    if data_type(t)? == DataType::Float {
        let n = element_count(t)?;
        if let Some(r) = raw(t, 4, n)? {
            let values: Vec<f32> = r
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            crate::onnx::pages::release_pages(r);
            let shape = shape(t)?;
            return ArrayD::from_shape_vec(IxDyn(&shape), values)
                .with_context(|| format!("tensor '{}': shape {:?}", t.name(), shape));
        }
    }
    Ok(to_f64(t)?.mapv(|v| v as f32))
}

/// Decode an integer tensor (int64 shape/axes constants and the like).
pub fn to_i64(t: &TensorProto) -> Result<Vec<i64>> {
    let dt = data_type(t)?;
    if dt == DataType::Int64 {
        let n = element_count(t)?;
        return Ok(match raw(t, 8, n)? {
            Some(r) => r
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8")))
                .collect(),
            None => {
                check_len(t, t.int64_data.len(), n, "int64_data")?;
                t.int64_data.clone()
            }
        });
    }
    ensure!(
        matches!(
            dt,
            DataType::Int32 | DataType::Int8 | DataType::Uint8 | DataType::Int16 | DataType::Uint16
        ),
        "tensor '{}' is {}, expected an integer tensor",
        t.name(),
        type_name(dt)
    );
    Ok(to_f64(t)?.iter().map(|&v| v as i64).collect())
}

fn dims_of(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

/// Encode an f32 array as a FLOAT tensor with little-endian raw_data.
pub fn from_f32(name: &str, a: &ArrayD<f32>) -> TensorProto {
    let mut raw = Vec::with_capacity(a.len() * 4);
    for v in a.iter() {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    raw_tensor(name, DataType::Float, a.shape(), raw)
}

/// Encode an i64 vector of the given shape as an INT64 tensor.
pub fn from_i64(name: &str, shape: &[usize], values: &[i64]) -> TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_tensor(name, DataType::Int64, shape, raw)
}

/// Encode i32 values (int32 biases).
pub fn from_i32(name: &str, shape: &[usize], values: &[i32]) -> TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_tensor(name, DataType::Int32, shape, raw)
}

/// Encode i8 values.
pub fn from_i8(name: &str, shape: &[usize], values: &[i8]) -> TensorProto {
    raw_tensor(
        name,
        DataType::Int8,
        shape,
        values.iter().map(|&v| v as u8).collect(),
    )
}

/// Encode u8 values.
pub fn from_u8(name: &str, shape: &[usize], values: &[u8]) -> TensorProto {
    raw_tensor(name, DataType::Uint8, shape, values.to_vec())
}

/// Encode 4-bit values (INT4 when `signed`, else UINT4), packed two per byte, low nibble first.
pub fn from_4bit(name: &str, shape: &[usize], values: &[i8], signed: bool) -> TensorProto {
    let mut raw = vec![0u8; values.len().div_ceil(2)];
    for (i, &v) in values.iter().enumerate() {
        let nibble = (v as u8) & 0x0f;
        raw[i / 2] |= if i % 2 == 0 { nibble } else { nibble << 4 };
    }
    let dt = if signed {
        DataType::Int4
    } else {
        DataType::Uint4
    };
    raw_tensor(name, dt, shape, raw)
}

/// Encode f32 values as FLOAT16.
pub fn from_f16(name: &str, a: &ArrayD<f32>) -> TensorProto {
    let raw = a
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
        .collect();
    raw_tensor(name, DataType::Float16, a.shape(), raw)
}

/// A tensor with the given element type and raw little-endian payload.
pub fn raw_tensor(name: &str, dt: DataType, shape: &[usize], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims_of(shape),
        data_type: Some(dt as i32),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    #[test]
    fn f32_roundtrip_through_raw_and_float_data() {
        let a = arr1(&[1.5f32, -2.0, 3.25]).into_dyn();
        let t = from_f32("w", &a);
        assert_eq!(to_f32(&t).unwrap(), a);
        let typed = TensorProto {
            name: Some("w".into()),
            dims: vec![3],
            data_type: Some(DataType::Float as i32),
            float_data: vec![1.5, -2.0, 3.25],
            ..Default::default()
        };
        assert_eq!(to_f32(&typed).unwrap(), a);
    }

    #[test]
    fn int4_packs_low_nibble_first_and_sign_extends() {
        let t = from_4bit("q", &[3], &[-8, 7, -1], true);
        assert_eq!(t.raw_data.as_deref().unwrap(), &[0x78, 0x0f]);
        assert_eq!(
            to_f64(&t).unwrap().iter().copied().collect::<Vec<_>>(),
            vec![-8.0, 7.0, -1.0]
        );
    }

    #[test]
    fn wrong_payload_length_is_an_error_naming_the_tensor() {
        let mut t = from_f32("conv.w", &arr1(&[1.0f32, 2.0]).into_dyn());
        t.dims = vec![3];
        let err = to_f32(&t).unwrap_err().to_string();
        assert!(err.contains("conv.w") && err.contains("raw_data"), "{err}");
    }

    #[test]
    fn f16_and_int_types_decode() {
        let a = arr1(&[0.5f32, -1.0]).into_dyn();
        assert_eq!(to_f32(&from_f16("h", &a)).unwrap(), a);
        assert_eq!(to_i64(&from_i64("s", &[2], &[4, -1])).unwrap(), vec![4, -1]);
        let q = from_i8("q", &[2], &[-128, 127]);
        assert_eq!(to_f64(&q).unwrap().as_slice().unwrap(), &[-128.0, 127.0]);
    }
}
