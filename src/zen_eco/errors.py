"""One error hierarchy for everything a user can get wrong.

Every message names the bad value and, where there is a finite set, the valid options.
The CLI prints `ZenError`s as one line and exits non-zero; anything else is a bug.
"""


class ZenError(Exception):
    """Base of all errors zen-eco raises on purpose."""


class ConfigError(ZenError):
    """A config.json or preset we cannot build a model from (unknown architecture, bad field)."""


class CheckpointError(ZenError):
    """A checkpoint that is missing, truncated, corrupt or crafted."""


class TokenizerError(ZenError):
    """A tokenizer or chat template we cannot build or render."""


class ContextLengthError(ZenError):
    """Prompt plus requested tokens do not fit the model's context window."""


class SamplingError(ZenError):
    """Sampling parameters out of range."""
