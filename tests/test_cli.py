"""The `chameleon-fusion` command."""

import subprocess
import sys

from chameleon_fusion.cli import main


def test_help_lists_the_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "chameleon_fusion", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: chameleon-fusion" in result.stdout
    assert "demo" in result.stdout


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 1
    assert "usage" in capsys.readouterr().out
