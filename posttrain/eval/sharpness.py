"""m-sharpness of a detector on a test set, overall and per group, and its rank correlation with EER.

Per batch ``B`` (model in eval mode): ``S_B = L_B(w + e_B) - L_B(w)`` with ``e_B = rho g_B / ||g_B||``
(adaptive: ASAM's ``rho T^2 g_B / ||T g_B||``, the same ascent as training, ``posttrain.optim.ascent``);
the set's sharpness is the batch-size-weighted mean of ``S_B``. Batches are fixed-size draws (seeded
order) *within* the set or group measured. Under several ranks each rank takes every
``world_size``-th batch and the weighted sums are all-reduced once.

Samples are read by random access into the shard tars (one catalogue pass over the members'
offsets), so groups and nested subsets cost only the audio they use; an undecodable sample is
skipped and counted.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data.batch import Batch, normalize_waveforms
from posttrain.data.shards import SampleError, SampleMeta, decode_audio, decode_meta, load_index, shard_paths
from posttrain.dist import DistInfo, all_gather_objects, global_sums, is_initialized, world_group
from posttrain.models.heads import sample_losses
from posttrain.optim.ascent import ascent_direction_, module_parameters, perturb_, restore_, takes_ascent



# ----------------------------------------------------------------------------- one batch


def batch_sharpness(model: nn.Module, loss_fn: Callable[[], torch.Tensor], rho: float, *, adaptive: bool = False,
                    eta: float = 0.01) -> tuple[float, float]:
    """``(S_B, L_B(w))`` for the batch ``loss_fn`` evaluates (a mean loss at the model's current
    weights). The weights are perturbed in place and restored by copy; gradients are cleared."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss = loss_fn()
        loss.backward()
    owned, grads = module_parameters(model)
    norm = ascent_direction_(owned, grads, adaptive=adaptive, eta=eta, device=loss.device)
    base = float(loss.detach())
    if not takes_ascent(norm):
        model.zero_grad(set_to_none=True)
        return (0.0 if norm == 0 else float("nan")), base
    saved = perturb_(owned, grads, rho, norm)  # the module's master is its own weights: a saved copy
    try:
        with torch.no_grad():
            perturbed = float(loss_fn())
    finally:
        restore_(owned, saved)
        model.zero_grad(set_to_none=True)
    return perturbed - base, base


# --------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    label: int  # 1 = real
    meta: dict[str, Any]
    tar: str
    offset: int  # of the FLAC member's data in the tar
    size: int


def catalog(directory: str | Path) -> list[CatalogEntry]:
    """Every sample of a shard set with its metadata and where its FLAC bytes lie (index order)."""
    directory = Path(directory)
    entries = []
    for path in shard_paths(directory, load_index(directory)):
        flac: dict[str, tuple[int, int]] = {}
        metas: dict[str, SampleMeta] = {}
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                key, _, extension = member.name.partition(".")
                if extension == "flac":
                    flac[key] = (member.offset_data, member.size)
                elif extension == "json":
                    try:
                        metas[key] = decode_meta(key, archive.extractfile(member).read())
                    except SampleError as error:
                        raise ValueError(f"{path}: {member.name}: {error.detail}") from None
        for key, meta in metas.items():
            if key not in flac:
                raise ValueError(f"{path}: sample {key!r} has no .flac member")
            entries.append(CatalogEntry(meta.id, meta.label, meta.meta, str(path), *flac[key]))
    return entries


def group_of(entry: CatalogEntry, field_name: str) -> str:
    if field_name == "corpus":
        return str(entry.meta.get("corpus") or entry.id.split("-", 1)[0])
    return str(entry.meta.get(field_name, "-"))


def load_batch(entries: Sequence[CatalogEntry], *, max_seconds: float, eps: float | None) -> tuple[Batch, list[str]]:
    """Decode (first ``max_seconds`` of each sample), pad and normalise (with the model's ``eps``; None:
    raw waveforms) a batch; corrupt audio is skipped. Returns the batch and the skipped ids."""
    waves, kept, skipped = [], [], []
    max_samples = int(max_seconds * SAMPLE_RATE_HZ)
    for entry in entries:
        with open(entry.tar, "rb") as handle:
            handle.seek(entry.offset)
            data = handle.read(entry.size)
        try:
            wave = decode_audio(data)
        except SampleError:  # the sample is corrupt, the batch goes on without it
            skipped.append(entry.id)
            continue
        if len(wave) == 0 or not np.isfinite(wave).all():
            skipped.append(entry.id)
            continue
        waves.append(torch.from_numpy(np.ascontiguousarray(wave[:max_samples], dtype=np.float32)))
        kept.append(entry)
    batch = Batch.collate(waves, [e.label for e in kept], [e.id for e in kept], [e.meta for e in kept])
    if eps is not None and waves:
        batch.waveforms = normalize_waveforms(batch.waveforms, batch.lengths, eps)
    return batch, skipped


def draw_batches(entries: Sequence[CatalogEntry], batch_size: int, seed: int) -> list[list[CatalogEntry]]:
    """Fixed-size batches of a seeded permutation (the last one may be smaller)."""
    order = np.random.default_rng(seed).permutation(len(entries))
    return [[entries[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------- m-sharpness


@dataclass
class SharpnessConfig:
    rho: float = 0.05
    adaptive: bool = False
    adaptive_eta: float = 0.01
    batch_size: int = 32
    max_seconds: float = 6.0
    seed: int = 0
    normalize: bool = True


@dataclass
class SetSharpness:
    sharpness: float  # batch-size-weighted mean of S_B
    loss: float  # weighted mean of L_B(w)
    samples: int
    batches: int
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        return {"sharpness": self.sharpness, "loss": self.loss, "samples": self.samples, "batches": self.batches,
                "skipped": self.skipped}


def _training_loss(model: nn.Module, batch: Batch, device: torch.device) -> Callable[[], torch.Tensor]:
    """The batch's mean training loss: the head's own (``Detector.sample_losses``), as the train step's."""
    waveforms, lengths, labels = batch.waveforms.to(device), batch.lengths.to(device), batch.labels.to(device)
    return lambda: sample_losses(model, model(waveforms, lengths), labels).mean()


def measure_sets(model: nn.Module, sets: dict[str, Sequence[CatalogEntry]], cfg: SharpnessConfig, *,
                 device: torch.device, info: DistInfo = DistInfo(), progress: bool = False) -> dict[str, SetSharpness]:
    """m-sharpness of each named set of samples. Every rank calls it with the same ``sets``; rank r
    measures batches r, r + world, ... of each set; ONE all-reduce of the weighted sums at the end."""
    from tqdm import tqdm

    model.eval()
    eps = model.input_eps if cfg.normalize else None
    plan = [(name, batch) for index, (name, entries) in enumerate(sets.items())
            for batch in draw_batches(list(entries), cfg.batch_size, cfg.seed + index)]
    names = list(sets)
    sums = torch.zeros(len(names), 5, dtype=torch.float64)  # sum n*S, sum n*L, n, batches, skipped
    mine = plan[info.rank::info.world_size]
    for name, entries in tqdm(mine, desc="sharpness", unit="batch", disable=not progress):
        batch, skipped = load_batch(entries, max_seconds=cfg.max_seconds, eps=eps)
        row = sums[names.index(name)]
        row[4] += len(skipped)
        if len(batch.labels) == 0:
            continue
        value, loss = batch_sharpness(model, _training_loss(model, batch, device), cfg.rho,
                                      adaptive=cfg.adaptive, eta=cfg.adaptive_eta)
        size = len(batch.labels)
        row += torch.tensor([size * value, size * loss, size, 1, 0], dtype=torch.float64)
    if info.world_size > 1:
        sums = global_sums(sums.to(device), world_group()).cpu()
    results = {}
    for name, (weighted, loss, count, batches, skipped) in zip(names, sums.tolist()):
        results[name] = SetSharpness(weighted / count if count else float("nan"),
                                     loss / count if count else float("nan"), int(count), int(batches), int(skipped))
    return results


def grouped_sets(entries: Sequence[CatalogEntry], by: str | None) -> dict[str, list[CatalogEntry]]:
    """``{"all": entries}`` plus one set per value of the ``by`` field (sorted)."""
    sets: dict[str, list[CatalogEntry]] = {"all": list(entries)}
    if by:
        for value in sorted({group_of(e, by) for e in entries}):
            sets[f"{by}={value}"] = [e for e in entries if group_of(e, by) == value]
    return sets


def format_sharpness_table(results: dict[str, SetSharpness]) -> str:
    width = max(len(name) for name in results)
    lines = [f"{'set':<{width}}  {'sharpness':>11}  {'loss':>9}  {'samples':>7}  {'batches':>7}  {'skipped':>7}"]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {r.sharpness:>11.6f}  {r.loss:>9.5f}  {r.samples:>7d}  {r.batches:>7d}  "
                     f"{r.skipped:>7d}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ nested subsets


@dataclass(frozen=True)
class Subset:
    name: str  # e.g. "attack:3"
    groups: tuple[str, ...]  # the groups it contains (attack subsets also hold every bona fide sample)
    entries: tuple[CatalogEntry, ...]


def nested_subsets(entries: Sequence[CatalogEntry], by: str, *, steps: int | None, seed: int) -> list[Subset]:
    """Growing subsets over a seeded order of the ``by`` groups. By attack, each subset holds every
    bona fide sample plus the spoofs of its first k attacks (the bona fide "-" group is not an
    attack); otherwise both classes of its first k groups. ``steps`` subsets with k spread evenly
    from 1 to the number of groups (default: every k). Subsets without both classes are dropped."""
    if by == "attack":
        bona = [e for e in entries if e.label == 1]
        values = sorted({group_of(e, by) for e in entries if e.label == 0})
    else:
        bona = []
        values = sorted({group_of(e, by) for e in entries})
    order = [values[i] for i in np.random.default_rng(seed).permutation(len(values))]
    count = len(order) if steps is None else min(steps, len(order))
    sizes = sorted({int(round(k)) for k in np.linspace(1, len(order), count)}) if order else []
    subsets = []
    for k in sizes:
        chosen = set(order[:k])
        members = [e for e in entries if group_of(e, by) in chosen and (by != "attack" or e.label == 0)]
        members = bona + members
        if {e.label for e in members} == {0, 1}:
            subsets.append(Subset(f"{by}:{k}", tuple(order[:k]), tuple(members)))
    return subsets


@dataclass
class Correlation:
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    points: int

    def to_dict(self) -> dict[str, Any]:
        return {"spearman": self.spearman, "spearman_p": self.spearman_p, "kendall": self.kendall,
                "kendall_p": self.kendall_p, "points": self.points}


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Spearman's rho and Kendall's tau (with p-values, scipy.stats) between paired values."""
    from scipy import stats

    if len(x) != len(y):
        raise ValueError(f"rank_correlation: {len(x)} x values vs {len(y)} y values")
    if len(x) < 3:
        raise ValueError(f"rank_correlation: {len(x)} points; at least 3 nested subsets are needed "
                         "(more groups, or a larger --steps)")
    spearman = stats.spearmanr(x, y)
    kendall = stats.kendalltau(x, y)
    return Correlation(float(spearman.statistic), float(spearman.pvalue), float(kendall.statistic),
                       float(kendall.pvalue), len(x))


def plot_correlation(path: str | Path, sharpness: Sequence[float], eers: Sequence[float], labels: Sequence[str],
                     correlation: Correlation, *, title: str = "") -> None:
    """Scatter of EER against sharpness, one labelled point per subset (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.0, 4.5))
    axes.scatter(sharpness, [100 * e for e in eers], color="tab:blue")
    for x, y, label in zip(sharpness, eers, labels):
        axes.annotate(label, (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("m-sharpness")
    axes.set_ylabel("EER (%)")
    axes.set_title(f"{title}Spearman {correlation.spearman:.3f} (p={correlation.spearman_p:.3g}), "
                   f"Kendall {correlation.kendall:.3f} (p={correlation.kendall_p:.3g})", fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(path)


def scores_of(model: nn.Module, entries: Sequence[CatalogEntry], cfg: SharpnessConfig, *, device: torch.device,
              info: DistInfo = DistInfo(), progress: bool = False) -> dict[str, float]:
    """The model's score (``Detector.score_definition``: ``logit_real - logit_fake``, or the OC head's cosine)
    per sample id (this rank's share of fixed-order batches, then gathered on every rank)."""
    from tqdm import tqdm

    model.eval()
    eps = model.input_eps if cfg.normalize else None
    batches = [list(entries[i:i + cfg.batch_size]) for i in range(0, len(entries), cfg.batch_size)]
    scores: dict[str, float] = {}
    with torch.no_grad():
        for chunk in tqdm(batches[info.rank::info.world_size], desc="scores", unit="batch", disable=not progress):
            batch, _ = load_batch(chunk, max_seconds=cfg.max_seconds, eps=eps)
            if len(batch.labels) == 0:
                continue
            logits = model(batch.waveforms.to(device), batch.lengths.to(device)).float().cpu()
            scores.update(zip(batch.ids, model.score_definition.scores(logits.numpy()).tolist()))
    if info.world_size > 1 and is_initialized():
        scores = {k: v for part in all_gather_objects(scores) for k, v in part.items()}
    return scores


def subset_eer(subset: Subset, scores: dict[str, float]) -> float:
    from posttrain.eval.metrics import eer, split_classes

    kept = [e for e in subset.entries if e.id in scores]
    bona, spoof = split_classes([scores[e.id] for e in kept], [e.label for e in kept])
    return eer(bona, spoof)[0]
