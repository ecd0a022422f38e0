"""Training compute, counted one way for every trained model (translator, plain or adversarially trained classifier), so
that results can be compared at equal compute.

A *pass* is one forward + backward through the model being trained or attacked, for one example (forward-only
evaluations, e.g. C's clean prediction as a KL target, are not counted). A plain training step costs 1 pass per
example; an attack costs one pass per gradient step (PGD-k: k; FGSM: 1; APGD-CE with n iterations: n). So:
- PGD-k adversarial training (Madry): k + 1 per example (k to craft, 1 to train on the result);
- TRADES with k inner steps: k + 2 (its step trains on the clean and the attacked input);
- a translator step: 1 for T on the OOD input, + 1 when a term also translates the clean input (identity,
  clean_consistency, trades), + 1 for the discriminator when the GAN term is on, + k in the adaptive regime (the attack
  runs end to end through T and C). The oblivious regime's cache cost k per cached example once (`cache_passes`),
  shared by every trial that uses it and reported beside the run's own passes, never hidden in them.

Wall seconds are measured; device-seconds are wall seconds x the devices held (GPUs when a worker has any, else its
CPUs) summed over workers: the cloud-bill measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any


def attack_passes(specs: Sequence[Any]) -> float:
    """Mean passes per example of a mixed attack (each example draws one spec uniformly): gradient steps per spec."""
    if not specs:
        return 0.0
    return sum(1 if s.name == "fgsm" else int(s.steps) for s in specs) / len(specs)


CLEAN_TRANSLATING_TERMS = ("identity", "clean_consistency", "trades")  # objective terms that also compute T(x_clean)


def translator_step_passes(regime: str, specs: Sequence[Any], loss_terms: Sequence[str] = ()) -> float:
    """Passes per training example of one translator step: the attack (adaptive regime only), T on the OOD input,
    T on the clean input when a term needs it, and the discriminator's step when the GAN term is on; `loss_terms` are
    the objective's terms with a non-zero weight."""
    return ((attack_passes(specs) if regime == "adaptive" else 0.0) + 1.0
            + (1.0 if any(t in loss_terms for t in CLEAN_TRANSLATING_TERMS) else 0.0)
            + (1.0 if "gan" in loss_terms else 0.0))


def classifier_step_passes(adversarial: str, adv_steps: int) -> float:
    """Passes per training example of one classifier step: plain 1, PGD-AT adv_steps + 1, TRADES adv_steps + 2."""
    return {"pgd": adv_steps + 1.0, "trades": adv_steps + 2.0}.get(adversarial, 1.0)


@dataclass
class Compute:
    """Cumulative training compute of one run (it survives resumes: a resumed run starts from its checkpoint's)."""

    examples: int = 0  # training examples seen (all workers)
    passes: float = 0.0  # forward+backward passes spent on them, attack steps included
    wall_seconds: float = 0.0  # time in training epochs (proxy evaluation and checkpoints included)
    device_seconds: float = 0.0  # wall seconds x devices held, summed over workers

    def add(self, examples: int, passes_per_example: float) -> None:
        self.examples += int(examples)
        self.passes += examples * passes_per_example

    def add_time(self, seconds: float, devices: float) -> None:
        self.wall_seconds += seconds
        self.device_seconds += seconds * devices

    def merge(self, other: Compute) -> None:
        """Adds another run's figures (an interrupted run's epochs to its resumption's)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_metrics(self) -> dict[str, float]:
        """As reported metrics: `compute_examples`, `compute_passes`, `compute_wall_seconds`,
        `compute_device_seconds`."""
        return {f"compute_{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_metrics(cls, m: dict[str, Any] | None) -> Compute:
        m = m or {}
        return cls(**{f.name: type(f.default)(m.get(f"compute_{f.name}", f.default)) for f in fields(cls)})


def epochs_equivalent(passes: float, train_examples: int) -> float:
    """Compute expressed as plain-training epochs of a dataset: passes / training-split size."""
    return passes / max(1, train_examples)


def defence_compute(classifier_state: dict[str, Any], translator_state: dict[str, Any] | None,
                    classifier_train_examples: int | None = None) -> dict[str, Any]:
    """The whole training compute behind a defence, from its checkpoints: the classifier's (plain or adversarial
    training), plus the translator's own passes and its oblivious cache's when there is a translator. `passes` is the
    total that results tables compare; the parts stay beside it.

    A classifier saved before compute was recorded gets its passes derived from its config (epochs x training split x
    passes per example; exact, as classifiers train on whole epochs) when `classifier_train_examples` is given, marked
    `classifier_compute_derived`; other missing figures are None, never 0."""
    c = classifier_state.get("metrics") or {}
    out: dict[str, Any] = {"classifier_passes": c.get("compute_passes"),
                           "classifier_examples": c.get("compute_examples"),
                           "classifier_wall_seconds": c.get("compute_wall_seconds", c.get("train_seconds"))}
    cc = (classifier_state.get("config") or {}).get("classifier") or {}
    if out["classifier_passes"] is None and classifier_train_examples is not None and "epochs" in cc:
        out["classifier_examples"] = int(cc["epochs"]) * classifier_train_examples
        out["classifier_passes"] = out["classifier_examples"] * classifier_step_passes(
            cc.get("adversarial", "none"), int(cc.get("adv_steps", 0)))
        out["classifier_compute_derived"] = True
    total = out["classifier_passes"]
    if translator_state is not None and translator_state.get("metrics") is not None:
        m = translator_state["metrics"]
        out.update(translator_passes=m.get("compute_passes"), translator_examples=m.get("compute_examples"),
                   translator_wall_seconds=m.get("compute_wall_seconds"),
                   translator_device_seconds=m.get("compute_device_seconds"), cache_passes=m.get("cache_passes", 0.0))
        parts = (total, out["translator_passes"], out["cache_passes"])
        total = None if any(p is None for p in parts) else sum(parts)
    out["passes"] = total
    return out
