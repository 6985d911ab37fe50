"""The demo and the digits benchmark, shortened: every report file, the table, resumability."""

import json

import pytest

from udaseg.cli import main

TINY = ["--digits-size", "24", "6"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits-cache"))


def test_short_demo_writes_every_report_file(data_root, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--iterations", "3", "--out", str(out), "--data-root", data_root, *TINY]) == 0
    for name in ("predictions.png", "per_class_iou.png", "training_curves.png", "index.md", "index.html",
                 "results.json"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "source only" in printed and "gain" in printed and "mIoU" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["classes"]) == 11 and len(results["adapted"]["iou"]) == 11
    assert "predictions.png" in (out / "index.html").read_text()


def test_bench_writes_table_and_reuses_finished_runs(data_root, tmp_path, capsys):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nkept text\n")
    argv = ["bench", "digits", "--seeds", "0", "1", "--iterations", "2", "--domains", "digits-photo",
            "--methods", "digits_source_only", "digits_target_oracle", "digits_dacs", "--out", str(tmp_path / "b"),
            "--report", str(report), "--data-root", data_root, *TINY]
    assert main(argv) == 0
    text = report.read_text()
    assert "kept text" in text and "<!-- digits_quality:start -->" in text
    rows = [line for line in text.splitlines() if line.startswith("| dacs ")]
    assert len(rows) == 2 and "±" in rows[0]  # the main table and the per-class table
    assert "Per-class IoU (%) on digits-photo" in text and "| digits |" in text
    assert len(rows[1].split("|")) == 2 + 11 + 1 + 1  # method, 11 classes, the digit-class mean
    assert (tmp_path / "images" / "curves_digits-photo.png").stat().st_size > 0
    assert "images/curves_digits-photo.png" in text
    assert any(line.startswith("| source_only ") for line in text.splitlines())
    assert any(line.startswith("| target_oracle ") for line in text.splitlines())
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("result.json")}
    assert len(first) == 6
    capsys.readouterr()
    assert main(argv) == 0  # every run is finished: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("result.json")} == first
    collect = [a if a != "1" else "2" for a in argv] + ["--collect"]  # seed 2 has not run: left out
    assert main(collect) == 0
    assert "collecting 3 of 6 finished runs" in capsys.readouterr().out


def test_bench_unknown_method_is_a_clear_error(capsys):
    assert main(["bench", "digits", "--methods", "digits_dacss"]) == 2
    assert "digits_dacss" in capsys.readouterr().err


def test_table_marks_missing_seeds_and_computes_the_gap():
    from udaseg.bench import format_table

    scores = {("d", "digits_source_only"): [0.10, 0.12, 0.14], ("d", "digits_target_oracle"): [0.60, 0.62, 0.64],
              ("d", "digits_dacs"): [0.30, 0.40], ("d", "digits_t2sda"): [0.37]}
    table = format_table(scores, ["d"], ["digits_source_only", "digits_target_oracle", "digits_dacs",
                                         "digits_t2sda", "digits_sepico_bankcl"], [0, 1, 2], None,
                         {("d", "digits_dacs"): [0.2, 0.3]})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 12.0 ± 2.0 | – |" in rows["source_only"]
    assert "35.0 ± 7.1 (2 seeds) [teacher 25.0] | 46% |" in rows["dacs"]  # (35 - 12) / (62 - 12)
    assert "37.0 (1 seed) | 50% |" in rows["t2sda"]
    assert rows["sepico_bankcl"].endswith("| – | – |")


def test_stored_settings_match_with_keys_added_to_the_schema_since():
    import copy

    from udaseg.config import load_config, to_dict
    from udaseg.experiments import same_settings

    cfg = load_config("digits_dacs")
    stored = copy.deepcopy(to_dict(cfg))
    del stored["data"]["source"]["pseudo_margins"]  # written before the key existed: its default
    assert same_settings(stored, cfg)
    stored["data"]["source"]["pseudo_margins"] = [1, 1, 1, 1]
    assert not same_settings(stored, cfg)
    assert not same_settings({**to_dict(cfg), "retired_key": 1}, cfg)
    assert not same_settings(None, cfg)
