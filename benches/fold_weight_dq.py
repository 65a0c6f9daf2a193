#!/usr/bin/env python3
"""Experiment: `python3 benches/fold_weight_dq.py IN.onnx OUT.onnx` replaces every main-graph
DequantizeLinear of constant inputs by its float result (what a load-time fold would give), to
measure what the per-inference weight DequantizeLinears cost in ONNX Runtime."""
import sys, onnx, numpy as np
from onnx import numpy_helper
m = onnx.load(sys.argv[1]); g = m.graph
inits = {t.name: t for t in g.initializer}
keep = []
for n in g.node:
    if n.op_type == "DequantizeLinear" and all(i in inits for i in n.input if i):
        q = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
        s = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        z = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32) if len(n.input) > 2 and n.input[2] else 0
        ax = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if s.ndim == 1 and s.size > 1:
            sh = [1] * q.ndim; sh[ax] = -1; s = s.reshape(sh); z = z.reshape(sh) if np.ndim(z) else z
        g.initializer.append(numpy_helper.from_array(((q - z) * s).astype(np.float32), n.output[0]))
    else:
        keep.append(n)
del g.node[:]; g.node.extend(keep)
onnx.save(m, sys.argv[2])
