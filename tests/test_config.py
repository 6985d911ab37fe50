import pytest

from udaseg.config import load_config
from udaseg.config.loader import from_dict
from udaseg.config.schema import Config
from udaseg.errors import UserError


def test_defaults_and_override():
    cfg = load_config(None, ["optim.lr=0.001", "train.iterations=7", "method.name=dacs"])
    assert cfg.optim.lr == 0.001 and cfg.train.iterations == 7 and cfg.method.name == "dacs"


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match=r"'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(UserError, match=r"did you mean 'train'"):
        from_dict(Config, {"trian": {}})


def test_wrong_type_names_key_type_and_value():
    with pytest.raises(UserError, match=r"'train\.iterations' expects int, got 'many'"):
        load_config(None, ["train.iterations=many"])
    with pytest.raises(UserError, match=r"'method\.name': unknown method 'sepicoo'; did you mean 'sepico'"):
        load_config(None, ["method.name=sepicoo"])


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float)


def test_yaml_file_with_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  iterations: 5\n  seed: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\ntrain:\n  iterations: 9\n")
    cfg = load_config(str(child))
    assert cfg.train.iterations == 9 and cfg.train.seed == 3


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_exponent_without_dot_is_a_float():
    assert load_config(None, ["optim.lr=3e-3"]).optim.lr == 0.003


def test_scaling_the_budget_scales_every_iteration_count():
    from udaseg.config import load_config, scale_iteration_counts

    cfg = load_config("digits_sepico_distcl")
    assert (cfg.train.iterations, cfg.optim.warmup_iters, cfg.method.sepico.warmup_iters) == (3000, 100, 600)
    scale_iteration_counts(cfg, 600)
    # the contrastive terms switch on at the same share of a shorter run (so a quick demo uses them)
    assert (cfg.train.iterations, cfg.optim.warmup_iters, cfg.method.sepico.warmup_iters) == (600, 20, 120)
    assert cfg.train.eval_interval == 500  # an interval, not a point of the schedule: left alone
