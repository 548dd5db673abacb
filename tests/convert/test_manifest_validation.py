"""A damaged tp_manifest.json is refused up front with one line naming the manifest and the field or tensor.

merge, verify and from_pretrained read the manifest of a `convert shard -n 2` output; each damage must
give a one-line ValueError (no traceback, exit 2 from the CLI), leave no output directory or temporary
sibling, and leave the sharded source byte-identical. The rank files' headers are the ground truth: a
manifest shape or dtype that disagrees with them, or a config that disagrees with the tensors, is
refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from convert_helpers import tree_checksums

from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.checkpoint.sharded import MANIFEST_FILE, read_manifest
from deepseek_model.cli import main as cli_main
from deepseek_model.convert.shard import merge, shard
from deepseek_model.convert.verify import verify
from deepseek_model.testing import make_tiny_checkpoint, one_thread

QB = "model.layers.1.self_attn.q_b_proj.weight"  # column split: [256, 192] full, [128, 192] per rank
NORM = "model.norm.weight"  # replicated, [256]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[str, str]:
    """(HF source, its `shard -n 2` output), built once for the module."""
    root = tmp_path_factory.mktemp("manifest")
    with one_thread():
        src = make_tiny_checkpoint(root / "src", "tiny", fp8=False, seed=3)
        shard(src, str(root / "tp2"), 2, quiet=True)
    return src, str(root / "tp2")


def _damaged(sharded, tmp_path, damage) -> str:
    """A copy of the sharded checkpoint whose manifest went through `damage(manifest)`."""
    dst = tmp_path / "tp2"
    shutil.copytree(sharded[1], dst)
    mpath = dst / MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    damage(manifest)
    mpath.write_text(json.dumps(manifest))
    return str(dst)


def _assert_one_line(err: BaseException, src: str, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    assert os.path.join(src, MANIFEST_FILE) in text, text
    for needle in needles:
        assert needle in text, (needle, text)


def _assert_cli_refuses(capsys, argv: list[str], src: str, *needles: str) -> None:
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    _assert_one_line(ValueError(lines[0]), src, *needles)


def _assert_nothing_written(tmp_path) -> None:
    assert sorted(os.listdir(tmp_path)) == ["tp2"]  # no output directory, no .out.tmp-PID sibling


def _set_shape(name: str, shape):
    return lambda m: m["tensors"][name].update(shape=shape)


# Damage read_manifest itself refuses (so merge, verify and from_pretrained all do): (damage, needles).
MANIFEST_DAMAGE = {
    "unknown-dtype": (lambda m: m["tensors"][QB].update(dtype="Q4"), (QB, "unknown dtype 'Q4'")),
    "no-dtype": (lambda m: m["tensors"][QB].pop("dtype"), (QB, "no 'dtype'")),
    "shape-not-a-list": (_set_shape(QB, "big"), (QB, "shape 'big'")),
    "negative-dim": (_set_shape(QB, [-256, 192]), (QB, "non-negative integers")),
    "bool-dim": (_set_shape(QB, [True, 192]), (QB, "non-negative integers")),
    "row-split-of-1d": (lambda m: m["tensors"][NORM].update(split="row", dim=1), (NORM, "has 1 dimension")),
    "split-dim-mismatch": (lambda m: m["tensors"][QB].update(dim=1), (QB, "needs dim 0, got 1")),
    "not-divisible": (_set_shape(QB, [255, 192]), (QB, "not divisible by 2")),
    "unknown-split": (lambda m: m["tensors"][QB].update(split="diagonal"), (QB, "unknown split 'diagonal'")),
    "no-config": (lambda m: m.pop("config"), ("'config'",)),
    "config-not-object": (lambda m: m.update(config=[1]), ("'config'",)),
    "world-size-string": (lambda m: m.update(world_size="2"), ("'world_size'",)),
    "unknown-version": (lambda m: m.update(version=7), ("'version'",)),
    "no-block-size": (lambda m: m.pop("block_size"), ("'block_size'",)),
    "empty-tensors": (lambda m: m.update(tensors={}), ("'tensors' is empty",)),
    "hf-index-to-config": (lambda m: m["hf_index"]["weight_map"].update({QB: "config.json"}), (QB, "'config.json'")),
    "hf-index-to-index": (lambda m: m["hf_index"]["weight_map"].update({QB: "model.safetensors.index.json"}),
                          (QB, "'model.safetensors.index.json'")),
    "hf-index-to-manifest": (lambda m: m["hf_index"]["weight_map"].update({QB: MANIFEST_FILE}), (QB, MANIFEST_FILE)),
    "hf-index-lacks-tensor": (lambda m: m["hf_index"]["weight_map"].pop(QB), ("hf_index does not map", QB)),
    "rank-lacks-tensor": (lambda m: m["ranks"][1]["weight_map"].pop(QB), ("rank 1 does not map", QB)),
    "rank-number": (lambda m: m["ranks"][1].update(rank=0), ("entry 1 of 'ranks'",)),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_refused_everywhere(sharded, tmp_path, capsys, case):
    damage, needles = MANIFEST_DAMAGE[case]
    src = _damaged(sharded, tmp_path, damage)
    before = tree_checksums(src)
    for call in (lambda: read_manifest(src), lambda: merge(src, str(tmp_path / "out"), quiet=True),
                 lambda: verify(sharded[0], src)):
        with pytest.raises(ValueError) as err:
            call()
        _assert_one_line(err.value, src, *needles)
    _assert_cli_refuses(capsys, ["convert", "merge", "-q", src, str(tmp_path / "out")], src, *needles)
    _assert_cli_refuses(capsys, ["convert", "verify", "-q", sharded[0], src], src, *needles)
    _assert_nothing_written(tmp_path)
    assert tree_checksums(src) == before


def test_from_pretrained_reads_the_validated_manifest(sharded, tmp_path):
    from deepseek_model.loading import from_pretrained  # noqa: PLC0415 (heavy; only this test needs it)

    damage, needles = MANIFEST_DAMAGE["unknown-dtype"]
    src = _damaged(sharded, tmp_path, damage)
    with pytest.raises(ValueError) as err:
        from_pretrained(src, weights="bf16")
    _assert_one_line(err.value, src, *needles)


# Manifests read_manifest accepts, which disagree with the rank files (merge and verify refuse them) or
# whose config is invalid or contradicts the tensors (merge refuses them): (damage, needles, verify too).
CONTENT_DAMAGE = {
    "shape-doubled": (lambda m: m["tensors"][QB]["shape"].__setitem__(0, 512), (QB, "[128, 192]"), True),
    "shape-huge": (_set_shape(QB, [1 << 40, 1 << 20]), (QB, "[128, 192]"), True),
    "dtype-changed": (lambda m: m["tensors"][QB].update(dtype="F32"), (QB, "BF16 [128, 192]"), True),
    "config-field-invalid": (lambda m: m["config"].update(hidden_size="x"), ("config", "'hidden_size'"), False),
    "config-contradicts-tensors": (lambda m: m["config"].update(vocab_size=1024),
                                   ("the config needs [1024, 256]", "disagree"), False),
}


@pytest.mark.parametrize("case", sorted(CONTENT_DAMAGE))
def test_merge_checks_the_manifest_against_rank_files_and_config(sharded, tmp_path, capsys, case):
    damage, needles, by_verify = CONTENT_DAMAGE[case]
    src = _damaged(sharded, tmp_path, damage)
    before = tree_checksums(src)
    calls = [lambda: merge(src, str(tmp_path / "out"), quiet=True)]
    if by_verify:
        calls.append(lambda: verify(sharded[0], src))
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        _assert_one_line(err.value, src, *needles)
    _assert_cli_refuses(capsys, ["convert", "merge", "-q", src, str(tmp_path / "out")], src, *needles)
    _assert_nothing_written(tmp_path)
    assert tree_checksums(src) == before


def test_an_undamaged_shard_merges_back_exactly(sharded, tmp_path):
    src_hf, src = sharded
    before = tree_checksums(src)
    merge(src, str(tmp_path / "merged"), quiet=True)
    a, b = CheckpointReader(src_hf), CheckpointReader(tmp_path / "merged")
    assert b.weight_map == a.weight_map
    for name in a.names():
        assert b.dtype(name) == a.dtype(name) and b.get(name).equal(a.get(name)), name
    summary = verify(src_hf, src)["summary"]
    assert summary["ok"] and summary["exact"] == summary["compared"] > 0, summary
    assert tree_checksums(src) == before
