"""Every command against bad input: the documented exit code, one line naming the culprit, no traceback,
and every file already in the output location still there (README, "Exit codes").

The table must hold a case for every command of the CLI (a new command without one fails
``test_every_command_has_a_bad_input_case``). Cases run in-process through ``posttrain.cli.main``;
``finetune.py`` runs as a user starts it, in a fresh process.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import torch

from posttrain.bench.hostile_audio import wav_with_rate
from posttrain.cli import COMMANDS, main
from posttrain.errors import EXIT_USAGE

REPO = Path(__file__).resolve().parents[2]
NOTE = "my notes: not posttrain's to delete\n"


@dataclasses.dataclass
class Inputs:
    """Bad (and a few good) inputs, made on demand in one folder."""

    root: Path
    export: Path  # a transformers export (tiny_export_dir)

    def path(self, name: str) -> Path:
        return self.root / name

    def occupied(self, name: str) -> Path:
        """An output folder that already holds a user's file."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "notes.txt").write_text(NOTE)
        return folder

    def audio_folder(self, name: str, files: int = 0) -> Path:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "readme.txt").write_text("no audio here\n")
        for i in range(files):
            sf.write(folder / f"{i}.wav", 0.1 * np.ones(1600, np.float32), 16000)
        return folder

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def unmerged_shards(self) -> Path:
        folder = self.root / "unmerged"
        folder.mkdir(exist_ok=True)
        (folder / "index.task-00000-of-00002.json").write_text("{}")
        return folder

    def legacy_pickle(self) -> Path:
        torch.save({"model": Legacy()}, self.root / "legacy.ckpt")
        return self.root / "legacy.ckpt"

    def config(self, text: str) -> Path:
        path = self.root / "config.yaml"
        path.write_text(text)
        return path

    def train_shards(self, make_corpus) -> Path:
        corpus = make_corpus("train", num_files=4)
        out = self.root / "train_shards"
        assert main(["shards", "build", "--protocol", str(corpus.protocol), "--root", str(corpus.root), "--out",
                     str(out), "--split", "train", "--no-progress"]) == 0
        return out

    def one_class_valid_shards(self, make_corpus) -> Path:
        from posttrain.data.protocol import read_protocol, write_protocol

        corpus = make_corpus("oneclass", num_files=4)
        rows = [dataclasses.replace(row, proportion="valid") for row in read_protocol(corpus.protocol)
                if row.label == "real"]
        write_protocol(rows, corpus.protocol)
        out = self.root / "valid_shards"
        assert main(["shards", "build", "--protocol", str(corpus.protocol), "--root", str(corpus.root), "--out",
                     str(out), "--split", "valid", "--no-progress"]) == 0
        return out


class Legacy:  # a class a pickle needs to import: what old training scripts saved
    pass


CORRUPT_SAFETENSORS = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header"


@dataclasses.dataclass
class Case:
    command: str
    name: str
    argv: Callable[..., list[str]]  # (inputs, make_corpus) -> argv after the command words
    code: int
    culprit: Callable[[Inputs], str]  # text the error line must contain
    out: str | None = None  # the folder under inputs.root that must keep its files


def _posttrain_config(inputs: Inputs, shards: str) -> str:
    return str(inputs.config(f"output_dir: {inputs.root / 'run'}\nmodel:\n  preset: tiny\n"
                             f"data:\n  train:\n    shards: [{shards}]\ntracking:\n  enabled: false\n"))


CASES = [
    Case("demo", "bad override", lambda i, m: ["--data-dir", str(i.path("demo")), "train.max_stpes=1"], EXIT_USAGE,
         lambda i: "train.max_stpes=1"),
    Case("data demo", "no klettres", lambda i, m: ["--out", str(i.occupied("demo_out")), "--klettres-dir",
                                                   str(i.path("no_klettres"))], EXIT_USAGE,
         lambda i: str(i.path("no_klettres")), out="demo_out"),
    Case("data prepare", "empty corpus folder", lambda i, m: ["ljspeech", "--root", str(i.audio_folder("empty")),
                                                              "--out", str(i.path("p.csv"))], EXIT_USAGE,
         lambda i: str(i.path("empty"))),
    Case("data deepvoice-segments", "missing log", lambda i, m: ["--log", str(i.path("no_log.txt")), "--root",
                                                                 str(i.path("dv"))], EXIT_USAGE,
         lambda i: str(i.path("no_log.txt"))),
    Case("data partialspoof", "missing protocol", lambda i, m: ["--protocol", str(i.path("test.csv")), "--out",
                                                                str(i.occupied("ps"))], EXIT_USAGE,
         lambda i: str(i.path("test.csv")), out="ps"),
    Case("data df2024", "missing metadata", lambda i, m: ["--metadata", str(i.path("meta.csv")), "--audio-dir",
                                                          str(i.path("a")), "--out", str(i.occupied("df"))],
         EXIT_USAGE, lambda i: str(i.path("meta.csv")), out="df"),
    Case("shards build", "missing protocol", lambda i, m: ["--protocol", str(i.path("none.csv")), "--out",
                                                           str(i.occupied("shards_out")), "--no-progress"],
         EXIT_USAGE, lambda i: str(i.path("none.csv")), out="shards_out"),
    Case("shards plan", "missing mix", lambda i, m: [str(i.path("mix.yaml")), "--root", str(i.root)], EXIT_USAGE,
         lambda i: str(i.path("mix.yaml"))),
    Case("plan", "typo in a config", lambda i, m: ["--config", str(i.config("train:\n  zero_stag: 2\n"))], EXIT_USAGE,
         lambda i: f"train.zero_stag: unknown key"),
    Case("shards inspect", "no such folder", lambda i, m: [str(i.path("nope"))], EXIT_USAGE,
         lambda i: f"{i.path('nope')}: no such shard folder"),
    Case("shards verify", "unmerged split build", lambda i, m: [str(i.unmerged_shards()), "--no-progress"],
         EXIT_USAGE, lambda i: f"posttrain shards merge {i.path('unmerged')}"),
    Case("shards merge", "no task indexes", lambda i, m: [str(i.audio_folder("not_shards"))], EXIT_USAGE,
         lambda i: str(i.path("not_shards"))),
    Case("stream", "folder without index", lambda i, m: ["--shards", str(i.audio_folder("loose"))], EXIT_USAGE,
         lambda i: f"{i.path('loose')}: no index.json"),
    Case("train", "typo in an override", lambda i, m: ["--config", _posttrain_config(i, "x"), "train.max_stpes=1"],
         EXIT_USAGE, lambda i: "set on the command line by 'train.max_stpes=1'"),
    Case("train", "missing shards", lambda i, m: ["--config", _posttrain_config(i, str(i.path("no_shards")))],
         EXIT_USAGE, lambda i: f"data.train.shards[0]: {i.path('no_shards')}: no such shard folder"),
    Case("train", "one-class validation set", lambda i, m: [
        "--config", _posttrain_config(i, str(i.train_shards(m))), "--preflight",
        f"data.valid.shards=[{i.one_class_valid_shards(m)}]"], EXIT_USAGE,
         lambda i: f"data.valid.shards[0]: {i.path('valid_shards')}: the validation set has no fake samples"),
    Case("train", "backbone not in the offline cache", lambda i, m: [
        "--config", _posttrain_config(i, str(i.train_shards(m))), "--preflight",
        "model.pretrained=nobody-t14b/absent-backbone"], EXIT_USAGE,
         lambda i: "model.pretrained: 'nobody-t14b/absent-backbone' is not in the Hugging Face cache"),
    Case("finetune", "missing config", lambda i, m: ["--config", str(i.path("ft.yaml"))], EXIT_USAGE,
         lambda i: str(i.path("ft.yaml"))),
    Case("finetune", "Deepfake-Eval-2024 not prepared", lambda i, m: [
        "--config", str(REPO / "configs" / "finetune" / "df2024.yaml"), f"finetune.df2024_dir={i.path('df')}",
        f"output_dir={i.path('ft_run')}"], EXIT_USAGE,
         lambda i: f"data.train.shards[0]: {i.path('df')}/shards/13s/train: no index.json (run `posttrain data df2024"),
    Case("eval", "missing protocol", lambda i, m: [
        "--model", str(i.file("model.safetensors", CORRUPT_SAFETENSORS)), "--protocol", str(i.path("p.csv")),
        "--out", str(i.occupied("eval_out"))], EXIT_USAGE, lambda i: str(i.path("p.csv")), out="eval_out"),
    Case("eval", "segments with whole-file scoring", lambda i, m: [
        "--model", str(i.export), "--protocol", str(m("ps", num_files=2).protocol), "--segments",
        str(i.path("ps.segments.csv")), "--window-seconds", "0", "--out", str(i.path("ps_out"))], EXIT_USAGE,
         lambda i: "--segments needs windowed scoring"),
    Case("eval", "segments with AntiDeepfake's protocol", lambda i, m: [
        "--model", str(i.export), "--protocol", str(m("ps2", num_files=2).protocol), "--segments",
        str(i.path("ps.segments.csv")), "--mode", "antideepfake", "--out", str(i.path("ps_out2"))], EXIT_USAGE,
         lambda i: "--segments needs windowed scoring"),
    Case("metrics", "missing score file", lambda i, m: [str(i.path("scores.csv")), "--out",
                                                        str(i.occupied("metrics_out"))], EXIT_USAGE,
         lambda i: str(i.path("scores.csv")), out="metrics_out"),
    Case("score", "folder without audio", lambda i, m: ["--model", str(i.export), str(i.audio_folder("quiet"))],
         EXIT_USAGE, lambda i: f"{i.path('quiet')}: no audio found"),
    Case("score", "missing file", lambda i, m: ["--model", str(i.export), str(i.audio_folder("some", files=1)),
                                                str(i.path("missing.wav"))],
         EXIT_USAGE, lambda i: f"{i.path('missing.wav')}: no such file"),
    Case("score", "sample rate out of range", lambda i, m: [
        "--model", str(i.export), str(i.file("evil.wav", wav_with_rate(2_147_483_647, 48)))], EXIT_USAGE,
         lambda i: f"{i.path('evil.wav')}: sample rate 2,147,483,647 Hz is outside"),
    Case("score", "corrupt safetensors", lambda i, m: [
        "--model", str(i.file("broken.safetensors", CORRUPT_SAFETENSORS)), str(i.audio_folder("some", files=1))],
         EXIT_USAGE, lambda i: f"{i.path('broken.safetensors')}: not a readable safetensors file"),
    Case("score", "model not in the offline cache", lambda i, m: [
        "--model", "nobody-t14b/absent-model", str(i.audio_folder("some", files=1))], EXIT_USAGE,
         lambda i: "hf download nobody-t14b/absent-model"),
    Case("sharpness", "missing shards", lambda i, m: [
        "--model", str(i.export), "--shards", str(i.path("no_shards")), "--out", str(i.occupied("sharp_out"))],
         EXIT_USAGE, lambda i: str(i.path("no_shards")), out="sharp_out"),
    Case("sharpness correlate", "too few steps", lambda i, m: [
        "--model", str(i.export), "--shards", str(i.path("no_shards")), "--steps", "2", "--out",
        str(i.occupied("corr_out"))], EXIT_USAGE, lambda i: "--steps", out="corr_out"),
    Case("embed", "missing shards", lambda i, m: [
        "--model", str(i.export), "--shards", str(i.path("no_shards")), "--out", str(i.occupied("emb_out"))],
         EXIT_USAGE, lambda i: str(i.path("no_shards")), out="emb_out"),
    Case("select nc", "missing embeddings", lambda i, m: [
        "--embeddings", str(i.path("no_emb")), "--protocol", str(i.path("p.csv")), "--out",
        str(i.occupied("sel_out"))], EXIT_USAGE, lambda i: str(i.path("p.csv")), out="sel_out"),
    Case("drift", "a reference folder without audio", lambda i, m: [
        "--reference", str(i.audio_folder("no_audio")), "--incoming", str(i.audio_folder("some_audio", files=2)),
        "--model", str(i.export), "--out", str(i.occupied("drift_out"))], EXIT_USAGE,
         lambda i: f"--reference {i.path('no_audio')}: no audio found", out="drift_out"),
    Case("publish", "output folder holds a user's file", lambda i, m: [
        "--checkpoint", str(i.export), "--out", str(i.occupied("pub_out"))], EXIT_USAGE,
         lambda i: f"{i.path('pub_out')}: not empty and not a posttrain export", out="pub_out"),
    Case("export", "output folder holds a user's file", lambda i, m: [
        str(i.export), "--format", "onnx", "--out", str(i.occupied("onnx_out"))], EXIT_USAGE,
         lambda i: f"{i.path('onnx_out')}: not empty and not a posttrain export", out="onnx_out"),
    Case("score", "onnxruntime backend given a transformers export", lambda i, m: [
        "--model", str(i.export), str(i.audio_folder("some", files=1)), "--backend", "onnxruntime"], EXIT_USAGE,
         lambda i: "not an ONNX export (no model.onnx)"),
    Case("hub convert", "already a transformers export", lambda i, m: [str(i.export), "--out", str(i.path("c"))],
         EXIT_USAGE, lambda i: "already a transformers export"),
    Case("hub convert", "legacy pickle", lambda i, m: [str(i.legacy_pickle()), "--out", str(i.path("conv"))],
         EXIT_USAGE, lambda i: f"{i.path('legacy.ckpt')}: a legacy pickle checkpoint"),
    Case("hub convert", "output folder holds a user's file", lambda i, m: [
        str(i.export), "--out", str(i.occupied("conv2"))], EXIT_USAGE,
         lambda i: f"{i.path('conv2')}: not empty and not a posttrain export", out="conv2"),
    Case("hub download", "not in the offline cache", lambda i, m: [
        "nobody-t14b/absent-release", "--out", str(i.path("dl"))], EXIT_USAGE,
         lambda i: "hf download nobody-t14b/absent-release"),
    Case("hub download", "output folder holds a user's file", lambda i, m: [
        "nobody-t14b/absent-release", "--out", str(i.occupied("dl2"))], EXIT_USAGE,
         lambda i: f"{i.path('dl2')}: not empty and not a posttrain export", out="dl2"),
    Case("serve", "public address without a token", lambda i, m: [str(i.export), "--host", "0.0.0.0"], EXIT_USAGE,
         lambda i: "serve.host: 0.0.0.0 is reachable beyond this machine and no token is configured"),
    Case("serve", "temp dir that cannot be made", lambda i, m: [
        str(i.export), "--temp-dir", str(i.file("a_file", b"x") / "sub")], EXIT_USAGE,
         lambda i: f"serve.temp_dir: {i.path('a_file')}/sub: cannot create it"),
    Case("serve", "a drift reference that is not embeddings", lambda i, m: [
        str(i.export), "--drift-reference", str(i.audio_folder("not_embeddings"))], EXIT_USAGE,
         lambda i: f"serve.drift_reference: {i.path('not_embeddings')}: not an embeddings folder"),
    Case("serve", "missing token file", lambda i, m: [str(i.export), "--token-file", str(i.path("tokens.txt"))],
         EXIT_USAGE, lambda i: f"serve.token_file: {i.path('tokens.txt')}: No such file or directory"),
]


def test_every_command_has_a_bad_input_case():
    assert set(COMMANDS) <= {case.command for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[f"{case.command}: {case.name}" for case in CASES])
def test_bad_input_gives_its_exit_code_and_one_line(case, tmp_path, tiny_export_dir, make_corpus, capsys,
                                                   monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    inputs = Inputs(tmp_path / "inputs", tiny_export_dir)
    inputs.root.mkdir()
    argv = [*case.command.split(), *case.argv(inputs, make_corpus)]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert "Traceback" not in out + err
    error_lines = [line for line in err.splitlines() if line.startswith(f"posttrain {case.command}: error: ")]
    assert len(error_lines) == 1, err
    assert case.culprit(inputs) in error_lines[0], error_lines[0]
    if case.out is not None:
        assert (inputs.path(case.out) / "notes.txt").read_text() == NOTE


def test_finetune_script_reports_a_bad_config_in_one_line(tmp_path):
    preset = tmp_path / "ft.yaml"
    preset.write_text("finetune:\n  df2024_dir: data/df2024\n")
    done = subprocess.run([sys.executable, str(REPO / "finetune.py"), "--config", str(preset), "finetune.lr=1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == EXIT_USAGE and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("finetune.py: error: finetune.lr: unknown key")
    assert "set on the command line by 'finetune.lr=1'" in done.stderr


def test_exports_replace_only_their_own_kind_and_never_a_users_file(tmp_path):
    from posttrain.hub.export import export_detector, identity_document
    from posttrain.hub.folders import EXPORT_MARKER, ExportError, check_out_dir
    from conftest import random_detector

    detector = random_detector()
    identity = identity_document(detector, preset="tiny")
    out = export_detector(detector, tmp_path / "export", identity, "# one\n", kind="publish")
    assert (out / EXPORT_MARKER).is_file()
    export_detector(detector, out, identity, "# two\n", kind="publish")  # its own previous export: replaced
    assert (out / "README.md").read_text() == "# two\n"
    with pytest.raises(ExportError, match="holds a posttrain 'publish' export, not a 'convert' one"):
        check_out_dir(out, "convert")
    (out / "notes.txt").write_text(NOTE)
    with pytest.raises(ExportError, match=r"holds files the previous export did not write \(notes.txt\)"):
        export_detector(detector, out, identity, "# three\n", kind="publish")
    assert (out / "notes.txt").read_text() == NOTE and (out / "README.md").read_text() == "# two\n"
    export_detector(detector, out, identity, "# three\n", kind="publish", overwrite=True)  # asked for: replaced
    assert not (out / "notes.txt").exists() and (out / "README.md").read_text() == "# three\n"
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", "convert")  # an empty folder loses nothing
