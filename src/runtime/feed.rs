//! [`Feed`]: one graph input's value in the element type the model declares for it. Calibration
//! and evaluation data, the validator's batches and the runner's inputs carry values as feeds,
//! so int64 token ids, int32 lengths, bool masks, rank-0 scalars (a sample rate) and float16
//! inputs reach tract exactly as given, never through an f32 round trip.
//!
//! Only float feeds are ever observed or reduced to statistics ([`Feed::as_f32`]); integer and
//! bool feeds pass through. [`RunInput`] lets [`super::Runner::run`] take plain `ArrayD<f32>`
//! (activations, weights: cast to the declared type as before) or feeds (fed as they are when
//! their type is the declared one).

use anyhow::{anyhow, ensure, Context, Result};
use half::f16;
use ndarray::{ArrayD, Axis, Slice};
use tract_onnx::prelude::Tensor;

use crate::onnx::proto::tensor_proto::DataType;

/// A graph input's value, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Feed {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I16(ArrayD<i16>),
    I8(ArrayD<i8>),
    U64(ArrayD<u64>),
    U32(ArrayD<u32>),
    U16(ArrayD<u16>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

/// Applies `$body` to the array inside any variant (`wrap`: and rebuilds the same variant).
macro_rules! each {
    ($feed:expr, $a:ident => $body:expr) => {
        match $feed {
            Feed::F32($a) => $body,
            Feed::F64($a) => $body,
            Feed::F16($a) => $body,
            Feed::I64($a) => $body,
            Feed::I32($a) => $body,
            Feed::I16($a) => $body,
            Feed::I8($a) => $body,
            Feed::U64($a) => $body,
            Feed::U32($a) => $body,
            Feed::U16($a) => $body,
            Feed::U8($a) => $body,
            Feed::Bool($a) => $body,
        }
    };
    (wrap $feed:expr, $a:ident => $body:expr) => {
        match $feed {
            Feed::F32($a) => Feed::F32($body),
            Feed::F64($a) => Feed::F64($body),
            Feed::F16($a) => Feed::F16($body),
            Feed::I64($a) => Feed::I64($body),
            Feed::I32($a) => Feed::I32($body),
            Feed::I16($a) => Feed::I16($body),
            Feed::I8($a) => Feed::I8($body),
            Feed::U64($a) => Feed::U64($body),
            Feed::U32($a) => Feed::U32($body),
            Feed::U16($a) => Feed::U16($body),
            Feed::U8($a) => Feed::U8($body),
            Feed::Bool($a) => Feed::Bool($body),
        }
    };
}

impl From<ArrayD<f32>> for Feed {
    fn from(a: ArrayD<f32>) -> Self {
        Feed::F32(a)
    }
}

impl Feed {
    pub fn shape(&self) -> &[usize] {
        each!(self, a => a.shape())
    }

    pub fn ndim(&self) -> usize {
        self.shape().len()
    }

    /// The ONNX element type.
    pub fn data_type(&self) -> DataType {
        match self {
            Feed::F32(_) => DataType::Float,
            Feed::F64(_) => DataType::Double,
            Feed::F16(_) => DataType::Float16,
            Feed::I64(_) => DataType::Int64,
            Feed::I32(_) => DataType::Int32,
            Feed::I16(_) => DataType::Int16,
            Feed::I8(_) => DataType::Int8,
            Feed::U64(_) => DataType::Uint64,
            Feed::U32(_) => DataType::Uint32,
            Feed::U16(_) => DataType::Uint16,
            Feed::U8(_) => DataType::Uint8,
            Feed::Bool(_) => DataType::Bool,
        }
    }

    /// ONNX spelling of the element type (`float`, `int64`, ...).
    pub fn type_name(&self) -> String {
        self.data_type().as_str_name().to_ascii_lowercase()
    }

    /// The values when this is a float32 feed (what observers and statistics read).
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Feed::F32(a) => Some(a),
            _ => None,
        }
    }

    /// Every value as f64 (exact for all integer values below 2^53), for checks and messages.
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            Feed::F32(a) => a.mapv(f64::from),
            Feed::F64(a) => a.clone(),
            Feed::F16(a) => a.mapv(|v| v.to_f64()),
            Feed::I64(a) => a.mapv(|v| v as f64),
            Feed::I32(a) => a.mapv(f64::from),
            Feed::I16(a) => a.mapv(f64::from),
            Feed::I8(a) => a.mapv(f64::from),
            Feed::U64(a) => a.mapv(|v| v as f64),
            Feed::U32(a) => a.mapv(f64::from),
            Feed::U16(a) => a.mapv(f64::from),
            Feed::U8(a) => a.mapv(f64::from),
            Feed::Bool(a) => a.mapv(|v| f64::from(u8::from(v))),
        }
    }

    /// Every value as i64 for integer and bool feeds; `None` for floats.
    fn to_i64(&self) -> Option<ArrayD<i64>> {
        Some(match self {
            Feed::I64(a) => a.clone(),
            Feed::I32(a) => a.mapv(i64::from),
            Feed::I16(a) => a.mapv(i64::from),
            Feed::I8(a) => a.mapv(i64::from),
            Feed::U64(a) => a.mapv(|v| i64::try_from(v).unwrap_or(i64::MAX)),
            Feed::U32(a) => a.mapv(i64::from),
            Feed::U16(a) => a.mapv(i64::from),
            Feed::U8(a) => a.mapv(i64::from),
            Feed::Bool(a) => a.mapv(|v| i64::from(u8::from(v))),
            _ => return None,
        })
    }

    pub fn is_float(&self) -> bool {
        matches!(self, Feed::F32(_) | Feed::F64(_) | Feed::F16(_))
    }

    /// Elements `range` along `axis` (a copy).
    pub fn slice_axis(&self, axis: usize, range: std::ops::Range<usize>) -> Feed {
        each!(wrap self, a => a.slice_axis(Axis(axis), Slice::from(range.clone())).to_owned())
    }

    /// A new axis of length 1 at `axis`.
    pub fn insert_axis(self, axis: usize) -> Feed {
        each!(wrap self, a => a.insert_axis(Axis(axis)))
    }

    /// Joins feeds of one element type along `axis`.
    pub fn concatenate(axis: usize, parts: &[&Feed]) -> Result<Feed> {
        let first = parts.first().context("nothing to join")?;
        macro_rules! join {
            ($variant:ident) => {{
                let views = parts
                    .iter()
                    .map(|p| match p {
                        Feed::$variant(a) => Ok(a.view()),
                        other => Err(anyhow!(
                            "cannot join {} and {} values",
                            first.type_name(),
                            other.type_name()
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Feed::$variant(ndarray::concatenate(Axis(axis), &views)?)
            }};
        }
        Ok(match first {
            Feed::F32(_) => join!(F32),
            Feed::F64(_) => join!(F64),
            Feed::F16(_) => join!(F16),
            Feed::I64(_) => join!(I64),
            Feed::I32(_) => join!(I32),
            Feed::I16(_) => join!(I16),
            Feed::I8(_) => join!(I8),
            Feed::U64(_) => join!(U64),
            Feed::U32(_) => join!(U32),
            Feed::U16(_) => join!(U16),
            Feed::U8(_) => join!(U8),
            Feed::Bool(_) => join!(Bool),
        })
    }

    /// Zeros of element type `dt` (synthetic integer and bool inputs).
    pub fn zeros(dt: DataType, shape: &[usize]) -> Result<Feed> {
        let z = ArrayD::<i64>::zeros(shape);
        Feed::I64(z).convert(dt)
    }

    /// This feed in element type `dt`: floats narrow or widen (f64 -> f32 rounds), integers
    /// convert when every value fits `dt`; a float feed for an integer type, or an integer
    /// feed for a float type, is refused (the caller names the input).
    pub fn convert(self, dt: DataType) -> Result<Feed> {
        if self.data_type() == dt {
            return Ok(self);
        }
        let float_target = matches!(dt, DataType::Float | DataType::Double | DataType::Float16);
        if self.is_float() {
            ensure!(
                float_target,
                "holds {} values, the model declares {}",
                self.type_name(),
                dt.as_str_name().to_ascii_lowercase()
            );
            let v = self.to_f64();
            return Ok(match dt {
                DataType::Float => Feed::F32(v.mapv(|x| x as f32)),
                DataType::Double => Feed::F64(v),
                _ => Feed::F16(v.mapv(f16::from_f64)),
            });
        }
        ensure!(
            !float_target,
            "holds {} values, the model declares {}",
            self.type_name(),
            dt.as_str_name().to_ascii_lowercase()
        );
        let v = self.to_i64().context("integer values")?;
        let (lo, hi): (i64, i64) = match dt {
            DataType::Int64 => (i64::MIN, i64::MAX),
            DataType::Int32 => (i32::MIN.into(), i32::MAX.into()),
            DataType::Int16 => (i16::MIN.into(), i16::MAX.into()),
            DataType::Int8 => (i8::MIN.into(), i8::MAX.into()),
            DataType::Uint64 => (0, i64::MAX),
            DataType::Uint32 => (0, u32::MAX.into()),
            DataType::Uint16 => (0, u16::MAX.into()),
            DataType::Uint8 => (0, u8::MAX.into()),
            DataType::Bool => (0, 1),
            other => anyhow::bail!(
                "element type {} is not supported for data",
                other.as_str_name().to_ascii_lowercase()
            ),
        };
        if let Some(bad) = v.iter().find(|&&x| x < lo || x > hi) {
            anyhow::bail!(
                "holds {} value {bad}, outside the range of the declared {}",
                self.type_name(),
                dt.as_str_name().to_ascii_lowercase()
            );
        }
        // In range: every `as` below is exact.
        Ok(match dt {
            DataType::Int64 => Feed::I64(v),
            DataType::Int32 => Feed::I32(v.mapv(|x| x as i32)),
            DataType::Int16 => Feed::I16(v.mapv(|x| x as i16)),
            DataType::Int8 => Feed::I8(v.mapv(|x| x as i8)),
            DataType::Uint64 => Feed::U64(v.mapv(|x| x as u64)),
            DataType::Uint32 => Feed::U32(v.mapv(|x| x as u32)),
            DataType::Uint16 => Feed::U16(v.mapv(|x| x as u16)),
            DataType::Uint8 => Feed::U8(v.mapv(|x| x as u8)),
            _ => Feed::Bool(v.mapv(|x| x != 0)),
        })
    }

    /// Whether every float value is finite (integer feeds always are).
    pub fn all_finite(&self) -> bool {
        match self {
            Feed::F32(a) => a.iter().all(|v| v.is_finite()),
            Feed::F64(a) => a.iter().all(|v| v.is_finite()),
            Feed::F16(a) => a.iter().all(|v| v.is_finite()),
            _ => true,
        }
    }

    /// The tract tensor holding these values.
    pub fn to_tensor(&self) -> Tensor {
        each!(self, a => Tensor::from(a.clone()))
    }

    /// A short rendering of a small feed's values (messages about scalars).
    pub fn describe_values(&self) -> String {
        let v = self.to_f64();
        let shown: Vec<String> = v.iter().take(4).map(|x| x.to_string()).collect();
        let more = if v.len() > 4 { ", ..." } else { "" };
        if v.ndim() == 0 {
            shown.join("")
        } else {
            format!("[{}{more}]", shown.join(", "))
        }
    }
}

/// A 64-bit digest of named feeds (name, element type, shape and every value's bits, inputs in
/// name order): two sets of feeds with the same digest are, but for a 2^-64 chance, the same
/// inputs. Calibration tags the outputs it keeps with it, so that validation uses them only for
/// the very rows they were computed on.
pub fn fingerprint<'a>(feeds: impl IntoIterator<Item = (&'a str, &'a Feed)>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut named: Vec<(&str, &Feed)> = feeds.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    // SipHash with fixed keys: the same digest in every run and process.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, feed) in named {
        name.hash(&mut h);
        (feed.data_type() as i32).hash(&mut h);
        feed.shape().hash(&mut h);
        // The tensor in standard layout, as tract is fed it.
        h.write(feed.to_tensor().as_bytes());
    }
    h.finish()
}

/// What [`super::Runner::run`] accepts for one input: float activations (cast to the input's
/// declared type, as always) or typed feeds.
pub trait RunInput {
    fn shape(&self) -> &[usize];
    fn to_tensor(&self) -> Tensor;
}

impl RunInput for ArrayD<f32> {
    fn shape(&self) -> &[usize] {
        ArrayD::shape(self)
    }
    fn to_tensor(&self) -> Tensor {
        Tensor::from(self.clone())
    }
}

impl RunInput for Feed {
    fn shape(&self) -> &[usize] {
        Feed::shape(self)
    }
    fn to_tensor(&self) -> Tensor {
        Feed::to_tensor(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn integers_convert_when_they_fit_and_floats_never_become_integers() {
        let ids = Feed::I32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![3, 70000]).unwrap());
        let wide = ids.clone().convert(DataType::Int64).unwrap();
        assert_eq!(
            wide.to_f64().iter().copied().collect::<Vec<_>>(),
            vec![3.0, 70000.0]
        );
        let err = ids.convert(DataType::Int16).unwrap_err().to_string();
        assert!(err.contains("70000"), "{err}");
        let f = Feed::F32(ArrayD::zeros(IxDyn(&[1])));
        assert!(f.clone().convert(DataType::Int64).is_err());
        assert_eq!(
            f.convert(DataType::Float16).unwrap().data_type(),
            DataType::Float16
        );
    }

    #[test]
    fn slicing_and_joining_keep_the_type() {
        let a = Feed::I64(ArrayD::from_shape_vec(IxDyn(&[2, 3]), (0..6).collect()).unwrap());
        let col = a.slice_axis(1, 1..2);
        assert_eq!(col.shape(), &[2, 1]);
        let joined = Feed::concatenate(1, &[&col, &col]).unwrap();
        assert_eq!(joined.data_type(), DataType::Int64);
        assert_eq!(
            joined.to_f64().iter().copied().collect::<Vec<_>>(),
            vec![1.0, 1.0, 4.0, 4.0]
        );
        let f = Feed::F32(ArrayD::zeros(IxDyn(&[2, 1])));
        assert!(Feed::concatenate(1, &[&col, &f]).is_err());
    }
}
