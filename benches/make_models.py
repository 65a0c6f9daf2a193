#!/usr/bin/env python3
"""Model zoo + realistic calibration / held-out data for the range-method benchmark (issue 14).

Usage: python3 benches/make_models.py --out /work/zoo [--only a,b] [--calib 64] [--eval 32]

Writes one directory per model under OUT, each with:
  model.onnx   the fp32 model
  calib.npy    calibration inputs (NCHW float32), the SAME file every tool is given
  eval.npy     held-out inputs (never seen by any tool)
  meta.json    {"task": ..., "input": name, "input_shape": "name:1xCxHxW" or null, ...}
  labels.*     where the task has labels (labels.npy of ints, or labels.json of strings)

Everything is seeded and made without network:
- torchvision CNNs/ViT, random init (no weight downloads). Random init leaves BatchNorm running
  statistics meaningless (mean 0, var 1), so every BN's statistics are re-estimated on ~256
  natural-image crops (BN layers in train mode with momentum=None = exact cumulative average, no
  grad, everything else in eval mode so dropout / stochastic depth stay off), then the model is
  exported with torch.onnx.export(dynamo=False, opset 17), input `input`, dynamic batch.
- Image data: random-resized crops, flips and colour jitter of the real photos that ship with
  scikit-learn (china, flower) and scikit-image (astronaut, coffee, chelsea, rocket, ...), ImageNet
  normalisation. The calibration / BN photos and the held-out photos are disjoint sets.
- Trained OCR models from pip packages (rapidocr_onnxruntime: PP-OCRv4 rec, PP-OCR mobile v2 cls,
  PP-OCRv4 det; ddddocr: common.onnx) with rendered text (PIL + DejaVu fonts) of known strings,
  preprocessed exactly as the packages do.
- testdata's trained digits_cnn / digits_deep with their real data and labels.
"""
import argparse
import glob
import json
import math
import os
import shutil
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TD = os.path.join(ROOT, "testdata")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

# ----------------------------------------------------------------------------- photos


def load_photos():
    """(calibration photos, held-out photos) as lists of RGB uint8 arrays; disjoint sets."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    named = {os.path.basename(f).split(".")[0]: im for f, im in zip(sk.filenames, sk.images)}
    for n in ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
              "immunohistochemistry", "retina", "coins", "moon", "brick", "grass", "gravel",
              "colorwheel", "page", "text"]:
        try:
            im = getattr(skd, n)()
        except Exception as e:  # needs a download (pooch) in this version: skip it
            print(f"skip photo {n}: {type(e).__name__}", file=sys.stderr)
            continue
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        named[n] = np.ascontiguousarray(im[..., :3]).astype(np.uint8)
    held_out = {"coffee", "rocket", "flower", "coins", "grass", "text"}
    calib = [named[k] for k in sorted(named) if k not in held_out]
    ev = [named[k] for k in sorted(named) if k in held_out]
    return calib, ev


def random_crop(rng, photo, size=224):
    """torchvision-style RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + flip + colour jitter."""
    h, w = photo.shape[:2]
    for _ in range(20):
        area = h * w * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = min(h, w), min(h, w)
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    im = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
    return np.asarray(im, np.float32) / 255.0


def image_batch(rng, photos, n, size=224, photo_ids=None):
    """n crops; the photo each came from is appended to `photo_ids` when given."""
    xs = []
    for _ in range(n):
        i = int(rng.integers(len(photos)))
        if photo_ids is not None:
            photo_ids.append(i)
        xs.append(random_crop(rng, photos[i], size))
    x = (np.stack(xs) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32)


# ----------------------------------------------------------------------------- torchvision

TV = ["resnet18", "resnet50", "regnet_x_400mf", "squeezenet1_1", "mobilenet_v2",
      "mobilenet_v3_small", "efficientnet_b0", "densenet121", "vit_small", "convnext_tiny",
      "shufflenet_v2_x1_0", "vit_b_16"]


def build_tv(name):
    import torchvision.models as tvm
    if name == "vit_small":  # vit_b_16 is too slow for 2 cores; same family, 6 layers, width 384
        vit = tvm.VisionTransformer(image_size=224, patch_size=16, num_layers=6, num_heads=6,
                                    hidden_dim=384, mlp_dim=1536)
        vit.heads.head.reset_parameters()  # torchvision zero-inits the head: output would be 0
        return vit
    model = getattr(tvm, name)(weights=None)
    if name == "vit_b_16":  # issue 17's table: the full-size ViT (86 M parameters)
        model.heads.head.reset_parameters()
    return model


def recalibrate_bn(model, x, batch=32):
    """Exact BN statistics of x: BN in train mode with momentum=None, everything else eval."""
    import torch
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i:i + batch]))
    model.eval()
    return len(bns)


def make_torchvision(name, d, calib_photos, eval_photos, n_calib, n_eval, n_bn):
    import torch
    torch.manual_seed(0)
    model = build_tv(name)
    bn_x = image_batch(np.random.default_rng(100), calib_photos, n_bn)
    nbn = recalibrate_bn(model, bn_x)
    calib = image_batch(np.random.default_rng(200), calib_photos, n_calib)
    ev_photos = []
    ev = image_batch(np.random.default_rng(300), eval_photos, n_eval, photo_ids=ev_photos)
    # which held-out photo each eval crop came from: methods.py --bootstrap resamples photos
    with open(os.path.join(d, "eval_groups.json"), "w") as f:
        json.dump(ev_photos, f)
    torch.onnx.export(model, torch.from_numpy(calib[:1]), os.path.join(d, "model.onnx"),
                      dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    np.save(os.path.join(d, "calib.npy"), calib)
    np.save(os.path.join(d, "eval.npy"), ev)
    return {"task": "classifier", "input": "input", "input_shape": None, "batch_dynamic": True,
            "source": f"torchvision {name}, random init (seed 0), {nbn} BN re-estimated on "
                      f"{n_bn} photo crops",
            "data": f"{n_calib} calib crops / {n_eval} eval crops from disjoint photos"}


# ----------------------------------------------------------------------------- rendered text

WORDS = """the of and to in is was for on are with as his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him
two has look more day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live where after back
little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large spell add
even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state
keep eye never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base
hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem
piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less
morning ten simple several vowel toward war lay against pattern slow center love person money
serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall
lead cry dark machine note wait plan figure star box noun field rest correct able pound done
beauty drive stood contain front teach week final gave green oh quick develop ocean warm free
minute strong special mind behind clear tail produce fact street inch multiply nothing course stay
wheel full force blue object decide surface deep moon island foot system busy test record boat
common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot
miss brought heat snow tire bring yes distant fill east paint language among""".split()

FONTS = sorted(f for f in glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf")
               if "Math" not in f and "ExtraLight" not in f)


def random_text(rng, max_chars):
    """English words / numbers, 1-4 tokens, at most max_chars characters."""
    while True:
        toks = []
        for _ in range(rng.integers(1, 5)):
            r = rng.random()
            if r < 0.15:
                toks.append(str(rng.integers(0, 100000)))
            elif r < 0.25:
                w = WORDS[rng.integers(len(WORDS))]
                toks.append(w.capitalize() if rng.random() < 0.5 else w.upper())
            else:
                toks.append(WORDS[rng.integers(len(WORDS))])
        s = " ".join(toks)
        if 1 <= len(s) <= max_chars:
            return s


def render_line(rng, text, size=None):
    """A tightly cropped text line: dark ink on a light, slightly noisy / tinted background."""
    font = ImageFont.truetype(FONTS[rng.integers(len(FONTS))], size or int(rng.integers(26, 42)))
    l, t, r, b = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 14)), int(rng.integers(3, 10))
    w, h = r - l + 2 * pad_x, b - t + 2 * pad_y
    bg = tuple(int(v) for v in rng.integers(180, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    im = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(im).text((pad_x - l, pad_y - t), text, font=font, fill=ink)
    if rng.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.9)))
    a = np.asarray(im, np.float32) + rng.normal(0, rng.uniform(0, 8), (h, w, 3))
    return np.clip(a, 0, 255).astype(np.uint8)


def resize_norm_pad(img, height, width):
    """rapidocr's resize_norm_img: resize to `height` keeping aspect (capped at width),
    (x/255 - 0.5)/0.5, zero-pad on the right to `width`. HWC uint8 -> CHW float32."""
    import cv2
    h, w = img.shape[:2]
    rw = min(width, int(math.ceil(height * w / float(h))))
    x = cv2.resize(img, (rw, height)).astype(np.float32).transpose(2, 0, 1) / 255
    x = (x - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :rw] = x
    return out


def rapidocr_dir():
    import rapidocr_onnxruntime
    return os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models")


def make_ocr_rec(d, n_calib, n_eval):
    shutil.copy(os.path.join(rapidocr_dir(), "ch_PP-OCRv4_rec_infer.onnx"),
                os.path.join(d, "model.onnx"))
    rng = np.random.default_rng(400)
    def lines(n):
        texts, xs = [], []
        while len(xs) < n:
            s = random_text(rng, 24)
            img = render_line(rng, s)
            if img.shape[1] / img.shape[0] > 320 / 48:  # would be squeezed: keep aspect honest
                continue
            texts.append(s)
            xs.append(resize_norm_pad(img, 48, 320))
        return texts, np.stack(xs)
    _, calib = lines(n_calib)
    texts, ev = lines(n_eval)
    np.save(os.path.join(d, "calib.npy"), calib)
    np.save(os.path.join(d, "eval.npy"), ev)
    with open(os.path.join(d, "labels.json"), "w") as f:
        json.dump(texts, f, ensure_ascii=False)
    return {"task": "ctc_rec", "input": "x", "input_shape": "x:1x3x48x320", "batch_dynamic": True,
            "charset": "metadata:character", "blank": 0, "append_space": True,
            "source": "rapidocr_onnxruntime ch_PP-OCRv4_rec_infer.onnx (trained)",
            "data": f"rendered English text lines, {n_calib} calib / {n_eval} eval, "
                    "rapidocr preprocessing 3x48x320"}


def negative_dims_to_named(src, dst):
    import onnx
    m = onnx.load(src)
    for v in list(m.graph.input) + list(m.graph.output):
        for i, dim in enumerate(v.type.tensor_type.shape.dim):
            if dim.WhichOneof("value") == "dim_value" and dim.dim_value < 1:
                dim.dim_param = "batch" if i == 0 else f"dim{i}"
    onnx.save(m, dst)


def make_ocr_cls(d, n_calib, n_eval):
    # paddle2onnx declares the dynamic batch as dim_value -1 (ONNX Runtime reads it as unknown,
    # onnx-compress refuses it): model.onnx has it as a named dim, model.orig.onnx is untouched
    src = os.path.join(rapidocr_dir(), "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    shutil.copy(src, os.path.join(d, "model.orig.onnx"))
    negative_dims_to_named(src, os.path.join(d, "model.onnx"))
    rng = np.random.default_rng(500)
    def lines(n):
        ys, xs = [], []
        while len(xs) < n:
            img = render_line(rng, random_text(rng, 16))
            if img.shape[1] / img.shape[0] > 192 / 48:
                continue
            y = int(rng.integers(0, 2))
            if y:
                img = img[::-1, ::-1].copy()
            ys.append(y)
            xs.append(resize_norm_pad(img, 48, 192))
        return np.array(ys, np.int64), np.stack(xs)
    _, calib = lines(n_calib)
    ys, ev = lines(n_eval)
    np.save(os.path.join(d, "calib.npy"), calib)
    np.save(os.path.join(d, "eval.npy"), ev)
    np.save(os.path.join(d, "labels.npy"), ys)
    return {"task": "classifier", "input": "x", "input_shape": "x:1x3x48x192",
            "batch_dynamic": True,
            "source": "rapidocr_onnxruntime ch_ppocr_mobile_v2.0_cls_infer.onnx (trained; "
                      "declared batch dim -1 renamed to a symbolic dim)",
            "data": f"rendered text lines rotated 0/180 (label 0/1), {n_calib} calib / {n_eval} "
                    "eval, rapidocr preprocessing 3x48x192"}


def render_page(rng, photos, h=480, w=640):
    """A page: light background (plain or a washed-out photo), 6-14 text lines placed at random."""
    if rng.random() < 0.4:
        p = photos[rng.integers(len(photos))]
        bg = Image.fromarray(p).resize((w, h), Image.BILINEAR)
        bg = Image.blend(bg, Image.new("RGB", (w, h), (255, 255, 255)), 0.7)
    else:
        bg = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(bg)
    y = int(rng.integers(5, 30))
    while y < h - 40:
        font = ImageFont.truetype(FONTS[rng.integers(len(FONTS))], int(rng.integers(16, 36)))
        s = random_text(rng, 40)
        x = int(rng.integers(5, w // 3))
        draw.text((x, y), s, font=font, fill=tuple(int(v) for v in rng.integers(0, 80, 3)))
        y += int(font.size * rng.uniform(1.3, 2.6))
    a = np.asarray(bg, np.float32) / 255
    x = ((a - 0.5) / 0.5).transpose(2, 0, 1)
    return np.ascontiguousarray(x).astype(np.float32)


def make_ocr_det(d, calib_photos, eval_photos, n_calib, n_eval):
    shutil.copy(os.path.join(rapidocr_dir(), "ch_PP-OCRv4_det_infer.onnx"),
                os.path.join(d, "model.onnx"))
    rng = np.random.default_rng(600)
    calib = np.stack([render_page(rng, calib_photos) for _ in range(n_calib)])
    ev = np.stack([render_page(rng, eval_photos) for _ in range(n_eval)])
    np.save(os.path.join(d, "calib.npy"), calib)
    np.save(os.path.join(d, "eval.npy"), ev)
    return {"task": "det_map", "input": "x", "input_shape": "x:1x3x480x640",
            "batch_dynamic": True, "threshold": 0.3,
            "source": "rapidocr_onnxruntime ch_PP-OCRv4_det_infer.onnx (trained)",
            "data": f"rendered 480x640 pages, {n_calib} calib / {n_eval} eval, (x/255-0.5)/0.5"}


def drop_output_shapes(src, dst):
    import onnx
    m = onnx.load(src)
    for v in m.graph.output:
        v.type.tensor_type.ClearField("shape")
    onnx.save(m, dst)


def make_ddddocr(d, n_calib, n_eval):
    import ddddocr
    from ddddocr.models.charset_manager import CharsetManager
    # common.onnx declares its output [1, seqlen] but computes logits (seqlen, 1, classes):
    # ONNX Runtime only warns, onnx-compress refuses. model.onnx drops the wrong declared output
    # shape (element type kept); model.orig.onnx is untouched
    src = os.path.join(os.path.dirname(ddddocr.__file__), "common.onnx")
    shutil.copy(src, os.path.join(d, "model.orig.onnx"))
    drop_output_shapes(src, os.path.join(d, "model.onnx"))
    cm = CharsetManager()
    cm.load_default_charset(beta=True)  # common.onnx is ddddocr's beta model
    charset = cm.get_charset()
    alnum = "abcdefghijklmnopqrstuvwxyz0123456789"
    rng = np.random.default_rng(700)
    def caps(n):
        texts, xs = [], []
        for _ in range(n):
            s = "".join(alnum[i] for i in rng.integers(0, len(alnum), rng.integers(4, 7)))
            img = render_line(rng, s, size=int(rng.integers(30, 44)))
            # ddddocr: resize to height 64 keeping aspect, grayscale, /255; fixed canvas 64x160
            # so every sample has one shape (lines are padded with their own background)
            g = Image.fromarray(img).convert("L")
            nw = max(1, int(g.size[0] * 64 / g.size[1]))
            g = g.resize((min(nw, 160), 64), Image.LANCZOS)
            canvas = Image.new("L", (160, 64), int(np.median(np.asarray(g))))
            canvas.paste(g, ((160 - g.size[0]) // 2, 0))
            xs.append(np.asarray(canvas, np.float32)[None] / 255.0)
            texts.append(s)
        return texts, np.stack(xs)
    _, calib = caps(n_calib)
    texts, ev = caps(n_eval)
    np.save(os.path.join(d, "calib.npy"), calib)
    np.save(os.path.join(d, "eval.npy"), ev)
    with open(os.path.join(d, "labels.json"), "w") as f:
        json.dump(texts, f)
    with open(os.path.join(d, "charset.json"), "w") as f:
        json.dump(charset, f, ensure_ascii=False)
    return {"task": "ctc_rec", "input": "input1", "input_shape": "input1:1x1x64x160",
            "batch_dynamic": False, "charset": "charset.json", "blank": 0,
            "append_space": False, "seq_major": True, "case_insensitive": True,
            "source": "ddddocr common.onnx (trained, beta charset; wrong declared output "
                      "shape dropped); output logits (T,1,C)",
            "data": f"rendered 4-6 char alnum strings, {n_calib} calib / {n_eval} eval, "
                    "gray 1x64x160 /255"}


def make_digits(name, d):
    shutil.copy(os.path.join(TD, f"{name}.onnx"), os.path.join(d, "model.onnx"))
    shutil.copy(os.path.join(TD, "digits_calib_x.npy"), os.path.join(d, "calib.npy"))
    shutil.copy(os.path.join(TD, "digits_test_x.npy"), os.path.join(d, "eval.npy"))
    shutil.copy(os.path.join(TD, "digits_test_y.npy"), os.path.join(d, "labels.npy"))
    import onnx
    m = onnx.load(os.path.join(d, "model.onnx"))
    inp = m.graph.input[0]
    dims = [x.dim_value if x.dim_value else None for x in inp.type.tensor_type.shape.dim]
    return {"task": "classifier", "input": inp.name, "input_shape": None,
            "batch_dynamic": dims[0] is None,
            "source": f"testdata/{name}.onnx (trained, sklearn digits)",
            "data": "testdata digits: 200 calib / 360 test, real labels"}


ALL = TV + ["ppocr_rec", "ppocr_cls", "ppocr_det", "ddddocr", "digits_cnn", "digits_deep"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--bn-images", type=int, default=256)
    a = ap.parse_args()
    only = set(a.only.split(",")) if a.only else set(ALL)
    calib_photos, eval_photos = load_photos()
    for name in ALL:
        if name not in only:
            continue
        d = os.path.join(a.out, name)
        os.makedirs(d, exist_ok=True)
        print(f"== {name}", file=sys.stderr)
        if name in TV:
            meta = make_torchvision(name, d, calib_photos, eval_photos, a.calib, a.eval,
                                    a.bn_images)
        elif name == "ppocr_rec":
            meta = make_ocr_rec(d, a.calib, max(a.eval, 200))
        elif name == "ppocr_cls":
            meta = make_ocr_cls(d, a.calib, max(a.eval, 200))
        elif name == "ppocr_det":
            meta = make_ocr_det(d, calib_photos, eval_photos, min(a.calib, 32), min(a.eval, 16))
        elif name == "ddddocr":
            meta = make_ddddocr(d, a.calib, max(a.eval, 200))
        else:
            meta = make_digits(name, d)
        meta["name"] = name
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
