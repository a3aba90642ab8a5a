"""GRPO's objective for a binary detector, as AntiDeepfake's ``algo/rl.py`` defines it (0dea622).

For every utterance the policy samples ``M`` labels from its own softmax; a sampled label earns reward 1
when it is the truth, else 0. Rewards become advantages by the mean and the unbiased standard deviation
over the samples of the batch (``normalise="batch"``, what AntiDeepfake's code does although its README
says group-normalised), or over each utterance's own ``M`` samples (``"group"``, the GRPO paper's). The
per-sample objective is ``pg - beta * KL`` with the KL estimate ``exp(ref - logp) - (ref - logp) - 1``
against the frozen reference model on the sampled label, and

* ``grpo2`` (GRPO_s): ``pg = exp(logp - sg(logp)) * A``: value ``A``, gradient ``A * d logp``;
* ``grpo3`` (GRPO): ``pg = min(r A, clip(r, 1 - eps, 1 + eps) A)`` with ``r = exp(logp - logp_old)``
  against the old policy.

The loss is ``-mean`` of the objective. Here it is returned as per-sample terms so a distributed step
can sum them over ranks and micro-batches and divide by the global count once; ``batch`` normalisation
spans the micro-batch on every rank (one all_reduce of two integers), which is AntiDeepfake's batch
whenever a step is one micro-batch (its recipes never accumulate). tests/fixtures/ad_grpo holds AD's own
losses and gradients; tests/train/test_grpo.py compares these functions with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from posttrain.dist import global_sums


@dataclass
class GrpoTerms:
    """Per-sample pieces of one micro-batch, shape ``(B, M)``."""

    objective: torch.Tensor  # pg - beta * KL (maximised; differentiable through the policy's logits)
    kl: torch.Tensor  # detached
    reward: torch.Tensor  # 0/1
    clipped: torch.Tensor  # bool: grpo3's clipped branch was the smaller one (False for grpo2)


def sample_labels(logits: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """``samples`` labels per row from the policy's own softmax, with replacement (AD: torch.multinomial
    under no_grad); ``generator`` makes them reproducible across a resume."""
    with torch.no_grad():
        probabilities = F.softmax(logits.detach().float(), dim=-1)
        return torch.multinomial(probabilities.cpu(), samples, replacement=True, generator=generator).to(logits.device)


def advantages(reward: torch.Tensor, std_floor: float, normalise: str, group: Any = None) -> torch.Tensor:
    """``(reward - mean) / (unbiased std + std_floor)``: over every sample of the batch on every rank of
    ``group`` (``batch``), or per row (``group``). Rewards are 0/1, so the batch's mean and variance follow
    exactly from two integers (samples, correct ones), summed over ranks in one all_reduce."""
    if normalise == "group":
        return (reward - reward.mean(dim=1, keepdim=True)) / (reward.std(dim=1, keepdim=True) + std_floor)
    counts = global_sums(torch.stack([reward.new_tensor(float(reward.numel())), reward.sum()]).double(), group)
    samples, correct = (round(value) for value in counts.tolist())
    mean = correct / samples
    variance = correct * (samples - correct) / (samples * (samples - 1)) if samples > 1 else math.nan
    return (reward - mean) / (math.sqrt(variance) + std_floor)


def _label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits, dim=-1).gather(1, labels)


def grpo_terms(logits: torch.Tensor, ref_logits: torch.Tensor, old_logits: torch.Tensor | None,
               sampled: torch.Tensor, labels: torch.Tensor, *, beta: float, epsilon: float, std_floor: float,
               normalise: str = "batch", group: Any = None) -> GrpoTerms:
    """The objective's per-sample terms; ``old_logits`` None is grpo2, else grpo3."""
    reward = (sampled == labels.view(-1, 1)).to(logits.dtype)
    advantage = advantages(reward, std_floor, normalise, group).to(logits.dtype)
    logp = _label_log_probs(logits, sampled)
    ref = _label_log_probs(ref_logits.detach().to(logits.dtype), sampled)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    if old_logits is None:
        policy_gradient = torch.exp(logp - logp.detach()) * advantage
        clipped = torch.zeros_like(reward, dtype=torch.bool)
    else:
        ratio = torch.exp(logp - _label_log_probs(old_logits.detach().to(logits.dtype), sampled))
        unclipped = ratio * advantage
        bounded = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantage
        policy_gradient = torch.min(unclipped, bounded)
        clipped = (bounded < unclipped).detach()
    return GrpoTerms(objective=policy_gradient - beta * kl, kl=kl.detach(), reward=reward, clipped=clipped)


def grpo_loss(logits: torch.Tensor, ref_logits: torch.Tensor, old_logits: torch.Tensor | None,
              sampled: torch.Tensor, labels: torch.Tensor, *, beta: float, epsilon: float = 0.2,
              std_floor: float = 1e-5, normalise: str = "batch") -> torch.Tensor:
    """One process's loss, ``-mean`` of the objective: what AD's ``grpo2_loss``/``grpo3_loss`` return."""
    return -grpo_terms(logits, ref_logits, old_logits, sampled, labels, beta=beta, epsilon=epsilon,
                       std_floor=std_floor, normalise=normalise).objective.mean()
