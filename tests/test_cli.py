"""Every command of the CLI table exists, and its --help works (in a fresh process, as a user runs it)."""

import importlib
import subprocess
import sys

import pytest

from posttrain.cli import COMMANDS, resolve


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_module_has_configure_and_run(command):
    module = importlib.import_module(f"posttrain.commands.{COMMANDS[command][0]}")
    assert callable(module.configure) and callable(module.run)


def test_help_of_every_command_in_one_process():
    import argparse

    for command, (module_name, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"posttrain {command}")
        importlib.import_module(f"posttrain.commands.{module_name}").configure(parser)
        assert parser.format_help().startswith(f"usage: posttrain {command}")


@pytest.mark.parametrize("argv", [["--help"], ["shards", "build", "--help"], ["sharpness", "correlate", "--help"]])
def test_help_runs_as_a_user_would(argv):
    result = subprocess.run([sys.executable, "-m", "posttrain", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "posttrain" in result.stdout


def test_resolve_prefers_the_longest_command():
    assert resolve(["sharpness", "correlate", "--x"]) == ("sharpness correlate", ["--x"])
    assert resolve(["sharpness", "--model", "m"]) == ("sharpness", ["--model", "m"])
    assert resolve(["nope"]) == (None, ["nope"])


def test_unknown_command_fails():
    result = subprocess.run([sys.executable, "-m", "posttrain", "frobnicate"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown command" in result.stderr
