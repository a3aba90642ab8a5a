"""``python -m posttrain.bench grpo_study [--work DIR] [--steps N] [--seeds 1 2 3]``: SFT vs GRPO vs GRPO_s
fine-tuning from the post-trained demo checkpoint, on the demo corpus (docs/grpo_study.md).

1. ``posttrain demo`` in the work folder (skipped when ``runs/demo/checkpoints`` exists);
2. the test sets: the demo's held-out test split; the same test split through G.711 mu-law at 8 kHz (a
   codec the demo chain never applies); the test split's genuine files with its texts re-synthesised by
   espeak-ng voice variants no training file uses (m7, f5); ``posttrain data partialspoof`` of the test split;
3. per method and seed, ``posttrain finetune`` from the demo checkpoint on the demo training shards, same
   steps, learning rate, data and RawBoost for all; only the objective differs (cross-entropy, grpo3, grpo2);
   a seed sets train.seed, data.train.seed and rawboost.seed (SFT and GRPO of one seed see the same batches);
4. ``posttrain eval`` of every model on every set, then the EER with percentile bootstrap CIs, and the
   paired CI of the EER difference to SFT: each resample draws bona fide and spoof trials (within each
   class, sizes kept, as ``posttrain.eval.metrics.eer_confidence_interval``) and the same trials score every
   system. posttrain has no paired bootstrap: ``paired_eers`` below is this study's.

Writes ``results.json`` and ``results.md`` in the work folder; every step is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = {"SFT": [],
           "GRPO": ["grpo.enabled=true", "grpo.variant=grpo3"],
           "GRPO_s": ["grpo.enabled=true", "grpo.variant=grpo2"]}
SETS = {"test": "held-out test", "g711": "G.711 8 kHz", "voices": "unseen voices", "partial": "partial spoof"}
HELD_OUT_VOICES = (("m7", 125, 45), ("f5", 125, 65))  # espeak-ng variant, wpm, pitch: none is in demo.ATTACKS
# espeak-ng 1.51 ignores "+variant" after "fr-fr" (the demo's French voice): "fr" is the same voice and takes it
STUDY_VOICES = {"fr": "fr", "de": "de", "en": "en-us", "es": "es", "it": "it"}
ENV = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}


def posttrain(argv: list[str], work: Path, log: Path) -> float:
    """Run ``python -m posttrain ARGV`` in ``work``, output to ``log``; its wall time (raises on failure)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "posttrain", *argv], cwd=work, env=ENV, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"posttrain {' '.join(argv)} exited {done.returncode}; see {log}:\n"
                           + log.read_text()[-3000:])
    return time.perf_counter() - started


def build_g711(data: Path, out: Path) -> None:
    """The test split at 8 kHz, 8-bit mu-law WAV (eval decodes it and resamples back to 16 kHz)."""
    import soundfile as sf

    from posttrain.data import audio
    from posttrain.data.protocol import read_protocol, write_protocol
    from posttrain.data.resample import resample

    rows = []
    for row in read_protocol(data / "test.csv"):
        samples, rate = audio.decode(row.resolved_path(data))
        narrow = resample(audio.to_mono(samples), rate, 8000)
        (out / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(out / "audio" / f"{row.id}.wav", narrow, 8000, subtype="ULAW")
        rows.append(replace(row, path=f"$ROOT/audio/{row.id}.wav", sample_rate_hz=8000, audio_encoding="ULAW",
                            audio_bit_sample="8", duration_s=len(narrow) / 8000))
    write_protocol(rows, out / "protocol.csv")


def build_voices(data: Path, out: Path) -> None:
    """The test split's genuine files, and its texts spoken by held-out espeak-ng variants (demo chain)."""
    from posttrain.data import audio
    from posttrain.data.demo import KLETTRES_DIR, Attack, list_recordings, synthetic_waveform
    from posttrain.data.protocol import read_protocol, write_protocol

    rows, texts, fakes = [], {}, 0
    for row in read_protocol(data / "test.csv"):
        if row.label == "real":  # the very file of the test split
            rows.append(replace(row, path=str(row.resolved_path(data))))
            continue
        if row.language not in texts:
            texts[row.language] = {r.key: r.text for r in list_recordings(KLETTRES_DIR, row.language)[0]}
        key = row.id.split("-", 1)[1]
        attack = Attack(*HELD_OUT_VOICES[fakes % len(HELD_OUT_VOICES)])
        fakes += 1
        voice = STUDY_VOICES[row.language]
        samples = synthetic_waveform(texts[row.language][key], voice, attack)
        (out / "audio").mkdir(parents=True, exist_ok=True)
        (out / "audio" / f"{row.id}.flac").write_bytes(audio.encode_flac(samples))
        rows.append(replace(row, path=f"$ROOT/audio/{row.id}.flac", attack=attack.name,
                            speaker=f"espeak-{voice}+{attack.variant}", duration_s=len(samples) / 16000))
    write_protocol(rows, out / "protocol.csv")


def eval_args(work: Path) -> dict[str, list[str]]:
    data, sets = work / "demo_data", work / "sets"
    whole = ["--window-seconds", "0"]
    return {"test": ["--shards", str(data / "shards/test"), *whole],
            "g711": ["--protocol", str(sets / "g711/protocol.csv"), "--root", str(sets / "g711"), *whole],
            "voices": ["--protocol", str(sets / "voices/protocol.csv"), "--root", str(sets / "voices"), *whole],
            "partial": ["--protocol", str(data / "partialspoof/partialspoof.csv"), "--root", str(data / "partialspoof"),
                        "--segments", str(data / "partialspoof/partialspoof.segments.csv"), "--window-seconds",
                        "0.5", "--hop-seconds", "0.1", "--min-tail-seconds", "0.2"]}


def finetune_args(work: Path, out: Path, method: str, seed: int, args: argparse.Namespace) -> list[str]:
    grpo = [*METHODS[method], f"grpo.sample_num={args.sample_num}", f"grpo.inner_step_size={args.inner_step_size}"]
    return ["finetune", "--config", str(REPO / "configs/finetune/df2024.yaml"), f"output_dir={out}",
            f"finetune.init_from={work / 'runs/demo/checkpoints'}", "finetune.init_preset=null",
            "finetune.df2024_dir=null", "finetune.evaluate=false", "model.gradient_checkpointing=false",
            f"data.train.shards=[{work / 'demo_data/shards/train'}]",
            # the demo post-training's batching (configs/posttrain/demo.yaml)
            "data.train.max_batch_seconds=24", "data.train.max_batch_size=16", "data.train.num_buckets=4",
            "data.train.shuffle_buffer=64", "data.train.num_workers=1",
            "data.train.crop={policy: fixed, fixed_seconds: 3.0}",
            # the seed of a run is all three: train.seed alone leaves the data order (data.train.seed) and the
            # RawBoost draws (rawboost.seed) as they were, and a fine-tune has no dropout: SFT would repeat itself
            "train.device=cpu", "train.precision=fp32", f"train.max_steps={args.steps}", f"train.seed={seed}",
            f"data.train.seed={seed}", f"rawboost.seed={seed}",
            f"optim.lr={args.lr}", f"checkpoint.every_steps={args.steps}", "checkpoint.keep_last=1",
            "tracking.enabled=false", *(grpo if METHODS[method] else [])]


def read_scores(path: Path) -> dict[str, tuple[float, int]]:
    with open(path, newline="") as handle:
        return {row["ID"]: (float(row["Score"]), int(row["Label"])) for row in csv.DictReader(handle)}


def paired_eers(scores: dict[str, dict[str, tuple[float, int]]], resamples: int, seed: int):
    """Per system: (EER on all trials, EERs of ``resamples`` stratified resamples shared by every system)."""
    import numpy as np

    from posttrain.eval.metrics import eer

    ids = sorted(next(iter(scores.values())))
    if any(sorted(s) != ids for s in scores.values()):
        raise ValueError("the systems were scored on different trials")
    labels = np.array([next(iter(scores.values()))[i][1] for i in ids])
    rng = np.random.default_rng(seed)
    bona, spoof = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    draws = [(rng.choice(bona, bona.size), rng.choice(spoof, spoof.size)) for _ in range(resamples)]
    result = {}
    for name, table in scores.items():
        values = np.array([table[i][0] for i in ids])
        full = eer(values[bona], values[spoof])[0]
        result[name] = (full, np.array([eer(values[b], values[s])[0] for b, s in draws]))
    return result


def interval(values) -> list[float]:
    import numpy as np

    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def weight_change(start: Path, model: Path) -> float:
    """||w - w_start|| / ||w_start|| over every weight of the consolidated fp32 checkpoints."""
    import torch

    from posttrain.train.checkpoint import consolidate_fp32

    before, after = consolidate_fp32(start)[0], consolidate_fp32(model)[0]
    norm = lambda tensors: torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()  # noqa: E731
    return norm(after[k] - before[k] for k in before) / norm(before.values())


def analyse(work: Path, systems: list[str], runs: dict, args: argparse.Namespace) -> dict:
    import numpy as np

    for name in runs:
        runs[name]["weight_change"] = weight_change(work / "runs/demo/checkpoints", work / f"runs/{name}/checkpoints")
    out = {"sets": {}, "runs": runs}
    for name in SETS:
        scores = {s: read_scores(work / "eval" / s / name / "scores.csv") for s in systems}
        eers = paired_eers(scores, args.resamples, seed=0)
        labels = [label for _, label in scores[systems[0]].values()]
        entry = {"trials": len(labels), "bona_fide": sum(labels), "spoof": len(labels) - sum(labels), "systems": {},
                 "paired_vs_sft": {}}
        for s in systems:
            metrics = json.loads((work / "eval" / s / name / "metrics.json").read_text())
            assert abs(metrics["pooled"]["eer"] - eers[s][0]) < 1e-9, (s, name)  # the same EER as eval's
            entry["systems"][s] = {"eer": eers[s][0], "ci": interval(eers[s][1])}
            if "segment" in metrics.get("groups", {}):
                entry["systems"][s]["segment_160ms_eer"] = metrics["groups"]["segment"]["160ms"]["eer"]
        for method in [m for m in METHODS if m != "SFT"] + ["start"]:
            mine = [f"{method}-s{seed}" for seed in args.seeds] if method != "start" else ["start"] * len(args.seeds)
            sft = [f"SFT-s{seed}" for seed in args.seeds]
            if not all(s in eers for s in mine + sft):
                continue
            comparison = {}
            for seed, a, b in zip(args.seeds, mine, sft):
                comparison[f"seed {seed}"] = {"diff": eers[a][0] - eers[b][0], "ci": interval(eers[a][1] - eers[b][1])}
            pooled = np.mean([eers[a][1] for a in mine], 0) - np.mean([eers[b][1] for b in sft], 0)
            comparison["mean of seeds"] = {"diff": float(np.mean([eers[a][0] for a in mine])
                                                         - np.mean([eers[b][0] for b in sft])), "ci": interval(pooled)}
            entry["paired_vs_sft"][method] = comparison
        out["sets"][name] = entry
    return out


def markdown(result: dict, seeds: list[int]) -> str:
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    sets = result["sets"]
    head = " | ".join(f"{SETS[n]} ({sets[n]['bona_fide']} bona fide / {sets[n]['spoof']} spoof)" for n in SETS)
    lines = ["EER % on all trials [95 % percentile bootstrap CI]; for a method, the mean over seeds "
             f"{', '.join(map(str, seeds))} and each seed's value.", "", f"| model | {head} | partial spoof, "
             "160 ms segments |", "|---" * (len(SETS) + 2) + "|"]
    for method in ["start", *METHODS]:
        names = ["start"] if method == "start" else [f"{method}-s{s}" for s in seeds]
        cells = []
        for n in [*SETS, "segments"]:
            key, entries = ("segment_160ms_eer", sets["partial"]) if n == "segments" else ("eer", sets[n])
            values = [entries["systems"][s][key] for s in names if s in entries["systems"]]
            if not values:
                cells.append("failed")
            elif method == "start":
                ci = "" if n == "segments" else " [{}, {}]".format(*map(pct, entries["systems"]["start"]["ci"]))
                cells.append(pct(values[0]) + ci)
            else:
                cells.append(f"{pct(sum(values) / len(values))} ({' / '.join(map(pct, values))})")
        label = "post-trained start" if method == "start" else method
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "Paired EER difference to SFT, percentage points (negative: lower EER than SFT) [95 % CI, "
              "the same resampled trials for both]; 'mean of seeds' compares the 3-seed mean EERs.", "",
              f"| difference | seeds | {' | '.join(SETS[n] for n in SETS)} |", "|---" * (len(SETS) + 2) + "|"]
    for method in [m for m in METHODS if m != "SFT"] + ["start"]:
        for which in ["mean of seeds", *(f"seed {s}" for s in seeds)]:
            cells = []
            for n in SETS:
                c = sets[n]["paired_vs_sft"].get(method, {}).get(which)
                cells.append("-" if c is None else f"{100 * c['diff']:+.2f} [{100 * c['ci'][0]:+.2f}, "
                                                   f"{100 * c['ci'][1]:+.2f}]")
            lines.append(f"| {method} - SFT | {which} | {' | '.join(cells)} |")
    for key, title in (("wall_s", "Wall time per fine-tune (s, seeds in order; the process, start-up included)"),
                       ("weight_change", "Weight change ||w - w_start|| / ||w_start|| per fine-tune (seeds in order)")):
        per_method = {}
        for name, run in result["runs"].items():
            per_method.setdefault(name.split("-s")[0], []).append(run[key])
        digits = 0 if key == "wall_s" else 4
        lines += ["", f"{title}: " + "; ".join(f"{m} {', '.join(f'{v:.{digits}f}' for v in vs)}"
                                                for m, vs in per_method.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.bench grpo_study", 
                                     description="SFT vs GRPO vs GRPO_s fine-tuning from the post-trained demo "
                                                 "checkpoint, scored on four test sets (docs/grpo_study.md)")
    parser.add_argument("--work", type=Path, default=Path("runs/grpo_study"), help="everything goes here")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--lr", type=float, default=1e-4, help="constant learning rate of every run")
    parser.add_argument("--sample-num", type=int, default=64, help="grpo.sample_num")
    parser.add_argument("--inner-step-size", type=int, default=10, help="grpo.inner_step_size (grpo3's refresh)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (work / "runs/demo/checkpoints/latest").is_file():
        print(f"demo: {posttrain(['demo', '--data-dir', 'demo_data'], work, work / 'logs/demo.log'):.0f} s",
              flush=True)
    data = work / "demo_data"
    if not (data / "partialspoof/partialspoof.csv").is_file():
        posttrain(["data", "partialspoof", "--protocol", str(data / "test.csv"), "--root", str(data), "--out",
                   str(data / "partialspoof"), "--no-progress"], work, work / "logs/partialspoof.log")
    for name, build in (("g711", build_g711), ("voices", build_voices)):
        if not (work / "sets" / name / "protocol.csv").is_file():
            build(data, work / "sets" / name)
    print("test sets ready", flush=True)

    models, runs, failed = {"start": work / "runs/demo/checkpoints"}, {}, []
    plan = [(m, s) for s in args.seeds for m in METHODS]
    for index, (method, seed) in enumerate(plan, 1):
        name, out = f"{method}-s{seed}", work / "runs" / f"{method}-s{seed}"
        record = out / "study_run.json"
        try:
            if not record.is_file():
                wall = posttrain(finetune_args(work, out, method, seed, args), work, work / f"logs/{name}.log")
                record.write_text(json.dumps({"wall_s": wall, "argv": finetune_args(work, out, method, seed, args)}))
            runs[name] = json.loads(record.read_text())
            models[name] = out / "checkpoints"
            print(f"[{index}/{len(plan)}] {name}: {args.steps} steps, {runs[name]['wall_s']:.0f} s", flush=True)
        except RuntimeError as error:
            failed.append(name)
            print(f"[{index}/{len(plan)}] {name}: FAILED\n{error}", flush=True)
    sets = eval_args(work)
    for name, model in models.items():
        for set_name, extra in sets.items():
            report = work / "eval" / name / set_name
            if not (report / "scores.csv").is_file():
                posttrain(["eval", "--model", str(model), "--out", str(report), "--no-mlflow", "--no-progress",
                           "--bootstrap", "0", *extra], work, work / f"logs/eval-{name}-{set_name}.log")
        print(f"scored {name} on {', '.join(sets)}", flush=True)

    result = analyse(work, list(models), runs, args)
    result.update(settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  failed=failed, invocation_wall_s=time.perf_counter() - started,
                  train_shards=json.loads((data / "shards/train/index.json").read_text())["totals"])
    (work / "results.json").write_text(json.dumps(result, indent=1))
    table = markdown(result, args.seeds)
    (work / "results.md").write_text(table)
    print(table + f"\nwrote {work / 'results.md'} and results.json ({result['invocation_wall_s']:.0f} s)")
    return 1 if failed else 0
