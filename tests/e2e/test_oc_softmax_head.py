"""``model.head=oc_softmax`` end to end, as an AntiDeepfake user would run it: a real post-training run trains
with the OC-softmax loss (checked against a re-implementation here, from the pooled embeddings and the
head weight the run used), the checkpoint keeps the head, ``score``/``eval``/serve/timelines give the
cosine (not real minus fake), P(real) only through a calibration fitted on those cosines, and the
transformers export refuses the head in one line."""

from __future__ import annotations

import asyncio
import json
import math
import tempfile

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import train_tiny

from posttrain.data.protocol import ProtocolRow, write_protocol

# margins and scale other than AD's defaults, so a head that forgot its settings fails
MARGIN_REAL, MARGIN_FAKE, SCALE = 0.8, -0.1, 10.0
OC_OVERRIDES = ("model.head=oc_softmax", f"model.oc_margin_real={MARGIN_REAL}", f"model.oc_margin_fake={MARGIN_FAKE}",
                f"model.oc_scale={SCALE}", "data.train.num_buckets=1")  # one bucket: several clips per batch
RATE = 16000
EPS = 1e-7  # a new model's input normalisation eps

# Run inside the training process: keeps, for every real micro-batch, the pooled embeddings, the head
# weight and the labels the train step used, and what micro_loss returned (the per-sample losses, the loss).
RECORDER = """
import atexit, torch
from posttrain.models.detector import Detector
from posttrain.train import step
_records, _embed, _micro = [], Detector.embed, step.micro_loss
def embed(self, waveforms, lengths):
    pooled = _embed(self, waveforms, lengths)
    embed.last = (pooled.detach().double().clone(), self.head.weight.detach().double().clone())
    return pooled
def micro_loss(engine, batch, scale, ctx):
    loss, per_sample = _micro(engine, batch, scale, ctx)
    if not batch.is_empty:
        pooled, weight = embed.last
        _records.append({"pooled": pooled, "weight": weight, "labels": batch.labels.clone(), "scale": scale,
                         "losses": per_sample.detach().double().clone(), "loss": float(loss)})
    return loss, per_sample
Detector.embed, step.micro_loss = embed, micro_loss
atexit.register(lambda: torch.save(_records, RECORD_PATH))
"""


@pytest.fixture(scope="module")
def oc_run(shard_dir, tmp_path_factory):
    """A real 2-step post-training run with the OC head; returns (run folder, micro-batch records)."""
    root = tmp_path_factory.mktemp("oc_run")
    record = root / "records.pt"
    prelude = RECORDER.replace("RECORD_PATH", repr(str(record)))
    done = train_tiny(root / "run", shard_dir, *OC_OVERRIDES, prelude=prelude)
    assert done.returncode == 0, done.stderr[-4000:]
    return root / "run", torch.load(record, weights_only=False)


def _cosine(pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos(embedding, head weight) in float64, written here (not the head's code)."""
    pooled, weight = pooled.double(), weight.double().reshape(-1)
    return (pooled @ weight) / (pooled.norm(dim=-1) * weight.norm())


def test_training_loss_is_the_oc_softmax_loss(oc_run):
    _, records = oc_run
    assert records and sum(len(r["labels"]) for r in records) >= 4
    assert {int(label) for r in records for label in r["labels"]} == {0, 1}
    for r in records:
        cos = _cosine(r["pooled"], r["weight"]).numpy()
        labels = r["labels"].numpy()
        margin = np.where(labels == 1, SCALE * (MARGIN_REAL - cos), SCALE * (cos - MARGIN_FAKE))
        expected = np.logaddexp(0.0, margin)  # softplus
        np.testing.assert_allclose(r["losses"].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert r["loss"] == pytest.approx(expected.sum() * r["scale"], rel=1e-5)


def test_the_checkpoint_keeps_the_head_on_every_loading_path(oc_run):
    from posttrain.loading import _open_checkpoint, load_model
    from posttrain.models.detector import build_detector
    from posttrain.models.oc_softmax import OCSoftmaxHead
    from posttrain.models.partitioned import key_mismatch
    from posttrain.train.checkpoint import model_config_from_metadata, read_metadata, resolve_checkpoint

    run, _ = oc_run
    settings = {"head": "oc_softmax", "oc_margin_real": MARGIN_REAL, "oc_margin_fake": MARGIN_FAKE, "oc_scale": SCALE}
    model = model_config_from_metadata(read_metadata(resolve_checkpoint(run)))
    assert (model.head, model.oc_margin_real, model.oc_margin_fake, model.oc_scale) == tuple(settings.values())
    detector, identity = load_model(run)
    assert isinstance(detector.head, OCSoftmaxHead) and detector.head_settings == settings
    assert identity["head"] == settings and identity["score_definition"] == "cosine"
    shell, shell_identity, open_readers = _open_checkpoint(run)  # the ZeRO-3 path reads into a built shell
    readers = open_readers()
    assert shell.head_settings == settings and shell_identity["head"] == settings
    assert key_mismatch(shell, readers.keys()) is None
    assert readers["head.weight"]().shape == (shell.ssl_config.hidden_size, 1)
    torch.testing.assert_close(readers["head.weight"](), detector.head.weight.detach())

    def linear_build(ssl_config, identity):
        from posttrain.config import ModelConfig
        return build_detector(ModelConfig(preset="tiny"), ssl_config=ssl_config)

    with pytest.raises(ValueError, match="model.head: .* set model.head=oc_softmax model.oc_margin_real=0.8"):
        load_model(run, build=linear_build)


def _write_clips(directory, detector) -> tuple[dict, dict]:
    """Six 1.5 s clips and their protocol; ``(paths, reference cosines)``. Labels follow the cosines with one
    swap (mostly ordered, not separable), so a calibration fitted on them keeps the score's orientation."""
    rng = np.random.default_rng(3)
    t = np.arange(int(1.5 * RATE)) / RATE
    clips = {f"tone_{hz}": 0.3 * np.sin(2 * np.pi * hz * t) + 0.02 * rng.standard_normal(t.size)
             for hz in (200, 330, 510)}
    clips.update({f"noise_{i}": level * rng.standard_normal(t.size) for i, level in enumerate((0.05, 0.1, 0.3))})
    paths, expected = {}, {}
    for name, wave in clips.items():
        paths[name] = directory / f"{name}.wav"
        sf.write(paths[name], wave.astype(np.float32), RATE, subtype="FLOAT")
        expected[name] = _reference_cosine(detector, wave.astype(np.float32))
    ranked = sorted(expected, key=expected.get)
    labels = dict(zip(ranked, ("fake", "fake", "real", "fake", "real", "real")))
    write_protocol([ProtocolRow(id=f"T-{name}", label=labels[name], duration_s=1.5, path=f"$ROOT/{name}.wav")
                    for name in clips], directory / "labels.csv")
    return paths, expected


def _reference_cosine(detector, wave: np.ndarray) -> float:
    """The clip normalised (zero mean, unit variance), the encoder's pooled embedding, the cosine to the head weight."""
    x = torch.from_numpy(wave.astype(np.float64))
    x = ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + EPS)).float()[None]
    with torch.no_grad():
        pooled = detector.embed(x, torch.tensor([x.shape[1]]))
    return float(_cosine(pooled, detector.state_dict()["head.weight"])[0])


def test_score_eval_and_calibration_use_the_cosine(oc_run, tmp_path, capsys):
    from posttrain.cli import main
    from posttrain.eval.report import read_scores
    from posttrain.train.checkpoint import load_detector_from_checkpoint

    run, _ = oc_run
    detector, _ = load_detector_from_checkpoint(run)
    paths, expected = _write_clips(tmp_path, detector)
    labelled = ["--labels", str(tmp_path / "labels.csv"), "--root", str(tmp_path)]
    files = [str(path) for path in paths.values()]
    assert main(["score", "--model", str(run), *files, "--no-progress", *labelled, "--scores-out",
                 str(tmp_path / "scores.csv"), "--json", str(tmp_path / "score.json")]) == 0
    out = capsys.readouterr().out
    assert "bona fide when cosine >= 0.35" in out and "P(real): none" in out
    document = json.loads((tmp_path / "score.json").read_text())
    assert document["score_definition"] == "cosine" and document["threshold_cosine"] == pytest.approx(0.35)
    for row in document["results"]:
        name = row["file"].rsplit("/", 1)[-1][:-4]
        assert row["cosine"] == pytest.approx(expected[name], abs=1e-5) and "logit_diff" not in row
        assert row["p_real"] is None and row["decision"] == ("real" if row["cosine"] >= 0.35 else "fake")
    table = read_scores(tmp_path / "scores.csv")
    assert set(table.score_types) == {"cosine"} and table.logits is None
    assert dict(zip(table.ids, table.scores)) == pytest.approx({f"T-{n}": v for n, v in expected.items()}, abs=1e-5)

    assert main(["eval", "--model", str(run), "--protocol", str(tmp_path / "labels.csv"), "--root", str(tmp_path),
                 "--out", str(tmp_path / "report"), "--no-progress", "--bootstrap", "0", "--no-mlflow"]) == 0
    capsys.readouterr()
    evaluated = read_scores(tmp_path / "report" / "scores.csv")
    assert set(evaluated.score_types) == {"cosine"}
    assert dict(zip(evaluated.ids, evaluated.scores)) == pytest.approx(dict(zip(table.ids, table.scores)), abs=1e-6)

    # P(real) of a cosine comes from a calibration fitted on cosines, and only from it
    # fitted on the same clips as a dev split of their own (other trial ids: the test's own are refused)
    (tmp_path / "dev.csv").write_text((tmp_path / "scores.csv").read_text().replace("T-", "D-"))
    assert main(["metrics", str(tmp_path / "scores.csv"), "--fit-calibration", str(tmp_path / "dev.csv"),
                 "--out", str(tmp_path / "calibrated")]) == 0
    calibration = json.loads((tmp_path / "calibrated" / "calibration.json").read_text())
    assert main(["score", "--model", str(run), *files, "--no-progress", "--calibration",
                 str(tmp_path / "calibrated" / "calibration.json"), "--json", str(tmp_path / "calibrated.json")]) == 0
    capsys.readouterr()
    prior = calibration["prior_bona_fide"]
    for row in json.loads((tmp_path / "calibrated.json").read_text())["results"]:
        llr = calibration["slope"] * row["cosine"] + calibration["offset"]
        assert row["llr"] == pytest.approx(llr, abs=1e-9)
        assert row["p_real"] == pytest.approx(1 / (1 + math.exp(-(llr + math.log(prior / (1 - prior))))), abs=1e-9)


def test_serve_and_its_timeline_give_the_window_cosines(oc_run):
    from posttrain.data.audio import Waveform
    from posttrain.loading import load_model
    from posttrain.serve.config import ServeConfig
    from posttrain.serve.service import ServiceState

    run, _ = oc_run
    model, identity = load_model(run)
    rng = np.random.default_rng(5)
    t = np.arange(5 * RATE) / RATE
    wave = (0.2 * np.sin(2 * np.pi * 190 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    spans = [(0, 2 * RATE), (RATE, 3 * RATE), (2 * RATE, 4 * RATE), (3 * RATE, 5 * RATE)]
    windows = [_reference_cosine(model, wave[a:b]) for a, b in spans]
    saved_tempdir = tempfile.tempdir  # the service points tempfile at its own folder
    service = ServiceState(ServeConfig(model=str(run), window_seconds=2.0, hop_seconds=1.0), model, identity,
                           torch.device("cpu"))
    try:
        result = asyncio.run(service._score_wave(Waveform(wave, RATE, RATE), "clip.wav"))
    finally:
        service.close()
        tempfile.tempdir = saved_tempdir
    timeline = result["timeline"]
    assert result["score_definition"] == "cosine" and "logit_diff" not in result
    assert result["cosine"] == pytest.approx(float(np.mean(windows)), abs=1e-5)  # equal windows: the plain mean
    assert [w["cosine"] for w in timeline["windows"]] == pytest.approx(windows, abs=1e-5)
    assert result["p_real"] is None and result["probability_real_calibrated"] is None
    assert timeline["threshold_cosine"] == pytest.approx(0.35) and all(w["p_real"] is None for w in timeline["windows"])
    assert [w["decision"] for w in timeline["windows"]] == ["real" if c >= 0.35 else "fake" for c in windows]


def test_publish_refuses_the_oc_head_in_one_line(oc_run, tmp_path, capsys):
    from posttrain.cli import main

    run, _ = oc_run
    assert main(["publish", "--checkpoint", str(run), "--out", str(tmp_path / "model"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "model.head=oc_softmax" in err and "share the posttrain checkpoint folder" in err
    assert not (tmp_path / "model").exists()


def test_micro_loss_takes_the_heads_loss_on_real_and_join_batches():
    """Both branches of the train step's micro_loss: a real micro-batch's OC loss (scaled sum, per-sample
    losses), and a join batch's dummy forward whose loss x 0 still reaches the OC head (ZeRO's hooks)."""
    from posttrain.config import ModelConfig, load_config
    from posttrain.data.batch import Batch
    from posttrain.models.detector import build_detector
    from posttrain.train.step import StepContext, micro_loss

    torch.manual_seed(0)
    detector = build_detector(ModelConfig(preset="tiny", head="oc_softmax", oc_margin_real=MARGIN_REAL,
                                          oc_margin_fake=MARGIN_FAKE, oc_scale=SCALE))

    class Engine:  # what micro_loss uses of a DeepSpeed engine: the call and the module
        module = detector

        def __call__(self, waveforms, lengths):
            return detector(waveforms, lengths)

    ctx = StepContext(cfg=load_config(None, []), optimizer=None, scheduler=None, device=torch.device("cpu"),
                      world_size=1)
    generator = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(3, 5000, generator=generator), torch.tensor([5000, 4200, 3000]), torch.tensor([1, 0, 0]))
    loss, per_sample = micro_loss(Engine(), batch, 0.25, ctx)
    with torch.no_grad():
        cos = _cosine(detector.embed(batch.waveforms, batch.lengths), detector.head.weight).numpy()
    margin = np.where(batch.labels.numpy() == 1, SCALE * (MARGIN_REAL - cos), SCALE * (cos - MARGIN_FAKE))
    np.testing.assert_allclose(per_sample.double().numpy(), np.logaddexp(0.0, margin), rtol=1e-5, atol=1e-6)
    assert float(loss.detach()) == pytest.approx(0.25 * float(np.logaddexp(0.0, margin).sum()), rel=1e-5)

    detector.zero_grad()
    loss, per_sample = micro_loss(Engine(), Batch.empty(), 0.25, ctx)
    loss.backward()
    assert float(loss) == 0.0 and per_sample.numel() == 0
    assert detector.head.weight.grad is not None and not detector.head.weight.grad.any()


def test_a_finetune_from_an_oc_model_keeps_its_head_and_reports_cosines(oc_run, tmp_path):
    """The loaded model's head decides the fine-tune's (a linear head would not take its weights), and the
    fine-tune's test reports score with the cosine, not real minus fake (2 cos)."""
    from posttrain.config import FinetuneConfig, load_config
    from posttrain.eval.inference import SampleOutput
    from posttrain.finetuning import file_records, initial_detector, segment_records
    from posttrain.loading import load_model

    run, _ = oc_run
    cfg = load_config(None, [f"finetune.init_from={run / 'checkpoints'}", f"output_dir={tmp_path}",
                             "model.preset=tiny"], cls=FinetuneConfig)
    assert cfg.model.head == "linear"
    detector, resolved_cfg = initial_detector(cfg, None, load_model)
    assert resolved_cfg.model.head == "oc_softmax" and detector.head_settings["head"] == "oc_softmax"
    logits = np.array([-0.25, 0.25], dtype=np.float32)  # [-cos, cos]
    outputs = [SampleOutput(k, f"F-2s-{k}", {"label": "real"}, logits, None, 1, 32000) for k in range(2)]
    (segment,) = segment_records(outputs[:1], detector.score_definition)
    (whole,) = file_records(outputs, None, "mean_logits", detector.score_definition)
    assert segment["score"] == pytest.approx(0.25) and whole["score"] == pytest.approx(0.25)
    assert segment["score_type"] == whole["score_type"] == "cosine"
