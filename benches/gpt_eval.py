#!/usr/bin/env python3
"""Perplexity, size and ONNX Runtime latency of compressed GPTs against fp32 and ORT's recipes.

    python3 benches/gpt_eval.py --dir /work/zoo/gpt [--bin onnx-compress] [--ort] [--kv]
        [--candidate NAME=path.onnx ...] [--run NAME="extra flags" ...]

For each row: perplexity and next-byte accuracy on eval.npy (held-out windows), size as a fraction
of gpt.onnx, and ONNX Runtime latency of one 128-token window on one thread, interleaved with fp32
in the same process and reported as a ratio (fp32 time / candidate time: >1 is faster).
`--run NAME="flags"` compresses gpt.onnx with the tool (`--calib DIR/calib` plus the flags).
`--ort` adds quantize_static (defaults), quantize_dynamic and MatMulNBits RTN block 32.
`--kv` checks gpt_kv.onnx-style candidates (`--kv-candidate NAME=path`): 32 greedy tokens from each
of the prompts in prompts.npy, agreement with fp32 by position.
Run it from outside the repository: ORT's quantizer leaves temporary files in the working directory.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def session(path, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def perplexity(s, ev):
    nll, hits, n = 0.0, 0, 0
    for w in ev:
        logits = s.run(None, {"input_ids": w[None, :-1]})[0][0].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        tgt = w[1:]
        nll -= logp[np.arange(len(tgt)), tgt].sum()
        hits += int((logits.argmax(-1) == tgt).sum())
        n += len(tgt)
    return math.exp(nll / n), hits / n


def latency_ratio(base, cand, x, rounds=15, reps=20):
    """Median over rounds of (fp32 time / candidate time), interleaved pair by pair."""
    for s in (base, cand):
        for _ in range(5):
            s.run(None, {"input_ids": x})
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            base.run(None, {"input_ids": x})
        t1 = time.perf_counter()
        for _ in range(reps):
            cand.run(None, {"input_ids": x})
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return float(np.median(ratios)), (t1 - t0) / reps * 1e3


def greedy(s, prompt, steps, n_layers, heads, hd):
    past = {f"past_key_values.{i}.{k}": np.zeros((1, heads, 0, hd), np.float32)
            for i in range(n_layers) for k in ("key", "value")}
    ids = prompt[None].astype(np.int64)
    out = []
    names = [o.name for o in s.get_outputs()]
    for _ in range(steps):
        res = dict(zip(names, s.run(None, {"input_ids": ids, **past})))
        nxt = int(res["logits"][0, -1].argmax())
        out.append(nxt)
        past = {k: res[k.replace("past_key_values", "present")] for k in past}
        ids = np.array([[nxt]], np.int64)
    return out


def ort_recipes(base, calib_dir, work):
    from onnxruntime.quantization import (CalibrationDataReader, QuantType, quantize_dynamic,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.files = sorted(os.path.join(calib_dir, f) for f in os.listdir(calib_dir))
            self.i = 0

        def get_next(self):
            if self.i >= len(self.files):
                return None
            self.i += 1
            return {"input_ids": np.load(self.files[self.i - 1])}

    out = {}
    p = os.path.join(work, "ort_static.onnx")
    quantize_static(base, p, Reader(), per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    out["ORT quantize_static"] = p
    p = os.path.join(work, "ort_dynamic.onnx")
    quantize_dynamic(base, p, weight_type=QuantType.QInt8)
    out["ORT quantize_dynamic"] = p
    try:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        q = MatMulNBitsQuantizer(onnx.load(base), block_size=32, is_symmetric=True)
        q.process()
        p = os.path.join(work, "ort_nbits.onnx")
        q.model.save_model_to_file(p)
        out["ORT MatMulNBits RTN b32"] = p
    except Exception as e:  # the quantizer's module moved between ORT releases
        print(f"MatMulNBits quantizer unavailable: {e}", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--bin", default="onnx-compress")
    ap.add_argument("--ort", action="store_true")
    ap.add_argument("--run", action="append", default=[])
    ap.add_argument("--candidate", action="append", default=[])
    ap.add_argument("--kv-candidate", action="append", default=[])
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32, help="greedy tokens per prompt (--kv-candidate)")
    ap.add_argument("--json")
    a = ap.parse_args()

    base = os.path.join(a.dir, "gpt.onnx")
    ev = np.load(os.path.join(a.dir, "eval.npy"))[: a.eval_windows]
    work = tempfile.mkdtemp(prefix="gpt_eval_")
    cands = {}
    if a.ort:
        cands.update(ort_recipes(base, os.path.join(a.dir, "calib"), work))
    for r in a.run:
        name, flags = r.split("=", 1)
        out = os.path.join(work, name.replace(" ", "_") + ".onnx")
        cmd = [a.bin, base, "-o", out, "--calib", os.path.join(a.dir, "calib")] + flags.split()
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{name}: FAILED {p.stderr.strip()[-400:]}")
            continue
        print(f"{name}: tool {time.time() - t0:.1f} s")
        cands[name] = out
    for c in a.candidate:
        name, path = c.split("=", 1)
        cands[name] = path

    fp = session(base)
    ppl0, acc0 = perplexity(fp, ev)
    size0 = os.path.getsize(base)
    x = ev[0][None, :-1]
    rows = [("fp32", ppl0, acc0, 1.0, 1.0, None)]
    for name, path in cands.items():
        try:
            s = session(path)
        except Exception as e:
            print(f"{name}: does not load in ORT: {str(e)[:300]}")
            continue
        ppl, acc = perplexity(s, ev)
        ratio, _ = latency_ratio(fp, s, x)
        rows.append((name, ppl, acc, os.path.getsize(path) / size0, ratio, path))

    print(f"\n{'model':34s} {'ppl':>8s} {'vs fp32':>8s} {'acc':>7s} {'size':>6s} {'speed':>6s}")
    for name, ppl, acc, size, ratio, _ in rows:
        print(f"{name:34s} {ppl:8.4f} {100 * (ppl / ppl0 - 1):+7.2f}% {100 * acc:6.2f}% {size:6.3f} {ratio:5.2f}x")

    if a.kv_candidate:
        kv0 = os.path.join(a.dir, "gpt_kv.onnx")
        prompts = np.load(os.path.join(a.dir, "prompts.npy"))
        s0 = session(kv0)
        shp = [i for i in s0.get_inputs() if i.name.startswith("past_key_values")]
        n_layers = len(shp) // 2
        heads, hd = shp[0].shape[1], shp[0].shape[3]
        ref = [greedy(s0, p, a.steps, n_layers, heads, hd) for p in prompts]
        for c in a.kv_candidate:
            name, path = c.split("=", 1)
            s = session(path)
            got = [greedy(s, p, a.steps, n_layers, heads, hd) for p in prompts]
            agree = np.mean([np.mean(np.array(r) == np.array(g)) for r, g in zip(ref, got)])
            print(f"KV {name}: greedy agreement {100 * agree:.1f}% over {len(prompts)} prompts x {a.steps} tokens, "
                  f"size {os.path.getsize(path) / os.path.getsize(kv0):.3f}")
    if a.json:
        json.dump([r[:5] for r in rows], open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
