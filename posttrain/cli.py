"""The ``posttrain`` command line.

Every command is a module of ``posttrain.commands`` defining ``configure(parser)`` (its options) and
``run(args) -> int``. Modules are imported only when their command runs, so ``--help`` stays fast
and a command's heavy imports (torch, DeepSpeed) cost nothing to the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from posttrain import __version__, console
from posttrain.errors import DEBUG_ENV, DEBUG_FLAG, EXIT_OK, EXIT_USAGE, debug_requested, guarded

# command words -> (module in posttrain.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the README's main job: demo corpus -> shards -> post-training -> evaluation"),
    "data demo": ("data_demo", "build the demo corpus (klettres recordings vs espeak-ng speech)"),
    "data partialspoof": ("data_partialspoof", "a partial-spoof test set: recordings with a spliced-in segment"),
    "data prepare": ("data_prepare", "write the protocol CSV of a corpus from its official layout"),
    "data deepvoice-segments": ("data_deepvoice_segments", "cut DEEP-VOICE into AntiDeepfake's logged test segments"),
    "data df2024": ("data_df2024", "Deepfake-Eval-2024: protocol CSVs, transcoding, segmentation"),
    "shards build": ("shards_build", "protocol CSVs -> WebDataset shards + index.json"),
    "shards plan": ("shards_plan", "hours found vs expected for a mix, shard count and build time"),
    "shards inspect": ("shards_inspect", "print a shard index as a table"),
    "shards verify": ("shards_verify", "re-hash and re-decode every sample of a shard set"),
    "shards merge": ("shards_merge", "merge the per-task indexes of a distributed shard build"),
    "stream": ("stream", "stream shards through the training loader and print its statistics"),
    "train": ("train", "post-train a detector with DeepSpeed"),
    "finetune": ("finetune", "fine-tune on Deepfake-Eval-2024 (accelerate + DeepSpeed), then test per segment/file"),
    "plan": ("plan", "memory per GPU, largest batch, step and run time of a post-training run"),
    "eval": ("eval", "score a test set with a model; metrics, plots and result.yaml"),
    "metrics": ("metrics", "metrics and reports for any score file"),
    "score": ("score", "score audio files of any length"),
    "serve": ("serve", "an HTTP service scoring uploads: file score, probability, timeline; a web page"),
    "sharpness": ("sharpness", "m-sharpness of a model on a shard set, overall and per group"),
    "sharpness correlate": ("sharpness_correlate", "EER vs sharpness over nested subsets"),
    "embed": ("embed", "pooled embeddings for every sample of a shard set"),
    "select nc": ("select_nc", "neural-collapse data selection from embeddings"),
    "drift": ("drift", "data drift of incoming data from a reference set, in a detector's embedding space"),
    "publish": ("publish", "export a checkpoint as a stock transformers model (and push it)"),
    "export": ("export", "any model as a transformers or ONNX folder (ONNX: raw audio in, onnxruntime alone)"),
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
    return ("commands:\n" + "\n".join(f"  posttrain {name:<{width}}  {text}" for name, text in rows)
            + f"\n\n{EPILOG}")


EPILOG = (f"exit codes: 0 done, 1 the work failed, 2 bad usage or input; {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows "
          "the traceback of an error; -v/--verbose shows the libraries' own messages too, -q/--quiet only "
          "warnings and errors; --version the version")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names it or there is none
    to show (a required option, an off flag, an empty list, ``None`` explained by the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or action.required or default is None
                or default is False or default == argparse.SUPPRESS or default == []):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(command: str):
    """(the argparse parser of ``command``, its module)."""
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(f"posttrain.commands.{module_name}")
    parser = argparse.ArgumentParser(prog=f"posttrain {command}", description=help_text, formatter_class=HelpFormatter,
                                     epilog=EPILOG)
    module.configure(parser)
    return parser, module


def _no_command(argv: list[str]) -> int:
    """``posttrain``, ``posttrain shards`` (a group without its subcommand) or an unknown command."""
    prefix = f"{argv[0]} " if argv and not argv[0].startswith("-") else ""
    known = any(name.startswith(prefix) for name in COMMANDS)
    asked_help = argv[len(prefix.split()):] in (["-h"], ["--help"])
    if asked_help or not argv or (known and prefix and len(argv) == 1):
        print(_overview(prefix if known else ""), file=sys.stdout if asked_help else sys.stderr)
    if asked_help:
        return EXIT_OK
    if not argv:
        problem = "a command is needed"
    elif known and prefix and len(argv) == 1:
        problem = f"'{argv[0]}' needs a subcommand (posttrain {argv[0]} --help lists them)"
    else:
        words = [word for word in argv[:2] if not word.startswith("-")][: 2 if known else 1]
        problem = f"unknown command {' '.join(words)!r}{_did_you_mean(words)}; posttrain --help lists the commands"
    print(f"\nposttrain: error: {problem}" if not argv or problem.startswith("'") else f"posttrain: error: {problem}",
          file=sys.stderr)
    return EXIT_USAGE


def _did_you_mean(words: list[str]) -> str:
    import difflib

    candidates = [" ".join(words)] + words[:1]
    for candidate in candidates:
        near = difflib.get_close_matches(candidate, list(COMMANDS), n=1, cutoff=0.6)
        if near:
            return f" (did you mean 'posttrain {near[0]}'?)"
    return ""


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    verbosity, argv = console.verbosity_requested(argv)
    if argv in (["--version"], ["-V"]):
        print(f"posttrain {__version__}")
        return EXIT_OK
    console.configure(verbosity)
    command, rest = resolve(argv)
    if command is None:
        return _no_command(argv)
    parser, module = build_parser(command)
    args = parser.parse_args(rest)  # a usage error exits with 2 and argparse's one-line message
    return guarded(f"posttrain {command}", lambda: module.run(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
