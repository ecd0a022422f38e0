"""Tests for oodray.attacks on a tiny CNN trained for a few steps on synthetic 8x8 class patterns (CPU, seeded)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodray.attacks import (
    ATTACKS,
    NORMS,
    AttackSpec,
    apgd_ce,
    assign_specs,
    autoattack,
    autoattack_settings,
    fgsm,
    mixed_attack,
    pgd,
    run_attack,
    validate_eps,
)

N_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with two intra-op threads on a busy 2-core machine torch spin-waits (seen: 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prototypes() -> torch.Tensor:
    return torch.rand(N_CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c is prototype c plus pixel noise: learnable in a few steps, breakable at Linf eps 0.3."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(N_CLASSES, (n,), generator=g)
    x = (_prototypes()[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, N_CLASSES),
    )


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    net = _cnn()
    params = list(net.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    for step in range(80):  # SGD with momentum by hand: building a torch.optim optimizer first costs ~3 s here
        x, y = _data(64, seed=1000 + step)
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        with torch.no_grad():
            for p, g, v in zip(params, grads, velocity):
                p.sub_(0.05 * v.mul_(0.9).add_(g))
    return net.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return _data(64, seed=1)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _assert_in_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert size.max().item() <= eps + 1e-5, f"{norm} perturbation {size.max().item()} > eps {eps}"
    assert size.max().item() > 0.5 * eps, "the attack did not move the images"


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("eps", "norm"), [(0.3, "Linf"), (1, "Linf"), (2, "L2"), (100.0, "L2"), (1e-3, "L2")])
def test_validate_eps_accepts_valid_radii(eps: float, norm: str) -> None:
    assert validate_eps(eps, norm) == float(eps)
    assert isinstance(validate_eps(eps, norm), float)


@pytest.mark.parametrize(
    ("eps", "norm"),
    [(0, "Linf"), (-1, "Linf"), (1.5, "Linf"), (math.nan, "Linf"), (math.inf, "L2"), (0.0, "L2"), (100.5, "L2"),
     (math.nan, "L2"), ("0.3", "Linf"), (True, "Linf"), (None, "L2")],
)
def test_validate_eps_rejects_bad_radii_naming_the_value(eps, norm: str) -> None:
    with pytest.raises(ValueError, match=rf"{norm} eps must be .*got {eps!r}"):
        validate_eps(eps, norm)


@pytest.mark.parametrize("norm", ["L1", "linf", "", None])
def test_unknown_norm_lists_the_norms(norm) -> None:
    with pytest.raises(ValueError, match=rf"unknown norm {norm!r}; expected one of: Linf, L2"):
        validate_eps(0.1, norm)
    with pytest.raises(ValueError, match=rf"{norm!r}"):
        AttackSpec("pgd", norm=norm)


def test_attack_spec_validates_and_normalises() -> None:
    spec = AttackSpec("pgd", norm="L2", eps=1, steps=5, step_size=0.25)
    assert (spec.eps, spec.steps, spec.step_size) == (1.0, 5, 0.25) and isinstance(spec.eps, float)
    assert AttackSpec("apgd-ce").eps == 0.3
    with pytest.raises(ValueError, match=r"unknown attack 'cw'; expected one of: pgd, fgsm, apgd-ce"):
        AttackSpec("cw")
    with pytest.raises(ValueError, match=r"got 1\.5"):
        AttackSpec("fgsm", eps=1.5)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
        AttackSpec("pgd", steps=0)
    with pytest.raises(ValueError, match=r"step_size is only used by pgd.*'fgsm'"):
        AttackSpec("fgsm", step_size=0.1)
    with pytest.raises(ValueError, match=r"step_size must be .*got -0\.1"):
        AttackSpec("pgd", step_size=-0.1)
    with pytest.raises(AttributeError):
        spec.eps = 0.5  # frozen
    assert ATTACKS == ("pgd", "fgsm", "apgd-ce") and NORMS == ("Linf", "L2")


def test_attack_functions_reject_bad_arguments(model: nn.Module, batch) -> None:
    x, y = batch
    with pytest.raises(ValueError, match=r"got nan"):
        pgd(model, x, y, eps=math.nan)
    with pytest.raises(ValueError, match=r"'L3'"):
        fgsm(model, x, y, eps=0.1, norm="L3")
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
        apgd_ce(model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match=r"step_size must be .*got 0"):
        pgd(model, x, y, eps=0.1, step_size=0)
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(64,\)"):
        pgd(model, x, y[:10], eps=0.1)
    with pytest.raises(ValueError, match=r"non-empty sequence of AttackSpec"):
        mixed_attack(model, x, y, [], generator=None)


# ------------------------------------------------------------------------------------ training-time attacks
ATTACK_CASES = [
    ("pgd", "Linf", 0.1), ("pgd", "Linf", 0.3), ("pgd", "L2", 1.0), ("fgsm", "Linf", 0.2), ("fgsm", "L2", 1.0),
    ("apgd-ce", "Linf", 0.2), ("apgd-ce", "L2", 1.0), ("apgd-ce-success", "Linf", 0.3),
]


@pytest.mark.parametrize(("name", "norm", "eps"), ATTACK_CASES)
def test_attacks_stay_in_the_eps_ball_and_unit_box(model: nn.Module, batch, name: str, norm: str,
                                                   eps: float) -> None:
    x, y = batch
    if name == "pgd":
        x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=5, generator=torch.Generator().manual_seed(0))
    elif name == "fgsm":
        x_adv = fgsm(model, x, y, eps=eps, norm=norm)
    else:
        x_adv = apgd_ce(model, x, y, eps=eps, norm=norm, steps=10, best_loss=name == "apgd-ce")
    _assert_in_ball(x, x_adv, eps, norm)


def test_pgd_with_a_large_step_size_still_projects(model: nn.Module, batch) -> None:
    x, y = batch
    for norm, eps in (("Linf", 0.05), ("L2", 0.3)):
        x_adv = pgd(model, x, y, eps=eps, norm=norm, steps=3, step_size=10.0, generator=torch.Generator())
        _assert_in_ball(x, x_adv, eps, norm)


def test_attacks_lower_the_accuracy_of_a_trained_model(model: nn.Module, batch) -> None:
    x, y = batch
    clean = _accuracy(model, x, y)
    assert clean >= 0.9
    g = torch.Generator().manual_seed(0)
    assert _accuracy(model, pgd(model, x, y, eps=0.3, generator=g), y) <= 0.2
    assert _accuracy(model, pgd(model, x, y, eps=2.0, norm="L2", generator=g), y) <= 0.2
    assert _accuracy(model, apgd_ce(model, x, y, eps=0.3, steps=20), y) <= 0.2
    assert _accuracy(model, fgsm(model, x, y, eps=0.3), y) <= clean - 0.4
    # A weaker attack is weaker: the eps ball matters.
    assert _accuracy(model, pgd(model, x, y, eps=0.02, generator=g), y) >= clean - 0.1


def test_same_seed_same_adversarial_examples(model: nn.Module, batch) -> None:
    x, y = batch
    for norm, eps in (("Linf", 0.2), ("L2", 1.0)):
        a = pgd(model, x, y, eps=eps, norm=norm, steps=3, generator=torch.Generator().manual_seed(5))
        b = pgd(model, x, y, eps=eps, norm=norm, steps=3, generator=torch.Generator().manual_seed(5))
        c = pgd(model, x, y, eps=eps, norm=norm, steps=3, generator=torch.Generator().manual_seed(6))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    a = apgd_ce(model, x, y, eps=0.1, steps=5, seed=3)
    assert torch.equal(a, apgd_ce(model, x, y, eps=0.1, steps=5, seed=3))
    assert not torch.equal(a, apgd_ce(model, x, y, eps=0.1, steps=5, seed=4))


def test_run_attack_dispatches_with_the_spec_settings(model: nn.Module, batch) -> None:
    x, y = batch
    spec = AttackSpec("pgd", norm="L2", eps=0.7, steps=4, step_size=0.3)
    expected = pgd(model, x, y, eps=0.7, norm="L2", steps=4, step_size=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(run_attack(spec, model, x, y, generator=torch.Generator().manual_seed(1)), expected)
    assert torch.equal(run_attack(AttackSpec("fgsm", eps=0.1), model, x, y), fgsm(model, x, y, eps=0.1))
    assert torch.equal(run_attack(AttackSpec("apgd-ce", eps=0.1, steps=5), model, x, y, seed=2),
                       apgd_ce(model, x, y, eps=0.1, steps=5, seed=2))


class _Net(nn.Module):
    """A model with BatchNorm and Dropout, to see that attacks restore modes and leave stats and grads alone."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 8 * 8, N_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_attacks_leave_the_model_as_they_found_it(batch) -> None:
    x, y = batch
    torch.manual_seed(0)
    net = _Net().train()
    net.head.eval()  # a mixed state must come back exactly, module by module
    modes = {name: m.training for name, m in net.named_modules()}
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    specs = [AttackSpec("pgd", steps=2), AttackSpec("fgsm", norm="L2", eps=1.0), AttackSpec("apgd-ce", steps=3)]
    attacks = [
        lambda: pgd(net, x, y, eps=0.1, steps=2),
        lambda: fgsm(net, x, y, eps=0.1),
        lambda: apgd_ce(net, x, y, eps=0.1, steps=3),
        lambda: mixed_attack(net, x, y, specs, generator=torch.Generator().manual_seed(0)),
    ]
    for attack in attacks:
        with torch.no_grad():  # attacks must work inside no_grad (e.g. during validation)
            attack()
        assert {name: m.training for name, m in net.named_modules()} == modes
        assert all(p.grad is None and p.requires_grad for p in net.parameters())
        for key, value in net.state_dict().items():  # BatchNorm running stats untouched
            assert torch.equal(value, stats[key]), key


def test_apgd_leaves_the_global_rng_alone(model: nn.Module, batch) -> None:
    x, y = batch
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    apgd_ce(model, x[:4], y[:4], eps=0.1, steps=2, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_mixed_attack_uses_each_samples_own_spec_in_order(model: nn.Module, batch) -> None:
    x, y = batch
    x = 0.25 + 0.5 * x  # keep pixels away from 0 and 1 so FGSM's Linf step is never clipped
    specs = [AttackSpec("fgsm", eps=0.05), AttackSpec("fgsm", eps=0.2), AttackSpec("pgd", norm="L2", eps=0.5,
                                                                                   steps=3)]
    out = mixed_attack(model, x, y, specs, generator=torch.Generator().manual_seed(9))
    assignment = assign_specs(len(x), len(specs), generator=torch.Generator().manual_seed(9))
    assert sorted(set(assignment.tolist())) == [0, 1, 2]
    delta = (out - x).flatten(1)
    linf, l2 = delta.abs().amax(1), delta.norm(dim=1)
    for i, k in enumerate(assignment.tolist()):
        if k < 2:  # FGSM moves some pixel by exactly its eps: identifies the spec (and the sample's place)
            assert abs(linf[i].item() - specs[k].eps) < 1e-5, (i, k, linf[i].item())
        else:
            assert 0 < l2[i].item() <= 0.5 + 1e-5, (i, l2[i].item())
    again = mixed_attack(model, x, y, specs, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out, again)
    assert out.min() >= 0 and out.max() <= 1


# ---------------------------------------------------------------------------------------------- AutoAttack
def test_standard_autoattack_keeps_its_published_strength() -> None:
    for norm, eps in (("Linf", 8 / 255), ("L2", 0.5)):
        s = autoattack_settings("standard", norm, eps)
        assert s["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert s["apgd"]["n_iter"] == 100 and s["apgd"]["n_restarts"] == 1
        assert s["apgd_targeted"]["n_iter"] == 100 and s["apgd_targeted"]["n_target_classes"] == 9
        assert s["fab"]["n_iter"] == 100 and s["fab"]["n_target_classes"] == 9
        assert s["square"]["n_queries"] == 5000
        assert s["eps"] == eps and s["norm"] == norm
    rand = autoattack_settings("rand", "Linf", 8 / 255)
    assert rand["attacks"] == ["apgd-ce", "apgd-dlr"] and rand["apgd"]["eot_iter"] == 20
    plus = autoattack_settings("plus", "Linf", 8 / 255)
    assert plus["apgd"]["n_restarts"] == 5 and len(plus["attacks"]) == 6


@pytest.mark.parametrize(("version", "norm", "eps", "match"), [
    ("custom", "Linf", 0.1, r"unknown AutoAttack version 'custom'; expected one of: standard, plus, rand"),
    ("standard", "L1", 0.1, r"unknown norm 'L1'"),
    ("standard", "Linf", 2.0, r"Linf eps must be .*got 2\.0"),
])
def test_autoattack_rejects_bad_arguments(model: nn.Module, batch, version, norm, eps, match) -> None:
    x, y = batch
    with pytest.raises(ValueError, match=match):
        autoattack(model, x[:2], y[:2], norm=norm, eps=eps, version=version)
    with pytest.raises(ValueError, match=match):
        autoattack_settings(version, norm, eps)


@pytest.mark.parametrize(("norm", "eps"), [("Linf", 0.3), ("L2", 2.0)])
def test_autoattack_breaks_a_tiny_model_within_eps(model: nn.Module, batch, norm: str, eps: float) -> None:
    x, y = batch[0][:8], batch[1][:8]
    sentinel = _tracer
    previous = sys.gettrace()
    sys.settrace(sentinel)
    try:
        result = autoattack(model, x, y, norm=norm, eps=eps, batch_size=4)
        assert sys.gettrace() is sentinel, "pyautoattack's dynamic-defence check removed the active tracer"
    finally:
        sys.settrace(previous)
    assert result.x_adv.shape == x.shape and result.y_adv.shape == y.shape
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    delta = (result.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert size.max().item() <= eps + 1e-5
    with torch.no_grad():
        assert torch.equal(result.y_adv, model(result.x_adv).argmax(1))
    robust = (result.y_adv == y).float().mean().item()
    assert robust == result.robust_accuracy
    assert result.clean_accuracy == _accuracy(model, x, y) >= 0.75
    assert robust < result.clean_accuracy, "AutoAttack at this eps should break some points"
    unchanged = result.y_adv == y
    assert torch.equal(result.x_adv[unchanged], x[unchanged]), "robust points come back clean"
    assert list(result.accuracy)[0] == "clean"
    assert result.messages == []


def test_autoattack_runs_the_whole_cascade_on_robust_points(model: nn.Module, batch) -> None:
    x, y = batch[0][:1], batch[1][:1]
    result = autoattack(model, x, y, norm="Linf", eps=0.01)  # far too small to flip this point
    assert list(result.accuracy) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.robust_accuracy == result.clean_accuracy == 1.0
    assert torch.equal(result.x_adv, x) and torch.equal(result.y_adv, y)
    # FAB calls .backward(): without frozen parameters it would leave gradients in the model.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training


def _tracer(frame, event, arg):  # a no-op global tracer, like coverage's, that must survive AutoAttack
    return None


def test_autoattack_reports_its_checks(model: nn.Module, batch) -> None:
    probabilities = nn.Sequential(model, nn.Softmax(dim=1))  # outputs that are not logits: a classic mistake
    x, y = batch[0][:4], batch[1][:4]
    result = autoattack(probabilities, x, y, norm="Linf", eps=0.3)
    assert any("probability distribution" in m for m in result.messages), result.messages
    assert len(result.messages) == len(set(result.messages))


class _Counting(nn.Module):
    """Counts forward calls; with `fail_after`, raises on a later call, like a run killed mid-attack."""

    def __init__(self, inner: nn.Module, fail_after: int | None = None) -> None:
        super().__init__()
        self.inner, self.fail_after, self.calls = inner, fail_after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated kill")
        return self.inner(x)


def test_autoattack_resumes_from_its_state_file(model: nn.Module, batch, tmp_path: Path) -> None:
    x, y = batch[0][:8], batch[1][:8]
    kwargs = {"norm": "Linf", "eps": 0.3, "batch_size": 4}
    full_model = _Counting(model)
    full = autoattack(full_model, x, y, state_path=tmp_path / "full.pt", **kwargs)
    assert list(full.accuracy) == ["clean", "apgd-ce"], "test assumes APGD-CE breaks every point here"

    # Kill the run late in APGD-CE's second batch; the first batch is already saved.
    killed_path = tmp_path / "killed.pt"
    with pytest.raises(RuntimeError, match="simulated kill"):
        autoattack(_Counting(model, fail_after=full_model.calls - 20), x, y, state_path=killed_path, **kwargs)
    assert killed_path.exists()
    resumed_model = _Counting(model)
    resumed = autoattack(resumed_model, x, y, state_path=killed_path, **kwargs)
    assert resumed_model.calls < 0.6 * full_model.calls, "the resumed run redid the saved batch"
    for result in (resumed,):
        assert torch.equal(result.x_adv, full.x_adv) and torch.equal(result.y_adv, full.y_adv)
        assert result.accuracy == full.accuracy

    # A finished state returns the same result without running the model at all.
    again_model = _Counting(model)
    again = autoattack(again_model, x, y, state_path=tmp_path / "full.pt", **kwargs)
    assert again_model.calls == 0
    assert torch.equal(again.x_adv, full.x_adv) and torch.equal(again.y_adv, full.y_adv)

    with pytest.raises(ValueError, match=r"another evaluation \(eps: saved 0\.3, now 0\.25\)"):
        autoattack(model, x, y, state_path=tmp_path / "full.pt", **{**kwargs, "eps": 0.25})
    with pytest.raises(ValueError, match=r"another evaluation \(labels differ\)"):
        autoattack(model, x, (y + 1) % N_CLASSES, state_path=tmp_path / "full.pt", **kwargs)
    (tmp_path / "junk.pt").write_text("not a state")
    with pytest.raises(ValueError, match=r"junk\.pt is not an oodray AutoAttack state"):
        autoattack(model, x, y, state_path=tmp_path / "junk.pt", **kwargs)
