#!/usr/bin/env python3
"""Two range methods on one model across held-out sets (issue 14 part 1): the SQNR difference
A - B and its 90% interval when the held-out photos (or samples) are resampled.

Usage: python3 benches/method_pairs.py --run NAME=RESULTS_JSON:ZOO_DIR [--run ...]
                                       --pair MODEL:A:B [--pair ...] [--draws 2000]

RESULTS_JSON comes from `benches/methods.py --out DIR` (DIR/results.json, with the per-sample
noise and signal energies methods.py stores); ZOO_DIR is the zoo it measured, whose
`MODEL/eval_groups.json` (written by make_models.py) names the photo of each eval crop: whole
photos are resampled where it exists, samples elsewhere (as methods.py --bootstrap does).
"""
import argparse
import json

import numpy as np

from methods import eval_groups, resample_counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True)
    ap.add_argument("--pair", action="append", required=True)
    ap.add_argument("--draws", type=int, default=2000)
    a = ap.parse_args()
    runs = []
    for spec in a.run:
        name, rest = spec.split("=", 1)
        path, zoo = rest.split(":", 1)
        with open(path) as f:
            runs.append((name, {r["model"]: r for r in json.load(f)}, zoo))
    print("| model | A - B | " + " | ".join(n for n, _, _ in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for pair in a.pair:
        model, m_a, m_b = pair.split(":")
        cells = []
        for _, results, zoo in runs:
            r = results.get(model)
            if not r or any("sample_noise" not in r.get(m, {}) for m in (m_a, m_b)):
                cells.append("-")
                continue
            groups = eval_groups(zoo, model, len(r[m_a]["sample_signal"]))
            counts, _ = resample_counts(groups, a.draws, np.random.default_rng(0))
            noise = {m: np.array(r[m]["sample_noise"]) for m in (m_a, m_b)}
            d = 10 * np.log10((counts @ noise[m_b]) / (counts @ noise[m_a]))
            full = r[m_a]["sqnr_db"] - r[m_b]["sqnr_db"]
            cells.append(f"{full:+.2f} ({np.quantile(d, 0.05):+.2f} .. "
                         f"{np.quantile(d, 0.95):+.2f}, > 0 in {100 * np.mean(d > 0):.0f}%)")
        print(f"| {model} | {m_a} - {m_b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
