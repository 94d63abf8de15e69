"""Building the C kernels (zen_eco.native): a first use compiles (and says so), later ones load the cache."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

from zen_eco import decode_kernel, native

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@needs_cc
def test_a_compile_is_announced_once_and_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEN_ECO_CACHE", str(tmp_path))
    told = []
    notice = told.append
    native.on_build(notice)
    native.on_build(notice)  # registered once
    try:
        lib = native.build("tiny_probe", "int zen_tiny(int x) { return 3 * x; }\n")
        assert lib is not None and lib.zen_tiny(7) == 21
        assert told == ["tiny_probe"]
        assert len(list((tmp_path / "kernels").glob("tiny_probe-*.so"))) == 1
        assert native.build("tiny_probe", "int zen_tiny(int x) { return 3 * x; }\n").zen_tiny(2) == 6
        assert told == ["tiny_probe"]  # the cached library: nothing compiled, nothing said
        assert native.build("tiny_probe", "int zen_tiny(int x) { return 5 * x; }\n").zen_tiny(2) == 10
        assert told == ["tiny_probe", "tiny_probe"]  # a new source: a new library
    finally:
        native._build_notices.remove(notice)


@needs_cc
def test_a_failed_compile_warns_with_the_compilers_words(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEN_ECO_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match=r"(?s)broken_probe kernel did not compile.*zen_broken"):
        assert native.build("broken_probe", "int zen_broken(int x) { return x + ; }\n") is None
    assert not list((tmp_path / "kernels").glob("broken_probe-*.so"))


@needs_cc
@pytest.mark.skipif(os.environ.get("ZEN_ECO_NATIVE", "1") == "0", reason="ZEN_ECO_NATIVE=0 turns the kernels off")
def test_every_kernel_compiles_where_there_is_a_compiler():
    """The kernels' tests skip where a library is None; with a compiler here, None means our C failed to
    compile (a flag, an intrinsic, a typo) and those skips would hide it. This test does not skip then."""
    from zen_eco import kv_kernel, q4_kernel

    for kernel in (q4_kernel, decode_kernel, kv_kernel):
        kernel.library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the compiler's words as the failure's message
            assert kernel.library() is not None, kernel.__name__

@needs_cc
def test_load_builds_the_decode_step_before_the_first_token(smollm2_gguf_path):
    import zen_eco

    decode_kernel.library.cache_clear()
    zen_eco.load(smollm2_gguf_path, threads=1)
    assert decode_kernel.library.cache_info().currsize == 1


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    flags, inside = None, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(p, 16) for p in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            flags = line.split()[1:]
    assert flags is not None
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_packed_weights_ask_for_huge_pages_unless_turned_off(monkeypatch):
    """The loaders' large weight buffers (q4_kernel.empty_packed, pack, pack_int8, kquant_kernel.empty_buffers) go
    through native.huge_pages: their memory is madvised MADV_HUGEPAGE (VmFlags "hg"), so that Linux backs it with
    2 MB pages where THP is "madvise"; ZEN_ECO_HUGE_PAGES=0 leaves it alone. The "left alone" half advises a fresh
    anonymous mapping of its own: memory from malloc may be a reused heap chunk that an earlier buffer of this
    process had advised already (that made this test flaky)."""
    import mmap

    import torch

    from zen_eco import q4_kernel

    monkeypatch.delenv("ZEN_ECO_HUGE_PAGES", raising=False)  # the default
    packed = q4_kernel.empty_packed(2, 16384, 1024)[0]  # 8 MB
    assert "hg" in _vm_flags(packed.data_ptr() + packed.numel() // 2)
    codes = q4_kernel.empty_packed(8, 65536, 1024)[0]  # int8: 64 MB
    assert "hg" in _vm_flags(codes.data_ptr() + codes.numel() // 2)

    def fresh_mapping(size=16 * native.HUGE_PAGE):
        region = mmap.mmap(-1, size)
        return region, torch.frombuffer(region, dtype=torch.uint8)

    region, advised = fresh_mapping()
    assert "hg" not in _vm_flags(advised.data_ptr() + advised.numel() // 2)  # fresh: no advice yet
    native.huge_pages(advised)
    assert "hg" in _vm_flags(advised.data_ptr() + advised.numel() // 2)
    monkeypatch.setenv("ZEN_ECO_HUGE_PAGES", "0")
    other_region, plain = fresh_mapping()
    native.huge_pages(plain)
    assert "hg" not in _vm_flags(plain.data_ptr() + plain.numel() // 2)
    del advised, plain
    region.close(), other_region.close()
