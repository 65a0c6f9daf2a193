#!/usr/bin/env python3
"""A BERT-style encoder with int64 token ids, exported from a config (no download), and token
calibration data from generated text, for the coverage trial (issue 15: integer inputs reach the
quantizer and the encoder's MatMuls run as integer kernels in ONNX Runtime).

    python3 benches/make_bert.py --out /work/zoo/bert [--minutes 3]

The encoder (4 layers, hidden 256, 4 heads, intermediate 1024, byte vocabulary 259 with
[PAD]=256, [CLS]=257, [MASK]=258) is trained briefly as a masked-byte model on benches/make_gpt.py's
generated stories, so its activations have trained statistics. Inputs: `input_ids` and
`attention_mask` int64 [batch, 64]; output `logits` [batch, 64, 259].
Writes bert.onnx, calib/ (64 `.npz` feeds with both inputs), eval/ (32 held-out feeds), meta.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_gpt  # noqa: E402

PAD, CLS, MASK, VOCAB, SEQ = 256, 257, 258, 259, 64


class Masked(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def feeds(data, rng, n, mask_prob=0.15):
    ids, masks, labels = [], [], []
    for _ in range(n):
        i = int(rng.integers(0, len(data) - SEQ))
        length = int(rng.integers(SEQ // 2, SEQ))
        row = np.full(SEQ, PAD, np.int64)
        row[0] = CLS
        row[1:length] = data[i:i + length - 1]
        lab = row.copy()
        m = (rng.random(SEQ) < mask_prob) & (np.arange(SEQ) > 0) & (np.arange(SEQ) < length)
        row[m] = MASK
        ids.append(row)
        masks.append((np.arange(SEQ) < length).astype(np.int64))
        labels.append(np.where(m, lab, -100))
    return np.stack(ids), np.stack(masks), np.stack(labels)


def main():
    from transformers import BertConfig, BertForMaskedLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=3.0)
    a = ap.parse_args()
    os.makedirs(os.path.join(a.out, "calib"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "eval"), exist_ok=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=SEQ, pad_token_id=PAD)
    bert = BertForMaskedLM(cfg)
    data = np.frombuffer(make_gpt.generate_text(3, 1_000_000), np.uint8).astype(np.int64)
    held = np.frombuffer(make_gpt.generate_text(3003, 50_000), np.uint8).astype(np.int64)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(bert.parameters(), lr=5e-4)
    start, step = time.time(), 0
    bert.train()
    while time.time() - start < a.minutes * 60:
        ids, mask, lab = feeds(data, rng, 32)
        out = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   labels=torch.from_numpy(lab))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step} loss {out.loss.item():.3f}", flush=True)
        step += 1
    bert.eval()
    model = Masked(bert).eval()
    path = os.path.join(a.out, "bert.onnx")
    ids, mask, _ = feeds(data, rng, 1)
    torch.onnx.export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), path, dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                    "logits": {0: "batch"}})
    for k in range(64):
        ids, mask, _ = feeds(data, rng, 1)
        np.savez(os.path.join(a.out, "calib", f"{k:03d}.npz"), input_ids=ids, attention_mask=mask)
    hits = n = 0
    import onnxruntime as ort
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for k in range(32):
        ids, mask, lab = feeds(held, rng, 1)
        np.savez(os.path.join(a.out, "eval", f"{k:03d}.npz"), input_ids=ids, attention_mask=mask, labels=lab)
        pred = s.run(None, {"input_ids": ids, "attention_mask": mask})[0].argmax(-1)
        sel = lab >= 0
        hits += int((pred[sel] == lab[sel]).sum())
        n += int(sel.sum())
    meta = {"steps": step, "params": sum(p.numel() for p in bert.parameters()),
            "fp32_masked_byte_accuracy": hits / max(n, 1), "masked_bytes": n}
    json.dump(meta, open(os.path.join(a.out, "meta.json"), "w"), indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
