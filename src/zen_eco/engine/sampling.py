"""Sampling: the one place that turns next-token logits into a token.

Order, as llama.cpp applies it: penalties -> temperature -> top-k -> top-p -> min-p -> draw.
temperature 0 means greedy (argmax after penalties). Every random draw uses an explicit, seeded
`torch.Generator`, so a seed reproduces a run exactly on the same machine.

Penalties:
- repetition_penalty (CTRL / transformers): logits of tokens seen in the prompt or the output are
  divided by it when positive and multiplied when negative. 1.0 = off.
- presence_penalty / frequency_penalty (OpenAI): subtract `presence` once for every token that
  occurs in the output so far, and `frequency` times its count. 0.0 = off.

Per-mode defaults: for models with thinking tokens (`<think>`/`</think>`) the API and CLI fill
temperature / top-p / top-k / min-p the caller did not set with Qwen3's recommendation for the mode
(`mode_defaults`): thinking T 0.6, top-p 0.95, top-k 20, min-p 0; non-thinking T 0.7, top-p 0.8,
top-k 20, min-p 0. Other models keep `SamplingParams`' own defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SamplingError


@dataclass
class SamplingParams:
    temperature: float = 0.8  # llama.cpp's default; 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = a fresh random seed

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SamplingError(f"{name} must be a number, got {value!r}")
        if isinstance(self.top_k, bool):
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise SamplingError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        checks = [
            ("temperature", self.temperature, 0.0 <= self.temperature <= 100.0, "in [0, 100]"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", self.top_p, 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("min_p", self.min_p, 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty, 0.0 < self.repetition_penalty <= 10.0, "in (0, 10]"),
            ("presence_penalty", self.presence_penalty, -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", self.frequency_penalty, -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
        ]
        for name, value, ok, rule in checks:
            if not ok or (isinstance(value, float) and math.isnan(value)):
                raise SamplingError(f"{name} must be {rule}, got {value!r}")

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature=0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


THINKING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
NON_THINKING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


def mode_defaults(thinking: bool | None) -> dict[str, float]:
    """The sampling fields to use when the caller set none: per thinking mode, or {} (None: the
    model has no thinking mode, so `SamplingParams`' defaults apply)."""
    if thinking is None:
        return {}
    return dict(THINKING_DEFAULTS if thinking else NON_THINKING_DEFAULTS)


def params_for_mode(thinking: bool | None, **given) -> SamplingParams:
    """`SamplingParams(**given)` with the fields not given filled from `mode_defaults(thinking)`."""
    return SamplingParams(**(mode_defaults(thinking) | given))


class Sampler:
    """Stateful per sequence: it keeps the generator and the token counts the penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int], device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # prompt + output
        self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # output only
        if prompt_ids:
            self._seen[torch.tensor(prompt_ids, device=device).clamp_(0, vocab_size - 1)] = True

    def accept(self, token: int) -> None:
        self._seen[token] = True
        self._counts[token] += 1

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.repetition_penalty != 1.0:
            picked = logits[self._seen]
            logits = logits.clone()
            logits[self._seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            logits = logits - p.frequency_penalty * self._counts - p.presence_penalty * (self._counts > 0).float()
        return logits

    def __call__(self, logits: torch.Tensor) -> tuple[int, float]:
        """logits: (vocab,) float32 -> (token, log-probability of the token under the unfiltered distribution)."""
        logits = self.penalize(logits.float())
        logprobs = torch.log_softmax(logits, dim=-1)
        p = self.params
        if p.is_greedy:
            token = int(torch.argmax(logits))
            return token, float(logprobs[token])
        scaled = logits / p.temperature
        k = p.top_k if 0 < p.top_k < scaled.numel() else scaled.numel()
        values, indices = torch.topk(scaled, k)  # sorted, descending
        probs = torch.softmax(values, dim=-1)
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            before = torch.cumsum(probs, dim=-1) - probs
            probs = torch.where(before < p.top_p, probs, torch.zeros_like(probs))
        if p.min_p > 0.0:
            probs = torch.where(probs >= p.min_p * probs[0], probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs, 1, generator=self.generator)
        token = int(indices[choice])
        return token, float(logprobs[token])
