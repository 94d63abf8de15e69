"""GGUF's K-quants (Q4_K, Q5_K, Q6_K) kept as stored (kquant_kernel, quant.KQuantLinear).

References: gguf-py's `dequantize` for the file's values (bit-identical: our decode keeps ggml's float32
products d * sc, dmin * m), and float64 matmuls of those values for the kernel. The kernel rounds x per
block of 32 (AVX-512 VNNI: to 15-bit integers, a step of 2^-14 of the block's largest |x|; the AVX2 loop:
to int8, as llama.cpp's activations) and its integer sums are exact, so against the float64 product of x
*as rounded* it agrees to float32 rounding: tolerance 1e-6 relative L2 (measured 5e-8 to 1.3e-7); a
sub-scale, a minimum or a bit plane read for the wrong block or half is off by > 1e-2. Against x itself,
2e-4 with VNNI (measured 2e-5 to 1.1e-4) and 2e-2 with AVX2 (3e-3 to 1.1e-2). Most tests run twice: on this
machine's build and on an x86-64-v3 one (AVX2 without AVX-512), whose bit planes have their own layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import as_rounded

from zen_eco import kquant_kernel, native, q4_kernel
from zen_eco.checkpoint import gguf_native
from zen_eco.checkpoint.gguf_quants import KQUANT_TYPES, kquant_codes
from zen_eco.quant import (AVX2_DENSE_ROWS, KQUANT_DENSE_ROWS, Int8Embedding, KQuantLinear, KQuantWeight,
                           native_max_rows)

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not kquant_kernel.available(), reason="the K-quant kernel needs AVX-512 VNNI")

KERNEL_TOL = 2e-4  # against x itself, the VNNI loop
AS_ROUNDED_TOL = 1e-6  # against x as the loop rounds it
LEVELS = {"avx512-vnni": 16383, "avx2": 127, "avx-vnni": 127}  # x's largest |integer| per block, per loop
TO_X = {"avx512-vnni": KERNEL_TOL, "avx2": 2e-2, "avx-vnni": 2e-2}


def _levels(loop: str, m: int) -> int:
    """LEVELS for m rows of x: from GEMM_MIN_ROWS rows the VNNI build takes the prompt GEMM, which rounds to bytes."""
    gemm = loop == "avx512-vnni" and m >= q4_kernel.GEMM_MIN_ROWS and q4_kernel.gemm_available()
    return 127 if gemm else LEVELS[loop]
KINDS = list(KQUANT_TYPES)
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
FP16_AT = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # d (and dmin) in each block


def _random_blocks(kind: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random blocks of `kind` (any bytes are codes and sub-scales) with finite d (and dmin) over 4 decades."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, BLOCK_BYTES[kind]), dtype=np.uint8)
    for at in FP16_AT[kind]:
        d = (rng.uniform(0.1, 1, n_blocks) * 10.0 ** rng.integers(-6, -2, n_blocks)).astype(np.float16)
        blocks[:, at:at + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _weight(kind: str, n: int, k: int, seed: int = 0) -> tuple[KQuantWeight, torch.Tensor]:
    """A random matrix of `kind` as our weight, and gguf-py's float32 values of the same bytes."""
    return _weight_from(kind, _random_blocks(kind, n * k // 256, seed), n, k)


def _weight_from(kind: str, blocks: np.ndarray, n: int, k: int) -> tuple[KQuantWeight, torch.Tensor]:
    t = KQUANT_TYPES[kind]
    ref = gguf.quants.dequantize(blocks.reshape(n, -1), gguf.GGMLQuantizationType(t)).reshape(n, k)
    arrays = kquant_codes(blocks.reshape(-1), t, (n, k))
    fields = (None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return KQuantWeight(kind, *fields), torch.from_numpy(ref)


def _bufs(w: KQuantWeight) -> tuple[torch.Tensor, ...]:
    return kquant_kernel.pack(w.kind, w.codes, w.sub_scale, w.d, w.sub_min, w.dmin)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cpu_has(*flags: str) -> bool:
    try:
        words = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return False
    return all(f in words for f in flags)


@pytest.fixture(params=["native", "x86-64-v3", "x86-64-v3+vnni"])
def loop(request, built_for):
    """The test under this machine's build, then under an x86-64-v3 build (AVX2 without AVX-512: the AVX2 loop
    and its bit-plane layout), then that build with 256-bit vpdpbusd (the loop Intel's AVX-VNNI CPUs take,
    here in its AVX-512 VNNI + VL encoding: the same arithmetic); gives kquant_kernel.loop()."""
    if request.param.endswith("+vnni"):
        if not _cpu_has("avx512_vnni", "avx512vl"):
            pytest.skip("this CPU cannot run 256-bit vpdpbusd")
        built_for("x86-64-v3", "-mavx512vnni", "-mavx512vl")
    else:
        built_for(request.param)
    want = {"native": kquant_kernel.loop(), "x86-64-v3": "avx2", "x86-64-v3+vnni": "avx-vnni"}[request.param]
    assert kquant_kernel.loop() == want
    if not kquant_kernel.available():
        pytest.skip("no K-quant loop in this build")
    return kquant_kernel.loop()


@pytest.mark.parametrize("kind", KINDS)
def test_codes_and_both_dequantizations_are_bit_identical_to_gguf(kind, loop):
    """K = 768: a panel of 16 blocks (unpacked in vectors) and a last one of 8 (VNNI: block by block)."""
    w, ref = _weight(kind, 6, 768)
    assert w.codes.dtype == torch.uint8 and int(w.codes.max()) < {"q4_k": 16, "q5_k": 32, "q6_k": 64}[kind]
    assert torch.equal(w.dequantize(), ref)
    bufs = _bufs(w)
    assert bufs[1].shape[1] == KINDS.index(kind)  # bit planes above the nibbles: 0, 1, 2
    assert torch.equal(kquant_kernel.dequantize(kind, *bufs, torch.float32), ref)
    assert torch.equal(kquant_kernel.dequantize(kind, *bufs, torch.bfloat16), ref.bfloat16())
    rows = torch.tensor([[5, 0], [2, 2]])
    assert torch.equal(kquant_kernel.dequantize(kind, *bufs, torch.float32, rows=rows), ref[rows.view(-1)])
    with pytest.raises(IndexError):
        kquant_kernel.dequantize(kind, *bufs, torch.float32, rows=torch.tensor([6]))


@pytest.mark.parametrize("kind", KINDS)
def test_codes_decode_into_a_given_array_and_rows_cat(kind):
    blocks = _random_blocks(kind, 4, 3)
    out = np.zeros((2, 512), np.uint8)
    codes, *_ = kquant_codes(blocks.reshape(-1), KQUANT_TYPES[kind], (2, 512), codes_out=out)
    assert codes is out and out.max() > 0
    a, ref_a = _weight(kind, 3, 256, seed=1)
    b, ref_b = _weight(kind, 2, 256, seed=2)
    joined = KQuantWeight.cat([a, b])
    assert torch.equal(joined.dequantize(), torch.cat([ref_a, ref_b]))
    assert torch.equal(joined.permute_rows(torch.tensor([4, 0])).dequantize(), torch.cat([ref_a, ref_b])[[4, 0]])
    other = "q6_k" if kind != "q6_k" else "q4_k"
    assert KQuantWeight.cat([a, _weight(other, 2, 256)[0]]) is None  # kinds differ: no one layout


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_pack_straight_into_the_same_buffers(kind, loop):
    """pack_blocks (loading: the file's blocks into our layout in one C pass) gives, byte for byte, what
    pack gives from the decoded codes: K of 1 super-block (a panel of 8 blocks), 3 (16 + 8) and 10; also
    written into row slices of a fused matrix's buffers. A wrong byte count is refused."""
    parts = []
    for n, k in [(37, 256), (40, 768), (9, 2560)]:
        blocks = _random_blocks(kind, n * k // 256, seed=n + k)
        w, _ = _weight(kind, n, k, seed=n + k)
        got = kquant_kernel.pack_blocks(kind, blocks, n, k)
        assert all(torch.equal(a, b) for a, b in zip(got, _bufs(w)))
        if k == 768:
            parts.append((blocks, n, w))
    extra = _random_blocks(kind, 5 * 3, seed=99)
    arrays = kquant_codes(extra.reshape(-1), KQUANT_TYPES[kind], (5, 768))
    parts.append((extra, 5, KQuantWeight(kind, *(None if a is None else torch.from_numpy(np.ascontiguousarray(a))
                                                    for a in arrays))))
    fused, at = kquant_kernel.empty_buffers(kind, sum(n for _, n, _ in parts), 768), 0
    for blocks, n, _ in parts:
        kquant_kernel.pack_blocks(kind, blocks, n, 768, tuple(b[at : at + n] for b in fused))
        at += n
    joined = KQuantWeight.cat([w for _, _, w in parts])
    assert all(torch.equal(a, b) for a, b in zip(fused, _bufs(joined)))
    with pytest.raises(ValueError, match="blocks"):
        kquant_kernel.pack_blocks(kind, extra[:-1], 5, 768)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", [(37, 256), (40, 768), (9, 2560)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 9])
def test_kernel_matches_float64(kind, n, k, m, loop):
    """K of one super-block (a half-filled step of 16 blocks), 3 and 10; N not a multiple of the decode
    loop's four rows; 1 row of x (the decode tiles) and 2-9 (tiles of 1 row of W x up to 4 of x; 9 rows: the
    prompt GEMM on the VNNI build)."""
    w, ref = _weight(kind, n, k, seed=n + k)
    bufs = _bufs(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = kquant_kernel.matmul(x, kind, *bufs)
    levels = _levels(loop, m)
    assert _rel(y, as_rounded(x, levels) @ ref.double().T) < AS_ROUNDED_TOL
    assert _rel(y, x.double() @ ref.double().T) < (TO_X[loop] if levels == LEVELS[loop] else 2e-2)
    y = kquant_kernel.matmul(x.bfloat16(), kind, *bufs)  # bfloat16 x read as it is
    assert _rel(y, as_rounded(x.bfloat16(), levels) @ ref.double().T) < AS_ROUNDED_TOL
    y = kquant_kernel.matmul(x.bfloat16(), kind, *bufs, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and _rel(y, x.bfloat16().double() @ ref.double().T) < 2e-2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_largest_codes_and_x_do_not_overflow(kind, sign, loop):
    """Every code at its largest (15, 31, 63) against x rounded to +-levels everywhere: the worst case of the
    AVX2 loop's 16-bit pair sums (several words added before widening) and of VNNI's planes."""
    blocks = _random_blocks(kind, 8 * 2560 // 256, seed=21)
    if kind == "q6_k":
        blocks[:, :192] = 0xFF  # ql, qh: codes 63
    else:
        blocks[:, 16:] = 0xFF  # qs (and Q5_K's qh): codes 15 / 31
    w, ref = _weight_from(kind, blocks, 8, 2560)
    assert int(w.codes.min()) == {"q4_k": 15, "q5_k": 31, "q6_k": 63}[kind]
    for m in (1, 3):
        x = torch.full((m, 2560), sign) + 1e-3 * torch.randn(m, 2560)  # every block's largest |x| ~ 1
        y = kquant_kernel.matmul(x, kind, *_bufs(w))
        assert _rel(y, as_rounded(x, LEVELS[loop]) @ ref.double().T) < AS_ROUNDED_TOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 3])
def test_an_activation_outlier_costs_only_its_blocks_precision(kind, m, loop):
    """x is rounded per block of 32 to multiples of max |x| / levels, and the offsets multiply x as rounded,
    so |error| <= sum_c |w_c| step_c / 2 per output (plus float32 rounding): an outlier coarsens its block."""
    w, ref = _weight(kind, 20, 512, seed=9)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(4))
    x[:, 3] = 400.0
    step = x.abs().view(m, -1, 32).amax(-1).double().repeat_interleave(32, -1) / LEVELS[loop]
    want = x.double() @ ref.double().T
    err = (kquant_kernel.matmul(x, kind, *_bufs(w)).double() - want).abs()
    assert (err <= (step / 2) @ ref.double().abs().T * 1.001 + 1e-6 * want.abs()).all()
    assert (err > 0).any()


@pytest.mark.skipif(not q4_kernel.gemm_available(), reason="no prompt GEMM here")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k,m", [(37, 256, 12), (40, 768, 17), (130, 512, 40), (9, 2560, 112)])
def test_prompt_gemm_matches_float64_and_the_row_kernel(kind, n, k, m):
    """The prompt GEMM's K-quant panels (x in bytes) against the float64 product of x as rounded, and against the
    row tiles (15-bit x) within the bytes' rounding: a last panel of 8 blocks (block by block), whole panels (in
    vectors), and at 112 rows K in two chunks of whole panels."""
    w, ref = _weight(kind, n, k, seed=n * k)
    bufs = _bufs(w)
    code = kquant_kernel.KINDS[kind]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    gemm = kquant_kernel._kq_linear(x, code, *bufs, torch.float32, gemm=True)
    assert _rel(gemm, as_rounded(x, 127) @ ref.double().T) < AS_ROUNDED_TOL
    assert _rel(gemm, kquant_kernel._kq_linear(x, code, *bufs, torch.float32, gemm=False)) < 2e-2


@pytest.mark.parametrize("kind", KINDS)
def test_threads_give_identical_results(kind, loop):
    w, _ = _weight(kind, 64, 1024)
    bufs = _bufs(w)
    x = torch.randn(3, 1024)
    saved = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append((kquant_kernel.matmul(x[:1], kind, *bufs), kquant_kernel.matmul(x, kind, *bufs)))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_dispatch_bias_and_tied_embedding(kind, loop):
    """Row tiles, the prompt GEMM (VNNI) and the dense GEMM each where the layer takes them; with AVX2 the row
    tiles take prompts up to AVX2_DENSE_ROWS rows, x in chunks of rows that stay in L2."""
    w, ref = _weight(kind, 24, 512, seed=5)
    bias = torch.randn(24)
    layer = KQuantLinear(w, bias, torch.float32)
    want_rows = {"avx512-vnni": native_max_rows() if q4_kernel.gemm_available() else KQUANT_DENSE_ROWS,
                 "avx2": AVX2_DENSE_ROWS, "avx-vnni": AVX2_DENSE_ROWS}[loop]
    assert layer.native_rows == want_rows
    for rows in (2, q4_kernel.GEMM_MIN_ROWS, layer.native_rows - 2, layer.native_rows):
        x = torch.randn(2, rows // 2, 512)
        y, exact = layer(x), x.double() @ ref.double().T + bias.double()
        if rows >= layer.native_rows:  # the dense GEMM: float32, x as it is
            assert _rel(y, exact) < 1e-6
        elif rows < q4_kernel.GEMM_MIN_ROWS or not q4_kernel.gemm_available():  # row tiles
            want = as_rounded(x.view(-1, 512), LEVELS[loop]).view_as(x) @ ref.double().T + bias.double()
            assert _rel(y, want) < AS_ROUNDED_TOL
        else:  # the prompt GEMM (x in bytes)
            want = as_rounded(x.view(-1, 512), 127).view_as(x) @ ref.double().T + bias.double()
            assert _rel(y, want) < AS_ROUNDED_TOL
    embed = Int8Embedding(layer)
    ids = torch.tensor([[3, 23], [0, 3]])
    assert torch.equal(embed(ids), ref[ids])
    assert "kquant" not in dict(embed.named_modules()) and not list(embed.buffers())  # the head's buffers, once
    with pytest.raises(ValueError, match="K-quant"):
        KQuantLinear(w, None, torch.float32, kernel=False)


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(ValueError, match="256"):
        kquant_kernel.pack("q6_k", torch.zeros(2, 288, dtype=torch.uint8), torch.zeros(2, 18, dtype=torch.int8),
                           torch.ones(2, 1))


def test_the_loop_follows_the_build(monkeypatch):
    """Without AVX-512 VNNI (-DZEN_NO_VNNI) the AVX2 loop; without AVX2 (x86-64) none: available() is False
    (loaders keep Q4_K as int4, Q5_K as 5-bit codes, Q6_K as int8 blocks), zen_kq_linear says so (-2)
    instead of computing anything, and KQuantLinear refuses; the dequantization, plain C, still gives
    gguf-py's values."""
    if not any(f.startswith("-march") for f in native.flags()):
        pytest.skip("not an x86-64 build")
    w, ref = _weight("q5_k", 4, 512, seed=7)
    base = native.flags
    try:
        monkeypatch.setattr(native, "flags", lambda: base() + ["-DZEN_NO_VNNI"])
        q4_kernel.library.cache_clear()
        assert kquant_kernel.loop() in ("avx2", "avx-vnni")  # the latter where this CPU has AVX-512 VNNI + VL
        monkeypatch.setattr(native, "flags", lambda: [f for f in base() if not f.startswith(("-march", "-mno-"))]
                            + ["-march=x86-64"])
        q4_kernel.library.cache_clear()
        assert kquant_kernel.loop() is None and not kquant_kernel.available()
        bufs = _bufs(w)
        assert torch.equal(kquant_kernel.dequantize("q5_k", *bufs, torch.float32), ref)
        assert q4_kernel.library().zen_kq_linear(1, 1, 4, 512, None, 0, None, None, None, None, None, 0, 1) == -2
        with pytest.raises(ValueError, match="K-quant"):
            KQuantLinear(w, None, torch.float32)
    finally:
        monkeypatch.undo()
        q4_kernel.library.cache_clear()


def test_an_avx_vnni_build_takes_vex_vpdpbusd(tmp_path):
    """Built for Intel's AVX-VNNI CPUs (-march=alderlake: AVX2 with VEX-encoded 256-bit vpdpbusd, no AVX-512),
    the library's K-quant loop uses vpdpbusd and no 512-bit register. Compiled and disassembled only: this
    CPU need not run it; its arithmetic is the x86-64-v3+vnni build's in the tests above."""
    import platform
    import shutil
    import subprocess

    from zen_eco import prompt_gemm

    cc, objdump = shutil.which("cc") or shutil.which("gcc"), shutil.which("objdump")
    if cc is None or objdump is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs an x86-64 C compiler and objdump")
    src, obj = tmp_path / "q4_matmul.c", tmp_path / "q4_matmul.o"
    src.write_text(q4_kernel.C_SOURCE + kquant_kernel.C_SOURCE + prompt_gemm.C_SOURCE)  # what library() builds
    flags = [f for f in native.flags() if not f.startswith(("-march", "-mno-", "-shared"))]
    build = subprocess.run([cc, *flags, "-march=alderlake", "-c", str(src), "-o", str(obj)], capture_output=True)
    if build.returncode != 0 and b"alderlake" in build.stderr:
        pytest.skip("this compiler does not know -march=alderlake")
    assert build.returncode == 0, build.stderr.decode()[-2000:]
    code = subprocess.run([objdump, "-d", str(obj)], capture_output=True, text=True, check=True).stdout
    assert "{vex} vpdpbusd" in code and "zmm" not in code


@pytest.mark.parametrize("kind", ["q4_k", "q5_k"])
def test_codes_and_six_bit_values_from_c_equal_numpy(kind, monkeypatch):
    """kquant_codes reads Q4_K / Q5_K codes and their 6-bit sc, m in one C pass; numpy (no compiler) agrees."""
    blocks = _random_blocks(kind, 8, 11).reshape(-1)
    t = KQUANT_TYPES[kind]
    fast = kquant_codes(blocks, t, (2, 1024))
    monkeypatch.setattr(gguf_native, "usable", lambda *a: False)
    slow = kquant_codes(blocks, t, (2, 1024))
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))
