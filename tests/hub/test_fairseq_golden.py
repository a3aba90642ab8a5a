"""Golden test against fairseq itself: tiny fairseq models of AntiDeepfake's three encoder families
(tests/fixtures/fairseq, made by make_fixtures.py with fairseq 862efab under Python 3.10) score in
posttrain exactly as AntiDeepfake's own forward scored them there, at every input level from -60 to
0 dBFS, batch 1 and in zero-padded batches. No fairseq is needed here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from posttrain.data.batch import Batch
from posttrain.hub.antideepfake import convert_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fairseq"
RECORD = json.loads((FIXTURES / "logits.json").read_text(encoding="utf-8"))
FAMILIES = sorted(RECORD["families"])
LEVELS = [float(level) for level in RECORD["levels_dbfs"]]
TOLERANCE = 1e-4  # max |logit difference| allowed against fairseq
AD_EPS = RECORD["normalisation"]["eps"]


def waves_at(level_dbfs: float) -> list[torch.Tensor]:
    """The fixture waveforms at ``level_dbfs`` peak, scaled exactly as make_fixtures.py scales them."""
    base = load_file(FIXTURES / "waveforms.safetensors")
    return [torch.from_numpy((base[name].numpy().astype(np.float64) * 10.0 ** (level_dbfs / 20.0))
                             .astype(np.float32)) for name in RECORD["waveforms"]]


def fairseq_logits(family: str, level_dbfs: float) -> torch.Tensor:
    return torch.tensor(RECORD["families"][family]["logits"][f"{level_dbfs:g}"], dtype=torch.float64)


def test_fixtures_cover_the_three_families_and_the_level_range():
    presets = {RECORD["families"][family]["preset"] for family in FAMILIES}
    assert presets == {"tiny_group_norm", "tiny", "tiny_hubert"}
    assert min(LEVELS) == -60.0 and max(LEVELS) == 0.0
    assert RECORD["fairseq_commit"].startswith("862efab")


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_release_is_the_fixture_preset_with_pretraining_keys_ignored(family):
    _, identity = convert_checkpoint(FIXTURES / family)
    assert identity["preset"] == RECORD["families"][family]["preset"]
    ignored = identity["source"]["ignored_pretraining_keys"]
    assert "m_ssl.model.mask_emb" in ignored
    assert any(key.startswith("m_ssl.model.label_embs" if family == "hubert" else "m_ssl.model.quantizer")
               for key in ignored)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_release_equals_fairseq_at_every_level_batch_one_and_padded(family):
    detector, _ = convert_checkpoint(FIXTURES / family)
    assert detector.input_eps == AD_EPS  # the release carries AntiDeepfake's normalisation
    for level in LEVELS:
        waves = waves_at(level)
        batch = Batch.collate(waves, [0] * len(waves), [], [])
        with torch.no_grad():
            padded = detector(detector.normalise(batch.waveforms, batch.lengths), batch.lengths)
            singles = torch.cat([detector(detector.normalise(w[None], torch.tensor([w.numel()])),
                                          torch.tensor([w.numel()])) for w in waves])
        expected = fairseq_logits(family, level)
        assert (padded.double() - expected).abs().max() < TOLERANCE, (family, level)
        assert (singles.double() - expected).abs().max() < TOLERANCE, (family, level)
