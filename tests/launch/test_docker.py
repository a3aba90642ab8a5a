"""docker/Dockerfile, checked without a docker engine: instructions parse, the base image's CUDA matches
the pinned torch build, the package installs under constraints.txt, and `posttrain` is the entrypoint."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    parsed, pending = [], ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):  # comment lines inside a continuation are dropped
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        assert keyword.upper() == keyword and keyword in INSTRUCTIONS, f"{path}:{number}: unknown instruction {keyword}"
        parsed.append((keyword, " ".join(arguments.split())))
        pending = ""
    assert not pending, f"{path}: ends inside a continuation line"
    return parsed


def test_dockerfile():
    parsed = instructions(REPO / "docker" / "Dockerfile")
    args = {k: v for k, v in (a.split("=", 1) for kw, a in parsed if kw == "ARG")}
    froms = [a for kw, a in parsed if kw == "FROM"]
    assert len(froms) == 1 and parsed[[kw for kw, _ in parsed].index("FROM") - 1][0] == "ARG"
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?(devel|runtime)-ubuntu(\d+\.\d+)", base)
    assert match, base
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split())
    assert pins["torch"] == "2.11.0" and pins["cuda-toolkit"].split(".")[:2] == list(match.groups()[:2])
    assert match.group(4) == "24.04"  # Python 3.12, inside pyproject's requires-python
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"] == ">=3.11"

    copies = [a for kw, a in parsed if kw == "COPY"]
    runs = [a for kw, a in parsed if kw == "RUN"]
    assert any(c.split()[0] == "constraints.txt" for c in copies)
    for source in (c.split()[0] for c in copies):
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    install = [r for r in runs if re.search(r"pip install -c constraints\.txt \.( |$)", r)]
    assert install, "the package is not installed with the constraints file"
    apt = " ".join(r for r in runs if "apt-get install" in r)
    for package in ("ffmpeg", "libsndfile1", "python3-venv"):
        assert package in apt.split()
    assert json.loads(next(a for kw, a in parsed if kw == "ENTRYPOINT")) == ["posttrain"]
    env = " ".join(a for kw, a in parsed if kw == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env  # the venv's `posttrain` is the one found


def test_parser_rejects_a_broken_dockerfile(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM ubuntu:24.04\nRUN apt-get update \\\n    && true\nCOPPY . /src\n")
    with pytest.raises(AssertionError, match="Dockerfile:4: unknown instruction COPPY"):
        instructions(broken)
