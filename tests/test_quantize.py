"""Weight-only INT8 / INT4 quantization: quantizers, layers, on-the-fly loading, `zen-eco quantize`.

References: an independent numpy quantizer and dequantizer written from the format's definition
(checkpoint/quantized.py), the float weights themselves, and the fp32 model. Tolerances, and why:
- int8 per output row: every weight within half a step, step = max|w_row| / 127 (so within 1/254 of
  the row's largest magnitude); the float16 scale adds at most 2^-11 of that.
- int4 per group: within half a step, step = (max - min) / 15 of its group, plus 2^-10 of the group's
  largest magnitude for the float16 scale and minimum.
- A layer's output on random inputs: quantization noise is ~step / sqrt(12) per weight, summed
  incoherently, so relative error ≈ 0.3 / 127 · (max/rms) for int8 (≈ 1% for Gaussian rows, bound 2%)
  and ≈ 0.3 / 15 · (range/rms) for int4 g32 (≈ 8%, bound 12%).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import rounds_x_to_bytes
from safetensors import safe_open

from zen_eco.checkpoint import load_weights, open_checkpoint
from zen_eco.config import PRESETS
from zen_eco.errors import CheckpointError
from zen_eco.init import init_checkpoint
from zen_eco.quant import (DENSE_MIN_ROWS, Int4Linear, Int8Embedding, Int8Linear, QuantSpec, parse_quant, quantize_int4,
                           quantize_int8)
from zen_eco.quantize import quantize_checkpoint


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a few outliers and one constant group (the zero-range edge case)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.randint(0, n, (8,), generator=g), torch.randint(0, k, (8,), generator=g)] *= 20
    w[1, :128] = 0.25
    return w


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tied qwen3 (with Qwen3's tokenizer files) and an untied llama, saved in bf16."""
    root = tmp_path_factory.mktemp("quant")
    return {p: init_checkpoint(p, root / p, dtype="bfloat16", seed=5) for p in ("zen-eco-tiny", "llama-tiny")}


# --------------------------------------------------------------------------- quantizers vs numpy


def _numpy_int4(w: np.ndarray, g: int):
    """Straight from the definition: per group, scale = fp16((max - min) / 15), min = fp16(min),
    code = rint((w - min) / scale) clipped to [0, 15] (scale 0: code 0); w' = scale * code + min."""
    n, k = w.shape
    codes = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, k // g), np.float32)
    mins = np.zeros((n, k // g), np.float32)
    for r in range(n):
        for j in range(k // g):
            x = w[r, j * g:(j + 1) * g]
            lo, hi = np.float32(x.min()), np.float32(x.max())
            s = np.float32(np.float16((hi - lo) / np.float32(15)))
            m = np.float32(np.float16(lo))
            q = np.rint((x - m) / (s if s > 0 else np.float32(1)))
            codes[r, j * g:(j + 1) * g] = np.clip(q, 0, 15)
            scales[r, j], mins[r, j] = s, m
    deq = (codes.reshape(n, k // g, g).astype(np.float32) * scales[..., None] + mins[..., None]).reshape(n, k)
    return codes, scales, mins, deq


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_matches_independent_numpy(group):
    w = _weight(24, 256, seed=group)
    q = quantize_int4(w, group)
    codes, scales, mins, deq = _numpy_int4(w.numpy(), group)
    assert np.array_equal(q.codes.numpy(), codes)
    assert np.array_equal(q.scale.numpy(), scales) and np.array_equal(q.offset.numpy(), mins)
    assert np.array_equal(q.dequantize().numpy(), deq)
    # the runtime layer's own dequantization (kernel layout and portable fallback), in float32:
    # (code - 8) * scale + zero with zero = min + 8 * scale, so equal to rounding (a few ulp)
    for kernel in (True, False):
        layer = Int4Linear(q, None, torch.float32, kernel=kernel)
        if layer.backend == "dense" or layer.can_unpack:
            assert torch.allclose(layer.dense_weight(torch.float32), torch.from_numpy(deq), rtol=0, atol=1e-6)


def test_error_bounds_per_element():
    w = _weight(64, 256)
    q8 = quantize_int8(w)
    step8 = w.abs().amax(1, keepdim=True) / 127
    assert ((q8.dequantize() - w).abs() <= step8 / 2 * (1 + 2**-10)).all()
    assert q8.codes.abs().max() <= 127
    for group in (32, 64, 128):
        q4 = quantize_int4(w, group)
        gw = w.view(64, -1, group)
        step4 = (gw.amax(-1) - gw.amin(-1)) / 15
        err = (q4.dequantize() - w).view(64, -1, group).abs()
        assert (err <= step4[..., None] / 2 + gw.abs().amax(-1, keepdim=True) * 2**-10).all()
    assert (quantize_int4(w, 32).dequantize()[1, :128] == 0.25).all()  # a constant group is exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_outputs_within_bounds_on_every_path(dtype):
    """Kernel (few rows), prompt GEMM or dense GEMM (many rows) and the portable fallback all compute the
    same layer."""
    torch.manual_seed(0)
    w, bias = torch.randn(192, 256) * 0.05, torch.randn(192) * 0.1
    few, many = torch.randn(3, 256), torch.randn(DENSE_MIN_ROWS + 5, 256)
    for q, bound in ((quantize_int8(w), 0.02), (quantize_int4(w, 32), 0.12)):
        cls = Int8Linear if q.__class__.__name__ == "Q8Weight" else Int4Linear
        exact = [x @ q.dequantize().t() + bias for x in (few, many)]
        for kernel in (True, False):
            layer = cls(q, bias, dtype, kernel=kernel)
            for x, ref in zip((few, many), exact):
                # against the dequantized weight: only activation/scale rounding (bf16: 2^-8) remains;
                # our int4 kernel (few rows) rounds float32 activations to int16 per group of 32
                # (2^-15 of the group's largest |x|: measured ~5e-5 relative), and so does its prompt GEMM
                # where it takes the many rows (native_rows: infinite where it is built)
                # (AVX2 hosts: to bytes, ~5e-3, conftest.rounds_x_to_bytes)
                native = getattr(layer, "backend", None) == "native" and x.shape[0] < layer.native_rows
                fine = 2e-2 if rounds_x_to_bytes(x.shape[0]) else 2e-4
                assert _rel(layer(x.to(dtype)), ref) < (0.01 if dtype == torch.bfloat16 else fine if native else 1e-5)
        assert _rel(exact[1], many @ w.t() + bias) < bound  # quantization error itself


def test_parse_quant():
    assert parse_quant("auto") == "auto" and parse_quant("NONE") == "none"
    assert parse_quant("int8") == QuantSpec(8)
    assert parse_quant("int4") == parse_quant("int4-g32") == QuantSpec(4, 32)
    assert parse_quant("int4", 128) == parse_quant("int4-g128") == QuantSpec(4, 128)
    for bad, needle in (("int3", "unknown quant mode"), ("int4-g48", "group size 48"), ("fp8", "unknown")):
        with pytest.raises(CheckpointError, match=needle):
            parse_quant(bad)
    with pytest.raises(CheckpointError, match="int4 only"):
        parse_quant("int8", 64)
    with pytest.raises(CheckpointError, match="disagree"):
        parse_quant("int4-g64", 32)


# --------------------------------------------------------------------------- models


def test_int8_model_tracks_fp32(tiny_dirs):
    """Tiny random qwen3, int8 layers and tied head/embedding table: logits within 3% (measured ~1%;
    the layer bound above compounded over 2 layers), greedy next tokens equal at >= 90% of positions."""
    ckpt = open_checkpoint(tiny_dirs["zen-eco-tiny"])
    exact = load_weights(ckpt, torch.float32, quant="none")
    q8 = load_weights(ckpt, torch.float32, quant="int8")
    assert isinstance(q8.layers[0].attn.wqkv, Int8Linear) and isinstance(q8.layers[1].mlp.w_down, Int8Linear)
    assert isinstance(q8.lm_head, Int8Linear) and isinstance(q8.embed, Int8Embedding)
    assert q8.embed.codes is q8.lm_head.codes and q8.embed.scales is q8.lm_head.scales  # one int8 table
    table = q8.lm_head.dense_weight(torch.float32)
    ids0 = torch.tensor([[5, 70000, 149999]])
    assert torch.equal(q8.embed(ids0).float(), table[ids0])
    ids = torch.randint(0, 150000, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = q8(ids), exact(ids)
    assert _rel(a, b) < 0.03
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_default_model_int8_tracks_fp32(smollm2_gguf_path):
    """The real SmolLM2 (its Q4_1 weights dequantized, then requantized to int8 while loading), bf16
    activations, vs exact fp32: next-token agreement >= 90% of a 30-token text, logits within 8%
    (per-row int8 steps off the file's Q4_1 grid: ~1% per matrix over 30 layers; measured 4.7% in
    fp32, 5.1% with bf16 activations, which alone give 1.8%)."""
    ckpt = open_checkpoint(smollm2_gguf_path)
    q = load_weights(ckpt, torch.bfloat16, quant="int8")
    exact = load_weights(ckpt, torch.float32, quant="none")
    ids = torch.tensor([ckpt.tokenizer().encode("The quick brown fox jumps over the lazy dog. Paris is the capital "
                                                "of France, and Berlin is the capital of Germany.")])
    with torch.no_grad():
        a, b = q(ids), exact(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    assert _rel(a, b) < 0.08


def test_int4_g32_lands_on_a_q4_1_grid(smollm2_gguf_path):
    """Min/max int4 in groups of 32 is Q4_1's own scheme: requantizing the file's Q4_1 matrices gives
    back their values exactly (where a block uses codes 0 and 15, as llama.cpp's quantizer makes them),
    so `--quant int4` on a Q4_1 file costs nothing beyond float16 rounding of the new scales."""
    ckpt = open_checkpoint(smollm2_gguf_path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        w = ckpt.source.get(name)
        assert torch.equal(quantize_int4(w, 32).dequantize(), w)


# --------------------------------------------------------------------------- quantized checkpoints


@pytest.mark.parametrize("preset,to", [("zen-eco-tiny", "int4-g64"), ("llama-tiny", "int8"), ("llama-tiny", "int4")])
def test_quantized_checkpoint_loads_bit_identical_to_on_the_fly(tiny_dirs, tmp_path, preset, to):
    out = quantize_checkpoint(tiny_dirs[preset], tmp_path / "q", to)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    spec = parse_quant(to)
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["symmetric"]) == ("zen-eco", spec.bits,
                                                                                   spec.group_size, spec.bits == 8)
    assert qc["int8_modules"] == (["model.embed_tokens"] if preset == "zen-eco-tiny" else ["lm_head"])  # tied, untied
    if preset == "zen-eco-tiny":
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    stored = open_checkpoint(out)
    assert stored.quantization == spec
    for dtype in (torch.bfloat16, torch.float32):
        a = load_weights(stored, dtype).state_dict()
        b = load_weights(open_checkpoint(tiny_dirs[preset]), dtype, quant=to).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_weights(stored, torch.float32, quant=to) is not None  # its own spec: as stored
    with pytest.raises(CheckpointError, match="already quantized"):
        load_weights(stored, torch.float32, quant="int8" if spec.bits == 4 else "int4")


def test_file_layout_is_portable(tiny_dirs, tmp_path):
    """The codes and scales read back with numpy alone (no zen-eco, no torch) give the quantized
    weight; dequantized under quant='none' the checkpoint equals the on-the-fly int4 weight."""
    out = quantize_checkpoint(tiny_dirs["zen-eco-tiny"], tmp_path / "q", "int4")
    p = "model.layers.0.mlp.down_proj"
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
        packed, scales, mins = (f.get_tensor(p + s) for s in (".qweight", ".scales", ".mins"))
    assert packed.dtype == np.uint8 and scales.dtype == mins.dtype == np.float16
    n, k = PRESETS["zen-eco-tiny"]["hidden_size"], PRESETS["zen-eco-tiny"]["intermediate_size"]
    assert packed.shape == (n, k // 2) and scales.shape == (n, k // 32)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k)
    w = (np.repeat(scales.astype(np.float32), 32, 1) * codes + np.repeat(mins.astype(np.float32), 32, 1))
    model = load_weights(open_checkpoint(out), torch.float32, quant="none")
    assert np.array_equal(model.layers[0].mlp.w_down.weight.detach().numpy(), w)
    assert {"model.embed_tokens.qweight", "model.embed_tokens.scales"} <= names  # tied: the head's int8 table
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names


def test_quantize_refuses_bad_input(tiny_dirs, tmp_path, smollm2_gguf_path):
    with pytest.raises(CheckpointError, match="unknown quant mode 'int3'"):
        quantize_checkpoint(tiny_dirs["llama-tiny"], tmp_path / "a", "int3")
    with pytest.raises(CheckpointError, match="cannot quantize to 'auto'"):
        quantize_checkpoint(tiny_dirs["llama-tiny"], tmp_path / "a", "auto")
    with pytest.raises(CheckpointError, match=r"down_proj.*must divide its 160 input features"):
        quantize_checkpoint(tiny_dirs["llama-tiny"], tmp_path / "a", "int4", group_size=64)  # ffn 160
    assert not (tmp_path / "a").exists()  # refused before anything was written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        quantize_checkpoint(tiny_dirs["llama-tiny"], tmp_path / "full", "int8")
    with pytest.raises(CheckpointError, match="GGUF file"):
        quantize_checkpoint(smollm2_gguf_path, tmp_path / "b", "int8")
    done = quantize_checkpoint(tiny_dirs["llama-tiny"], tmp_path / "c", "int8")
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(done, tmp_path / "d", "int4")
    with pytest.raises(CheckpointError, match="group size 64 must be one of"):  # on the fly: names the tensor
        load_weights(open_checkpoint(tiny_dirs["llama-tiny"]), quant="int4-g64")


def test_unknown_quantization_config_is_refused(tiny_dirs, tmp_path):
    out = quantize_checkpoint(tiny_dirs["llama-tiny"], tmp_path / "q", "int8")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization 'gptq' is not supported"):
        open_checkpoint(out)


# --------------------------------------------------------------------------- memory and CLI


@pytest.fixture(scope="module")
def mem_model(tmp_path_factory):
    cfg = dict(model_type="qwen3", vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
               num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
               tie_word_embeddings=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "mem-test", cfg)
        return init_checkpoint("mem-test", tmp_path_factory.mktemp("mem") / "m", dtype="float32")


# VmHWM is this process's own peak RSS (ru_maxrss would also carry the parent's RSS across fork + exec).
_MEASURE = textwrap.dedent("""
    import re, sys, torch
    from zen_eco.checkpoint import load_weights, open_checkpoint
    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
    ckpt = open_checkpoint(sys.argv[1])
    before = status("VmRSS")
    model = load_weights(ckpt, torch.float32, quant=sys.argv[2])
    size = sum(t.nbytes for t in model.state_dict().values())
    print(status("VmHWM") - before, size)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc/self/status")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_loading_never_holds_the_float_model(mem_model, quant):
    """A 16-layer model of 242 MiB in fp32 (each matrix 1-8 MiB): the load's peak RSS growth stays
    under half the float model and under the quantized model plus 64 MiB (one matrix in fp32 and
    the quantizer's temporaries, ~40 MiB measured, plus the interpreter's and allocator's own).
    Peak RSS (VmHWM) - RSS before the load is an upper bound on the load's peak growth."""
    path = mem_model
    float_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), quant], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    growth, size = map(int, proc.stdout.split())
    assert size < float_bytes / 3
    assert growth < min(float_bytes / 2, size + 64 * 2**20), (growth / 2**20, size / 2**20, float_bytes / 2**20)


def _zen(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "zen_eco.cli", *args], capture_output=True, text=True,
                          timeout=180, env=env)


def test_cli_quantize_and_its_errors(tiny_dirs, tmp_path):
    """One success and one refusal through the real command (the other refusals are checked above)."""
    ok = _zen("quantize", str(tiny_dirs["zen-eco-tiny"]), "--to", "int4", "--group-size", "64", "-o", str(tmp_path / "q"))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "q")
    assert open_checkpoint(tmp_path / "q").quantization == QuantSpec(4, 64)
    bad = _zen("quantize", str(tiny_dirs["llama-tiny"]), "--to", "int4", "--group-size", "64", "-o", str(tmp_path / "b"))
    err = bad.stderr.strip()
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(err.splitlines()) == 1, bad.stderr
    assert err.startswith("error:") and "must divide its 160 input features" in err, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_layers_match_cpu(bits):
    """On CUDA: int4 on tinygemm (bf16, sm80+), int8 on the cast-codes fallback — outputs as on paper."""
    w = torch.randn(256, 512) * 0.05
    q = quantize_int8(w) if bits == 8 else quantize_int4(w, 32)
    cls = Int8Linear if bits == 8 else Int4Linear
    x = torch.randn(4, 512).bfloat16()
    ref = x.float() @ q.dequantize().t()
    layer = cls(q, None, torch.bfloat16, "cuda")
    if bits == 4 and torch.cuda.get_device_capability() >= (8, 0):
        assert layer.backend == "cuda"  # tinygemm took it (else it fell back silently)
    for rows in (x[:1], x):
        assert _rel(layer(rows.cuda()).float().cpu(), ref[: rows.shape[0]]) < 0.01
