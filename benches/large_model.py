#!/usr/bin/env python3
"""Memory and time of the tool on a large external-data model (issue 17).

Makes a model of `--layers` Gemm K x K + Relu layers whose weights live in external data
(`model.onnx` + `model.onnx.data`, float32; K chosen so the weights total `--gib` GiB), an
8-sample calibration file, then runs, each as a separate process under GNU time:

    cp model.onnx.data (the floor: copying the bytes)
    onnx-compress --passes none --no-validate   (plain round trip)
    onnx-compress --passes none                 (round trip + tract validation)
    onnx-compress --calib calib.npy             (default int8)

and prints wall time, peak RSS, RSS / model bytes and time / copy time per run, plus the tool's
size line. Usage:

    python3 benches/large_model.py --bin target/release/onnx-compress --gib 2 --work /tmp/large
"""

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np


def make_model(path, layers, k, seed=0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    prev = "x"
    for i in range(layers):
        w = (rng.standard_normal((k, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(k, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        out = "y" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
        del w
    graph = helper.make_graph(
        nodes, "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)


def timed(cmd, cwd=None):
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "RSS_KB %M"] + cmd, cwd=cwd,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"RSS_KB (\d+)", p.stderr)
    rss = int(m.group(1)) * 1024 if m else 0
    return p.returncode, wall, rss, p.stdout + p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/onnx-compress")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--work", default="/tmp/large_model")
    ap.add_argument("--runs", default="copy,plain,validate,int8")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    k = int(np.sqrt(a.gib * 2**30 / 4 / a.layers))
    k -= k % 32
    model = os.path.join(a.work, f"gemm{a.layers}x{k}.onnx")
    if not os.path.exists(model):
        print(f"making {model} ({a.layers} Gemm {k}x{k})", file=sys.stderr)
        make_model(model, a.layers, k)
    calib = os.path.join(a.work, f"calib{k}.npy")
    if not os.path.exists(calib):
        np.save(calib, np.random.default_rng(1).standard_normal((8, k), dtype=np.float32))
    model_bytes = os.path.getsize(model) + os.path.getsize(model + ".data")
    subprocess.run(["sync"])
    runs = {
        "copy": ["cp", model + ".data", os.path.join(a.work, "copy.data")],
        "plain": [a.bin, model, "-o", os.path.join(a.work, "plain.onnx"), "--passes", "none",
                  "--no-validate", "--external-data"],
        "validate": [a.bin, model, "-o", os.path.join(a.work, "validate.onnx"), "--passes",
                     "none", "--external-data"],
        "int8": [a.bin, model, "-o", os.path.join(a.work, "int8.onnx"), "--calib", calib],
    }
    print(f"model: {a.layers} Gemm {k}x{k} + Relu, {model_bytes / 2**30:.2f} GiB "
          f"(external data), machine: {os.cpu_count()} cores")
    print("| run | exit | wall s | x copy time | peak RSS GiB | RSS / model bytes |")
    print("|---|---|---|---|---|---|")
    copy_wall = None
    for name in a.runs.split(","):
        rc, wall, rss, out = timed(runs[name])
        if name == "copy":
            copy_wall = wall
        ratio = f"{wall / copy_wall:.1f}" if copy_wall else "-"
        print(f"| {name} | {rc} | {wall:.1f} | {ratio} | {rss / 2**30:.2f} | "
              f"{rss / model_bytes:.2f} |", flush=True)
        size = [l for l in out.splitlines() if "size" in l and "->" in l]
        if size:
            print(f"|   | size line: {size[0].strip()} | | | | |")
        if rc != 0:
            print(out[-2000:], file=sys.stderr)
    for f in os.listdir(a.work):
        if f.startswith(("copy", "plain", "validate", "int8")):
            os.remove(os.path.join(a.work, f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
