#!/usr/bin/env python3
"""Could any rule meet issue 14's bar (a method within 0.3 dB of the best fixed method on held-out
data) if it could see held-out data from the same photos? For every way to cut a model's
held-out photos into two halves, the fixed method (or ORT) with the best SQNR on one half is
measured on the other half against the best there.

Usage: python3 benches/choose_on_half.py --run NAME=RESULTS_JSON:ZOO_DIR [--run ...]

RESULTS_JSON: `benches/methods.py --out DIR` (DIR/results.json, with per-sample energies);
ZOO_DIR/MODEL/eval_groups.json names each eval crop's photo (make_models.py). Without it the
samples are dealt into six groups in turn (OCR lines and pages). Prints, per model, how often
the choice made on one half meets the bar on the other, its mean and worst shortfall, and how
often percentile and auto (chosen on calibration data only) meet it on the same halves.
"""
import argparse
import itertools
import json

import numpy as np

from methods import eval_groups

CANDIDATES = ["minmax", "percentile", "mse", "entropy", "ort"]


def halves_table(name, results, zoo):
    rows = []
    for model, r in sorted(results.items()):
        methods = [k for k in CANDIDATES if "sample_noise" in r.get(k, {})]
        if len(methods) < 2 or not np.isfinite(r["percentile"].get("sqnr_db", np.inf)) \
                or r["percentile"]["sqnr_db"] > 100:  # kept float: nothing to choose
            continue
        sig = np.array(r[methods[0]]["sample_signal"])
        noise = {k: np.array(r[k]["sample_noise"]) for k in methods}
        groups = eval_groups(zoo, model, len(sig), default=np.arange(len(sig)) % 6)
        photos = sorted(set(groups.tolist()))
        db = lambda k, m: 10 * np.log10(sig[m].sum() / noise[k][m].sum())  # noqa: E731
        if "sample_noise" in r.get("auto", {}):
            noise["auto"] = np.array(r["auto"]["sample_noise"])
        short, fixed_rule = [], {k: [] for k in ("percentile", "auto") if k in noise}
        for half in itertools.combinations(photos, len(photos) // 2):
            a = np.isin(groups, half)
            pick = max(methods, key=lambda k: db(k, a))
            best = max(db(k, ~a) for k in methods)
            short.append(db(pick, ~a) - best)
            for k, v in fixed_rule.items():  # what calibration-only choices give on that half
                v.append(db(k, ~a) - best)
        short = np.array(short)
        meets = lambda v: None if v is None else 100 * np.mean(np.array(v) >= -0.3)  # noqa: E731
        rows.append((model, len(photos), len(short), meets(short), short.mean(), short.min(),
                     meets(fixed_rule.get("percentile")), meets(fixed_rule.get("auto"))))
    print(f"\n{name}\n")
    print("| model | groups | cuts | chosen on one half: meets bar on the other | mean shortfall dB "
          "| worst dB | percentile meets bar | auto meets bar |")
    print("|---|---|---|---|---|---|---|---|")
    pct = lambda v: "-" if v is None else f"{v:.0f}%"  # noqa: E731
    for m, g, n, p, mean, worst, perc, auto in rows:
        print(f"| {m} | {g} | {n} | {pct(p)} | {mean:+.2f} | {worst:+.2f} | {pct(perc)} | "
              f"{pct(auto)} |")
    mean = lambda i: np.mean([r[i] for r in rows if r[i] is not None])  # noqa: E731
    print(f"\nmean over models: chosen on a half {mean(3):.0f}%, "
          f"percentile {mean(6):.0f}%, auto {mean(7):.0f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True)
    a = ap.parse_args()
    for spec in a.run:
        name, rest = spec.split("=", 1)
        path, zoo = rest.split(":", 1)
        with open(path) as f:
            halves_table(name, {r["model"]: r for r in json.load(f)}, zoo)


if __name__ == "__main__":
    main()
