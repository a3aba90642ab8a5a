"""Scoring modes: ``antideepfake`` scores every file whole and alone (AntiDeepfake's test protocol),
``windowed`` cuts and batches; every report says which mode produced it."""

import argparse
import json

import numpy as np
import pytest
import torch
import yaml

from posttrain.config import ModelConfig
from posttrain.commands.inference_options import add_arguments, config_from_args
from posttrain.eval.inference import Sample, iter_outputs
from posttrain.eval.scoring import InferenceConfig
from posttrain.eval.report import UNKNOWN_SCORING, write_report
from posttrain.models.detector import build_detector

SAMPLE_RATE_HZ = 16_000


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_antideepfake_mode_is_whole_files_batch_one_and_refuses_window_options():
    cfg = config_from_args(_args("--mode", "antideepfake"))
    assert (cfg.mode, cfg.window.window_seconds, cfg.max_batch_size) == ("antideepfake", 0.0, 1)
    assert cfg.describe()["mode"] == "antideepfake" and "whole" in cfg.summary()
    with pytest.raises(ValueError, match="--window-seconds"):
        config_from_args(_args("--mode", "antideepfake", "--window-seconds", "4"))
    with pytest.raises(ValueError, match="--max-batch-size"):
        config_from_args(_args("--mode", "antideepfake", "--max-batch-size", "8"))
    with pytest.raises(ValueError, match="mode: antideepfake"):
        InferenceConfig(mode="antideepfake").validate()  # 13 s windows are not AD's protocol
    assert config_from_args(_args()).summary().startswith("windowed: 13 s windows")


def test_antideepfake_mode_scores_each_file_whole_and_alone():
    torch.manual_seed(0)
    model = build_detector(ModelConfig(preset="tiny_group_norm")).eval()
    rng = np.random.default_rng(0)
    seconds = (20.0, 3.0, 0.5)  # the first is longer than a 13 s window
    samples = [Sample(i, f"f{i}", (0.1 * rng.standard_normal(int(s * SAMPLE_RATE_HZ))).astype(np.float32), {})
               for i, s in enumerate(seconds)]
    batch_sizes = []
    hook = model.head.register_forward_hook(lambda module, inputs, output: batch_sizes.append(inputs[0].shape[0]))
    try:
        outputs = {out.id: out for out in iter_outputs(model, samples, InferenceConfig.antideepfake(progress=False))}
    finally:
        hook.remove()
    assert batch_sizes == [1, 1, 1]
    for sample in samples:
        out = outputs[sample.id]
        assert out.num_windows == 1 and out.num_samples == len(sample.wave)
        # independent reference: the whole file, normalised as one utterance
        x = torch.from_numpy(sample.wave)
        x = ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7))[None]
        with torch.no_grad():
            expected = model(x, torch.tensor([x.shape[1]]))[0].numpy()
        np.testing.assert_allclose(out.logits, expected, atol=1e-5, rtol=0)


def _records(n: int = 20) -> list[dict]:
    return [{"id": f"X-{i}", "score": float(i % 7) - (i % 2) * 3.0, "label": i % 2, "score_type": "logit_diff"}
            for i in range(n)]


@pytest.mark.parametrize("scoring", [InferenceConfig.antideepfake().summary(), None])
def test_every_report_file_names_the_scoring_mode(tmp_path, scoring):
    options = {} if scoring is None else {"scoring": scoring}
    report = write_report(tmp_path, _records(), score_definition="logit_diff", model_identity={},
                          data_identity={}, **options)
    expected = scoring or UNKNOWN_SCORING
    assert report["table"].splitlines()[0] == f"scoring: {expected}"
    assert (tmp_path / "metrics.txt").read_text().splitlines()[0] == f"scoring: {expected}"
    assert json.loads((tmp_path / "metrics.json").read_text())["scoring"] == expected
    assert yaml.safe_load((tmp_path / "result.yaml").read_text())["scoring"] == expected
