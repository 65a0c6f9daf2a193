#!/usr/bin/env python3
"""Interop check: every testdata model, compressed by the CLI's default pipeline, must pass
`onnx.checker` (full check), load and run in ONNX Runtime (CPU) close to the fp32 model, and
have every quantized Conv/Gemm/MatMul fused into an integer kernel (QLinearConv/QGemm/
QLinearMatMul) by ORT's graph optimizer; digits_cnn also keeps its test accuracy (digits_cnn and
digits_deep are calibrated and fed with the real digits data). Every model compressed with
`--target tract` (weight-only int8) must also pass the full checker and run in ORT close to fp32.

Builds nothing: uses the binary `cargo test` built (ONNX_COMPRESS_BIN, else
$CARGO_TARGET_DIR/debug, else the target dir `cargo metadata` reports). Exit 0 on success or on a
clean skip (onnx/onnxruntime missing, CI unset), 1 on a real failure or on missing modules under CI.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TD = os.path.join(ROOT, "testdata")

try:
    import numpy as np
    import onnx
    import onnxruntime as ort
except ImportError as e:  # a clean skip on a developer machine; a failure under CI
    if os.environ.get("CI", "") not in ("", "0", "false"):
        print(f"interop: FAIL (python module missing under CI: {e.name}); install onnx onnxruntime numpy")
        sys.exit(1)
    print(f"interop: SKIP (python module missing: {e.name}); install onnx onnxruntime numpy")
    sys.exit(0)

# Thresholds. SQNR on synthetic normal inputs (synthetic calibration) for small random models is
# noisy; 10 dB is far below what int8 gives here on convolutional models (~20-45 dB; mlp, whose
# activation x activation MatMuls square the error, ~13 dB) and far above a broken graph (<= 0).
MIN_SQNR_DB = 10.0
MAX_ACC_DROP_POINTS = 1.0
# Weight-only int8 (per-channel, ~40-50 dB per weight) keeps outputs far closer than full int8.
MIN_TRACT_SQNR_DB = 25.0
QUANT_COMPUTE = {"Conv", "Gemm", "MatMul"}
INT_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul"}


def find_binary():
    if os.environ.get("ONNX_COMPRESS_BIN"):
        return os.environ["ONNX_COMPRESS_BIN"]
    dirs = []
    if os.environ.get("CARGO_TARGET_DIR"):
        dirs.append(os.environ["CARGO_TARGET_DIR"])
    dirs.append(os.path.join(ROOT, "target"))
    try:
        meta = subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=ROOT, capture_output=True, text=True, check=True)
        dirs.append(json.loads(meta.stdout)["target_directory"])
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        pass
    for d in dirs:
        p = os.path.join(d, "debug", "onnx-compress")
        if os.path.isfile(p):
            return p
    return None


def session(path, optimize, opt_file=None, level=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    else:
        so.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if opt_file:
        so.optimized_model_filepath = opt_file
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feeds_for(sess, seed, batch=1):
    """Random feeds: normals for float inputs, token-like ids in [0, 200) for integer ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        if i.type in ("tensor(int64)", "tensor(int32)"):
            dtype = np.int64 if i.type == "tensor(int64)" else np.int32
            feeds[i.name] = rng.integers(0, 200, shape).astype(dtype)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def sqnr_db(ref, out):
    noise = float(np.sum((ref.astype(np.float64) - out) ** 2))
    sig = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(sig / noise)


def quantized_compute_nodes(model):
    """Conv/Gemm/MatMul whose first two inputs are both produced by DequantizeLinear."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return [n for n in model.graph.node
            if n.op_type in QUANT_COMPUTE and len(n.input) >= 2
            and all(producer.get(x) == "DequantizeLinear" for x in n.input[:2])]


def model_bytes(path):
    """The model file plus its external-data sidecar (`<model>.data`), if any."""
    side = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(side) if os.path.isfile(side) else 0)


def compress(binary, model, out, extra):
    cmd = [binary, model, "-o", out, "-q", "--no-validate"] + extra
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip()}")


def accuracy(path, optimize, x, y):
    sess = session(path, optimize)
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y)) * 100.0


def main():
    binary = find_binary()
    if binary is None:
        print("interop: FAIL: no onnx-compress binary found (run `cargo build` or `cargo test` first)")
        return 1
    t0 = time.time()
    failures = []
    rows = []
    tract_rows = []
    models = sorted(f for f in os.listdir(TD) if f.endswith(".onnx"))
    with tempfile.TemporaryDirectory() as tmp:
        for f in models:
            name = f[:-5]
            src = os.path.join(TD, f)
            out = os.path.join(tmp, f)
            extra = []
            trained = name.startswith("digits_")  # digits_cnn, digits_deep: real data
            if trained:
                extra = ["--calib", os.path.join(TD, "digits_calib_x.npy")]
            if name.startswith("tiny_gpt"):  # symbolic sequence: token windows to calibrate on
                extra = ["--calib", os.path.join(TD, "tiny_gpt_calib")]
            row = {"model": name}
            rows.append(row)
            try:
                compress(binary, src, out, extra)
                qmodel = onnx.load(out)
                onnx.checker.check_model(qmodel, full_check=True)
                row["checker"] = "ok"
                ref_s = session(src, optimize=False)
                if trained:  # synthetic normals lie far outside pixel range
                    feeds = {ref_s.get_inputs()[0].name:
                             np.load(os.path.join(TD, "digits_test_x.npy"))}
                else:
                    feeds = feeds_for(ref_s, seed=7)
                ref = ref_s.run(None, feeds)
                q_plain = session(out, optimize=False).run(None, feeds)
                q_opt = session(out, optimize=True).run(None, feeds)
                row["sqnr"] = min(sqnr_db(r, q) for r, q in zip(ref, q_plain))
                row["sqnr_opt"] = min(sqnr_db(r, q) for r, q in zip(ref, q_opt))
                if row["sqnr"] < MIN_SQNR_DB or row["sqnr_opt"] < MIN_SQNR_DB:
                    failures.append(f"{name}: SQNR vs fp32 in ORT {row['sqnr']:.1f} dB "
                                    f"(optimized {row['sqnr_opt']:.1f} dB) < {MIN_SQNR_DB} dB")
                nq = len(quantized_compute_nodes(qmodel))
                row["quantized"] = nq
                opt_path = os.path.join(tmp, name + ".ort_opt.onnx")
                session(out, optimize=True, opt_file=opt_path,
                        level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
                opt = onnx.load(opt_path)
                nk = sum(1 for n in opt.graph.node if n.op_type in INT_KERNELS)
                row["int_kernels"] = nk
                if nk != nq:
                    left = [n.name for n in opt.graph.node if n.op_type in QUANT_COMPUTE]
                    failures.append(f"{name}: {nq} quantized Conv/Gemm/MatMul but ORT made {nk} "
                                    f"integer kernels; float ones left: {left}")
            except Exception as e:  # report every model, then fail once
                failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                row["error"] = True

        # --target tract: int8 weights behind DequantizeLinear, float activations. Every output
        # must pass the full checker, load and run in ORT close to fp32 (weight-only int8 is far
        # more accurate than full int8: MIN_TRACT_SQNR_DB), hold no QuantizeLinear, and be
        # smaller than the input wherever a weight was stored int8.
        for f in models:
            name = f[:-5]
            src = os.path.join(TD, f)
            out = os.path.join(tmp, name + ".tract.onnx")
            row = {"model": name}
            tract_rows.append(row)
            try:
                compress(binary, src, out, ["--target", "tract"])
                qmodel = onnx.load(out)
                onnx.checker.check_model(qmodel, full_check=True)
                ops = [n.op_type for n in qmodel.graph.node]
                if "QuantizeLinear" in ops:
                    failures.append(f"{name} --target tract: QuantizeLinear in the output")
                row["weights"] = ops.count("DequantizeLinear")
                ref_s = session(src, optimize=False)
                if name.startswith("digits_"):
                    feeds = {ref_s.get_inputs()[0].name:
                             np.load(os.path.join(TD, "digits_test_x.npy"))}
                else:
                    feeds = feeds_for(ref_s, seed=7)
                ref = ref_s.run(None, feeds)
                out_o = session(out, optimize=True).run(None, feeds)
                row["sqnr"] = min(sqnr_db(r, q) for r, q in zip(ref, out_o))
                row["ratio"] = model_bytes(out) / model_bytes(src)
                if row["sqnr"] < MIN_TRACT_SQNR_DB:
                    failures.append(f"{name} --target tract: SQNR vs fp32 in ORT "
                                    f"{row['sqnr']:.1f} dB < {MIN_TRACT_SQNR_DB} dB")
                if row["weights"] > 0 and row["ratio"] >= 1.0:
                    failures.append(f"{name} --target tract: output is not smaller than the input")
            except Exception as e:
                failures.append(f"{name} --target tract: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300]}")
                row["error"] = True

        # digits: accuracy in ORT, default and --reduce-range, with/without graph optimization.
        x = np.load(os.path.join(TD, "digits_test_x.npy"))
        y = np.load(os.path.join(TD, "digits_test_y.npy"))
        src = os.path.join(TD, "digits_cnn.onnx")
        acc_rows = [("fp32", src)]
        try:
            rr = os.path.join(tmp, "digits_rr.onnx")
            compress(binary, src, rr, ["--calib", os.path.join(TD, "digits_calib_x.npy"),
                                       "--reduce-range"])
            acc_rows += [("int8", os.path.join(tmp, "digits_cnn.onnx")),
                         ("int8 --reduce-range", rr)]
        except RuntimeError as e:
            failures.append(f"digits_cnn --reduce-range: {e}")
        accs = []
        fp32_acc = None
        for label, path in acc_rows:
            if not os.path.isfile(path):
                continue
            try:
                a0, a1 = accuracy(path, False, x, y), accuracy(path, True, x, y)
            except Exception as e:
                failures.append(f"digits accuracy {label}: {type(e).__name__}: {e}")
                continue
            fp32_acc = a0 if fp32_acc is None else fp32_acc
            accs.append((label, a0, a1))
            if fp32_acc - min(a0, a1) > MAX_ACC_DROP_POINTS:
                failures.append(f"digits {label}: accuracy {a0:.2f}% / {a1:.2f}% (no opt / opt) "
                                f"vs fp32 {fp32_acc:.2f}%")

    print(f"interop: onnx {onnx.__version__}, onnxruntime {ort.__version__}, binary {binary}")
    print(f"{'model':16} {'checker':8} {'SQNR dB':>8} {'SQNR opt':>8} {'quant C/G/M':>11} "
          f"{'int kernels':>11}")
    for r in rows:
        if r.get("error"):
            print(f"{r['model']:16} FAILED")
            continue
        print(f"{r['model']:16} {r['checker']:8} {r['sqnr']:8.1f} {r['sqnr_opt']:8.1f} "
              f"{r['quantized']:11d} {r['int_kernels']:11d}")
    print(f"--target tract in ORT: {'model':16} {'int8 weights':>12} {'SQNR dB':>8} {'size':>7}")
    for r in tract_rows:
        if r.get("error"):
            print(f"  {r['model']:16} FAILED")
            continue
        print(f"  {r['model']:36} {r['weights']:12d} {r['sqnr']:8.1f} {100 * r['ratio']:6.1f}%")
    print("digits_cnn test accuracy in ORT (360 samples): no graph opt / ORT_ENABLE_ALL")
    for label, a0, a1 in accs:
        print(f"  {label:22} {a0:6.2f}% {a1:6.2f}%")
    print(f"interop: {time.time() - t0:.1f}s")
    if failures:
        print("interop: FAIL")
        for f in failures:
            print("  - " + f)
        return 1
    print("interop: OK")
    return 0



# ---- language models (issue 19): the default output of tiny_gpt in ONNX Runtime ----
# Every linear layer (MatMul with a constant weight) must run on an integer kernel in ORT's
# optimized graph (MatMulInteger, DynamicQuantizeMatMul, MatMulIntegerToFloat or
# QLinearMatMul), and perplexity on the held-out windows must stay within MAX_LM_PPL_CHANGE of
# fp32 in ORT (tract measures +0.07% for the default output; 1% is far below the collapse a
# residual-stream or softmax quantization causes).
LM_INT_KERNELS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                  "QLinearMatMul"}
MAX_LM_PPL_CHANGE = 0.01


def lm_perplexity(path, windows, optimize):
    sess = session(path, optimize)
    x, y = windows[:, :-1], windows[:, 1:]
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], axis=-1).mean()
    return float(np.exp(nll)), logits.argmax(axis=-1)


def language_models(binary):
    failures = []
    src = os.path.join(TD, "tiny_gpt.onnx")
    windows = np.load(os.path.join(TD, "tiny_gpt_eval.npy"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tiny_gpt_int8.onnx")
        try:
            # `--target generic`: under the default `ort` target the region-cost rule keeps
            # tiny_gpt's 32-wide layers float (too small to pay for their Q/DQ); this check is
            # about the int8 layout ORT must run on integer kernels.
            compress(binary, src, out, ["--calib", os.path.join(TD, "tiny_gpt_calib"),
                                        "--target", "generic"])
            onnx.checker.check_model(onnx.load(out), full_check=True)
            inits = {i.name for i in onnx.load(src).graph.initializer}
            linear = sum(1 for n in onnx.load(src).graph.node
                         if n.op_type == "MatMul" and n.input[1] in inits)
            opt_path = os.path.join(tmp, "tiny_gpt_int8.ort_opt.onnx")
            session(out, optimize=True, opt_file=opt_path,
                    level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
            opt = onnx.load(opt_path)
            kernels = [n.op_type for n in opt.graph.node if n.op_type in LM_INT_KERNELS]
            if len(kernels) < linear:
                failures.append(f"tiny_gpt: {linear} linear layers but ORT runs {len(kernels)} "
                                f"on integer kernels ({sorted(set(kernels))})")
            p0, a0 = lm_perplexity(src, windows, False)
            for optimize in (False, True):
                p1, a1 = lm_perplexity(out, windows, optimize)
                change = p1 / p0 - 1.0
                agree = float(np.mean(a0 == a1))
                print(f"tiny_gpt int8 in ORT (optimize={optimize}): perplexity {p0:.4f} -> "
                      f"{p1:.4f} ({100 * change:+.3f}%), next-token agreement "
                      f"{100 * agree:.2f}%, integer kernels {len(kernels)} for {linear} "
                      f"linear layers ({', '.join(sorted(set(kernels)))})")
                if abs(change) > MAX_LM_PPL_CHANGE:
                    failures.append(f"tiny_gpt: perplexity in ORT {p0:.4f} -> {p1:.4f} "
                                    f"({100 * change:+.2f}%, optimize={optimize})")
        except Exception as e:
            failures.append(f"tiny_gpt: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if failures:
        print("interop (language models): FAIL")
        for f in failures:
            print("  - " + f)
        return 1
    print("interop (language models): OK")
    return 0



# ---- KV-cache decoder (appended): tiny_gpt_kv.onnx compressed with its token windows, then
# greedy generation in ORT, threading present -> past, against the fp32 model on the held-out
# prompts. The bound is tests/kv_cache.rs's MIN_AGREEMENT (its comment says why).
KV_MIN_AGREEMENT = 0.75


def kv_greedy(path, prompts, steps):
    s = session(path, optimize=True)
    names = [o.name for o in s.get_outputs()]
    pasts = [i for i in s.get_inputs() if i.name.startswith("past_key_values")]
    out = []
    for p in prompts:
        past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
        ids, toks = p[None].astype(np.int64), []
        for _ in range(steps):
            r = dict(zip(names, s.run(None, {"input_ids": ids, **past})))
            t = int(r["logits"][0, -1].argmax())
            toks.append(t)
            past = {k: r[k.replace("past_key_values", "present")] for k in past}
            ids = np.array([[t]], np.int64)
        out.append(toks)
    return np.array(out)


def check_kv_cache(binary):
    """Full checker, ORT load, present outputs float, greedy agreement >= KV_MIN_AGREEMENT."""
    failures = []
    src = os.path.join(TD, "tiny_gpt_kv.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tiny_gpt_kv.onnx")
        try:
            compress(binary, src, out, ["--calib", os.path.join(TD, "tiny_gpt_calib")])
            q = onnx.load(out)
            onnx.checker.check_model(q, full_check=True)
            producer = {o: n.op_type for n in q.graph.node for o in n.output}
            for o in q.graph.output:
                if o.name.startswith("present") and producer.get(o.name) == "DequantizeLinear":
                    failures.append(f"tiny_gpt_kv: cache output {o.name} is quantized")
            prompts = np.load(os.path.join(TD, "tiny_gpt_prompts.npy"))
            ref, got = kv_greedy(src, prompts, 24), kv_greedy(out, prompts, 24)
            agree = float((ref == got).mean())
            print(f"tiny_gpt_kv in ORT: greedy agreement {100 * agree:.1f}% "
                  f"({len(prompts)} prompts x 24 tokens)")
            if agree < KV_MIN_AGREEMENT:
                failures.append(f"tiny_gpt_kv: greedy agreement {agree:.3f} < {KV_MIN_AGREEMENT}")
        except Exception as e:
            failures.append(f"tiny_gpt_kv: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    for f in failures:
        print("  - " + f)
    return 1 if failures else 0


# --weight-bits 4 (int4 weight-only for language models): the tiny GPT compressed with its
# calibration windows, as MatMulNBits (default) and as opset-21 block-wise DequantizeLinear,
# must pass the full checker, run in ORT, and give logits close to fp32 on the held-out windows
# (int4 on a random-weight GPT: ~20 dB; a broken packing or scale layout gives <= 0 dB).
MIN_INT4_SQNR_DB = 12.0


def int4_check(binary):
    failures, rows = [], []
    src = os.path.join(TD, "tiny_gpt.onnx")
    ids = np.load(os.path.join(TD, "tiny_gpt_eval.npy"))[:, :32]
    with tempfile.TemporaryDirectory() as tmp:
        ref = session(src, optimize=False).run(None, {"input_ids": ids})[0]
        for fmt in ("matmulnbits", "dq"):
            out = os.path.join(tmp, f"tiny_gpt_int4_{fmt}.onnx")
            try:
                compress(binary, src, out, ["--weight-bits", "4", "--weight-format", fmt,
                                            "--calib", os.path.join(TD, "tiny_gpt_calib")])
                qmodel = onnx.load(out)
                onnx.checker.check_model(qmodel, full_check=True)
                ops = [n.op_type for n in qmodel.graph.node]
                got = session(out, optimize=True).run(None, {"input_ids": ids})[0]
                db = sqnr_db(ref, got)
                ratio = model_bytes(out) / model_bytes(src)
                rows.append((fmt, ops.count("MatMulNBits"), db, ratio))
                if db < MIN_INT4_SQNR_DB:
                    failures.append(f"tiny_gpt --weight-bits 4 ({fmt}): logits SQNR vs fp32 in ORT "
                                    f"{db:.1f} dB < {MIN_INT4_SQNR_DB} dB")
                if fmt == "matmulnbits" and ops.count("MatMulNBits") == 0:
                    failures.append("tiny_gpt --weight-bits 4: no MatMulNBits in the output")
            except Exception as e:
                failures.append(f"tiny_gpt --weight-bits 4 ({fmt}): {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300]}")
    print(f"--weight-bits 4 in ORT: {'format':12} {'MatMulNBits':>11} {'SQNR dB':>8} {'size':>7}")
    for fmt, n, db, ratio in rows:
        print(f"  {fmt:34} {n:11d} {db:8.1f} {100 * ratio:6.1f}%")
    return failures


def check_int4(binary):
    failures = int4_check(binary)
    if failures:
        print("interop (int4): FAIL")
        for f in failures:
            print("  - " + f)
        return 1
    print("interop (int4): OK")
    return 0


if __name__ == "__main__":
    status = main()
    extra_binary = find_binary()
    if extra_binary is None:
        sys.exit(1)
    status = max(status, language_models(extra_binary), check_kv_cache(extra_binary),
                 check_int4(extra_binary))
    sys.exit(status)
