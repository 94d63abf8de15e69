"""The `zen-eco` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from zen_eco.init import init_checkpoint

TIMEOUT = 180


def zen(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "zen_eco.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=cwd, input=stdin)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len(err.splitlines()) == 1, proc.stderr
    assert err.startswith("error:"), err
    for needle in needles:
        assert needle.lower() in err.lower(), err
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return init_checkpoint("llama-tiny", tmp_path_factory.mktemp("cli") / "tiny", dtype="float32")


# --------------------------------------------------------------------------- the good paths


def test_help():
    proc = zen("--help")
    assert proc.returncode == 0
    for command in ("run", "chat", "info", "init", "bench"):
        assert command in proc.stdout


# "auto" is what users get (packed 4-bit layers, bf16 matmuls, fp32 residual); the first token of
# this answer is a near-tie ('The' 25.33 vs 'L' 25.24 in exact fp32), so this also guards precision.
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_run_answers_through_the_chat_template_and_stops_at_end_of_turn(dtype):
    # Not "What is the capital of France?": there the dense model's first token is a near tie ("The" 0.08 ahead
    # of "L"), which llama.cpp and our prompt GEMM (x in bytes, as llama.cpp rounds it) both take as
    # "L'Étoile, ...". Here every path answers Paris.
    proc = zen("run", "Name the capital city of France.", "--temp", "0", "-n", "40", "-v", "--dtype", dtype)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "<|im_end|>" not in proc.stdout and "<|im_start|>" not in proc.stdout
    assert "user" not in proc.stdout.lower()  # the template's role headers are not echoed
    # -v reports the counts: the chat-rendered prompt is long, and the answer ended before 40 tokens (EOS)
    m = re.search(r"prompt (\d+) tok .* generated (\d+) tok", proc.stderr)
    assert m, proc.stderr
    assert int(m.group(1)) > 20  # the bare question is 8 tokens; the template adds the system turn
    assert int(m.group(2)) < 40


def test_chat_keeps_history_and_reuses_its_cache():
    """Two turns on stdin: the second prompt holds the first turn (history: it is longer by at least
    the first answer), only its new tokens are computed (the stats line reports the reused ones),
    and /exit ends the session cleanly."""
    proc = zen("chat", "--temp", "0", "-n", "24", "--dtype", "float32",
               stdin="My name is Ada. Say hello to me.\nWhat is my name?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>>") == 3 and "Traceback" not in proc.stderr
    stats = re.findall(r"prompt (\d+) tok .*?generated (\d+) tok .*?(\d+) prompt tokens reused", proc.stderr)
    assert len(stats) == 2, proc.stderr
    (p1, g1, r1), (p2, _, r2) = [tuple(map(int, row)) for row in stats]
    assert r1 == 0
    assert p2 >= p1 + g1  # turn 1's question and answer are in turn 2's prompt
    assert r2 >= p1  # ...and were not computed again


def test_info_default_model():
    proc = zen("info")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^architecture\s+llama$", proc.stdout, re.M)
    assert re.search(r"^parameters\s+134,515,008 \(0\.13B\)$", proc.stdout, re.M)  # SmolLM2-135M
    assert re.search(r"^format\s+gguf$", proc.stdout, re.M)
    assert "chat template: yes" in proc.stdout


def test_info_preset_4b():
    proc = zen("info", "zen-eco-4b")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^architecture\s+qwen3$", proc.stdout, re.M)
    assert "4,022,468,096 (4.02B)" in proc.stdout  # Qwen3-4B's count


def test_init_then_bench_json(tmp_path):
    out = tmp_path / "ckpt"
    proc = zen("init", "llama-tiny", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"

    proc = zen("bench", str(out), "-p", "16", "-n", "4", "-r", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "load_s", "decode_bytes_per_token"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["prompt_tokens"] == 16 and result["gen_tokens"] == 4
    # llama-tiny (untied): every weight but the embedding table, in the run's dtype, plus K/V at the mean
    # context of the timed tokens, 16 + 4 / 2 positions (2 layers x 2 KV heads x 16 dims x K and V), in the
    # cache's: bf16 under dtype "auto" on the CPU, also where it picks float32 (a CPU without native bf16)
    size = {"float32": 4, "bfloat16": 2}
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    weights = sum(t.numel() * size[result["dtype"]] for name, t in tensors.items() if "embed_tokens" not in name)
    assert result["kv_dtype"] == "bfloat16"
    assert result["decode_bytes_per_token"] == weights + 18 * 2 * 2 * 16 * 2 * size[result["kv_dtype"]]
    assert result["cuda_graphs"] is False and result["compiled"] is False  # graphs are CUDA-only
    # --compile works on the CPU too (the static step through torch.compile; ~15 s for this model)
    proc = zen("bench", str(out), "-p", "16", "-n", "4", "-r", "1", "--json", "--compile", "--no-cuda-graphs")
    assert proc.returncode == 0, proc.stderr
    compiled = json.loads(proc.stdout)
    assert compiled["compiled"] is True and compiled["decode_tok_s"] > 0
    assert compiled["warmup_s"] > result["warmup_s"]  # the compile happens in the warm-up run
    # a quantized KV cache decodes the ordinary way: reported as not compiled
    proc = zen("bench", str(out), "-p", "16", "-n", "4", "-r", "1", "--json", "--compile", "--kv-cache", "int8")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compiled"] is False and "static_step" not in json.loads(proc.stdout)

    proc = zen("init", "llama-tiny", "-o", str(out))  # now not empty
    assert_one_line_error(proc, "not empty")


def test_read_bandwidth_probe_reads_every_byte():
    # The roofline figures divide by this probe: its C loop must really load the whole buffer (a loop
    # that skipped lines would read "faster"). Its xor of all words equals numpy's, at 1 and 2 threads.
    import numpy as np
    import torch

    from zen_eco import bench

    lib = bench.read_probe()
    if lib is None:
        pytest.skip("no C compiler")
    words = np.random.default_rng(0).integers(0, 2**63, size=37 * 512, dtype=np.uint64)  # 37 chunks of 4 KB
    buf = torch.from_numpy(words)
    want = int(np.bitwise_xor.reduce(words))
    for threads in (1, 2):
        assert lib.zen_read(buf.data_ptr(), 37, threads) == want
    wall, cpu = bench.read_bandwidth(1, gib=0.0625, repeats=1)
    assert wall > 1e8 and cpu > 1e8  # bytes per second: a real figure, not a unit slip


def test_bench_default_model_reports_packed_weights(monkeypatch):
    """The default GGUF under --quant auto runs its 4-bit layers packed (210 Q4_1 tensors fuse into 120
    layers) and its tied Q8_0 table as int8 blocks (the head, counted once); it names the CPU loops that
    ran (this build's; PyTorch's where ours are turned off)."""
    from zen_eco import bench

    proc = zen("bench", "-p", "8", "-n", "2", "-r", "1", "--json", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["weights"] == "int4 x120 + int8 x1 + bfloat16"
    assert result["cpu_kernels"] == bench.cpu_kernels()
    assert result["cpu_kernels"] in ("avx512-vnni", "avx-vnni", "avx2", "plain C", "pytorch")
    monkeypatch.setenv("ZEN_ECO_NATIVE", "0")
    proc = zen("bench", "-p", "8", "-n", "2", "-r", "1", "--json", "--dtype", "bfloat16", "--quant", "none")
    monkeypatch.delenv("ZEN_ECO_NATIVE")
    assert json.loads(proc.stdout)["weights"] == "bfloat16"
    assert json.loads(proc.stdout)["cpu_kernels"] == "pytorch"
    proc = zen("bench", "-p", "8", "-n", "2", "-r", "1", "--json", "--dtype", "bfloat16", "--quant", "int8")
    assert json.loads(proc.stdout)["weights"] == "int8 x121 + bfloat16"  # 120 layers + the tied table, once


# --------------------------------------------------------------------------- bad input: one line, no traceback


def test_unknown_quant_mode():
    assert_one_line_error(zen("run", "hi", "--quant", "int3"), "int3", "auto, none")


def test_truncated_gguf(smollm2_gguf_path, tmp_path):
    data = smollm2_gguf_path.read_bytes()
    bad = tmp_path / "half.gguf"
    bad.write_bytes(data[: len(data) // 2])
    assert_one_line_error(zen("run", "hi", "-m", str(bad)), "half.gguf", "end of the file")


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.bin"
    bad.write_bytes(os.urandom(2048))
    assert_one_line_error(zen("run", "hi", "-m", str(bad)), "noise.bin", "not a GGUF")


def test_lying_safetensors_header(tiny, tmp_path):
    d = tmp_path / "lie"
    shutil.copytree(tiny, d)
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [512, 64], "data_offsets": [0, 131072]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    assert_one_line_error(zen("run", "hi", "-m", str(d)), "model.safetensors")


def test_unknown_architecture(tiny, tmp_path):
    d = tmp_path / "mamba"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"model_type": "mamba"}))
    assert_one_line_error(zen("info", str(d)), "mamba", "llama", "qwen2", "qwen3")


def test_missing_model_path(tmp_path):
    assert_one_line_error(zen("run", "hi", "-m", str(tmp_path / "nope.gguf")), "nope.gguf", "no model")


def test_prompt_longer_than_context():
    err = assert_one_line_error(zen("run", "word " * 60, "-c", "32", "-n", "8"), "context")
    assert "32" in err


def test_pickle_only_directory_is_refused_and_never_unpickled(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    marker = tmp_path / "UNPICKLED"

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Bomb()}))
    assert_one_line_error(zen("run", "hi", "-m", str(d)), "pytorch_model.bin", "safetensors")
    assert not marker.exists()
