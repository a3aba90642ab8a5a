"""AntiDeepfake's fine-tuning recipes (hparams/ft_grpo/*.yaml at 0dea622, reduced to
tests/fixtures/ad_grpo/ft_grpo_hparams.json) key by key against posttrain's recipe of their kind, loaded
with the recipe's model as an override: ``*-grpo_v1`` (GRPO) -> configs/finetune/df2024_grpo.yaml,
``*-grpo_v2`` (GRPO_s) -> df2024_grpo_s.yaml, ``*-sft`` -> df2024_antideepfake.yaml.

Every key of a recipe is either mapped (``RECIPE_KEYS``, a check per key) or listed with its reason
(``IGNORED``); any other key fails, so a key AD adds cannot slip by. The ``*_pre-post`` recipes score
the post-trained model without fine-tuning: they are recognised as inference only and not mapped."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from posttrain.config import GRPO_VARIANTS, FinetuneConfig, load_config, to_dict
from posttrain.config.training import layerdrop_conflicts
from posttrain.models.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]
HPARAMS = json.loads((REPO / "tests/fixtures/ad_grpo/ft_grpo_hparams.json").read_text(encoding="utf-8"))
AD_COMMIT = "0dea622bde8f064c8ee5a557f2598643123fc6b6"

# AD recipe kind -> posttrain's recipe for it
POSTTRAIN_RECIPE = {"pre-post-grpo_v1": "df2024_grpo.yaml", "pre-post-grpo_v2": "df2024_grpo_s.yaml",
                    "pre-post-sft": "df2024_antideepfake.yaml"}
# scoring the post-trained checkpoint without fine-tuning (rl_config.algo null, which AD's main.py turns into
# no RL; its lr 1e-7 / 800k steps / 30 epochs are the post-training values, never used): posttrain's
# counterpart is `posttrain eval --mode antideepfake` on the release, not a fine-tuning recipe
INFERENCE_ONLY = "pre-post"
# AD's model_name (models/W2V.py) -> posttrain preset, whose released checkpoint is the model fine-tuned
AD_PRESETS = {"mms_1b": "mms_1b", "mms_300m": "mms_300m", "w2v_large": "wav2vec2_large",
              "w2v_small": "wav2vec2_small", "xlsr_1b": "xlsr_1b", "xlsr_2b": "xlsr_2b"}
# AD's fit_batch override has no torch.autocast: whatever `precision` says, forward and backward run in fp32;
# "fp16" only turns on speechbrain's GradScaler, which multiplies and divides fp32 gradients by powers of two
# (exact) and skips non-finite steps (posttrain skips those in every precision). posttrain's fp16 would
# compute in fp16 (DeepSpeed), further from AD than fp32: the parity recipes say fp32 (docs/parity.md).
AD_COMPUTE_PRECISION = {"fp16": "fp32", "bf16": "fp32", "fp32": "fp32"}
# the variants that keep an old policy (AD's old_detector: grpo3's clipped ratio); both keep the reference
OLD_POLICY = {"grpo3": True, "grpo2": False}
# rl_config keys -> grpo.* ; values AD's algo/rl.py uses when the key is absent; keys a variant never reads
RL_KEYS = {"algo": "variant", "sample_num": "sample_num", "std_floor": "std_floor", "beta": "beta",
           "epsilon": "epsilon", "inner_step_size": "inner_step_size"}
AD_CODE_DEFAULTS = {"beta": 1.0}  # rl_config.get('beta', 1.0)
UNREAD = {"grpo3": set(), "grpo2": {"epsilon", "inner_step_size"}}
# the RawBoost block (identical in all 24 files) -> rawboost.* (AD's names: its RawBoost.py / hparams)
RAWBOOST_KEYS = {
    "LnL_convolutive_noise": {"nBands": "n_bands", "minF": "min_f_hz", "maxF": "max_f_hz", "minBW": "min_bw_hz",
                              "maxBW": "max_bw_hz", "minCoeff": "min_coeff", "maxCoeff": "max_coeff",
                              "minG": "min_g_db", "maxG": "max_g_db", "minBiasLinNonLin": "min_bias_db",
                              "maxBiasLinNonLin": "max_bias_db", "N_f": "n_f"},
    "ISD_additive_noise": {"P": "p_percent", "g_sd": "g_sd"},
    # AD's recipes set no SNRmax (posttrain's snr_max_db: 40): SSI noise is algo 3, not part of algo 5 (1+2)
    "SSI_additive_noise": {"SNRmin": "snr_min_db"},
}


@dataclass
class Ctx:
    cfg: FinetuneConfig
    recipe: dict[str, Any]
    preset: str


def is_inference_only(recipe: dict[str, Any]) -> bool:
    return recipe["kind"] == INFERENCE_ONLY and (recipe["rl_config"] or {}).get("algo", "") is None


def overrides(model_name: str) -> list[str]:
    """The backbone of an AD recipe as the posttrain recipes' headers say to choose it."""
    preset = AD_PRESETS[model_name]
    extra = ["model.gradient_checkpointing=false"] if preset == "wav2vec2_small" else []  # keeps its LayerDrop
    return [f"finetune.init_from={PRESETS[preset].antideepfake_repo}", f"finetune.init_preset={preset}",
            f"model.preset={preset}", *extra]


def posttrain_config(recipe: dict[str, Any]) -> FinetuneConfig:
    return load_config(REPO / "configs/finetune" / POSTTRAIN_RECIPE[recipe["kind"]], overrides(recipe["model_name"]),
                       cls=FinetuneConfig)


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ------------------------------------------------------------------------------------ the checks


def same(*keys: str, as_: Callable[[Any], Any] = lambda value: value) -> Callable[[Any, Ctx], None]:
    """AD's value (through ``as_``) is what every posttrain key in ``keys`` holds."""
    def check(value: Any, ctx: Ctx) -> None:
        for key in keys:
            assert get(ctx.cfg, key) == as_(value), f"posttrain {key} = {get(ctx.cfg, key)!r}, AD {value!r}"
    return check


def ad_lr(update: int, optimizer_lr: float, scheduler: dict[str, Any]) -> float:
    """AD's learning rate at its 1-based optimiser update: speechbrain 1.0.2's WarmAndExpDecayLRSchedule,
    called after every update from its step 0, so update 1 runs at the optimiser's own lr, update 2 at
    step 0's rate (0), update k at step k - 2's."""
    if update == 1:
        return optimizer_lr
    step, lr, warmup = update - 2, scheduler["lr"], scheduler["n_warmup_steps"]
    if step < warmup:
        return lr * step / warmup
    decayed = lr * scheduler["decay_factor"] ** ((step - warmup) / (scheduler["total_steps"] - warmup))
    return min(lr, decayed)


def check_schedule(scheduler: dict[str, Any], ctx: Ctx) -> None:
    from posttrain.train.schedule import lr_factor

    cfg, recipe = ctx.cfg, ctx.recipe
    assert scheduler["class"] == "speechbrain.nnet.schedulers.WarmAndExpDecayLRSchedule", scheduler["class"]
    assert set(scheduler) == {"class", "lr", "n_warmup_steps", "total_steps", "decay_factor"}, sorted(scheduler)
    assert (scheduler["lr"], scheduler["n_warmup_steps"]) == (cfg.optim.lr, cfg.schedule.warmup_steps)
    assert scheduler["total_steps"] == cfg.train.max_steps  # AD: total_steps = optimizer_step_limit
    assert scheduler["decay_factor"] == cfg.schedule.final_lr_ratio

    def posttrain_lr(update: int) -> float:  # posttrain's lr_factor takes the 0-based step
        return cfg.optim.lr * lr_factor(update - 1, cfg.schedule)

    last = cfg.train.max_steps
    # neither leaves the warm-up before the step limit: the decay (and decay_end_steps) is never reached
    assert last - 2 < scheduler["n_warmup_steps"] and last - 1 < cfg.schedule.warmup_steps
    # AD's ramp is posttrain's two updates later (docs/parity.md "warm-up indexing")...
    for update in (3, 4, 1000, 25_002, 40_000, last):
        assert ad_lr(update, recipe["optimizer"]["lr"], scheduler) == pytest.approx(posttrain_lr(update - 2),
                                                                                    rel=1e-12), update
    # ... after AD's first two updates at the optimiser's lr and at 0 (posttrain: lr/80k and 2 lr/80k)
    assert [ad_lr(k, recipe["optimizer"]["lr"], scheduler) for k in (1, 2)] == [1e-6, 0.0]
    assert [posttrain_lr(k) for k in (1, 2)] == pytest.approx([1e-6 / 80_000, 2e-6 / 80_000], rel=1e-12)
    # the last update: AD 1e-6 x 49,998/80k, posttrain 1e-6 x 50k/80k = 6.25e-7
    assert ad_lr(last, recipe["optimizer"]["lr"], scheduler) == pytest.approx(1e-6 * 49_998 / 80_000, rel=1e-12)
    assert posttrain_lr(last) == pytest.approx(6.25e-7, rel=1e-12)


def check_optimizer(optimizer: dict[str, Any], ctx: Ctx) -> None:
    import torch

    from posttrain.train.step import SkippableAdamW

    assert optimizer["class"] == "torch.optim.AdamW" and issubclass(SkippableAdamW, torch.optim.AdamW)
    assert set(optimizer) == {"class", "lr", "weight_decay", "eps"}, sorted(optimizer)
    assert (optimizer["lr"], optimizer["weight_decay"], optimizer["eps"]) == (
        ctx.cfg.optim.lr, ctx.cfg.optim.weight_decay, ctx.cfg.optim.eps)
    assert ctx.cfg.optim.betas == [0.9, 0.999]  # AD sets none: torch's defaults


def check_epoch_counter(counter: dict[str, Any], ctx: Ctx) -> None:
    assert counter == {"class": "speechbrain.utils.epoch_loop.EpochCounter", "limit": ctx.cfg.train.max_epochs}


def check_detector(detector: dict[str, Any], ctx: Ctx) -> None:
    # models.W2V.Model: the SSL encoder, mean pooling and proj_fc (posttrain's Detector); loss softmax is
    # the two-logit linear head with cross-entropy, ocsoftmax the one-class head
    assert detector == {"class": "models.W2V.Model", "loss": detector["loss"]}, detector
    head = {"softmax": "linear", "ocsoftmax": "oc_softmax"}[detector["loss"]]
    assert ctx.cfg.model.head == head, (ctx.cfg.model.head, detector["loss"])


def check_model_name(model_name: str, ctx: Ctx) -> None:
    preset = AD_PRESETS[model_name]
    assert ctx.cfg.model.preset == ctx.cfg.finetune.init_preset == preset
    assert ctx.cfg.finetune.init_from == PRESETS[preset].antideepfake_repo  # AD's released post-trained model
    if preset == "wav2vec2_small":  # keeps AD's LayerDrop 0.05 (activation checkpointing would turn it off)
        assert not layerdrop_conflicts(ctx.cfg), layerdrop_conflicts(ctx.cfg)


def check_valid_step(valid_step: int, ctx: Ctx) -> None:
    # AD counts batches; one batch is one optimiser step without accumulation (asserted below)
    assert ctx.cfg.train.valid_every_steps == valid_step
    # AD validates on its valid.csv (ASVspoof2019-LA dev) and keeps the best-EER checkpoint only
    assert ctx.cfg.data.valid.shards and ctx.cfg.finetune.test_checkpoint == "best"


def check_batch_sampler(sampler: dict[str, Any], ctx: Ctx) -> None:
    assert sampler == {key: ctx.recipe[key] for key in ("max_batch_length", "num_buckets", "shuffle", "batch_ordering")}


def check_shuffle(shuffle: bool, ctx: Ctx) -> None:
    # AD reshuffles the whole set each epoch; posttrain's stream shuffles in a bounded window (parity "batching")
    assert shuffle is True and ctx.cfg.data.train.shuffle_buffer > 0


def check_batch_ordering(ordering: str, ctx: Ctx) -> None:
    # AD emits its batches in random order; posttrain's leave its buckets in stream order (parity "batching")
    assert ordering == "random"


def check_grad_accumulation(factor: int | None, ctx: Ctx) -> None:
    expected = HPARAMS["speechbrain_1.0.2_defaults"]["grad_accumulation_factor"] if factor is None else factor
    assert ctx.cfg.train.grad_accum_steps == expected == 1  # so AD's batch counters are optimiser steps


def check_precision(precision: str, ctx: Ctx) -> None:
    assert ctx.cfg.train.precision == AD_COMPUTE_PRECISION[precision], (ctx.cfg.train.precision, precision)


def check_rl_config(rl: dict[str, Any] | None, ctx: Ctx) -> None:
    grpo = ctx.cfg.grpo
    if rl is None:  # SFT: cross-entropy
        assert not grpo.enabled
        return
    assert set(rl) <= set(RL_KEYS), f"rl_config keys not mapped: {sorted(set(rl) - set(RL_KEYS))}"
    variant = rl["algo"]
    assert variant in GRPO_VARIANTS and grpo.enabled and grpo.variant == variant, (variant, grpo)
    assert grpo.normalise == "batch"  # AD's code: mean and std over every sample of the batch
    for key, field in RL_KEYS.items():
        if key == "algo":
            continue
        if key in rl:
            assert getattr(grpo, field) == rl[key], f"grpo.{field} = {getattr(grpo, field)!r}, AD {rl[key]!r}"
        elif key in AD_CODE_DEFAULTS:
            assert getattr(grpo, field) == AD_CODE_DEFAULTS[key], f"grpo.{field}: AD's code default {AD_CODE_DEFAULTS[key]}"
        else:
            assert key in UNREAD[variant], f"AD's rl_config lacks {key}, which {variant} reads"
    if "inner_step_size" in rl:  # AD refreshes after every n batches, posttrain after n optimiser steps
        assert ctx.cfg.train.grad_accum_steps == 1


def check_rl_algo(algo: str | None, ctx: Ctx) -> None:
    assert algo == (ctx.recipe["rl_config"] or {}).get("algo")
    assert ctx.cfg.grpo.enabled == (algo is not None) and (algo is None or ctx.cfg.grpo.variant == algo)


def check_ref_detector(ref: str | None, ctx: Ctx) -> None:
    # both GRPO variants keep the initial model as reference (posttrain: a frozen copy of finetune.init_from)
    assert ref in (None, ctx.recipe["model_name"]) and ctx.cfg.grpo.enabled == (ref is not None)


def check_old_detector(old: str | None, ctx: Ctx) -> None:
    assert old in (None, ctx.recipe["model_name"])
    assert (old is not None) == (ctx.cfg.grpo.enabled and OLD_POLICY[ctx.cfg.grpo.variant]), (old, ctx.cfg.grpo)


def check_file(file: str, ctx: Ctx) -> None:
    assert file == f"hparams/ft_grpo/{ctx.recipe['model_name']}_{ctx.recipe['kind']}.yaml"


def check_kind(kind: str, ctx: Ctx) -> None:
    assert kind in POSTTRAIN_RECIPE  # the recipe was loaded by its kind


RECIPE_KEYS: dict[str, Callable[[Any, Ctx], None]] = {
    "file": check_file,
    "kind": check_kind,
    "model_name": check_model_name,
    "detector": check_detector,
    "seed": same("train.seed", "data.train.seed", "rawboost.seed"),
    "use_da": same("rawboost.enabled"),
    "rawboost_algo": same("rawboost.algo"),
    "number_of_epochs": same("train.max_epochs"),
    "epoch_counter": check_epoch_counter,
    "precision": check_precision,
    "max_grad_norm": same("optim.grad_clip_norm"),
    "optimizer_step_limit": same("train.max_steps"),
    "valid_step": check_valid_step,
    "max_batch_length": same("data.train.max_batch_seconds", as_=float),  # seconds per batch (per process)
    "num_buckets": same("data.train.num_buckets"),
    "shuffle": check_shuffle,
    "batch_ordering": check_batch_ordering,
    "dynamic_batch_sampler_train": check_batch_sampler,
    "lr": same("optim.lr"),
    "warmup": same("schedule.warmup_steps"),
    "optimizer": check_optimizer,
    "weight_decay": same("optim.weight_decay"),
    "eps": same("optim.eps"),
    "lr_scheduler": check_schedule,
    "decay_factor": same("schedule.final_lr_ratio"),  # never reached (check_schedule)
    "rl_config": check_rl_config,
    "rl_algo": check_rl_algo,
    "ref_detector": check_ref_detector,
    "old_detector": check_old_detector,
    "grad_accumulation_factor": check_grad_accumulation,
}
IGNORED = {
    "log_interval": "logging cadence (posttrain: train.log_every_steps); changes no result",
    "num_workers": "data-loader processes; changes no result",
    "valid_batch_size": "validation runs in eval mode with padding masked in posttrain, so its batching changes "
                        "no score (posttrain batches it by data.valid.max_batch_seconds)",
    "ckpt_path": "AD's local file of the post-trained weights; posttrain's is finetune.init_from, the model's "
                 "release (checked under model_name)",
}


def mismatches(recipe: dict[str, Any], cfg: FinetuneConfig) -> list[str]:
    """Every way ``cfg`` differs from AD's ``recipe``, one line per key; unmapped keys are differences."""
    ctx = Ctx(cfg, recipe, AD_PRESETS.get(recipe.get("model_name"), "?"))
    problems = [f"{key}: not mapped (map it in RECIPE_KEYS or list it in IGNORED with the reason)"
                for key in recipe if key not in RECIPE_KEYS and key not in IGNORED]
    problems += [f"{key}: mapped but not in AD's recipe (stale mapping?)" for key in RECIPE_KEYS if key not in recipe]
    for key, check in RECIPE_KEYS.items():
        if key in recipe:
            try:
                check(recipe[key], ctx)
            except (AssertionError, KeyError) as error:
                problems.append(f"{key}: {type(error).__name__} {error}")
    return problems


FINETUNING = sorted(stem for stem, recipe in HPARAMS["recipes"].items() if recipe["kind"] in POSTTRAIN_RECIPE)


# ------------------------------------------------------------------------------------------- tests


def test_fixture_is_ads_and_every_recipe_is_mapped_or_inference_only():
    assert set(HPARAMS) == {"ad_commit", "source", "kinds", "speechbrain_1.0.2_defaults", "rawboost",
                            "rawboost_note", "recipes"}
    assert HPARAMS["ad_commit"] == AD_COMMIT
    assert set(HPARAMS["kinds"]) == set(POSTTRAIN_RECIPE) | {INFERENCE_ONLY}
    recipes = HPARAMS["recipes"]
    inference = sorted(stem for stem, recipe in recipes.items() if is_inference_only(recipe))
    assert sorted(FINETUNING + inference) == sorted(recipes)  # a new kind of recipe fails here
    assert len(FINETUNING) == 18 and len(inference) == 6
    assert {recipes[stem]["model_name"] for stem in inference} == set(AD_PRESETS)
    # an inference-only recipe carries the post-training values, which no fine-tuning uses: not mapped
    for stem in inference:
        assert (recipes[stem]["lr"], recipes[stem]["optimizer_step_limit"]) == (1e-7, 800_000)
    assert {recipe["model_name"] for recipe in recipes.values()} == set(AD_PRESETS)
    assert all(PRESETS[preset].antideepfake_repo for preset in AD_PRESETS.values())


@pytest.mark.parametrize("stem", FINETUNING)
def test_recipe_maps_key_by_key(stem):
    recipe = HPARAMS["recipes"][stem]
    problems = mismatches(recipe, posttrain_config(recipe))
    assert not problems, "\n".join(problems)


def test_rawboost_parameters_are_posttrains():
    boost = HPARAMS["rawboost"]
    assert set(boost) == {"algo", *RAWBOOST_KEYS}, sorted(boost)
    for name in POSTTRAIN_RECIPE.values():
        cfg = load_config(REPO / "configs/finetune" / name, cls=FinetuneConfig).rawboost
        assert cfg.enabled and cfg.algo == boost["algo"] == 5
        for group, keys in RAWBOOST_KEYS.items():
            assert set(boost[group]) == set(keys), (group, sorted(boost[group]))  # a new parameter fails
            for ad_key, key in keys.items():
                assert getattr(cfg, key) == boost[group][ad_key], (name, group, ad_key)


def test_grpo_recipes_are_the_sft_recipe_with_grpo():
    """GRPO against SFT is a comparison of objectives only: everything else is the SFT recipe's."""
    base = to_dict(load_config(REPO / "configs/finetune/df2024_antideepfake.yaml", cls=FinetuneConfig))
    assert not base["grpo"]["enabled"]
    for name, suffix in (("df2024_grpo.yaml", "_grpo"), ("df2024_grpo_s.yaml", "_grpo_s")):
        ours = to_dict(load_config(REPO / "configs/finetune" / name, cls=FinetuneConfig))
        assert ours.pop("grpo")["enabled"]
        assert ours.pop("output_dir") == "runs/finetune_df2024" + suffix
        assert ours["tracking"].pop("experiment") == "finetune-df2024" + suffix.replace("_", "-")
        other = copy.deepcopy(base)
        other.pop("grpo"), other.pop("output_dir"), other["tracking"].pop("experiment")
        assert ours == other, name


def test_a_wrong_or_unmapped_value_is_reported():
    """The mapping can fail: each edit of an AD recipe below is caught, naming its key."""
    recipe = HPARAMS["recipes"]["xlsr_1b_pre-post-grpo_v1"]
    cfg = posttrain_config(recipe)
    assert mismatches(recipe, cfg) == []
    edits = {
        "lr": lambda r: r.update(lr=2e-6),
        "warmup": lambda r: r.update(warmup=40_000),
        "new_key": lambda r: r.update(new_key=1),
        "rl_config": lambda r: r["rl_config"].pop("beta"),  # AD's code would then weigh the KL by 1.0
        "old_detector": lambda r: r.update(old_detector=None),
        "precision": lambda r: r.update(precision="fp8"),
        "lr_scheduler": lambda r: r["lr_scheduler"].update(total_steps=60_000),
        "num_buckets": lambda r: r.update(num_buckets=10),
    }
    for key, edit in edits.items():
        wrong = copy.deepcopy(recipe)
        edit(wrong)
        assert any(line.startswith(f"{key}:") for line in mismatches(wrong, cfg)), key
    # and the other way round: a posttrain value off AD's
    grpo2 = posttrain_config(HPARAMS["recipes"]["xlsr_1b_pre-post-grpo_v2"])
    assert any(line.startswith("rl_config:") for line in mismatches(recipe, grpo2))
    assert any(line.startswith("old_detector:") for line in mismatches(recipe, grpo2))
