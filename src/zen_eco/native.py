"""Building our small C kernels on first use (`kv_kernel`, `q4_kernel`).

Each kernel is one C source string compiled with the system C compiler (`cc`, override with $CC)
into $ZEN_ECO_CACHE/kernels (default ~/.cache/zen-eco/kernels), named by a hash of the source, the
compiler and its flags, and loaded with ctypes. Without a compiler, or with ZEN_ECO_NATIVE=0, `build`
gives None and the callers use PyTorch ops instead (the same numbers within rounding, slower).

The flags: -O3, OpenMP (the threads follow torch.get_num_threads(); the process shares PyTorch's
libgomp, loaded first under the same soname), and on x86-64 `-march=native` without AMX and
AVX512-FP16 (virtual machines may advertise instructions they fault on). Reassociation lets dot
products vectorize; infinities and NaNs keep their meaning (no -ffinite-math-only).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


def flags() -> list[str]:
    out = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
           "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64"):
        out += ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-mno-avx512fp16"]
    return out


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
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([cc, *opts, str(src), "-o", str(out), "-lm"], check=True, capture_output=True,
                               timeout=120)
                os.replace(out, target)  # atomic: a concurrent build never loads half a file
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
