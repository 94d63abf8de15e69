"""Building the C kernels (zen_eco.native): a first use compiles (and says so), later ones load the cache."""

from __future__ import annotations

import shutil

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
def test_load_builds_the_decode_step_before_the_first_token(smollm2_gguf_path):
    import zen_eco

    decode_kernel.library.cache_clear()
    zen_eco.load(smollm2_gguf_path, threads=1)
    assert decode_kernel.library.cache_info().currsize == 1
