#!/usr/bin/env python3
"""Every int4/int8 assignment of a small model, measured, against two loss predictions.

    cargo build && python3 benches/mixed_precision_exhaustive.py testdata/digits_smooth.onnx

BN is folded with `onnx-compress --passes fuse,cleanup`; weights are quantized here as the pass
does (symmetric per output channel, scale = max|w| / 7 or / 127, round half to even) and fed to
onnxruntime as graph inputs (activations stay float). On the 200 calibration samples, for each of
the 2^L assignments: the measured KL(fp32 || quantized) and the two second-order predictions of
BENCHMARKS.md: per-layer terms only, `Σ_l ½ ũ_lᵀ ũ_l`, and the joint model with cross-layer terms,
`½ ‖Σ_l ũ_l‖²` (`ũ_l`: the logit change with only layer l quantized, whitened by the softmax
Hessian diag(p) − ppᵀ). Prints Spearman(prediction, measured) and, per budget, whether each
prediction's minimum is the measured optimum. Needs numpy, onnx, onnxruntime, scipy.
"""

import itertools
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from scipy.stats import spearmanr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(model_path):
    fused = os.path.join(tempfile.mkdtemp(), "fused.onnx")
    subprocess.run([os.path.join(ROOT, "target/debug/onnx-compress"), model_path, "-o", fused,
                    "--passes", "fuse,cleanup", "-q"], check=True)
    m = onnx.load(fused)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    weights = [n.input[1] for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weights) <= 14, "2^L assignments: keep L small"
    kept = [i for i in m.graph.initializer if i.name not in weights]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    for w in weights:
        m.graph.input.append(onnx.helper.make_tensor_value_info(
            w, onnx.TensorProto.FLOAT, inits[w].shape))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    def quantize(w, bits):
        qmax = 2 ** (bits - 1) - 1
        s = np.abs(w.reshape(w.shape[0], -1)).max(1) / qmax
        s[s == 0] = 1
        s = s.reshape((-1,) + (1,) * (w.ndim - 1))
        return (np.clip(np.round(w / s), -qmax, qmax) * s).astype(np.float32)

    q = {(w, b): quantize(inits[w], b) for w in weights for b in (4, 8)}
    x = np.load(os.path.join(ROOT, "testdata/digits_calib_x.npy")).astype(np.float32)

    def run(bits):
        feed = {"input": x}
        for w in weights:
            feed[w] = inits[w] if bits.get(w) is None else q[(w, bits[w])]
        return sess.run(None, feed)[0].astype(np.float64)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    z0 = run({})
    p = softmax(z0)

    def kl(z):
        return (p * (np.log(p) - np.log(softmax(z)))).sum(1).mean()

    def quad(u):
        return 0.5 * ((p * u * u).sum(1) - (p * u).sum(1) ** 2).mean()

    u = {(w, b): run({w: b}) - z0 for w in weights for b in (4, 8)}
    n = np.array([inits[w].size for w in weights])
    rows = []
    for bits in itertools.product((4, 8), repeat=len(weights)):
        us = [u[(w, b)] for w, b in zip(weights, bits)]
        rows.append((bits, (np.array(bits) * n).sum() / n.sum(), kl(run(dict(zip(weights, bits)))),
                     sum(quad(v) for v in us), quad(sum(us))))
    measured = np.array([r[2] for r in rows])
    print(f"{os.path.basename(model_path)}: {len(weights)} layers, {len(rows)} assignments")
    for k, name in ((3, "per-layer terms"), (4, "joint (cross terms)")):
        rho = spearmanr(measured, [r[k] for r in rows]).correlation
        print(f"  Spearman(prediction, measured calibration KL), {name}: {rho:.3f}")
    for budget in (4.5, 5.0, 5.5):
        feasible = [i for i, r in enumerate(rows) if r[1] <= budget + 1e-9]
        best = min(feasible, key=lambda i: rows[i][2])
        picks = {name: min(feasible, key=lambda i: rows[i][k])
                 for k, name in ((3, "per-layer"), (4, "joint"))}
        ranked = sorted(feasible, key=lambda i: rows[i][2])
        print(f"  {budget} bits: {len(feasible)} feasible, measured optimum {rows[best][2]:.3e}; "
              + ", ".join(f"{k} pick ranks {ranked.index(i) + 1} ({rows[i][2]:.3e})"
                          for k, i in picks.items()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "testdata/digits_smooth.onnx"))
