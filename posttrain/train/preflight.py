"""Checks a post-training run can pass before it starts or queues (``posttrain train --preflight``,
``launch/slurm_posttrain.sh`` before ``sbatch``): every shard set exists, is indexed and fits its role
(a validation set holds both classes), and the pre-trained backbone is on disk or in the Hugging Face
cache. A problem raises an error naming the config key and the fix; hours in a queue are not spent
to learn that a path had a typo."""

from __future__ import annotations

from pathlib import Path

from posttrain.config import PosttrainConfig
from posttrain.data.shards import check_shard_set
from posttrain.errors import UserError
from posttrain.hubcache import locate_pretrained


def check_shards(cfg: PosttrainConfig) -> list[str]:
    """One line per shard set; raises ``UserError`` naming the key (``data.valid.shards[0]``) of a bad set."""
    if not cfg.data.train.shards:
        raise UserError("data.train.shards: no training shard set; set data.train.shards=[DIR, ...]")
    lines = []
    for role, sets in (("train", cfg.data.train.shards), ("valid", cfg.data.valid.shards)):
        for position, directory in enumerate(sets):
            key = f"data.{role}.shards[{position}]"
            try:
                totals = check_shard_set(directory, role)["totals"]
            except ValueError as error:
                raise UserError(f"{key}: {error}") from None
            labels = {label: count["samples"] for label, count in sorted(totals["by_label"].items())}
            lines.append(f"{key}: {directory}: {totals['samples']} samples, {totals['seconds'] / 3600:.2f} h, {labels}")
    return lines


def preflight(cfg: PosttrainConfig, *, check_backbone: bool = True) -> list[str]:
    """What was checked, one line each; raises ``UserError`` / ``FileNotFoundError`` on the first problem."""
    lines = check_shards(cfg)
    if check_backbone and cfg.model.pretrained:
        lines.append(f"model.pretrained: {cfg.model.pretrained}: found at {locate_pretrained(cfg.model.pretrained)}")
    output = Path(cfg.output_dir)
    resume = output / "checkpoints" / "latest"
    lines.append(f"output_dir: {output} ({'resumes from ' + str(resume) if resume.exists() else 'a new run'})")
    return lines
