#!/usr/bin/env python3
"""Is the int8 output faster than fp32 where it ships? Speedups in ONNX Runtime and OpenVINO,
per `--target`, with the fidelity they cost.

Usage:
  python3 benches/runtime_speed.py [--bin PATH] [--targets generic,ort,openvino] [--runs 30]
      [--runtimes ort,openvino] [--out DIR] [--reuse] [--clock cpu|wall] [--repeats 3]
      [--min-seconds 1.5] [--ov-precision f32|bf16] [--no-control] [MODEL ...]

MODEL is a zoo directory (model.onnx, calib.npy, eval.npy, meta.json as benches/make_models.py
writes them), a zoo name under --zoo (default /work/zoo), or an .onnx file (then synthetic
calibration and a random batch-1 input). Without MODEL: the eight models of issue 20's table.

For each model and target: `onnx-compress MODEL -o OUT --target T --calib calib.npy
--no-validate` (plus `--input-shape` from meta.json), then
- ORT: fp32 and every output in one process, ORT_ENABLE_ALL, 1 intra-op thread, batch 1; the
  sessions run interleaved (fp32, out1, out2, ... then again) `--runs` times after a warm-up;
  the speedup is the median over rounds of fp32 time / output time in that round;
- OpenVINO CPU: the same, compiled with 1 stream, 1 thread, LATENCY hint, static batch-1 shape,
  OpenVINO's default inference precision (bf16 for float layers on a CPU with AVX512-BF16, such
  as the AMD EPYC (Zen 4) of BENCHMARKS.md: "fp32" there is what a user running the fp32 file
  gets; `--ov-precision f32` pins float layers to f32); the `runtimePrecision` rt_info of the
  compiled runtime graph tells how many Convolution / MatMul / FullyConnected layers run u8/i8
  (column `int8 layers`). OpenVINO's sync `infer` runs on the calling thread, so the CPU clock
  reads the calling thread's time (`time.thread_time`) for OpenVINO;
- `--repeats N` (default 3) repeats each runtime's whole comparison N times, each time with
  every model compiled afresh (sessions created in a rotated order) and the interleaving order
  rotated every round: a compiled instance has its own memory layout, and byte-identical
  OpenVINO models measured up to 5-10% apart as fixed instances, consistently across rounds.
  The table gives the median of the N per-repeat speedups and their range (min-max). Rounds
  per repeat are at least `--runs` and enough for `--min-seconds` of fp32 time (sub-2 ms
  models get hundreds). A `control` row (a byte-identical copy of the fp32 file, measured like
  an output) shows the noise floor of the run;
- SQNR (dB) of the output against fp32 on eval.npy, both run in ORT (ORT_ENABLE_ALL: what a
  user runs), over all eval samples one by one.
Times are CPU seconds of this process by default (`--clock cpu`): ORT with one intra-op thread
runs the kernels on the calling thread and OpenVINO with one inference thread on one of its
own, so process CPU time is the inference work itself, unaffected by time spent waiting for a
core on a loaded machine (wall-clock ratios drifted by 2x between byte-identical files at load
~12; CPU-time ratios of the same files agree within a few percent). `--clock wall` measures
wall time as before.
Prints one markdown table (model x target: ORT speedup, OpenVINO speedup, SQNR, int8 layers);
`--json FILE` keeps the numbers.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISSUE20 = ["resnet18", "convnext_tiny", "mobilenet_v2", "ppocr_rec", "shufflenet_v2_x1_0",
           "efficientnet_b0", "mobilenet_v3_small", "ppocr_cls"]


def load_model_entry(spec, zoo):
    """(name, onnx path, calib npy or None, eval array, input name, --input-shape or None)."""
    d = spec if os.path.isdir(spec) else os.path.join(zoo, spec)
    if os.path.isdir(d):
        meta = json.load(open(os.path.join(d, "meta.json")))
        ev = np.load(os.path.join(d, "eval.npy"))
        return dict(name=meta.get("name", os.path.basename(d)), path=os.path.join(d, "model.onnx"),
                    calib=os.path.join(d, "calib.npy"), eval=ev,
                    input_shape=meta.get("input_shape"))
    if not os.path.isfile(spec):
        sys.exit(f"{spec}: neither a zoo directory nor an .onnx file")
    import onnx
    m = onnx.load(spec, load_external_data=False)
    inp = m.graph.input[0]
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    ev = rng.standard_normal([4] + dims[1:]).astype(np.float32)
    return dict(name=os.path.basename(spec)[:-5], path=spec, calib=None, eval=ev, input_shape=None)


def compress(binary, entry, target, out):
    cmd = [binary, entry["path"], "-o", out, "--target", target, "--no-validate", "-q"]
    if entry["calib"]:
        cmd += ["--calib", entry["calib"]]
    if entry["input_shape"]:
        cmd += ["--input-shape", entry["input_shape"]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {p.returncode}: {p.stderr.strip()[-600:]}")


def ort_session(path, threads=1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


CLOCK = time.process_time


def interleaved_medians(runners, runs, min_seconds=0.0, clock=None):
    """All runners in turn, at least `runs` rounds (and enough for `min_seconds` of runner 0's
    time) after 3 warm-ups each: per runner, (median seconds, median over rounds of runner 0's
    time / this runner's time). The ratio is taken within a round, so load from other processes
    that drifts between rounds cancels; the order within a round rotates every round."""
    clock = clock or CLOCK
    for r in runners:
        for _ in range(3):
            r()
    t0 = clock()
    runners[0]()
    one = max(clock() - t0, 1e-6)
    runs = max(runs, int(min_seconds / one))
    times = [[] for _ in runners]
    for i in range(runs):
        for j in range(len(runners)):
            k = (i + j) % len(runners)
            t0 = clock()
            runners[k]()
            times[k].append(clock() - t0)
    base = np.array(times[0])
    return [(float(np.median(t)), float(np.median(base / np.array(t)))) for t in times]


def repeated(measure, paths, repeats):
    """`measure(paths in a rotated order)` `repeats` times: per path, (median seconds, median
    speedup, min speedup, max speedup) over the repeats (each repeat builds its sessions
    afresh)."""
    per = [[] for _ in paths]
    for rep in range(repeats):
        order = list(range(1, len(paths)))
        order = order[rep % len(order):] + order[:rep % len(order)] if order else order
        meds = measure([paths[0]] + [paths[k] for k in order])
        per[0].append(meds[0])
        for slot, k in enumerate(order, start=1):
            per[k].append(meds[slot])
    out = []
    for p in per:
        sp = [r for _, r in p]
        out.append((float(np.median([m for m, _ in p])), float(np.median(sp)), min(sp), max(sp)))
    return out


def ort_speed(paths, x, runs, min_seconds=0.0):
    sessions = [ort_session(p) for p in paths]
    name = sessions[0].get_inputs()[0].name
    feed = {name: x[:1]}
    return interleaved_medians([lambda s=s: s.run(None, feed) for s in sessions], runs,
                               min_seconds)


OV_PRECISION = None
HEAVY = ("Convolution", "GroupConvolution", "MatMul", "FullyConnected", "Deconvolution")


def ov_compile(path, shape):
    import openvino as ov
    core = ov_compile.core = getattr(ov_compile, "core", None) or ov.Core()
    m = core.read_model(path)
    m.reshape({m.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
    cfg = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if OV_PRECISION:
        cfg["INFERENCE_PRECISION_HINT"] = OV_PRECISION
    return core.compile_model(m, "CPU", cfg)


def ov_int8_layers(compiled):
    """(layers of a heavy type running u8/i8, all heavy layers) in the runtime graph."""
    heavy = int8 = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind = rt["layerType"].astype(str) if "layerType" in rt else ""
        if kind not in HEAVY:
            continue
        heavy += 1
        prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else ""
        int8 += prec in ("u8", "i8")
    return int8, heavy


def ov_speed(paths, x, runs, min_seconds=0.0):
    compiled = [ov_compile(p, x[:1].shape) for p in paths]
    reqs = [c.create_infer_request() for c in compiled]
    feed = x[:1]
    # OpenVINO's sync infer runs on the calling thread: its CPU time is the inference itself.
    clock = time.thread_time if CLOCK is time.process_time else CLOCK
    meds = interleaved_medians([lambda r=r: r.infer([feed]) for r in reqs], runs, min_seconds,
                               clock)
    return meds, [ov_int8_layers(c) for c in compiled]


def sqnr_db(ref, out):
    ref = ref.astype(np.float64)
    noise = np.sum((ref - out) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def ort_outputs(path, x):
    s = ort_session(path, threads=2)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/onnx-compress"))
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--targets", default="generic,ort,openvino")
    ap.add_argument("--runtimes", default="ort,openvino")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default="/tmp/runtime_speed")
    ap.add_argument("--reuse", action="store_true", help="keep outputs already in --out")
    ap.add_argument("--json")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.5,
                    help="rounds per repeat: enough for this much fp32 time (at least --runs)")
    ap.add_argument("--ov-precision", choices=["f32", "bf16"],
                    help="OpenVINO INFERENCE_PRECISION_HINT (default: OpenVINO's own)")
    ap.add_argument("--no-control", action="store_true",
                    help="leave out the control row (a byte-identical copy of the fp32 file)")
    a = ap.parse_args()
    global CLOCK, OV_PRECISION
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    OV_PRECISION = a.ov_precision
    os.makedirs(a.out, exist_ok=True)
    targets = a.targets.split(",")
    runtimes = a.runtimes.split(",")
    rows = []
    for spec in a.models or ISSUE20:
        e = load_model_entry(spec, a.zoo)
        outs = []
        for t in targets:
            out = os.path.join(a.out, f"{e['name']}.{t}.onnx")
            if not (a.reuse and os.path.isfile(out)):
                compress(a.bin, e, t, out)
            outs.append(out)
        x = e["eval"]
        ref = ort_outputs(e["path"], x)
        names = list(targets)
        if not a.no_control:
            control = os.path.join(a.out, f"{e['name']}.control.onnx")
            shutil.copyfile(e["path"], control)
            names.append("control")
            outs.append(control)
        res = {t: {"sqnr_db": sqnr_db(ref, ort_outputs(o, x))} for t, o in zip(names, outs)}
        paths = [e["path"]] + outs
        if "ort" in runtimes:
            meds = repeated(lambda ps: ort_speed(ps, x, a.runs, a.min_seconds), paths, a.repeats)
            for t, (m, r, lo, hi) in zip(names, meds[1:]):
                res[t].update(ort_ms=1000 * m, ort_fp32_ms=1000 * meds[0][0], ort_speedup=r,
                              ort_range=[lo, hi])
        if "openvino" in runtimes:
            layers = {}

            def measure(ps):
                meds, lay = ov_speed(ps, x, a.runs, a.min_seconds)
                layers.update(zip(ps, lay))
                return meds
            meds = repeated(measure, paths, a.repeats)
            for t, o, (m, r, lo, hi) in zip(names, outs, meds[1:]):
                l = layers[o]
                res[t].update(ov_ms=1000 * m, ov_fp32_ms=1000 * meds[0][0], ov_speedup=r,
                              ov_range=[lo, hi], ov_int8_layers=f"{l[0]}/{l[1]}")
        for t in names:
            rows.append(dict(model=e["name"], target=t, **res[t]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    print(f"\n| model | target | ORT fp32 ms | ORT speedup (range of {a.repeats}) | OpenVINO fp32 "
          f"ms | OpenVINO speedup (range of {a.repeats}) | OV int8 layers | SQNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    f = lambda r, k, s: format(r[k], s) if k in r else "-"
    rng = lambda r, k: f" ({r[k][0]:.2f}-{r[k][1]:.2f})" if k in r else ""
    for r in rows:
        print(f"| {r['model']} | {r['target']} | {f(r, 'ort_fp32_ms', '.2f')} | "
              f"{f(r, 'ort_speedup', '.2f')}x{rng(r, 'ort_range')} | {f(r, 'ov_fp32_ms', '.2f')} | "
              f"{f(r, 'ov_speedup', '.2f')}x{rng(r, 'ov_range')} | "
              f"{r.get('ov_int8_layers', '-')} | {r['sqnr_db']:.2f} |")
    for t in targets:
        sp = [r["ort_speedup"] for r in rows if r["target"] == t and "ort_speedup" in r]
        ov = [r["ov_speedup"] for r in rows if r["target"] == t and "ov_speedup" in r]
        if sp or ov:
            print(f"\n{t}: ORT speedup median {np.median(sp) if sp else float('nan'):.2f}x, "
                  f"min {min(sp) if sp else float('nan'):.2f}x; OpenVINO median "
                  f"{np.median(ov) if ov else float('nan'):.2f}x, min "
                  f"{min(ov) if ov else float('nan'):.2f}x")


if __name__ == "__main__":
    main()
