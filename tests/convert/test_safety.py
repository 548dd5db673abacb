"""Safety: atomic output, SIGKILL mid-run, read-only SRC, refused paths, one-line errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from convert_helpers import read_json, run_cli, run_inproc, tree_checksums

from deepseek_model.config import ModelConfig
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.convert.io import ConvertError, check_paths
from deepseek_model.checkpoint.writer import write_checkpoint
from deepseek_model.testing import make_tiny_tensors

KILL_POLL_S = 0.02


def _siblings(dst) -> list[str]:
    parent, base = os.path.split(str(dst))
    return [e for e in os.listdir(parent) if e.startswith(f".{base}.")]


# The converter CLI with every shard write slowed down (patched here, in the test's child process),
# so that a kill lands mid-run on a checkpoint that would otherwise convert in milliseconds.
SLOW_CONVERT = """
import sys, time
from deepseek_model.checkpoint.stream import ShardWriter
for method in ("write_rows", "copy_from"):
    def slow(*args, _fast=getattr(ShardWriter, method), **kwargs):
        time.sleep(0.05)
        return _fast(*args, **kwargs)
    setattr(ShardWriter, method, slow)
from deepseek_model.convert import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_sigkill_mid_run_leaves_no_dst_and_rerun_is_clean(tiny_fp8, tmp_path):
    dst = tmp_path / "out"
    before = tree_checksums(tiny_fp8)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "fp8-to-bf16", tiny_fp8, str(dst), "-q"],
                            stderr=subprocess.PIPE)
    tmp_dir = tmp_path / f".out.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (tmp_dir.is_dir() and any(f.suffix == ".safetensors" for f in tmp_dir.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "converter ended before it could be killed"
        time.sleep(KILL_POLL_S)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    assert tree_checksums(tiny_fp8) == before
    assert _siblings(dst) == [tmp_dir.name]  # the killed run's partial output, never DST itself
    rerun = run_cli("fp8-to-bf16", tiny_fp8, dst, "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert _siblings(dst) == []  # stale temp dir cleaned up
    assert CheckpointReader(dst).names()
    assert tree_checksums(tiny_fp8) == before


def test_dst_equal_to_inside_or_containing_src_refused(tiny_fp8, tmp_path):
    _assert_one_line_error(run_inproc("fp8-to-bf16", tiny_fp8, tiny_fp8), "source directory")
    _assert_one_line_error(run_inproc("fp8-to-bf16", tiny_fp8, os.path.join(tiny_fp8, "sub")), "inside the source")
    assert not os.path.exists(os.path.join(tiny_fp8, "sub"))
    with pytest.raises(ConvertError, match="contains the source"):
        check_paths(tiny_fp8, os.path.dirname(tiny_fp8), overwrite=True)


def _hub_snapshot(src: str, root) -> tuple[str, str]:
    """A HuggingFace-cache layout of SRC: models--org--tiny/snapshots/abc/* link into ../../blobs."""
    repo = root / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    for i, name in enumerate(sorted(os.listdir(src))):
        shutil.copyfile(os.path.join(src, name), blobs / f"blob{i}")
        os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / name)
    return str(snap), str(blobs)


@pytest.mark.parametrize("command", ["strip-mtp", "fp8-to-bf16"])
def test_overwrite_never_replaces_the_directory_a_linked_source_lives_in(tiny_fp8, tmp_path, command):
    """A cache snapshot's files are links into blobs/: --overwrite of blobs/ (or of a directory
    above it) would delete the source's data. Refused before anything is written."""
    snap, blobs = _hub_snapshot(tiny_fp8, tmp_path)
    store = tmp_path / "store"  # a directory holding the blobs but not the snapshot's links
    store.mkdir()
    os.rename(blobs, store / "blobs")
    for name in os.listdir(snap):
        target = os.readlink(os.path.join(snap, name))
        os.remove(os.path.join(snap, name))
        os.symlink(str(store / "blobs" / os.path.basename(target)), os.path.join(snap, name))
    before = tree_checksums(store)
    for dst in (store / "blobs", store):
        _assert_one_line_error(run_inproc(command, snap, dst, "--overwrite", "-q"), "destination holds the data of source file")
    assert tree_checksums(store) == before and _siblings(store / "blobs") == [] and _siblings(store) == []
    assert run_inproc(command, snap, tmp_path / "out", "-q").returncode == 0  # the snapshot itself converts


def test_existing_dst_needs_overwrite(tiny_fp8, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    _assert_one_line_error(run_inproc("fp8-to-bf16", tiny_fp8, dst), "--overwrite")
    assert (dst / "keep.txt").read_text() == "old"
    proc = run_inproc("fp8-to-bf16", tiny_fp8, dst, "--overwrite", "-q")
    assert proc.returncode == 0, proc.stderr
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert _siblings(dst) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_inproc("fp8-to-bf16", tiny_fp8, empty, "-q").returncode == 0


def _copy(src: str, tmp_path) -> str:
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    return str(bad)


def _edit_index(path: str, edit) -> None:
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = read_json(index_path)
    edit(index["weight_map"])
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f)


def _first_shard(path: str) -> str:
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]


def test_missing_index(tiny_fp8, tmp_path):
    bad = _copy(tiny_fp8, tmp_path)
    os.remove(os.path.join(bad, "model.safetensors.index.json"))
    _assert_one_line_error(run_cli("fp8-to-bf16", bad, tmp_path / "out"), "model.safetensors.index.json", "missing")
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


def test_index_naming_file_outside_src(tiny_fp8, tmp_path):
    bad = _copy(tiny_fp8, tmp_path)
    _edit_index(bad, lambda wm: wm.update({"lm_head.weight": "../" + _first_shard(bad)}))
    shutil.copy(os.path.join(bad, _first_shard(bad)), tmp_path)
    _assert_one_line_error(run_inproc("fp8-to-bf16", bad, tmp_path / "out"), "lm_head.weight", "outside")
    assert not (tmp_path / "out").exists()


def test_truncated_shard(tiny_fp8, tmp_path):
    bad = _copy(tiny_fp8, tmp_path)
    shard = os.path.join(bad, _first_shard(bad))
    os.truncate(shard, os.path.getsize(shard) - 1000)
    _assert_one_line_error(run_cli("fp8-to-bf16", bad, tmp_path / "out"), _first_shard(bad), "truncated")
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_header(tiny_fp8, tmp_path):
    bad = _copy(tiny_fp8, tmp_path)
    shard = os.path.join(bad, _first_shard(bad))
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    _assert_one_line_error(run_inproc("bf16-to-fp8", bad, tmp_path / "out"), _first_shard(bad), "corrupt")


def test_weight_without_scale(tiny_fp8, tmp_path):
    bad = _copy(tiny_fp8, tmp_path)
    weight = "model.layers.1.self_attn.o_proj.weight"
    _edit_index(bad, lambda wm: wm.pop(weight + "_scale_inv"))
    _assert_one_line_error(run_inproc("fp8-to-bf16", bad, tmp_path / "out"), weight, "without its scale")
    _assert_one_line_error(run_inproc("strip-mtp", bad, tmp_path / "out"), weight, "without its scale")  # copies check too
    assert not os.path.exists(tmp_path / "out")


def test_scale_with_wrong_grid(tmp_path):
    cfg = ModelConfig.builtin("tiny")
    tensors = make_tiny_tensors(cfg, fp8=True)
    scale = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    tensors[scale] = tensors[scale][:1]  # 160 rows need 2 scale rows; give 1 (transformers' ragged-block error)
    bad = write_checkpoint(tmp_path / "bad", tensors, cfg.to_dict())
    _assert_one_line_error(run_inproc("fp8-to-bf16", bad, tmp_path / "out"), scale, "grid")
    _assert_one_line_error(run_inproc("shard", bad, tmp_path / "out", "-n", "1"), scale, "grid")
    _assert_one_line_error(run_inproc("strip-mtp", bad, tmp_path / "out"), scale, "grid")
    _assert_one_line_error(run_inproc("verify", bad, bad), scale, "grid")


def test_wrong_direction_refused(tiny_fp8, tiny_bf16, tmp_path):
    _assert_one_line_error(run_inproc("bf16-to-fp8", tiny_fp8, tmp_path / "a"), "already FP8")
    _assert_one_line_error(run_inproc("fp8-to-bf16", tiny_bf16, tmp_path / "b"), "no float8 weights")
    _assert_one_line_error(run_inproc("fp8-to-bf16", tmp_path / "nowhere", tmp_path / "c"), "not a directory")


def test_source_never_opened_for_writing(tiny_fp8, tmp_path):
    bad = _copy(tiny_fp8, tmp_path)
    for root, dirs, files in os.walk(bad):
        for f in files:
            os.chmod(os.path.join(root, f), 0o444)
    os.chmod(bad, 0o555)
    try:
        proc = run_inproc("fp8-to-bf16", bad, tmp_path / "out", "-q")
        assert proc.returncode == 0, proc.stderr
    finally:
        os.chmod(bad, 0o755)
    assert torch.equal(CheckpointReader(tmp_path / "out").get("model.norm.weight"),
                       CheckpointReader(bad).get("model.norm.weight"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_overwrite_swaps_atomically_and_an_orphaned_old_copy_is_restored(tiny_fp8, tmp_path):
    dst = tmp_path / "out"
    assert run_inproc("fp8-to-bf16", tiny_fp8, dst, "-q").returncode == 0
    (dst / "marker.txt").write_text("first run")
    proc = run_inproc("fp8-to-bf16", tiny_fp8, dst, "-q", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not (dst / "marker.txt").exists() and _siblings(dst) == []  # replaced in one step, nothing left over
    # A run killed between moving the old DST aside and renaming the new one in (where the exchange
    # is unsupported) leaves only the old copy: the next run restores it, and never deletes it.
    old = tmp_path / f".out.old-{_dead_pid()}"
    os.rename(dst, old)
    (old / "marker.txt").write_text("the only copy")
    bad = _copy(tiny_fp8, tmp_path)
    os.remove(os.path.join(bad, _first_shard(bad)))  # this run fails, after restoring
    proc = run_inproc("fp8-to-bf16", bad, dst, "-q", "--overwrite")
    assert proc.returncode == 2
    assert (dst / "marker.txt").read_text() == "the only copy" and _siblings(dst) == []
    proc = run_inproc("fp8-to-bf16", tiny_fp8, dst, "-q")  # restored: DST exists again, so it needs --overwrite
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    assert (dst / "marker.txt").read_text() == "the only copy"


def test_disk_full_names_the_file_and_leaves_nothing(tiny_fp8, tmp_path, monkeypatch):
    """ENOSPC in the middle of a conversion: one line naming the shard, no DST, no temporary left."""
    import errno

    real_pwrite, calls = os.pwrite, [0]

    def full_disk(fd, data, pos):
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", full_disk)
    monkeypatch.setattr(os, "copy_file_range", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross")),
                        raising=False)
    proc = run_inproc("fp8-to-bf16", tiny_fp8, tmp_path / "out", "-q")
    monkeypatch.undo()
    line = _assert_one_line_error(proc, "No space left on device", str(tmp_path / ".out.tmp-"))
    assert ".safetensors" in line
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


def test_make_tiny_disk_full_leaves_no_output(tmp_path, monkeypatch, capsys):
    import errno

    from deepseek_model import cli
    from deepseek_model.checkpoint import writer

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", full_disk)
    assert cli.main(["make-tiny", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "model-00001-of-000004.safetensors" in err[0]
    assert os.listdir(tmp_path) == []


def test_verify_checks_its_json_path_before_comparing(tiny_fp8, tmp_path):
    _assert_one_line_error(run_inproc("verify", tiny_fp8, tiny_fp8, "--json", tmp_path / "no" / "r.json"),
                           "--json", "its directory")
    _assert_one_line_error(run_inproc("verify", tiny_fp8, tiny_fp8, "--json", tmp_path), "--json", "is a directory")
