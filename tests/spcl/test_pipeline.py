"""SPCL's four stages as a pipeline at a tiny size: passes, hand-over, resume inside stage C, bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from udaseg.cli import main
from udaseg.config import load_config, to_dict
from udaseg.config.schema import DatasetConfig
from udaseg.engine import offline
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.engine.pipeline import build_stages, run_pipeline
from udaseg.engine.trainer import Trainer
from udaseg.errors import UserError

SIZE = 32
SAMPLE = "images/train/{:03d}.png"
CHANNELS = 32  # enc_last of deeplabv2_tiny at base width 4


@pytest.fixture(scope="module")
def domains(tmp_path_factory, fake_domain):
    base = tmp_path_factory.mktemp("spcl_domains")
    return (fake_domain(base / "source", 0, 1, size=SIZE, layout="blocks"),
            fake_domain(base / "target", 90, 2, size=SIZE, layout="blocks"))


def _point_at(cfg, domains):
    for spec, root in ((cfg.data.source, domains[0]), (cfg.data.target, domains[1])):
        spec.name, spec.root, spec.split, spec.options = "folder", str(root), "train", {}
        spec.resize, spec.crop_size, spec.rcs.enabled, spec.monitor_labels = None, None, False, False
    cfg.data.target.labelled = False
    cfg.data.val = [DatasetConfig(name="folder", root=str(domains[1]), split="val", normalization=cfg.data.source.normalization)]
    return cfg


def tiny(preset, domains, work_dir, iterations=4, extra=()):
    cfg = load_config(preset, [
        "model.num_classes=3", "model.options={output_stride: 4, base_width: 4}", f"train.iterations={iterations}",
        f"train.work_dir={work_dir}", "train.eval_interval=1000", "train.checkpoint_interval=2",
        "train.log_interval=1", "train.amp=none", "train.channels_last=false", "data.batch_size=2",
        "data.workers=0", "optim.warmup_iters=1", "optim.schedule_horizon=1.5", "method.spcl.discriminator_width=2", *extra])
    return _point_at(cfg, domains)


def weights_and_state(path):
    state = load_checkpoint(path)
    return {**{f"model.{k}": v for k, v in state["model"].items()},
            **{f"objectives.{k}": v for k, v in state.get("objectives", {}).items()}}


def assert_same(a, b):
    wa, wb = weights_and_state(a), weights_and_state(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def straight(domains, tmp_path_factory):
    root = tmp_path_factory.mktemp("spcl_straight") / "run"
    run_pipeline(tiny("digits_spcl", domains, root), progress=False)
    return root


def test_four_stages_hand_over_final_weights_and_the_passes_feed_the_next_stage(straight):
    stages = {name: yaml.safe_load((straight / name / "config.yaml").read_text())
              for name in ("warmup", "contrast", "selftrain")}
    assert stages["contrast"]["model"]["init_from"] == str(straight / "warmup" / "final.pt")
    assert stages["selftrain"]["model"]["init_from"] == str(straight / "contrast" / "final.pt")
    assert stages["contrast"]["data"]["target"]["pseudo_labels"] == str(straight / "pseudo_warmup")
    assert stages["selftrain"]["data"]["target"]["pseudo_labels"] == str(straight / "pseudo_contrast")
    assert [s["method"]["spcl"]["stage"] for s in stages.values()] == ["warmup", "contrast", "selftrain"]
    warmup = load_checkpoint(straight / "warmup" / "latest.pt")
    assert "spcl_adversarial.discriminator" in warmup["owned_optimizers"]
    assert any(k.startswith("1.discriminator.") for k in warmup["objectives"])
    # stage C saves its prototypes, which moved away from the B1 initialisation
    initial = torch.load(straight / "prototypes" / "prototypes.pt", weights_only=True)["prototypes"]
    final = load_checkpoint(straight / "contrast" / "final.pt")["objectives"]["1.memory.prototypes"]
    assert initial.shape == final.shape == (3, CHANNELS) and not torch.equal(initial, final)
    metrics = [json.loads(line) for line in (straight / "contrast" / "metrics.jsonl").read_text().splitlines()]
    assert any("target.cl_target" in m and "source.cl_source" in m for m in metrics)
    selftrain = [json.loads(line) for line in (straight / "selftrain" / "metrics.jsonl").read_text().splitlines()]
    assert any("target.ssl_ce" in m for m in selftrain) and not any("source.ce" in m for m in selftrain)


def _model_of(path, domains, tmp_path):
    """The segmentor of ``path`` as the offline passes build it."""
    cfg = tiny("digits_spcl", domains, tmp_path / "probe")
    stage_cfg = build_stages(cfg)[0].cfg
    spec = offline.PassConfig(name="probe", model="student")
    model = offline.load_pass_model(offline.PassContext(spec, stage_cfg, stage_cfg, path, tmp_path / "probe"))
    return model, stage_cfg


def test_prototype_pass_matches_per_image_means_over_correctly_predicted_pixels(straight, domains, tmp_path):
    model, cfg = _model_of(straight / "warmup" / "final.pt", domains, tmp_path)
    from udaseg.data import build_dataset

    dataset = build_dataset(cfg.data.source, cfg.data.mean, cfg.data.std)
    sums, images, label_sums, label_counts = torch.zeros(3, CHANNELS), torch.zeros(3), torch.zeros(3, CHANNELS), torch.zeros(3)
    for i in range(len(dataset)):
        item = dataset[i]
        with torch.no_grad():
            out = model(item["image"][None], taps=("enc_last",))
        features = F.normalize(out.features["enc_last"], dim=1)[0]
        h, w = features.shape[-2:]
        label = item["label"][:: SIZE // h, :: SIZE // w]  # legacy nearest: top-left pixel of each cell
        prediction = out.logits[0].argmax(0)
        for k in range(3):
            correct = (label == k) & (prediction == k)
            if correct.any():
                sums[k] += features[:, correct].mean(dim=1)
                images[k] += 1
            if (label == k).any():
                label_sums[k] += features[:, label == k].sum(dim=1)
                label_counts[k] += int((label == k).sum())
    expected = torch.where(images[:, None] > 0, sums / images.clamp_min(1)[:, None],
                           label_sums / label_counts.clamp_min(1)[:, None])  # fallback: labels only
    stored = torch.load(straight / "prototypes" / "prototypes.pt", weights_only=True)
    torch.testing.assert_close(stored["prototypes"], expected, rtol=1e-4, atol=1e-5)


def test_pseudo_label_pass_applies_per_class_median_thresholds_and_pngs_round_trip(straight, domains, tmp_path):
    model, cfg = _model_of(straight / "warmup" / "final.pt", domains, tmp_path)
    from udaseg.adapt.thresholds import exact_class_thresholds
    from udaseg.data import build_dataset

    dataset = build_dataset(cfg.data.target, cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        logits = [model(dataset[i]["image"][None]).logits for i in range(len(dataset))]
    probs = [F.softmax(F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False), 1) for x in logits]
    confidence, labels = torch.cat(probs).max(dim=1)
    expected = exact_class_thresholds(confidence, labels, 3, 0.5, 0.9)
    stored = torch.tensor(json.loads((straight / "pseudo_warmup" / "thresholds.json").read_text())["thresholds"])
    assert torch.all(stored <= expected + 1e-6) and torch.all(expected - stored <= 1e-4 + 1e-6)
    for i in range(len(dataset)):
        png = np.asarray(Image.open(offline.label_file(straight / "pseudo_warmup", SAMPLE.format(i))))
        keep = confidence[i] >= stored[labels[i]]
        ref = torch.where(keep, labels[i], 255).numpy().astype(np.uint8)
        assert np.array_equal(png, ref)
    # the stage-C stream reads exactly these labels back
    contrast_cfg = build_stages(tiny("digits_spcl", domains, straight))[1].cfg
    reader = offline.PseudoLabelledDataset(build_dataset(contrast_cfg.data.target, cfg.data.mean, cfg.data.std),
                                           straight / "pseudo_warmup")
    for i in range(len(dataset)):
        png = np.asarray(Image.open(offline.label_file(straight / "pseudo_warmup", SAMPLE.format(i))))
        assert np.array_equal(reader[i]["label"].numpy(), png)


def test_pipeline_resumed_in_the_middle_of_stage_c_is_bit_exact(straight, domains, tmp_path, monkeypatch):
    cfg = tiny("digits_spcl", domains, tmp_path / "resumed")
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    original = Trainer.train_iteration

    def stop_in_stage_c(self, it):
        if it == 3 and self.cfg.method.spcl.stage == "contrast":
            raise KeyboardInterrupt
        return original(self, it)

    monkeypatch.setattr(Trainer, "train_iteration", stop_in_stage_c)
    assert main(["train", "--config", str(config_file)]) == 130
    root = tmp_path / "resumed"
    assert load_checkpoint(root / "contrast" / "latest.pt")["iteration"] == 2
    assert not (root / "contrast" / "final.pt").exists()
    monkeypatch.setattr(Trainer, "train_iteration", original)
    assert main(["train", "--config", str(config_file), "--resume"]) == 0
    for stage in ("warmup", "contrast", "selftrain"):
        assert_same(root / stage / "final.pt", straight / stage / "final.pt")


def _contrast_config(domains, tmp_path, extra=()):
    prototypes = tmp_path / "prototypes.pt"
    if not prototypes.exists():
        torch.save({"prototypes": torch.rand(3, CHANNELS)}, prototypes)
    return tiny("digits_source_only", domains, tmp_path / "run", iterations=2,
                extra=["method.name=spcl", "method.spcl.stage=contrast", f"method.spcl.prototypes={prototypes}",
                       *extra])


def test_missing_or_mismatched_pseudo_label_folders_name_the_first_missing_file(domains, tmp_path):
    with pytest.raises(UserError, match="data.target.pseudo_labels"):
        Trainer(_contrast_config(domains, tmp_path), progress=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=r"offline pseudo-label file not found: .*nowhere/labels/images/train/000\.png"):
        Trainer(_contrast_config(domains, tmp_path, [f"data.target.pseudo_labels={missing}"]), progress=False)
    other = tmp_path / "other"  # labels of another split: 000 and 001 only, under other names
    (other / "labels" / "images" / "train").mkdir(parents=True)
    for name in ("000", "001", "x"):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(other / "labels" / "images" / "train" / f"{name}.png")
    with pytest.raises(UserError, match=r"offline pseudo-label file not found: .*other/labels/images/train/002\.png"):
        Trainer(_contrast_config(domains, tmp_path, [f"data.target.pseudo_labels={other}"]), progress=False)


def test_bad_prototype_files_and_pass_options_are_one_line_errors(domains, tmp_path):
    folder = tmp_path / "pseudo"
    with pytest.raises(UserError, match=r"method\.spcl\.prototypes': prototype file not found: .*absent\.pt"):
        Trainer(_contrast_config(domains, tmp_path, [f"method.spcl.prototypes={tmp_path / 'absent.pt'}",
                                                     f"data.target.pseudo_labels={folder}"]), progress=False)
    torch.save({"prototypes": torch.rand(4, 7)}, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"holds prototypes of shape \(4, 7\), the model needs \(3, 32\)"):
        Trainer(_contrast_config(domains, tmp_path, [f"method.spcl.prototypes={tmp_path / 'wrong.pt'}",
                                                     f"data.target.pseudo_labels={folder}"]), progress=False)
    cfg = tiny("digits_spcl", domains, tmp_path / "bad")
    cfg.stages[1].before[1].options["threshold"] = "class_quantile"
    with pytest.raises(UserError, match="stage 'contrast': offline pass 'pseudo_warmup': unknown option 'threshold'; "
                                        "did you mean 'thresholds'"):
        build_stages(cfg)
    cfg.stages[1].before[1].options = {"thresholds": "median"}
    context = offline.PassContext(cfg.stages[1].before[1], cfg, cfg, tmp_path, tmp_path)
    with pytest.raises(UserError, match="option 'thresholds' must be one of fixed, class_quantile, got 'median'"):
        offline.pseudo_label_pass(context)
