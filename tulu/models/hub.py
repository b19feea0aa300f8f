"""A model named by a hub id or a local folder -> a local folder, the same on every rank.

Cluster nodes share the Hugging Face cache (``HF_HOME`` on the shared file system); the hub's own
file locks make concurrent downloads of one snapshot safe, and once a snapshot is cached the call
reads it without the network (``HF_HUB_OFFLINE=1`` then works: pre-fetch on the login node)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODEL_FILES", "is_hub_id", "local_model_folder"]

MODEL_FILES = ["*.safetensors", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
"""What an engine or trainer reads from a model repository: weights, configs, tokenizer, chat
template; never the `original/` consolidated checkpoints or `*.bin` duplicates."""


def is_hub_id(name: str) -> bool:
    """``org/name``, not an existing local path."""
    return (not Path(name).expanduser().exists() and name.count("/") == 1
            and not name.startswith((".", "/", "~")))


def local_model_folder(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(str(name_or_path)):
        raise FileNotFoundError(f"model {str(name_or_path)!r} is neither a local folder nor a hub id "
                                "like 'allenai/Llama-3.1-Tulu-3-8B-DPO'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=MODEL_FILES))
