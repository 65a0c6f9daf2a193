//! The validator's view of a `TensorProto`'s payload: integer tensors of every width ONNX
//! quantization uses (2 to 64 bits) and the float types scales and weights come in (f32, f16,
//! bf16, f64), decoded by [`crate::onnx::tensor`] (storage rules there) with the type checks and
//! messages the validator needs, and float tensors written back for simulation graphs.

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

/// Decodes an integer tensor (int2..int32, uint2..uint32, bool; int64/uint64 exact up to 2^53,
/// which quantization never reaches) to `i64` values, through the IR's decoder (which checks the
/// payload against the dims).
pub(crate) fn decode_ints(t: &TensorProto) -> Result<Vec<i64>> {
    let dt = data_type(t);
    ensure!(
        matches!(
            dt,
            DataType::Int2
                | DataType::Uint2
                | DataType::Int4
                | DataType::Uint4
                | DataType::Int8
                | DataType::Uint8
                | DataType::Bool
                | DataType::Int16
                | DataType::Uint16
                | DataType::Int32
                | DataType::Uint32
                | DataType::Int64
                | DataType::Uint64
        ),
        "tensor '{}' has type {}, expected an integer type",
        t.name(),
        dtype_name(t.data_type())
    );
    if t.data_location == Some(1) {
        bail!(
            "tensor '{}' still points to external data; inline it before validating",
            t.name()
        );
    }
    Ok(crate::onnx::tensor::to_f64(t)?
        .iter()
        .map(|&v| v as i64)
        .collect())
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
    Ok(crate::onnx::tensor::to_f32(t)?.into_iter().collect())
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
        // 2-bit: four per byte, lowest bits first: 0xE4 = 0b11_10_01_00.
        let t = raw(DataType::Int2, &[5], &[0xE4, 0x03]);
        assert_eq!(decode_ints(&t).unwrap(), vec![0, 1, -2, -1, -1]);
        let t = raw(DataType::Uint2, &[4], &[0xE4]);
        assert_eq!(decode_ints(&t).unwrap(), vec![0, 1, 2, 3]);
        let float = raw(DataType::Float, &[1], &[0, 0, 0, 0]);
        assert!(decode_ints(&float).is_err());
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
