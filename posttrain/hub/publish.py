"""Publishing a model: what its published identity adds (the calibration with its decision threshold, the
training shards the card describes) and the upload of an export folder to the Hugging Face hub."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any


def calibration_entry(path: Path) -> dict[str, Any]:
    """The calibration as stored in posttrain.json, with its Bayes decision threshold on raw scores."""
    from posttrain.eval.calibration import load_calibration
    from posttrain.eval.metrics import ASVSPOOF5_COSTS

    calibration = load_calibration(path)
    return {**calibration.to_dict(), "score_threshold": calibration.score_threshold(ASVSPOOF5_COSTS),
            "threshold_costs": asdict(ASVSPOOF5_COSTS)}


def training_shards(identity: dict[str, Any]) -> list[str]:
    """The training shard folders a model's identity records (its training config's ``data.train``)."""
    config = (identity.get("training") or {}).get("config") or {}
    return list(((config.get("data") or {}).get("train") or {}).get("shards") or [])


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Create (or reuse) the model repository and upload ``folder`` as one commit; returns its URL."""
    from huggingface_hub import HfApi  # only when pushing: publishing offline never needs the client

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                               commit_message=f"posttrain publish: {folder.name}")
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
