"""Building our small C kernels on first use (`kv_kernel`, `q4_kernel`, `decode_kernel`) and C they share
(TRANSPOSE_SUM16, VEC16).

Each kernel is one C source string compiled with the system C compiler (`cc`, override with $CC)
into $ZEN_ECO_CACHE/kernels (default ~/.cache/zen-eco/kernels), named by a hash of the source, the
compiler and its flags, and loaded with ctypes. Without a compiler, or with ZEN_ECO_NATIVE=0, `build`
gives None and the callers use PyTorch ops instead (the same numbers within rounding, slower); a compiler
that is there but fails says so in a warning (with its last words), since the fallback is many times slower.

The flags: -O3, OpenMP (the threads follow torch.get_num_threads(); the process shares PyTorch's
libgomp, loaded first under the same soname), and on x86-64 `-march=native` without AMX and
AVX512-FP16 (virtual machines may advertise instructions they fault on), or `-march=$ZEN_ECO_MARCH`
where that is set (e.g. `x86-64-v3` for an AVX2 build: kernels for another machine, or this machine's
speed without AVX-512), then the words of $ZEN_ECO_CFLAGS (e.g. `-mavx512vnni -mavx512vl` on top of
x86-64-v3: the AVX2 loops with 256-bit vpdpbusd, as Intel's AVX-VNNI CPUs run them). Reassociation lets
dot products vectorize; infinities and NaNs keep their meaning (no -ffinite-math-only).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path


# C shared by the kernels' sources (each pastes it after defining INLINE and including immintrin.h).
TRANSPOSE_SUM16 = r"""
#ifdef __AVX512F__
/* Lane i of the result: the sum of the 16 lanes of v[i] (pairs, then quads, then 128-bit lanes added):
   16 dot products' partial sums reduced together instead of one horizontal sum each. */
INLINE __m512 transpose_sum16(const __m512 *v) {
    __m512 w[8], y[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [v2i, v2i+1, v2i, v2i+1] partial sums */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: [v4i .. v4i+3] partial sums */
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}
#endif
"""


# GCC vectors of 16 floats (one AVX-512 register, two AVX2 ones) and their exponential, shared by kv_kernel
# and decode_kernel (each pastes it after defining INLINE).
VEC16 = r"""
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

INLINE v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* exp(x) of 16 scores minus their max (x <= 0), and 0 below -87: 2^n * p(r), r = x - n ln 2 in
   [-ln2/2, ln2/2], p a degree-6 Taylor polynomial; relative error < 2e-7. */
INLINE v16 exp16(v16 x) {
    const i32x16 keep = x >= splat(-87.0f);
    x = (v16)(((i32x16)x & keep) | ((i32x16)splat(-87.0f) & ~keep));
    const i32x16 ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x16);  /* round(): x <= 0 */
    const v16 n = __builtin_convertvector(ni, v16);
    const v16 r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    v16 p = splat(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return (v16)((i32x16)(p * (v16)((ni + 127) << 23)) & keep);
}
"""


def flags() -> list[str]:
    out = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
           "-fno-trapping-math"]
    march = os.environ.get("ZEN_ECO_MARCH")
    if march:
        out.append(f"-march={march}")
    elif platform.machine() in ("x86_64", "AMD64"):
        out += ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-mno-avx512fp16"]
    return out + os.environ.get("ZEN_ECO_CFLAGS", "").split()


_build_notices: list = []  # callables told each kernel's name before it compiles (on_build)


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def huge_pages(t):
    """Ask Linux to back the whole 2 MB pages inside `t`'s memory with transparent huge pages (madvise), before
    anything touches it; `t` back. Decode streams every weight once a token, and with 4 KB pages a 168 MB matrix
    is 43,000 TLB entries: with huge pages one-thread decode ran 10-20% faster (Gemma-3, zen-eco-4b Q4_0), at the
    cost of slower loading (the kernel compacts memory to find the pages: +1-3.5 s for a 4B model;
    docs/benchmarks.md). Where THP is "madvise" (a common default) nothing else asks. ZEN_ECO_HUGE_PAGES=0
    turns it off; elsewhere than Linux a no-op."""
    if (platform.system() != "Linux" or os.environ.get("ZEN_ECO_HUGE_PAGES", "1") == "0"
            or t.numel() * t.element_size() < 2 * HUGE_PAGE):
        return t
    start = t.data_ptr()
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    madvise = _libc_madvise()
    if madvise is not None:  # advice only: its result does not matter
        madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_HUGEPAGE)
    return t


@functools.lru_cache(maxsize=None)
def _libc_madvise():
    """libc's madvise, looked up once (None where it cannot be)."""
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


def on_build(notice) -> None:
    """Call `notice(name)` before a kernel compiles (a cache miss: the first use on this CPU and version, some
    seconds); the CLI prints a line, so that a first run does not look stalled."""
    if notice not in _build_notices:
        _build_notices.append(notice)


def build_dir() -> Path:
    base = os.environ.get("ZEN_ECO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "zen-eco")
    return Path(base) / "kernels"


def build(name: str, source: str) -> ctypes.CDLL | None:
    """The compiled `source` as a loaded library, or None where it cannot be built here."""
    if os.environ.get("ZEN_ECO_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    opts = flags()
    key = hashlib.sha256("\0".join([source, cc, *opts, platform.machine()]).encode()).hexdigest()[:16]
    target = build_dir() / f"{name}-{key}.so"
    try:
        if not target.is_file():
            for notice in _build_notices:
                notice(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([cc, *opts, str(src), "-o", str(out), "-lm"], check=True, capture_output=True,
                               timeout=120)
                os.replace(out, target)  # atomic: a concurrent build never loads half a file
        return ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as failed:
        said = failed.stderr.decode(errors="replace").strip().splitlines()[-6:]
        warnings.warn(f"zen-eco: the {name} kernel did not compile ({cc} {' '.join(opts)}); falling back to "
                      f"PyTorch's slower ops. The compiler said:\n" + "\n".join(said), RuntimeWarning, stacklevel=2)
        return None
    except (OSError, subprocess.SubprocessError):
        return None
