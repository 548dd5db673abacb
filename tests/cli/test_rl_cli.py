"""The `rl` command: its arguments, refusals (one-line ValueErrors) and a minimal run through run()."""

import argparse
import json

import pytest

from deepseek_model.commands import rl
from deepseek_model.testing import one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def parse(*argv):
    p = argparse.ArgumentParser()
    rl.add_arguments(p)
    return p.parse_args(list(argv))


def test_help_is_one_line():
    assert isinstance(rl.HELP, str) and "\n" not in rl.HELP and "GRPO" in rl.HELP


@pytest.mark.parametrize("argv, needle", [
    (["--minutes", "0"], "--minutes must be a positive number, got 0"),
    (["--minutes", "-2"], "--minutes must be a positive number, got -2"),
    (["--minutes", "nan"], "--minutes must be a positive number, got nan"),
    (["--threads", "0"], "--threads must be between 1 and the"),
    (["--grpo-steps", "0"], "--grpo-steps must be >= 1, got 0"),
])
def test_bad_arguments_refused(tmp_path, argv, needle):
    args = parse("--recipe", "arithmetic", "--out", str(tmp_path / "o"), *argv)
    with pytest.raises(ValueError, match=needle) as e:
        rl.run(args)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse("--recipe", "chess")


def test_resume_without_state_refused(tmp_path):
    with pytest.raises(ValueError, match="no rl_state.pt to resume from"):
        rl.run(parse("--recipe", "arithmetic", "--out", str(tmp_path), "--resume"))


def test_minimal_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = parse("--recipe", "arithmetic", "--out", str(out), "--pretrain-steps", "1", "--grpo-steps", "1",
                 "--threads", "1", "--quiet", "--seed", "3")
    assert rl.run(args) == 0
    log = json.loads((out / "rl_log.json").read_text())
    assert log["completed"] is True and log["recipe"]["seed"] == 3 and log["recipe"]["grpo_steps"] == 1
    assert log["held_out"] == 500 and len(log["history"]) == 1
    assert (out / "rl_state.pt").is_file()
    printed = capsys.readouterr().out
    assert "held-out greedy pass@1" in printed and "wrote" in printed


def test_registered_in_the_console_script(capsys):
    from deepseek_model import cli

    assert cli.main(["rl", "--recipe", "arithmetic", "--minutes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --minutes must be a positive number, got 0"
