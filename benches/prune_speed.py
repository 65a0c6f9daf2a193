#!/usr/bin/env python3
"""Pass time of pruning and mixed precision, two binaries interleaved in one run (issues 16/17).

For each model and each case, runs `--rounds` rounds of [base, new] (or only the binaries
given), each under the same load, and prints wall seconds, CPU seconds (user + sys of the
child) and the pass's own seconds from `--report`, then new/base ratios (medians). Also the
default int8 run's `quantize` pass on the same data, the reference of issue 16's bar
("prune pass <= 3x the default int8 calibration").

    python3 benches/prune_speed.py --base /tmp/bin-main --new target/release/onnx-compress \
        --zoo /work/zoo --models resnet18 --cases prune0.3,mixed,int8 --rounds 2
"""
import argparse, json, os, resource, statistics, subprocess, sys, tempfile, time

CASES = {
    "int8": ([], "quantize"),
    "prune0.3": (["--passes", "fuse,cleanup,prune", "--prune-flops", "0.3"], "prune"),
    "prune0.7": (["--passes", "fuse,cleanup,prune", "--prune-flops", "0.7"], "prune"),
    "mixed": (["--avg-bits", "6", "--calib-samples", "4", "--hessian-samples", "8"], "mixed-precision"),
}


def run(binary, model_dir, case, out_dir, timeout):
    args, pass_name = CASES[case]
    out = os.path.join(out_dir, f"{case}.onnx")
    report = os.path.join(out_dir, f"{case}.json")
    cmd = ["nice", "-n", "19", binary, os.path.join(model_dir, "model.onnx"), "-o", out,
           "--calib", os.path.join(model_dir, "calib.npy"), "--no-validate", "-q",
           "--report", report] + args
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    try:
        subprocess.run(cmd, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"wall": None, "cpu": None, "pass": None, "timeout": timeout}
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    r = json.load(open(report))
    p = [x for x in r["passes"] if x["name"] == pass_name]
    return {"wall": wall, "cpu": cpu, "pass": p[0]["seconds"] if p and "seconds" in p[0] else None,
            "phases": (p[0].get("details") or {}).get("timings") if p else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base")
    ap.add_argument("--new", required=True)
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--models", default="resnet18")
    ap.add_argument("--cases", default="prune0.3,mixed,int8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()
    bins = [("base", a.base)] if a.base else []
    bins.append(("new", a.new))
    print(f"load average at start: {os.getloadavg()}")
    for model in a.models.split(","):
        for case in a.cases.split(","):
            res = {k: [] for k, _ in bins}
            for rnd in range(a.rounds):
                for label, b in bins:
                    with tempfile.TemporaryDirectory() as d:
                        r = run(b, os.path.join(a.zoo, model), case, d, a.timeout)
                    res[label].append(r)
                    print(f"{model} {case} {label} round {rnd}: {r} load {os.getloadavg()[0]:.1f}",
                          flush=True)
            def med(label, key):
                v = [r[key] for r in res[label] if r[key] is not None]
                return statistics.median(v) if v else None
            line = f"SUMMARY {model} {case}"
            for label, _ in bins:
                line += f" | {label}: wall {med(label, 'wall')} cpu {med(label, 'cpu')} pass {med(label, 'pass')}"
            if a.base and med("base", "pass") and med("new", "pass"):
                line += (f" | base/new pass {med('base', 'pass') / med('new', 'pass'):.2f}x"
                         f" cpu {med('base', 'cpu') / med('new', 'cpu'):.2f}x")
            print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
