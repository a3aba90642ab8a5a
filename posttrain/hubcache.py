"""Where a model or backbone named by the user is, found without torch: a local path, or a Hugging Face
repo id whose snapshot is in the cache (``HF_HOME``) or downloaded into it. Commands resolve their
``--model`` and ``model.pretrained`` here first, so a typo or a model missing offline is one line and
exit 2 in a second, before torch and transformers are loaded."""

from __future__ import annotations

import os
import re
from pathlib import Path

from posttrain.errors import hf_download_hint

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# what a snapshot needs: configs, card, weights (safetensors only: hub pickles are never fetched)
SNAPSHOT_PATTERNS = ["*.json", "*.md", "*.safetensors", "LICENSE*"]
# a hub SSL checkpoint's weights: one file, or the index of a sharded one
PRETRAINED_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                           "pytorch_model.bin.index.json")


class ModelNotAvailableError(FileNotFoundError):
    """A model that is neither on disk nor obtainable now (offline, not cached)."""


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the cache only (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off")


def hub_snapshot(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local snapshot folder of ``repo_id``: downloaded into the Hugging Face cache, or found
    there when ``HF_HUB_OFFLINE=1`` or the hub is unreachable."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=SNAPSHOT_PATTERNS))
    except LocalEntryNotFoundError as error:
        cache = cache_dir or constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ModelNotAvailableError(f"{repo_id}: not in the Hugging Face cache ({cache}) and {why}; "
                                     f"{hf_download_hint(repo_id)} instead of the repo id") from error


def locate_model(spec: str | Path) -> tuple[Path, str | None]:
    """``(local path, repo id or None)`` of a ``--model`` spec: a path that exists, or the snapshot of a
    repo id. ``FileNotFoundError`` (one line, the fix) otherwise."""
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    if not REPO_ID.fullmatch(str(spec)):
        raise FileNotFoundError(f"model {str(spec)!r}: no such file or folder, and not a hub repo id (owner/name)")
    return hub_snapshot(str(spec)), str(spec)


def locate_pretrained(source: str) -> Path:
    """Where ``model.pretrained`` will be read from without the internet: a local folder, or its
    snapshot in the Hugging Face cache (``HF_HOME``). Raises ``FileNotFoundError`` with the fix."""
    from huggingface_hub import constants, try_to_load_from_cache

    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model.pretrained: {local}: no config.json (expected a transformers model folder)")
        return local
    found = {name: try_to_load_from_cache(source, name) for name in ("config.json", *PRETRAINED_WEIGHT_FILES)}
    cached = {name for name, path in found.items() if isinstance(path, str)}
    if "config.json" not in cached or not cached & set(PRETRAINED_WEIGHT_FILES):
        raise FileNotFoundError(f"model.pretrained: {source!r} is not in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}) that an offline job reads; {hf_download_hint(source)}")
    return Path(found["config.json"]).parent


def pretrained_folder(source: str) -> Path:
    """The local folder ``model.pretrained`` is read from when its weights are loaded file by file (a
    ZeRO-3 build in partitions): a local folder, or the repo's snapshot in the Hugging Face cache with the
    weights ``from_pretrained`` would fetch (safetensors where the repo has them; every shard of an index).
    ``OSError`` when it cannot be had (offline and not cached, no such repo)."""
    import json

    from transformers.utils import cached_file

    local = Path(source).expanduser()
    if local.is_dir():
        return local
    cached_file(source, "config.json")
    for name in PRETRAINED_WEIGHT_FILES:
        found = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        if found is None:
            continue
        if name.endswith(".index.json"):
            for shard in sorted(set(json.loads(Path(found).read_text(encoding="utf-8"))["weight_map"].values())):
                cached_file(source, shard)
        return Path(found).parent
    raise OSError(f"{source}: no weights ({', '.join(PRETRAINED_WEIGHT_FILES)})")
