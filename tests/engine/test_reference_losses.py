"""The shipped methods follow their recorded trajectories exactly (see record_reference_losses.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).with_name("record_reference_losses.py")
_spec = importlib.util.spec_from_file_location("record_reference_losses", _SCRIPT)
recorder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recorder)

REFERENCE = json.loads(recorder.REFERENCE_FILE.read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return recorder.make_data(tmp_path_factory.mktemp("reference_data"))


def test_every_case_is_recorded():
    assert set(REFERENCE) == set(recorder.CASES)
    for case in REFERENCE.values():
        assert len(case["iterations"]) == recorder.ITERATIONS


@pytest.mark.parametrize("name", sorted(recorder.CASES))
def test_losses_equal_the_recorded_ones(name, data, tmp_path):
    threads = recorder.torch.get_num_threads()
    recorder.torch.set_num_threads(1)
    try:
        measured = recorder.record_case(name, data, tmp_path / name)
    finally:
        recorder.torch.set_num_threads(threads)
    expected = REFERENCE[name]
    for it, (got, want) in enumerate(zip(measured["iterations"], expected["iterations"])):
        assert got["losses"] == want["losses"], f"{name}: losses differ at iteration {it}"
        assert got["metrics"] == want["metrics"], f"{name}: metrics differ at iteration {it}"
    assert measured["student_param_sum"] == expected["student_param_sum"]
