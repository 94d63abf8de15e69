"""Checkpoints: find one (`resolve_model`), open it (`open_checkpoint`), build the model (`load_weights`)."""

from .load import Checkpoint, load_weights, open_checkpoint
from .resolve import DEFAULT_MODEL, default_model_path, resolve_model

__all__ = ["Checkpoint", "DEFAULT_MODEL", "default_model_path", "load_weights", "open_checkpoint", "resolve_model"]
