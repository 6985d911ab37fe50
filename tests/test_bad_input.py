"""Bad input through the command line: one line naming the file, key or value, exit status 2, and no
file of an existing run folder changed (most cases pass --overwrite, so the old run is at risk)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from udaseg.cli import main
from udaseg.config import to_dict

from .engine.conftest import make_folder_dataset, tiny_config


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    source = make_folder_dataset(base / "source", 0, seed=1)
    target = make_folder_dataset(base / "target", 90, seed=2)
    cfg = tiny_config("digits_dacs", source, target, base / "run", iterations=2)
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["train", "--config", str(config)]) == 0

    label_size = _copy(source, base / "label_size")  # one label is 32x24, its image 32x32
    label = np.asarray(Image.open(label_size / "labels" / "train" / "000.png"))
    Image.fromarray(label[:24]).save(label_size / "labels" / "train" / "000.png")
    mixed = _copy(source, base / "mixed_sizes")  # one image and its label are 40x32
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(mixed / "images" / "train" / "002.png")
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(mixed / "labels" / "train" / "002.png")
    values = _copy(source, base / "bad_values")  # label value 7 with a 3-class list
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(values / "labels" / "train" / "000.png")
    corrupt = _copy(source, base / "corrupt")
    (corrupt / "images" / "train" / "000.png").write_bytes(b"not a png")
    no_classes = _copy(source, base / "no_classes")
    (no_classes / "classes.yaml").unlink()

    torch.save({"something.else.weight": torch.zeros(3, 3)}, base / "wrong.pth")
    torch.save({"patch_embed1.proj.weight": torch.zeros(7, 3, 7, 7), "block1.0.attn.q.weight": torch.zeros(5, 5)},
               base / "mit.pth")
    (base / "broken.pt").write_bytes(b"\x00garbage")
    (base / "bad.yaml").write_text("train: {iterations: [1,\n")
    (base / "list.yaml").write_text("- 1\n- 2\n")
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1)}}, base / "release.pth")
    blocker = base / "a_file"
    blocker.write_text("x")
    return {"base": base, "run": base / "run", "config": config, "source": source, "target": target,
            "label_size": label_size, "mixed": mixed, "values": values, "corrupt": corrupt,
            "no_classes": no_classes, "blocker": blocker}


def train(*extra):
    return lambda w: ["train", "--config", str(w["config"]), "--overwrite", *[e.format(**w) for e in extra]]


def command(*argv):
    return lambda w: [a.format(**w) for a in argv]


CUDA = torch.cuda.is_available()

CASES = [
    # values of the config
    ("batch_size_zero", train("data.batch_size=0"), ["data.batch_size", "0"]),
    ("batch_size_negative", train("data.batch_size=-2"), ["data.batch_size", "-2"]),
    ("checkpoint_interval_zero", train("train.checkpoint_interval=0"), ["train.checkpoint_interval"]),
    ("eval_interval_zero", train("train.eval_interval=0"), ["train.eval_interval"]),
    ("log_interval_zero", train("train.log_interval=0"), ["train.log_interval"]),
    ("iterations_zero", train("train.iterations=0"), ["train.iterations"]),
    ("keep_last_zero", train("train.keep_last=0"), ["train.keep_last"]),
    ("workers_negative", train("data.workers=-1"), ["data.workers", "-1"]),
    ("lr_nan", train("optim.lr=.nan"), ["optim.lr", "nan"]),
    ("lr_inf", train("optim.lr=.inf"), ["optim.lr", "inf"]),
    ("lr_negative", train("optim.lr=-0.1"), ["optim.lr", "-0.1"]),
    ("momentum_above_one", train("optim.momentum=1.5"), ["optim.momentum", "1.5"]),
    ("betas_one_value", train("optim.betas=[0.9]"), ["optim.betas"]),
    ("warmup_negative", train("optim.warmup_iters=-5"), ["optim.warmup_iters"]),
    ("device_unknown", train("train.device=gpu"), ["train.device", "gpu"]),
    pytest.param("device_cuda_without_cuda", train("train.device=cuda"), ["train.device=cuda", "CUDA"],
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA, so the value is valid"),
                 id="device_cuda_without_cuda"),
    ("num_classes_zero", train("model.num_classes=0"), ["model.num_classes"]),
    ("mean_two_values", train("data.mean=[1,2]"), ["data.mean"]),
    ("std_zero", train("data.std=[1,0,1]"), ["data.std"]),
    ("ema_alpha_above_one", train("method.self_training.ema_alpha=1.5"), ["ema_alpha", "1.5"]),
    ("blur_sigma_reversed", train("method.self_training.blur_sigma=[1.0,0.5]"), ["blur_sigma"]),
    ("slide_without_window", train("eval.mode=slide"), ["eval.mode", "crop_size"]),
    ("crop_size_zero", train("data.source.crop_size=[0,8]"), ["data.source.crop_size"]),
    ("cat_max_ratio_zero", train("data.source.cat_max_ratio=0"), ["data.source.cat_max_ratio"]),
    ("rcs_temperature_zero", train("data.source.rcs.temperature=0"), ["data.source.rcs.temperature"]),
    ("normalization_mixed", train("data.source.normalization=fixed"), ["data.target.normalization", "per_image"]),
    ("resized_cache_without_resize", train("data.source.resized_cache=/tmp/cache"), ["data.source.resized_cache", "needs a resize"]),
    ("resized_cache_with_margins", train("data.target.resized_cache=/tmp/cache", "data.target.resize=[64,64]", "data.target.pseudo_margins=[1,1,1,1]"), ["data.target.resized_cache", "pseudo_margins"]),
    ("unknown_key", train("optim.lrr=1"), ["optim.lrr", "did you mean 'optim.lr'"]),
    ("unknown_method", train("method.name=dacss"), ["method.name", "dacss"]),
    ("int_expected", train("train.iterations=abc"), ["train.iterations", "abc"]),
    ("fd_without_thing_classes", train("method.name=daformer", "method.self_training.feature_distance.enabled=true",
                                       "method.self_training.feature_distance.classes=null"),
     ["feature_distance.classes", "3-class"]),
    ("fd_class_outside_the_model", train("method.name=daformer", "method.self_training.feature_distance.enabled=true",
                                         "method.self_training.feature_distance.classes=[6,7,11]"),
     ["feature_distance.classes", "[6, 7, 11]"]),
    # files
    ("unknown_preset", command("train", "--config", "daformer_mitb5_gta2c"), ["daformer_mitb5_gta2c", "did you mean"]),
    ("config_file_missing", command("train", "--config", "{base}/missing.yaml"), ["missing.yaml"]),
    ("config_not_yaml", command("train", "--config", "{base}/bad.yaml"), ["bad.yaml", "line"]),
    ("config_not_a_mapping", command("train", "--config", "{base}/list.yaml"), ["list.yaml", "mapping"]),
    ("pretrained_unknown_format", train("model.pretrained={base}/wrong.pth"), ["model.pretrained", "wrong.pth"]),
    ("pretrained_other_architecture", train("model.pretrained={base}/mit.pth"),
     ["model.pretrained", "mit.pth", "does not fit", "0 of"]),
    ("pretrained_missing", train("model.pretrained={base}/none.pth"), ["none.pth"]),
    # data
    ("root_missing", train("data.source.root=/nonexistent/source"), ["/nonexistent/source"]),
    ("class_file_missing", train("data.source.root={no_classes}"), ["classes.yaml"]),
    ("more_classes_than_listed", train("model.num_classes=11"), ["model.num_classes=11", "classes.yaml", "3 classes"]),
    ("fewer_classes_than_labels", train("model.num_classes=2"), ["model.num_classes=2", "classes.yaml", "3 classes"]),
    ("label_size_differs", train("data.source.root={label_size}"), ["000.png", "32x24", "32x32"]),
    ("images_of_different_sizes", train("data.source.root={mixed}"), ["different sizes", "002.png", "40x32", "crop_size"]),
    ("label_value_outside_classes", train("data.source.root={values}"), ["000.png", "7"]),
    ("corrupt_image", train("data.source.root={corrupt}"), ["000.png"]),
    ("batch_larger_than_dataset", train("data.batch_size=16"), ["data.batch_size=16", "4 images"]),
    # the run folder and resuming
    ("fresh_run_into_used_folder", command("train", "--config", "{config}"), ["{run}", "--resume", "--overwrite"]),
    ("resume_and_overwrite", command("train", "--config", "{config}", "--resume", "--overwrite"), ["--resume", "--overwrite"]),
    ("resume_with_other_iterations", command("train", "--config", "{config}", "--resume", "train.iterations=8"),
     ["planned for 2 iterations", "train.iterations=8"]),
    ("resume_missing_checkpoint", command("train", "--config", "{config}", "--resume", "{base}/nope.pt"), ["nope.pt"]),
    ("resume_broken_checkpoint", command("train", "--config", "{config}", "--resume", "{base}/broken.pt"),
     ["broken.pt", "cannot read"]),
    ("resume_other_architecture", command("train", "--config", "{config}", "--resume", "{run}/latest.pt",
                                          "model.name=deeplabv2_tiny"), ["daformer_tiny", "deeplabv2_tiny"]),
    ("resume_without_config", command("train", "--resume"), ["--resume", "--config"]),
    ("work_dir_is_a_file", train("train.work_dir={blocker}"), ["a_file"]),
    # eval / predict
    ("eval_missing_checkpoint", command("eval", "--checkpoint", "{base}/none.pt"), ["none.pt"]),
    ("eval_on_a_dataset_with_other_classes", command("eval", "--checkpoint", "{run}/latest.pt",
                                                     "data.val=[{{name: digits-photo, split: val}}]"),
     ["model.num_classes=3", "data.val[0]", "11 classes"]),
    ("predict_into_a_file", command("predict", "--checkpoint", "{run}/latest.pt", "--input", "{target}/images/val",
                                    "--out", "{blocker}/out"), ["a_file", "not writable"]),
    ("eval_release_without_config", command("eval", "--checkpoint", "{base}/release.pth"), ["release.pth", "--config"]),
    ("eval_release_that_does_not_fit", command("eval", "--checkpoint", "{base}/release.pth", "--config", "{config}"),
     ["release.pth", "does not fit"]),
    ("predict_missing_input", command("predict", "--checkpoint", "{run}/latest.pt", "--input", "{base}/nothing",
                                      "--out", "{base}/pred"), ["nothing"]),
    ("prepare_unknown_dataset", command("prepare", "cityscape", "--root", "{base}"), ["cityscape"]),
]


CASES = [case if hasattr(case, "marks") else pytest.param(*case, id=case[0]) for case in CASES]


@pytest.mark.parametrize("name, argv, expected", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, argv, expected, world, capsys):
    before = snapshot(world["run"])
    status = main(argv(world))
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    import os
    if os.environ.get("SHOW_MESSAGES"):
        print(f"\n[{name}] {err}")
    lines = err.splitlines()
    assert len(lines) == 1, err
    for text in expected:
        assert text.format(**world) in lines[0], lines[0]
    assert snapshot(world["run"]) == before
