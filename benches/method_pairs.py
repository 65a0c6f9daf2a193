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
import os

import numpy as np


def resampled_db_difference(r, a, b, groups, draws, rng):
    sig = np.array(r[a]["sample_signal"])
    na, nb = np.array(r[a]["sample_noise"]), np.array(r[b]["sample_noise"])
    members = [np.flatnonzero(groups == g) for g in sorted(set(groups.tolist()))]
    picks = rng.integers(0, len(members), size=(draws, len(members)))
    counts = np.zeros((draws, len(sig)))
    for j, m in enumerate(members):
        counts[:, m] += np.sum(picks == j, 1)[:, None]
    return 10 * np.log10((counts @ nb) / (counts @ na)), len(members)


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
            gpath = os.path.join(zoo, model, "eval_groups.json")
            groups = np.array(json.load(open(gpath)) if os.path.isfile(gpath)
                              else range(len(r[m_a]["sample_signal"])))
            rng = np.random.default_rng(0)
            d, n = resampled_db_difference(r, m_a, m_b, groups, a.draws, rng)
            full = r[m_a]["sqnr_db"] - r[m_b]["sqnr_db"]
            cells.append(f"{full:+.2f} ({np.quantile(d, 0.05):+.2f} .. "
                         f"{np.quantile(d, 0.95):+.2f}, > 0 in {100 * np.mean(d > 0):.0f}%)")
        print(f"| {model} | {m_a} - {m_b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
