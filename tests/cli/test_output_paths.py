"""Output directories and files are judged as their paths resolve, before any work: an empty path,
`nonexistent/..` (the working directory), a non-empty directory or a missing parent is a one-line
error naming the flag, and nothing the user had is touched or left behind."""

import os

import pytest

from deepseek_model import cli
from deepseek_model.convert.io import check_new_dir, check_new_file


def _snapshot(root):
    """Every file under root with its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A working directory holding the user's file (and a non-empty directory `keepme`)."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "keepme").mkdir()
    (tmp_path / "keepme" / "data.txt").write_text("also mine")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(capsys, argv, needle):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(("error:", "deepseek-model")) and needle in err[0], err
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("out, needle", [
    ("", "OUT: an empty path names no directory"),
    ("nonexistent/..", "OUT nonexistent/..: is the working directory or contains it"),
    (".", "OUT .: is the working directory or contains it"),
    ("keepme", "OUT keepme: exists and is not an empty directory"),
    ("keepme/../keepme", "exists and is not an empty directory"),
    ("notes.txt", "OUT notes.txt: exists and is not an empty directory"),
])
def test_make_tiny_refuses_and_touches_nothing(workdir, capsys, out, needle):
    before = _snapshot(workdir)
    _refused(capsys, ["make-tiny", out], needle)
    assert _snapshot(workdir) == before and sorted(os.listdir(workdir)) == ["keepme", "notes.txt"]


@pytest.mark.parametrize("extra, needle", [
    (["--out", ""], "--out: an empty path names no directory"),
    (["--out", "nonexistent/../keepme"], "--out nonexistent/../keepme: exists and is not an empty directory"),
    (["--out", "nonexistent/.."], "is the working directory or contains it"),
    (["--json", ""], "--json: an empty path names no file"),
    (["--json", "nodir/run.json"], "--json nodir/run.json: its directory"),
    (["--json", "keepme"], "--json keepme: is a directory"),
    (["--out", "new", "--json", "nodir/run.json"], "--json nodir/run.json"),  # refused before training and saving
])
def test_train_checks_its_outputs_before_training(workdir, capsys, extra, needle):
    before = _snapshot(workdir)
    _refused(capsys, ["train", "--config", "tiny", "--steps", "1", "--batch-size", "1", "--seq-len", "8",
                      "--threads", "1", *extra], needle)
    assert _snapshot(workdir) == before and sorted(os.listdir(workdir)) == ["keepme", "notes.txt"]


@pytest.mark.parametrize("out, needle", [
    ("", "--out: an empty path names no directory"),
    ("nonexistent/..", "is the working directory or contains it"),
    ("keepme", "--out keepme: exists and is not an empty directory (pass --resume to continue a run)"),
])
def test_rl_refuses_its_out_before_any_work(workdir, capsys, out, needle):
    before = _snapshot(workdir)
    _refused(capsys, ["rl", "--recipe", "arithmetic", "--threads", "1", "--out", out], needle)
    assert _snapshot(workdir) == before and sorted(os.listdir(workdir)) == ["keepme", "notes.txt"]


def test_train_recipe_refuses_an_out_that_resolves_to_the_working_directory(workdir, capsys):
    _refused(capsys, ["train", "--recipe", "mini-shakespeare", "--threads", "1", "--out", "nonexistent/.."],
             "is the working directory or contains it")
    assert sorted(os.listdir(workdir)) == ["keepme", "notes.txt"]


@pytest.mark.parametrize("keep, needle", [
    ("keepme", "--keep keepme: exists and is not an empty directory"),
    ("notes.txt", "--keep notes.txt: exists and is not an empty directory"),
    ("", "--keep: an empty path names no directory"),
])
def test_demo_checks_keep_first(workdir, capsys, keep, needle):
    before = _snapshot(workdir)
    _refused(capsys, ["demo", "--threads", "1", "--keep", keep], needle)
    assert _snapshot(workdir) == before


def test_demo_checks_the_conversion_directory_too(workdir, capsys):
    (workdir / "ck-bf16").mkdir()
    (workdir / "ck-bf16" / "x").write_text("mine")
    _refused(capsys, ["demo", "--threads", "1", "--keep", "ck"], "--keep's conversion directory")
    assert not (workdir / "ck").exists()


@pytest.mark.parametrize("argv", [
    ["make-tiny", "x", "--seed", "99999999999999999999999"],
    ["make-tiny", "x", "--seed", "-1"],
    ["generate", "x", "--token-ids", "1", "--seed", "18446744073709551615"],
    ["demo", "--seed", "4294967296"],
    ["rl", "--recipe", "arithmetic", "--seed", "1e3"],
    ["train", "--steps", "1", "--seed", "2**70"],
])
def test_seeds_out_of_range_are_usage_errors(workdir, capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "argument --seed: must be an integer in [0, 4294967295]" in line
    assert sorted(os.listdir(workdir)) == ["keepme", "notes.txt"]


def test_new_dir_and_file_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert check_new_dir("empty", "OUT") == str(tmp_path / "empty")
    assert check_new_dir("a/b/../c", "OUT") == str(tmp_path / "a" / "c")
    for bad in ("", "  ", ".", "..", "/", "x/..", str(tmp_path)):
        with pytest.raises(ValueError, match="^OUT"):
            check_new_dir(bad, "OUT")
    assert check_new_file("log.json", "--json") == str(tmp_path / "log.json")
    for bad in ("", "empty", "no/dir/log.json"):
        with pytest.raises(ValueError, match="^--json"):
            check_new_file(bad, "--json")
