"""The AntiDeepfake schedule against its formula, written out independently here."""

import math

import pytest
import torch

from posttrain.config import ScheduleConfig
from posttrain.train.schedule import build_scheduler, lr_factor


def reference(step, warmup, decay_end, ratio):
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_end:
        return ratio
    # exponential interpolation between 1 at the end of warm-up and `ratio` at decay_end
    return math.exp(math.log(ratio) * (step - warmup) / (decay_end - warmup))


@pytest.mark.parametrize("warmup,decay_end,ratio", [(80_000, 800_000, 0.01), (10, 50, 0.1), (0, 20, 0.5), (5, 5, 0.01)])
def test_factor_matches_formula(warmup, decay_end, ratio):
    cfg = ScheduleConfig(warmup_steps=warmup, decay_end_steps=decay_end, final_lr_ratio=ratio)
    for step in sorted({0, 1, warmup - 1, warmup, warmup + 1, (warmup + decay_end) // 2, decay_end - 1,
                        decay_end, decay_end + 7, 10 * decay_end + 3} - {-1}):
        assert lr_factor(step, cfg) == pytest.approx(reference(step, warmup, decay_end, ratio), rel=1e-12), step


def test_antideepfake_landmarks():
    cfg = ScheduleConfig()
    assert lr_factor(0, cfg) == pytest.approx(1 / 80_000)
    assert lr_factor(79_999, cfg) == 1.0 and lr_factor(80_000, cfg) == 1.0
    assert lr_factor(440_000, cfg) == pytest.approx(0.1)  # halfway through the decay: sqrt(0.01)
    assert lr_factor(800_000, cfg) == pytest.approx(0.01) and lr_factor(2_000_000, cfg) == pytest.approx(0.01)


def test_lambda_lr_drives_the_optimizer():
    cfg = ScheduleConfig(warmup_steps=3, decay_end_steps=9, final_lr_ratio=0.01)
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=0.2)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.2 * reference(s, 3, 9, 0.01) for s in range(12)], rel=1e-12)
    # the state round-trips (it is stored in posttrain.json)
    import json

    restored = build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.2), cfg)
    restored.load_state_dict(json.loads(json.dumps(scheduler.state_dict())))
    assert restored.get_last_lr() == scheduler.get_last_lr() and restored.last_epoch == 12
