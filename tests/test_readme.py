"""The README's commands, taken as a user would run them top to bottom: every config file they name
exists, and every data path those configs (or the command's overrides) read is one an earlier README
command produces; the commands' defaults agree with the configs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from posttrain.config import FinetuneConfig, PosttrainConfig, apply_overrides, from_dict, load_yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("launch/local.sh", "launch/slurm_posttrain.sh", "launch/submit.py")


def readme_commands(text: str) -> list[list[str]]:
    """Every command of the ```bash blocks, in order: continuation lines joined, comments dropped,
    ``&&`` chains split, leading VAR=value assignments removed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                command = words[:end]
                while command and re.fullmatch(r"[A-Z_]+=\S*", command[0]):
                    command = command[1:]
                if command:
                    commands.append(command)
                words = words[end + 1:]
    return commands


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command[:-1] else None


def _overrides(command: list[str]) -> list[str]:
    return [word for word in command if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=.*", word)]


def _normal(path: str) -> str:
    return str(Path(path))


def config_of(command: list[str]) -> tuple[str, Path] | None:
    """(kind, config file) a training command reads: ``posttrain train/finetune``, finetune.py, a launcher."""
    if command[0] in LAUNCHERS or command[:2] == ["python", "launch/submit.py"]:
        words = [w for w in command[1:] if w != "launch/submit.py" and not w.startswith("-")]
        return "posttrain", REPO / "configs" / "posttrain" / f"{words[0]}.yaml"
    config = _option(command, "--config")
    if config is None:
        return None
    if "finetune.py" in command or command[:2] == ["posttrain", "finetune"]:
        return "finetune", REPO / config
    if command[:2] == ["posttrain", "train"]:
        return "posttrain", REPO / config
    return None


def run_folder(command: list[str], config: PosttrainConfig) -> str:
    """Where a training command writes (both SLURM launchers: runs/PRESET/JOB_NAME)."""
    if "launch/slurm_posttrain.sh" in command or "launch/submit.py" in command:
        preset = [w for w in command[1:] if w != "launch/submit.py" and not w.startswith("-")][0]
        return f"runs/{preset}/posttrain-{preset}"
    return config.output_dir


def test_readme_configs_exist_and_read_what_earlier_commands_produce():
    produced: set[str] = set()
    checked = 0
    for command in readme_commands((REPO / "README.md").read_text()):
        for word in command:  # every config file named anywhere
            if word.startswith("configs/") and word.endswith(".yaml"):
                assert (REPO / word).is_file(), f"README names {word}, which does not exist: {shlex.join(command)}"
        found = config_of(command)
        if found is not None:
            kind, path = found
            assert path.is_file(), f"{shlex.join(command)}: no config {path}"
            data = apply_overrides(load_yaml(path), _overrides(command))
            if kind == "posttrain":
                cfg = from_dict(PosttrainConfig, data)
                reads = [*cfg.data.train.shards, *cfg.data.valid.shards]
                produced.add(_normal(f"{run_folder(command, cfg)}/checkpoints"))
            else:
                cfg = from_dict(FinetuneConfig, data)
                reads = [cfg.finetune.df2024_dir]
                if "finetune.init_from" in " ".join(_overrides(command)):
                    reads.append(cfg.finetune.init_from)
                produced.add(_normal(f"{cfg.output_dir}/checkpoints"))
            for read in reads:
                if not Path(read).is_absolute():  # a user's own absolute path is theirs to know
                    assert _normal(read) in produced, (f"{shlex.join(command)}: reads {read}, which no earlier "
                                                       f"README command produces (produced: {sorted(produced)})")
            checked += 1
        out = _option(command, "--out")
        if out is not None and command[0] == "posttrain":
            produced.add(_normal(out))
    assert checked >= 6  # train, local, slurm (dry run and real), submitit, two fine-tunes


def test_command_defaults_agree_with_the_configs():
    import argparse

    from posttrain.commands import demo

    parser = argparse.ArgumentParser()
    demo.configure(parser)
    data_dir = parser.get_default("data_dir")
    config = yaml.safe_load((REPO / "configs" / "posttrain" / "demo.yaml").read_text())
    assert config["data"]["train"]["shards"] == [f"{data_dir}/shards/train"]
    assert config["data"]["valid"]["shards"] == [f"{data_dir}/shards/valid"]
    finetune_dirs = {yaml.safe_load(path.read_text())["finetune"]["df2024_dir"]
                     for path in (REPO / "configs" / "finetune").glob("*.yaml")}
    assert finetune_dirs == {"data/df2024"}
    for path in (REPO / "configs" / "posttrain").glob("*.yaml"):
        if path.stem != "demo":
            data = yaml.safe_load(path.read_text())["data"]
            shards = (data["train"]["shards"], data["valid"]["shards"])
            assert shards == (["data/shards/train"], ["data/shards/valid"]), path


def test_readme_documents_the_exit_codes_the_commands_use():
    from posttrain.cli import EPILOG
    from posttrain.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

    text = (REPO / "README.md").read_text()
    table = {code: meaning.strip() for code, meaning in re.findall(r"^\| (\d) \| ([^|]+?)[:|]", text, flags=re.M)}
    assert table == {str(EXIT_OK): "done", str(EXIT_FAILED): "the work failed",
                     str(EXIT_USAGE): "bad usage or input"}
    assert all(f"{code} {meaning}" in EPILOG for code, meaning in table.items())
