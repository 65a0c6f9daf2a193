#!/usr/bin/env python3
"""Compress the five silero-vad models (from the silero-vad pip package) with real audio.

Speech is synthesized with espeak-ng (several voices and speeds), resampled to 16 kHz and laid
out between stretches of silence and noise. The stream is cut into chunks of 512 samples; each
model sees `input` = the 64 samples of context before the chunk followed by the chunk (576
samples, what the package's own wrapper feeds), `state` = the fp32 model's own streaming state
(zeros at the start) and `sr` = 16000 where the model has that input.

Calibration: one .npz per chunk (keys = input names) from one stream; held-out evaluation: a
second stream with other sentences. For each model the script runs
`onnx-compress MODEL -o OUT --calib DIR --report R.json`; for the models with `sr` or symbolic
shapes also with `--input-shape input:1x576 --input-shape state:2x1x128` (the streaming shapes:
they let the batch-of-one `If`s fold) and `--fix-input sr=16000` where the model has `sr`; and
each of those again with `--target-size 0.4` (a size budget the mixed-precision pass spends on
the layers whose Hessian says they need it). Then it streams the
held-out audio through the fp32 and the compressed model in onnxruntime (each with its own state)
and reports the size ratio, the validation status, and the speech F1 of the compressed model's
decisions (prob > 0.5) against the fp32 model's decisions.

Usage: python3 benches/silero_vad.py [--bin target/debug/onnx-compress] [--work /tmp/silero_bench]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import wave

import numpy as np
import onnx
import onnxruntime as ort
from scipy.signal import resample_poly

MODELS = [
    "silero_vad.onnx",
    "silero_vad_16k_op15.onnx",
    "silero_vad_op18_ifless.onnx",
    "silero_vad_half.onnx",
    "silero_vad_openvino_16k.onnx",
]
CHUNK, CONTEXT, SR = 512, 64, 16000

CALIB_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A large fawn jumped quickly over white zinc boxes while the music played.",
    "We will meet at nine in the morning to discuss the budget for next year.",
    "Voice activity detection separates speech from silence and background noise.",
    "Turn left at the second light, then keep going until you see the old church.",
]
EVAL_TEXT = [
    "Six spoons of fresh snow peas and five thick slabs of blue cheese.",
    "The weather tomorrow will be cloudy with a chance of rain in the afternoon.",
    "Could you send me the report before the end of the day, thank you.",
    "She sells sea shells by the sea shore, and the shells she sells are surely real.",
    "Numbers like four hundred and twenty seven are read aloud slowly and clearly.",
    "After dinner they walked along the beach and watched the sun go down.",
]
VOICES = ["en", "en-us", "en+f3", "en+m3", "en-gb"]


def speak(text, voice, speed, tmp):
    path = os.path.join(tmp, "s.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", path, text], check=True)
    with wave.open(path) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    g = np.gcd(rate, SR)
    return resample_poly(x, SR // g, rate // g).astype(np.float32)


def stream(texts, seed, tmp):
    """Speech segments separated by 0.3-1.5 s of silence or noise, plus light noise throughout."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, t in enumerate(texts):
        gap = int(rng.uniform(0.3, 1.5) * SR)
        kind = rng.integers(3)
        level = [0.0005, 0.005, 0.02][kind]
        parts.append((rng.standard_normal(gap) * level).astype(np.float32))
        voice = VOICES[(i + seed) % len(VOICES)]
        speech = speak(t, voice, int(rng.integers(130, 190)), tmp)
        parts.append(speech * rng.uniform(0.3, 0.9))
    parts.append(np.zeros(SR // 2, np.float32))
    x = np.concatenate(parts)
    x += rng.standard_normal(len(x)).astype(np.float32) * 0.001
    return np.clip(x, -1, 1).astype(np.float32)


def chunks(x):
    n = len(x) // CHUNK
    ctx = np.zeros(CONTEXT, np.float32)
    out = []
    for k in range(n):
        c = x[k * CHUNK:(k + 1) * CHUNK]
        out.append(np.concatenate([ctx, c])[None, :].astype(np.float32))
        ctx = c[-CONTEXT:]
    return out


def session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def stream_run(sess, feeds_in):
    """Probabilities over the chunks, carrying the model's own state; also the states fed."""
    names = [i.name for i in sess.get_inputs()]
    state = np.zeros((2, 1, 128), np.float32)
    probs, states = [], []
    for x in feeds_in:
        feed = {"input": x, "state": state}
        if "sr" in names:
            feed["sr"] = np.array(SR, np.int64)
        states.append(state)
        out, state = sess.run(None, feed)
        probs.append(float(np.asarray(out).reshape(-1)[0]))
    return np.array(probs), states


def f1(ref, got):
    tp = int(np.sum(ref & got))
    fp = int(np.sum(~ref & got))
    fn = int(np.sum(ref & ~got))
    return 2 * tp / max(2 * tp + fp + fn, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/onnx-compress")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "silero_bench"))
    ap.add_argument("--calib-chunks", type=int, default=400)
    args = ap.parse_args()
    # This script shares the package's name: import the package, not this file.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import silero_vad

    data = os.path.join(os.path.dirname(silero_vad.__file__), "data")
    os.makedirs(args.work, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        calib_audio = stream(CALIB_TEXT, 1, tmp)
        eval_audio = stream(EVAL_TEXT, 2, tmp)
    calib_chunks = chunks(calib_audio)[: args.calib_chunks]
    eval_chunks = chunks(eval_audio)
    rows = []
    for name in MODELS:
        src = os.path.join(data, name)
        ref = session(src)
        has_sr = any(i.name == "sr" for i in ref.get_inputs())
        # Calibration feeds: the fp32 model's own states along the calibration stream.
        _, states = stream_run(ref, calib_chunks)
        cdir = os.path.join(args.work, name + ".calib")
        os.makedirs(cdir, exist_ok=True)
        for k, (x, s) in enumerate(zip(calib_chunks, states)):
            feed = {"input": x, "state": s}
            if has_sr:
                feed["sr"] = np.array(SR, np.int64)
            np.savez(os.path.join(cdir, f"feed_{k:04d}.npz"), **feed)
        p_ref, _ = stream_run(ref, eval_chunks)
        d_ref = p_ref > 0.5
        shapes = ["--input-shape", f"input:1x{CHUNK + CONTEXT}", "--input-shape", "state:2x1x128"]
        symbolic = any(d.dim_param for i in onnx.load(src).graph.input
                       for d in i.type.tensor_type.shape.dim)
        # Plain --calib; the streaming shapes (with sr fixed where the model has it), which
        # collapse the shape-dependent Ifs; and each of those with a 40% size budget spent by
        # the Hessian-guided mixed-precision pass.
        streaming = (["--fix-input", f"sr={SR}"] if has_sr else []) + shapes
        variants = [("-", [])]
        if has_sr or symbolic:
            variants.append(("fixed sr, shapes" if has_sr else "shapes", streaming))
        variants += [(v + ", --target-size 0.4" if v != "-" else "--target-size 0.4",
                      e + ["--target-size", "0.4"]) for v, e in list(variants)]
        for label, extra in variants:
            tag = name.replace(".onnx", "") + "_" + "".join(c if c.isalnum() else "_" for c in label)
            out = os.path.join(args.work, tag + ".int8.onnx")
            rep = os.path.join(args.work, tag + ".json")
            cmd = [args.bin, src, "-o", out, "--calib", cdir, "--report", rep, "--force"] + extra
            r = subprocess.run(cmd, capture_output=True, text=True)
            row = {"model": name, "variant": label, "exit": r.returncode}
            if r.returncode != 0:
                row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            report = json.load(open(rep))
            row["size_ratio"] = round(report["size_ratio"], 3)
            v = report.get("validation") or {}
            row["validation"] = v.get("status")
            row["validation_reason"] = (v.get("reason") or "")[:120]
            try:
                p_out, _ = stream_run(session(out), eval_chunks)
                row["f1_vs_fp32"] = round(f1(d_ref, p_out > 0.5), 4)
                row["speech_chunks_fp32"] = int(d_ref.sum())
                row["max_prob_diff"] = round(float(np.max(np.abs(p_out - p_ref))), 4)
            except Exception as e:  # noqa: BLE001 - report, go on with the next model
                row["ort_error"] = str(e)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\neval chunks: {len(eval_chunks)}, calibration chunks: {len(calib_chunks)}")
    print("| model | variant | exit | size ratio | validation | F1 vs fp32 | max prob diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {r['exit']} | {r.get('size_ratio', '-')} | "
            f"{r.get('validation', r.get('error', '-'))} | {r.get('f1_vs_fp32', '-')} | "
            f"{r.get('max_prob_diff', '-')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
