"""The Python API: `zen_eco.load(ref)` -> `ZenModel` with generate / chat / logits.

    import zen_eco
    m = zen_eco.load()                                  # the bundled default model
    print(m.generate("Explain quantum computing", max_tokens=64).text)
    for chunk in m.chat([{"role": "user", "content": "Hi"}], stream=True):
        print(chunk.text, end="")

`ZenModel` keeps one KV cache and reuses the longest common prefix between calls, so the second
turn of a chat only computes the new tokens. `load(..., kv_cache="int8" | "int4" | "k4v2" | "int2")` stores
that cache quantized (see `kv_quant`; default "bf16": the model's own dtype).

Thinking mode (models whose tokenizer has `<think>`/`</think>`, e.g. Zen-Eco and Qwen3): on by
default; `enable_thinking=False` turns it off, `/think` and `/no_think` in user messages switch it
per turn (the latest wins), `thinking_budget=N` caps it at N tokens. Results and chunks carry
`reasoning` and `content` next to the raw `text`.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .checkpoint import load_weights, open_checkpoint
from .config import ModelConfig
from .engine.generate import GenerationChunk, stream_generate
from .engine.sampling import SamplingParams, params_for_mode
from .engine.thinking import check_thinking_budget, resolve_thinking, thinking_tokens
from .errors import ZenError
from .kv_cache import KVCache
from .kv_quant import check_kv_format
from .model import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ZenError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZenError("device cuda was asked for but no CUDA GPU is available")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 where the hardware computes it natively (recent x86 CPUs, Ampere+ GPUs), else fp16 on GPU, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ZenError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}") from None


def freeze_heap() -> None:
    """Put every object alive now (the model's modules, the tokenizer's tables: ~180K objects for SmolLM2 or
    zen-eco-4b) out of the garbage collector's reach (gc.freeze): each of its full collections otherwise
    walks them all, an 85-105 ms pause in the middle of a stream or a server's batch (measured here). For
    processes that load once and then generate (the CLI, the server); objects made later are collected as
    usual."""
    gc.collect()
    gc.freeze()


def load_model(ckpt, dtype: str | torch.dtype | None, device: torch.device, progress: bool = False,
               quant: str = "auto"):
    """`ckpt`'s model in `dtype` (see pick_dtype) on `device` (zen_eco.load's and bench's loading). A float32
    that dtype "auto" picked on the CPU (no native bf16 there: most AVX2 machines) is treated as bf16 would
    be: GGUF weights stay packed (load_weights' packed_float32) and plain KV caches keep bf16 rows
    (Transformer.kv_dtype: half the memory and bytes read per step; attention still computes in float32).
    An explicit float32 is the exact reference: dense weights, float32 rows."""
    auto = dtype in (None, "auto")
    model = load_weights(ckpt, pick_dtype(dtype, device), device, progress=progress, quant=quant, packed_float32=auto)
    if auto and model.device.type == "cpu" and model.dtype == torch.float32:
        model.kv_dtype = torch.bfloat16
    return model


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float
    reasoning: str = ""  # the thinking block's text (without the tags); "" when the model did not think
    content: str = ""  # the answer: `text` without the thinking block (all of `text` for other models)


class ZenModel:
    def __init__(self, model: Transformer, tokenizer, path: str, context: int | None = None,
                 kv_cache: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.kv_cache = None if kv_cache is None else check_kv_format(kv_cache)  # None: the model's kv_format
        self._cache: KVCache | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def supports_thinking(self) -> bool:
        """Whether the tokenizer has `<think>` and `</think>` (Zen-Eco, Qwen3): thinking mode applies."""
        return thinking_tokens(self.tokenizer) is not None

    def thinking_mode(self, messages: list[dict[str, Any]] | None = None, enable_thinking: bool | None = None,
                      thinking_budget: int | None = None) -> bool | None:
        """Whether a call with these arguments thinks; None for models without thinking tokens."""
        if not self.supports_thinking:
            return None
        return resolve_thinking(messages or [], enable_thinking, thinking_budget)

    def _shared_cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self.model.new_cache(max_tokens=self.context, kv_format=self.kv_cache)
        return self._cache

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        stream: bool = False,
        stop: Sequence[str] | str = (),
        sampling: SamplingParams | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        **sampling_kwargs: Any,
    ) -> GenerationResult | Iterator[GenerationChunk]:
        """Continue `prompt` (text, encoded with the tokenizer's BOS rule, or token ids).

        Sampling: pass `sampling=SamplingParams(...)` or its fields as keywords
        (temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed).
        For a model with thinking tokens, temperature/top_k/top_p/min_p not given follow the thinking
        mode's defaults (see `engine.sampling.mode_defaults`); `thinking_budget` caps a `<think>` block
        the model writes (or the prompt opens), and `enable_thinking=False` reports all text as content.
        """
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_thinking_budget(thinking_budget)
        mode = self.thinking_mode(None, enable_thinking, thinking_budget)
        return self._run(ids, max_tokens, stream, stop, sampling, sampling_kwargs, mode, thinking_budget,
                         enable_thinking)

    def chat(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int = 512,
        stream: bool = False,
        stop: Sequence[str] | str = (),
        sampling: SamplingParams | None = None,
        template_kwargs: dict[str, Any] | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        **sampling_kwargs: Any,
    ) -> GenerationResult | Iterator[GenerationChunk]:
        """Answer a conversation rendered with the checkpoint's own chat template.

        Thinking (models with `<think>`/`</think>` only): on unless `enable_thinking=False` (also
        accepted in `template_kwargs`) or `thinking_budget=0`; otherwise the latest `/think` or
        `/no_think` in the user messages decides. The template gets `enable_thinking` accordingly;
        `thinking_budget=N` (0..131072) closes the block after N thinking tokens."""
        if enable_thinking is None:
            enable_thinking = (template_kwargs or {}).get("enable_thinking")
        ids, mode = self.chat_prompt(messages, enable_thinking, thinking_budget, template_kwargs)
        return self._run(ids, max_tokens, stream, stop, sampling, sampling_kwargs, mode, thinking_budget,
                         enable_thinking)

    def chat_prompt(self, messages: list[dict[str, Any]], enable_thinking: bool | None = None,
                    thinking_budget: int | None = None, template_kwargs: dict[str, Any] | None = None,
                    ) -> tuple[list[int], bool | None]:
        """The prompt ids for a conversation and its thinking mode (None: the model has none), by
        the rules of `chat`; a server renders requests with this and generates with its scheduler."""
        template_kwargs = dict(template_kwargs or {})
        check_thinking_budget(thinking_budget)
        if enable_thinking is None:
            enable_thinking = template_kwargs.get("enable_thinking")
        mode = self.thinking_mode(messages, enable_thinking, thinking_budget)
        if mode is not None:
            template_kwargs["enable_thinking"] = mode
        elif enable_thinking is not None:
            template_kwargs.setdefault("enable_thinking", enable_thinking)  # templates that read it anyway
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, **template_kwargs), mode

    def _run(self, ids, max_tokens, stream, stop, sampling, sampling_kwargs, mode=None, thinking_budget=None,
             enable_thinking=None):
        if sampling is None:
            sampling = params_for_mode(mode, **sampling_kwargs)
        elif sampling_kwargs:
            raise ZenError("pass either sampling=SamplingParams(...) or sampling keywords, not both")
        stops = [stop] if isinstance(stop, str) else list(stop)
        chunks = stream_generate(self.model, self.tokenizer, ids, sampling, max_tokens, stops,
                                 self._shared_cache(), self.context, enable_thinking=enable_thinking,
                                 thinking_budget=thinking_budget)
        return chunks if stream else self._collect(chunks)

    @staticmethod
    def _collect(chunks: Iterator[GenerationChunk]) -> GenerationResult:
        text, reasoning, content, ids, last = [], [], [], [], None
        for last in chunks:
            text.append(last.text)
            reasoning.append(last.reasoning)
            content.append(last.content)
            ids.append(last.token)
        return GenerationResult("".join(text), ids, last.finish_reason, last.prompt_tokens, last.generation_tokens,
                                last.prompt_tps, last.generation_tps, last.time_to_first_token,
                                "".join(reasoning), "".join(content))

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position: (T,) ids -> (T, vocab) float32. No cache is kept."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.model.device).reshape(1, -1)
        if ids.numel() == 0:
            raise ZenError("logits() needs at least one token")
        if ids.shape[1] > self.context:
            raise ZenError(f"{ids.shape[1]} tokens exceed the context of {self.context}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ZenError(f"token ids must be in [0, {self.config.vocab_size})")
        cache = self.model.new_cache(max_tokens=ids.shape[1], kv_format=self.kv_cache)
        out = [self.model(ids[:, i : i + 512], cache)[0] for i in range(0, ids.shape[1], 512)]
        return torch.cat(out)


def set_threads(threads: int | None) -> None:
    if threads:
        if threads < 1:
            raise ZenError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def load(
    ref: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    context: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    quant: str = "auto",
    kv_cache: str = "bf16",
    cuda_graphs: bool = True,
    compile: bool = False,
    native_step: bool = True,
) -> ZenModel:
    """Load a model: a GGUF file, a Hugging Face directory, a Hub id, or None for the bundled default.

    kv_cache: how KV caches store keys and values — "bf16" (the model's dtype), "int8", "int4", "k4v2"
    (4-bit keys, 2-bit values) or "int2" (KIVI-style 2-bit); see zen_eco.kv_quant for the formats and
    README "Long context" for their measured quality. It becomes the model's `kv_format`, so every
    cache made for it (the API's, a server's) uses it.

    quant="auto" keeps a GGUF file's Q4_0/Q4_1/Q4_K matrices packed 4-bit, its Q5 ones 5-bit and its
    Q8_0/Q6_K/Q3_K ones (and a tied table) 8-bit where our kernels run (the CPU, with the dtype "auto" or
    bf16: an explicit float32 stays the dense reference), and a `zen-eco quantize`
    checkpoint as stored; quant="none" dequantizes every weight to `dtype`; "int8", "int4" (group 32),
    "int4-g64", "int4-g128" quantize the layers' matrices while loading (see `checkpoint.load_weights`).

    cuda_graphs: on CUDA, replay each batch-1 decode step as a recorded CUDA graph (see
    zen_eco.engine.graphs; not on the CPU, nor with a quantized KV cache). compile: that step compiled
    by torch.compile first, on CUDA or the CPU (faster decode for a one-off compile of ~35-60 s: for
    servers and long sessions; not with a quantized KV cache). native_step: on the CPU, run each
    batch-1 decode step as one C call (zen_eco.engine.native_step: 2-3x the decode speed of the
    PyTorch forward on small models; bf16 or float32 KV caches; compile, where asked, takes precedence)."""
    set_threads(threads)
    kv_cache = check_kv_format(kv_cache)  # before the weights load: fail fast
    dev = pick_device(device)
    ckpt = open_checkpoint(ref)
    tokenizer = ckpt.tokenizer()
    model = load_model(ckpt, dtype, dev, progress, quant)
    if context is not None and context < 1:
        raise ZenError(f"context must be >= 1, got {context}")
    model.kv_format = kv_cache
    model.cuda_graphs = bool(cuda_graphs)
    model.compile_decode = bool(compile)
    model.native_step = bool(native_step)
    if dev.type == "cpu":  # the decode step's C (and a quantized cache's) built now, not at the first token
        from . import decode_kernel, kv_kernel

        if native_step:
            decode_kernel.library()
        if kv_cache != "bf16":
            kv_kernel.library()
    return ZenModel(model, tokenizer, str(ckpt.path), context)
