"""The ImageNet capacity plan of docs/cluster.md, computed from per-image costs measured on CPU by
`gpu_throughput.py --cpu` and scaled to A100 GPUs with the published assumptions stated below.

    python benchmarks/gpu_throughput.py --cpu --threads 1 --batch-sizes 4 --steps 2 --warmup 1 --no-scaling \
        --out cpu224.json
    python benchmarks/capacity_plan.py cpu224.json [--robust 0.5] [--price 32.77]

Unit costs (CPU-seconds per image on one thread, 224 px, ResNet-50 C, the imagenet preset's translator, PGD-5) come
from the JSON. Where it lacks the translator steps or the cache (a run cut short), they are counted in passes of C
instead, and the training rows say they are lower bounds (the translator's own cost left out). The scaling to GPUs
is an assumption, not a measurement: every operation is taken to speed up on an A100 as ResNet-50 training does in
NVIDIA's published figures (DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, DGX A100
80GB, pytorch-21.03 container): 2,470 img/s per GPU with mixed precision (used for oodray's bf16 training steps),
938 img/s in TF32 (used for the fp32 attacks: the oblivious cache and AutoAttack), and 6.72x on 8 GPUs with mixed
precision (0.84 efficiency; used for data-parallel Ray Train). Ray tasks (cache shards, AutoAttack shards) do not
communicate and are taken to scale linearly. Two nodes are taken to keep 0.9 of one node's per-GPU efficiency for
Ray Train (no published figure for this setup: an assumption). p4d.24xlarge (8x A100 40GB, taken to compute as the
80GB part) at the given $/h on-demand.
"""

from __future__ import annotations

import argparse
import json

N_TRAIN = 1_153_050  # ImageNet-1k train (1,281,167) less the preset's 10% validation split
N_EVAL = 5_000  # RobustBench's ImageNet protocol: the first 5,000 validation images
A100_AMP, A100_TF32, EFF_8, EFF_2NODES = 2470.0, 938.0, 6.72 / 8, 0.9
CLEAN_ACC = 0.80  # torchvision ResNet-50 IMAGENET1K_V2 top-1 is 80.9%: the share of images AutoAttack attacks at all
VARIANTS = 4  # oblivious-cache variants a default search builds (issue 14)
TRIALS, EPOCHS = 6, 10  # tune.num_samples default, imagenet preset train.epochs
# AutoAttack 'standard' (pyautoattack 0.2.0, fra31's settings): APGD-CE 100 iterations on every clean-correct image;
# images still robust also get APGD-T (9 targets x 100) and FAB-T (9 x 100, ~2 gradients each: counted 2 steps),
# then Square (5,000 queries of one forward).
AA_FIRST, AA_ROBUST_STEPS, AA_ROBUST_FORWARDS = 100, 900 + 1800, 5000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", help="output of gpu_throughput.py --cpu")
    p.add_argument("--robust", type=float, default=0.5, help="robust share of the defended model under the adaptive "
                                                              "attack (the cascade's cost follows it)")
    p.add_argument("--price", type=float, default=32.77, help="$/h of one p4d.24xlarge (8 GPUs)")
    a = p.parse_args()
    r = json.load(open(a.json))
    c = r["classifier"]
    fwd, atk, ft = c["forward_cpu_s_per_image"], c["attack_step_cpu_s_per_image"], c["train_step_cpu_s_per_image"]
    steps = r["attack_steps"]
    obl = next((t["cpu_s_per_image"] for t in r.get("train", []) if t["regime"] == "oblivious"), None)
    adp = next((t["cpu_s_per_image"] for t in r.get("train", []) if t["regime"] == "adaptive"), None)
    cache = next((t["cpu_s_per_image"] for t in r.get("cache", []) if not t["bf16"]), None)
    if cache is None:  # not measured: PGD-k on C is k attack steps and a forward
        cache = steps * atk + fwd
        print(f"oblivious cache not measured: taken as {steps} attack steps + 1 forward of C")
    # one attack step through C(T(.)), measured inside the adaptive step; C's own when the translator was not measured
    defended_atk = (adp - obl) / steps if obl is not None and adp is not None else atk
    bound = ""
    if obl is None or adp is None:  # not measured: C's own passes only, a lower bound (the translator's left out)
        obl = 2 * atk + 2 * fwd  # C forward+backward on T(x_ood) and T(x), C forward on the two targets
        adp = obl + steps * atk + fwd  # + PGD-k through C(T(.)) on every batch
        bound = " (lower bound: C's passes only)"
        print("translator steps not measured: lower bounds from C's passes (oblivious: 2 backward + 2 forward of C "
              f"per image; adaptive: + PGD-{steps})")
    amp, tf32 = 1.0 / (ft * A100_AMP), 1.0 / (ft * A100_TF32)  # CPU-s -> A100-s
    print(f"measured on CPU ({r['torch_threads']} thread, {r['size']} px), CPU-s per image: C forward {fwd:.3f}, "
          f"attack step {atk:.3f}, fine-tune step {ft:.3f}; oblivious train step {_s(obl)}, adaptive {_s(adp)} "
          f"(PGD-{steps}), attack step through C(T) {defended_atk:.3f}; oblivious cache {cache:.3f}")
    print(f"assumed A100 speed-up over one CPU thread: {1 / amp:.0f}x (bf16 training), {1 / tf32:.0f}x (fp32 attacks)")

    def aa(robust_share: float, step: float) -> float:  # CPU-s of AutoAttack on N_EVAL images
        per = AA_FIRST * step + robust_share * (AA_ROBUST_STEPS * step + AA_ROBUST_FORWARDS * fwd)
        return N_EVAL * CLEAN_ACC * per

    cache_h = N_TRAIN * cache * tf32 / 3600  # A100-hours of one cache variant
    rows = [  # (what, A100-hours of Ray Train work, A100-hours of Ray task work)
        ("oblivious cache, one variant (PGD-5 on C over the train split)", 0.0, cache_h),
        (f"oblivious cache, {VARIANTS} variants (a default search)", 0.0, VARIANTS * cache_h),
        (f"one trial, oblivious regime ({EPOCHS} epochs){bound}", EPOCHS * N_TRAIN * obl * amp / 3600, 0.0),
        (f"one trial, adaptive regime ({EPOCHS} epochs){bound}", EPOCHS * N_TRAIN * adp * amp / 3600, 0.0),
        (f"a search: {TRIALS} oblivious trials + {VARIANTS} cache variants, no early stopping{bound}",
         TRIALS * EPOCHS * N_TRAIN * obl * amp / 3600, VARIANTS * cache_h),
        (f"final AutoAttack on {N_EVAL:,} val images: oblivious + transfer (robust share 0) + adaptive "
         f"(robust share {a.robust:g})", 0.0, (2 * aa(0.0, atk) + aa(a.robust, defended_atk)) * tf32 / 3600),
    ]
    print("\n| workload | A100-hours | 1 node (8 GPUs): hours | $ | 2 nodes (16 GPUs): hours | $ |")
    print("|---|---|---|---|---|---|")
    for what, train_h, task_h in rows:
        one = train_h / (8 * EFF_8) + task_h / 8
        two = train_h / (16 * EFF_8 * EFF_2NODES) + task_h / 16
        print(f"| {what} | {train_h + task_h:,.1f} | {one:,.1f} | {one * a.price:,.0f} | {two:,.1f} | "
              f"{two * 2 * a.price:,.0f} |")


def _s(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
