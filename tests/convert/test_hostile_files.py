"""Hostile checkpoints and file systems: HF-cache snapshots (links), loops, escaping manifests,
duplicate index entries and malformed safetensors headers — one validator for loader and converters."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import pytest
import torch
from convert_helpers import run_inproc

import deepseek_model as dsm
from deepseek_model.checkpoint.reader import CheckpointReader, read_safetensors_header
from deepseek_model.checkpoint.sharded import MANIFEST_FILE
from deepseek_model.convert.shard import merge, shard

INDEX = "model.safetensors.index.json"


def _one_line(proc, *needles):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    for n in needles:
        assert n in line, (n, line)
    return line


def _hf_cache_snapshot(src: str, root) -> str:
    """The layout huggingface_hub writes: blobs/<sha> files and snapshots/<rev>/<name> relative links."""
    blobs, snap = root / "blobs", root / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(src))):
        shutil.copyfile(os.path.join(src, name), blobs / f"{i:040x}")
        os.symlink(os.path.join("..", "..", "blobs", f"{i:040x}"), snap / name)
    return str(snap)


def test_hf_cache_snapshot_loads_and_converts_like_regular_files(tiny_fp8, tmp_path):
    snap = _hf_cache_snapshot(tiny_fp8, tmp_path / "hub")
    assert all(os.path.islink(os.path.join(snap, n)) for n in os.listdir(snap))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        a = dsm.from_pretrained(snap, weights="bf16")(ids)
        b = dsm.from_pretrained(tiny_fp8, weights="bf16")(ids)
    assert torch.equal(a, b)
    proc = run_inproc("fp8-to-bf16", snap, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert not any(os.path.islink(out / n) for n in os.listdir(out))  # contents, never links
    assert (out / "tokenizer.json").read_bytes() == open(os.path.join(tiny_fp8, "tokenizer.json"), "rb").read()


def test_a_linked_directory_loop_is_not_descended(tiny_bf16, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_bf16, src)
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept")
    os.symlink("..", src / "loop")
    os.symlink("..", src / "extra" / "up")
    t0 = time.monotonic()
    proc = run_inproc("bf16-to-fp8", src, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 60
    out = tmp_path / "out"
    assert not (out / "loop").exists() and not (out / "extra" / "up").exists()
    assert (out / "extra" / "notes.txt").read_text() == "kept"


def test_a_manifest_cannot_make_merge_write_outside_dst(tiny_bf16, tmp_path):
    shard(tiny_bf16, tmp_path / "tp2", 2, quiet=True)
    mpath = tmp_path / "tp2" / MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    name = next(iter(manifest["hf_index"]["weight_map"]))
    manifest["hf_index"]["weight_map"][name] = "../escaped.safetensors"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(dsm.CheckpointError, match=r"maps tensor '.*' to '../escaped.safetensors', which is not a "
                                                    r"file name inside the directory"):
        merge(tmp_path / "tp2", tmp_path / "merged", quiet=True)
    assert not (tmp_path / "escaped.safetensors").exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda m: m["ranks"][1].pop("weight_map"), "rank 1 has no 'weight_map' object"),
    (lambda m: next(i for i in m["tensors"].values() if i["split"] == "expert").update(rank=2),
     "outside world size 2"),
    (lambda m: m.pop("tensors"), "no 'tensors' object"),
])
def test_bad_manifests_are_one_line_errors(tiny_bf16, tmp_path, damage, message):
    shard(tiny_bf16, tmp_path / "tp2", 2, quiet=True)
    mpath = tmp_path / "tp2" / MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    damage(manifest)
    mpath.write_text(json.dumps(manifest))
    _one_line(run_inproc("merge", tmp_path / "tp2", tmp_path / "merged"), MANIFEST_FILE, message)


def test_an_index_naming_a_tensor_twice(tiny_bf16, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_bf16, src)
    text = (src / INDEX).read_text()
    first = json.loads(text)["weight_map"]
    name, fname = next(iter(first.items()))
    text = text.replace('"weight_map": {', f'"weight_map": {{"{name}": "{fname}", ', 1)
    (src / INDEX).write_text(text)
    with pytest.raises(dsm.CheckpointError, match=f"names '{name}' twice"):
        dsm.from_pretrained(src)
    _one_line(run_inproc("bf16-to-fp8", src, tmp_path / "out"), INDEX, f"names '{name}' twice")


def _rewrite_header(path: str, edit) -> None:
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _first_span(header):
    """The tensor whose data starts the data section."""
    return next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] == 0)


def _two_same_size(header):
    names = [k for k in header if k != "__metadata__"]
    by_size = {}
    for k in names:
        size = header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
        if size in by_size:
            return by_size[size], k
        by_size[size] = k
    raise AssertionError("no two tensors of equal size")


@pytest.mark.parametrize("damage, message", [
    (lambda h: h[_two_same_size(h)[1]].update(data_offsets=h[_two_same_size(h)[0]]["data_offsets"]), "overlap"),
    (lambda h: h[next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)].update(
        shape=[-h[next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)]["shape"][0],
               -h[next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)]["shape"][1]]),
     "is not a list of non-negative integers"),
    (lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=["0", "8"]),
     "are not two increasing non-negative integers"),
    (lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype="Q4"), "unknown dtype 'Q4'"),
    (lambda h: h.update(__metadata__={"format": 1}), "__metadata__ must map names to strings"),
    (lambda h: h[_first_span(h)].update(shape=[0] + h[_first_span(h)]["shape"][1:], data_offsets=[0, 0]),
     "bytes before tensor"),  # its bytes are no longer indexed: a hole
])
def test_one_header_validator_for_the_loader_and_the_converters(tiny_bf16, tmp_path, damage, message):
    src = tmp_path / "src"
    shutil.copytree(tiny_bf16, src)
    shard_file = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[1]
    _rewrite_header(str(src / shard_file), damage)
    with pytest.raises(dsm.CheckpointError, match=message):
        read_safetensors_header(str(src / shard_file))
    with pytest.raises(dsm.CheckpointError, match=message):
        dsm.from_pretrained(src)
    for cmd in ("bf16-to-fp8", "shard"):
        extra = ["-n", "2"] if cmd == "shard" else []
        _one_line(run_inproc(cmd, src, tmp_path / cmd, *extra), shard_file, message)
        assert not (tmp_path / cmd).exists()
    assert CheckpointReader(tiny_bf16).names()  # the fixture itself was never touched


@pytest.mark.parametrize("change, needles", [  # the first offending tensor in index order is named
    ({"intermediate_size": 512}, ("tensor 'model.layers.0.mlp.down_proj.weight' has shape [256, 384], the config "
                                  "needs [256, 512] (config.json and the tensors disagree)",)),
    ({"n_routed_experts": 8, "n_group": 4}, ("unexpected tensor 'model.layers.1.mlp.experts.1",
                                             "(the config describes no such tensor)")),
    ({"num_hidden_layers": 5}, ("unexpected tensor 'model.layers.3.eh_proj.weight'",)),  # layer 3 is the MTP layer
    ({"num_hidden_layers": 2}, ("unexpected tensor 'model.layers.3.",)),  # past the MTP layer (2)
    ({"hidden_size": [256]}, ("'hidden_size' must be an integer, got [256]",)),
])
def test_converters_check_the_config_against_the_tensors(tiny_bf16, tmp_path, change, needles):
    src = tmp_path / "src"
    shutil.copytree(tiny_bf16, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    (src / "config.json").write_text(json.dumps(cfg))
    for cmd in ("bf16-to-fp8", "shard", "strip-mtp"):
        extra = ["-n", "2"] if cmd == "shard" else []
        _one_line(run_inproc(cmd, src, tmp_path / cmd, *extra), *needles)
        assert not (tmp_path / cmd).exists()


def _replace_tensor(src, name, tensor, tmp_path):
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous()}, str(src / "model-replaced.safetensors"))
    index = json.loads((src / INDEX).read_text())
    index["weight_map"][name] = "model-replaced.safetensors"
    (src / INDEX).write_text(json.dumps(index))


def test_converters_refuse_nan_weights_and_scales_and_integer_tensors(tiny_bf16, tiny_fp8, tmp_path):
    w_name = "model.layers.1.self_attn.o_proj.weight"
    src = tmp_path / "bf16"
    shutil.copytree(tiny_bf16, src)
    w = CheckpointReader(src).get(w_name).clone()
    w[3, 5] = float("nan")
    _replace_tensor(src, w_name, w, tmp_path)
    _one_line(run_inproc("bf16-to-fp8", src, tmp_path / "a", "-q"), f"{w_name}: NaN or infinite values in rows 0..")
    src8 = tmp_path / "fp8"
    shutil.copytree(tiny_fp8, src8)
    s = CheckpointReader(src8).get(w_name + "_scale_inv").clone()
    s[0, 0] = -1.0
    _replace_tensor(src8, w_name + "_scale_inv", s, tmp_path)
    _one_line(run_inproc("fp8-to-bf16", src8, tmp_path / "b", "-q"), f"{w_name}_scale_inv: NaN, infinite or negative")
    src_int = tmp_path / "int"
    shutil.copytree(tiny_bf16, src_int)
    _replace_tensor(src_int, "model.norm.weight", torch.ones(256, dtype=torch.int32), tmp_path)
    for cmd in ("bf16-to-fp8", "shard"):
        extra = ["-n", "2"] if cmd == "shard" else []
        _one_line(run_inproc(cmd, src_int, tmp_path / f"c-{cmd}", *extra),
                  "tensor 'model.norm.weight' is int32; weights must be floating point")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c-bf16-to-fp8", "c-shard"))


def test_bytes_after_the_last_tensor_are_refused_as_the_loader_does(tiny_bf16, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_bf16, src)
    shard_file = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
    with open(src / shard_file, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(dsm.CheckpointError, match="8 bytes after the last tensor's data"):
        dsm.from_pretrained(src)
    _one_line(run_inproc("strip-mtp", src, tmp_path / "out"), shard_file, "8 bytes after the last tensor's data")
    assert not (tmp_path / "out").exists()
