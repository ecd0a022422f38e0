"""Ray Train's cost, measured side by side in one run: the same translator training step in plain PyTorch vs under a
1-worker TorchTrainer (throughput ratio), data-parallel scaling 1 -> 2 workers, and where the fixed cost of a fit goes.

    python benchmarks/train_overhead.py                      # digits U-Net, batch 64/worker, 3 epochs, 5 repeats
    python benchmarks/train_overhead.py --dataset fashion-mnist --set train.max_batches=60 --set train.batch_size=128
    python benchmarks/train_overhead.py --profile            # + the per-step split of 1 and 2 workers

The three sides (plain, 1 worker, 2 workers) run interleaved, `--repeats` times (A B C, C B A, ...), and each figure is
the median with its min-max over the repeats; the load average is printed before and after. Throughput counts only
the training batches of the epochs after the first (`train_seconds`, `train_examples` reported by the loop), so the
proxy evaluation and checkpoints are excluded on both sides. A fit's fixed cost is its wall time minus the time in its
epochs, split into Ray's start (fit() to the worker loop's first line), the worker's own set-up (`setup_seconds`:
dataset, classifier, models, proxy subset), checkpoint writes, time between epochs (reports, checkpoint upload) and
Ray's shutdown (the last report to fit()'s return).

`--profile` times, inside 1- and 2-worker TorchTrainers, each training step's parts: waiting for data, forward and
backward without gradient synchronisation (`DDP.no_sync`), the wait at a barrier for the other rank to finish it,
and the same step with synchronisation, the ranks started together (its excess over the first is DDP's all-reduce
inside the step, skew that arises within the step included); a bare all-reduce of a tensor the gradient's size after
a barrier (the transfer alone); plus the proxy evaluation per epoch.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch
from spread import (  # puts the repository on sys.path for what follows
    Spread,
    fit_split,
    interleaved,
    load_line,
    positive_int,
    run_main,
    settle,
)
from torch.utils.data import DataLoader

from oodray.cache import ObliviousCache, ensure_oblivious_cache
from oodray.classifier import get_classifier
from oodray.config import resolve_config
from oodray.data import eval_subset, load_dataset
from oodray.losses import TranslatorObjective
from oodray.models.translator import build_translator
from oodray.runtime import fast_layout, init_ray, use_channels_last
from oodray.train import PairedImages, fit_translator, prepare_run, train_step


def plain(cfg) -> float:
    """Images per second of the plain PyTorch loop (epochs after the first), on as many threads as one Train worker
    gets, so both sides compute with the same cores."""
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    splits = load_dataset(cfg.data)
    classifier, cpath = get_classifier(cfg, splits)
    torch.manual_seed(cfg.train.seed)
    t = build_translator(cfg.translator, splits.info.channels, splits.info.image_size)
    # the memory layout the Train worker uses (train.channels_last), so both sides run the same kernels
    layout = use_channels_last(cfg.train.channels_last, "cpu", splits.info.image_size)
    classifier, t = fast_layout(classifier, layout), fast_layout(t, layout)
    opt = torch.optim.Adam(t.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999))
    objective = TranslatorObjective(cfg.loss, classifier)
    loader = DataLoader(PairedImages(splits.train, ensure_oblivious_cache(cfg, cpath)), batch_size=cfg.train.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(cfg.train.epochs):
        t0, n = time.time(), 0
        for b, (x, xc, y) in enumerate(loader):
            if cfg.train.max_batches is not None and b >= cfg.train.max_batches:
                break
            train_step(cfg, t, classifier, None, objective, (opt, None), None, (x, xc, y), g, False)
            n += len(y)
        rates.append(n / (time.time() - t0))
    return sum(rates[1:]) / max(1, len(rates) - 1)


def under_ray(cfg, storage: str, name: str) -> dict[str, float]:
    loop = prepare_run(cfg)
    t0 = time.time()
    result = fit_translator(cfg, loop, storage=storage, name=f"{name}-{time.time_ns()}")
    t1 = time.time()
    df = result.metrics_dataframe
    later = df[df["epoch"] > 1]
    split = fit_split(result, t0, t1)
    return {"rate": float((later["train_examples"] / later["train_seconds"]).mean()),
            "fixed": split["wall"] - split["train"] - split["proxy"], **split}


def profile_loop(loop_config: dict) -> None:
    """A Train worker loop that times the parts of oodray's training step (same data, models and `train_step`)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    from oodray.config import ExperimentConfig
    from oodray.metrics import proxy_metrics_over_ranks
    from oodray.models.classifier import classifier_from_state
    from oodray.models.defended import DefendedModel
    from oodray.train import _resolve

    cfg = ExperimentConfig.from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    splits = load_dataset(cfg.data)
    layout = use_channels_last(cfg.train.channels_last, ray.train.torch.get_device(), splits.info.image_size)
    classifier = fast_layout(classifier_from_state(_resolve(loop_config["classifier"])), layout)
    torch.manual_seed(0)
    t = ray.train.torch.prepare_model(fast_layout(
        build_translator(cfg.translator, splits.info.channels, splits.info.image_size), layout))
    raw = t.module if hasattr(t, "module") else t
    opt = torch.optim.Adam(t.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999))
    objective = TranslatorObjective(cfg.loss, classifier)
    data = PairedImages(splits.train, ObliviousCache(loop_config["oblivious"]))
    loader = DataLoader(data, batch_size=cfg.train.batch_size,
                        sampler=DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0))
    g = torch.Generator().manual_seed(0)
    parts = {"data": 0.0, "step_no_sync": 0.0, "wait_other_rank": 0.0, "step_sync": 0.0}
    n = 0
    fetched = time.perf_counter()
    for b, batch in enumerate(loader):
        parts["data"] += time.perf_counter() - fetched
        if b >= (cfg.train.max_batches or 40):
            break
        t0 = time.perf_counter()
        if world > 1:  # the same step without the all-reduce (gradients stay local): compute alone
            with t.no_sync():
                train_step(cfg, t, classifier, None, objective, (opt, None), None, batch, g, False)
        else:
            train_step(cfg, t, classifier, None, objective, (opt, None), None, batch, g, False)
        t1 = time.perf_counter()
        if world > 1:  # the ranks start the synchronised step together: their skew is timed apart from the step
            dist.barrier()
        t2 = time.perf_counter()
        train_step(cfg, t, classifier, None, objective, (opt, None), None, batch, g, False)
        parts["step_no_sync"] += t1 - t0
        parts["wait_other_rank"] += t2 - t1
        parts["step_sync"] += time.perf_counter() - t2
        n += 1
        fetched = time.perf_counter()
    out = {k: 1000 * v / max(1, n) for k, v in parts.items()}
    grad = torch.zeros(sum(q.numel() for q in raw.parameters()))  # the gradient's size, all-reduced on its own
    bare = []
    for i in range(60 if world > 1 else 0):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grad)
        if i >= 10:  # the first ones warm gloo up
            bare.append(time.perf_counter() - t0)
    out["bare_allreduce"] = 1000 * statistics.median(bare) if bare else 0.0
    out["gradient_mb"], out["parameters"] = grad.numel() * 4 / 1e6, grad.numel()
    x_val, y_val = eval_subset(splits.val, min(cfg.train.proxy_examples, len(splits.val)), cfg.data.seed)
    t0 = time.perf_counter()  # the proxy as the training loop runs it: split over the ranks, counts all-reduced
    proxy_metrics_over_ranks(cfg, DefendedModel(classifier, raw.eval(), None), x_val, y_val, rank, world,
                             torch.device("cpu"))
    out["proxy_eval_per_epoch_s"] = time.perf_counter() - t0
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:  # Train V2 keeps the metrics of reports that carry a checkpoint
            ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(out)


def profile(cfg, storage: str) -> dict[int, dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    loop = prepare_run(cfg)
    out = {}
    for w in (1, 2):
        r = TorchTrainer(profile_loop, train_loop_config=loop, scaling_config=ray.train.ScalingConfig(
            num_workers=w, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
            run_config=ray.train.RunConfig(name=f"profile-{w}-{time.time_ns()}", storage_path=storage)).fit()
        out[w] = r.metrics
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--profile", action="store_true", help="also time the parts of a training step, 1 and 2 workers")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    if args.epochs < 2:  # throughput is timed over the epochs after the first
        p.error(f"--epochs must be at least 2 (throughput is timed over the epochs after the first), got {args.epochs}")
    before = settle()
    init_ray()
    base = resolve_config(args.dataset, overrides=[f"train.epochs={args.epochs}", "train.regime=oblivious",
                                                   "train.cpus_per_worker=1", *args.overrides])
    get_classifier(base)
    ensure_oblivious_cache(base, get_classifier(base)[1])  # built once, outside the timing
    storage = tempfile.mkdtemp(prefix="oodray-bench-")
    runs = interleaved({
        "plain": lambda: plain(base),
        "1 worker": lambda: under_ray(base.replace(**{"train.workers": 1}), storage, "w1"),
        "2 workers": lambda: under_ray(base.replace(**{"train.workers": 2}), storage, "w2"),
    }, args.repeats)
    rate = {k: Spread(v if k == "plain" else [r["rate"] for r in v]) for k, v in runs.items()}
    b = base.train
    print(f"\n{args.dataset}, {base.translator.arch} translator, batch {b.batch_size}/worker, {b.epochs} epochs"
          f"{f' of at most {b.max_batches} batches' if b.max_batches else ''}, {b.cpus_per_worker:g} CPU (torch "
          f"threads) per worker and for plain PyTorch; median (min-max) of {args.repeats} interleaved repeats")
    print(f"plain PyTorch            {rate['plain'].fmt('{:.0f}', ' img/s')}")
    print(f"TorchTrainer, 1 worker   {rate['1 worker'].fmt('{:.0f}', ' img/s')}   ratio to plain "
          f"{rate['1 worker'].ratio(rate['plain']).fmt()}")
    print(f"TorchTrainer, 2 workers  {rate['2 workers'].fmt('{:.0f}', ' img/s')}   scaling 1->2 "
          f"{rate['2 workers'].ratio(rate['1 worker']).fmt('{:.2f}', 'x')}")
    for side in ("1 worker", "2 workers"):
        parts = {k: Spread(r[k] for r in runs[side]).fmt("{:.1f}", " s")
                 for k in ("fixed", "start", "setup", "checkpoints", "between", "end")}
        print(f"fixed cost of a fit, {side}: {parts['fixed']}\n"
              f"    = Ray start (controller, worker group, process group) {parts['start']}\n"
              f"    + worker set-up (dataset, classifier, models, proxy subset) {parts['setup']}\n"
              f"    + checkpoint writes {parts['checkpoints']}\n"
              f"    + between epochs (reports, checkpoint upload) {parts['between']}\n"
              f"    + after the last report (shutdown) {parts['end']}")
    if args.profile:
        prof = profile(base, storage)
        print("per-step split (ms per batch, rank 0): data wait / step without all-reduce / wait for the other rank "
              "/ step with all-reduce (started together)")
        for w, m in prof.items():
            print(f"  {w} worker(s): {m['data']:.1f} / {m['step_no_sync']:.1f} / {m['wait_other_rank']:.1f} / "
                  f"{m['step_sync']:.1f}   (synchronisation ~{m['step_sync'] - m['step_no_sync']:.1f} ms in the step"
                  + (f"; a bare all-reduce of the {m['gradient_mb']:.2f} MB gradient "
                     f"({m['parameters']:,.0f} parameters) {m['bare_allreduce']:.2f} ms, median of 50" if w > 1 else "")
                  + f"); proxy evaluation {m['proxy_eval_per_epoch_s']:.2f} s per epoch")
    print(load_line(before))
    shutil.rmtree(storage, ignore_errors=True)  # the fits' checkpoints: nothing here is read again


if __name__ == "__main__":
    run_main(main)
