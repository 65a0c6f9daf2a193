#!/usr/bin/env python3
"""Activation Q/DQ inside If bodies on the five silero-vad models: size, speech F1, tract
validation and ONNX Runtime speed, with and without `--body-activations`.

Audio, chunking, calibration feeds and F1 are those of benches/silero_vad.py (espeak-ng speech
between silence and noise; 576-sample chunks with the fp32 model's own streaming state; F1 of the
compressed model's decisions (prob > 0.5) against the fp32 model's on a held-out stream).

Variants per model: plain `--calib` (body activations off, the default), plain with
`--body-activations on`, and, where the model has `sr`, `--fix-input sr=16000` with the
streaming shapes (tract validates directly there).

Speed: the held-out stream's first N chunks run through the fp32 model and the output in one
process, ONNX Runtime CPU with 1 intra-op and 1 inter-op thread, interleaved (fp32, output,
fp32, output, ...), ROUNDS rounds; the figure is the median of the per-round time ratios
(output / fp32), so load drift hits both sides alike.

Usage: python3 benches/silero_bodies.py --bin target/release/onnx-compress [--work DIR]
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def load_bench():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("silero_bench", os.path.join(here, "silero_vad.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def session(path, threads=None):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def timed_stream(sess, feeds, has_sr, sr):
    has_sr = has_sr and any(i.name == "sr" for i in sess.get_inputs())
    state = np.zeros((2, 1, 128), np.float32)
    srv = np.array(sr, np.int64)
    t = time.perf_counter()
    for x in feeds:
        feed = {"input": x, "state": state}
        if has_sr:
            feed["sr"] = srv
        _, state = sess.run(None, feed)
    return time.perf_counter() - t


def speed_ratio(ref_path, out_path, feeds, has_sr, sr, rounds):
    a, b = session(ref_path, 1), session(out_path, 1)
    timed_stream(a, feeds[:20], has_sr, sr)
    timed_stream(b, feeds[:20], has_sr, sr)
    ratios = []
    for _ in range(rounds):
        ta = timed_stream(a, feeds, has_sr, sr)
        tb = timed_stream(b, feeds, has_sr, sr)
        ratios.append(tb / ta)
    return float(np.median(ratios)), float(np.min(ratios)), float(np.max(ratios))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/onnx-compress")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "silero_bodies"))
    ap.add_argument("--calib-chunks", type=int, default=400)
    ap.add_argument("--speed-chunks", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--models", default="")
    args = ap.parse_args()
    bench = load_bench()
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import silero_vad

    data = os.path.join(os.path.dirname(silero_vad.__file__), "data")
    os.makedirs(args.work, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        calib_audio = bench.stream(bench.CALIB_TEXT, 1, tmp)
        eval_audio = bench.stream(bench.EVAL_TEXT, 2, tmp)
    calib_chunks = bench.chunks(calib_audio)[: args.calib_chunks]
    eval_chunks = bench.chunks(eval_audio)
    models = [m for m in bench.MODELS if not args.models or m.replace(".onnx", "") in args.models.split(",")]
    rows = []
    for name in models:
        src = os.path.join(data, name)
        ref = bench.session(src)
        has_sr = any(i.name == "sr" for i in ref.get_inputs())
        _, states = bench.stream_run(ref, calib_chunks)
        cdir = os.path.join(args.work, name + ".calib")
        os.makedirs(cdir, exist_ok=True)
        for k, (x, s) in enumerate(zip(calib_chunks, states)):
            feed = {"input": x, "state": s}
            if has_sr:
                feed["sr"] = np.array(bench.SR, np.int64)
            np.savez(os.path.join(cdir, f"feed_{k:04d}.npz"), **feed)
        p_ref, _ = bench.stream_run(ref, eval_chunks)
        d_ref = p_ref > 0.5
        shapes = ["--input-shape", f"input:1x{bench.CHUNK + bench.CONTEXT}",
                  "--input-shape", "state:2x1x128"]
        variants = [("plain (body activations off, the default)", []),
                    ("plain, --body-activations on", ["--body-activations", "on"])]
        if has_sr:
            variants.append(("--fix-input sr=16000 + shapes", ["--fix-input", f"sr={bench.SR}"] + shapes))
        for label, extra in variants:
            tag = name.replace(".onnx", "") + "_" + "".join(c if c.isalnum() else "_" for c in label)
            out = os.path.join(args.work, tag + ".onnx")
            rep = os.path.join(args.work, tag + ".json")
            cmd = [args.bin, src, "-o", out, "--calib", cdir, "--report", rep, "--force"] + extra
            r = subprocess.run(cmd, capture_output=True, text=True)
            row = {"model": name, "variant": label, "exit": r.returncode}
            if r.returncode != 0:
                row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            report = json.load(open(rep))
            row["bytes_pct"] = round(100 * report["size_ratio"], 1)
            v = report.get("validation") or {}
            row["validation"] = v.get("status")
            row["validation_note"] = ((v.get("notes") or [""])[0])[:400]
            q = next((p for p in report.get("passes", []) if p.get("name") == "quantize"), {})
            bodies = ((q.get("details") or {}).get("bodies") or {}).get("bodies") or []
            row["body_qdq"] = sum(b.get("activation_pairs", 0) for b in bodies)
            p_out, _ = bench.stream_run(session(out), eval_chunks)
            row["f1_vs_fp32"] = round(bench.f1(d_ref, p_out > 0.5), 4)
            row["max_prob_diff"] = round(float(np.max(np.abs(p_out - p_ref))), 4)
            med, lo, hi = speed_ratio(src, out, eval_chunks[: args.speed_chunks], has_sr, bench.SR,
                                      args.rounds)
            row["ort_time_ratio"] = round(med, 3)
            row["ort_time_ratio_range"] = [round(lo, 3), round(hi, 3)]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\neval chunks: {len(eval_chunks)}, calibration chunks: {len(calib_chunks)}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| model | variant | bytes | F1 vs fp32 | validation | body Q/DQ | ORT time / fp32 (median, range) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r.get('bytes_pct', '-')}% | {r.get('f1_vs_fp32', '-')} | "
              f"{r.get('validation', r.get('error', '-'))} | {r.get('body_qdq', '-')} | "
              f"{r.get('ort_time_ratio', '-')} {r.get('ort_time_ratio_range', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
