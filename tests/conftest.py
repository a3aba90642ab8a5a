"""Shared fixtures: a tiny real corpus (sine/noise FLAC + protocol CSV) and a DeepSpeed CPU env."""

from __future__ import annotations

import os

# DeepSpeed must pick its CPU accelerator before it is imported anywhere in the test session.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- tiny real corpus and shards (owner: shard writer; keep signatures stable, others use them) ---
import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

CORPUS_PREFIXES = ("LJ", "VCTK", "ASV5")
CORPUS_LANGUAGES = ("en", "de", "zh")
CORPUS_RATES_HZ = (16000, 22050, 44100, 48000, 8000)
# soundfile format name, subtype, file extension
CORPUS_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}
# kind of bad file -> the reject reason the shard builder must give it
BAD_AUDIO_REASONS = {"unreadable": "unreadable", "empty": "empty", "nan": "nan", "short": "too_short",
                     "missing": "missing", "mismatch": "duration_mismatch", "rate": "rate_out_of_range",
                     "understated": "length_mismatch"}


@dataclasses.dataclass
class TinyCorpus:
    """A corpus written by ``write_corpus``: ``root`` is the ``$ROOT`` of ``protocol``'s paths."""

    root: Path
    protocol: Path
    rows: list  # list[posttrain.data.protocol.ProtocolRow], in CSV order
    rejects: dict  # id -> expected reject reason (bad files only)

    @property
    def good_rows(self) -> list:
        return [row for row in self.rows if row.id not in self.rejects]


def _signal(kind: str, frames: int, rate_hz: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(frames) / rate_hz
    columns = []
    for channel in range(channels):
        if kind == "sine":
            wave = 0.5 * np.sin(2 * np.pi * (220.0 + 110.0 * channel + rng.uniform(0, 200)) * t)
        elif kind == "noise":
            wave = 0.3 * rng.standard_normal(frames)
        else:  # linear chirp 100 Hz -> 3 kHz: stays below every rate's Nyquist, including 8 kHz files
            wave = 0.5 * np.sin(2 * np.pi * (100.0 * t + (2900.0 / (2 * max(t[-1], 1e-3))) * t**2))
        columns.append(wave)
    return np.clip(np.stack(columns, axis=1), -0.99, 0.99).astype(np.float32)


def write_corpus(directory: Path, name: str = "corpus", *, num_files: int = 12, bad: tuple = (),
                 seed: int = 0, formats: tuple = ("wav", "flac", "ogg"),
                 seconds: tuple = (0.4, 1.2), proportion: str = "train") -> TinyCorpus:
    """Write ``num_files`` short real audio files (sine/noise/chirp; wav/flac/ogg; 8-48 kHz; mono and
    stereo) under ``directory/name`` plus ``directory/name.csv`` with ``$ROOT`` paths.

    IDs are ``<PREFIX>-<name>_<i>`` over 3 corpus prefixes (one ID holds a dot, to exercise key
    sanitising), labels alternate real/fake, fakes carry attacks A01/A02, languages cycle en/de/zh.
    ``bad`` adds one broken row per kind in ``BAD_AUDIO_REASONS`` (unreadable/empty/nan/short/missing/mismatch).
    """
    from posttrain.data.protocol import ProtocolRow, write_protocol

    rng = np.random.default_rng(seed)
    root = Path(directory) / name
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows, rejects = [], {}

    def add(index: int, relative: str, duration_s: float, rate_hz: int, channels: int, encoding: str,
            suffix: str = "") -> ProtocolRow:
        label = "real" if index % 2 == 0 else "fake"
        row = ProtocolRow(
            id=f"{CORPUS_PREFIXES[index % len(CORPUS_PREFIXES)]}-{name}_{index:04d}{suffix}",
            label=label, duration_s=duration_s, path=f"$ROOT/{relative}", sample_rate_hz=rate_hz,
            attack="-" if label == "real" else f"A0{1 + (index // 2) % 2}", speaker=f"spk{index % 4}",
            proportion=proportion, audio_channel=str(channels), audio_encoding=encoding, audio_bit_sample="16",
            language=CORPUS_LANGUAGES[index % len(CORPUS_LANGUAGES)])
        rows.append(row)
        return row

    for index in range(num_files):
        extension = formats[index % len(formats)]
        rate_hz = CORPUS_RATES_HZ[index % len(CORPUS_RATES_HZ)]
        channels = 1 + (index // 3) % 2
        frames = int(rng.uniform(*seconds) * rate_hz)
        kind = ("sine", "noise", "chirp")[index % 3]
        relative = f"audio/{name}_{index:04d}.{extension}"
        file_format, subtype = CORPUS_FORMATS[extension]
        sf.write(root / relative, _signal(kind, frames, rate_hz, channels, rng), rate_hz,
                 format=file_format, subtype=subtype)
        frames = sf.info(str(root / relative)).frames  # what a recipe would write (lossy codecs may pad)
        add(index, relative, frames / rate_hz, rate_hz, channels, extension, suffix=".v2" if index == 1 else "")

    for offset, kind in enumerate(bad):
        index = num_files + offset
        relative = f"audio/{name}_bad_{kind}.wav"
        path = root / relative
        if kind == "unreadable":
            path.write_bytes(rng.bytes(2048))
        elif kind == "empty":
            sf.write(path, np.zeros((0, 1), np.float32), 16000, subtype="PCM_16")
        elif kind == "nan":
            wave = _signal("sine", 16000, 16000, 1, rng)
            wave[100:200] = np.nan
            sf.write(path, wave, 16000, subtype="FLOAT")
        elif kind == "short":
            sf.write(path, _signal("sine", 320, 16000, 1, rng), 16000, subtype="PCM_16")
        elif kind == "mismatch":  # 1 s of audio, the row says 3 s (a truncated file)
            sf.write(path, _signal("sine", 16000, 16000, 1, rng), 16000, subtype="PCM_16")
        elif kind in ("rate", "understated"):
            from posttrain.bench.hostile_audio import wav_header, wav_with_rate

            if kind == "rate":  # a header claiming 2,147,483,647 Hz (140 bytes)
                path.write_bytes(wav_with_rate(2_147_483_647, 48))
            else:  # 3 s of samples behind a data chunk saying 1 s; the row read its Duration from that header
                pcm = (_signal("sine", 3 * 16000, 16000, 1, rng)[:, 0] * 32767).astype("<i2").tobytes()
                path.write_bytes(wav_header(16000, 2 * 16000) + pcm)
        elif kind != "missing":
            raise ValueError(f"unknown bad audio kind {kind!r}; known: {sorted(BAD_AUDIO_REASONS)}")
        row = add(index, relative, {"short": 0.02, "mismatch": 3.0}.get(kind, 1.0), 16000, 1, "wav")
        rejects[row.id] = BAD_AUDIO_REASONS[kind]

    protocol = Path(directory) / f"{name}.csv"
    write_protocol(rows, protocol)
    return TinyCorpus(root=root, protocol=protocol, rows=rows, rejects=rejects)


@pytest.fixture(autouse=True)
def _restore_logging():
    """A command run in-process (``posttrain.cli.main``) sets up the console's logging as a user's run
    would; undo it after each test so the next one starts as a fresh interpreter does."""
    import logging

    from posttrain import console

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("posttrain", *console.THIRD_PARTY_LOGGERS)
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters)) for name in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (logger_level, filters) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(logger_level)
        logger.filters[:] = filters
    console._current = None


@pytest.fixture
def make_corpus(tmp_path):
    """Factory: ``make_corpus(name="corpus", num_files=12, bad=(), seed=0, formats=..., seconds=...)``
    writes a tiny real corpus under the test's tmp_path and returns a ``TinyCorpus``."""

    def make(name: str = "corpus", **options) -> TinyCorpus:
        return write_corpus(tmp_path / "corpora", name, **options)

    return make


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> TinyCorpus:
    """One 12-file corpus for the whole session: read-only, copy before modifying."""
    return write_corpus(tmp_path_factory.mktemp("tiny_corpus"), "tiny")


@pytest.fixture(scope="session")
def shard_dir(tiny_corpus, tmp_path_factory) -> Path:
    """Shards of ``tiny_corpus`` (4 samples per shard -> 3 shards, seed 0): read-only, copy before modifying."""
    from posttrain.data.shard_build import build_shards

    out = tmp_path_factory.mktemp("tiny_shards")
    build_shards([tiny_corpus.protocol], root=tiny_corpus.root, out=out, name="train",
                 max_samples_per_shard=4, seed=0)
    return out


# --- hand-made shard sets for the streaming loader (owner: stream loader) ---


def write_shard_set(directory: Path, name: str, shard_sizes: list, *, seconds: tuple = (0.2, 1.0),
                    seed: int = 0, corrupt: dict | None = None, list_lengths: bool = True,
                    exact_seconds: list | None = None) -> dict:
    """Tars ``<name>-%06d.tar`` + ``index.json`` in the shard format, written with webdataset's
    TarWriter so sizes, durations and broken members are exact. Ids are ``<NAME>-<shard>_<i>``;
    ``corrupt`` maps an id to ``"audio"`` (garbage FLAC bytes), ``"json"`` (unparsable JSON),
    ``"json_says_more"`` or ``"json_says_less"`` (a JSON ``num_samples`` 800 off what the FLAC holds). ``exact_seconds`` (one per
    sample, in order over the shards) replaces the random durations.
    ``list_lengths=False`` writes an index as older builds did, without per-key lengths.
    Returns id -> seconds of every sample written (corrupt ones included)."""
    import hashlib
    import json
    from collections import Counter

    import webdataset as wds

    from posttrain.data.audio import encode_flac

    rate_hz, corrupt = 16000, corrupt or {}
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shards, durations = [], {}
    for shard_index, size in enumerate(shard_sizes):
        tar_name = f"{name}-{shard_index:06d}.tar"
        keys, labels, lengths = [], Counter(), []
        with wds.TarWriter(str(directory / tar_name)) as writer:
            for i in range(size):
                sample_id = f"{name.upper()}-{shard_index}_{i}"  # already a valid webdataset key
                frames = int(rng.uniform(*seconds) * rate_hz)
                if exact_seconds is not None:
                    frames = int(exact_seconds[sum(shard_sizes[:shard_index]) + i] * rate_hz)
                wave = 0.3 * np.sin(2 * np.pi * 300 * np.arange(frames) / rate_hz) + 0.05 * rng.standard_normal(frames)
                label = "real" if i % 2 == 0 else "fake"
                meta = {"id": sample_id, "label": label, "corpus": name.upper(), "attack": "-", "speaker": "spk0",
                        "language": "en", "proportion": "train", "duration_s": frames / rate_hz,
                        "num_samples": frames, "sample_rate_hz": rate_hz, "orig_sample_rate_hz": rate_hz,
                        "source_path": f"/src/{sample_id}.wav"}
                flac = encode_flac(wave.astype(np.float32), rate_hz)
                payload = json.dumps(meta).encode()
                if corrupt.get(sample_id) == "audio":
                    flac = b"fLaC" + rng.bytes(200)
                elif corrupt.get(sample_id) == "json":
                    payload = b"{not json"
                elif corrupt.get(sample_id) in ("json_says_more", "json_says_less"):
                    wrong = frames + (800 if corrupt[sample_id] == "json_says_more" else -800)
                    payload = json.dumps({**meta, "num_samples": wrong}).encode()
                writer.write({"__key__": sample_id, "flac": flac, "json": payload})
                keys.append(sample_id)
                lengths.append(frames)
                labels[label] += 1
                durations[sample_id] = frames / rate_hz
        data = (directory / tar_name).read_bytes()
        shards.append({"name": tar_name, "samples": size, "seconds": sum(durations[k] for k in keys),
                       "labels": dict(labels), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "keys": keys, **({"num_samples": lengths} if list_lengths else {})})
    index = {"format": "posttrain-shards", "version": 1, "sample_rate_hz": rate_hz, "seed": seed, "shards": shards,
             "totals": {"samples": sum(shard_sizes), "seconds": sum(durations.values())}, "rejects": 0}
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "rejects.jsonl").write_text("")
    return durations


@pytest.fixture(scope="module")
def make_shard_set(tmp_path_factory):
    """Factory: ``make_shard_set(name, shard_sizes, seconds=(0.2, 1.0), seed=0, corrupt=None)`` ->
    ``(directory, {id: seconds})`` (see ``write_shard_set``)."""
    root = tmp_path_factory.mktemp("shard_sets")

    def make(name: str, shard_sizes: list, **options) -> tuple:
        return root / name, write_shard_set(root / name, name, shard_sizes, **options)

    return make


class DroppingHTTPServer:
    """A real HTTP server on 127.0.0.1 serving ``root``, with byte ranges, that breaks downloads:
    every GET of a ``.tar`` from byte 0 sends the full Content-Length but only ``drop_fraction`` of
    the body, waits 0.2 s, then closes the connection (a mid-shard drop, so a reader resumes from a
    byte > 0), and the first GET of each ``index.json`` is dropped the same way. Counters: ``drops``, ``resumed`` (GETs from a byte > 0), ``gets``."""

    def __init__(self, root: Path, drop_fraction: float = 0.4):
        import http.server
        import threading
        import time

        server = self
        self.root, self.drop_fraction = Path(root), drop_fraction
        self.drops = self.resumed = self.gets = 0
        self.lock, self.seen_index = threading.Lock(), set()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body):
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                ranged = self.headers.get("Range")
                if ranged:
                    start = int(ranged.split("=", 1)[1].split("-", 1)[0])
                self.send_response(206 if ranged else 200)
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                with server.lock:
                    server.gets += 1
                    server.resumed += start > 0
                    drop = start == 0 and (path.suffix == ".tar" or path not in server.seen_index)
                    server.seen_index.add(path)
                    server.drops += drop
                if drop:
                    self.wfile.write(data[: int(len(data) * server.drop_fraction)])
                    self.wfile.flush()
                    time.sleep(0.2)  # the client reads what came before the connection breaks
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees the body end early
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "DroppingHTTPServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


# --- AntiDeepfake releases and a trained tiny checkpoint (owner: hub export/conversion) ---

# transformers Wav2Vec2Model/HubertModel name -> fairseq name, as regex rewrites applied in order. Written
# from the reference's key layout (shared/reference section 1), independently of posttrain.hub.antideepfake.
_FAIRSEQ_REWRITES = [
    (r"^feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"^feature_projection\.layer_norm\.", "layer_norm."),
    (r"^feature_projection\.projection\.", "post_extract_proj."),
    (r"^encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0$", "encoder.pos_conv.0.weight_g"),
    (r"^encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1$", "encoder.pos_conv.0.weight_v"),
    (r"^encoder\.pos_conv_embed\.conv\.bias$", "encoder.pos_conv.0.bias"),
    (r"^(encoder\.layers\.\d+)\.attention\.", r"\1.self_attn."),
    (r"^(encoder\.layers\.\d+)\.layer_norm\.", r"\1.self_attn_layer_norm."),
    (r"^(encoder\.layers\.\d+)\.feed_forward\.intermediate_dense\.", r"\1.fc1."),
    (r"^(encoder\.layers\.\d+)\.feed_forward\.output_dense\.", r"\1.fc2."),
]


def random_detector(preset: str = "tiny", seed: int = 0):
    """A random tiny detector (eval mode) whose every tensor differs from its default initialisation,
    so a conversion that drops or swaps a tensor cannot go unnoticed."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models.detector import build_detector

    torch.manual_seed(seed)
    detector = build_detector(ModelConfig(preset=preset)).eval()
    with torch.no_grad():
        for parameter in detector.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return detector


def fairseq_release_state(detector, seed: int = 0) -> dict:
    """``detector``'s weights laid out as an AntiDeepfake ``model.safetensors`` (fairseq module names
    under ``m_ssl.model.``, head ``proj_fc``), plus the pre-training-only tensors a release carries."""
    import re

    import torch

    norm = detector.ssl_config.feat_extract_norm
    # the conv norm sits at Sequential index 2: a GroupNorm itself (layer 0 only), or (Transpose, LayerNorm, Transpose)
    conv_norm = r"feature_extractor.conv_layers.\1.2." if norm == "group" else r"feature_extractor.conv_layers.\1.2.1."
    rewrites = [(r"^feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", conv_norm), *_FAIRSEQ_REWRITES]
    state = {}
    for name, tensor in detector.encoder.state_dict().items():
        for pattern, replacement in rewrites:
            name = re.sub(pattern, replacement, name)
        state[f"m_ssl.model.{name}"] = tensor.detach().clone().contiguous()
    generator = torch.Generator().manual_seed(seed)
    hidden = detector.ssl_config.hidden_size
    extras = {"mask_emb": (hidden,), "final_proj.weight": (16, hidden), "final_proj.bias": (16,)}
    if detector.ssl_config.model_type == "hubert":
        extras["label_embs_concat"] = (8, 16)
    else:
        extras.update({"quantizer.vars": (1, 8, 8), "quantizer.weight_proj.weight": (8, 32),
                       "quantizer.weight_proj.bias": (8,), "project_q.weight": (16, 8), "project_q.bias": (16,)})
    state.update({f"m_ssl.model.{key}": torch.randn(shape, generator=generator) for key, shape in extras.items()})
    state["proj_fc.weight"] = detector.head.weight.detach().clone()
    state["proj_fc.bias"] = detector.head.bias.detach().clone()
    return state


TINY_RUN_OVERRIDES = ("model.preset=tiny", "train.max_steps=2", "train.zero_stage=1", "train.precision=fp32",
                      "train.device=cpu", "tracking.enabled=false", "data.train.num_workers=0",
                      "data.train.max_batch_seconds=4", "data.valid.shards=[]", "optim.lr=0.001",
                      "schedule.warmup_steps=0", "schedule.decay_end_steps=2")


def train_tiny(out: Path, shard_dir: Path, *overrides: str, prelude: str = "", cwd: Path | None = None,
               timeout_s: int = 600) -> "subprocess.CompletedProcess":
    """A real post-training run of the tiny preset in its own process (DeepSpeed on the CPU, a world of
    one), as a user's ``posttrain train`` would start it: ``TINY_RUN_OVERRIDES``, then ``overrides``.
    ``prelude``: Python run first in that process (e.g. a patch). Returns the finished process (stdout
    ends with ``STEPS <n>``); the caller asserts on its return code."""
    import subprocess
    import sys

    script = (f"import sys\n{prelude}\nfrom posttrain.config import load_config\n"
              "from posttrain.train.trainer import train\n"
              "result = train(load_config(None, sys.argv[1:]))\nprint('STEPS', result.progress.step)\n")
    return subprocess.run([sys.executable, "-c", script, f"output_dir={out}", *TINY_RUN_OVERRIDES,
                           f"data.train.shards=[{shard_dir}]", *overrides], capture_output=True, text=True,
                          timeout=timeout_s, cwd=cwd or Path(out).parent,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="session")
def tiny_checkpoint(shard_dir, tmp_path_factory) -> Path:
    """A real 2-step post-training run of the tiny preset (``train_tiny``) on ``shard_dir``; returns its
    output folder (``checkpoints/latest`` inside). Read-only."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    done = train_tiny(out, shard_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def valid_shard_dir(tmp_path_factory) -> Path:
    """Shards of a second 8-file corpus (seed 1, 4 samples per shard): a held-out validation set for
    training tests. Read-only."""
    from posttrain.data.shard_build import build_shards

    corpus = write_corpus(tmp_path_factory.mktemp("valid_corpus"), "valid", num_files=8, seed=1, proportion="valid")
    out = tmp_path_factory.mktemp("valid_shards")
    build_shards([corpus.protocol], root=corpus.root, out=out, name="valid", max_samples_per_shard=4, seed=0)
    return out


# --- hand-made embeddings folders (owner: neural-collapse selection) ---


def write_embedding_set(directory: Path, embeddings: np.ndarray, meta: list, *, model: dict | None = None) -> Path:
    """An embeddings folder in the ``posttrain embed`` format (``posttrain.select.embed``) holding
    ``embeddings`` ([count, dim], float32 or float16) and one metadata dict per row (row numbers added)."""
    import json

    from posttrain.select.embeddings import EMBEDDINGS_NAME, MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, META_NAME

    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / EMBEDDINGS_NAME, embeddings)
    lines = [json.dumps({"row": row, **item}) for row, item in enumerate(meta)]
    (directory / META_NAME).write_text("".join(line + "\n" for line in lines))
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "dim": int(embeddings.shape[1]),
                "count": int(embeddings.shape[0]), "dtype": str(embeddings.dtype), "model": model or {}}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


# --- a tiny exported model for inference tests (owner: eval/score/embed) ---


@pytest.fixture(scope="session")
def tiny_export_dir(tmp_path_factory) -> Path:
    """A random-init tiny detector (seed 0) saved as a transformers export folder, the format
    ``load_model`` accepts everywhere. Read-only."""
    import torch

    from posttrain.config import ModelConfig
    from posttrain.hub.export import export_detector, identity_document
    from posttrain.models.detector import build_detector

    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset="tiny"))
    out = tmp_path_factory.mktemp("tiny_export") / "model"
    return export_detector(detector, out, identity_document(detector, preset="tiny"), "# tiny test model\n")


# --- a tiny Deepfake-Eval-2024 layout, prepared and sharded by the CLI (owner: fine-tune) ---

# file name, seconds, label, split: wav/mp3/m4a like the published set; real = tones, fake = noise
DF2024_FILES = (("a1.mp3", 5.0, "Fake", "Train"), ("b2.wav", 4.5, "Real", "Train"), ("c3.m4a", 3.1, "Real", "Train"),
                ("d4.wav", 6.0, "Fake", "Train"), ("e5.wav", 2.5, "Real", "Train"), ("f6.mp3", 3.5, "Fake", "Train"),
                ("g7.wav", 4.2, "Real", "Test"), ("h8.mp3", 5.5, "Fake", "Test"), ("i9.m4a", 2.2, "Real", "Test"),
                ("j10.wav", 3.3, "Fake", "Test"), ("k11.wav", 6.1, "Real", "Test"), ("l12.wav", 1.5, "Fake", "Test"))


@pytest.fixture(scope="session")
def tiny_df2024(tmp_path_factory) -> Path:
    """``posttrain data df2024 --segment-seconds 2 4 --shards`` output for ``DF2024_FILES``, plus
    ``shards/2s/train_x3``: the 2 s training segments again in shards of 3 samples (the default shard
    size puts them all in one shard, which one rank would read alone). Read-only."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("df2024")
    audio_dir = root / "audio-data"
    audio_dir.mkdir()
    rng = np.random.default_rng(7)
    for name, seconds, label, _ in DF2024_FILES:
        rate_hz = 44100 if name.endswith(".mp3") else 22050
        t = np.arange(int(seconds * rate_hz)) / rate_hz
        wave = 0.4 * np.sin(2 * np.pi * rng.uniform(200, 600) * t) if label == "Real" \
            else 0.2 * rng.standard_normal(t.size)
        if name.endswith(".wav"):
            sf.write(audio_dir / name, wave.astype(np.float32), rate_hz)
        else:  # compressed formats through ffmpeg, as the published files are
            sf.write(root / "tmp.wav", wave.astype(np.float32), rate_hz)
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(root / "tmp.wav"), str(audio_dir / name)],
                           check=True)
    metadata = root / "audio-metadata-publish.csv"
    metadata.write_text("Filename,Date,Ground Truth (Real/Fake),Public Comments,Finetuning Set (Train/Test)\n"
                        + "".join(f"{name},2024-05-01,{label},,{split}\n" for name, _, label, split in DF2024_FILES))
    out = root / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["data", "df2024", "--metadata", str(metadata), "--audio-dir", str(audio_dir), "--out", str(out),
                     "--segment-seconds", "2", "4", "--shards", "--no-progress"],
                    ["shards", "build", "--protocol", str(out / "2s" / "train.csv"), "--root", str(out), "--out",
                     str(out / "shards" / "2s" / "train_x3"), "--max-samples-per-shard", "3", "--no-progress"]):
        done = subprocess.run([sys.executable, "-m", "posttrain", *command], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
    return out


# --- a running ``posttrain serve`` process (real uvicorn on 127.0.0.1) around the tiny random export ---
# Kept here, not in a tests/serve/conftest.py: a second conftest module shadows this one for the tests
# that import helpers with ``from conftest import ...``.
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import requests  # noqa: E402

from posttrain.dist import free_port  # noqa: E402

TOKEN = "s3cret-token-7f1c"  # what the tests send; it must never appear in the service's output


WATCHDOG_RSS_BYTES = 3 * 2**30  # a server above this is killed, so a memory regression fails a test


@dataclasses.dataclass
class Server:
    url: str
    temp_dir: Path
    log: Path
    process: subprocess.Popen
    killed_for_memory: bool = False

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}", **extra}

    def status_bytes(self, field: str) -> int:
        """``VmHWM`` (peak resident memory) or ``VmRSS`` of the server process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def watch(self) -> None:
        """Kill the server if its memory passes ``WATCHDOG_RSS_BYTES`` (polled every 50 ms)."""
        def poll() -> None:
            while self.process.poll() is None:
                try:
                    if self.status_bytes("VmRSS") > WATCHDOG_RSS_BYTES:
                        self.killed_for_memory = True
                        self.process.kill()
                except (OSError, KeyError):
                    return
                time.sleep(0.05)

        import threading

        threading.Thread(target=poll, daemon=True).start()


def start_server(model: Path, work: Path, *options: str, temp_dir: Path | None = None) -> Server:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    temp_dir = temp_dir or work / "service_tmp"
    temp_dir.mkdir(exist_ok=True)
    (work / "tokens").write_text(f"# one token a line\n{TOKEN}\n")
    log = work / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "serve", str(model), "--port", str(port), "--temp-dir", str(temp_dir),
         "--token-file", str(work / "tokens"), "--log-level", "info", *options],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                running = Server(url, temp_dir, log, process)
                running.watch()
                return running
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server not ready in 120 s:\n{log.read_text()}")


def stop_server(server: Server) -> str:
    server.process.terminate()  # SIGTERM: uvicorn's graceful shutdown runs the lifespan exit
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    return server.log.read_text()


@pytest.fixture(scope="module")
def server(tiny_export_dir, tmp_path_factory):
    """Small limits so every refusal is cheap to provoke: 1 MiB and 60 s per upload, 60 s in flight,
    one request queued for at most 1 s."""
    work = tmp_path_factory.mktemp("serve")
    running = start_server(tiny_export_dir, work, "--max-upload-mb", "1", "--max-upload-seconds", "60",
                           "--max-inflight-seconds", "60", "--max-queue", "1", "--queue-timeout-seconds", "1",
                           "--max-batch-wait-ms", "200", "--window-seconds", "2", "--hop-seconds", "1")
    yield running
    output = stop_server(running)  # the shutdown itself is checked: its folder removed, the token never logged
    assert "Application shutdown complete" in output and TOKEN not in output
    assert list(running.temp_dir.iterdir()) == []


# --- headless Chromium (Debian's chromium + chromium-driver, installed by `make test`) -----------------


def chromium_driver(profile: Path, width: int = 1000, height: int = 900):
    """A selenium driver of headless Debian chromium with a fresh profile. A missing browser fails the test
    rather than skipping it: `make test` installs it, so a skip would only hide a broken set-up."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.fail("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
