"""Pipelines of stages with offline passes: layout, resume across stage boundaries, init_from, bad input."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from udaseg.cli import main
from udaseg.config import to_dict
from udaseg.config.loader import from_dict
from udaseg.config.schema import Config, PassConfig
from udaseg.engine import offline
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.engine.pipeline import build_stages, run_pipeline
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError

from .conftest import tiny_config

SAMPLE = "images/train/{:03d}.png"  # sample names of the folder dataset, relative to its root
STAGES = [
    {"name": "warmup", "config": {"method": {"name": "source_only"}, "train": {"iterations": 3}}},
    {"name": "selftrain",
     "before": [{"name": "pseudo", "kind": "pseudo_labels", "model": "student", "threshold": 0.4}],
     "config": {"method": {"name": "target_oracle"}, "train": {"iterations": 4, "checkpoint_interval": 2},
                "data": {"target": {"pseudo_labels": "{work_dir}/pseudo"}}}},
]


def pipeline_config(fake_domains, work_dir, stages=STAGES):
    cfg = tiny_config("digits_source_only", *fake_domains, work_dir)
    data = to_dict(cfg)
    data["stages"] = stages
    return from_dict(Config, data)


def weights(path):
    state = load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()}}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_two_stage_pipeline_layout_and_handover(fake_domains, tmp_path):
    cfg = pipeline_config(fake_domains, tmp_path / "run")
    run_pipeline(cfg, progress=False)
    root = tmp_path / "run"
    for stage, iterations in (("warmup", 3), ("selftrain", 4)):
        final = load_checkpoint(root / stage / "final.pt")
        assert final["iteration"] == iterations and "optimizer" not in final
        assert (root / stage / "config.yaml").is_file()
    selftrain_cfg = yaml.safe_load((root / "selftrain" / "config.yaml").read_text())
    assert selftrain_cfg["model"]["init_from"] == str(root / "warmup" / "final.pt")
    assert selftrain_cfg["data"]["target"]["pseudo_labels"] == str(root / "pseudo")
    labels = sorted((root / "pseudo" / "labels").rglob("*.png"))
    assert [p.relative_to(root / "pseudo" / "labels").as_posix() for p in labels] == [SAMPLE.format(i) for i in range(4)]
    label = np.asarray(Image.open(labels[0]))
    confidence = np.load(offline.confidence_file(root / "pseudo", SAMPLE.format(0)))["confidence"]
    assert label.shape == confidence.shape == (32, 32)
    assert np.all((label == 255) == (confidence < 0.4)) and set(np.unique(label)) <= {0, 1, 2, 255}
    assert (root / "pseudo" / "pass.json").is_file()
    # the second stage started from the first one's final weights
    trainer = Trainer(build_stages(cfg)[1].cfg, progress=False)
    warm = load_checkpoint(root / "warmup" / "final.pt")["model"]
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, warm[name], rtol=0, atol=0)


def test_pipeline_resumed_across_the_stage_boundary_is_bit_exact(fake_domains, tmp_path, monkeypatch):
    straight = pipeline_config(fake_domains, tmp_path / "straight")
    run_pipeline(straight, progress=False)

    cfg = pipeline_config(fake_domains, tmp_path / "resumed")
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    # 1: the offline pass crashes after two of the four images
    original_write = offline.write_atomic
    calls = {"n": 0}

    def crashing_write(path, write):
        calls["n"] += 1
        if calls["n"] == 5 and path.suffix == ".npz":
            raise KeyboardInterrupt
        original_write(path, write)

    monkeypatch.setattr(offline, "write_atomic", crashing_write)
    assert main(["train", "--config", str(config_file)]) == 130
    root = tmp_path / "resumed"
    assert (root / "warmup" / "final.pt").is_file() and not (root / "pseudo" / "pass.json").exists()
    assert len(list((root / "pseudo" / "labels").rglob("*.png"))) == 2
    assert not [p for p in (root / "pseudo").rglob("*.tmp")]
    monkeypatch.setattr(offline, "write_atomic", original_write)
    # 2: resumed: the pass finishes, the second stage stops after iteration 2 (checkpoint at 2)
    original_iteration = Trainer.train_iteration

    def stopping_iteration(self, it):
        if it == 3 and self.cfg.method.name == "target_oracle":
            raise KeyboardInterrupt
        return original_iteration(self, it)

    monkeypatch.setattr(Trainer, "train_iteration", stopping_iteration)
    assert main(["train", "--config", str(config_file), "--resume"]) == 130
    assert load_checkpoint(root / "selftrain" / "latest.pt")["iteration"] == 2
    assert not (root / "selftrain" / "final.pt").exists()
    monkeypatch.setattr(Trainer, "train_iteration", original_iteration)
    # 3: resumed inside the second stage
    assert main(["train", "--config", str(config_file), "--resume"]) == 0
    summary = yaml.safe_load((root / "pseudo" / "pass.json").read_text())
    assert summary["skipped"] == 2 and summary["written"] == 2
    for i in (0, 3):
        assert np.array_equal(np.asarray(Image.open(offline.label_file(root / "pseudo", SAMPLE.format(i)))),
                              np.asarray(Image.open(offline.label_file(tmp_path / "straight" / "pseudo",
                                                                       SAMPLE.format(i)))))
    assert_same_weights(root / "warmup" / "final.pt", tmp_path / "straight" / "warmup" / "final.pt")
    assert_same_weights(root / "selftrain" / "final.pt", tmp_path / "straight" / "selftrain" / "final.pt")


def test_stage_option_runs_one_stage_and_needs_the_previous_final_weights(fake_domains, tmp_path, capsys):
    cfg = pipeline_config(fake_domains, tmp_path / "run")
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["train", "--config", str(config_file), "--stage", "selftrain"]) == 2
    err = capsys.readouterr().err
    assert "final weights of stage 'warmup'" in err and "warmup/final.pt" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--config", str(config_file), "--stage", "warmup"]) == 0
    assert (tmp_path / "run" / "warmup" / "final.pt").is_file() and not (tmp_path / "run" / "selftrain").exists()
    assert main(["train", "--config", str(config_file), "--stage", "warmpu"]) == 2
    assert "unknown stage 'warmpu'; did you mean 'warmup'?" in capsys.readouterr().err


def test_stage_config_error_names_the_stage_and_the_key(fake_domains, tmp_path):
    bad = [STAGES[0], {**STAGES[1], "config": {"train": {"iteratons": 4}}}]
    with pytest.raises(UserError, match=r"stage 'selftrain': unknown config key 'train\.iteratons'; did you mean "
                                        r"'train\.iterations'"):
        build_stages(pipeline_config(fake_domains, tmp_path / "run", bad))
    bad_pass = [STAGES[0], {**STAGES[1], "before": [{"name": "pseudo", "kind": "pseudo_label"}]}]
    with pytest.raises(UserError, match="stage 'selftrain': offline pass 'pseudo' has an unknown kind 'pseudo_label'; "
                                        "did you mean 'pseudo_labels'"):
        build_stages(pipeline_config(fake_domains, tmp_path / "run", bad_pass))
    with pytest.raises(UserError, match="stage name 'a/b'"):
        pipeline_config(fake_domains, tmp_path / "run", [{"name": "a/b"}])
    with pytest.raises(UserError, match="unknown config key 'stages\\[0\\]\\.befor'"):
        pipeline_config(fake_domains, tmp_path / "run", [{"name": "a", "befor": []}])


def test_a_pipeline_config_is_not_trained_as_one_run(fake_domains, tmp_path):
    with pytest.raises(UserError, match="is a pipeline of 2 stages"):
        Trainer(pipeline_config(fake_domains, tmp_path / "run"), progress=False)


def test_missing_offline_pass_output_names_the_file(fake_domains, tmp_path):
    folder = tmp_path / "pseudo"
    (folder / "labels" / "images" / "train").mkdir(parents=True)
    for i in (0, 1, 3):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(offline.label_file(folder, SAMPLE.format(i)))
    cfg = tiny_config("digits_target_oracle", *fake_domains, tmp_path / "run",
                      extra=[f"data.target.pseudo_labels={folder}"])
    with pytest.raises(UserError, match=r"offline pseudo-label file not found: .*pseudo/labels/images/train/002\.png"):
        Trainer(cfg, progress=False)
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(offline.label_file(folder, SAMPLE.format(2)))
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(UserError, match=r"002\.png is 32x16, its image 32x32"):
        [trainer.streams["target"].dataset[i] for i in range(4)]


def test_pseudo_labelled_dataset_reads_the_pass_labels_through_the_pipeline(fake_domains, tmp_path):
    folder = tmp_path / "pseudo"
    (folder / "labels" / "images" / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i in range(4):
        written[i] = rng.integers(0, 3, (32, 32)).astype(np.uint8)
        Image.fromarray(written[i]).save(offline.label_file(folder, SAMPLE.format(i)))
    cfg = tiny_config("digits_target_oracle", *fake_domains, tmp_path / "run",
                      extra=[f"data.target.pseudo_labels={folder}", "data.target.flip=false"])
    trainer = Trainer(cfg, progress=False)
    dataset = trainer.streams["target"].dataset
    for i in range(4):
        assert np.array_equal(dataset[i]["label"].numpy(), written[i])


def test_init_from_loads_weights_only_and_refuses_other_models(fake_domains, tmp_path):
    source = tiny_config("digits_source_only", *fake_domains, tmp_path / "a", iterations=2)
    Trainer(source, progress=False).train()
    checkpoint = tmp_path / "a" / "latest.pt"
    cfg = tiny_config("digits_dacs", *fake_domains, tmp_path / "b", iterations=2,
                      extra=[f"model.init_from={checkpoint}"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.iteration == 0 and trainer.schedule.last_iter == -1
    saved = load_checkpoint(checkpoint)["model"]
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    other = tiny_config("digits_source_only", *fake_domains, tmp_path / "c", model="deeplabv2_tiny",
                        extra=[f"model.init_from={checkpoint}"])
    with pytest.raises(UserError, match=r"model\.init_from=.*latest\.pt holds a 'daformer_tiny' model, the config "
                                        r"asks for 'deeplabv2_tiny'"):
        Trainer(other, progress=False)
    more = tiny_config("digits_source_only", *fake_domains, tmp_path / "d", extra=["model.num_classes=5",
                                                                                   f"model.init_from={checkpoint}"])
    with pytest.raises(UserError, match="has 3 classes, the config asks for 5"):
        Trainer(more, progress=False)
    with pytest.raises(UserError, match="checkpoint file not found: .*nothing.pt"):
        Trainer(tiny_config("digits_source_only", *fake_domains, tmp_path / "e",
                            extra=[f"model.init_from={tmp_path / 'nothing.pt'}"]), progress=False)
    with pytest.raises(UserError, match="holds no EMA teacher"):
        Trainer(tiny_config("digits_source_only", *fake_domains, tmp_path / "f",
                            extra=[f"model.init_from={checkpoint}", "model.init_from_model=teacher"]), progress=False)


def test_class_prototype_pass_matches_a_plain_computation(fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=1)
    trainer = Trainer(cfg, progress=False)
    trainer.train()
    spec = from_dict(PassConfig, {"name": "protos", "kind": "class_prototypes", "model": "student",
                                  "options": {"tap": "enc_last"}})
    ctx = offline.PassContext(spec, cfg, cfg, tmp_path / "run" / "latest.pt", tmp_path / "protos", progress=False)
    record = offline.run_pass(ctx)
    assert record["kind"] == "class_prototypes" and (tmp_path / "protos" / "pass.json").is_file()
    stored = torch.load(tmp_path / "protos" / "prototypes.pt", weights_only=True)
    segmentor = trainer.model.segmentor.eval()
    dataset = offline.pass_dataset(ctx, cfg.data.source, labelled=True)
    sums, counts = {}, {}
    for i in range(len(dataset)):
        item = dataset[i]
        with torch.no_grad():
            features = segmentor(item["image"][None], taps=("enc_last",)).features["enc_last"][0].double()
        channels, h, w = features.shape
        label = item["label"]
        for y in range(h):
            for x in range(w):
                k = int(label[y * label.shape[0] // h, x * label.shape[1] // w])
                if k == 255:
                    continue
                vector = features[:, y, x]
                sums[k] = sums.get(k, 0) + vector / vector.norm().clamp_min(1e-12)
                counts[k] = counts.get(k, 0) + 1
    for k in range(3):
        assert float(stored["counts"][k]) == counts.get(k, 0)
        if k in sums:
            torch.testing.assert_close(stored["prototypes"][k].double(), sums[k] / counts[k], rtol=1e-5, atol=1e-6)
    # a completed pass is not run again on resume
    before = (tmp_path / "protos" / "prototypes.pt").stat().st_mtime_ns
    offline.run_pass(ctx)
    assert (tmp_path / "protos" / "prototypes.pt").stat().st_mtime_ns == before


def test_unknown_pass_kind_is_named(fake_domains, tmp_path):
    cfg = tiny_config("digits_source_only", *fake_domains, tmp_path / "run", iterations=1)
    spec = from_dict(PassConfig, {"name": "p", "kind": "pseudo_label"})
    ctx = offline.PassContext(spec, cfg, cfg, tmp_path / "none.pt", tmp_path / "p", progress=False)
    with pytest.raises(UserError, match="offline pass 'p': unknown kind 'pseudo_label'; did you mean 'pseudo_labels'"):
        offline.run_pass(ctx)
