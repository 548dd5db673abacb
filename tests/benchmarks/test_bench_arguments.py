"""Every benchmark refuses a bad command line before any work: exit status 2, one line naming the argument."""

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
    (["model", "--batches", "100000"], "--contexts/--batches/--sparse-contexts: bench model (the small config at the "
                                       "largest context and batch) needs about"),
    (["model", "--sparse-only", "--sparse-contexts", "10000000"], "--contexts/--batches/--sparse-contexts: "),
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
