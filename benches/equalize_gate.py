#!/usr/bin/env python3
"""Measured equalization / bias correction gate (issue 14, part 1): held-out SQNR per setting.

Usage: python3 benches/equalize_gate.py --bin BIN --zoo DIR [--out DIR] [--only a,b]
                                        [--configs off,always,auto,...]

For every zoo model (benches/make_models.py: model.onnx, calib.npy, eval.npy, meta.json) runs
`BIN model.onnx -o OUT -q --no-validate --calib calib.npy --method percentile ARGS` with the ARGS
of each config below, and measures the output on the held-out eval.npy in ONNX Runtime with
graph optimization disabled (benches/methods.py's Task: SQNR of the first output vs fp32, task
metric). Prints one markdown table; results.json in --out.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import methods  # noqa: E402

CONFIGS = {
    # per-tensor int8 weights
    "pt_off": ["--per-tensor", "--equalize", "off"],
    "pt_always": ["--per-tensor", "--equalize", "always"],
    "pt_auto": ["--per-tensor"],  # the measured gate (with --calib)
    "pt_bc_empirical": ["--per-tensor", "--equalize", "off", "--bias-correction", "empirical"],
    "pt_always_bc_empirical": ["--per-tensor", "--equalize", "always",
                               "--bias-correction", "empirical"],
    "pt_auto_bc_auto": ["--per-tensor", "--bias-correction", "auto"],
    "pt_always_absorb": ["--per-tensor", "--equalize", "always", "--absorb-high-bias"],
    "pt_auto_absorb": ["--per-tensor", "--absorb-high-bias"],
    # per-channel int8 weights (the default)
    "pc_default": [],
    "pc_always": ["--equalize", "always"],
    "pc_measured": ["--equalize", "measured"],
    "pc_bc_auto": ["--bias-correction", "auto"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", default="/tmp/autogate/bench")
    ap.add_argument("--only", default="")
    ap.add_argument("--configs", default="pt_off,pt_always,pt_auto")
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    names = [n for n in a.only.split(",") if n] or sorted(os.listdir(a.zoo))
    for name in names:
        d = os.path.join(a.zoo, name)
        if not os.path.exists(os.path.join(d, "meta.json")):
            continue
        meta = json.load(open(os.path.join(d, "meta.json")))
        task = methods.Task(d, meta)
        model, calib = os.path.join(d, "model.onnx"), os.path.join(d, "calib.npy")
        ev = np.load(os.path.join(d, "eval.npy"))
        seq_major = bool(meta.get("seq_major"))
        ref = methods.run_outputs(model, ev, seq_major)
        r = results.setdefault(name, {})
        for c in [c for c in a.configs.split(",") if c]:
            dst = os.path.join(a.out, f"{name}.{c}.onnx")
            cmd = [a.bin, model, "-o", dst, "-q", "--no-validate", "--calib", calib,
                   "--method", "percentile", "--report", dst + ".json"] + CONFIGS[c]
            if meta.get("input_shape"):
                cmd += ["--input-shape", meta["input_shape"]]
            wall, err = methods.run_tool(cmd, a.timeout)
            m = {"wall_s": wall, "cmd": " ".join(cmd)}
            if err is None:
                m.update(task.metrics(methods.run_outputs(dst, ev, seq_major), ref))
            else:
                m["error"] = err
            r[c] = m
            print(f"   {name} {c}: sqnr {m.get('sqnr_db')} task {m.get('task')} "
                  f"{wall:.1f}s {m.get('error', '')}", file=sys.stderr, flush=True)
            json.dump(results, open(path, "w"), indent=1)
    configs = [c for c in a.configs.split(",") if c]
    print("| model | " + " | ".join(configs) + " |")
    print("|---" * (len(configs) + 1) + "|")
    for name in names:
        if name not in results:
            continue
        cells = []
        for c in configs:
            m = results[name].get(c)
            cells.append("-" if not m else (f"{m['sqnr_db']:.2f} / {m['task']:.1f} ({m['wall_s']:.0f}s)"
                                            if "sqnr_db" in m else "fails"))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
