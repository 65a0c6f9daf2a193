//! Scalar operands of int8 elementwise ops (the placement's `scalar_operands` rules, see
//! [`crate::passes::target::Policy::scalar_operands`]): inserted after the activation Q/DQ
//! pairs, from the plan's [`Plan::constants`] and [`Plan::scaled`].
//!
//! A scalar constant `c` read by an int8 `Add`/`Mul` becomes a uint8 constant behind a
//! DequantizeLinear, exact by construction (ONNX Runtime then fuses QLinearAdd/QLinearMul):
//! ```text
//! before: c = 3.0 (initializer)
//! after:  c = DequantizeLinear(c_q = 1 (uint8), c_s = 3.0, c_z = 0)    # (1 - 0) * 3.0 = 3.0
//!         (c < 0: c_q = 0, c_z = 1, c_s = -c; c = 0: c_q = 0, c_z = 0, c_s = 1)
//! ```
//! A positive scalar gain on an int8 value costs nothing: `k * DQ(q; s, z) = DQ(q; k s, z)`.
//! ```text
//! before: t -> Q -> t_q -> DQ(s_t, z_t) -> t ; y = Mul(t, k)
//! after:  t -> Q -> t_q -> DQ(s_t, z_t) -> t ; y = DequantizeLinear(t_q, k s_t, z_t)
//! ```
//! (`t` itself may be such a `y`: gains along a chain multiply.) The reader of `y` sees a
//! DequantizeLinear like any other int8 input (HardSwish's `1/6`, HardSigmoid's `alpha`,
//! PP-OCR's learnable scales after each activation).

use super::insert::Namer;
use super::placement::Plan;
use crate::calibrate::params::{ActScheme, QParams};
use crate::ir::{op, Graph, Patch};
use crate::onnx::tensor;
use anyhow::{bail, Context, Result};

/// The uint8 code, scale and zero point storing `c` exactly: `(q - z) * s = c`.
pub fn exact_code(c: f32) -> (u8, f32, u8) {
    if c > 0.0 {
        (1, c, 0)
    } else if c < 0.0 {
        (0, -c, 1)
    } else {
        (0, 1.0, 0)
    }
}

/// Replace every constant of `plan.constants` by its exact uint8 form (see the module docs).
pub fn insert_constants(g: &mut Graph, namer: &mut Namer, plan: &Plan) -> Result<()> {
    for c in &plan.constants {
        let t = g
            .constant(c)
            .with_context(|| format!("scalar operand '{c}' is no longer a constant"))?;
        let shape = tensor::shape(t)?;
        let v = tensor::to_f32(t)?;
        let Some(&value) = v.iter().next().filter(|_| v.len() == 1) else {
            bail!("scalar operand '{c}' has {} values", v.len());
        };
        let (q, s, z) = exact_code(value);
        let [cq, cs, cz, dqn] = namer.take(
            g,
            'c',
            c,
            [
                ("quantized", "q"),
                ("scale", "s"),
                ("zero_point", "z"),
                ("DequantizeLinear", "DQ"),
            ],
        );
        super::insert::replace_constant(
            g,
            c,
            vec![
                tensor::from_u8(&cq, &shape, &[q]),
                super::insert::scale_tensor(&cs, &[s], false),
                tensor::from_u8(&cz, &[], &[z]),
            ],
            op::node("DequantizeLinear", &dqn, &[&cq, &cs, &cz], &[c]),
        )?;
    }
    Ok(())
}

/// The int8 tensor (QuantizeLinear output) behind activation `t` after its Q/DQ insertion.
fn quantized_of(g: &Graph, t: &str) -> Option<String> {
    if let Some(p) = g.producer_node(t) {
        let n = g.node(p);
        if n.op_type() == "DequantizeLinear" {
            return n.input.first().cloned();
        }
    }
    // A graph input keeps its name; its QuantizeLinear reads it.
    g.consumers(t).iter().find_map(|&(ix, _)| {
        let n = g.node(ix);
        (n.op_type() == "QuantizeLinear").then(|| n.output.first().cloned())?
    })
}

/// Replace each `y = Mul(t, k)` of `plan.scaled` by a DequantizeLinear of `t`'s int8 value
/// with scale `k s_t` (the plan's activations must be inserted already); `params_of` gives
/// `t`'s activation parameters.
pub fn insert_scaled(
    g: &mut Graph,
    namer: &mut Namer,
    plan: &Plan,
    params_of: impl Fn(&str) -> Result<QParams>,
    scheme: ActScheme,
) -> Result<()> {
    for y in plan.scaled.keys() {
        let Some((base, gain)) = plan.scaled_base(y) else {
            continue;
        };
        let p = params_of(&base)?;
        let q = quantized_of(g, &base)
            .with_context(|| format!("no QuantizeLinear output behind '{base}' for '{y}'"))?;
        let Some(mul) = g.producer_node(y) else {
            bail!("scaled value '{y}' has no producer");
        };
        let [s, z, dqn] = namer.take(
            g,
            'a',
            y,
            [
                ("scale", "s"),
                ("zero_point", "z"),
                ("DequantizeLinear", "DQ"),
            ],
        );
        let zp = match scheme {
            ActScheme::U8Asymmetric => tensor::from_u8(&z, &[], &[p.zero_point as u8]),
            ActScheme::I8Symmetric => tensor::from_i8(&z, &[], &[p.zero_point as i8]),
        };
        g.apply(Patch {
            remove: vec![mul],
            add: vec![op::node("DequantizeLinear", &dqn, &[&q, &s, &z], &[y])],
            initializers: vec![
                super::insert::scale_tensor(&s, &[p.scale * gain], false),
                zp,
            ],
            anchor: Some(mul),
            ..Default::default()
        })
        .with_context(|| format!("absorbing the gain of '{y}' into a DequantizeLinear"))?;
    }
    // An activation read only through gains has no reader left on its own DequantizeLinear;
    // ONNX Runtime would still run it (and the layout Transposes before it) at every inference.
    let dead: Vec<_> = plan
        .scaled
        .values()
        .map(|(t, _)| t)
        .chain(plan.scaled.keys())
        .filter(|t| g.use_count(t) == 0)
        .filter_map(|t| g.producer_node(t))
        .filter(|&ix| g.node(ix).op_type() == "DequantizeLinear")
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !dead.is_empty() {
        g.apply(Patch {
            remove: dead,
            ..Default::default()
        })
        .context("removing DequantizeLinear nodes whose value only gains read")?;
    }
    Ok(())
}

/// Parameters of the scaled values (`k s_t`, `z_t`), for the int32 biases of layers reading
/// them.
pub fn scaled_params(
    plan: &Plan,
    params: &indexmap::IndexMap<String, QParams>,
) -> Vec<(String, QParams)> {
    plan.scaled
        .keys()
        .filter_map(|y| {
            let (base, gain) = plan.scaled_base(y)?;
            let p = params.get(&base)?;
            Some((
                y.clone(),
                QParams {
                    scale: p.scale * gain,
                    ..*p
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_codes_are_exact() {
        for c in [3.0f32, -2.5, 0.0, 1.0 / 6.0, 1e-30, -7e12] {
            let (q, s, z) = exact_code(c);
            assert_eq!((f32::from(q) - f32::from(z)) * s, c, "{c}");
            assert!(s > 0.0);
        }
    }
}
