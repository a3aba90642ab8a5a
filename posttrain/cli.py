"""The ``posttrain`` command line.

Every command is a module of ``posttrain.commands`` defining ``configure(parser)`` (its options) and
``run(args) -> int``. Modules are imported only when their command runs, so ``--help`` stays fast
and a command's heavy imports (torch, DeepSpeed) cost nothing to the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command words -> (module in posttrain.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the README's main job: demo corpus -> shards -> post-training -> evaluation"),
    "data demo": ("data_demo", "build the demo corpus (klettres recordings vs espeak-ng speech)"),
    "data prepare": ("data_prepare", "write the protocol CSV of a corpus from its official layout"),
    "data df2024": ("data_df2024", "Deepfake-Eval-2024: protocol CSVs, transcoding, segmentation"),
    "shards build": ("shards_build", "protocol CSVs -> WebDataset shards + index.json"),
    "shards plan": ("shards_plan", "hours found vs expected for a mix, shard count and build time"),
    "shards inspect": ("shards_inspect", "print a shard index as a table"),
    "shards verify": ("shards_verify", "re-hash and re-decode every sample of a shard set"),
    "shards merge": ("shards_merge", "merge the per-task indexes of a distributed shard build"),
    "stream": ("stream", "stream shards through the training loader and print its statistics"),
    "train": ("train", "post-train a detector with DeepSpeed"),
    "eval": ("eval", "score a test set with a model; metrics, plots and result.yaml"),
    "metrics": ("metrics", "metrics and reports for any score file"),
    "score": ("score", "score audio files of any length"),
    "sharpness": ("sharpness", "m-sharpness of a model on a shard set, overall and per group"),
    "sharpness correlate": ("sharpness_correlate", "EER vs sharpness over nested subsets"),
    "embed": ("embed", "pooled embeddings for every sample of a shard set"),
    "select nc": ("select_nc", "neural-collapse data selection from embeddings"),
    "publish": ("publish", "export a checkpoint as a stock transformers model (and push it)"),
    "hub download": ("hub_download", "download a released AntiDeepfake checkpoint and convert it"),
    "hub convert": ("hub_convert", "convert a local AntiDeepfake checkpoint to a transformers export"),
}


def resolve(argv: list[str]) -> tuple[str | None, list[str]]:
    """The longest command whose words start ``argv``, and the remaining arguments."""
    for width in (2, 1):
        words = " ".join(argv[:width])
        if len(argv) >= width and words in COMMANDS:
            return words, argv[width:]
    return None, argv


def _overview(prefix: str = "") -> str:
    rows = [(name, help_text) for name, (_, help_text) in COMMANDS.items() if name.startswith(prefix)]
    width = max(len(name) for name, _ in rows)
    return "commands:\n" + "\n".join(f"  posttrain {name:<{width}}  {text}" for name, text in rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = resolve(argv)
    if command is None:
        prefix = f"{argv[0]} " if argv and not argv[0].startswith("-") else ""
        known = any(name.startswith(prefix) for name in COMMANDS)
        print(_overview(prefix if known else ""))
        if argv and argv[0] not in ("-h", "--help") and not (known and rest[1:] in ([], ["-h"], ["--help"])):
            print(f"\nposttrain: unknown command {' '.join(argv)!r}", file=sys.stderr)
            return 2
        return 0
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(f"posttrain.commands.{module_name}")
    parser = argparse.ArgumentParser(prog=f"posttrain {command}", description=help_text)
    module.configure(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
