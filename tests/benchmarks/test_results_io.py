"""Results files of a benchmark run are written whole or not at all."""

from pathlib import Path

import pytest

from deepseek_model.benchmarks import results_io


def test_all_files_replace_the_old_ones_together(tmp_path):
    out = tmp_path / "a" / "b"
    wrote = results_io.write_results([(out / "results.json", lambda p: p.write_text("new json")),
                                      (out / "results.png", lambda p: False),  # e.g. no matplotlib
                                      (tmp_path / "copy.json", lambda p: p.write_text("copy"))])
    assert wrote == [out / "results.json", tmp_path / "copy.json"]
    assert (out / "results.json").read_text() == "new json" and not (out / "results.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no temporary file left


def test_a_failing_writer_leaves_the_previous_results_and_no_new_directories(tmp_path):
    old = tmp_path / "results.json"
    old.write_text("old")

    def fail(path: Path) -> None:
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        results_io.write_results([(old, lambda p: p.write_text("new")),
                                  (tmp_path / "new" / "deeper" / "results.md", fail)])
    assert old.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_writers_get_a_temporary_name_with_the_same_suffix(tmp_path):
    seen = []
    results_io.write_results([(tmp_path / "results.png", lambda p: seen.append(p) or p.write_bytes(b"png"))])
    (tmp, ) = seen
    assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name != "results.png"
    assert (tmp_path / "results.png").read_bytes() == b"png"


@pytest.mark.parametrize("path, needle", [("", "an empty path names no directory")])
def test_check_results_dir_messages(path, needle):
    with pytest.raises(ValueError, match=needle):
        results_io.check_results_dir(path, "--out")


def test_an_existing_results_directory_is_reused(tmp_path):
    assert results_io.check_results_dir(tmp_path, "--out") == tmp_path
    assert results_io.check_results_dir(tmp_path / "x" / "y", "--out") == tmp_path / "x" / "y"
    assert not (tmp_path / "x").exists()  # checking creates nothing
