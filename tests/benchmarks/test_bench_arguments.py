"""Every benchmark refuses a bad command line before any work: exit status 2, one line naming the argument."""

import os

import pytest

from deepseek_model.cli import main


@pytest.mark.parametrize("args, needle", [
    (["train", "--steps", "-1"], "--steps: expected a positive integer, got -1"),
    (["train", "--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["train", "--seq-len", "-3"], "--seq-len: expected a positive integer, got -3"),
    (["train", "--threads", "0"], "--threads: expected a positive integer, got 0"),
    (["train", "--gamma", "nan"], "--gamma: expected a finite number >= 0, got nan"),
    (["rl", "--threads", "0"], "--threads: expected a positive integer, got 0"),
    (["gpu", "--tune-seconds", "nan"], "--max-seconds/--tune-seconds: expected a non-negative number"),
    (["kernels", "--trials", "0"], "--trials: expected a positive integer"),
    (["kernels", "--m", "100000000"], "--m/--n-div/--k-div: bench kernels (the largest GEMM's operands, their copies "
                                      "and outputs) needs about"),
    (["model", "--contexts", "0"], "--contexts: expected positive integers"),
    (["model", "--crossover-topk", "0"], "--crossover-topk: expected a positive integer"),
    (["model", "--sparse-only", "--no-sparse"], "--sparse-only and --no-sparse exclude each other"),
    (["model", "--batches", "100000"], "--contexts/--batches: bench model (the small config at the largest context "
                                       "and batch) needs about"),
    (["model", "--sparse-only", "--sparse-contexts", "10000000"], "--sparse-contexts/--crossover-topk: bench model"),
    (["model", "--sparse-only", "--crossover-topk", "300000"], "--sparse-contexts/--crossover-topk: bench model"),
    (["model", "--config", "tiny", "--contexts", "1019"], "--contexts: 1019 + 9 decoded positions exceed the tiny "
                                                          "config's max_position_embeddings 1024"),
    (["model", "--quick", "--config", "tiny", "--contexts", "1020"], "--contexts: 1020 + 5 decoded positions exceed"),
    (["model", "--sparse-contexts", "100000000"], "--sparse-contexts/--crossover-topk: config: 'max_position_embeddings'"),
    (["mini", "--prompts", "0"], "--threads, --train-threads and --prompts must be >= 1"),
])
def test_bad_benchmark_arguments(capsys, args, needle):
    try:
        code = main(["bench", *args])
    except SystemExit as e:
        code = e.code
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "error: " in line and needle in line and "Traceback" not in line


@pytest.mark.parametrize("bench", ["model", "kernels"])
def test_bad_result_paths_are_refused_before_any_work(tmp_path, capsys, bench):
    """--out and --json are judged before anything runs: a file on the way, a directory as --json, a
    missing or read-only directory; nothing is created."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(["--out", str(afile)], f"--out {afile}: exists and is not a directory"),
             (["--out", str(afile / "sub")], f"--out {afile / 'sub'}: {afile} is not a directory"),
             (["--json", str(tmp_path)], f"--json {tmp_path}: is a directory"),
             (["--json", str(tmp_path / "no" / "x.json")], f"--json {tmp_path / 'no' / 'x.json'}: its directory"),
             (["--out", str(locked / "new")], f"--out {locked / 'new'}: cannot create it")]
    try:
        for extra, needle in cases:
            if "locked" in needle and os.access(locked, os.W_OK):  # root ignores the mode bits
                continue
            try:
                small = ["--config", "tiny", "--quick"] if bench == "model" else ["--quick"]
                code = main(["bench", bench, *small, "--out", str(tmp_path / "out"), *extra])
            except SystemExit as e:
                code = e.code
            assert code == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert "error: " in line and needle in line, line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "locked"]
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


def _refused(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "error: " in line and "Traceback" not in line
    return line


def test_other_benchmarks_judge_their_result_paths_first(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    missing = tmp_path / "no" / "x.json"
    assert f"--json {tmp_path}: is a directory" in _refused(capsys, ["bench", "train", "--json", str(tmp_path)])
    assert f"--json {missing}: its directory" in _refused(capsys, ["bench", "train", "--json", str(missing)])
    assert f"--md {missing}: its directory" in _refused(capsys, ["bench", "convert", "--md", str(missing)])
    assert f"--out {afile}: exists and is not a directory" in _refused(capsys, ["bench", "mini", "--out", str(afile)])
    assert f"--results {afile}: exists and is not a directory" in _refused(
        capsys, ["bench", "rl", "--results", str(afile)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bench_rl_never_deletes_a_directory_it_did_not_make(tmp_path, capsys):
    """--work's run directories are replaced only when empty or holding an earlier run's files."""
    mine = tmp_path / "real"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = _refused(capsys, ["bench", "rl", "--work", str(tmp_path), "--results", str(tmp_path / "results")])
    assert f"--work: {mine} holds files that are not an earlier run" in line
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "results").exists()
