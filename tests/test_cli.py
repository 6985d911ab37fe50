import subprocess
import sys

import pytest

from udaseg.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: udaseg " + command in capsys.readouterr().out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "udaseg.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "prepare" in out.stdout
