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
