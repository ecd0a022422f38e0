"""GPU throughput of oodray's ImageNet recipe, ready for a lent accelerator: images/s per GPU of one translator
training step in the oblivious and the adaptive regime (224 px, ResNet-50 C with random weights, the imagenet
preset's translator), oblivious-cache generation (PGD on C alone, fp32 and bf16 autocast), peak GPU memory per batch
size (to set default batch sizes), and 1 -> N GPU scaling through Ray Train.

    python benchmarks/gpu_throughput.py                        # on a GPU machine: 224 px, batch sizes 32..256
    python benchmarks/gpu_throughput.py --gpus 8 --out gpu.json
    python benchmarks/gpu_throughput.py --smoke                # CPU, tiny sizes: checks the script runs (CI)
    python benchmarks/gpu_throughput.py --cpu --batch-sizes 8 --steps 2 --no-scaling   # CPU unit costs at 224 px

Every figure comes from one run on synthetic tensors (uniform [0,1] images, random labels), so no dataset is read:
this measures compute, not input. Throughput is timed after `--warmup` steps with the device synchronised. Ratios
are printed side by side (adaptive / oblivious, bf16 / fp32, N GPUs / 1 GPU). On CPU (`--smoke`) memory columns are
empty: the figures then only show that every code path runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import torch

from oodray.attacks import attack_specs, mixed_attack
from oodray.config import resolve_config
from oodray.data import DatasetInfo
from oodray.losses import TranslatorObjective
from oodray.models.classifier import build_classifier, freeze
from oodray.models.translator import build_translator
from oodray.runtime import amp_autocast, fast_layout, use_channels_last
from oodray.train import train_step


def recipe(size: int, smoke: bool) -> tuple[Any, DatasetInfo]:
    """The imagenet preset at `size` px (1000 classes), with a tiny translator under --smoke."""
    over = [f"data.image_size={size}", "classifier.weights=null", "classifier.epochs=1"]
    if smoke:
        over += ["translator.blocks=1", "translator.width=8", "attack.steps=1"]
    cfg = resolve_config("imagenet", overrides=over)
    info = DatasetInfo("imagenet", 1000, 3, (size, size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return cfg, info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(cfg: Any, info: DatasetInfo, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    classifier = freeze(build_classifier("resnet50", info)).to(device)
    translator = build_translator(cfg.translator, 3, info.image_size).to(device)
    layout = use_channels_last(cfg.train.channels_last, device, info.image_size)
    classifier, translator = fast_layout(classifier, layout), fast_layout(translator, layout)
    return classifier, translator


def step_rate(cfg: Any, info: DatasetInfo, regime: str, batch: int, steps: int, warmup: int,
              device: torch.device) -> dict[str, Any]:
    """Images/s and peak memory of oodray's `train_step` in one regime at one batch size."""
    cfg = cfg.replace(**{"train.regime": regime, "train.batch_size": batch})
    classifier, translator = models(cfg, info, device)
    opt = torch.optim.Adam(translator.parameters(), lr=1e-4)
    objective = TranslatorObjective(cfg.loss, classifier, None)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, *info.image_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    x_cached = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)  # stands in for the oblivious cache's images
    use_amp = cfg.train.amp and device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
            train_step(cfg, translator, classifier, None, objective, (opt, None), None, (x, x_cached, y), g, use_amp)
        sync(device)
    except torch.OutOfMemoryError:
        return {"regime": regime, "batch": batch, "images_per_s": None, "peak_gib": None, "oom": True}
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"regime": regime, "batch": batch, "images_per_s": batch * steps / dt, "peak_gib": peak, "oom": False,
            "cpu_s_per_image": (time.process_time() - c0) / (batch * steps)}


def classifier_rates(info: DatasetInfo, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Images/s of C alone (ResNet-50, fp32): forward; forward+backward to the input (one attack step: PGD, APGD,
    AutoAttack's gradient stages); forward+backward to the weights (fine-tuning C). The capacity plan's unit costs."""
    torch.manual_seed(0)
    model = build_classifier("resnet50", info).to(device).eval()
    x = torch.rand(batch, 3, *info.image_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def input_grad() -> None:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(xr), y), xr)

    def weight_grad() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    out: dict[str, Any] = {"batch": batch}
    for name, fn in (("forward", forward), ("attack_step", input_grad), ("train_step", weight_grad)):
        for p in model.parameters():
            p.requires_grad_(name == "train_step")
        fn()  # warm-up
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        sync(device)
        out[f"{name}_images_per_s"] = batch * steps / (time.perf_counter() - t0)
        out[f"{name}_cpu_s_per_image"] = (time.process_time() - c0) / (batch * steps)
    return out


def cache_rate(cfg: Any, info: DatasetInfo, batch: int, steps: int, bf16: bool,
               device: torch.device) -> dict[str, Any]:
    """Images/s of oblivious-cache generation: the training attack mixture against C alone, on device."""
    classifier, _ = models(cfg, info, device)
    x = torch.rand(batch, 3, *info.image_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    g = torch.Generator().manual_seed(0)  # a CPU generator, as the training loop passes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with amp_autocast(device, bf16):
            mixed_attack(classifier, x, y, attack_specs(cfg), generator=g)  # warm-up
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                mixed_attack(classifier, x, y, attack_specs(cfg), generator=g)
            sync(device)
            cpu_s = (time.process_time() - c0) / (batch * steps)
    except torch.OutOfMemoryError:
        return {"batch": batch, "bf16": bf16, "images_per_s": None, "peak_gib": None, "oom": True}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"batch": batch, "bf16": bf16 and device.type == "cuda", "attack_steps": cfg.attack.steps,
            "images_per_s": batch * steps / (time.perf_counter() - t0), "peak_gib": peak, "oom": False,
            "cpu_s_per_image": cpu_s}


def scaling_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: DDP translator, `steps` timed oblivious steps; reports this worker's images/s."""
    import ray.train
    import ray.train.torch

    cfg, info = recipe(config["size"], config["smoke"])
    cfg = cfg.replace(**{"train.regime": config["regime"]})
    device = ray.train.torch.get_device()
    torch.set_num_threads(1)
    classifier, translator = models(cfg, info, device)
    translator = ray.train.torch.prepare_model(translator)
    opt = torch.optim.Adam(translator.parameters(), lr=1e-4)
    objective = TranslatorObjective(cfg.loss, classifier, None)
    b = config["batch"]
    x = torch.rand(b, 3, *info.image_size, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    g = torch.Generator().manual_seed(ray.train.get_context().get_world_rank())
    use_amp = cfg.train.amp and device.type == "cuda"
    for i in range(config["warmup"] + config["steps"]):
        if i == config["warmup"]:
            sync(device)
            t0 = time.perf_counter()
        train_step(cfg, translator, classifier, None, objective, (opt, None), None, (x, x, y), g, use_amp)
    sync(device)
    metrics = {"images_per_s": b * config["steps"] / (time.perf_counter() - t0)}
    if ray.train.get_context().get_world_rank() == 0:  # Train V2 keeps metrics only when reported with a checkpoint
        with tempfile.TemporaryDirectory() as d:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def scaling(args: argparse.Namespace, counts: list[int], use_gpu: bool) -> list[dict[str, Any]]:
    """Total images/s of Ray Train data-parallel training with k workers (one GPU each, or CPU fractions)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from oodray.runtime import init_ray

    init_ray()
    out = []
    for k in counts:
        res = {"GPU": 1} if use_gpu else {"CPU": 0.5}
        trainer = TorchTrainer(
            scaling_loop, train_loop_config={"size": args.size, "smoke": args.smoke, "regime": "oblivious",
                                             "batch": args.scaling_batch, "steps": args.steps,
                                             "warmup": args.warmup},
            scaling_config=ray.train.ScalingConfig(num_workers=k, use_gpu=use_gpu, resources_per_worker=res),
            run_config=ray.train.RunConfig(name=f"gpu-scaling-{k}", storage_path=tempfile.mkdtemp()))
        m = trainer.fit().metrics or {}  # rank 0's rate; every rank runs the same batches
        rate = m.get("images_per_s")
        out.append({"workers": k, "images_per_s_total": rate * k if rate else None})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the script's own test")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-sizes", default="32,64,128,256")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gpus", type=int, default=None, help="scale 1 -> this many GPUs (default: all visible)")
    p.add_argument("--scaling-batch", type=int, default=64, help="per-GPU batch of the scaling runs")
    p.add_argument("--out", help="write every figure as JSON here")
    p.add_argument("--cpu", action="store_true", help="run on CPU at the given sizes (the capacity plan's CPU unit "
                                                      "costs)")
    p.add_argument("--no-scaling", action="store_true", help="skip the Ray Train scaling runs")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.smoke:
        args.size, args.batch_sizes, args.steps, args.warmup, args.scaling_batch = 32, "2,4", 1, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not (args.smoke or args.cpu) else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, info = recipe(args.size, args.smoke)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                              "torch_threads": torch.get_num_threads(),
                              "size": args.size, "attack_steps": cfg.attack.steps, "train": [], "cache": []}
    print(f"device {report['device']}, {args.size} px, ResNet-50 C (random weights), translator "
          f"{cfg.translator.arch} (blocks {cfg.translator.blocks}, width {cfg.translator.width}), "
          f"PGD-{cfg.attack.steps}")
    c = classifier_rates(info, batches[0], args.steps, device)
    report["classifier"] = c
    print(f"C alone at batch {c['batch']}: forward {_f(c['forward_images_per_s'])} img/s, forward+backward to the "
          f"input (one attack step) {_f(c['attack_step_images_per_s'])} img/s, to the weights (fine-tuning) "
          f"{_f(c['train_step_images_per_s'])} img/s; attack step / forward "
          f"{_f(c['forward_images_per_s'] / c['attack_step_images_per_s'], 2)}x the time")
    if device.type == "cpu":  # CPU seconds per image hold under contention better than wall time does
        print("CPU-s per image: " + ", ".join(f"{k} {c[f'{k}_cpu_s_per_image']:.3f}"
                                              for k in ("forward", "attack_step", "train_step")))
    print()
    print(f"{'batch':>6} {'oblivious img/s':>16} {'adaptive img/s':>15} {'adapt/obl':>9} {'peak GiB obl':>12} "
          f"{'peak GiB adapt':>14}")
    for b in batches:
        o = step_rate(cfg, info, "oblivious", b, args.steps, args.warmup, device)
        a = step_rate(cfg, info, "adaptive", b, args.steps, args.warmup, device)
        report["train"] += [o, a]
        ratio = a["images_per_s"] / o["images_per_s"] if o["images_per_s"] and a["images_per_s"] else None
        print(f"{b:>6} {_f(o['images_per_s']):>16} {_f(a['images_per_s']):>15} {_f(ratio, 3):>9} "
              f"{_f(o['peak_gib']):>12} {_f(a['peak_gib']):>14}")
    print(f"\noblivious-cache generation (PGD-{cfg.attack.steps} on C alone)")
    print(f"{'batch':>6} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>9} {'peak GiB fp32':>13}")
    for b in batches:
        f32 = cache_rate(cfg, info, b, args.steps, False, device)
        b16 = cache_rate(cfg, info, b, args.steps, True, device)
        report["cache"] += [f32, b16]
        ratio = b16["images_per_s"] / f32["images_per_s"] if f32["images_per_s"] and b16["images_per_s"] else None
        print(f"{b:>6} {_f(f32['images_per_s']):>11} {_f(b16['images_per_s']):>11} {_f(ratio, 3):>9} "
              f"{_f(f32['peak_gib']):>13}")
    if args.no_scaling:
        report["scaling"] = []
    else:
        n = args.gpus or (torch.cuda.device_count() if device.type == "cuda" else 2)
        counts = sorted({1, *[k for k in (2, 4, 8) if k <= n], n})
        report["scaling"] = scaling(args, counts, device.type == "cuda")
    base = report["scaling"][0]["images_per_s_total"] if report["scaling"] else None
    if report["scaling"]:
        print("\nRay Train data-parallel scaling (oblivious regime, batch "
              f"{args.scaling_batch} per worker, {'1 GPU' if device.type == 'cuda' else '0.5 CPU'} per worker)")
    for s in report["scaling"]:
        r = s["images_per_s_total"]
        eff = r / (base * s["workers"]) if r and base else None
        print(f"{s['workers']:>3} workers: {_f(r):>10} img/s total, x{_f(r / base if r and base else None, 2)} "
              f"vs 1 (efficiency {_f(eff, 2)})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
