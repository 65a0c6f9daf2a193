#!/usr/bin/env python3
"""Pass time of pruning and mixed precision, two binaries interleaved in one run (issues 16/17).

For each model and each case, runs `--rounds` rounds of [base, new] (or only the binaries
given), each under the same load, and prints wall seconds, CPU seconds (user + sys of the
child), the pass's own seconds from `--report` (and its CPU seconds where the report has them:
the prune pass's `details.timings[].cpu_seconds`), then new/base ratios (medians). Also the
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
    details = (p[0].get("details") or {}) if p and isinstance(p[0].get("details"), dict) else {}
    phases = details.get("timings")
    # The prune pass reports CPU seconds per phase (`cpu_seconds`, since branch prunefast):
    # the pass's own CPU time, without loading, saving and the other passes.
    pass_cpu = (sum(x.get("cpu_seconds", 0.0) for x in phases)
                if phases and all("cpu_seconds" in x for x in phases) else None)
    return {"wall": wall, "cpu": cpu, "pass": p[0]["seconds"] if p and "seconds" in p[0] else None,
            "pass_cpu": pass_cpu, "phases": phases}


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
    medians = {}
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
                line += (f" | {label}: wall {med(label, 'wall')} cpu {med(label, 'cpu')}"
                         f" pass {med(label, 'pass')} pass cpu {med(label, 'pass_cpu')}")
            if a.base and med("base", "pass") and med("new", "pass"):
                line += (f" | base/new pass {med('base', 'pass') / med('new', 'pass'):.2f}x"
                         f" cpu {med('base', 'cpu') / med('new', 'cpu'):.2f}x")
            print(line, flush=True)
            for label, _ in bins:
                medians[(model, case, label)] = {k: med(label, k) for k in ("wall", "cpu", "pass", "pass_cpu")}
    # Issue 16's bar: the prune pass against the default int8 run's calibration (`quantize`
    # pass), wall and CPU (the int8 side's CPU is the whole process's: calibration is nearly all
    # of it).
    for (model, case, label), m in medians.items():
        q = medians.get((model, "int8", label))
        if not case.startswith("prune") or not q or not q["pass"] or not m["pass"]:
            continue
        cpu = (f", CPU {m['pass_cpu'] / q['cpu']:.2f}x (pass CPU {m['pass_cpu']:.1f} s / int8 process CPU {q['cpu']:.1f} s)"
               if m["pass_cpu"] and q["cpu"] else "")
        print(f"RATIO {model} {case} {label}: prune pass / int8 calibration: wall {m['pass'] / q['pass']:.2f}x"
              f" ({m['pass']:.1f} s / {q['pass']:.1f} s){cpu}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
