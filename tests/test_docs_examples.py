"""The configs the guide shows load as written."""

import re
from pathlib import Path

from udaseg.config import load_config

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "GUIDE.md"


def test_folder_dataset_example_config_loads(tmp_path):
    text = GUIDE.read_text()
    example = re.search(r"```yaml\n(# mine2theirs\.yaml.*?)```", text, re.S).group(1)
    path = tmp_path / "mine2theirs.yaml"
    path.write_text(example)
    cfg = load_config(str(path))
    assert cfg.model.num_classes == 3 and cfg.data.source.name == "folder" and cfg.data.target.labelled is False
    assert cfg.method.name == "daformer" and cfg.method.self_training.feature_distance.classes == [2]
    assert cfg.train.work_dir == "runs/mine2theirs"
