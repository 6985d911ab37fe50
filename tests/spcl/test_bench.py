"""The digits benchmark runs SPCL's pipeline preset: a row per stage, finished stages reused."""

from udaseg.cli import main


def test_bench_reports_each_stage_of_the_pipeline_and_reuses_finished_runs(tmp_path, capsys):
    report = tmp_path / "BENCHMARKS.md"
    argv = ["bench", "digits", "--seeds", "0", "--iterations", "2", "--domains", "digits-photo", "--methods",
            "digits_spcl", "--out", str(tmp_path / "b"), "--report", str(report), "--data-root",
            str(tmp_path / "digits"), "--digits-size", "12", "4"]
    assert main(argv) == 0
    rows = [line.split("|")[1].strip() for line in report.read_text().splitlines() if line.startswith("| spcl")]
    assert rows[:3] == ["spcl:warmup", "spcl:contrast", "spcl"]  # the main table; then the per-class table
    root = tmp_path / "b" / "digits-photo" / "runs" / "digits_spcl-s0"
    results = sorted(p.relative_to(root).as_posix() for p in root.rglob("result.json"))
    assert results == ["contrast/result.json", "result.json", "selftrain/result.json", "warmup/result.json"]
    first = {p: p.stat().st_mtime_ns for p in root.rglob("*.pt")}
    capsys.readouterr()
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.pt")} == first
