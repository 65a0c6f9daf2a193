#!/usr/bin/env python3
"""Build every test model in testdata/ (deterministic, re-runnable).

    python3 testdata/make_testdata.py            # writes next to this script

Needs: torch (CPU), onnx 1.23, onnxruntime, numpy, scikit-learn.
Every model is checked with onnx.checker (full_check) and run in onnxruntime
before this script finishes; a failing check raises.

Conventions:
  * torch models are exported with the TorchScript exporter (dynamo=False),
    do_constant_folding=False and TrainingMode.EVAL, which keeps every
    BatchNormalization node unfused (the eval peephole that folds Conv+BN
    only runs when constant folding is on).
  * opset 17 everywhere.
  * fixed seeds everywhere; torch runs single-threaded so training is
    bit-reproducible on one machine.
"""

import hashlib
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

OUT = os.path.dirname(os.path.abspath(__file__))
OPSET = 17

warnings.filterwarnings("ignore")  # TorchScript exporter deprecation chatter
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def path(name):
    return os.path.join(OUT, name)


def seed(s):
    torch.manual_seed(s)
    np.random.seed(s)


def check_and_run(file, feeds):
    """full_check the model on disk, run it in onnxruntime, return outputs."""
    onnx.checker.check_model(file, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(file, so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    for o in outs:
        assert np.all(np.isfinite(o)), f"{file}: non-finite output"
    return outs


def op_histogram(file):
    m = onnx.load(file, load_external_data=False)
    hist = {}
    for n in m.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return hist


def count_bn(file):
    return op_histogram(file).get("BatchNormalization", 0)


def export(model, x, file, dynamic_batch=False):
    model.eval()
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "N"}, "logits": {0: "N"}}
    torch.onnx.export(
        model,
        (x,),
        file,
        dynamo=False,
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
        input_names=["input"],
        output_names=["logits"],
        **kwargs,
    )


def randomize_bn(model, in_shape, passes=4):
    """Give every BN non-trivial gamma/beta and running stats.

    gamma/beta are drawn at random; the running stats come from a few
    train-mode forward passes on shifted, scaled random data so that
    running_mean != 0 and running_var != 1.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.momentum = 0.5
        model.train()
        for _ in range(passes):
            model(torch.randn(8, *in_shape[1:]) * 2.0 + 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1  # exported as an attribute; keep the usual value
    model.eval()


def export_torch_model(cls, in_shape, name, s):
    seed(s)  # before construction: the init draws from the torch RNG
    model = cls()
    randomize_bn(model, in_shape)
    x = torch.randn(*in_shape)
    file = path(name)
    export(model, x, file)
    (y,) = check_and_run(file, {"input": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    err = np.abs(y - ref).max()
    assert err < 1e-4, f"{name}: ort vs torch max abs err {err}"
    assert count_bn(file) > 0, f"{name}: BatchNormalization was fused away"
    return file


def cbr(cin, cout, k=3, s=1, groups=1, bias=True, act="relu"):
    layers = [
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
    ]
    if act == "relu":
        layers.append(nn.ReLU())
    elif act == "relu6":
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- 1. conv_bn_relu
class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = cbr(3, 8)
        self.b2 = cbr(8, 16)
        self.b3 = cbr(16, 16, bias=False, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- 2. residual
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = cbr(cin, cout, s=stride, bias=False)
        self.c2 = cbr(cout, cout, bias=False, act=None)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = cbr(cin, cout, k=1, s=stride, bias=False, act=None)
        self.relu = nn.ReLU()

    def forward(self, x):
        idn = x if self.down is None else self.down(x)
        return self.relu(self.c2(self.c1(x)) + idn)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, bias=False)
        self.block1 = BasicBlock(16, 16, 1)
        self.block2 = BasicBlock(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- 3. mobilenet_like
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        self.body = nn.Sequential(
            cbr(cin, hid, k=1, bias=False, act="relu6"),
            cbr(hid, hid, k=3, s=stride, groups=hid, bias=False, act="relu6"),
            cbr(hid, cout, k=1, bias=False, act=None),
        )
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.use_res else y


class MobileNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, s=2, bias=False, act="relu6")  # 16x16
        self.ir1 = InvertedResidual(16, 16, 1, 4)  # residual add
        self.ir2 = InvertedResidual(16, 24, 2, 4)  # 8x8, no residual
        # two branches, concatenated on channels
        self.branch_a = cbr(24, 16, k=1, bias=False)
        self.branch_b = nn.Sequential(
            cbr(24, 24, k=3, groups=24, bias=False, act="relu6"),
            cbr(24, 16, k=1, bias=False, act=None),
        )
        self.head = cbr(32, 64, k=1, bias=False, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.ir2(self.ir1(self.stem(x)))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.head(x)
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- 4. mlp (onnx.helper)
def make_mlp(name):
    rng = np.random.default_rng(4)

    def init(n, shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), n)

    inits = [
        init("fc1.weight", (32, 16)),  # [out, in] -> transB=1
        init("fc1.bias", (32,)),
        init("fc2.weight", (32, 24)),  # [in, out] -> transB=0
        init("fc2.bias", (24,)),
        init("mm.weight", (24, 16)),  # MatMul with constant weight
        init("mm.bias", (16,)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "fc2.weight", "fc2.bias"], ["h2"], name="fc2", transB=0),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("MatMul", ["a2", "mm.weight"], ["h3"], name="mm"),
        helper.make_node("Add", ["h3", "mm.bias"], ["a3"], name="mm_add"),
        # MatMul with two dynamic inputs: (a3 @ x^T) @ a3  -> [2,2] @ [2,16]
        helper.make_node("Transpose", ["x"], ["xt"], name="xt", perm=[1, 0]),
        helper.make_node("MatMul", ["a3", "xt"], ["gram"], name="gram"),
        helper.make_node("MatMul", ["gram", "a3"], ["y"], name="mix"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx-compress/make_testdata")
    model.ir_version = 8
    file = path(name)
    onnx.save_model(model, file)

    x = rng.standard_normal((2, 16)).astype(np.float32)
    (y,) = check_and_run(file, {"x": x})
    w = {t.name: numpy_helper.to_array(t) for t in inits}
    a1 = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    a2 = np.maximum(a1 @ w["fc2.weight"] + w["fc2.bias"], 0)
    a3 = a2 @ w["mm.weight"] + w["mm.bias"]
    ref = (a3 @ x.T) @ a3
    assert np.allclose(y, ref, rtol=1e-4, atol=1e-4), "mlp: ort vs numpy mismatch"
    return file


# ---------------------------------------------------------------- 5. if_model (onnx.helper)
def make_if_model(name):
    """cond = ReduceMean(x) > 0 (data-dependent, from the graph input).

    then: Relu(Conv(x, W_then, B_then))       [1,4,8,8]
    else: Sigmoid(Conv(x, W_else))             [1,4,8,8]  (no bias)
    Both branches read x and initializers from the outer scope.
    After the If: BatchNormalization (outer) then GlobalAveragePool.
    """
    rng = np.random.default_rng(5)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f32(rng.standard_normal((4, 3, 3, 3)) * 0.3), "W_then"),
        numpy_helper.from_array(f32(rng.standard_normal(4) * 0.1), "B_then"),
        numpy_helper.from_array(f32(rng.standard_normal((4, 3, 3, 3)) * 0.3), "W_else"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(f32(rng.uniform(0.5, 1.5, 4)), "bn.scale"),
        numpy_helper.from_array(f32(rng.uniform(-0.5, 0.5, 4)), "bn.bias"),
        numpy_helper.from_array(f32(rng.uniform(-0.2, 0.2, 4)), "bn.mean"),
        numpy_helper.from_array(f32(rng.uniform(0.5, 2.0, 4)), "bn.var"),
    ]
    out_shape = [1, 4, 8, 8]
    then_g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W_then", "B_then"], ["t_conv"], name="then_conv",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["t_conv"], ["t_out"], name="then_relu"),
        ],
        "then_branch",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, out_shape)],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W_else"], ["e_conv"], name="else_conv",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["e_conv"], ["e_out"], name="else_sigmoid"),
        ],
        "else_branch",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, out_shape)],
    )
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", keepdims=0),
        helper.make_node("Greater", ["mean", "zero"], ["cond"], name="cond"),
        helper.make_node("If", ["cond"], ["branch_out"], name="if",
                         then_branch=then_g, else_branch=else_g),
        helper.make_node("BatchNormalization",
                         ["branch_out", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
                         ["bn_out"], name="bn"),
        helper.make_node("GlobalAveragePool", ["bn_out"], ["y"], name="gap"),
    ]
    graph = helper.make_graph(
        nodes,
        "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx-compress/make_testdata")
    model.ir_version = 8
    file = path(name)
    onnx.save_model(model, file)

    # exercise both branches and check them against torch
    w = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in inits}
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    for sign in (1.0, -1.0):
        xi = np.abs(x) * sign
        (y,) = check_and_run(file, {"x": xi})
        t = torch.from_numpy(xi)
        with torch.no_grad():
            if sign > 0:
                b = torch.relu(torch.nn.functional.conv2d(t, w["W_then"], w["B_then"], padding=1))
            else:
                b = torch.sigmoid(torch.nn.functional.conv2d(t, w["W_else"], padding=1))
            b = torch.nn.functional.batch_norm(b, w["bn.mean"], w["bn.var"], w["bn.scale"],
                                               w["bn.bias"], False, 0.0, 1e-5)
            ref = b.mean(dim=(2, 3), keepdim=True).numpy()
        assert np.allclose(y, ref, atol=1e-5), f"if_model: branch sign={sign} mismatch"
    return file


# ---------------------------------------------------------------- 6. external_data
def make_external_data(name):
    seed(6)
    model = nn.Sequential(cbr(3, 8), cbr(8, 8, act="relu6"))
    randomize_bn(model, (1, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    tmp = path(name + ".tmp")
    export(model, x, tmp)
    m = onnx.load(tmp)
    os.remove(tmp)
    data = name + ".data"
    if os.path.exists(path(data)):
        os.remove(path(data))  # save_model appends to an existing data file
    file = path(name)
    onnx.save_model(m, file, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=0)
    check = onnx.load(file, load_external_data=False)
    ext = [t.name for t in check.graph.initializer
           if t.data_location == TensorProto.EXTERNAL]
    assert ext and len(ext) == len(check.graph.initializer), "external_data: not all external"
    (y,) = check_and_run(file, {"input": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(y - ref).max() < 1e-4, "external_data: ort vs torch mismatch"
    return file


# ---------------------------------------------------------------- 7. digits_cnn
class DigitsCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            cbr(1, 16, k=3),  # Conv3x3 + BN + ReLU
            cbr(16, 16, k=3, groups=16, act="relu6"),  # depthwise + BN + ReLU6
            cbr(16, 32, k=1),  # pointwise + BN + ReLU
            cbr(32, 32, k=3, groups=32),  # depthwise + BN + ReLU
            cbr(32, 32, k=1),  # pointwise + BN + ReLU
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def digits_split():
    """sklearn digits (pixels/16 in [0,1]) as three disjoint, stratified sets.

    Returns (x_train, y_train, x_calib, x_test, y_test): train 1237, calib 200, test 360.
    Uses only sklearn's own seeded RandomStates, never the global numpy/torch RNG.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # [1797,1,8,8] in [0,1]
    y = d.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=360, random_state=0, stratify=y)
    x_train, x_calib, y_train, _y_calib = train_test_split(
        x_rest, y_rest, test_size=200, random_state=1, stratify=y_rest)
    return x_train, y_train, x_calib, x_test, y_test


def train_digits(model, x_train, y_train, gen_seed, epochs=60, lr=1e-2, label_smoothing=0.0):
    """Adam + cosine schedule, batch 64, minibatch order from a seeded torch.Generator."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(gen_seed)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(
                model(xt[idx]), yt[idx], label_smoothing=label_smoothing)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def make_digits(name):
    seed(7)
    x_train, y_train, x_calib, x_test, y_test = digits_split()
    model = DigitsCnn()
    train_digits(model, x_train, y_train, gen_seed=7)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())

    file = path(name)
    export(model, torch.from_numpy(x_test[:1]), file, dynamic_batch=True)
    assert count_bn(file) == 5, "digits_cnn: expected 5 unfused BatchNormalization nodes"
    (l1,) = check_and_run(file, {"input": x_test[:1]})
    (l64,) = check_and_run(file, {"input": x_test[:64]})
    assert l1.shape == (1, 10) and l64.shape == (64, 10)
    (logits,) = check_and_run(file, {"input": x_test})
    ort_acc = float((logits.argmax(1) == y_test).mean())
    assert np.abs(logits - torch_logits).max() < 1e-3, "digits_cnn: ort vs torch logits"
    assert abs(ort_acc - torch_acc) < 1e-9, f"digits_cnn: ort {ort_acc} vs torch {torch_acc}"
    assert ort_acc >= 0.95, f"digits_cnn: test accuracy {ort_acc} < 0.95"

    np.save(path("digits_test_x.npy"), x_test)
    np.save(path("digits_test_y.npy"), y_test)
    np.save(path("digits_calib_x.npy"), x_calib)
    cdir = path("digits_calib")
    os.makedirs(cdir, exist_ok=True)
    for f in os.listdir(cdir):
        if f.endswith(".npy"):
            os.remove(os.path.join(cdir, f))
    for i in range(32):
        np.save(os.path.join(cdir, f"{i:03d}.npy"), x_calib[i:i + 1])
    return file, ort_acc, len(x_train), len(x_calib), len(x_test)


# ---------------------------------------------------------------- 8. digits_deep
class DigitsDeep(nn.Module):
    """A deeper digits classifier: 11 Conv/Gemm layers, two residual blocks.

    8x8: stem, basic block (two 3x3 convs + identity); 4x4: strided 3x3, then a block of
    grouped 3x3 (6 groups), pointwise expand 48->96, pointwise squeeze 96->12 (a narrow
    bottleneck), pointwise 12->48, identity add; 2x2: strided 3x3 48->96; GAP; two Gemms.
    """

    def __init__(self):
        super().__init__()
        self.stem = cbr(1, 24, k=3)
        self.res1_a = cbr(24, 24, k=3)
        self.res1_b = cbr(24, 24, k=3, act=None)
        self.down = cbr(24, 48, k=3, s=2)
        self.grouped = cbr(48, 48, k=3, groups=6)
        self.expand = cbr(48, 96, k=1)
        self.squeeze = cbr(96, 12, k=1)
        self.project = cbr(12, 48, k=1, act=None)
        self.head = cbr(48, 96, k=3, s=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(96, 64)
        self.fc2 = nn.Linear(64, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(x + self.res1_b(self.res1_a(x)))
        x = self.down(x)
        x = self.relu(x + self.project(self.squeeze(self.expand(self.grouped(x)))))
        x = self.head(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.relu(self.fc1(x)))


def make_digits_deep(name, label_smoothing=0.0):
    """Same splits and training recipe as digits_cnn (own seed); writes only `name`.

    With `label_smoothing` (torchvision's current recipes use 0.1) the classifier is less
    confident: the fp32-vs-quantized KL is then spread over many samples instead of a handful.
    """
    seed(8)
    x_train, y_train, _x_calib, x_test, y_test = digits_split()
    saved = path("digits_test_x.npy")
    if os.path.exists(saved):
        assert np.array_equal(np.load(saved), x_test), "digits_deep: test split differs"
    model = DigitsDeep()
    train_digits(model, x_train, y_train, gen_seed=8, label_smoothing=label_smoothing)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    params = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".weight")
                 and p.dim() >= 2)

    file = path(name)
    export(model, torch.from_numpy(x_test[:1]), file, dynamic_batch=True)
    assert count_bn(file) == 9, "digits_deep: expected 9 unfused BatchNormalization nodes"
    (l1,) = check_and_run(file, {"input": x_test[:1]})
    assert l1.shape == (1, 10)
    (logits,) = check_and_run(file, {"input": x_test})
    ort_acc = float((logits.argmax(1) == y_test).mean())
    assert np.abs(logits - torch_logits).max() < 1e-3, "digits_deep: ort vs torch logits"
    assert abs(ort_acc - torch_acc) < 1e-9, f"digits_deep: ort {ort_acc} vs torch {torch_acc}"
    assert ort_acc >= 0.95, f"digits_deep: test accuracy {ort_acc} < 0.95"
    z = logits - logits.max(1, keepdims=True)
    p_max = float((1.0 / np.exp(z).sum(1)).mean())
    return file, ort_acc, params, p_max



# ---------------------------------------------------------------- 8b. held-out pruning models
class DigitsVgg(nn.Module):
    """A plain VGG-style digits classifier (no residuals, no depthwise), for pruning tests.

    Conv3x3(1->32)-BN-ReLU, Conv3x3(32->32)-BN-ReLU, MaxPool 2 (8x8 -> 4x4),
    Conv3x3(32->64)-BN-ReLU, Conv3x3(64->64)-BN-ReLU, MaxPool 2 (-> 2x2), Flatten (256),
    Gemm(256->128)-ReLU, Gemm(128->10).
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            cbr(1, 32), cbr(32, 32), nn.MaxPool2d(2),
            cbr(32, 64), cbr(64, 64), nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(torch.flatten(self.features(x), 1))))


class DigitsResWide(nn.Module):
    """A residual digits classifier with a wide 1x1 head, for pruning tests.

    stem Conv3x3(1->32); basic block (two Conv3x3 32->32 + identity); Conv3x3 stride 2
    (32->64); basic block (two Conv3x3 64->64 + identity); wide head Conv1x1(64->256)-BN-ReLU;
    GAP; Gemm(256->10). BN after every conv.
    """

    def __init__(self):
        super().__init__()
        self.stem = cbr(1, 32)
        self.b1_a = cbr(32, 32)
        self.b1_b = cbr(32, 32, act=None)
        self.down = cbr(32, 64, s=2)
        self.b2_a = cbr(64, 64)
        self.b2_b = cbr(64, 64, act=None)
        self.head = cbr(64, 256, k=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(x + self.b1_b(self.b1_a(x)))
        x = self.down(x)
        x = self.relu(x + self.b2_b(self.b2_a(x)))
        x = self.head(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def make_digits_heldout(cls, name, s, n_bn):
    """Models never used to tune the prune pass: same splits and recipe as digits_cnn, own
    seed; writes only `name`. Returns (file, fp32 test accuracy)."""
    seed(s)
    x_train, y_train, _x_calib, x_test, y_test = digits_split()
    saved = path("digits_test_x.npy")
    if os.path.exists(saved):
        assert np.array_equal(np.load(saved), x_test), f"{name}: test split differs"
    model = cls()
    train_digits(model, x_train, y_train, gen_seed=s, epochs=40)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    file = path(name)
    export(model, torch.from_numpy(x_test[:1]), file, dynamic_batch=True)
    assert count_bn(file) == n_bn, f"{name}: expected {n_bn} unfused BatchNormalization nodes"
    (logits,) = check_and_run(file, {"input": x_test})
    ort_acc = float((logits.argmax(1) == y_test).mean())
    assert np.abs(logits - torch_logits).max() < 1e-3, f"{name}: ort vs torch logits"
    assert abs(ort_acc - torch_acc) < 1e-9, f"{name}: ort {ort_acc} vs torch {torch_acc}"
    assert ort_acc >= 0.95, f"{name}: test accuracy {ort_acc} < 0.95"
    return file, ort_acc


# ---------------------------------------------------------------- README
class Recurrent(nn.Module):
    """Bidirectional LSTM then a GRU carrying a streaming state, then a linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(64, 24, batch_first=True)
        self.head = nn.Linear(24, 10)

    def forward(self, x, h0):
        y, _ = self.lstm(x)
        y, hn = self.gru(y, h0)
        return self.head(y[:, -1]), hn


def make_recurrent(name):
    """LSTM + GRU (weights W/R as initializers: exported with constant folding, which turns
    torch's gate reordering into plain initializers), streaming GRU state in and out."""
    seed(11)
    model = Recurrent().eval()
    x, h0 = torch.randn(1, 12, 16), torch.randn(1, 1, 24)
    file = path(name)
    torch.onnx.export(
        model,
        (x, h0),
        file,
        dynamo=False,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=["x", "h0"],
        output_names=["y", "hn"],
    )
    y, hn = check_and_run(file, {"x": x.numpy(), "h0": h0.numpy()})
    with torch.no_grad():
        ry, rhn = model(x, h0)
    err = max(np.abs(y - ry.numpy()).max(), np.abs(hn - rhn.numpy()).max())
    assert err < 1e-4, f"{name}: ort vs torch max abs err {err}"
    hist = op_histogram(file)
    assert hist.get("LSTM") == 1 and hist.get("GRU") == 1, hist
    return file


class Embedding(nn.Module):
    """Token ids -> embedding table (Gather) -> mean over the sequence -> linear head. The ids
    come in as float and are cast to int64 in the graph (negative ids count from the end, as
    Gather allows), so that every tool's synthetic float inputs are valid ids."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(500, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, ids):
        ids = ids.long()
        ids = torch.where(ids < 0, ids + 500, ids)
        return self.head(self.table(ids).mean(dim=1))


def make_embedding(name):
    """A Gather on a constant table (an embedding) read with run-time ids."""
    seed(12)
    model = Embedding().eval()
    ids = torch.randint(0, 500, (1, 8)).float()
    file = path(name)
    torch.onnx.export(
        model,
        (ids,),
        file,
        dynamo=False,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=["ids"],
        output_names=["logits"],
    )
    (y,) = check_and_run(file, {"ids": ids.numpy()})
    with torch.no_grad():
        ref = model(ids).numpy()
    assert np.abs(y - ref).max() < 1e-5
    assert op_histogram(file).get("Gather") == 1
    return file


def write_readme(digits, deep, smooth, heldout=()):
    _, acc, ntrain, ncalib, ntest = digits
    _, deep_acc, deep_params, deep_pmax = deep
    _, smooth_acc, _, smooth_pmax = smooth
    lines = [
        "# testdata",
        "",
        "Every file here is produced by `python3 testdata/make_testdata.py` (deterministic:",
        "fixed seeds, single-threaded torch; re-running rewrites the same models). The script",
        "checks each model with `onnx.checker.check_model(full_check=True)` and runs it in",
        "onnxruntime. torch models: TorchScript exporter (`dynamo=False`), opset 17,",
        "`do_constant_folding=False`, `TrainingMode.EVAL`, so BatchNormalization stays unfused",
        "and BN layers carry non-trivial gamma/beta/running stats. When first generated, every",
        "model was also loaded, optimized and run in tract-onnx 0.23.9 (a throwaway program, not",
        "kept): all passed, digits_cnn with batch 1 and 64 (digits_deep, added later: checked",
        "with `onnx-compress testdata/digits_deep.onnx -o OUT --passes none`, which runs it in",
        "tract).",
        "",
        "| file | what | input(s) | output |",
        "|---|---|---|---|",
        "| `conv_bn_relu.onnx` | torch: Conv-BN-ReLU x2, Conv(no bias)-BN-Clip(0,6), "
        "GlobalAveragePool, Flatten, Gemm | `input` f32[1,3,16,16] | `logits` f32[1,10] |",
        "| `residual.onnx` | torch: stem + 2 ResNet basic blocks (2nd: stride 2, 1x1 conv+BN "
        "downsample), residual Add, BN everywhere, GAP, Gemm | `input` f32[1,3,16,16] | "
        "`logits` f32[1,10] |",
        "| `mobilenet_like.onnx` | torch: MobileNetV2-style inverted residuals (depthwise conv "
        "group=C, BN, Clip(0,6)), one residual Add, a 2-branch Concat, GAP, Gemm | "
        "`input` f32[1,3,32,32] | `logits` f32[1,10] |",
        "| `mlp.onnx` | onnx.helper: Gemm(transB=1)-Relu-Gemm(transB=0)-Relu-MatMul(const W)+Add, "
        "then MatMul(a3, Transpose(x)) and MatMul(gram, a3) with two dynamic inputs | "
        "`x` f32[2,16] | `y` f32[2,16] |",
        "| `if_model.onnx` | onnx.helper: cond = ReduceMean(x) > 0; If: then Relu(Conv(x,W,B)), "
        "else Sigmoid(Conv(x,W)) (both read outer-scope x and initializers, both [1,4,8,8]); "
        "then BatchNormalization, GAP. x>0 takes then, x<0 takes else | `x` f32[1,3,8,8] | "
        "`y` f32[1,4,1,1] |",
        "| `external_data.onnx` | torch: Conv-BN-ReLU, Conv-BN-Clip(0,6); saved with every "
        "initializer in `external_data.onnx.data` (size_threshold=0, one file) | "
        "`input` f32[1,3,8,8] | `logits` f32[1,8,8,8] |",
        "| `external_data.onnx.data` | raw tensor data of `external_data.onnx` | | |",
        "| `digits_cnn.onnx` | **trained** classifier on sklearn `load_digits` (pixels/16 in "
        "[0,1]): Conv3x3(1->16)-BN-ReLU, dw3x3(16)-BN-Clip(0,6), pw(16->32)-BN-ReLU, "
        "dw3x3(32)-BN-ReLU, pw(32->32)-BN-ReLU, GAP, Flatten, Gemm(32->10) logits. Adam, 60 "
        f"epochs. **fp32 test accuracy (onnxruntime): {acc * 100:.2f}%** ({ntest} samples) | "
        "`input` f32[N,1,8,8] (dynamic `N`) | `logits` f32[N,10] |",
        "| `digits_deep.onnx` | **trained** on the same train split (same recipe, seed 8): 11 "
        "Conv/Gemm layers, stem Conv3x3(1->24), residual block (Conv3x3 24->24 x2 + identity), "
        "Conv3x3 stride 2 (24->48), residual block (grouped Conv3x3 48->48 in 6 groups, pw "
        "48->96, pw 96->12 bottleneck, pw 12->48, + identity), Conv3x3 stride 2 (48->96), GAP, "
        f"Gemm(96->64)-ReLU-Gemm(64->10); BN after every conv (9, unfused); {deep_params} "
        f"weights. **fp32 test accuracy (onnxruntime): {deep_acc * 100:.2f}%**; very confident "
        f"(mean top-1 probability {deep_pmax:.4f} on the test split) | "
        "`input` f32[N,1,8,8] (dynamic `N`) | `logits` f32[N,10] |",
        "| `digits_smooth.onnx` | the `digits_deep` network, seed and recipe trained with label "
        "smoothing 0.1 (as torchvision's current training recipes): a classifier whose "
        f"confidence is realistic (mean top-1 probability {smooth_pmax:.4f}). **fp32 test "
        f"accuracy (onnxruntime): {smooth_acc * 100:.2f}%** | "
        "`input` f32[N,1,8,8] (dynamic `N`) | `logits` f32[N,10] |",
        *[heldout_row(f, acc) for f, acc in heldout],
        f"| `digits_test_x.npy` / `digits_test_y.npy` | test split: f32[{ntest},1,8,8] / "
        f"i64[{ntest}] labels | | |",
        f"| `digits_calib_x.npy` | calibration split, f32[{ncalib},1,8,8] (disjoint from train "
        f"({ntrain} samples) and test) | | |",
        "| `digits_calib/000.npy` ... `031.npy` | the first 32 calibration samples, one per "
        "file, each f32[1,1,8,8] (for `--calib DIR`) | | |",
        "| `recurrent.onnx` | torch (constant folding on, so LSTM/GRU weights are plain "
        "initializers): bidirectional LSTM(16->32), GRU(64->24) with its state as input and "
        "output, Linear(24->10) on the last step; random weights | `x` f32[1,12,16], `h0` "
        "f32[1,1,24] | `y` f32[1,10], `hn` f32[1,1,24] |",
        "| `embedding.onnx` | torch: ids cast to int64 in the graph (negative ones wrapped), "
        "Embedding(500, 32) (a Gather on a constant table), mean over the sequence, "
        "Linear(32->10); random weights | `ids` f32[1,8] | `logits` f32[1,10] |",
        '| `tiny_gpt.onnx` | torch (benches/make_gpt.py classes): byte-level GPT, 2 pre-LayerNorm blocks, d_model 64, 4 heads, GELU (Erf) MLP, learned positions, context 32, trained 600 steps on generated stories; fp32 perplexity 1.607, next-byte accuracy 84.13% on `tiny_gpt_eval.npy` (onnxruntime) | `input_ids` i64[batch,sequence] | `logits` f32[batch,sequence,256] |',
        '| `tiny_gpt_kv.onnx` | the same weights with a KV cache (one graph for prefill and decode; zero-length past for the first step) | `input_ids` i64[batch,sequence], `past_key_values.{0,1}.{key,value}` f32[batch,4,past_sequence,16] | `logits`, `present.{0,1}.{key,value}` f32[batch,4,total_sequence,16] |',
        '| `tiny_gpt_calib/input_ids_000.npy` ... `015.npy` | 16 training windows, i64[1,32] each | | |',
        '| `tiny_gpt_eval.npy` / `tiny_gpt_prompts.npy` | 64 held-out windows i64[64,33] (32 inputs + next byte) / 8 held-out 8-byte prompts i64[8,8] (24 greedy steps stay inside the context) | | |',
        "",
    ]
    with open(path("README.md"), "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------- 7. typed-input models (tests/models)
def models_path(name):
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)


def make_token_embed(name):
    """int64 token ids [batch, seq] -> Gather(embedding [50, 8]) -> ReduceMean over seq
    -> Add(MatMul(feat [batch, 4], W [4, 8])) -> MatMul(W2 [8, 3]) -> y [batch, 3].

    The float path (feat) and the embedding path meet before the classifier; ids are fed as given.
    """
    rng = np.random.default_rng(7)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f32(rng.standard_normal((50, 8)) * 0.5), "emb"),
        numpy_helper.from_array(f32(rng.standard_normal((4, 8)) * 0.5), "W"),
        numpy_helper.from_array(f32(rng.standard_normal((8, 3)) * 0.5), "W2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["tok"], name="embed", axis=0),
        helper.make_node("ReduceMean", ["tok", "seq_axis"], ["pooled"], name="pool", keepdims=0),
        helper.make_node("MatMul", ["feat", "W"], ["proj"], name="proj"),
        helper.make_node("Add", ["pooled", "proj"], ["h"], name="add"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W2"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "token_embed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 6]),
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="onnx-compress/make_testdata")
    model.ir_version = 8
    file = models_path(name)
    onnx.save_model(model, file)
    ids = rng.integers(0, 50, (2, 6)).astype(np.int64)
    feat = rng.standard_normal((2, 4)).astype(np.float32)
    (y,) = check_and_run(file, {"ids": ids, "feat": feat})
    e = numpy_helper.to_array(inits[0])[ids].mean(axis=1)
    ref = np.maximum(e + feat @ numpy_helper.to_array(inits[1]), 0) @ numpy_helper.to_array(inits[2])
    assert np.allclose(y, ref, atol=1e-5), "token_embed mismatch"
    return file


def make_if_scalar(name):
    """`mode` int64 scalar; cond = Equal(mode, 1).

    then: Relu(Conv(x, W))                       [1, 4, 8, 8]
    else: MaxPool(x, 2x2)                         [1, 3, 4, 4]   (another shape)
    Only a fixed `mode` makes the output shape known: tract cannot analyse it otherwise.
    """
    rng = np.random.default_rng(8)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
    ]
    then_g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["t_conv"], name="conv", kernel_shape=[3, 3],
                             pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["t_conv"], ["t_out"], name="relu"),
        ],
        "then_branch", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4, 8, 8])],
    )
    else_g = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["e_out"], name="pool", kernel_shape=[2, 2],
                          strides=[2, 2])],
        "else_branch", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    nodes = [
        helper.make_node("Equal", ["mode", "one"], ["cond"], name="is_one"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                         else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes,
        "if_scalar",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("mode", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="onnx-compress/make_testdata")
    model.ir_version = 8
    file = models_path(name)
    onnx.save_model(model, file)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    (y1,) = check_and_run(file, {"x": x, "mode": np.array(1, np.int64)})
    (y0,) = check_and_run(file, {"x": x, "mode": np.array(0, np.int64)})
    assert y1.shape == (1, 4, 8, 8) and y0.shape == (1, 3, 4, 4)
    return file


def make_if_weights(name):
    """`mode` int64 scalar; a Conv before an `If` on `mode == 1` whose branches hold the weights
    (silero_vad.onnx's layout: all weights inside branches on the sample rate).

    main: h = Relu(Conv(x, W0))                                   [1, 8, 8, 8]
    then: Wt = Constant [16, 8, 3, 3]; Relu(Conv(h, Wt))           [1, 16, 8, 8]
    else: MaxPool(Conv(h, We), 2x2), We a main-graph initializer  [1, 16, 4, 4]  (another shape)
    tract cannot analyse it unless `mode` is fixed.
    """
    rng = np.random.default_rng(9)
    w0 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    wt = (rng.standard_normal((16, 8, 3, 3)) * 0.15).astype(np.float32)
    we = (rng.standard_normal((16, 8, 3, 3)) * 0.15).astype(np.float32)
    inits = [
        numpy_helper.from_array(w0, "W0"),
        numpy_helper.from_array(we, "We"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
    ]
    then_g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["Wt"], name="wt_const",
                             value=numpy_helper.from_array(wt, "Wt")),
            helper.make_node("Conv", ["h", "Wt"], ["t_conv"], name="conv_then",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["t_conv"], ["t_out"], name="relu_then"),
        ],
        "then_branch", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 16, 8, 8])],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Conv", ["h", "We"], ["e_conv"], name="conv_else",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("MaxPool", ["e_conv"], ["e_out"], name="pool_else",
                             kernel_shape=[2, 2], strides=[2, 2]),
        ],
        "else_branch", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 16, 4, 4])],
    )
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv0", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["h"], name="relu0"),
        helper.make_node("Equal", ["mode", "one"], ["cond"], name="is_one"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                         else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes,
        "if_weights",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("mode", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="onnx-compress/make_testdata")
    model.ir_version = 8
    file = models_path(name)
    onnx.save_model(model, file)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    (y1,) = check_and_run(file, {"x": x, "mode": np.array(1, np.int64)})
    (y0,) = check_and_run(file, {"x": x, "mode": np.array(0, np.int64)})
    assert y1.shape == (1, 16, 8, 8) and y0.shape == (1, 16, 4, 4)
    return file


def make_if_batch(name):
    """`x` float [n, 3, 8, 8] (symbolic batch); cond = Equal(Shape(x)[0], 1), as silero-vad's
    batch-of-one `If`s test.

    then: Relu(Conv(x, W))                 [n, 4, 8, 8]
    else: MaxPool(Relu(Conv(x, W)), 2x2)   [n, 4, 4, 4]   (another shape)
    Only a fixed input shape (`--input-shape x:1x3x8x8`) settles the branch for tract.
    """
    rng = np.random.default_rng(9)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
    ]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    then_g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["t_conv"], name="t_conv", **conv),
            helper.make_node("Relu", ["t_conv"], ["t_out"], name="t_relu"),
        ],
        "then_branch", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["n", 4, 8, 8])],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["e_conv"], name="e_conv", **conv),
            helper.make_node("Relu", ["e_conv"], ["e_relu"], name="e_relu"),
            helper.make_node("MaxPool", ["e_relu"], ["e_out"], name="e_pool", kernel_shape=[2, 2],
                             strides=[2, 2]),
        ],
        "else_branch", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["n", 4, 4, 4])],
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="batch", axis=0),
        helper.make_node("Equal", ["batch", "one"], ["cond"], name="is_one"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                         else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes,
        "if_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="onnx-compress/make_testdata")
    model.ir_version = 8
    file = models_path(name)
    onnx.save_model(model, file)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    (y1,) = check_and_run(file, {"x": x[:1]})
    (y2,) = check_and_run(file, {"x": x})
    assert y1.shape == (1, 4, 8, 8) and y2.shape == (2, 4, 4, 4)
    return file


# ---------------------------------------------------------------- 8. tiny language models
def make_tiny_gpt():
    """A byte-level GPT (2 pre-LayerNorm blocks, d_model 64, 4 heads, GELU MLP, learned positions,
    context 32), trained for 600 steps on benches/make_gpt.py's generated stories, exported twice:

      tiny_gpt.onnx     input_ids int64 [batch, sequence] -> logits [batch, sequence, 256]
      tiny_gpt_kv.onnx  + past_key_values.{0,1}.{key,value} [batch, 4, past_sequence, 16] in,
                        present.{0,1}.{key,value} out (the same weights)

    plus tiny_gpt_calib/ (16 training windows, input_ids_NNN.npy [1, 32]), tiny_gpt_eval.npy
    (64 held-out windows [64, 33]: 32 inputs and the next byte) and tiny_gpt_prompts.npy
    (8 held-out 8-byte prompts: with 24 greedy steps they stay inside the 32-position context).
    """
    sys.path.insert(0, os.path.join(OUT, "..", "benches"))
    import make_gpt

    ctx = 32
    train_data = np.frombuffer(make_gpt.generate_text(1, 300_000), np.uint8).astype(np.int64)
    eval_data = np.frombuffer(make_gpt.generate_text(1001, 20_000), np.uint8).astype(np.int64)
    seed(21)
    model = make_gpt.GPT(layers=2, d=64, heads=4, ctx=ctx)
    make_gpt.train(model, train_data, ctx, 0, seed=21, batch=32, lr=3e-3, log=lambda _: None, max_steps=600)
    plain, kv = path("tiny_gpt.onnx"), path("tiny_gpt_kv.onnx")
    make_gpt.export_plain(model, plain, ctx)
    make_gpt.export_cache(model, kv)
    calib = path("tiny_gpt_calib")
    os.makedirs(calib, exist_ok=True)
    rng = np.random.default_rng(21)
    for k, i in enumerate(rng.integers(0, len(train_data) - ctx, 16)):
        np.save(os.path.join(calib, f"input_ids_{k:03d}.npy"), train_data[i:i + ctx][None])
    ev = make_gpt.windows(eval_data, ctx, ctx)[:64].astype(np.int64)
    np.save(path("tiny_gpt_eval.npy"), ev)
    np.save(path("tiny_gpt_prompts.npy"), np.stack([eval_data[i:i + 8] for i in range(0, 8 * 499, 499)]))
    for f in (plain, kv):
        onnx.checker.check_model(onnx.load(f), full_check=True)
    ppl, acc = make_gpt.ort_perplexity(plain, ev)
    print(f"tiny_gpt fp32 perplexity {ppl:.4f}, next-byte accuracy {acc * 100:.2f}% (onnxruntime, 64 windows)")
    return [plain, kv]


def heldout_row(file, acc):
    what = {
        "digits_vgg.onnx": "plain VGG-style: Conv3x3(1->32), Conv3x3(32->32), MaxPool, "
        "Conv3x3(32->64), Conv3x3(64->64), MaxPool, Flatten(256), Gemm(256->128)-ReLU-"
        "Gemm(128->10); BN+ReLU after every conv (4, unfused)",
        "digits_reswide.onnx": "residual with a wide head: stem Conv3x3(1->32), basic block "
        "(2x Conv3x3 32->32 + identity), Conv3x3 stride 2 (32->64), basic block (2x Conv3x3 "
        "64->64 + identity), head Conv1x1(64->256)-BN-ReLU, GAP, Gemm(256->10); BN after every "
        "conv (7, unfused)",
    }[os.path.basename(file)]
    return (f"| `{os.path.basename(file)}` | **trained**, held out from tuning the prune pass "
            f"(issue 16; same splits, Adam 40 epochs, own seed): {what}. **fp32 test accuracy "
            f"(onnxruntime): {acc * 100:.2f}%** | `input` f32[N,1,8,8] (dynamic `N`) | "
            "`logits` f32[N,10] |")


def make_prune_models():
    """The held-out pruning models (issue 16), after every other digits model."""
    return [
        make_digits_heldout(DigitsVgg, "digits_vgg.onnx", 11, 4),
        make_digits_heldout(DigitsResWide, "digits_reswide.onnx", 12, 7),
    ]


def main():
    if "--typed-input-models" in sys.argv:
        for f in [make_token_embed("token_embed.onnx"), make_if_scalar("if_scalar.onnx"),
                  make_if_batch("if_batch.onnx")]:
            print(f"{os.path.basename(f):22s} {os.path.getsize(f):8d} B")
        return 0
    if "--branch-weight-models" in sys.argv:
        f = make_if_weights("if_weights.onnx")
        print(f"{os.path.basename(f):22s} {os.path.getsize(f):8d} B")
        return 0
    if "--prune-models" in sys.argv:
        for f, acc in make_prune_models():
            print(f"{os.path.basename(f):22s} {os.path.getsize(f):8d} B  test accuracy {acc * 100:.2f}%")
        return 0
    if "--language-models" in sys.argv:
        for f in make_tiny_gpt():
            print(f"{os.path.basename(f):22s} {os.path.getsize(f):8d} B")
        return 0
    files = [
        export_torch_model(ConvBnRelu, (1, 3, 16, 16), "conv_bn_relu.onnx", 1),
        export_torch_model(Residual, (1, 3, 16, 16), "residual.onnx", 2),
        export_torch_model(MobileNetLike, (1, 3, 32, 32), "mobilenet_like.onnx", 3),
        make_mlp("mlp.onnx"),
        make_if_model("if_model.onnx"),
        make_external_data("external_data.onnx"),
        make_recurrent("recurrent.onnx"),
        make_embedding("embedding.onnx"),
    ]
    digits = make_digits("digits_cnn.onnx")
    files.append(digits[0])
    deep = make_digits_deep("digits_deep.onnx")  # after digits_cnn: own seed, same splits
    files.append(deep[0])
    smooth = make_digits_deep("digits_smooth.onnx", label_smoothing=0.1)
    files.append(smooth[0])
    heldout = make_prune_models()  # after the other digits models: own seeds, same splits
    files += [f for f, _ in heldout]
    write_readme(digits, deep, smooth, heldout)
    files += [make_token_embed("token_embed.onnx"), make_if_scalar("if_scalar.onnx")]
    files += make_tiny_gpt()
    for f in files:
        h = hashlib.sha256(open(f, "rb").read()).hexdigest()[:12]
        hist = ", ".join(f"{k}:{v}" for k, v in sorted(op_histogram(f).items()))
        print(f"{os.path.basename(f):22s} {os.path.getsize(f):8d} B  sha256:{h}  {hist}")
    print(f"digits_cnn fp32 test accuracy (onnxruntime): {digits[1] * 100:.2f}%")
    print(f"digits_deep fp32 test accuracy (onnxruntime): {deep[1] * 100:.2f}%")
    print(f"digits_smooth fp32 test accuracy (onnxruntime): {smooth[1] * 100:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
