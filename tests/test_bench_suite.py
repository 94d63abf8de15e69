"""benchmarks/suite.py: issue 3's comparison in one command, run for real on the default model (tiny sizes)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"


def _suite_module():
    spec = importlib.util.spec_from_file_location("bench_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_runs_the_default_model_and_prints_its_row(smollm2_gguf_path, tmp_path):
    done = subprocess.run([sys.executable, str(SUITE), "--cases", "smollm2", "--threads", "1", "-p", "8", "-n", "2",
                           "--no-transformers", "--work", str(tmp_path), "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| smollm2 | 1 |")]
    assert len(rows) == 1
    import json

    saved = json.loads((tmp_path / "out.json").read_text())
    assert [r["case"] for r in saved] == ["smollm2"]
    ours = saved[0]["results"][0]
    assert ours["engine"] == "zen-eco" and ours["prompt_tokens"] == 8 and ours["decode_tok_s"] > 0
    assert saved[0]["bandwidth"] > 1e8  # bytes/s from the probe's own process
    if importlib.util.find_spec("llama_cpp") is not None:
        assert saved[0]["results"][1]["engine"].startswith("llama.cpp")
        assert "decode vs llama.cpp" in done.stdout and "x" in rows[0].split("|")[6]
    assert "targets missed:" in done.stdout


def test_verdicts_compare_each_ratio_with_the_issue_target():
    suite = _suite_module()

    def row(case, ours_decode, llama_decode, ours_prefill=100.0, llama_prefill=100.0, hf_decode=None):
        results = [{"engine": "zen-eco", "decode_tok_s": ours_decode, "prefill_tok_s": ours_prefill,
                    "decode_bytes_per_token": 1e9},
                   {"engine": "llama.cpp (x)", "decode_tok_s": llama_decode, "prefill_tok_s": llama_prefill}]
        if hf_decode:
            results.append({"engine": "transformers 5", "decode_tok_s": hf_decode, "prefill_tok_s": 1.0})
        return {"case": case, "threads": 1, "bandwidth": 20e9, "results": results}

    v = suite.verdicts(row("smollm2", 90.0, 100.0, 70.0, 100.0, hf_decode=10.0))
    assert v == pytest.approx({"decode_vs_llama": 0.9, "prefill_vs_llama": 0.7, "decode_vs_transformers": 9.0})
    missed = [name for name, x in v.items() if x < suite.TARGETS[name]]
    assert missed == ["decode_vs_llama", "prefill_vs_llama"]
    # our INT4 checkpoint has no same-file peer: only its roofline share counts (1 GB x 15 tok/s of 20 GB/s)
    assert suite.verdicts(row("4b-int4", 15.0, 10.0)) == pytest.approx({"roofline": 0.75})
