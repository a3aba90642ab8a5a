"""How much the int8 ONNX model loses against fp32, measured on labelled sets (``posttrain export --format onnx
--quantize int8 --int8-check NAME=DATA``).

Every trial of a set is scored with ``model.onnx`` and with ``model.int8.onnx`` of an export folder, through
the inference core with ``posttrain eval``'s default windows, one window per run (``scoring_config``), and
each model's EER and its bootstrap CI come from ``compute_metrics``, the function behind ``eval``'s pooled
row, with ``eval``'s default resamples and seed: the fp32 EER here is the one ``posttrain eval --backend
onnxruntime --max-batch-size 1`` reports on the same set. One window per run: the int8 graph always runs
each window alone (``OnnxModel.outputs``: its dynamic activation scales would otherwise mix a batch's files;
the demo's test split gave r 0.999985 batched, 0.999994 alone), and fp32 is scored the same way so the two
lists differ by the weights' precision only. It is faster on the CPU too: the graph materialises attention
over the padded length. The goals:
the int8 EER inside fp32's CI, and a Pearson correlation of the two score lists of at least ``PEARSON_GOAL``.
int8 kernels differ by instruction set (VNNI or not), so the CPU's flags are recorded with the numbers.

Top-level imports stay light: ``check_set`` types a command-line option, parsed before torch loads.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPTION = "--int8-check"
FORMAT = "NAME=DATA"
PEARSON_GOAL = 0.999
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # what selects onnxruntime's int8 kernels
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a table cell and a JSON key: no spaces or pipes
BACKENDS = {"fp32": "onnxruntime", "int8": "onnxruntime-int8"}  # posttrain.eval.scoring.BACKENDS


@dataclass(frozen=True)
class CheckSet:
    """A labelled set as ``posttrain eval`` takes it: a shard folder, or a protocol CSV and its data root."""

    name: str
    data: Path
    root: Path | None = None

    @property
    def is_protocol(self) -> bool:
        return self.data.suffix == ".csv"

    def source(self):
        """The inference core's source of the set (what ``eval --shards`` / ``--protocol --root`` build)."""
        from posttrain.eval.inference import ProtocolSource, ShardSource

        return ProtocolSource(self.data, self.root) if self.is_protocol else ShardSource(self.data)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "data": str(self.data), "root": None if self.root is None else str(self.root)}


def check_set(value: str) -> CheckSet:
    """``NAME=DATA`` -> ``CheckSet``, the set read and checked now (argparse ``type``: a bad value is one
    usage line before anything loads). DATA: a shard folder, a protocol CSV, or ``CSV:ROOT`` for a protocol
    whose paths start with ``$ROOT``."""
    from posttrain.data.protocol import ROOT_PLACEHOLDER, read_protocol
    from posttrain.data.shards import load_index

    name, equals, data = value.partition("=")
    if not equals or not data:
        raise argparse.ArgumentTypeError(f"{value!r}: expected {FORMAT}, e.g. test=data/shards/test or "
                                         f"ps=ps/partialspoof.csv:ps")
    if not NAME_PATTERN.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{value!r}: NAME {name!r} must be letters, digits, '_', '.' or '-' "
                                         f"(it names a row of the card's table)")
    protocol, colon, root = data.rpartition(":")
    check = (CheckSet(name, Path(protocol), Path(root)) if colon and protocol.endswith(".csv")
             else CheckSet(name, Path(data)))
    try:
        if check.root is not None and not check.root.is_dir():
            raise ValueError(f"data root {check.root}: no such folder")
        if check.is_protocol:
            rows = read_protocol(check.data)
            if check.root is None and any(row.path.startswith(ROOT_PLACEHOLDER) for row in rows):
                raise ValueError(f"its paths start with {ROOT_PLACEHOLDER}: give the data root as "
                                 f"{name}={check.data}:ROOT")
        elif check.data.is_dir():
            load_index(check.data)
        else:
            raise ValueError("no such shard folder or protocol CSV")
    except (ValueError, OSError) as error:  # ProtocolError, ShardFormatError, a missing file
        raise argparse.ArgumentTypeError(f"{name}={data}: {error}") from None
    return check


def cpu() -> dict[str, Any]:
    """The CPU's model name and which of ``CPU_FLAGS`` it has (``/proc/cpuinfo``; unknown elsewhere)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "flags": {flag: flag in flags for flag in CPU_FLAGS}}


def cpu_text(info: Mapping[str, Any]) -> str:
    """``cpu()`` in words: ``MODEL; avx2 yes, avx512f no, ...``."""
    shown = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in info["flags"].items())
    return f"{info['model']}; {shown}"


def scoring_config(backend: str):
    """``posttrain eval --backend BACKEND --max-batch-size 1``'s ``InferenceConfig`` (module docstring)."""
    from posttrain.eval.scoring import InferenceConfig

    return InferenceConfig(backend=backend, max_batch_size=1, progress=False)


def scoring_text() -> str:
    """``scoring_config`` in words, for the card."""
    cfg = scoring_config(BACKENDS["fp32"])
    window = cfg.window
    return (f"posttrain eval's windows ({window.window_seconds:g} s, hop {window.hop_seconds:g} s, "
            f"{cfg.aggregation}), one window per run (--max-batch-size 1)")


def _scores(model, check: CheckSet, cfg):
    """``(ScoreTable, skipped count)`` of every trial of ``check`` scored by ``model`` (an ``OnnxModel``)."""
    from posttrain.dist import DistInfo
    from posttrain.errors import UserError
    from posttrain.eval.inference import run_inference
    from posttrain.eval.report import ScoreTable
    from posttrain.eval.scoring import score_record

    # one process: an export is no distributed job, whatever torchrun variables are set
    result = run_inference(model, check.source(), cfg, info=DistInfo())
    if not result.outputs:
        reasons = sorted({item.reason for item in result.skipped})
        raise UserError(f"{OPTION} {check.name}={check.data}: no trial could be scored ({len(result.skipped)} "
                        f"skipped: {', '.join(reasons) or 'empty set'}); fix the set or drop it")
    records = [score_record(out.id, out.logits, out.meta, model.score_definition) for out in result.outputs]
    return ScoreTable.from_records(records), len(result.skipped)


def check_one(models: Mapping[str, Any], check: CheckSet, *, resamples: int, seed: int) -> dict[str, Any]:
    """The int8-vs-fp32 row of one set (module docstring); ``models``: an ``OnnxModel`` per ``BACKENDS`` key."""
    from scipy import stats

    from posttrain.errors import UserError
    from posttrain.eval.metrics import compute_metrics

    tables, rows = {}, {}
    for precision, backend in BACKENDS.items():
        tables[precision], skipped = _scores(models[precision], check, scoring_config(backend))
        metrics = compute_metrics(tables[precision].scores, tables[precision].labels,
                                  bootstrap_resamples=resamples, seed=seed)
        if metrics["eer"] is None:
            raise UserError(f"{OPTION} {check.name}={check.data}: {metrics['undefined']['eer']} for an EER; "
                            f"check a set with both classes")
        rows[precision] = {"eer": metrics["eer"], "eer_ci": metrics["eer_ci"]}
    fp32, int8 = tables["fp32"], tables["int8"]
    if fp32.ids != int8.ids:  # the same decoded inputs in the same order; anything else is a bug upstream
        raise RuntimeError(f"{check.name}: fp32 and int8 scored different trials")
    r = float(stats.pearsonr(fp32.scores, int8.scores).statistic) if len(fp32) > 1 else math.nan
    ci = rows["fp32"]["eer_ci"]
    inside = ci["low"] <= rows["int8"]["eer"] <= ci["high"]
    correlated = bool(r >= PEARSON_GOAL)  # nan (constant scores, one trial) fails
    return {**check.describe(), "trials": len(fp32), "skipped": skipped, **rows,
            "pearson_r": None if math.isnan(r) else r, "int8_eer_in_fp32_ci": inside,
            "pearson_meets_goal": correlated, "passed": inside and correlated}


def check_int8(folder: str | Path, sets: Sequence[CheckSet]) -> dict[str, Any]:
    """The ``int8_check`` section of an export's ``posttrain.json``: each set's row (``check_one``), how the
    scores and intervals were made, the goals and the CPU that ran the int8 kernels."""
    import onnxruntime

    from posttrain.eval.metrics import DEFAULT_BOOTSTRAP_RESAMPLES, DEFAULT_BOOTSTRAP_SEED
    from posttrain.eval.onnx_runtime import OnnxModel

    resamples, seed = DEFAULT_BOOTSTRAP_RESAMPLES, DEFAULT_BOOTSTRAP_SEED  # posttrain eval's --bootstrap, --seed
    models = {precision: OnnxModel(folder, int8=precision == "int8") for precision in BACKENDS}  # one session each
    return {"scoring": scoring_text(),
            "bootstrap": {"resamples": resamples, "seed": seed},
            "goals": {"int8_eer": "inside the fp32 EER's bootstrap CI", "pearson_r_min": PEARSON_GOAL},
            "cpu": cpu(), "onnxruntime": onnxruntime.__version__,
            "sets": [check_one(models, check, resamples=resamples, seed=seed) for check in sets]}


def eer_text(row: Mapping[str, Any]) -> str:
    """``1.79 % [0.00, 5.36]``: an EER and its CI in percent."""
    ci = row["eer_ci"]
    return f"{100 * row['eer']:.2f} % [{100 * ci['low']:.2f}, {100 * ci['high']:.2f}]"


def r_text(r: float | None) -> str:
    return "undefined" if r is None else f"{r:.6f}"  # six places: the goal is near 1


def summary_line(row: Mapping[str, Any]) -> str:
    """One set's numbers on one line, with what missed its goal."""
    missed = [*([] if row["int8_eer_in_fp32_ci"] else ["int8 EER outside fp32's CI"]),
              *([] if row["pearson_meets_goal"] else [f"r below {PEARSON_GOAL}"])]
    return (f"{row['name']}: {row['trials']} trials, EER fp32 {eer_text(row['fp32'])}, int8 "
            f"{eer_text(row['int8'])}, Pearson r {r_text(row['pearson_r'])}"
            + (f" -- MISSED: {'; '.join(missed)}" if missed else ""))
