#!/usr/bin/env python3
"""Tool cost of the default run against ONNX Runtime's quantize_static, on the zoo models.

Usage: python3 benches/cost_vs_ort.py --bin target/release/onnx-compress [--ref OTHER_BIN]
           [--zoo /work/zoo] [--only resnet18,efficientnet_b0] [--ort-methods minmax,percentile]
           [--ours-args "--method auto"] [--base-args "--method percentile"]
           [--out /tmp/cost_vs_ort]

For each model `ZOO/NAME/{model.onnx,calib.npy}` (all samples of calib.npy, for both tools):
- ours: `BIN model.onnx -o OUT --calib calib.npy --report R.json -q`, the default run
  (percentile calibration, tract validation on the calibration samples); wall, user+sys CPU
  and peak RSS from GNU time, and the report's phase timings; the fp32 tract latency at batch
  1 from the report, or (the default run does not time int8-activation outputs) from a
  separate `--passes none --latency --validate-samples 1` run;
- `--ours-args`: extra flags appended to our command (and to `--ref`'s), e.g. `--method auto`;
  the phase table then also gives `auto`'s own seconds from the report (observe, candidates,
  build, reference, scoring) when the quantize pass reports them;
- `--base-args`: a second run of `--bin` with these flags instead of `--ours-args` (e.g.
  `--method percentile`, the default), for the ours / base wall ratio;
- `--ref`: the same command with another binary (byte comparison of the outputs with `cmp`);
- ORT: `quant_pre_process` + `quantize_static` (QDQ, per-channel, u8/s8) with each method, a
  fresh Python process (benches/compare_ort.py --ort-child), as in compare_ort.py.
The floor is N fp32 inferences in tract at batch 1: N x the report's `latency.original_ms`.
Prints one markdown table; raw figures in OUT/results.json.
"""
import argparse
import filecmp
import json
import os
import shlex
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(cmd):
    """(wall s, cpu s, peak RSS MiB) of cmd under GNU time; raises on a non-zero exit."""
    full = ["/usr/bin/time", "-f", "TIMED %e %U %S %M"] + cmd
    p = subprocess.run(full, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {p.returncode}: {p.stderr[-600:]}")
    line = [l for l in p.stderr.splitlines() if l.startswith("TIMED ")][-1].split()
    return float(line[1]), float(line[2]) + float(line[3]), int(line[4]) / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--ref", default="")
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--only", default="resnet18,mobilenet_v2,efficientnet_b0,squeezenet1_1,digits_cnn")
    ap.add_argument("--ort-methods", default="minmax,percentile")
    ap.add_argument("--ours-args", default="",
                    help="extra flags for our run (and --ref's), e.g. '--method auto'")
    ap.add_argument("--base-args", default=None,
                    help="also time --bin with these flags instead of --ours-args")
    ap.add_argument("--out", default="/tmp/cost_vs_ort")
    a = ap.parse_args()
    extra = shlex.split(a.ours_args)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for name in a.only.split(","):
        model = os.path.join(a.zoo, name, "model.onnx")
        calib = os.path.join(a.zoo, name, "calib.npy")
        n = int(np.load(calib, mmap_mode="r").shape[0])
        r = {"model": name, "samples": n, "load": os.getloadavg()[0]}
        out = os.path.join(a.out, f"{name}.ours.onnx")
        rep = os.path.join(a.out, f"{name}.ours.json")
        r["ours"] = timed([a.bin, model, "-o", out, "--calib", calib, "--report", rep, "-q"]
                          + extra)
        report = json.load(open(rep))
        r["phases"] = {t["name"]: t["seconds"] for t in report["timings"]}
        r["passes"] = {p["name"]: p.get("seconds") for p in report["passes"]}
        for p in report["passes"]:
            auto = (p.get("details") or {}).get("auto") if isinstance(p.get("details"), dict) else None
            if auto and auto.get("seconds"):
                r["auto"] = auto["seconds"]
                r["auto_evaluations"] = auto.get("evaluations")
                r["auto_samples"] = auto.get("samples")
        if a.base_args is not None:
            base_out = os.path.join(a.out, f"{name}.base.onnx")
            r["base"] = timed([a.bin, model, "-o", base_out, "--calib", calib, "-q"]
                              + shlex.split(a.base_args))
        lat = report["validation"].get("latency") or {}
        if not lat:
            # The default run times nothing when the output quantizes activations (tract runs
            # them in float): the floor's fp32 time comes from a float round trip, timed apart.
            fp_rep = os.path.join(a.out, f"{name}.fp32.json")
            subprocess.run([a.bin, model, "-o", os.path.join(a.out, f"{name}.fp32.onnx"),
                            "--passes", "none", "--calib", calib, "--validate-samples", "1",
                            "--latency", "--report", fp_rep, "-q"], check=True)
            lat = json.load(open(fp_rep))["validation"].get("latency") or {}
        r["fp32_ms"] = lat.get("original_ms")
        v = report["validation"]
        r["validated"] = f"{v.get('samples')} of {v.get('samples_given', v.get('samples'))}"
        if a.ref:
            ref_out = os.path.join(a.out, f"{name}.ref.onnx")
            r["ref"] = timed([a.ref, model, "-o", ref_out, "--calib", calib, "-q"] + extra)
            r["identical"] = filecmp.cmp(out, ref_out, shallow=False)
        for m in a.ort_methods.split(","):
            dst = os.path.join(a.out, f"{name}.ort.{m}.onnx")
            r[f"ort_{m}"] = timed([sys.executable, os.path.join(HERE, "compare_ort.py"),
                                   "--ort-child", model, dst, calib, m])
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    json.dump(rows, open(os.path.join(a.out, "results.json"), "w"), indent=1)
    methods = a.ort_methods.split(",")
    head = ["model", "N", "load", "ours wall / CPU s", "peak MiB"]
    if a.ref:
        head += ["before wall / CPU s", "bytes same", "before / ORT " + methods[0] + " wall"]
    if a.base_args is not None:
        head += ["base wall / CPU s", "ours / base wall"]
    head += [f"ORT {m} wall / CPU s, MiB" for m in methods]
    head += [f"ours / ORT {m} wall; CPU" for m in methods]
    head += ["passes s", "validate s", "rows validated", "fp32 tract ms", "ours / (N x fp32)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        w, c, mib = r["ours"]
        cells = [r["model"], str(r["samples"]), f"{r['load']:.1f}", f"{w:.2f} / {c:.2f}",
                 f"{mib:.0f}"]
        if a.ref:
            cells += [f"{r['ref'][0]:.2f} / {r['ref'][1]:.2f}", "yes" if r["identical"] else "NO",
                      f"{r['ref'][0] / r[f'ort_{methods[0]}'][0]:.2f}"]
        if a.base_args is not None:
            cells += [f"{r['base'][0]:.2f} / {r['base'][1]:.2f}", f"{w / r['base'][0]:.2f}"]
        cells += [f"{r[f'ort_{m}'][0]:.2f} / {r[f'ort_{m}'][1]:.2f}, {r[f'ort_{m}'][2]:.0f}"
                  for m in methods]
        cells += [f"{w / r[f'ort_{m}'][0]:.2f}; {c / r[f'ort_{m}'][1]:.2f}" for m in methods]
        floor = r["samples"] * r["fp32_ms"] / 1000.0 if r["fp32_ms"] else float("nan")
        cells += [f"{r['phases'].get('passes', 0):.2f}", f"{r['phases'].get('validate', 0):.2f}",
                  r["validated"],
                  f"{r['fp32_ms']:.1f}" if r["fp32_ms"] else "-", f"{w / floor:.1f}"]
        print("| " + " | ".join(cells) + " |")
    timed_auto = [r for r in rows if r.get("auto")]
    if timed_auto:
        keys = list(timed_auto[0]["auto"].keys())
        print()
        print("| model | auto samples x evaluations | " + " | ".join(f"auto {k} s" for k in keys) + " |")
        print("|" + "---|" * (len(keys) + 2))
        for r in timed_auto:
            print(f"| {r['model']} | {r.get('auto_samples')} x {r.get('auto_evaluations')} | "
                  + " | ".join(f"{r['auto'].get(k, 0):.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
