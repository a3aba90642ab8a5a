"""The rule of fast answers, for every command: ``--help`` and a missing input answer without loading
torch or transformers (the command's heavy imports come after its cheap checks), a missing input exits 2
with one line naming it. Run in a fresh interpreter per command (what a user starts). The times are in
``python -m posttrain.bench cli``, not here."""

from __future__ import annotations

import pytest

from posttrain.bench.cli import MISSING, missing_input, probe
from posttrain.cli import COMMANDS


def test_every_command_has_a_missing_input_case(tmp_path):
    assert set(missing_input(str(tmp_path))) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_and_a_missing_input_answer_without_torch(command, tmp_path):
    helped = probe([*command.split(), "--help"])
    assert helped["code"] == 0 and helped["heavy"] == [], (helped["heavy"], helped["stderr"][-500:])
    missing = probe([*command.split(), *missing_input(str(tmp_path))[command]])
    assert missing["code"] == 2, missing["stderr"][-800:]
    assert missing["heavy"] == [], f"{command}: loaded {missing['heavy']} before refusing a missing input"
    errors = [line for line in missing["stderr"].splitlines() if line.startswith(f"posttrain {command}: error: ")]
    assert len(errors) == 1, missing["stderr"][-800:]
    assert MISSING in errors[0] or "nobody-posttrain/absent-release" in errors[0], errors[0]
    assert not list(tmp_path.iterdir()), "a refused command wrote its output"
