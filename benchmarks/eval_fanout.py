"""The evaluation fan-out, measured: one AutoAttack job as 1 Ray task and as K shards, plus Ray's per-task overhead.

    .venv/bin/python benchmarks/eval_fanout.py                       # digits, identity T, 64 examples, Linf 0.12
    .venv/bin/python benchmarks/eval_fanout.py --n-examples 128 --eps 0.1 --shards 2 --repeats 3

Both runs evaluate the same thing (`run_evaluation`, oblivious AutoAttack standard on the digits CNN through the
identity translator, no shifts) into fresh directories, on a local Ray with K CPUs, after one warm-up task per CPU so
that worker start-up is not timed; the two modes alternate (1 K, K 1, ...) for --repeats rounds (default 3) and each
figure is the median with its min-max. Prints each wall time with the share of a CPU each task actually got, the
speed-up (target >= 0.8 x K, paired per round), a load-independent estimate from CPU seconds (other work on the machine
skews the wall-clock ratio, not the work each task did), whether the per-example flags agree, the mean round trip of
an empty task (submit + get, one at a time), and the load average before and after.
The fixed classifier is trained and cached first if missing (not timed); OODRAY_CACHE chooses the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from spread import Spread, load_line, positive_int, run_main, settle  # noqa: E402

from oodray.classifier import get_classifier  # noqa: E402
from oodray.config import resolve_config  # noqa: E402
from oodray.evaluate import block_size, run_evaluation  # noqa: E402


def _warm() -> int:
    import oodray.evaluate  # noqa: F401 - the import a real task pays once per worker

    time.sleep(0.5)  # hold the CPU so that the next warm-up lands on another worker
    return os.getpid()


def _empty() -> None:
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-examples", type=int, default=64)
    p.add_argument("--eps", type=float, default=0.12)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--overhead-tasks", type=int, default=100)
    p.add_argument("--repeats", type=positive_int, default=3, help="runs of each mode, in alternating order")
    args = p.parse_args()
    before = settle()
    k = args.shards
    cfg = resolve_config("digits", overrides=[
        "translator.arch=identity", f"eval.n_examples={args.n_examples}", "eval.threat_models=[oblivious]",
        f"eval.eps=[{args.eps}]", "eval.shifts=false", f"eval.batch_size={-(-args.n_examples // k)}"])
    get_classifier(cfg)
    ray.init(num_cpus=k, include_dashboard=False, configure_logging=False, log_to_driver=False)
    pids = ray.get([ray.remote(num_cpus=1)(_warm).remote() for _ in range(k)])
    empty = ray.remote(num_cpus=1)(_empty)
    ray.get([empty.remote() for _ in range(10)])
    t0 = time.perf_counter()
    for _ in range(args.overhead_tasks):
        ray.get(empty.remote())
    overhead = (time.perf_counter() - t0) / args.overhead_tasks

    times: dict[int, list[float]] = {1: [], k: []}
    cpu: dict[int, list[float]] = {1: [], k: []}  # the slowest task's CPU seconds: its work, whatever the load
    flags, robust = {}, {}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            for shards in (1, k) if r % 2 == 0 else (k, 1):  # alternate so that both see the same background load
                out = Path(d) / f"r{r}-k{shards}"
                t0 = time.perf_counter()
                run_evaluation(cfg.replace(**{"eval.shards": shards}), checkpoint=None, out_dir=out, label="bench")
                times[shards].append(time.perf_counter() - t0)
                result = json.loads((out / f"oblivious-Linf-{args.eps:g}.json").read_text())
                flags.setdefault(shards, result["per_example"]["robust"])
                robust[shards] = result["robust_accuracy"]
                loads.append(os.getloadavg()[0])
                cpu[shards].append(max(t["cpu_seconds"] for t in result["shards"]))
                tasks = ", ".join(f"{t['seconds']:.1f} s ({t['cpu_seconds'] / t['seconds']:.0%} of a CPU)"
                                  for t in result["shards"])
                print(f"{shards} task(s): {times[shards][-1]:6.1f} s wall, robust accuracy {robust[shards]:.4f}; "
                      f"task(s): {tasks}", flush=True)
    ray.shutdown()
    block = block_size(args.n_examples, cfg.eval.batch_size)
    t1, tk = Spread(times[1]), Spread(times[k])
    print(f"\ndigits CNN, identity translator, AutoAttack standard Linf {args.eps:g}, {args.n_examples} examples in "
          f"blocks of {block}, {len(set(pids))} warm workers on {k} CPUs (1-min load average up to {max(loads):.1f}); "
          f"median (min-max) of {args.repeats} alternating rounds")
    print(f"1 task {t1.fmt('{:.1f}', ' s')}, {k} shards {tk.fmt('{:.1f}', ' s')}")
    speed = t1.ratio(tk)
    print(f"speed-up {k} shards vs 1 task: {speed.fmt('{:.2f}', 'x')} = "
          f"{Spread(v / k for v in speed.values).fmt()} x K (target >= 0.80 x K)")
    c = Spread(cpu[1]).ratio(Spread(cpu[k]))
    print(f"load-independent estimate (CPU seconds of the single task / of the slowest shard): "
          f"{c.fmt('{:.2f}', 'x')} = {Spread(v / k for v in c.values).fmt()} x K")
    print(f"per-example flags identical: {flags[1] == flags[k]}")
    print(f"Ray empty-task round trip: {1000 * overhead:.2f} ms (mean of {args.overhead_tasks})")
    print(load_line(before))

if __name__ == "__main__":
    run_main(main)
