#!/usr/bin/env python3
"""Range methods on real architectures (issue 14): ours with every --method vs ORT quantize_static.

Usage: python3 benches/methods.py --bin BIN --zoo DIR [--out DIR] [--only a,b]
                                  [--methods auto,minmax,...] [--timeout S]

The zoo comes from benches/make_models.py (one directory per model: model.onnx, calib.npy,
eval.npy, meta.json, labels). For every model:
- ours: `BIN model.onnx -o OUT -q --no-validate --calib calib.npy --method M` for M in auto,
  minmax, percentile, mse, entropy (plus `--input-shape` where the model has symbolic non-batch
  dims); each run is its own child process, timed (wall seconds).
- ORT: what a user of onnxruntime.quantization does (benches/compare_ort.py --ort-child):
  quant_pre_process, then quantize_static with MinMax, per-channel s8 weights, u8 activations,
  QDQ, fed the SAME calib.npy one sample at a time; timed the same way (includes Python start-up
  and importing onnxruntime, ~0.3 s). `--methods ort_per_tensor` adds the same with
  per_channel=False; where ORT's per-channel output fails, the table shows it in the ORT cell and
  "auto - ORT" uses it.
- measured on the held-out eval.npy in ONNX Runtime with graph optimization DISABLED (exact QDQ
  semantics): SQNR of the first output vs the fp32 model, and the task metric:
    classifier with labels   accuracy %          (fp32's own accuracy shown in the fp32 column)
    classifier, no labels    top-1 agreement with fp32 %
    ctc_rec                  character accuracy % = 100 * (1 - sum edit distance / sum label
                             length), greedy CTC decoding, both strings stripped of surrounding
                             spaces (PP-OCR pads lines with spaces); line accuracy in results.json
    det_map                  F1 % of the thresholded probability map vs fp32's thresholded map
Models run one after the other (2 cores). Prints one markdown table and writes results.json
(merged with an existing one in --out, so `--only` reruns update their rows).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OURS = ["auto", "minmax", "percentile", "mse", "entropy"]
FIXED = ["minmax", "percentile", "mse", "entropy"]


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_outputs(path, x, seq_major=False):
    """First output on every sample of x; batches of 16 when the model's batch dim is free."""
    s = session(path)
    inp = s.get_inputs()[0]
    dim0 = inp.shape[0] if inp.shape else 1
    step = 16 if not isinstance(dim0, int) or dim0 < 1 else 1
    step = 1 if dim0 == 1 else step
    outs = [s.run(None, {inp.name: x[i:i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(outs, axis=1 if seq_major else 0)


def sqnr_db(ref, out):
    ref = ref.astype(np.float64)
    noise = np.sum((ref - out.astype(np.float64)) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def edit_distance(a, b):
    d = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, d[0] = d[:], i
        for j, cb in enumerate(b, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (ca != cb))
    return d[-1]


def ctc_decode(indices, charset, blank):
    out, prev = [], -1
    for t in indices:
        if t != prev and t != blank and 0 <= t < len(charset):
            out.append(charset[t])
        prev = t
    return "".join(out)


class Task:
    """Reference data and the task metric of one zoo model."""

    def __init__(self, d, meta):
        self.meta = meta
        self.kind = meta["task"]
        self.labels = None
        if os.path.isfile(os.path.join(d, "labels.npy")):
            self.labels = np.load(os.path.join(d, "labels.npy"))
        if os.path.isfile(os.path.join(d, "labels.json")):
            with open(os.path.join(d, "labels.json")) as f:
                self.labels = json.load(f)
        self.charset = None
        if self.kind == "ctc_rec":
            cs = meta["charset"]
            if cs.startswith("metadata:"):  # rapidocr: dictionary in the model's metadata
                keys = session(os.path.join(d, "model.onnx")).get_modelmeta() \
                    .custom_metadata_map[cs.split(":", 1)[1]].splitlines()
                self.charset = ["<blank>"] + keys + ([" "] if meta.get("append_space") else [])
            else:
                with open(os.path.join(d, cs)) as f:
                    self.charset = json.load(f)

    def texts(self, out):
        seq = out.transpose(1, 0, 2) if self.meta.get("seq_major") else out  # -> (N, T, C)
        fold = str.lower if self.meta.get("case_insensitive") else (lambda s: s)
        return [fold(ctc_decode(s.argmax(-1), self.charset, self.meta["blank"]).strip())
                for s in seq]

    def metrics(self, out, ref):
        """Task metrics of out; ref = fp32 outputs (None when out IS fp32)."""
        m = {}
        if ref is not None:
            m["sqnr_db"] = sqnr_db(ref, out)
            # the same noise against only the input-dependent part of the fp32 output (its mean
            # over the eval set removed): random-init nets put most output energy in a constant
            mean = ref.mean(1 if self.meta.get("seq_major") else 0, keepdims=True)
            m["sqnr_centred_db"] = sqnr_db(ref - mean, out - mean)
            # per eval sample, so --bootstrap can resample the held-out set
            axis = 1 if self.meta.get("seq_major") else 0
            r64, o64 = np.moveaxis(ref, axis, 0).astype(np.float64), \
                np.moveaxis(out, axis, 0).astype(np.float64)
            flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
            m["sample_signal"] = [float(v) for v in np.sum(flat(r64) ** 2, 1)]
            m["sample_noise"] = [float(v) for v in np.sum(flat(r64 - o64) ** 2, 1)]
        if self.kind == "classifier":
            pred = out.reshape(len(out), -1).argmax(1)
            if ref is not None:
                m["top1_agree"] = 100.0 * float(np.mean(pred == ref.reshape(len(ref), -1)
                                                       .argmax(1)))
            if self.labels is not None:
                m["acc"] = 100.0 * float(np.mean(pred == self.labels))
            m["task"] = m.get("acc", m.get("top1_agree", 100.0))
        elif self.kind == "ctc_rec":
            fold = str.lower if self.meta.get("case_insensitive") else (lambda s: s)
            labels = [fold(s.strip()) for s in self.labels]
            preds = self.texts(out)
            errs = sum(edit_distance(p, t) for p, t in zip(preds, labels))
            m["char_acc"] = 100.0 * (1 - errs / sum(len(t) for t in labels))
            m["line_acc"] = 100.0 * float(np.mean([p == t for p, t in zip(preds, labels)]))
            m["task"] = m["char_acc"]
        elif self.kind == "det_map":
            thr = self.meta.get("threshold", 0.3)
            if ref is None:
                m["text_px_pct"] = 100.0 * float(np.mean(out > thr))
                m["task"] = 100.0
            else:
                a, b = out > thr, ref > thr
                tp = float(np.sum(a & b))
                m["f1"] = 100.0 * 2 * tp / max(1.0, float(np.sum(a) + np.sum(b)))
                m["task"] = m["f1"]
        return m


def sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_tool(cmd, timeout):
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, f"timed out after {timeout} s"
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return wall, f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[-400:]}"
    return wall, None


def bench_model(a, name, d):
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    task = Task(d, meta)
    model, calib = os.path.join(d, "model.onnx"), os.path.join(d, "calib.npy")
    ev = np.load(os.path.join(d, "eval.npy"))
    seq_major = bool(meta.get("seq_major"))
    ref = run_outputs(model, ev, seq_major)
    r = {"model": name, "source": meta.get("source"), "data": meta.get("data"),
         "task_kind": task.kind, "n_calib": int(np.load(calib, mmap_mode="r").shape[0]),
         "n_eval": int(len(ev)), "fp32": task.metrics(ref, None)}
    odir = os.path.join(a.out, name)
    os.makedirs(odir, exist_ok=True)
    for tool in [m for m in a.methods.split(",") if m]:
        dst = os.path.join(odir, f"{tool}.onnx")
        if tool == "ort":
            cmd = [sys.executable, os.path.join(HERE, "compare_ort.py"), "--ort-child", model,
                   dst, calib, "minmax"]
        elif tool == "ort_per_tensor":
            cmd = [sys.executable, os.path.abspath(__file__), "--ort-per-tensor-child", model,
                   dst, calib]
        else:
            cmd = [a.bin, model, "-o", dst, "-q", "--no-validate", "--calib", calib,
                   "--method", tool]
            if meta.get("input_shape"):
                cmd += ["--input-shape", meta["input_shape"]]
        if os.path.exists(dst):
            os.remove(dst)
        bin_sha256 = sha256(a.bin)
        wall, err = run_tool(cmd, a.timeout)
        m = {"wall_s": wall, "load_avg_1min": os.getloadavg()[0], "cmd": " ".join(cmd)}
        if tool not in ("ort", "ort_per_tensor"):  # the binary may be replaced between runs
            m["bin_sha256"] = bin_sha256

        if err is None:
            try:
                m.update(task.metrics(run_outputs(dst, ev, seq_major), ref))
            except Exception as e:  # written, but ORT cannot load or run it
                err = f"output does not load/run in ORT: {str(e).splitlines()[0][:300]}"
        if err is not None:
            m["error"] = err
        r[tool] = m
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()
                 if k not in ("cmd", "sample_signal", "sample_noise")}
        print(f"   {name} {tool}: {json.dumps(shown)}", file=sys.stderr, flush=True)
    return r


def ok(m):
    return isinstance(m, dict) and "error" not in m and "sqnr_db" in m


def cell(m):
    if m is None:
        return "-"
    if not ok(m):
        err = m.get("error", "")
        return "fails" if "load/run" not in err else "output fails in ORT"
    return f"{m['sqnr_db']:.2f} / {m['task']:.2f}"


def diffs(r):
    """(auto - best fixed SQNR dB, auto - ORT dB, auto task - best fixed task) or None each."""
    au = r.get("auto")
    fixed = [r[k] for k in FIXED if ok(r.get(k))]
    if not ok(au):
        return None, None, None
    best = max((m["sqnr_db"] for m in fixed), default=None)
    best_task = max((m["task"] for m in fixed), default=None)
    d_fixed = None if best is None else au["sqnr_db"] - best
    ort = r.get("ort") if ok(r.get("ort")) else r.get("ort_per_tensor")  # what ORT can give
    d_ort = au["sqnr_db"] - ort["sqnr_db"] if ok(ort) else None
    d_task = None if best_task is None else au["task"] - best_task
    return d_fixed, d_ort, d_task


def metric_name(r):
    return {"classifier": "acc" if "acc" in r["fp32"] else "top-1 agree",
            "ctc_rec": "char acc", "det_map": "map F1"}[r["task_kind"]]


def print_table(results):
    cols = OURS + ["ort"]
    print("Cells: output SQNR vs fp32 (dB) / task metric (%), held-out data, ORT with graph "
          "optimization disabled.\n")
    print("| model | metric (fp32) | " + " | ".join(c if c != "ort" else "ORT minmax" for c in cols)
          + " | auto - best fixed dB | auto - ORT dB | auto - best fixed task |")
    print("|---" * (len(cols) + 5) + "|")
    f = lambda v, s="+.2f": "-" if v is None else format(v, s)  # noqa: E731
    for r in results:
        fp = r["fp32"]
        fp_txt = f"{metric_name(r)}" + (f" ({fp['task']:.2f})" if metric_name(r) in
                                         ("acc", "char acc") else "")
        dfx, dort, dtask = diffs(r)
        cells = [cell(r.get(c)) for c in cols]
        if not ok(r.get("ort")) and ok(r.get("ort_per_tensor")):
            cells[-1] += f" (per-tensor: {cell(r['ort_per_tensor'])})"
        print(f"| {r['model']} | {fp_txt} | " + " | ".join(cells)
              + f" | {f(dfx)} | {f(dort)} | {f(dtask)} |")
    print("\nTool wall time, seconds (ours: --no-validate; ORT: quant_pre_process + "
          "quantize_static in a fresh Python process)\n")
    print("| model | " + " | ".join(c if c != "ort" else "ORT" for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in results:
        print(f"| {r['model']} | " + " | ".join(
            "-" if c not in r else f"{r[c]['wall_s']:.1f}" + ("" if "error" not in r[c]
                                                              else " (failed)")
            for c in cols) + " |")


def flags(results):
    """Models where auto misses the issue-14 bar."""
    out = []
    for r in results:
        dfx, dort, dtask = diffs(r)
        if not ok(r.get("auto")):
            out.append(f"{r['model']}: auto failed: {r.get('auto', {}).get('error', 'not run')}")
            continue
        if dfx is not None and dfx < -0.3:
            out.append(f"{r['model']}: auto {dfx:+.2f} dB vs best fixed method")
        if dort is not None and dort < -0.3:
            out.append(f"{r['model']}: auto {dort:+.2f} dB vs ORT quantize_static")
        if dtask is not None and dtask < -0.2 and metric_name(r) in ("acc", "char acc"):
            out.append(f"{r['model']}: auto task metric {dtask:+.2f} points vs best fixed method")
    return out


def eval_groups(zoo, model, n_samples, default=None):
    """Which photo each eval sample came from (`eval_groups.json`, written by make_models.py),
    else `default` (one group per sample when None)."""
    path = os.path.join(zoo, model, "eval_groups.json")
    if os.path.isfile(path):
        with open(path) as f:
            return np.array(json.load(f))
    return np.arange(n_samples) if default is None else np.array(default)


def resample_counts(groups, draws, rng):
    """(draws, samples) weights of `draws` bootstrap resamplings of whole groups: how often
    each sample's group was drawn (groups hold different numbers of samples). Summed energies
    of a resampled set are then `counts @ energy`. Returns the weights and the group count."""
    members = [np.flatnonzero(groups == g) for g in sorted(set(groups.tolist()))]
    picks = rng.integers(0, len(members), size=(draws, len(members)))
    counts = np.zeros((draws, len(groups)))
    for j, m in enumerate(members):
        counts[:, m] += np.sum(picks == j, 1)[:, None]
    return counts, len(members)


def bootstrap_table(results, n, zoo, seed=0):
    """How much of the bar's 0.3 dB the held-out set itself can resolve: the held-out set is
    resampled with replacement n times (the same draws for every method of a model) and the
    summed SQNR of each method recomputed. Where the zoo says which photo each eval crop came
    from (`eval_groups.json`, written by make_models.py), whole photos are resampled (crops of
    one photo are alike: resampling crops would understate the spread); else samples."""
    rng = np.random.default_rng(seed)
    cands = FIXED + ["ort"]
    print(f"\nHeld-out resampling ({n} bootstrap draws of the held-out photos or samples): the best fixed "
          "method (or ORT) on the full set, how often it stays the best, the 90% interval of "
          "its lead over the runner-up, and for auto and percentile the 90% interval of "
          "(method - best) and how often they meet the bar (>= best - 0.3 dB).\n")
    print("| model | resampled | best (lead dB) | best stays best | lead 90% | auto - best 90% | "
          "auto meets bar | percentile - best 90% | percentile meets bar |")
    print("|---" * 9 + "|")
    for r in results:
        have = {k: r[k] for k in cands + ["auto"] if ok(r.get(k)) and "sample_noise" in r[k]
                and math.isfinite(r[k]["sqnr_db"])}
        fixed = [k for k in cands if k in have]
        if len(fixed) < 2 or "auto" not in have:
            continue
        sig = np.array(have[fixed[0]]["sample_signal"])
        noise = {k: np.array(v["sample_noise"]) for k, v in have.items()}
        counts, n_groups = resample_counts(eval_groups(zoo, r["model"], len(sig)), n, rng)
        what = f"{n_groups} photos" if n_groups < len(sig) else f"{len(sig)} samples"
        db = {k: 10 * np.log10((counts @ sig) / np.maximum(counts @ v, 1e-300))
              for k, v in noise.items()}
        full = {k: have[k]["sqnr_db"] for k in have}
        order = sorted(fixed, key=lambda k: -full[k])
        best, second = order[0], order[1]
        stacked = np.stack([db[k] for k in fixed])
        best_each = stacked.max(0)
        stays = np.mean(stacked.argmax(0) == fixed.index(best))
        lead = db[best] - db[second]
        q = lambda a: f"{np.quantile(a, 0.05):+.2f} .. {np.quantile(a, 0.95):+.2f}"  # noqa
        au, pc = db["auto"] - best_each, db["percentile"] - best_each
        print(f"| {r['model']} | {what} | {best} ({full[best] - full[second]:+.2f} over {second}) | "
              f"{100 * stays:.0f}% | {q(lead)} | {q(au)} | {100 * np.mean(au >= -0.3):.0f}% | "
              f"{q(pc)} | {100 * np.mean(pc >= -0.3):.0f}% |")


def ort_per_tensor(src, out, calib_npy):
    """Child-process entry: compare_ort.py's ORT recipe with per_channel=False (the fallback a
    user tries when ORT's per-channel output does not load, as on the PP-OCR models)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    pre = out + ".pre.onnx"
    try:
        quant_pre_process(src, pre)
    except Exception:
        quant_pre_process(src, pre, skip_symbolic_shape=True)
    name = onnx.load(pre, load_external_data=False).graph.input[0].name
    data = np.load(calib_npy)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data[i:i + 1] for i in range(len(data)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    os.remove(pre)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--ort-per-tensor-child":
        ort_per_tensor(*sys.argv[2:5])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", default="/work/zoo/_methods")
    ap.add_argument("--only", default="")
    ap.add_argument("--methods", default=",".join(OURS + ["ort"]),
                    help="also: ort_per_tensor (ORT with per_channel=False)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--table-only", action="store_true", help="print the table of results.json")
    ap.add_argument("--bootstrap", type=int, default=0,
                    help="also resample the held-out set N times (how much of 0.3 dB it resolves)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rpath = os.path.join(a.out, "results.json")
    results = {}
    if os.path.isfile(rpath):
        with open(rpath) as f:
            results = {r["model"]: r for r in json.load(f)}
    names = sorted(n for n in os.listdir(a.zoo)
                   if os.path.isfile(os.path.join(a.zoo, n, "meta.json")))
    if a.only:  # in the order given
        names = [n for n in a.only.split(",") if n in names]
    if not a.table_only:
        for name in names:
            print(f"== {name}", file=sys.stderr, flush=True)
            try:
                r = bench_model(a, name, os.path.join(a.zoo, name))
            except Exception as e:
                print(f"FAIL {name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            r["bin"] = a.bin
            old = results.get(name, {})
            old.update(r)
            results[name] = old
            with open(rpath, "w") as f:
                json.dump(sorted(results.values(), key=lambda r: r["model"]), f, indent=1)
    shown = [results[n] for n in sorted(results) if not a.only or n in a.only.split(",")]
    print_table(shown)
    fl = flags(shown)
    print("\nBelow the issue-14 bar (auto >0.3 dB under the best fixed method or ORT, or task "
          "metric >0.2 point under the best fixed method where labels exist):\n")
    print("\n".join(f"- {x}" for x in fl) if fl else "- none")
    if a.bootstrap:
        bootstrap_table(shown, a.bootstrap, a.zoo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
