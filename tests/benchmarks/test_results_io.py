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


def test_a_destination_named_twice_is_written_once(tmp_path):
    out = tmp_path / "results.json"
    wrote = results_io.write_results([(out, lambda p: p.write_text("a")), (tmp_path / "." / "results.json",
                                                                           lambda p: p.write_text("b"))])
    assert wrote == [out] and out.read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_link_is_written_through(tmp_path):
    target = tmp_path / "kept.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    results_io.write_results([(link, lambda p: p.write_text("new"))])
    assert link.is_symlink() and target.read_text() == "new"


def test_a_directory_in_the_way_stops_the_run_before_anything_is_replaced(tmp_path):
    old = tmp_path / "results.json"
    old.write_text("old")
    (tmp_path / "results.md").mkdir()
    calls = []
    with pytest.raises(IsADirectoryError, match="results.md"):
        results_io.write_results([(old, lambda p: calls.append(p) or p.write_text("new")),
                                  (tmp_path / "results.md", lambda p: p.write_text("md"))])
    assert not calls and old.read_text() == "old"


def test_check_outputs_refuses_before_any_work(tmp_path):
    import argparse

    class Refused(Exception):
        pass

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise Refused(message)

    (tmp_path / "results.md").mkdir()
    with pytest.raises(Refused, match="results.md is a directory"):
        results_io.check_outputs(Parser(), str(tmp_path))
    with pytest.raises(Refused, match="names a directory"):
        results_io.check_outputs(Parser(), str(tmp_path / "new"), {"--json": str(tmp_path / "x.json") + "/"})


def test_a_json_copy_inside_a_new_out_directory_is_accepted(tmp_path):
    import argparse

    out = tmp_path / "new"
    results_io.check_outputs(argparse.ArgumentParser(), str(out), {"--json": str(out / "copy.json")})
    assert not out.exists()  # checking creates nothing
