"""Find a checkpoint: a local directory, or a Hugging Face hub id downloaded (only the
files serving needs) into the Hugging Face cache through huggingface_hub."""

from __future__ import annotations

import os
from pathlib import Path

from gptoss_ray.errors import CheckpointError

# What serving needs from a gpt-oss hub repo: not original/ (the reference's own
# format) nor metal/ (the Apple port), which double the download.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json"]


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def _download_hint(repo_id: str) -> str:
    return (
        f"download it on a connected machine with `hf download {repo_id} --include "
        f"{' '.join(repr(p) for p in ALLOW_PATTERNS)} --local-dir DIR`, copy DIR here and pass "
        f"--model DIR (or copy the Hugging Face cache to $HF_HOME)"
    )


def locate(model: str | os.PathLike) -> Path:
    """The local directory of `model`; downloads a hub id unless offline."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory)")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json here; is this a gpt-oss checkpoint directory?")
        return path
    model = str(model)
    if not _looks_like_hub_id(model):
        raise CheckpointError(f"{model}: no such directory, and not a hub id of the form org/name")
    return _from_hub(model)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=offline))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise CheckpointError(f"{repo_id} is not in the local Hugging Face cache and {why}: {_download_hint(repo_id)}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model on the Hugging Face hub (or it needs a token: set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{repo_id}: download failed ({type(e).__name__}): {_download_hint(repo_id)}") from None
