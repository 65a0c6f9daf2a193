#!/usr/bin/env python3
"""Structure-aware fuzz of the onnx-compress binary over models the in-repo fuzz never sees.

The in-repo fuzz (tests/fuzz_mutations.rs) mutates testdata models with tests/common/mutate.rs.
This driver is independent of both: its own mutator (written in Python over onnx protobufs),
its own models (torchvision exports with random weights, silero-vad's and rapidocr's ONNX
files, from the pip packages), and the same oracle the issue states (issue 21):

- every run ends by exit 0 or exit 1; never a signal (abort, segfault), a hang past the
  timeout, a panic message, or another exit code;
- exit 1: stderr is one line starting with `error:` and no output file is left;
- exit 0: the output passes `onnx.checker.check_model(full_check=True)` and ONNX Runtime loads
  it whenever ONNX Runtime loads the (mutated) input;
- a NaN/Inf written into a weight is refused, or named (tensor and a non-finite word) in the
  `--report` JSON.

The checks run in a separate worker process (onnxruntime may crash on a hostile input: that
counts as "ORT rejects the input", not as our failure). Each case runs with an address-space
cap (4 GiB by default) and a 60 s timeout; 3 in 4 cases run `--passes fuse,cleanup,quantize
--no-validate`, 1 in 4 the default pipeline with validation.

Usage:
  python3 benches/fuzz_external.py --prepare DIR          # export/copy the models into DIR
  python3 benches/fuzz_external.py --models DIR --bin target/debug/onnx-compress \\
      --seed 1 --cases 200 [--only resnet18,silero_vad] [--jobs 2] [--keep OUT] [--case N]

Cases are determined by (seed, model, index): `--case N --keep DIR` reproduces one (the
mutated input, stderr and output stay in DIR). Prints a table of outcomes per model and one
line per failure with its reproducer.
"""
import argparse
import concurrent.futures as cf
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# name -> extra CLI arguments the unmutated model needs to run through the default pipeline.
MODELS = {
    "resnet18": [],
    "mobilenet_v3_small": [],
    "silero_vad": [],
    "silero_vad_op18_ifless": [],
    "silero_vad_half": ["--input-shape", "input:1x512", "--input-shape", "state:2x1x128"],
    "rapidocr_cls": ["--input-shape", "x:1x3x48x192"],
}


def prepare(folder):
    """Export the torchvision models (random weights, fixed seed) and copy the packaged ones."""
    import torch
    import torchvision

    # benches/silero_vad.py shares the package's name: import the package, not that file.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import silero_vad
    import rapidocr_onnxruntime

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    for name, ctor, size in [
        ("resnet18", torchvision.models.resnet18, 64),
        ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small, 96),
    ]:
        model = ctor(weights=None).eval()
        torch.onnx.export(model, torch.randn(1, 3, size, size), f"{folder}/{name}.onnx",
                          dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    data = os.path.dirname(silero_vad.__file__) + "/data"
    for name in ["silero_vad", "silero_vad_op18_ifless", "silero_vad_half"]:
        shutil.copy(f"{data}/{name}.onnx", f"{folder}/{name}.onnx")
    ocr = os.path.dirname(rapidocr_onnxruntime.__file__) + "/models"
    shutil.copy(f"{ocr}/ch_ppocr_mobile_v2.0_cls_infer.onnx", f"{folder}/rapidocr_cls.onnx")


# ---------------------------------------------------------------------------------------------
# Mutator

EXTREME_DIMS = [0, -1, -7, 2**31, 2**40, 2**62, 3, 1, 17]
ELEM_TYPES = [1, 2, 3, 6, 7, 9, 10, 11, 16, 8, 0, 999]
OPS = ["Relu", "Add", "Mul", "Conv", "MatMul", "Gemm", "Reshape", "Transpose", "Concat",
       "DequantizeLinear", "QuantizeLinear", "BatchNormalization", "Sigmoid", "Softmax",
       "Identity", "Cast", "Shape", "Gather", "Slice", "MaxPool", "GlobalAveragePool", "Flatten",
       "Squeeze", "Unsqueeze", "LSTM", "If", "Sqrt", "Pow", "Where", "Equal", "Greater",
       "ReduceMean", "Clip", "Pad", "Resize", "Expand", "Tile", "Split", "HardSwish",
       "ConstantOfShape", "Range", "Einsum", "TopK", "NonZero", "Erf", "Neg", "Not"]


def graphs_of(g):
    """The graph and every subgraph inside it (If/Loop/Scan bodies), depth first."""
    out = [g]
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += graphs_of(a.g)
            for sub in a.graphs:
                out += graphs_of(sub)
    return out


def value_names(g):
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    for n in g.node:
        names += [o for o in n.output if o]
    return names


def float_inits(g):
    return [t for t in g.initializer if t.data_type in (1, 10, 11)]


def tensor_shape(vi):
    t = vi.type.tensor_type
    return t.shape if t.HasField("shape") else None


def mutate_once(m, rng, notes, state):
    graphs = graphs_of(m.graph)
    # Subgraphs get a fair share when there are any (silero's If branches).
    g = graphs[0] if len(graphs) == 1 or rng.random() < 0.6 else rng.choice(graphs[1:])
    where = "" if g is m.graph else f" (in subgraph '{g.name}')"
    kind = rng.choice([
        "declared_dim", "declared_rank", "declared_type", "init_dims", "init_reshaped",
        "init_dtype", "init_bytes", "nonfinite", "rewire_input", "rewire_output", "swap_op",
        "attr_value", "attr_remove", "attr_foreign", "opset", "ir_version", "drop_node",
        "dup_node", "reverse_nodes", "graph_output", "constant_value", "domain",
        "drop_value_info", "input_type_and_init", "byte_flip",
    ])
    vis = list(g.input) + list(g.output) + list(g.value_info)
    nodes = list(g.node)
    if kind == "declared_dim" and vis:
        v = rng.choice(vis)
        shape = tensor_shape(v)
        if shape is not None and shape.dim:
            k = rng.randrange(len(shape.dim))
            d = rng.choice(EXTREME_DIMS + ["sym"])
            if d == "sym":
                shape.dim[k].dim_param = "fuzz_dim"
            else:
                shape.dim[k].dim_value = d
            notes.append(f"declared_dim: '{v.name}' dim {k} -> {d}{where}")
            return
    if kind == "declared_rank" and vis:
        v = rng.choice(vis)
        shape = tensor_shape(v)
        if shape is not None:
            if shape.dim and rng.random() < 0.5:
                del shape.dim[-1]
                notes.append(f"declared_rank: '{v.name}' loses its last dim{where}")
            else:
                shape.dim.add().dim_value = rng.choice([1, 2, 5])
                notes.append(f"declared_rank: '{v.name}' gains a dim{where}")
            return
    if kind == "declared_type" and vis:
        v = rng.choice(vis)
        e = rng.choice(ELEM_TYPES)
        v.type.tensor_type.elem_type = e
        notes.append(f"declared_type: '{v.name}' elem_type -> {e}{where}")
        return
    inits = list(g.initializer)
    if kind == "init_dims" and inits:
        t = rng.choice(inits)
        dims = list(t.dims)
        choice = rng.randrange(4)
        if choice == 0 and dims:
            dims[rng.randrange(len(dims))] = rng.choice([0, -1, 2**40, 7])
        elif choice == 1:
            dims = dims + [1]
        elif choice == 2 and dims:
            dims = dims[:-1]
        else:
            dims = list(reversed(dims))
        del t.dims[:]
        t.dims.extend(dims)
        notes.append(f"init_dims: '{t.name}' dims -> {dims}{where}")
        return
    if kind == "init_reshaped" and inits:
        # Consistent data, wrong shape for its consumer: only ONNX shape inference sees it.
        t = rng.choice(inits)
        arr = numpy_helper.to_array(t)
        if arr.ndim >= 1 and arr.size >= 1:
            new_shape = list(arr.shape)
            k = rng.randrange(len(new_shape))
            new_shape[k] = max(1, new_shape[k] + rng.choice([-1, 1, 2]))
            new = np.resize(arr, new_shape).astype(arr.dtype)
            t.CopyFrom(numpy_helper.from_array(new, t.name))
            notes.append(f"init_reshaped: '{t.name}' {list(arr.shape)} -> {new_shape} (data consistent){where}")
            return
    if kind == "init_dtype" and inits:
        t = rng.choice(inits)
        arr = numpy_helper.to_array(t)
        to = rng.choice([np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_])
        t.CopyFrom(numpy_helper.from_array(arr.astype(to), t.name))
        notes.append(f"init_dtype: '{t.name}' {arr.dtype} -> {np.dtype(to)} (data converted){where}")
        return
    if kind == "init_bytes" and inits:
        t = rng.choice(inits)
        if t.raw_data:
            raw = t.raw_data
            cut = rng.choice([0, len(raw) // 2, len(raw) - 1, len(raw) + 3])
            t.raw_data = raw[:cut] if cut <= len(raw) else raw + b"\0\0\0"
            notes.append(f"init_bytes: '{t.name}' raw bytes {len(raw)} -> {len(t.raw_data)}{where}")
            return
    if kind == "nonfinite":
        fl = [t for t in float_inits(g) if numpy_helper.to_array(t).size > 0]
        if fl:
            t = rng.choice(fl)
            arr = numpy_helper.to_array(t).copy()
            arr.flat[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf])
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            state["nonfinite"] = t.name
            notes.append(f"nonfinite: '{t.name}'{where}")
            return
    if kind == "rewire_input" and nodes:
        n = rng.choice(nodes)
        if n.input:
            k = rng.randrange(len(n.input))
            new = rng.choice(value_names(g) + ["", "missing_value"])
            notes.append(f"rewire_input: node '{n.name}' ({n.op_type}) input {k} '{n.input[k]}' -> '{new}'{where}")
            n.input[k] = new
            return
    if kind == "rewire_output" and nodes:
        n = rng.choice(nodes)
        if n.output:
            new = rng.choice(value_names(g))
            notes.append(f"rewire_output: node '{n.name}' ({n.op_type}) output '{n.output[0]}' -> '{new}'{where}")
            n.output[0] = new
            return
    if kind == "swap_op" and nodes:
        n = rng.choice(nodes)
        new = rng.choice(OPS)
        keep = rng.random() < 0.5
        notes.append(f"swap_op: node '{n.name}' {n.op_type} -> {new} (attributes {'kept' if keep else 'dropped'}){where}")
        n.op_type = new
        if not keep:
            del n.attribute[:]
        return
    with_attrs = [n for n in nodes if n.attribute and n.op_type not in ("If", "Loop", "Scan")]
    if kind == "attr_value" and with_attrs:
        n = rng.choice(with_attrs)
        a = rng.choice(list(n.attribute))
        if a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([0, -1, 2**31, 2**62, -(2**62), 5])
            notes.append(f"attr_value: node '{n.name}' ({n.op_type}) '{a.name}' -> {a.i}{where}")
        elif a.type == onnx.AttributeProto.INTS:
            vals = list(a.ints)
            choice = rng.randrange(3)
            if choice == 0 and vals:
                vals[rng.randrange(len(vals))] = rng.choice([0, -1, 2**31, 99])
            elif choice == 1:
                vals = vals + [1]
            else:
                vals = vals[:-1]
            del a.ints[:]
            a.ints.extend(vals)
            notes.append(f"attr_value: node '{n.name}' ({n.op_type}) '{a.name}' -> {vals}{where}")
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
            notes.append(f"attr_value: node '{n.name}' ({n.op_type}) '{a.name}' -> {a.f}{where}")
        elif a.type == onnx.AttributeProto.TENSOR:
            arr = numpy_helper.to_array(a.t)
            new = np.resize(arr, [max(1, arr.size + 1)]).astype(arr.dtype)
            a.t.CopyFrom(numpy_helper.from_array(new, a.t.name))
            notes.append(f"attr_value: node '{n.name}' ({n.op_type}) tensor '{a.name}' -> shape {list(new.shape)}{where}")
        else:
            a.s = b"FUZZ"
            notes.append(f"attr_value: node '{n.name}' ({n.op_type}) '{a.name}' -> 'FUZZ'{where}")
        return
    if kind == "attr_remove" and with_attrs:
        n = rng.choice(with_attrs)
        k = rng.randrange(len(n.attribute))
        notes.append(f"attr_remove: node '{n.name}' ({n.op_type}) loses '{n.attribute[k].name}'{where}")
        del n.attribute[k]
        return
    if kind == "attr_foreign" and nodes:
        n = rng.choice(nodes)
        a = rng.choice([helper.make_attribute("axis", rng.choice([0, 1, -1, 7])),
                        helper.make_attribute("group", rng.choice([1, 2, 3])),
                        helper.make_attribute("perm", [1, 0]),
                        helper.make_attribute("to", rng.choice([1, 7, 10, 0])),
                        helper.make_attribute("alpha", 0.5)])
        if a.name not in [x.name for x in n.attribute]:
            n.attribute.append(a)
            notes.append(f"attr_foreign: node '{n.name}' ({n.op_type}) gains '{a.name}'{where}")
            return
    if kind == "opset":
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                v = rng.choice([1, 6, 7, 9, 10, 11, 12, 13, 14, 18, 21, 23, 24, 0, 99])
                notes.append(f"opset: {o.version} -> {v}")
                o.version = v
                return
    if kind == "ir_version":
        v = rng.choice([3, 4, 6, 7, 8, 9, 10, 11, 0, 99])
        notes.append(f"ir_version: {m.ir_version} -> {v}")
        m.ir_version = v
        return
    if kind == "drop_node" and nodes:
        k = rng.randrange(len(nodes))
        notes.append(f"drop_node: '{nodes[k].name}' ({nodes[k].op_type}){where}")
        del g.node[k]
        return
    if kind == "dup_node" and nodes:
        k = rng.randrange(len(nodes))
        g.node.insert(k, nodes[k])
        notes.append(f"dup_node: '{nodes[k].name}' ({nodes[k].op_type}){where}")
        return
    if kind == "reverse_nodes" and len(nodes) > 1:
        i, j = sorted(rng.sample(range(len(nodes)), 2))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
        notes.append(f"reverse_nodes: '{a.name}' <-> '{b.name}' (order){where}")
        return
    if kind == "graph_output" and g.output:
        k = rng.randrange(len(g.output))
        if rng.random() < 0.5:
            notes.append(f"graph_output: remove '{g.output[k].name}'{where}")
            del g.output[k]
        else:
            new = rng.choice(value_names(g) + ["missing_output"])
            notes.append(f"graph_output: '{g.output[k].name}' -> '{new}'{where}")
            g.output[k].name = new
        return
    consts = [n for n in nodes if n.op_type == "Constant" and n.attribute]
    if kind == "constant_value" and consts:
        n = rng.choice(consts)
        a = n.attribute[0]
        if a.type == onnx.AttributeProto.TENSOR:
            arr = numpy_helper.to_array(a.t)
            choice = rng.randrange(3)
            if choice == 0:
                new = arr.astype(rng.choice([np.float32, np.int64, np.int32, np.float16]))
            elif choice == 1:
                new = np.resize(arr, [arr.size + 1]) if arr.size else np.zeros([2], arr.dtype)
            else:
                new = arr.reshape([1] + list(arr.shape))
            a.t.CopyFrom(numpy_helper.from_array(new.astype(new.dtype), a.t.name))
            notes.append(f"constant_value: node '{n.name}' {arr.dtype}{list(arr.shape)} -> {new.dtype}{list(new.shape)}{where}")
            return
    if kind == "domain" and nodes:
        n = rng.choice(nodes)
        d = rng.choice(["com.microsoft", "com.example.fuzz", "ai.onnx.ml"])
        notes.append(f"domain: node '{n.name}' ({n.op_type}) -> '{d}'{where}")
        n.domain = d
        if rng.random() < 0.5:
            m.opset_import.append(helper.make_opsetid(d, 1))
        return
    if kind == "drop_value_info" and g.value_info:
        del g.value_info[:]
        notes.append(f"drop_value_info{where}")
        return
    if kind == "input_type_and_init" and g.input:
        v = rng.choice(list(g.input))
        e = rng.choice([10, 11, 7, 6])
        v.type.tensor_type.elem_type = e
        notes.append(f"input_type: graph input '{v.name}' -> elem_type {e}{where}")
        return
    if kind == "byte_flip":
        state["flip"] = True
        notes.append("byte_flip")
        return
    notes.append(f"{kind}: not applicable")


def mutate(base, rng):
    m = onnx.ModelProto()
    m.CopyFrom(base)
    notes, state = [], {}
    for _ in range(rng.choice([1, 1, 2])):
        try:
            mutate_once(m, rng, notes, state)
        except (ValueError, TypeError) as e:
            # An earlier mutation left a tensor numpy cannot read (raw bytes cut): this one
            # does not apply; the case still runs with what was done.
            notes.append(f"not applicable after the previous mutation ({type(e).__name__})")
    data = bytearray(m.SerializeToString())
    if state.get("flip"):
        for _ in range(rng.choice([1, 2, 3])):
            k = rng.randrange(len(data))
            data[k] ^= 1 << rng.randrange(8)
    return bytes(data), notes, state.get("nonfinite")


# ---------------------------------------------------------------------------------------------
# Oracle

def check_worker(inp, out):
    """(input loads in ORT, output checker error or None, output ORT error or None)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(inp, so, providers=["CPUExecutionProvider"])
        input_loads = True
    except Exception:
        input_loads = False
    checker = None
    try:
        onnx.checker.check_model(onnx.load(out), full_check=True)
    except Exception as e:
        checker = " ".join(str(e).split())[:300]
    ort_error = None
    if input_loads:
        try:
            ort.InferenceSession(out, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            ort_error = " ".join(str(e).split())[:300]
    return input_loads, checker, ort_error


def nonfinite_named(report_path, tensor):
    try:
        report = json.load(open(report_path))
    except Exception:
        return False
    words = ("nan", "inf", "non-finite", "nonfinite")

    def visit(v):
        if isinstance(v, str):
            return tensor in v and any(w in v.lower() for w in words)
        if isinstance(v, list):
            return any(visit(x) for x in v)
        if isinstance(v, dict):
            own = [str(k) for k in v] + [x for x in v.values() if isinstance(x, str)]
            for x in v.values():
                if isinstance(x, list):
                    own += [y for y in x if isinstance(y, str)]
            if any(tensor in s for s in own) and any(w in s.lower() for s in own for w in words):
                return True
            return any(visit(x) for x in v.values())
        return False

    return visit(report)


def limit_memory(cap):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return apply


def run_case(args, model, base, index, folder, pool):
    rng = random.Random(f"{args.seed}/{model}/{index}")
    data, notes, nonfinite = mutate(base, rng)
    full = rng.random() < 0.25
    os.makedirs(f"{folder}/out", exist_ok=True)
    inp, out, report = f"{folder}/in.onnx", f"{folder}/out/out.onnx", f"{folder}/report.json"
    open(inp, "wb").write(data)
    cmd = [args.bin, inp, "-o", out, "-q"] + MODELS[model]
    if not full:
        cmd += ["--passes", "fuse,cleanup,quantize", "--no-validate"]
    if nonfinite:
        cmd += ["--report", report]
    started = time.time()
    failures = []
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=args.timeout,
                           preexec_fn=limit_memory(args.max_memory_mb << 20))
        code, stderr = p.returncode, p.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        code, stderr = None, (e.stderr or b"").decode(errors="replace")
        failures.append(f"hang past {args.timeout} s")
    seconds = time.time() - started
    first = stderr.strip().splitlines()[0][:200] if stderr.strip() else ""
    if code is not None and code < 0:
        failures.append(f"killed by {signal.Signals(-code).name}: {first}")
    if "panicked" in stderr:
        failures.append("panic: " + next(l for l in stderr.splitlines() if "panicked" in l)[:200])
    outcome = "failed"
    if code == 1:
        lines = [l for l in stderr.splitlines() if l.strip()]
        if len(lines) != 1 or not lines[0].startswith("error:"):
            failures.append(f"refusal is not one 'error:' line ({len(lines)} lines): {first}")
        if os.listdir(f"{folder}/out"):
            failures.append("refusal left files: " + ", ".join(os.listdir(f"{folder}/out")))
        outcome = "refused"
    elif code == 0:
        outcome = "accepted"
        if not os.path.exists(out):
            failures.append("exit 0 without an output")
        else:
            fut = pool[0].submit(check_worker, inp, out)
            try:
                input_loads, checker, ort_error = fut.result(timeout=300)
            except cf.process.BrokenProcessPool:
                pool[0] = cf.ProcessPoolExecutor(1)
                # ORT crashed the worker: retry the output alone.
                input_loads, checker, ort_error = False, None, None
                try:
                    onnx.checker.check_model(onnx.load(out), full_check=True)
                except Exception as e:
                    checker = " ".join(str(e).split())[:300]
            if checker:
                failures.append("exit 0 but onnx.checker rejects the output: " + checker)
            if ort_error:
                failures.append("exit 0, ORT loads the input but not the output: " + ort_error)
        if nonfinite and not nonfinite_named(report, nonfinite):
            failures.append(f"non-finite weight '{nonfinite}' accepted without naming it")
    elif code is not None and code > 0:
        failures.append(f"exit code {code}: {first}")
    if failures:
        outcome = "failed"
    return dict(model=model, index=index, notes=notes, full=full, outcome=outcome,
                failures=failures, seconds=seconds, first=first)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", metavar="DIR")
    ap.add_argument("--models", default="/tmp/fuzz_external_models")
    ap.add_argument("--bin", default="target/debug/onnx-compress")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--only", default="")
    ap.add_argument("--case", type=int)
    ap.add_argument("--keep")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument("--max-memory-mb", type=int, default=4096)
    ap.add_argument("--json", help="write every case's outcome here")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    names = [n for n in MODELS if not args.only or n in args.only.split(",")]
    bases = {n: onnx.load(f"{args.models}/{n}.onnx") for n in names}
    root = args.keep or tempfile.mkdtemp(prefix="fuzz_external")
    pool = [cf.ProcessPoolExecutor(1)]
    jobs = [(n, i) for n in names for i in (
        [args.case] if args.case is not None else range(args.cases))]
    results = []
    started = time.time()
    with cf.ThreadPoolExecutor(args.jobs) as threads:
        futures = [threads.submit(run_case, args, n, bases[n], i,
                                  f"{root}/{n}_{i:04}", pool) for n, i in jobs]
        for f in cf.as_completed(futures):
            r = f.result()
            results.append(r)
            if not args.keep and r["outcome"] != "failed":
                shutil.rmtree(f"{root}/{r['model']}_{r['index']:04}", ignore_errors=True)
    pool[0].shutdown()
    results.sort(key=lambda r: (r["model"], r["index"]))
    print(f"seed {args.seed}, {len(results)} cases in {time.time() - started:.0f} s "
          f"(slowest {max(r['seconds'] for r in results):.1f} s)")
    print("| model | cases | refused cleanly | accepted, valid | failed |")
    print("|---|---|---|---|---|")
    for n in names:
        rs = [r for r in results if r["model"] == n]
        count = lambda o: sum(r["outcome"] == o for r in rs)
        print(f"| {n} | {len(rs)} | {count('refused')} | {count('accepted')} | {count('failed')} |")
    for r in results:
        if r["failures"]:
            print(f"\nFAIL {r['model']} case {r['index']} ({'default pipeline' if r['full'] else 'fast'}): "
                  + "; ".join(r["notes"]))
            for f in r["failures"]:
                print("   -> " + f)
            print(f"   reproduce: python3 benches/fuzz_external.py --models {args.models} --bin {args.bin} "
                  f"--seed {args.seed} --only {r['model']} --case {r['index']} --keep /tmp/keep")
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)
    sys.exit(1 if any(r["failures"] for r in results) else 0)


if __name__ == "__main__":
    main()
