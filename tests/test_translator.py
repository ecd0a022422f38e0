import pytest
import torch

from oodray.config import LossConfig, TranslatorConfig, resolve_config
from oodray.data import DatasetInfo
from oodray.errors import ConfigError
from oodray.losses import TERMS, PatchDiscriminator, TranslatorObjective
from oodray.models.classifier import build_classifier, freeze
from oodray.models.translator import TRANSLATORS, build_translator, is_trainable


@pytest.mark.parametrize("arch", TRANSLATORS.names())
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_every_translator(arch, shape):
    torch.manual_seed(0)
    t = build_translator(TranslatorConfig(arch=arch), shape[0], shape[1:])
    x = torch.rand(3, *shape)
    y = t(x)
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    if is_trainable(t):
        t.train()
        # inputs away from the clamp bounds so every parameter gets a gradient
        (t(0.25 + 0.5 * x) * torch.randn_like(x)).sum().backward()
        missing = [n for n, p in t.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, missing
    if arch in ("identity",):
        assert torch.equal(y, x)


def test_unet_resnet_knobs_and_size_limits():
    u = build_translator(TranslatorConfig(arch="unet", depth=3, width=8, norm="instance", dropout=0.1), 1, (8, 8))
    assert u(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    with pytest.raises(ConfigError, match="downsamples by 16.*8x8"):
        build_translator(TranslatorConfig(arch="unet", depth=4), 1, (8, 8))
    with pytest.raises(ConfigError, match="8x8"):
        build_translator(TranslatorConfig(arch="resnet", downsamplings=3), 1, (8, 8))
    with pytest.raises(ConfigError, match="unknown translator 'vit'"):
        build_translator(TranslatorConfig(arch="vit"), 1)
    direct = build_translator(TranslatorConfig(arch="tiny", residual=False), 1)
    assert not direct.residual


def test_bitdepth_is_quantised_with_identity_gradient():
    t = build_translator(TranslatorConfig(arch="bitdepth", depth=2), 1)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    y = t(x)
    assert set(torch.unique(y.detach() * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _objective(weights: dict, gan: bool = False):
    info = DatasetInfo("x", 10, 1, (8, 8), (0.5,), (0.25,))
    c = freeze(build_classifier("small_cnn", info))
    d = PatchDiscriminator(1, (8, 8)) if gan else None
    base = {k: 0.0 for k in TERMS}
    base.update(weights)
    return TranslatorObjective(LossConfig(**base), c, d)


@pytest.mark.parametrize("term", TERMS)
def test_each_loss_term_is_finite_and_zero_weight_removes_it(term):
    torch.manual_seed(0)
    t = build_translator(TranslatorConfig(arch="tiny"), 1)
    x, x_ood, y = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    only = _objective({term: 1.0}, gan=term == "gan")
    total, terms, t_ood = only(t, x, x_ood, y)
    assert set(terms) == {term} and torch.isfinite(total) and abs(float(total) - terms[term]) < 1e-6
    assert t_ood.shape == x.shape
    other = "pixel" if term != "pixel" else "identity"
    without = _objective({other: 1.0}, gan=False)
    assert term not in without(t, x, x_ood, y)[1]


def test_objective_runs_c_once_per_input_and_keeps_each_terms_value():
    """Every term that reads C shares one forward per input: C(x) (the KL targets and clean features), C(T(x_ood))
    (consistency, ce, trades, features) and C(T(x)). Each term's value is the one computed term by term."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    t = build_translator(TranslatorConfig(arch="tiny"), 1)
    x, x_ood, y = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    objective = _objective({k: 1.0 for k in TERMS if k != "gan"})
    c = objective.classifier
    calls = []
    hook = c.net.register_forward_hook(lambda *_: calls.append(1))
    total, terms, t_ood = objective(t, x, x_ood, y)
    hook.remove()
    assert len(calls) == 3, len(calls)
    with torch.no_grad():  # the same terms, each with its own forwards of C
        t_x = t(x)
        p_x = F.softmax(c(x), 1)
        expect = {
            "pixel": F.l1_loss(t_ood, x), "identity": F.l1_loss(t_x, x), "ce": F.cross_entropy(c(t_ood), y),
            "consistency": F.kl_div(F.log_softmax(c(t_ood), 1), p_x, reduction="batchmean"),
            "clean_consistency": F.kl_div(F.log_softmax(c(t_x), 1), p_x, reduction="batchmean"),
            "trades": F.kl_div(F.log_softmax(c(t_ood), 1), F.softmax(c(t_x), 1), reduction="batchmean"),
            "feature": sum(F.mse_loss(a, b) for a, b in zip(c.features(t_ood), c.features(x)))
            / len(c.feature_layers)}
    assert set(terms) == set(expect)
    for k, v in expect.items():
        assert terms[k] == pytest.approx(float(v), rel=1e-5, abs=1e-7), k
    total.backward()
    assert all(p.grad is not None for p in t.parameters() if p.requires_grad)


def test_negative_weights_and_unknown_terms_are_refused():
    with pytest.raises(ConfigError, match="loss.ce"):
        resolve_config("digits", overrides=["loss.ce=-0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'loss.perceptual'"):
        resolve_config("digits", overrides=["loss.perceptual=1"])


def test_trades_term_ties_attacked_to_clean_predictions_through_t():
    """loss.trades = KL(C(T(x)) || C(T(x_ood))): zero when the OOD input equals the clean one, positive otherwise,
    with gradients reaching T through both sides."""
    from oodray.config import resolve_config
    from oodray.data import load_dataset
    from oodray.losses import TranslatorObjective
    from oodray.models.classifier import build_classifier

    cfg = resolve_config("synthetic", overrides=["loss.trades=1", "loss.pixel=0", "loss.consistency=0",
                                                 "loss.identity=0", "loss.clean_consistency=0"])
    info = load_dataset(cfg.data).info
    torch.manual_seed(0)
    c = build_classifier(cfg.classifier.arch, info).eval()
    t = build_translator(cfg.translator, info.channels, info.image_size)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    objective = TranslatorObjective(cfg.loss, c)
    loss, terms, _ = objective(t, x, x, y)
    assert set(terms) == {"trades"} and terms["trades"] == pytest.approx(0.0, abs=1e-6)
    loss, terms, _ = objective(t, x, (x + 0.3 * torch.rand_like(x)).clamp(0, 1), y)
    assert terms["trades"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.parameters())


def test_cosine_schedule_is_a_function_of_the_epoch():
    from oodray.config import resolve_config
    from oodray.train import epoch_lr

    t = resolve_config("synthetic", overrides=["train.lr_schedule=cosine", "train.epochs=4", "train.lr=0.1"]).train
    assert [round(epoch_lr(t, e), 6) for e in range(4)] == [0.1, 0.085355, 0.05, 0.014645]
    assert epoch_lr(t.__class__(lr=0.1), 3) == 0.1  # constant by default
