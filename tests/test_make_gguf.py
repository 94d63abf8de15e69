"""benchmarks/make_gguf.py: a random zen-eco-tiny written as GGUF must load in zen-eco and llama.cpp alike.

For Q8_0 and Q4_0 files we check that
  * zen_eco.load reads back the preset's architecture and hyperparameters;
  * the tokenizer built from the file's metadata encodes like the offline Qwen3 tokenizer;
  * zen-eco's float32 logits equal an independent float64 Qwen3 forward written below, which reads
    the file with gguf-py (GGUFReader + gguf.quants.dequantize) and applies llama.cpp's semantics to
    the tensor names (NEOX RoPE on unpermuted Q/K rows, tied output head, GQA heads in blocks).
    (The file's bytes are located with our GGUFFile parser: gguf-py's GGUFReader takes ~10 s on a
    151,936-entry vocabulary. llama.cpp below parses the file on its own.)
    Tolerance 1e-4 max abs: both sides compute the same function on the same dequantized weights,
    so only float32 rounding separates them (logits are ~0.2 in size, float32 rounding ~1e-7
    relative); a wrong tensor, layout or hyperparameter moves logits by ~1e-2 or more;
  * llama.cpp (when llama-cpp-python is installed) loads the file, tokenizes like us, and its
    last-position logits agree with ours within 5% relative L2 error and on the top token. llama.cpp
    rounds activations to 8 bits (Q8_0 blocks) before each quantized matmul and we do not, which
    alone makes them differ by ~1% (measured: see the test); a wrong layout is ~100%.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zen_eco
from zen_eco import kquant_kernel
from zen_eco.checkpoint import load as load_module
from zen_eco.checkpoint import load_weights, open_checkpoint
from zen_eco.checkpoint.gguf_file import GGUFFile
from zen_eco.config import preset
from zen_eco.engine import native_step
from zen_eco.engine.graphs import decode_one
from zen_eco.kv_cache import KVCache
from zen_eco.quant import Int4Linear, Int8BlockLinear, KQuantLinear, StackedLinear, int4_supported
from zen_eco.tokenizer.qwen import qwen3_tokenizer


def _load_make_gguf():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "make_gguf.py"
    spec = importlib.util.spec_from_file_location("make_gguf", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


make_gguf = _load_make_gguf()

PRESET = "zen-eco-tiny"
TEXTS = ["Hello, world!", "<|im_start|>user\nhi<|im_end|>", "<think>plan</think> 12345 tokens",
         "café naïve 日本語 😀", "  two spaces\n\nand newlines\t"]
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
REF_TOL = 1e-4
LLAMA_REL_TOL = 5e-2


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    cfg = preset(PRESET)
    assert cfg.model_type == "qwen3" and cfg.qk_norm and cfg.tie_word_embeddings  # what the writer targets
    out = tmp_path_factory.mktemp("gguf")
    return {t: make_gguf.write_gguf(cfg, out / f"tiny-{t}.gguf", t, seed=0, name=PRESET) for t in ("q8_0", "q4_0")}


@pytest.fixture(scope="module")
def models(files) -> dict[str, zen_eco.api.ZenModel]:
    return {t: zen_eco.load(p, dtype="float32", device="cpu") for t, p in files.items()}


@pytest.fixture(scope="module")
def contents(files) -> dict[str, tuple[dict, dict[str, tuple[gguf.GGMLQuantizationType, torch.Tensor]]]]:
    """Per file: its metadata, and each tensor's type and dequantized float64 values."""
    return {t: read_gguf(p) for t, p in files.items()}


@pytest.fixture(scope="module")
def offline_tokenizer():
    return qwen3_tokenizer()


# ----------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0"])
def test_tensor_types_and_names(contents, weight_type):
    metadata, tensors = contents[weight_type]
    types = {name: qtype for name, (qtype, _) in tensors.items()}
    cfg = preset(PRESET)
    assert len(types) == 1 + 11 * cfg.num_hidden_layers + 1  # embedding, 11 per layer, final norm (tied head)
    matrix = gguf.GGMLQuantizationType[weight_type.upper()]
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0  # kept at 8 bits for q4_0 too
    assert types["blk.1.ffn_down.weight"] == matrix and types["blk.0.attn_q.weight"] == matrix
    assert types["blk.0.attn_q_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types
    assert metadata["general.file_type"] == make_gguf.WEIGHT_TYPES[weight_type][2]
    assert metadata["general.architecture"] == "qwen3" and metadata["tokenizer.ggml.pre"] == "qwen2"


def test_same_seed_same_file_and_other_seed_differs(files, tmp_path):
    cfg = preset(PRESET)
    again = make_gguf.write_gguf(cfg, tmp_path / "again.gguf", "q8_0", seed=0, name=PRESET)
    assert again.read_bytes() == files["q8_0"].read_bytes()
    other = make_gguf.tensor_plan(cfg, "q8_0")[1]
    assert not np.array_equal(make_gguf.stored_tensor(other, 0), make_gguf.stored_tensor(other, 1))


def test_untied_config_gets_an_output_head_and_other_architectures_are_refused():
    untied = dataclasses.replace(preset(PRESET), tie_word_embeddings=False)
    assert make_gguf.tensor_plan(untied, "q4_0")[-1].name == "output.weight"
    with pytest.raises(ValueError, match="qwen3"):
        make_gguf.write_gguf(preset("llama-tiny"), "/nonexistent/x.gguf")


# ----------------------------------------------------------------------------- zen-eco reads it back


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0"])
def test_config_reads_back(models, weight_type):
    want, got = preset(PRESET), models[weight_type].config
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id", "hidden_act"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as float32
    assert got.eos_token_id == want.eos_token_ids[0]  # GGUF holds one EOS: <|im_end|>


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0"])
def test_tokenizer_matches_offline_qwen3(models, offline_tokenizer, weight_type):
    tok = models[weight_type].tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == offline_tokenizer.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok.add_bos is False
    assert tok.eos_token_ids[0] == 151645 and tok.token_to_id("<|endoftext|>") == 151643
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:3] == [151644, 872, 198]  # our chat template


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0"])
def test_logits_match_independent_reference(contents, models, weight_type):
    ids = models[weight_type].tokenizer.encode(PROMPT)
    ours = models[weight_type].logits(ids).double()
    ref = reference_logits(*contents[weight_type], ids)
    err = (ours - ref).abs().max().item()
    assert ref.abs().max() > 0.1  # the comparison is not between near-zero numbers
    assert err < REF_TOL, err


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0"])
def test_packed_bf16_path_is_close_to_reference(files, contents, weight_type):
    """The path benchmarks measure: bf16 activations, matrices kept packed (Q8_0 / Q4_0) as stored.

    Tolerance 3e-2 relative L2 on the last position: bf16 keeps 8 mantissa bits (~0.4% per rounding)
    and the packed kernels quantize activations; measured ~0.6%."""
    if not int4_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no packed GGUF kernels on this CPU")
    model = zen_eco.load(files[weight_type], dtype="bfloat16", device="cpu")
    packed = {"q8_0": Int8BlockLinear, "q4_0": Int4Linear}[weight_type]
    assert isinstance(model.model.layers[0].attn.wqkv, packed)
    ids = model.tokenizer.encode(PROMPT)
    ours = model.logits(ids)[-1].double()
    ref = reference_logits(*contents[weight_type], ids)[-1]
    assert ((ours - ref).norm() / ref.norm()).item() < 3e-2
    assert ours.argmax() == ref.argmax()


# ----------------------------------------------------------------------------- llama.cpp reads it


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_0"])
def test_llama_cpp_loads_tokenizes_and_agrees(files, models, weight_type):
    llama_cpp = pytest.importorskip("llama_cpp")
    ours = models[weight_type]
    llm = llama_cpp.Llama(model_path=str(files[weight_type]), n_ctx=256, n_threads=1, n_threads_batch=1,
                          verbose=False, logits_all=False)
    try:
        for text in TEXTS:
            theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert theirs == ours.tokenizer.encode(text), text
        assert llm.tokenize(b"Hello, world!", add_bos=False, special=False) == ours.tokenizer.encode("Hello, world!")
        ids = ours.tokenizer.encode(PROMPT)
        llm.eval(ids)
        theirs = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx),
                                                        shape=(llm.n_vocab(),)).copy()).double()
    finally:
        llm.close()
    mine = ours.logits(ids)[-1].double()
    rel = ((theirs - mine).norm() / mine.norm()).item()
    print(f"{weight_type}: llama.cpp vs zen-eco last-position logits, relative L2 error {rel:.2e}")
    assert rel < LLAMA_REL_TOL, rel
    assert theirs.argmax() == mine.argmax()


def test_fused_matrix_of_mixed_types_keeps_each_part_packed(tmp_path, contents):
    """q4_0 with v and up stored Q8_0 (as llama.cpp's _M mixes store v and down Q6_K in half the layers):
    q|k|v and gate|up are each a StackedLinear of a 4-bit part and an int8 part, not one int8 matrix.
    Their bf16 logits, one token (the decode loops, the native step's chained parts) and the whole prompt
    (the several-row paths), agree with the gguf-py reference within bf16's 3e-2 (as the q4_0 file's)."""
    if not int4_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no packed GGUF kernels on this CPU")
    Q = gguf.GGMLQuantizationType
    path = make_gguf.write_gguf(preset(PRESET), tmp_path / "tiny-mixed.gguf", "q4_0", seed=0, name=PRESET,
                                overrides={"attn_v": Q.Q8_0, "ffn_up": Q.Q8_0})
    metadata, tensors = read_gguf(path)
    assert tensors["blk.0.attn_v.weight"][0] == Q.Q8_0 and tensors["blk.0.attn_k.weight"][0] == Q.Q4_0
    model = zen_eco.load(path, dtype="bfloat16", device="cpu")
    for layer in model.model.layers:
        for fused in (layer.attn.wqkv, layer.mlp.w_gate_up):
            assert isinstance(fused, StackedLinear)
            assert [type(p) for p in fused.parts] == [Int4Linear, Int8BlockLinear]
    ids = model.tokenizer.encode(PROMPT)
    for n in (1, len(ids)):
        ours = model.logits(ids[:n])[-1].double()
        ref = reference_logits(metadata, tensors, ids[:n])[-1]
        assert ((ours - ref).norm() / ref.norm()).item() < 3e-2
        assert ours.argmax() == ref.argmax()
    # the last token as a decode step: through the native step's chained descriptors
    m, cfg = model.model, model.model.config
    cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 64, 1, m.dtype, "cpu")
    with torch.inference_mode():
        m(torch.tensor([ids[:-1]]), cache)
        assert native_step.applies(m, cache)
        step = decode_one(m, cache, ids[-1]).view(-1).double()
    assert ((step - ref).norm() / ref.norm()).item() < 3e-2 and step.argmax() == ref.argmax()


@pytest.mark.parametrize("march", ["native", "x86-64-v3"])
def test_q4_and_q8_0_blocks_load_straight_into_the_kernels_buffers(files, smollm2_gguf_path, tmp_path, march,
                                                                  built_for, monkeypatch):
    """Q4_0, Q4_1 and Q8_0 matrices load with no (N, K) codes in between (q4_kernel.pack_blocks: Q4Packed,
    Q8Packed): every Int4Linear's and Int8BlockLinear's buffers equal, bit for bit, decoding the codes and packing
    them (the path before, still taken where a fused matrix's parts differ in type), and so do the logits. The tiny
    q4_0 file (zeros derived; its tied table Q8_0) and q8_0 file, SmolLM2's Q4_1 (llama: q and k rows permuted
    back; fused q|k|v and gate|up; a Q8_0 table), a tiny file whose q|k|v mixes Q4_0 and Q4_1 parts; in this
    machine's build and an AVX2 one (rows in panels)."""
    built_for(march)
    if not int4_supported(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no packed GGUF kernels on this CPU")
    mixed = make_gguf.write_gguf(preset(PRESET), tmp_path / "tiny-q4-mix.gguf", "q4_0", seed=0, name=PRESET,
                                 overrides={"attn_k": gguf.GGMLQuantizationType.Q4_1})
    direct = {}
    for path in (files["q4_0"], files["q8_0"], smollm2_gguf_path, mixed):
        with monkeypatch.context() as m:
            straight = load_module._packed_direct
            m.setattr(load_module, "_packed_direct", lambda *a: direct.setdefault(path, []).append(straight(*a))
                      or direct[path][-1])
            fast = load_weights(open_checkpoint(path), torch.bfloat16, quant="auto")
            m.setattr(load_module, "_packed_direct", lambda *a: None)
            slow = load_weights(open_checkpoint(path), torch.bfloat16, quant="auto")
        buffers = {Int4Linear: ("packed", "scale_zero"), Int8BlockLinear: ("codes", "block_scales", "block_flags")}
        pairs = [(a, b) for a, b in zip(fast.modules(), slow.modules()) if type(a) in buffers]
        assert pairs and all(type(a) is type(b) for a, b in pairs)
        for a, b in pairs:
            for name in buffers[type(a)]:
                x, y = getattr(a, name), getattr(b, name)
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            assert torch.equal(fast(ids), slow(ids))
    taken = {p: sorted(type(w).__name__ for w in ws if w is not None) for p, ws in direct.items()}
    layers = preset(PRESET).num_hidden_layers
    assert taken[files["q4_0"]] == ["Q4Packed"] * 4 * layers + ["Q8Packed"]
    assert taken[files["q8_0"]] == ["Q8Packed"] * (4 * layers + 1)
    assert taken[smollm2_gguf_path] == ["Q4Packed"] * 120 + ["Q8Packed"]
    assert taken[mixed] == ["Q4Packed"] * 3 * layers + ["Q8Packed"]  # q|k|v of Q4_0 and Q4_1: as before


@pytest.mark.parametrize("mix, q_type", [("q4_k_m", "Q4_K"), ("q5_k_m", "Q5_K"), ("q2_k", "Q2_K")])
def test_k_quant_mix_from_llama_cpp_runs_on_our_kernels(tmp_path, mix, q_type):
    """--type q4_k_m / q5_k_m / q2_k: llama.cpp's quantizer makes its mix from the Q8_0 file (K-quants need
    rows of 256: a zen-eco-tiny widened to hidden 256). zen-eco keeps Q4_K_M's Q4_K and Q6_K matrices (the
    tied table, half of v and down Q6_K) and Q5_K_M's Q5_K and Q6_K ones as stored (KQuantLinear; without
    AVX-512 VNNI Q4_K as int4, Q5_K as 5-bit codes, Q6_K as int8 blocks), a q|k|v with a Q6_K v as a
    StackedLinear; Q2_K's Q2_K / Q3_K matrices as int8 blocks (a scale and an offset per 16 columns). Its
    bf16 logits (one token and the prompt: both kernel paths) agree with its own dense float32 forward
    within bf16's rounding (3e-2 relative L2, as for the other bf16 runs; a misread layout is ~100%), and
    the float32 logits with llama.cpp's on the same file as the Q8_0 / Q4_0 files' do."""
    llama_cpp = pytest.importorskip("llama_cpp")
    cfg = dataclasses.replace(preset(PRESET), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64)
    path = make_gguf.write_gguf(cfg, tmp_path / f"wide-{mix}.gguf", mix, seed=0, name=PRESET)
    with GGUFFile(path) as f:
        types = {name: gguf.GGMLQuantizationType(info.ggml_type).name for name, info in f.tensors.items()}
    assert types["token_embd.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == q_type
    if mix == "q4_k_m":
        assert {types[f"blk.{i}.ffn_down.weight"] for i in range(cfg.num_hidden_layers)} <= {"Q4_K", "Q6_K"}
    ours = zen_eco.load(path, dtype="bfloat16", device="cpu")
    kinds = {type(m) for m in ours.model.modules()}
    stored = kquant_kernel.available()  # K-quants as stored where their kernel is built
    assert (KQuantLinear if stored else Int8BlockLinear) in kinds and (mix != "q2_k" or Int8BlockLinear in kinds)
    assert mix == "q2_k" or (KQuantLinear if stored else Int4Linear) in kinds or not int4_supported("cpu", torch.bfloat16)
    assert torch.nn.Linear not in kinds  # every matrix stays quantized
    dense = zen_eco.load(path, dtype="float32", device="cpu", quant="none")
    ids = ours.tokenizer.encode(PROMPT)
    for n in (1, len(ids)):  # one row: the decode loops; the prompt: the several-row ones
        mine, ref = ours.logits(ids[:n])[-1].double(), dense.logits(ids[:n])[-1].double()
        assert ((mine - ref).norm() / ref.norm()).item() < 3e-2
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        llm.eval(ids)
        theirs = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx),
                                                        shape=(llm.n_vocab(),)).copy()).double()
    finally:
        llm.close()
    rel = ((theirs - ref).norm() / ref.norm()).item()
    print(f"{mix}: llama.cpp vs zen-eco last-position logits, relative L2 error {rel:.2e}")
    assert rel < LLAMA_REL_TOL and theirs.argmax() == ref.argmax()


# ----------------------------------------------------------------------------- the reference


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[gguf.GGMLQuantizationType, torch.Tensor]]]:
    with GGUFFile(path) as f:
        tensors = {}
        for name, info in f.tensors.items():
            qtype = gguf.GGMLQuantizationType(info.ggml_type)
            raw = f.tensor_bytes(name).reshape(info.shape[0], -1)  # one row of blocks per output feature
            values = np.array(gguf.quants.dequantize(raw, qtype)).reshape(info.shape)
            tensors[name] = qtype, torch.from_numpy(values).double()
        return dict(f.metadata), tensors


def reference_logits(metadata: dict, tensors: dict, ids: list[int]) -> torch.Tensor:
    """Qwen3 forward in float64 from the file's contents, with llama.cpp's meaning of each tensor and key."""
    arch = metadata[gguf.Keys.General.ARCHITECTURE]
    assert arch == "qwen3"
    K = gguf.Keys

    def hp(key: str):
        return metadata[key.format(arch=arch)]

    n_layers, n_head, n_kv = hp(K.LLM.BLOCK_COUNT), hp(K.Attention.HEAD_COUNT), hp(K.Attention.HEAD_COUNT_KV)
    d, eps, theta = hp(K.Attention.KEY_LENGTH), hp(K.Attention.LAYERNORM_RMS_EPS), hp(K.Rope.FREQ_BASE)
    w = {name: values for name, (_, values) in tensors.items()}
    T = len(ids)
    pos = torch.arange(T, dtype=torch.float64)

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(x):  # NEOX: dimension i rotates with i + d/2
        half = d // 2
        angle = pos[:, None] * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)[None]
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    x = w["token_embd.weight"][ids]
    for i in range(n_layers):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope(rms((h @ w[p + "attn_q.weight"].T).view(T, n_head, d), w[p + "attn_q_norm.weight"]))
        k = rope(rms((h @ w[p + "attn_k.weight"].T).view(T, n_kv, d), w[p + "attn_k_norm.weight"]))
        v = (h @ w[p + "attn_v.weight"].T).view(T, n_kv, d)
        k, v = (t.repeat_interleave(n_head // n_kv, dim=1) for t in (k, v))
        att = (torch.einsum("qhd,khd->hqk", q, k) / d**0.5 + causal).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(T, n_head * d) @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = rms(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T


# --------------------------------------------------------------------------- loading memory

_MEASURE = """
import re, sys, torch
from zen_eco.checkpoint import load_weights, open_checkpoint
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
ckpt = open_checkpoint(sys.argv[1])
before = status("VmRSS")
model = load_weights(ckpt, torch.bfloat16)
tensors = {t.data_ptr(): t for t in list(model.state_dict().values()) + list(model.buffers())}
print(status("VmHWM") - before, sum(t.nbytes for t in tensors.values()))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc/self/status")
def test_loading_a_quantized_gguf_does_not_keep_the_file_resident(tmp_path):
    """A 24-layer Q8_0 file of ~220 MB, kept as int8 blocks: each tensor's pages are dropped from the
    process once copied into the engine's layout, so the load's peak RSS growth stays under the
    loaded model plus its largest tensor (the 82 MB embedding table, file pages and copy at once) plus
    32 MB of interpreter and allocator slack. Keeping the mapped file resident doubles it (measured
    ~2x the model)."""
    cfg = dataclasses.replace(preset(PRESET), hidden_size=512, intermediate_size=3072, num_hidden_layers=24,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    path = make_gguf.write_gguf(cfg, tmp_path / "mem.gguf", "q8_0", seed=0, name=PRESET)
    with GGUFFile(path) as f:
        largest = max(info.nbytes for info in f.tensors.values())
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth, size = map(int, proc.stdout.split())
    assert size > 0.9 * path.stat().st_size  # the model really is the file's size (int8 kept, not dequantized)
    assert growth < size + largest + 32 * 2**20, (growth / 2**20, size / 2**20, largest / 2**20)
