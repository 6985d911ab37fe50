"""The 'write your own method' example of docs/ARCHITECTURE.md, and a method registered from outside
the package through the `udaseg.methods` entry-point group."""

import importlib
import math
import re
import sys
import types
from pathlib import Path

import pytest

from udaseg.config import config_to_yaml, load_config
from udaseg.engine.logging import read_metrics
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError
from udaseg.methods import available_methods

from .conftest import tiny_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


def documented_example() -> str:
    text = DOC.read_text()
    match = re.search(r"<!-- example: own-method -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the example block is missing from docs/ARCHITECTURE.md"
    return match.group(1)


@pytest.fixture(scope="module")
def entropy_method():
    module = types.ModuleType("udaseg_doc_example")
    exec(compile(documented_example(), str(DOC), "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    yield module
    sys.modules.pop(module.__name__, None)


def test_example_is_about_fifty_lines():
    lines = documented_example().strip().splitlines()
    assert 40 <= len(lines) <= 65


def test_documented_method_trains_with_its_config_section(entropy_method, fake_domains, tmp_path):
    assert "entropy_min" in available_methods()
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=3,
                      extra=["method.name=entropy_min", "method.entropy_min.weight=0.5"])
    assert cfg.method.entropy_min.weight == 0.5 and "entropy_min:" in config_to_yaml(cfg)
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert len(records) == 3
    for record in records:
        assert 0 < record["target.entropy"] <= 0.5 * math.log(3) + 1e-6
    objective = trainer.method.objectives[1]
    # after_step ran three times: m^0 (1-m) e_2 + m (1-m) e_1 + m^2 (1-m) e_0 with m = 0.9
    entropies = [r["target.entropy"] / 0.5 for r in records]
    expected = sum(0.1 * 0.9 ** (2 - i) * e for i, e in enumerate(entropies))
    assert float(objective.running_entropy) == pytest.approx(expected, rel=1e-5)
    resumed = Trainer(cfg, resume="latest", progress=False)
    assert float(resumed.method.objectives[1].running_entropy) == pytest.approx(expected, rel=1e-6)


def test_documented_section_has_typo_suggestions(entropy_method):
    with pytest.raises(UserError, match=r"unknown config key 'method\.entropy_min\.wieght'; did you mean "
                                        r"'method\.entropy_min\.weight'"):
        load_config("digits_source_only", ["method.name=entropy_min", "method.entropy_min.wieght=1"])
    with pytest.raises(UserError, match=r"'method\.name': unknown method 'entropy_mn'; did you mean 'entropy_min'"):
        load_config("digits_source_only", ["method.name=entropy_mn"])


PLUGIN = '''
from dataclasses import dataclass

from udaseg.methods import Method, register_method
from udaseg.methods.base import SupervisedSegmentation


@dataclass
class PluginConfig:
    loss_name: str = "plugin_ce"


@register_method("plugin_source_ce", config=PluginConfig)
def build(cfg, segmentor):
    return Method([SupervisedSegmentation("source", loss_name=cfg.method.plugin_source_ce.loss_name)])
'''


def test_method_registered_through_an_entry_point(fake_domains, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "udaseg_plugin_pkg-0.1.dist-info").mkdir(parents=True)
    (site / "udaseg_plugin_pkg-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: udaseg-plugin-pkg\nVersion: 0.1\n")
    (site / "udaseg_plugin_pkg-0.1.dist-info" / "entry_points.txt").write_text(
        "[udaseg.methods]\nplugin_source_ce = udaseg_plugin_pkg_method\n")
    (site / "udaseg_plugin_pkg_method.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=1,
                      extra=["method.name=plugin_source_ce", "method.plugin_source_ce.loss_name=mine"])
    assert "plugin_source_ce" in available_methods()
    Trainer(cfg, progress=False).train()
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert "source.mine" in record
    sys.modules.pop("udaseg_plugin_pkg_method", None)
