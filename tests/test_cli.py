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


def test_version_and_did_you_mean_in_one_line(capsys):
    from posttrain import __version__
    from posttrain.cli import main

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"posttrain {__version__}"
    assert main(["evl", "--model", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("posttrain: error: unknown command 'evl' (did you mean 'posttrain eval'?); posttrain --help "
                   "lists the commands")  # one line: no command table before it
    assert main(["shards", "biuld"]) == 2
    assert "did you mean 'posttrain shards build'?" in capsys.readouterr().err


def test_quiet_default_and_verbose_decide_what_reaches_the_console():
    """One logging set-up: posttrain's INFO shows by default, not with -q; a library's INFO/WARNING (here
    DeepSpeed's logger and transformers') only with -v."""
    script = ("import logging, sys\nfrom posttrain import console\n"
              "verbosity, rest = console.verbosity_requested(sys.argv[1:])\nconsole.configure(verbosity)\n"
              "logging.getLogger('posttrain.x').info('OURS-INFO')\nlogging.getLogger('posttrain.x').warning('OURS-WARN')\n"
              "logging.getLogger('DeepSpeed').warning('DS-WARN')\nlogging.getLogger('transformers.modeling').info('TF-INFO')\n"
              "logging.getLogger('mlflow.store').info('MLFLOW-INFO')\nlogging.getLogger('DeepSpeed').error('DS-ERROR')\n")
    seen = {}
    for flag in ("-q", "", "-v"):
        result = subprocess.run([sys.executable, "-c", script, *([flag] if flag else [])], capture_output=True,
                                text=True, timeout=60)
        seen[flag] = {word for word in ("OURS-INFO", "OURS-WARN", "DS-WARN", "TF-INFO", "MLFLOW-INFO", "DS-ERROR")
                      if word in result.stderr}
    assert seen["-q"] == {"OURS-WARN", "DS-ERROR"}
    assert seen[""] == {"OURS-INFO", "OURS-WARN", "DS-ERROR"}
    assert seen["-v"] == {"OURS-INFO", "OURS-WARN", "DS-WARN", "TF-INFO", "MLFLOW-INFO", "DS-ERROR"}
