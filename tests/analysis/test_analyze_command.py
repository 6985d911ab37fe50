"""``udaseg analyze`` end to end on tiny checkpoints: every report file, every HTML link, the numbers,
and one-line errors for bad input."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

from udaseg.analysis.commands import select_indices
from udaseg.analysis.embeddings import labels_on_grid
from udaseg.cli import main
from udaseg.engine.checkpoint import load_checkpoint

from .conftest import make_domain

FIGURES = ["tsne.png", "iou.png", "ccd.png", "pdd.png", "similarity.png", "reliability.png"]


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src"):
                self.links.append(value)


@pytest.fixture(scope="module")
def report(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    argv = ["analyze", "--checkpoint", str(checkpoints["source_only"]), "--checkpoint", str(checkpoints["sepico"]),
            "--name", "source only", "--name", "SePiCo", "--out", str(out), "--per-class", "10",
            "--metric-pixels", "40", "--min-pixels", "5", "--perplexity", "5", "--no-progress"]
    assert main(argv) == 0
    return out


def test_every_report_file_is_written_and_listed(report):
    data = json.loads((report / "analysis.json").read_text())
    expected = set(FIGURES) | {"analysis.json", "report.html"}
    for slug in ("source_only", "SePiCo"):
        expected |= {f"confusion_{slug}.png", f"confusion_{slug}.json"}
    assert set(data["files"]) == expected
    for name in expected:
        assert (report / name).stat().st_size > 0, name
    for name in [f for f in expected if f.endswith(".png")]:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_html_link_resolves_and_nothing_is_external(report):
    html = (report / "report.html").read_text()
    parser = Links()
    parser.feed(html)
    local = [link for link in parser.links if not link.startswith("data:")]
    embedded = [link for link in parser.links if link.startswith("data:image/png;base64,")]
    assert len(embedded) == len(FIGURES) + 2  # every figure and both confusion matrices are inside the page
    assert set(local) >= {"analysis.json", *FIGURES, "confusion_SePiCo.json"}
    for link in local:
        assert not re.match(r"^[a-z]+://", link) and (report / link).is_file(), link


def test_report_numbers(report, checkpoints):
    data = json.loads((report / "analysis.json").read_text())
    assert [m["label"] for m in data["models"]] == ["source only", "SePiCo"]
    assert data["settings"]["target"] == {"dataset": "folder:val", "images": 4}
    for model in data["models"]:
        ev = model["target_eval"]
        counts = torch.tensor(ev["confusion_matrix"])
        assert counts.shape == (3, 3) and int(counts.sum()) == 4 * 32 * 32  # every val pixel is labelled
        assert ev["aacc"] == pytest.approx(float(counts.diagonal().sum() / counts.sum()))
        assert 0.0 <= ev["miou"] <= 1.0 and len(model["ccd"]["target"]) == 3
        assert model["sampled"]["target"] == [min(40, n) for n in model["pixels"]["target"]]
        assert all(v is None or -1.0 - 1e-9 <= v <= 1.0 + 1e-9 for v in model["similarity"])
        assert model["reliability"]["pixels"] == 4 * 32 * 32
        assert model["tsne"]["points"] == sum(min(10, n) for role in ("source", "target")
                                              for n in model["sampled"][role])
    so, sepico = data["models"]
    assert so["reliability"]["model"] == "student" and sepico["reliability"]["model"] == "teacher"
    confusion = json.loads((report / "confusion_SePiCo.json").read_text())
    assert confusion["counts"] == sepico["target_eval"]["confusion_matrix"]
    for row, counts in zip(confusion["normalised"], confusion["counts"]):
        assert sum(row) == pytest.approx(1.0) and row[0] == pytest.approx(counts[0] / sum(counts))


def test_analysis_matches_eval_and_projection_tap(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(checkpoints["sepico"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per class results:" in printed and "| aAcc" in printed and "| mAcc" in printed
    result = json.loads(out.read_text())["results"]["folder:val"]
    assert (tmp_path / "eval.folder_val.confusion.json").is_file()
    assert (tmp_path / "eval.folder_val.confusion.png").is_file()
    assert main(["analyze", "--checkpoint", str(checkpoints["sepico"]), "--out", str(tmp_path / "a"), "--tap",
                 "projection", "--no-tsne", "--no-progress"]) == 0
    entry = json.loads((tmp_path / "a" / "analysis.json").read_text())["models"][0]
    assert entry["target_eval"]["confusion_matrix"] == result["confusion_matrix"]
    assert entry["tap_channels"] == 8 and "proj_head" in entry["tap"]
    assert "tsne.png" not in json.loads((tmp_path / "a" / "analysis.json").read_text())["files"]


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_checkpoint_without_the_requested_tap(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints["source_only"])
    err = one_line_error(["analyze", "--checkpoint", ckpt, "--out", str(tmp_path), "--tap", "projection"], capsys)
    assert ckpt in err and "no projection head" in err and "decoder" in err
    err = one_line_error(["analyze", "--checkpoint", ckpt, "--out", str(tmp_path), "--tap", "enc9"], capsys)
    assert "no feature tap 'enc9'" in err
    err = one_line_error(["analyze", "--checkpoint", ckpt, "--out", str(tmp_path), "--teacher"], capsys)
    assert "holds no EMA teacher" in err
    assert not list(tmp_path.iterdir())  # nothing written before the inputs are checked


def test_target_without_labels(checkpoints, tmp_path, capsys):
    unlabelled = make_domain(tmp_path / "unlabelled", 50, seed=5, labels=False)
    cfg = load_checkpoint(checkpoints["source_only"])["config"]
    cfg["data"]["val"][0]["root"] = str(unlabelled)
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump(cfg))
    err = one_line_error(["analyze", "--checkpoint", str(checkpoints["source_only"]), "--out", str(tmp_path / "o"),
                          "--config", str(config)], capsys)
    assert "label" in err and str(unlabelled) in err
    err = one_line_error(["analyze", "--checkpoint", str(checkpoints["source_only"]), "--out", str(tmp_path / "o"),
                          "--target", "folder:val", "--target-root", str(unlabelled)], capsys)
    assert "labels" in err and str(unlabelled) in err


def test_too_few_pixels_of_a_requested_class(checkpoints, tmp_path, capsys):
    err = one_line_error(["analyze", "--checkpoint", str(checkpoints["source_only"]), "--out", str(tmp_path),
                          "--classes", "box", "bar", "--min-pixels", "1000", "--no-progress"], capsys)
    assert "class 'box'" in err and "--min-pixels 1000" in err


def test_too_few_pixels_without_class_list_warns_and_skips(checkpoints, tmp_path, capsys):
    # the bar covers 8 x 16 px = 2 x 4 cells at stride 4 per image: 32 target cells, box >= 9 x 4 = 36
    assert main(["analyze", "--checkpoint", str(checkpoints["source_only"]), "--out", str(tmp_path),
                 "--min-pixels", "34", "--per-class", "40", "--metric-pixels", "40", "--perplexity", "5",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "class 'bar'" in err and "left out" in err
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["warnings"] and 2 not in data["models"][0]["tsne"]["classes"]


def test_bad_numbers_and_classes(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints["source_only"])
    assert "--per-class" in one_line_error(["analyze", "--checkpoint", ckpt, "--out", str(tmp_path),
                                            "--per-class", "0"], capsys)
    assert "unknown class 'car'" in one_line_error(["analyze", "--checkpoint", ckpt, "--out", str(tmp_path),
                                                    "--classes", "car"], capsys)
    assert "2 --name values" in one_line_error(["analyze", "--checkpoint", ckpt, "--out", str(tmp_path),
                                                "--name", "a", "--name", "b"], capsys)
    assert "/missing.pt" in one_line_error(["analyze", "--checkpoint", "/missing.pt", "--out", str(tmp_path)], capsys)


def test_labels_on_grid_rules():
    label = torch.zeros(8, 8, dtype=torch.long)
    label[:4, :4] = 1
    label[:2, 4:] = 2  # half of the top-right cell: no class reaches 75%
    ratio = labels_on_grid(label, (2, 2), "ratio", 0.75, num_classes=3)
    assert ratio.tolist() == [[1, 255], [0, 0]]
    assert labels_on_grid(label, (2, 2), "nearest", num_classes=3).tolist() == [[1, 2], [0, 0]]
    # a label grid that is no integer multiple of the features falls back to nearest
    assert labels_on_grid(label, (3, 3), "ratio", num_classes=3).shape == (3, 3)


def test_select_indices_is_a_seeded_subset():
    assert select_indices(5, 10, 0) == [0, 1, 2, 3, 4]
    subset = select_indices(100, 10, 3)
    assert subset == sorted(subset) and len(set(subset)) == 10 and subset == select_indices(100, 10, 3)
    assert subset != select_indices(100, 10, 4)


def test_digits_analysis_section_is_built_from_the_report(report, tmp_path):
    import argparse
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "digits_analysis.py"
    spec = importlib.util.spec_from_file_location("digits_analysis", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = json.loads((report / "analysis.json").read_text())
    args = argparse.Namespace(iterations=600, seed=0, threads=1, analysis_minutes=1.25, analysis_cpu_minutes=1.0,
                              load_average=2.0, domain="digits-photo")
    text = module.markdown(data, "python benchmarks/digits_analysis.py --write docs/DIGITS.md", args, "images/x")
    assert "python benchmarks/digits_analysis.py --write docs/DIGITS.md" in text and "**600 iterations**" in text
    for model in data["models"]:
        assert f"| {model['label']} | {100 * model['target_eval']['miou']:.1f} |" in text
    for name in module.FIGURES:
        assert f"(images/x/{name})" in text
    page = tmp_path / "DIGITS.md"
    start, end = (f"<!-- digits_analysis_digits-photo:{edge} -->" for edge in ("start", "end"))
    page.write_text(f"# Digits\n\n{start}\nold\n{end}\n\ntail\n")
    from udaseg.bench import write_section

    write_section(page, module.marker("digits-photo"), text)
    assert "\nold\n" not in page.read_text() and page.read_text().endswith("tail\n")


def test_same_seed_same_report(report, checkpoints, tmp_path):
    argv = ["analyze", "--checkpoint", str(checkpoints["source_only"]), "--checkpoint", str(checkpoints["sepico"]),
            "--name", "source only", "--name", "SePiCo", "--out", str(tmp_path), "--per-class", "10",
            "--metric-pixels", "40", "--min-pixels", "5", "--perplexity", "5", "--no-progress"]
    assert main(argv) == 0
    for name in ("analysis.json", "tsne.png", "reliability.png"):
        assert (tmp_path / name).read_bytes() == (report / name).read_bytes(), name


def test_teacher_features_and_a_checkpoint_without_config(checkpoints, tmp_path, capsys):
    state = load_checkpoint(checkpoints["sepico"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(state.pop("config")))
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    common = ["--out", str(tmp_path / "a"), "--no-tsne", "--no-progress", "--teacher"]
    assert "holds no config; pass --config" in one_line_error(["analyze", "--checkpoint", str(bare), *common], capsys)
    assert main(["analyze", "--checkpoint", str(bare), "--config", str(config), *common]) == 0
    entry = json.loads((tmp_path / "a" / "analysis.json").read_text())["models"][0]
    assert entry["evaluated"] == "teacher" and entry["method"] == "sepico"
