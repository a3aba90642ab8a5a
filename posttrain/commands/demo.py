"""The README's main job, end to end on one machine: demo corpus -> shards -> loader statistics ->
DeepSpeed post-training (local MLflow store) -> evaluation on the held-out test split -> export, the
test results and the exported model attached to the training's MLflow run -> an ONNX export with its int8
model, whose EER on the test split and on a partial-spoof set built from it, next to fp32's, is written on
its card (``export --int8-check``).

Each stage is the same command a user would type, so the demo doubles as a walk through the CLI.
Stages whose outputs exist are skipped (shard builds resume; training resumes from ``latest``), so a
second run is cheap; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

SPLITS = ("train", "valid", "test")
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "posttrain" / "demo.yaml"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="demo_data", help="where the demo corpus and its shards go")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="post-training config (YAML)")
    parser.add_argument("--fresh", action="store_true", help="delete the run's output directory first")
    parser.add_argument("overrides", nargs="*", help="config overrides for training, e.g. train.max_steps=50")


def _stage(title: str, argv: list[str]) -> None:
    from posttrain.cli import main

    print(f"\n=== {title}\n$ posttrain {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:  # the stage said why; the demo stops with the stage's own exit code
        print(f"posttrain demo: stage '{title}' failed (exit code {code})", file=sys.stderr)
        raise SystemExit(code)


def run(args: argparse.Namespace) -> int:
    from posttrain.config import load_config
    from posttrain.data.partialspoof import PROTOCOL_NAME

    data_dir = Path(args.data_dir)
    shards_dir = data_dir / "shards"
    overrides = [f"data.train.shards=[{shards_dir / 'train'}]", f"data.valid.shards=[{shards_dir / 'valid'}]",
                 *args.overrides]
    cfg = load_config(args.config, overrides)  # fail on a bad override before any work starts
    output_dir = Path(cfg.output_dir)
    if args.fresh and output_dir.exists():
        shutil.rmtree(output_dir)

    if not all((data_dir / f"{split}.csv").is_file() for split in SPLITS):
        _stage("demo corpus", ["data", "demo", "--out", str(data_dir)])
    for split in SPLITS:
        _stage(f"shards: {split}", ["shards", "build", "--protocol", str(data_dir / f"{split}.csv"),
                                    "--root", str(data_dir), "--out", str(shards_dir / split), "--split", split,
                                    "--max-samples-per-shard", "64"])
    _stage("loader statistics (one epoch of the training stream)",
           ["stream", "--shards", str(shards_dir / "train"), "--num-workers", "0",
            "--max-batch-seconds", str(cfg.data.train.max_batch_seconds)])
    _stage("post-training", ["train", "--config", args.config, *overrides])
    report_dir = output_dir / "eval" / "test"
    _stage("evaluation on the held-out test split",
           ["eval", "--model", str(output_dir / "checkpoints"), "--shards", str(shards_dir / "test"),
            "--out", str(report_dir), "--by", "language", "attack", "--window-seconds", "0", "--no-progress"])
    published = output_dir / "published"
    _stage("export as a stock transformers model, with its card",
           ["publish", "--checkpoint", str(output_dir / "checkpoints"), "--out", str(published),
            "--results", str(report_dir / "result.yaml")])
    partialspoof = data_dir / "partialspoof"
    if not (partialspoof / PROTOCOL_NAME).is_file():
        _stage("a partial-spoof set from the test split",
               ["data", "partialspoof", "--protocol", str(data_dir / "test.csv"), "--root", str(data_dir),
                "--out", str(partialspoof), "--no-progress"])
    onnx_dir = output_dir / "onnx"
    _stage("ONNX export with its int8 model, checked against fp32 on the test split and the partial-spoof set",
           ["export", "--format", "onnx", str(output_dir / "checkpoints"), "--out", str(onnx_dir), "--quantize",
            "int8", "--int8-check", f"test={shards_dir / 'test'}",
            "--int8-check", f"partialspoof={partialspoof / PROTOCOL_NAME}:{partialspoof}"])
    print(f"\nDone. Report: {report_dir}/ (metrics.json, det.png, histograms.png, result.yaml); model: {published}/")
    print(_int8_lines(onnx_dir))
    print(_mlflow_line(output_dir, cfg))
    return 0


def _int8_lines(onnx_dir: Path) -> str:
    """The int8 check's numbers, as the ONNX export's card states them, and where that card is."""
    import json

    from posttrain.eval.int8_check import summary_line
    from posttrain.eval.onnx_runtime import IDENTITY_NAME
    from posttrain.hub.onnx_int8_check import CARD_NAME

    check = json.loads((onnx_dir / IDENTITY_NAME).read_text(encoding="utf-8"))["onnx"]["int8_check"]
    return "\n".join([f"ONNX model: {onnx_dir}/; int8 vs fp32 on its card ({onnx_dir / CARD_NAME}):",
                      *(f"  {summary_line(row)}" for row in check["sets"])])


def _mlflow_line(output_dir: Path, cfg) -> str:
    """Where the run is in MLflow: the command to start the UI and the run's page in it."""
    from posttrain.train.checkpoint import read_metadata, resolve_checkpoint
    from posttrain.train.tracking import run_page_of

    start = f"mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}"
    run_id = read_metadata(resolve_checkpoint(output_dir / "checkpoints")).get("mlflow_run_id")
    if not cfg.tracking.enabled or not run_id:
        return f"MLflow: {start}"
    return (f"MLflow (training, test metrics, plots, score file, model): {start}, then open "
            f"http://127.0.0.1:5000/{run_page_of(cfg.tracking, run_id)}")
