"""The command line's error contract: exit codes, one-line messages, --debug, help defaults."""

import argparse
import os
import subprocess
import sys

import pytest

from posttrain.cli import COMMANDS, build_parser, main
from posttrain.config import ConfigError, load_config
from posttrain.errors import DEBUG_ENV, EXIT_FAILED, EXIT_USAGE, UserError, guarded, one_line


def test_a_group_without_its_subcommand_is_a_usage_error(capsys):
    assert main(["shards"]) == EXIT_USAGE
    assert "'shards' needs a subcommand" in capsys.readouterr().err
    assert main(["shards", "--help"]) == 0
    assert "posttrain shards build" in capsys.readouterr().out
    assert main([]) == EXIT_USAGE
    assert main(["shards", "frobnicate"]) == EXIT_USAGE
    assert "unknown command 'shards frobnicate'" in capsys.readouterr().err


def test_input_errors_exit_2_other_failures_exit_1_with_one_line(capsys):
    def raises(error):
        def body():
            raise error
        return body

    assert guarded("prog", raises(UserError("x.yaml: bad\n  thing")), debug=False) == EXIT_USAGE
    assert capsys.readouterr().err == "prog: error: x.yaml: bad thing\n"
    assert guarded("prog", raises(FileNotFoundError(2, "No such file or directory", "a/b.csv")), debug=False) == 2
    assert capsys.readouterr().err == "prog: error: a/b.csv: No such file or directory\n"
    assert guarded("prog", raises(ValueError("operands could not be broadcast")), debug=False) == EXIT_USAGE
    assert capsys.readouterr().err == ("prog: error: operands could not be broadcast [ValueError; --debug or "
                                       "POSTTRAIN_DEBUG=1 shows the traceback]\n")  # not ours: maybe a bug
    assert guarded("prog", raises(RuntimeError("disk on fire")), debug=False) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("prog: error: disk on fire [RuntimeError; --debug") and err.count("\n") == 1
    with pytest.raises(RuntimeError):
        guarded("prog", raises(RuntimeError("disk on fire")), debug=True)


def test_debug_flag_and_environment_show_the_traceback(tmp_path):
    argv = [sys.executable, "-m", "posttrain", "shards", "inspect", str(tmp_path / "absent")]
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == EXIT_USAGE and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith(f"posttrain shards inspect: error: {tmp_path / 'absent'}")
    loud = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr
    env = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                         env={**os.environ, DEBUG_ENV: "1"})
    assert "Traceback" in env.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    parser, _ = build_parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        name = f"posttrain {command} {action.option_strings[0]}"
        assert action.help, f"{name}: no help text"
        if action.required or action.default is None or action.default is False or action.default == []:
            continue  # nothing to show: required, an off flag, or a None the help text explains
        block = " ".join(formatter._format_action(action).split())
        assert "default" in block and str(action.default) in block, f"{name}: --help hides the default: {block}"


def test_config_error_blames_the_override_that_set_the_key(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  max_steps: 10\n")
    with pytest.raises(ConfigError, match=r"train.max_stpes: unknown key .*set on the command line by "
                                          r"'train.max_stpes=5'") as caught:
        load_config(preset, ["train.max_stpes=5"])
    assert str(preset) not in str(caught.value)
    with pytest.raises(ConfigError, match=r"trian: unknown key .*'trian.max_steps=5'"):
        load_config(preset, ["trian.max_steps=5"])
    preset.write_text("train:\n  max_stpes: 10\n")
    with pytest.raises(ConfigError, match=rf"train.max_stpes: unknown key .*\(in {preset}\)") as caught:
        load_config(preset, ["train.max_steps=5"])
    assert "command line" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(preset, ["data.train.shards=[a"])
    preset.write_text("train: [\n")
    with pytest.raises(ConfigError, match=rf"{preset}:\d+: not valid YAML"):
        load_config(preset)


def test_one_line_names_a_missing_key():
    assert one_line(KeyError("labels")) == "missing key 'labels'"


def test_an_exponent_without_a_dot_is_a_number_not_a_string():
    assert load_config(None, ["optim.lr=1e-6"]).optim.lr == 1e-6  # YAML 1.1 alone would read '1e-6'
    with pytest.raises(ConfigError, match=r"optim.lr: must be a number, got '1e-6x'"):
        load_config(None, ["optim.lr=1e-6x"])
