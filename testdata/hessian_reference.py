"""Exact Gauss-Newton traces of digits_cnn.onnx's weighted layers, by torch autograd.

Independent reference for tests/passes_mixed_precision.rs: evaluates the ONNX graph with a
tiny torch interpreter (Conv, BatchNormalization, Relu, Clip, GlobalAveragePool, Flatten,
Gemm, Constant), and for the label-free loss L(w) = mean_x KL(softmax(f(w0;x)) || softmax(f(w;x)))
computes Tr(G) = mean_x sum_c [p_c ||J_c||^2] - ||sum_c p_c J_c||^2 exactly (J_c = d logit_c / dW,
per sample, via torch.func), for every Conv/Gemm weight. Writes hessian_reference.json.
Run: python3 testdata/hessian_reference.py  (deterministic; CPU; first 128 calibration samples)
"""
import json, os
import numpy as np, onnx, torch
from onnx import numpy_helper
import torch.nn.functional as F

here = os.path.dirname(os.path.abspath(__file__))
m = onnx.load(os.path.join(here, "digits_cnn.onnx"))
inits = {t.name: torch.tensor(numpy_helper.to_array(t).astype(np.float64)) for t in m.graph.initializer}
x_all = torch.tensor(np.load(os.path.join(here, "digits_calib_x.npy"))[:128].astype(np.float64))
attrs = lambda n: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
weights = [n.input[1] for n in m.graph.node if n.op_type in ("Conv", "Gemm")]

def forward(params, x):
    env = dict(inits); env.update(params); env[m.graph.input[0].name] = x
    for n in m.graph.node:
        a = attrs(n); i = [env[k] for k in n.input if k]
        if n.op_type == "Conv":
            p = a.get("pads", [0, 0, 0, 0])
            y = F.conv2d(i[0], i[1], i[2] if len(i) > 2 else None, stride=a.get("strides", [1, 1]), padding=(p[0], p[1]), groups=a.get("group", 1))
        elif n.op_type == "BatchNormalization":
            y = F.batch_norm(i[0], i[3], i[4], i[1], i[2], False, 0.0, a.get("epsilon", 1e-5))
        elif n.op_type == "Relu": y = torch.relu(i[0])
        elif n.op_type == "Clip": y = torch.clamp(i[0], i[1], i[2])
        elif n.op_type == "Constant": y = torch.tensor(numpy_helper.to_array(a["value"]).astype(np.float64))
        elif n.op_type == "GlobalAveragePool": y = i[0].mean(dim=(2, 3), keepdim=True)
        elif n.op_type == "Flatten": y = i[0].flatten(1)
        elif n.op_type == "Gemm":
            b = i[1].T if a.get("transB", 0) else i[1]
            y = i[0] @ b + i[2]
        else: raise SystemExit(f"unsupported op {n.op_type}")
        env[n.output[0]] = y
    return env[m.graph.output[0].name]

out = {"loss": "kl", "samples": int(x_all.shape[0]), "layers": []}
for w in weights:
    def f(wv, x):
        return forward({w: wv}, x.unsqueeze(0))[0]
    total = 0.0
    for x in x_all:
        J = torch.func.jacrev(f)(inits[w], x).reshape(10, -1)  # [C, n]
        p = torch.softmax(f(inits[w], x), 0)
        total += float((p * (J * J).sum(1)).sum() - ((p[:, None] * J).sum(0) ** 2).sum())
    tr = total / x_all.shape[0]
    n = inits[w].numel()
    out["layers"].append({"weight": w, "params": n, "trace": tr, "trace_per_param": tr / n})
    print(w, n, tr)
with open(os.path.join(here, "hessian_reference.json"), "w") as fh:
    json.dump(out, fh, indent=1)
