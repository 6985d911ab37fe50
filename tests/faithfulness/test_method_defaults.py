"""The bases are what their names say: `dacs` is the DACS release, `daformer` DAFormer's choices."""

from udaseg.config import load_config
from udaseg.config.schema import Config, MethodConfig


def test_dacs_preset_is_official_dacs():
    cfg = load_config("dacs_deeplabv2_gta2cs")
    st = cfg.method.self_training
    assert (st.ema_alpha, st.ignore_top, st.ignore_bottom) == (0.99, 0, 0)


def test_daformer_preset_keeps_its_momentum_and_ignore_band():
    cfg = load_config("daformer_mitb5_gta2cs")
    st = cfg.method.self_training
    assert (st.ema_alpha, st.ignore_top, st.ignore_bottom) == (0.999, 15, 120)


def test_ema_alpha_default_follows_the_method():
    assert load_config(None, ["method.name=dacs"]).method.self_training.ema_alpha == 0.99
    assert load_config(None, ["method.name=daformer"]).method.self_training.ema_alpha == 0.999
    assert load_config(None, ["method.name=sepico"]).method.self_training.ema_alpha == 0.999
    assert Config(method=MethodConfig(name="dacs")).method.self_training.ema_alpha == 0.99


def test_explicit_ema_alpha_wins():
    cfg = load_config("dacs_deeplabv2_gta2cs", ["method.self_training.ema_alpha=0.9"])
    assert cfg.method.self_training.ema_alpha == 0.9


def test_t2sda_presets_use_the_papers_sum_with_lambda_0_1():
    from udaseg.config import list_presets

    presets = [p for p in list_presets() if p.startswith(("t2sda", "digits_t2sda"))]
    assert len(presets) >= 5
    for preset in presets:
        t2s = load_config(preset).method.t2sda
        assert (t2s.reduction, t2s.weight) == ("paper_sum", 0.1), preset
    assert load_config(None, ["method.t2sda.reduction=mean"]).method.t2sda.reduction == "mean"


def test_sum_reduction_weighs_classes_by_query_count_mean_does_not():
    """Eq. 5's sum: a class with twice the queries contributes twice; the mean ignores the count."""
    import torch

    from udaseg.methods.t2sda import PullingLoss

    def reduce(reduction, counts, value=1.0):
        loss = PullingLoss(num_classes=4, reduction=reduction)
        samples = [type("S", (), {"cls": c})() for c in range(len(counts))]
        per_query = [torch.full((n,), value) for n in counts]
        return float(loss.reduce(per_query, samples, None, torch.zeros(1)))

    assert PullingLoss(num_classes=4).reduction == "paper_sum"
    # (1/C) Σ_c (1/C) Σ_q ℓ: explicit formula with ℓ = 1
    assert reduce("paper_sum", [2, 6]) == (2 + 6) / 16
    assert reduce("paper_sum", [4, 4]) == reduce("paper_sum", [2, 6])
    assert reduce("paper_sum", [2, 2]) * 2 == reduce("paper_sum", [4, 4])
    assert reduce("mean", [2, 6]) == reduce("mean", [4, 4]) == reduce("mean", [1, 1]) == 1.0
