"""``posttrain drift --reference R --incoming I [--model M] --out DIR``: how far the incoming data has
drifted from the reference data, in the embedding space of a detector (``posttrain.select.drift``).

R and I are each a shard folder (``index.json``), an audio folder (searched recursively), or saved
embeddings (a folder ``posttrain embed`` or an earlier ``posttrain drift`` wrote). Shards and audio are
embedded with ``--model`` through ``posttrain embed``'s path (``posttrain.select.embed``) into
``DIR/reference`` and ``DIR/incoming``, which later runs (and ``posttrain serve --drift-reference``) can
take as saved embeddings. Prints each distance's value, the permutation null's threshold and a verdict;
writes ``drift.json`` and ``drift.png`` into DIR. Embedding runs on several ranks under torchrun.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROLES = ("reference", "incoming")


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.commands.inference_options import add_arguments
    from posttrain.select.drift import DISTANCES, DriftConfig

    defaults = DriftConfig()
    forms = "a shard folder (index.json), an audio folder, or saved embeddings (a `posttrain embed` folder)"
    parser.add_argument("--reference", required=True, help=f"the data drift is measured from: {forms}")
    parser.add_argument("--incoming", required=True, help=f"the new data: {forms}")
    parser.add_argument("--model", default=None, help="transformers export folder, posttrain checkpoint, AntiDeepfake "
                                                      "release or hub id; needed unless both inputs are embeddings")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for drift.json, drift.png and the embeddings computed (reference/, incoming/)")
    parser.add_argument("--distances", nargs="+", choices=DISTANCES, default=list(DISTANCES),
                        help="distances computed, each with its permutation null")
    parser.add_argument("--projections", type=int, default=defaults.projections,
                        help="random unit directions of the sliced distances")
    parser.add_argument("--permutations", type=int, default=defaults.permutations,
                        help="random splits of the pooled sets that make the null")
    parser.add_argument("--quantile", type=float, default=defaults.quantile,
                        help="the null's quantile above which a value is called drift")
    parser.add_argument("--max-rows-per-set", type=int, default=defaults.max_rows_per_set,
                        help="larger sets are subsampled (seeded) to this many embeddings")
    parser.add_argument("--shrinkage", type=float, default=None,
                        help="covariance shrinkage of gaussian_kl in [0, 1] (default: Ledoit-Wolf's estimate)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="directions, subsampling and permutations")
    add_arguments(parser)


@dataclass(frozen=True)
class DriftInput:
    role: str  # reference | incoming
    location: str
    kind: str  # embeddings | shards | audio


def resolve_input(role: str, location: str) -> DriftInput:
    """What ``--ROLE`` names, checked without torch: a bad one is a ``UserError`` naming the option."""
    from posttrain.data.audio import AUDIO_EXTENSIONS, audio_inputs
    from posttrain.data.shards import INDEX_NAME, load_index
    from posttrain.errors import UserError
    from posttrain.select.embeddings import MANIFEST_NAME, load_embeddings

    option = f"--{role}"
    path = Path(location)
    try:
        if "://" in location or location.startswith("pipe:") or (path / INDEX_NAME).is_file():
            load_index(location)
            return DriftInput(role, location, "shards")
        if (path / MANIFEST_NAME).is_file():
            load_embeddings(path)
            return DriftInput(role, location, "embeddings")
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        if path.is_file() and path.suffix.lower() not in AUDIO_EXTENSIONS:
            raise UserError(f"{path}: not audio, a shard folder ({INDEX_NAME}) or an embeddings folder "
                            f"({MANIFEST_NAME})")
        audio_inputs([path])
    except (UserError, ValueError) as error:  # EmbeddingsError and ShardFormatError too: say which option
        raise UserError(f"{option} {error}") from None
    return DriftInput(role, location, "audio")


def drift_config(args: argparse.Namespace):
    from posttrain.select.drift import DriftConfig

    return DriftConfig(distances=tuple(dict.fromkeys(args.distances)), projections=args.projections,
                       permutations=args.permutations, quantile=args.quantile, max_rows_per_set=args.max_rows_per_set,
                       shrinkage=args.shrinkage, seed=args.seed)


def embed_inputs(args: argparse.Namespace, inputs: list[DriftInput], cfg) -> dict[str, Path] | None:
    """Embed ``inputs`` into ``OUT/<role>`` with ``--model`` and the inference settings ``cfg``; the folders
    on rank 0, None on other ranks."""
    from posttrain.commands.inference_options import device_from_args
    from posttrain.dist import process_group
    from posttrain.eval.inference import FileSource, ShardSource
    from posttrain.loading import load_scorer
    from posttrain.select.embed import embed_source

    folders = {}
    with process_group() as info:
        device = device_from_args(args, info)
        model, identity = load_scorer(args.model, device, backend=cfg.backend)
        for item in inputs:
            source = (ShardSource(item.location) if item.kind == "shards"
                      else FileSource([item.location], max_file_seconds=args.max_file_seconds))
            folders[item.role] = args.out / item.role
            manifest = embed_source(model, source, folders[item.role], cfg, model_identity=identity, device=device,
                                    info=info)
            if manifest is None:
                continue
            for skipped in manifest["skipped"]["items"]:
                print(f"{item.role}: skipped {skipped['id']}: {skipped['reason']}: {skipped['detail']}")
            print(f"{item.role}: embedded {manifest['count']} of {manifest['index_samples']} samples -> "
                  f"{folders[item.role]}")
    return folders if info.is_main else None


def _model_path(manifest: dict) -> str | None:
    return (manifest.get("model", {}).get("loaded_from") or {}).get("path")


def run(args: argparse.Namespace) -> int:
    from posttrain.errors import UserError
    from posttrain.hubcache import locate_model

    inputs = [resolve_input(role, getattr(args, role)) for role in ROLES]
    cfg = drift_config(args)
    to_embed = [item for item in inputs if item.kind != "embeddings"]
    folders = {item.role: Path(item.location) for item in inputs}
    if to_embed:
        if args.model is None:
            raise UserError(f"--model is needed to embed --{to_embed[0].role} {to_embed[0].location} "
                            f"({to_embed[0].kind}); give it, or saved embeddings")
        from posttrain.commands.inference_options import config_from_args

        inference = config_from_args(args)  # the inference options and the model's location before torch loads
        locate_model(args.model)
        embedded = embed_inputs(args, to_embed, inference)
        if embedded is None:  # not rank 0: the drift is rank 0's
            return 0
        folders.update(embedded)
    return report(args, cfg, inputs, folders)


def report(args: argparse.Namespace, cfg, inputs: list[DriftInput], folders: dict[str, Path]) -> int:
    """The drift between the two embeddings folders: printed, and written into ``--out``."""
    from tqdm import tqdm

    from posttrain.select.drift import drift_test
    from posttrain.select.drift_report import format_drift, write_drift_report
    from posttrain.select.embeddings import load_embeddings, read_manifest

    arrays = {role: load_embeddings(folder)[0] for role, folder in folders.items()}
    manifests = {role: read_manifest(folder) for role, folder in folders.items()}
    models = {role: _model_path(manifest) for role, manifest in manifests.items()}
    if None not in models.values() and len(set(models.values())) > 1:
        print(f"posttrain drift: warning: the embeddings come from different models ({models['reference']} vs "
              f"{models['incoming']}): a drift between two models' embedding spaces says little", file=sys.stderr)
    draws = len(cfg.distances) * cfg.permutations
    with tqdm(total=draws, desc="permutation null", unit="draw", disable=args.no_progress, dynamic_ncols=True) as bar:
        result = drift_test(arrays["reference"], arrays["incoming"], cfg, on_draw=bar.update)
    sources = {item.role: {"input": item.location, "kind": item.kind, "embeddings": str(folders[item.role]),
                           "model": models[item.role], "inference": manifests[item.role].get("inference")}
               for item in inputs}
    files = write_drift_report(args.out, result, arrays["reference"], arrays["incoming"], sources)
    print(format_drift(result), end="")
    print(f"report: {files['report']}; plot: {files['plot']}")
    return 0
