"""``python -m posttrain.bench cli``: how fast every command answers a trivial mistake, in a fresh
interpreter each: ``--help``, and a missing input (exit 2, one line naming it). Prints the wall time of
each and whether torch or transformers were loaded for it (they never should be: the rule
``tests/test_cli_fast.py`` enforces for every command).

``MISSING_INPUT`` (one home for the test and this benchmark) gives each command an argument list whose
main input does not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MISSING = "/nonexistent/posttrain-input"
HEAVY_MODULES = ("torch", "transformers")


def missing_input(out: str) -> dict[str, list[str]]:
    """Per command: arguments naming a missing main input (``MISSING``...), outputs under ``out``."""
    return {
        "demo": ["--config", f"{MISSING}/demo.yaml"],
        "data demo": ["--out", f"{out}/demo", "--klettres-dir", f"{MISSING}/klettres"],
        "data partialspoof": ["--protocol", f"{MISSING}/p.csv", "--out", f"{out}/ps"],
        "data prepare": ["ljspeech", "--root", f"{MISSING}/lj", "--out", f"{out}/p.csv"],
        "data deepvoice-segments": ["--log", f"{MISSING}/log.txt", "--root", f"{MISSING}/dv"],
        "data df2024": ["--metadata", f"{MISSING}/meta.csv", "--audio-dir", f"{MISSING}/a", "--out", f"{out}/df"],
        "shards build": ["--protocol", f"{MISSING}/p.csv", "--out", f"{out}/shards"],
        "shards plan": [f"{MISSING}/mix.yaml", "--root", MISSING],
        "shards inspect": [f"{MISSING}/shards"],
        "shards verify": [f"{MISSING}/shards"],
        "shards merge": [f"{MISSING}/shards"],
        "stream": ["--shards", f"{MISSING}/shards"],
        "train": ["--config", f"{MISSING}/c.yaml"],
        "finetune": ["--config", f"{MISSING}/c.yaml"],
        "plan": ["--config", f"{MISSING}/c.yaml"],
        "eval": ["--model", f"{MISSING}/model", "--protocol", f"{MISSING}/p.csv", "--out", f"{out}/eval"],
        "metrics": [f"{MISSING}/scores.csv", "--out", f"{out}/metrics"],
        "score": ["--model", f"{MISSING}/model", f"{MISSING}/a.wav"],
        "serve": [f"{MISSING}/model"],
        "sharpness": ["--model", f"{MISSING}/model", "--shards", f"{MISSING}/shards", "--out", f"{out}/s"],
        "sharpness correlate": ["--model", f"{MISSING}/model", "--shards", f"{MISSING}/shards", "--out", f"{out}/c"],
        "embed": ["--model", f"{MISSING}/model", "--shards", f"{MISSING}/shards", "--out", f"{out}/e"],
        "select nc": ["--embeddings", f"{MISSING}/emb", "--protocol", f"{MISSING}/p.csv", "--out", f"{out}/nc"],
        "drift": ["--reference", f"{MISSING}/ref", "--incoming", f"{MISSING}/new", "--out", f"{out}/drift"],
        "publish": ["--checkpoint", f"{MISSING}/ckpt", "--out", f"{out}/pub"],
        "export": [f"{MISSING}/model", "--format", "onnx", "--out", f"{out}/onnx"],
        "hub download": ["nobody-posttrain/absent-release", "--out", f"{out}/dl"],
        "hub convert": [f"{MISSING}/model.safetensors", "--out", f"{out}/conv"],
    }


# Runs one command in this fresh interpreter; prints what the parent needs as the last stdout line.
PROBE = """
import json, sys, time
started = time.perf_counter()
from posttrain.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exit_:
    code = exit_.code
heavy = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
print(json.dumps({"code": code, "heavy": heavy, "seconds": time.perf_counter() - started}), file=sys.__stdout__)
"""


def probe(argv: list[str], env: dict[str, str] | None = None) -> dict:
    """``{"code", "heavy", "seconds", "stderr", "wall_s"}`` of ``posttrain ARGV`` in a fresh interpreter."""
    import time

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY_MODULES)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                          timeout=300)
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"code": None, "heavy": [], "seconds": float("nan")}
    return {**result, "stderr": done.stderr, "wall_s": time.perf_counter() - started}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench cli")
    parser.add_argument("--commands", nargs="+", default=None, help="only these commands (default: all)")
    args = parser.parse_args(argv)
    failures = 0
    with tempfile.TemporaryDirectory() as out:
        cases = missing_input(out)
        names = args.commands or list(cases)
        print(f"{'command':<24} {'--help s':>9} {'missing input s':>16} {'exit':>5}  heavy modules loaded")
        for name in names:
            helped = probe([*name.split(), "--help"])
            missing = probe([*name.split(), *cases[name]])
            heavy = sorted(set(helped["heavy"]) | set(missing["heavy"]))
            failures += bool(heavy) or helped["code"] != 0 or missing["code"] != 2
            print(f"{name:<24} {helped['wall_s']:>9.2f} {missing['wall_s']:>16.2f} {missing['code']!s:>5}  "
                  f"{', '.join(heavy) or 'none'}")
    print(f"{failures} command(s) load torch/transformers for a trivial answer or exit otherwise than 0 / 2")
    return 1 if failures else 0
