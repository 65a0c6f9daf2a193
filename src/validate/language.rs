//! Language-model metrics: when the validation inputs are token windows (one integer input
//! `[batch, seq]`) and an output is logits `[batch, seq, vocab]`, compare the two models the
//! way a language model is used: by the next token they predict.
//!
//! Per window `w` of tokens `t_0 .. t_{T-1}` and each position `i`:
//! - **next-token agreement**: `argmax y[i] == argmax ŷ[i]` over all `T` positions (ties go to
//!   the lowest index in both models);
//! - **perplexity** with the window's own next tokens as targets (positions `0 .. T-2`, target
//!   `t_{i+1}`): `exp(mean(-log softmax(y[i])[t_{i+1}]))`, for each model, and the relative
//!   change `ppl(ŷ) / ppl(y) - 1`;
//! - **KL** `mean KL(softmax(y[i]) || softmax(ŷ[i]))` over all positions.
//!
//! Log-softmax is computed in f64 with the max subtracted. Windows of length 1 give no
//! perplexity term. A window token outside `[0, vocab)` makes perplexity unavailable (the
//! output is then not indexed by those tokens).

use ndarray::{ArrayD, ArrayView1, Axis};
use serde::Serialize;

/// Language-model comparison of one logits output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LanguageMetrics {
    /// Positions compared (windows x sequence length).
    pub positions: usize,
    /// Fraction of positions where both models predict the same next token.
    pub next_token_agreement: f64,
    /// Mean KL(original || output) of the next-token distributions, in nats.
    pub mean_kl: f64,
    /// Perplexity on the windows' own next tokens (None: no targets, or tokens out of range).
    pub perplexity_original: Option<f64>,
    pub perplexity_candidate: Option<f64>,
    /// `ppl(output) / ppl(original) - 1`.
    pub perplexity_change: Option<f64>,
    /// Next-token accuracy of each model against the windows' own next tokens.
    pub accuracy_original: Option<f64>,
    pub accuracy_candidate: Option<f64>,
    /// Targets scored for perplexity.
    pub targets: usize,
}

/// Sums over batches for one output.
#[derive(Debug, Clone, Default)]
pub struct LanguageAcc {
    positions: usize,
    agree: usize,
    kl: f64,
    nll_o: f64,
    nll_c: f64,
    hit_o: usize,
    hit_c: usize,
    targets: usize,
    out_of_range: bool,
}

/// Whether `tokens` (the one integer input) and `logits` are a token window and its logits.
pub fn applies(tokens: &[usize], logits: &[usize]) -> bool {
    tokens.len() == 2 && logits.len() == 3 && logits[..2] == *tokens && logits[2] >= 2
}

fn log_softmax(row: ArrayView1<f32>) -> Vec<f64> {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl LanguageAcc {
    /// Add one batch: `tokens` `[B, T]`, logits `[B, T, V]` of the original and the output.
    pub fn add(&mut self, tokens: &ArrayD<i64>, original: &ArrayD<f32>, candidate: &ArrayD<f32>) {
        let (b, t, v) = (
            original.shape()[0],
            original.shape()[1],
            original.shape()[2],
        );
        for w in 0..b {
            let lo = original.index_axis(Axis(0), w);
            let lc = candidate.index_axis(Axis(0), w);
            for i in 0..t {
                let po = log_softmax(lo.index_axis(Axis(0), i).into_dimensionality().unwrap());
                let pc = log_softmax(lc.index_axis(Axis(0), i).into_dimensionality().unwrap());
                let (ao, ac) = (argmax(&po), argmax(&pc));
                self.positions += 1;
                self.agree += usize::from(ao == ac);
                self.kl += po
                    .iter()
                    .zip(&pc)
                    .map(|(&a, &c)| a.exp() * (a - c))
                    .sum::<f64>();
                if i + 1 < t {
                    let target = tokens[[w, i + 1]];
                    if target < 0 || target as usize >= v {
                        self.out_of_range = true;
                        continue;
                    }
                    let k = target as usize;
                    self.nll_o -= po[k];
                    self.nll_c -= pc[k];
                    self.hit_o += usize::from(ao == k);
                    self.hit_c += usize::from(ac == k);
                    self.targets += 1;
                }
            }
        }
    }

    pub fn finish(&self) -> LanguageMetrics {
        let n = self.positions.max(1) as f64;
        let scored = self.targets > 0 && !self.out_of_range;
        let ppl = |nll: f64| scored.then(|| (nll / self.targets as f64).exp());
        let acc = |hits: usize| scored.then(|| hits as f64 / self.targets as f64);
        let (po, pc) = (ppl(self.nll_o), ppl(self.nll_c));
        LanguageMetrics {
            positions: self.positions,
            next_token_agreement: self.agree as f64 / n,
            mean_kl: self.kl / n,
            perplexity_original: po,
            perplexity_candidate: pc,
            perplexity_change: po.zip(pc).map(|(a, b)| b / a - 1.0),
            accuracy_original: acc(self.hit_o),
            accuracy_candidate: acc(self.hit_c),
            targets: if scored { self.targets } else { 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn perplexity_and_agreement_from_the_definition() {
        // One window [0, 1, 1], vocab 2.
        let tokens = ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![0i64, 1, 1]).unwrap();
        // Original: uniform at every position (ppl 2). Output: position 0 favours token 1,
        // position 1 favours token 0, position 2 favours token 0.
        let o = ArrayD::from_shape_vec(IxDyn(&[1, 3, 2]), vec![0.0f32; 6]).unwrap();
        let c = ArrayD::from_shape_vec(IxDyn(&[1, 3, 2]), vec![0.0f32, 1.0, 1.0, 0.0, 1.0, 0.0])
            .unwrap();
        let mut acc = LanguageAcc::default();
        acc.add(&tokens, &o, &c);
        let m = acc.finish();
        assert_eq!((m.positions, m.targets), (3, 2));
        // Ties resolve to token 0 in the original: agreement at positions 1 and 2.
        assert!((m.next_token_agreement - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.perplexity_original.unwrap() - 2.0).abs() < 1e-12);
        // Targets 1 then 1: p = e/(1+e), then 1/(1+e).
        let e = 1f64.exp();
        let nll = -((e / (1.0 + e)).ln() + (1.0 / (1.0 + e)).ln()) / 2.0;
        assert!((m.perplexity_candidate.unwrap() - nll.exp()).abs() < 1e-12);
        assert!(m.mean_kl > 0.0);
    }

    #[test]
    fn shapes_that_are_not_token_windows_do_not_apply() {
        assert!(applies(&[4, 33], &[4, 33, 256]));
        assert!(!applies(&[4, 33], &[4, 256]));
        assert!(!applies(&[4, 33], &[4, 32, 256]));
    }
}
