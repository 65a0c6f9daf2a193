#!/usr/bin/env python3
"""Character accuracy of ddddocr's `common.onnx` (fp32) against compressed copies of it, on
rendered captcha-like text. Measurement only, nothing asserted (BENCHMARKS.md quotes it).

    python3 benches/ddddocr_accuracy.py --calib-dir /tmp/dddd_calib          # write calibration
    onnx-compress $(python3 -c 'import ddddocr,os;print(os.path.dirname(ddddocr.__file__))')/common.onnx \
        -o /tmp/dddd_int8.onnx --calib /tmp/dddd_calib
    python3 benches/ddddocr_accuracy.py /tmp/dddd_int8.onnx [more.onnx ...]

Images: random 4-6 character strings over digits and ASCII letters (the part of ddddocr's
charset captchas use), rendered with a DejaVu font at a random size and offset, with noise
lines and dots, 160x60 RGB. Preprocessing is ddddocr's own (`OCREngine._preprocess_image`:
resize to height 64 keeping the aspect ratio, LANCZOS, grayscale, /255, NCHW) and decoding its
CTC greedy decode over the beta charset (the charset `common.onnx` is shipped with).

Character accuracy = 1 - (edit distance / reference length), summed over the set; sequence
accuracy = exact matches. The reference is the rendered string; the fp32 model's own accuracy
is printed first so the compressed models are compared with it, not with perfection.
"""

import argparse
import os
import random
import string

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

import ddddocr
from ddddocr.core.ocr_engine import OCREngine

PKG = os.path.dirname(ddddocr.__file__)
FONTS = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
]
ALPHABET = string.digits + string.ascii_letters


def render(text, rng):
    img = Image.new("RGB", (160, 60), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    fonts = [f for f in FONTS if os.path.exists(f)]
    font = ImageFont.truetype(rng.choice(fonts), rng.randint(30, 38))
    x = rng.randint(2, 12)
    for ch in text:
        color = tuple(rng.randint(0, 110) for _ in range(3))
        draw.text((x, rng.randint(2, 14)), ch, font=font, fill=color)
        x += int(draw.textlength(ch, font=font)) + rng.randint(-1, 3)
    for _ in range(rng.randint(1, 3)):
        pts = [(rng.randint(0, 160), rng.randint(0, 60)) for _ in range(2)]
        draw.line(pts, fill=tuple(rng.randint(60, 180) for _ in range(3)), width=1)
    for _ in range(80):
        draw.point((rng.randint(0, 159), rng.randint(0, 59)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img


def samples(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 6)))
        out.append((text, render(text, rng)))
    return out


def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def evaluate(engine, model_path, data):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    engine.session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    errors = chars = exact = 0
    for text, img in data:
        got = engine.predict(img)
        # ddddocr's charset mixes cases for some letters; compare case-insensitively as
        # captcha solvers do.
        errors += edit_distance(got.lower(), text.lower())
        chars += len(text)
        exact += got.lower() == text.lower()
    return 100.0 * (1 - errors / chars), 100.0 * exact / len(data)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="compressed copies of common.onnx")
    p.add_argument("--fp32", default=os.path.join(PKG, "common.onnx"))
    p.add_argument("-n", type=int, default=1000, help="evaluation images (default 1000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--calib-dir", help="write N calibration feeds (.npy, seed+1000) here and exit")
    p.add_argument("--calib-n", type=int, default=64)
    args = p.parse_args()
    engine = OCREngine(beta=True)

    if args.calib_dir:
        os.makedirs(args.calib_dir, exist_ok=True)
        for i, (_, img) in enumerate(samples(args.calib_n, args.seed + 1000)):
            x = engine._preprocess_image(img, False)
            np.save(os.path.join(args.calib_dir, f"input1_{i:03}.npy"), x)
        print(f"wrote {args.calib_n} feeds of shape {list(x.shape)} to {args.calib_dir}")
        return

    data = samples(args.n, args.seed)
    base = os.path.getsize(args.fp32)
    char, seq = evaluate(engine, args.fp32, data)
    print(f"{'model':40} {'bytes':>10} {'of fp32':>8} {'char acc':>9} {'seq acc':>8}")
    print(f"{os.path.basename(args.fp32):40} {base:>10} {100.0:>7.1f}% {char:>8.2f}% {seq:>7.1f}%")
    for m in args.models:
        c, s = evaluate(engine, m, data)
        size = os.path.getsize(m)
        print(f"{m:40} {size:>10} {100.0 * size / base:>7.1f}% {c:>8.2f}% {s:>7.1f}%  (char {c - char:+.2f} pt)")


if __name__ == "__main__":
    main()
