#!/usr/bin/env python3
"""ONNX Runtime's own static quantizer on the five silero-vad models, for BENCHMARKS.md.

Reads the calibration feeds `benches/silero_vad.py` wrote (`WORK/<model>.calib/*.npz`, the fp32
model's own streaming states) and runs `onnxruntime.quantization.quantize_static` (QDQ, per-channel
int8 weights, uint8 activations, MinMax: its defaults otherwise); then streams the same held-out
audio as silero_vad.py through the fp32 and the quantized model and prints size ratio and speech
F1 against the fp32 decisions (prob > 0.5), or the error.

Usage: python3 benches/silero_vad_ort.py [--work /tmp/silero_bench]
"""

import argparse
import glob
import importlib.util
import os
import sys
import tempfile

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "silero_bench"))
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("bench", os.path.join(here, "silero_vad.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import silero_vad

    data = os.path.join(os.path.dirname(silero_vad.__file__), "data")
    with tempfile.TemporaryDirectory() as tmp:
        eval_chunks = bench.chunks(bench.stream(bench.EVAL_TEXT, 2, tmp))

    class Reader(CalibrationDataReader):
        def __init__(self, files):
            self.files = iter(files)

        def get_next(self):
            f = next(self.files, None)
            return None if f is None else dict(np.load(f))

    print("| model | ORT quantize_static | size ratio | F1 vs fp32 |")
    print("|---|---|---|---|")
    for name in bench.MODELS:
        src = os.path.join(data, name)
        out = os.path.join(args.work, name.replace(".onnx", "") + ".ort_qdq.onnx")
        files = sorted(glob.glob(os.path.join(args.work, name + ".calib", "*.npz")))
        try:
            quantize_static(src, out, Reader(files), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
            p_ref, _ = bench.stream_run(bench.session(src), eval_chunks)
            p_out, _ = bench.stream_run(bench.session(out), eval_chunks)
            f1 = bench.f1(p_ref > 0.5, p_out > 0.5)
            ratio = os.path.getsize(out) / os.path.getsize(src)
            print(f"| {name} | ok | {ratio:.3f} | {f1:.4f} |", flush=True)
        except Exception as e:  # noqa: BLE001 - report, go on with the next model
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            print(f"| {name} | fails: {type(e).__name__}: {msg} | - | - |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
