"""The decoder: one PyTorch module for the qwen3, qwen2, llama and gemma3 architectures.

Differences between the families are config flags (QK-norm, q/k/v/o bias, tied embeddings, GQA;
for Gemma 3: (1 + w) norms before and after each sublayer, scaled embeddings, GELU-tanh, a custom
attention scale, sliding-window layers with their own RoPE table, optional final logit soft-capping).
Projections are fused (q|k|v into one matmul, gate|up into one) because at batch 1 each matmul
call costs tens of microseconds of overhead on a CPU; the checkpoint loader does the fusing.
RMSNorm computes in float32 and RoPE uses rotate-half, as transformers' Qwen3/Llama do, so fp32
logits match theirs to rounding.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .kv_cache import KVCache
from .rope import apply_rope_rolled, rope_cos_sin, rope_init, signed_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        # unit_offset (Gemma): the checkpoint stores w and the scale is 1 + w, taken in float32.
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Output in the weight's dtype: the residual stream may be float32 while matmuls run in bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(self.weight.dtype)
        return self.weight * x32.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_dim, self.kv_dim = q_dim, kv_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.gemma_norms) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.gemma_norms) if cfg.qk_norm else None
        self.scale = cfg.attention_scale  # None: SDPA's default, head_dim ** -0.5
        self.window = cfg.layer_window(layer)  # None: attend to every earlier position

    def forward(
        self,
        x: torch.Tensor,  # (B, T, hidden)
        cos: torch.Tensor,  # (T, D), or (B, 1, 1, D) for a batched decode step
        sin: torch.Tensor,  # like cos, with its first half negated (rope.signed_sin)
        cache: KVCache | list[KVCache] | None,  # a list: batched decode, row b continues cache b
        layer: int,
        mask: torch.Tensor | None,  # (T, S) bool, True = may attend; None = plain causal (within the window)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qk, v = self.wqkv(x).split((self.q_dim + self.kv_dim, self.kv_dim), dim=-1)
        qk = qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
            q = apply_rope_rolled(self.q_norm(q).transpose(1, 2), cos, sin)
            k = apply_rope_rolled(self.k_norm(k).transpose(1, 2), cos, sin)
        else:  # q and k are adjacent in the fused output: one RoPE call covers both
            q, k = apply_rope_rolled(qk.transpose(1, 2), cos, sin).split((self.n_heads, self.n_kv_heads), dim=1)
        # q: (B, H, T, D), k and v: (B, H_kv, T, D)
        if T == 1 and mask is None and cache is not None:
            caches = cache if isinstance(cache, list) else [cache]
            rows = [c.attend(layer, q[b : b + 1], k[b : b + 1], v[b : b + 1], self.scale, self.window)
                    for b, c in enumerate(caches)]
            return self.wo((rows[0] if B == 1 else torch.cat(rows)).reshape(B, 1, -1))
        if isinstance(cache, list):
            raise ValueError("a list of caches (batched decode) takes one new token per row")
        if cache is not None:
            # A sliding layer's first new query (position cache.length) sees keys after cache.length - window:
            # earlier ones are masked for every query, so they are neither read nor scored (an 8K-token prompt
            # on Gemma-3 in 512-token chunks: 15 of its 18 layers had attended up to 8K keys a chunk, not ~1K).
            first = max(0, cache.length - self.window + 1) if self.window is not None and mask is not None else 0
            k, v = cache.update(layer, k, v, first)  # (B, H_kv, S - first, D)
            if first:
                mask = mask[:, first:]
        if k.dtype != q.dtype:  # a bf16 cache under a float32 model (Transformer.kv_dtype)
            k, v = k.to(q.dtype), v.to(q.dtype)
        causal = mask is None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                             enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.wo(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.w_down(gate * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(cfg, layer)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg)
        # Gemma also normalises each sublayer's output before adding it to the residual stream.
        self.attn_post_norm = norm() if cfg.gemma_norms else None
        self.mlp_post_norm = norm() if cfg.gemma_norms else None

    def forward(self, x, cos, sin, cache, layer, mask):
        h = self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        h = self.mlp(self.mlp_norm(x))
        return x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # Sliding-window layers may have their own RoPE (Gemma 3: base rope_local_base_freq, unscaled).
        self.windows = sorted({w for i in range(cfg.num_hidden_layers) if (w := cfg.layer_window(i)) is not None})
        self.local_rope = bool(self.windows) and cfg.rope_local_base_freq is not None
        with torch.device("cpu"):  # a few floats; also when the model is built on the meta device
            inv_freq, self.attention_scaling = rope_init(cfg)
            if self.local_rope:
                local = dataclasses.replace(cfg, rope_theta=cfg.rope_local_base_freq, rope_scaling=None)
                inv_freq_local, self.local_attention_scaling = rope_init(local)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self.local_rope:
            self.register_buffer("inv_freq_local", inv_freq_local, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype  # the embedding may be int8 (quant.Int8Embedding)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    cuda_graphs = True  # batch-1 decode steps on CUDA replay a recorded graph (engine.graphs); zen_eco.load sets it
    compile_decode = False  # ... compiled by torch.compile first (engine.graphs.compiled); zen_eco.load(compile=)
    native_step = True  # batch-1 CPU decode steps run as one C call (engine.native_step); zen_eco.load(native_step=)
    kv_format = "bf16"  # how new_cache stores K/V unless told: kv_quant.KV_FORMATS; zen_eco.load(kv_cache=) sets it
    # the rows of a plain ("bf16") cache: None = the model's dtype; zen_eco.load sets bfloat16 for a float32
    # model it picked on a CPU without native bf16 (half the cache's memory; attention computes in float32)
    kv_dtype: torch.dtype | None = None

    def new_cache(self, max_tokens: int | None = None, batch_size: int = 1, kv_format: str | None = None) -> KVCache:
        from .kv_quant import check_kv_format, make_kv_cache

        cfg = self.config
        fmt = check_kv_format(kv_format or self.kv_format)
        return make_kv_cache(
            fmt, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
            max_tokens or cfg.max_position_embeddings, batch_size,
            (self.kv_dtype or self.dtype) if fmt == "bf16" else self.dtype, self.device,
        )

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, hidden) float32: the residual stream stays float32 whatever the weights'
        dtype (as llama.cpp keeps it): rounding it to bf16 after each of dozens of layers is the largest
        error a bf16 run has."""
        x = self.embed(tokens)
        if self.config.embed_scale is not None:  # scaled in the weights' dtype, as the reference does
            x = x * torch.tensor(self.config.embed_scale, dtype=torch.float32).to(x.dtype)
        return x.float()

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        cache: KVCache | list[KVCache] | None = None,
        last_only: bool = False,  # return logits for the last position only (prefill for generation)
    ) -> torch.Tensor:  # (B, T or 1, vocab) in float32
        """Run `tokens` after what `cache` holds. A list of B caches is a batched decode step (T = 1):
        row b is the next token of the sequence held by cache b, at that cache's own position, so
        sequences of different lengths share one pass through the weights."""
        B, T = tokens.shape
        caches = cache if isinstance(cache, list) else [cache] if cache is not None else []
        if isinstance(cache, list) and (T != 1 or len(cache) != B):
            raise ValueError(f"batched decode needs one token per cache: got tokens {tuple(tokens.shape)} for {len(cache)} caches")
        for c in caches:
            c.reserve(T)
        if isinstance(cache, list):
            start = 0
            positions = torch.tensor([[c.length] for c in caches], device=tokens.device)  # (B, 1)
        else:
            start = cache.length if cache is not None else 0
            positions = cache.positions(T) if cache is not None else torch.arange(T, device=tokens.device)
        cos, sin = rope_cos_sin(self.inv_freq, self.attention_scaling, positions, self.dtype)
        rope = (cos, signed_sin(sin))
        local_rope = rope
        if self.local_rope:
            cos, sin = rope_cos_sin(self.inv_freq_local, self.local_attention_scaling, positions, self.dtype)
            local_rope = (cos, signed_sin(sin))
        if positions.dim() == 2:  # (B, 1, D) tables broadcast over the heads as (B, 1, 1, D)
            rope = tuple(t.unsqueeze(1) for t in rope)
            local_rope = tuple(t.unsqueeze(1) for t in local_rope)
        # Masks: None means plain causal (decode steps of sliding layers slice their keys instead).
        masks: dict[int | None, torch.Tensor | None] = {None: None}
        if T > 1:
            key_pos = torch.arange(start + T, device=tokens.device)
            if start > 0:  # new tokens attend to the whole cached prefix and causally to each other
                masks[None] = key_pos[None, :] <= positions[:, None]
            for w in self.windows:  # ... and sliding layers only to the last w positions
                masks[w] = masks[None] if start + T <= w else (
                    (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - w))
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            window = layer.attn.window
            cos, sin = local_rope if window is not None else rope
            x = layer(x, cos, sin, cache, i, masks.get(window))
        for c in caches:
            c.advance(T)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
