#!/usr/bin/env python3
"""Learned rounding (issue 14 part 2): round-to-nearest vs --rounding adaround, at W8A8 and W4A8.

Usage: python3 benches/adaround.py --bin BIN --zoo DIR [--out DIR] [--only a,b] [--timeout S]
                                   [--extra "--adaround-budget 120"]

For every zoo model (benches/make_models.py layout: model.onnx, calib.npy, eval.npy, meta.json,
labels) four runs of `BIN model.onnx -o OUT -q --no-validate --calib calib.npy --report R` with
the default range method:
    rtn_w8a8   (no flag: the default output)
    rtn_w8a8_static  --activations static (what adaround is compared with on a transformer,
               where the default may choose dynamic activations)
    ada_w8a8   --rounding adaround
    rtn_w8a8_generic / ada_w8a8_generic   the same with --target generic (every layer int8)
    rtn_w4a8   --w4a8                       (int4 weights except the first and last layer)
    ada_w4a8   --w4a8 --rounding adaround
    adar_*     the same with --adaround-activation-loss (the following Relu / Clip in the loss)
each timed (wall seconds of the tool process), then measured on eval.npy in ONNX Runtime with
graph optimization disabled, exactly as benches/methods.py does (SQNR of the first output vs
fp32, task metric: accuracy with labels, CTC character accuracy for text recognition). The
adaround rows also give the tool's own cost split (data / optimization seconds, from the
report). Every run also records the tool's CPU seconds (user + system), its peak RSS (children's
ru_maxrss: exact for the first run of an invocation, an upper bound after) and the 1-minute load
average before and after. Prints a markdown table and writes results.json in --out.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import Task, run_outputs  # noqa: E402

CONFIGS = {
    "rtn_w8a8": [],
    # adaround needs static activations; on a transformer the default may pick dynamic ones
    "rtn_w8a8_static": ["--activations", "static"],
    "ada_w8a8": ["--rounding", "adaround"],
    # every layer int8: the default `ort` target leaves small models (digits, PP-OCR cls) float
    "rtn_w8a8_generic": ["--target", "generic"],
    "ada_w8a8_generic": ["--target", "generic", "--rounding", "adaround"],
    "rtn_w4a8": ["--w4a8"],
    "ada_w4a8": ["--w4a8", "--rounding", "adaround"],
    "rtn_w4a8_generic": ["--target", "generic", "--w4a8"],
    "ada_w4a8_generic": ["--target", "generic", "--w4a8", "--rounding", "adaround"],
    # the following Relu / Clip inside the loss (row form, session 15)
    "adar_w8a8_generic": ["--target", "generic", "--rounding", "adaround",
                          "--adaround-activation-loss"],
    "adar_w4a8_generic": ["--target", "generic", "--w4a8", "--rounding", "adaround",
                          "--adaround-activation-loss"],
    # block-wise int4 scales (one per 16 input values) and the AIMET-style quantized-input fit
    "rtn_w4a8_b16": ["--w4a8", "--block-size", "16"],
    "ada_w4a8_b16": ["--w4a8", "--block-size", "16", "--rounding", "adaround"],
    "adaq_w4a8_b16": ["--w4a8", "--block-size", "16", "--rounding", "adaround",
                      "--adaround-inputs", "quantized"],
}


def run_tool(cmd, timeout):
    """(wall s, CPU s (user + system), peak RSS MB, error or None) of the tool process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return time.perf_counter() - t0, None, None, f"timed out after {timeout} s"
    wall = time.perf_counter() - t0
    # communicate() reaped the child; its rusage is the last one added to RUSAGE_CHILDREN
    # since the previous call (one child at a time).
    global _children
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (now.ru_utime + now.ru_stime) - (_children.ru_utime + _children.ru_stime)
    _children = now
    # ru_maxrss of the children is the largest of any child so far: exact for the first run,
    # an upper bound after (run one heavy configuration per invocation to read it).
    rss = now.ru_maxrss / 1024
    if p.returncode != 0:
        return wall, cpu, rss, f"exit {p.returncode}: {err.strip()[-400:]}"
    return wall, cpu, rss, None


_children = resource.getrusage(resource.RUSAGE_CHILDREN)


def adaround_cost(report_path):
    try:
        with open(report_path) as f:
            rep = json.load(f)
    except (OSError, ValueError):
        return None
    for p in rep.get("passes", []):
        codes = (p.get("details") or {}).get("weight_codes") or {}
        ada = codes.get("adaround")
        if ada:
            return {"data_s": ada["data_seconds"], "optimize_s": ada["optimize_seconds"],
                    "iterations": ada["iterations"],
                    "layers_learned": sum(1 for l in ada["layers"] if l["status"] == "learned"),
                    "layers": len(ada["layers"])}
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", default="/tmp/adaround_bench")
    ap.add_argument("--only", default="digits_cnn,digits_deep,ppocr_rec")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--extra", default="", help="extra flags for the adaround runs")
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results_path = os.path.join(a.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for name in a.only.split(","):
        d = os.path.join(a.zoo, name)
        meta = json.load(open(os.path.join(d, "meta.json")))
        task = Task(d, meta)
        model, calib = os.path.join(d, "model.onnx"), os.path.join(d, "calib.npy")
        ev = np.load(os.path.join(d, "eval.npy"))
        seq_major = bool(meta.get("seq_major"))
        ref = run_outputs(model, ev, seq_major)
        r = results.get(name, {})
        r["fp32"] = task.metrics(ref, None)
        for cfg in a.configs.split(","):
            dst = os.path.join(a.out, f"{name}_{cfg}.onnx")
            rep = os.path.join(a.out, f"{name}_{cfg}.json")
            cmd = [a.bin, model, "-o", dst, "-q", "--no-validate", "--force", "--calib", calib,
                   "--report", rep] + CONFIGS[cfg]
            if "adaround" in CONFIGS[cfg] and a.extra:
                cmd += a.extra.split()
            if meta.get("input_shape"):
                cmd += ["--input-shape", meta["input_shape"]]
            load0 = os.getloadavg()[0]
            wall, cpu, rss, err = run_tool(cmd, a.timeout)
            m = {"wall_s": wall, "cpu_s": cpu, "max_rss_mb_children": rss, "cmd": " ".join(cmd),
                 "load_avg_1min": [load0, os.getloadavg()[0]]}
            if err is None:
                m.update(task.metrics(run_outputs(dst, ev, seq_major), ref))
                m["bytes"] = os.path.getsize(dst)
                cost = adaround_cost(rep)
                if cost:
                    m["adaround"] = cost
            else:
                m["error"] = err
            r[cfg] = m
            print(f"  {name} {cfg}: " + json.dumps(
                {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()
                 if k != "cmd"}), file=sys.stderr, flush=True)
        results[name] = r
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    print("| model | metric (fp32) | " + " | ".join(CONFIGS) + " |")
    print("|---|---|" + "---|" * len(CONFIGS))
    for name, r in results.items():
        cells = []
        for cfg in CONFIGS:
            m = r.get(cfg)
            if not m:
                cells.append("-")
            elif "error" in m:
                cells.append("fails")
            else:
                cells.append(f"{m['task']:.2f} / {m['sqnr_db']:.2f} dB / {m['wall_s']:.1f} s")
        metric = "char acc" if "char_acc" in r["fp32"] else "acc"
        print(f"| {name} | {metric} ({r['fp32']['task']:.2f}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
