#!/usr/bin/env python3
"""Interleaved ORT timing of silero-vad models on the same stream: `python3 benches/silero_ab.py
REF.onnx A.onnx [B.onnx]` prints ms/chunk and the median of per-round time ratios against the
first model (and B/A... second/third), 31 rounds of 300 held-out chunks, 1 ORT thread. The
chunks come from EVAL (a [N, 1, 576] .npy of held-out chunks, default
/tmp/ifquant/eval_chunks.npy; benches/silero_vad.py builds the same stream)."""
import importlib.util
import os
import sys

import numpy as np

spec = importlib.util.spec_from_file_location("b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "silero_bodies.py")); b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
paths = sys.argv[1:]
x = np.load(os.environ.get("EVAL", "/tmp/ifquant/eval_chunks.npy"))
feeds = [x[i:i+1] for i in range(300)] if x is not None and x.ndim == 2 else [c for c in x[:300]]
sess = [b.session(p, 1) for p in paths]
for s in sess: b.timed_stream(s, feeds[:30], True, 16000)
R = 31
t = np.zeros((R, len(paths)))
for r in range(R):
    for j, s in enumerate(sess):
        t[r, j] = b.timed_stream(s, feeds, True, 16000)
print("load", os.getloadavg())
for j, p in enumerate(paths):
    print(os.path.basename(p), "ms/chunk %.3f" % (1000*np.median(t[:, j])/len(feeds)), "ratio vs first (median of per-round) %.3f" % np.median(t[:, j]/t[:, 0]))
if len(paths) > 2:
    print("second/third per-round median %.3f" % np.median(t[:, 1]/t[:, 2]))
