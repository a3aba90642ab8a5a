"""ONNX export (``posttrain export --format onnx``) and the onnxruntime backend: the graph scores raw audio as
the torch ``Detector`` scores it after its own normalisation, and its ``embedding`` is ``Detector.embed``'s,
for every backbone family and the golden
AntiDeepfake release, at -60..0 dBFS, batch 1 and padded; ``score`` and ``eval --backend onnxruntime`` give
the torch backend's results; the card's snippet scores a file like ``posttrain score`` where torch and
transformers cannot even be imported."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from posttrain.cli import main
from posttrain.config import ModelConfig
from posttrain.data.batch import ANTIDEEPFAKE_INPUT_EPS, normalize_waveforms
from posttrain.eval.onnx_runtime import OnnxModel
from posttrain.hub.export import identity_document
from posttrain.hub.onnx_export import export_onnx
from posttrain.loading import load_model
from posttrain.models.detector import build_detector

TOLERANCE = 1e-4  # max |logit difference| onnxruntime vs torch
LEVELS_DBFS = (-60.0, -40.0, -20.0, -6.0, 0.0)
LENGTHS = (16000, 11200, 7100)  # the padded batch: rows of different lengths
FAIRSEQ = Path(__file__).resolve().parents[1] / "fixtures" / "fairseq"


def signal(samples: int, seed: int) -> np.ndarray:
    """A voiced tone plus noise at peak 1.0 (float64)."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    wave = np.sin(2 * np.pi * (140 + 40 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    wave = wave + 0.1 * rng.standard_normal(samples)
    return wave / np.abs(wave).max()


def max_diff(detector, model: OnnxModel, level_dbfs: float, lengths: tuple[int, ...]) -> tuple[float, float]:
    """Max |logit difference| and max |embedding difference| of the ONNX graph (raw audio in) and the torch
    detector (its normalisation, then ``Detector.embed`` and the head) on one batch."""
    waves = [(signal(length, seed) * 10.0 ** (level_dbfs / 20.0)).astype(np.float32)
             for seed, length in enumerate(lengths)]
    ours, embedding = model.outputs(waves)
    batch = torch.zeros(len(waves), max(lengths))
    for row, wave in enumerate(waves):
        batch[row, :len(wave)] = torch.from_numpy(wave)
    sizes = torch.tensor(lengths)
    with torch.no_grad():
        pooled = detector.embed(normalize_waveforms(batch, sizes, detector.input_eps), sizes)
        theirs = detector.head(pooled).numpy()
    return (float(np.abs(ours.astype(np.float64) - theirs).max()),
            float(np.abs(embedding.astype(np.float64) - pooled.numpy()).max()))


def parity_rows(detector, folder: Path) -> dict[tuple[float, str], tuple[float, float]]:
    model = OnnxModel(folder)
    return {(level, mode): max_diff(detector, model, level, lengths) for level in LEVELS_DBFS
            for mode, lengths in (("batch 1", LENGTHS[:1]), ("padded", LENGTHS))}


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    """A calibration fitted on made-up logit_diff scores (slope and offset away from 1 and 0)."""
    from posttrain.eval.calibration import fit_calibration, save_calibration

    rng = np.random.default_rng(5)
    scores = np.concatenate([rng.normal(1.5, 1.0, 200), rng.normal(-1.0, 0.7, 200)])
    labels = np.array([1] * 200 + [0] * 200)
    calibration = fit_calibration(scores, labels, score_definition="logit_diff")
    return save_calibration(calibration, tmp_path_factory.mktemp("calibration") / "calibration.json")


@pytest.fixture(scope="module")
def onnx_dir(tiny_export_dir, calibration_file, tmp_path_factory) -> Path:
    """``posttrain export --format onnx`` of the tiny wav2vec 2.0 export with a calibration, int8 too."""
    out = tmp_path_factory.mktemp("onnx") / "tiny_onnx"
    assert main(["export", str(tiny_export_dir), "--format", "onnx", "--out", str(out), "--quantize", "int8",
                 "--calibration", str(calibration_file)]) == 0
    return out


def test_export_folder_holds_the_graph_labels_identity_and_card(onnx_dir, tiny_export_dir):
    names = {path.name for path in onnx_dir.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "labels.json", "posttrain.json", "README.md", "calibration.json"} <= names
    identity = json.loads((onnx_dir / "posttrain.json").read_text())
    assert identity["preset"] == "tiny" and identity["onnx"]["exported_from"] == str(tiny_export_dir)
    assert "torch.onnx.export(dynamo=True)" in identity["onnx"]["exporter"]
    assert json.loads((onnx_dir / "labels.json").read_text())["labels"] == ["fake", "real"]
    import onnx

    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    shapes = {value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
              for value in [*graph.input, *graph.output]}
    assert shapes == {"waveforms": ["batch", "samples"], "lengths": ["batch"], "logits": ["batch", 2],
                      "embedding": ["batch", identity["ssl_config"]["hidden_size"]]}
    int8 = identity["onnx"]["parity_int8"]
    assert 0 < max(int8["max_abs_logit_diff"]["batch_1"]) < 0.1  # quantised: close, not equal
    # quantisation keeps the embedding output (drift monitoring with --backend onnxruntime-int8)
    assert OnnxModel(onnx_dir, int8=True).has_embedding
    assert 0 < max(int8["max_abs_embedding_diff"]["padded_batch"]) < 0.1
    # the MatMuls in int8, the conv feature encoder left in float32 (ConvInteger: slower and less exact)
    int8_ops = {node.op_type for node in onnx.load(str(onnx_dir / "model.int8.onnx")).graph.node}
    assert "MatMulInteger" in int8_ops and "ConvInteger" not in int8_ops and "Conv" in int8_ops


def test_wav2vec2_graph_equals_torch_at_every_level_batch_one_and_padded(onnx_dir, tiny_export_dir):
    detector, _ = load_model(tiny_export_dir)
    rows = parity_rows(detector, onnx_dir)
    assert max(max(row) for row in rows.values()) < TOLERANCE, rows


# tiny_wavlm: a group-norm extractor (masked statistics in the graph); tiny_hubert with the one-class head,
# whose [-cos, cos] outputs and cosine score definition the graph and the backend carry too
@pytest.mark.parametrize(("preset", "head"), [("tiny_hubert", "oc_softmax"), ("tiny_wavlm", "linear")])
def test_other_families_equal_torch_at_every_level_batch_one_and_padded(preset, head, tmp_path):
    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset=preset, head=head)).eval()
    folder = export_onnx(detector, tmp_path / preset, identity_document(detector, preset=preset))
    assert OnnxModel(folder).score_definition == detector.score_definition
    rows = parity_rows(detector, folder)
    assert max(max(row) for row in rows.values()) < TOLERANCE, rows


def test_golden_antideepfake_release_exported_equals_fairseq_and_torch(tmp_path):
    """The converted fairseq wav2vec 2.0 small fixture (group norm, AntiDeepfake's eps): the ONNX graph gives
    fairseq's own logits, recorded by tests/fixtures/fairseq/make_fixtures.py."""
    from safetensors.numpy import load_file

    record = json.loads((FAIRSEQ / "logits.json").read_text())
    detector, identity = load_model(FAIRSEQ / "w2v_small")
    assert detector.input_eps == ANTIDEEPFAKE_INPUT_EPS
    identity.pop("loaded_from")
    model = OnnxModel(export_onnx(detector, tmp_path / "ad", identity))
    base = load_file(FAIRSEQ / "waveforms.safetensors")
    for level in record["levels_dbfs"]:
        waves = [(base[name].astype(np.float64) * 10.0 ** (level / 20.0)).astype(np.float32)
                 for name in record["waveforms"]]
        expected = np.array(record["families"]["w2v_small"]["logits"][f"{level:g}"])
        padded = model.logits(waves)
        singles = np.concatenate([model.logits([wave]) for wave in waves])
        assert np.abs(padded - expected).max() < TOLERANCE, level
        assert np.abs(singles - expected).max() < TOLERANCE, level
    assert max(max(max_diff(detector, model, level, LENGTHS)) for level in LEVELS_DBFS) < TOLERANCE


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> list[Path]:
    """A 16 kHz file longer than score's 13 s window (3 windows) and a 44.1 kHz stereo file."""
    folder = tmp_path_factory.mktemp("onnx_audio")
    long = folder / "long_16k.wav"
    sf.write(long, (0.3 * signal(int(28.3 * 16000), 1)).astype(np.float32), 16000)
    rng = np.random.default_rng(2)
    t = np.arange(int(3.7 * 44100)) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 330 * t), 0.1 * rng.standard_normal(t.size)], axis=1)
    studio = folder / "studio_44k.wav"
    sf.write(studio, stereo.astype(np.float32), 44100, subtype="PCM_16")
    return [long, studio]


def score_json(model: Path, files: list[Path], out: Path, *backend: str) -> dict[str, dict]:
    args = ["score", "--model", str(model), *map(str, files), "--json", str(out), "--no-progress", *backend]
    assert main(args) == 0
    return {row["file"]: row for row in json.loads(out.read_text())["results"]}


@pytest.fixture(scope="module")
def torch_scores(tiny_export_dir, audio_files, calibration_file, tmp_path_factory) -> dict[str, dict]:
    """``posttrain score`` of the torch model with the calibration the ONNX export stores."""
    return score_json(tiny_export_dir, audio_files, tmp_path_factory.mktemp("scores") / "torch.json",
                      "--calibration", str(calibration_file))


def test_score_with_onnxruntime_equals_the_torch_backend(onnx_dir, audio_files, torch_scores, tmp_path):
    ours = score_json(onnx_dir, audio_files, tmp_path / "onnx.json", "--backend", "onnxruntime")
    assert ours.keys() == torch_scores.keys()
    for name, row in ours.items():
        assert row["windows"] == torch_scores[name]["windows"]
        for key in ("logit_fake", "logit_real", "logit_diff", "p_real", "llr"):
            assert abs(row[key] - torch_scores[name][key]) < TOLERANCE, (name, key)
    assert json.loads((tmp_path / "onnx.json").read_text())["inference"]["backend"] == "onnxruntime"
    # --backend onnxruntime-int8 runs model.int8.onnx: close to fp32, not the fp32 graph (never compared exactly:
    # int8 kernels differ by instruction set)
    quantised = score_json(onnx_dir, audio_files, tmp_path / "int8.json", "--backend", "onnxruntime-int8")
    assert json.loads((tmp_path / "int8.json").read_text())["inference"]["backend"] == "onnxruntime-int8"
    differences = [abs(quantised[name]["logit_diff"] - row["logit_diff"]) for name, row in ours.items()]
    assert max(differences) < 0.1 and max(differences) > 0


def test_an_int8_window_scores_the_same_alone_and_beside_others(onnx_dir):
    """Dynamic int8 takes one activation scale over the whole batch: the int8 backend runs each window
    alone, so a window's outputs never depend on the windows (in serve: other clients' files) beside it.
    int8 compared with int8 on one machine: equal, whatever the instruction set."""
    rng = np.random.default_rng(5)
    quiet = (0.01 * rng.standard_normal(16000)).astype(np.float32)
    loud = (0.9 * rng.standard_normal(24000)).astype(np.float32)
    model = OnnxModel(onnx_dir, int8=True)
    alone_logits, alone_embedding = model.outputs([quiet])
    batched_logits, batched_embedding = model.outputs([loud, quiet])
    assert np.array_equal(batched_logits[1], alone_logits[0])
    assert np.array_equal(batched_embedding[1], alone_embedding[0])


def test_embed_with_onnxruntime_writes_the_torch_models_embeddings(onnx_dir, tiny_export_dir, shard_dir, tmp_path):
    """``posttrain embed --backend onnxruntime`` (and ``drift``, which embeds the same way) from the graph's
    ``embedding`` output: the torch model's embeddings of every sample, in the same order."""
    def embeddings(model: Path, name: str, *backend: str) -> tuple[np.ndarray, list[str]]:
        out = tmp_path / name
        assert main(["embed", "--model", str(model), "--shards", str(shard_dir), "--out", str(out), "--no-progress",
                     *backend]) == 0
        ids = [json.loads(line)["id"] for line in (out / "meta.jsonl").read_text().splitlines()]
        return np.load(out / "embeddings.npy"), ids

    (torch_rows, torch_ids), (onnx_rows, onnx_ids) = (embeddings(tiny_export_dir, "torch"),
                                                      embeddings(onnx_dir, "onnx", "--backend", "onnxruntime"))
    assert onnx_ids == torch_ids and len(torch_ids) > 1
    assert np.abs(onnx_rows.astype(np.float64) - torch_rows).max() < TOLERANCE


def test_eval_with_onnxruntime_writes_the_torch_backend_scores(onnx_dir, tiny_export_dir, tiny_corpus, tmp_path):
    def scores(model: Path, name: str, *backend: str) -> dict[str, float]:
        out = tmp_path / name
        assert main(["eval", "--model", str(model), "--protocol", str(tiny_corpus.protocol), "--root",
                     str(tiny_corpus.root), "--out", str(out), "--bootstrap", "0", "--no-mlflow", "--no-progress",
                     *backend]) == 0
        with open(out / "scores.csv", newline="") as table:
            return {row["ID"]: float(row["Score"]) for row in csv.DictReader(table)}

    theirs, ours = scores(tiny_export_dir, "torch"), scores(onnx_dir, "onnx", "--backend", "onnxruntime")
    assert theirs and ours.keys() == theirs.keys()
    assert max(abs(ours[key] - theirs[key]) for key in ours) < TOLERANCE


# the card's snippet runs where these cannot be imported: it needs onnxruntime, numpy, soundfile and soxr only
NO_TORCH = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchaudio", "posttrain"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Refuse())
import runpy
snippet, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(snippet, run_name="__main__")
"""


def test_card_snippet_scores_like_posttrain_score_without_torch(onnx_dir, audio_files, torch_scores, tmp_path):
    card = (onnx_dir / "README.md").read_text()
    snippet = tmp_path / "score_onnx.py"
    snippet.write_text(card.split("```python\n", 1)[1].split("```", 1)[0])
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(snippet), str(onnx_dir), *map(str, audio_files)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["file"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert rows.keys() == torch_scores.keys()
    for name, row in rows.items():
        assert row["windows"] == torch_scores[name]["windows"]
        for key in ("logit_diff", "p_real", "llr"):
            assert abs(row[key] - torch_scores[name][key]) < TOLERANCE, (name, key)


def test_backend_and_folder_mismatches_are_one_line_errors(onnx_dir, tiny_export_dir, audio_files, capsys):
    assert main(["score", "--model", str(tiny_export_dir), str(audio_files[1]), "--backend", "onnxruntime",
                 "--no-progress"]) == 2
    assert "not an ONNX export (no model.onnx)" in capsys.readouterr().err
    assert main(["score", "--model", str(onnx_dir), str(audio_files[1]), "--no-progress"]) == 2
    assert "an ONNX export (model.onnx): score it with --backend onnxruntime" in capsys.readouterr().err
    assert main(["score", "--model", str(onnx_dir), str(audio_files[1]), "--backend", "onnxruntime",
                 "--precision", "bf16", "--no-progress"]) == 2
    assert "onnxruntime backend runs the exported fp32 graph" in capsys.readouterr().err


def test_export_refuses_a_foreign_out_folder_before_loading(tiny_export_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_export_dir), "--format", "onnx", "--out", str(out)]) == 2
    assert "not empty and not a posttrain export" in capsys.readouterr().err
    assert main(["export", str(tiny_export_dir), "--format", "transformers", "--out", str(tmp_path / "t"),
                 "--quantize", "int8"]) == 2


def test_export_transformers_format_reloads_with_the_same_logits(tiny_export_dir, tmp_path):
    out = tmp_path / "transformers"
    assert main(["export", str(tiny_export_dir), "--format", "transformers", "--out", str(out)]) == 0
    (original, _), (exported, identity) = load_model(tiny_export_dir), load_model(out)
    assert identity["preset"] == "tiny" and (out / "README.md").is_file()
    waves = torch.from_numpy((0.1 * signal(12000, 3)).astype(np.float32))[None]
    lengths = torch.tensor([12000])
    with torch.no_grad():
        assert torch.equal(original(waves, lengths), exported(waves, lengths))
