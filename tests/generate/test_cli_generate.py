"""`deepseek-model generate`: text, chat, file, interactive, token ids, MTP; bad input exits 2 with one
`error:` line and no traceback. A few cases run as subprocesses (`python -m deepseek_model.cli
generate ...`, the real entry point); the rest call cli.main in-process (same code path, no
interpreter start-up on a shared 2-core box)."""

import io
import subprocess
import sys

import pytest

import deepseek_model as dsm
from deepseek_model import cli

THREADS = ("--threads", "1")


def _subprocess(*args):
    return subprocess.run([sys.executable, "-m", "deepseek_model.cli", "generate", *args, *THREADS],
                          capture_output=True, text=True, timeout=300)


def _inprocess(capsys, *args):
    code = cli.main(["generate", *args, *THREADS])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(stderr: str, needle: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], stderr


def test_subprocess_token_ids_greedy(tiny_ckpt, model):
    proc = _subprocess(tiny_ckpt, "--token-ids", "5", "6", "7", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    ref = dsm.generate(model, [[5, 6, 7]], max_new_tokens=6).tokens[0]
    assert proc.stdout.split() == [str(t) for t in ref]


@pytest.mark.parametrize("extra, needle", [
    (["--token-ids", "1", "600"], "outside [0, vocab_size=512)"),
    (["--token-ids", *(["7"] * 1030)], "longer than max_seq_len 1024"),
])
def test_subprocess_bad_input_exits_2(tiny_ckpt, extra, needle):
    proc = _subprocess(tiny_ckpt, *extra)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, needle)


def test_subprocess_missing_checkpoint(tmp_path):
    proc = _subprocess(str(tmp_path / "missing"), "--token-ids", "1")
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "not a checkpoint directory")


def test_mtp_matches_greedy_and_prints_stats(tiny_ckpt, capsys):
    code_a, out_a, _ = _inprocess(capsys, tiny_ckpt, "--token-ids", "5", "6", "7", "--max-new-tokens", "6")
    code_b, out_b, err_b = _inprocess(capsys, tiny_ckpt, "--token-ids", "5", "6", "7", "--max-new-tokens", "6",
                                      "--speculative", "mtp", "--stats")
    assert code_a == code_b == 0 and out_a == out_b
    assert "tokens per forward" in err_b and "acceptance" in err_b


def test_cpu_pack_generates_the_same_tokens(tiny_ckpt, capsys):
    args = (tiny_ckpt, "--token-ids", "5", "6", "7", "--max-new-tokens", "6", "--speculative", "mtp")
    code_a, out_a, _ = _inprocess(capsys, *args)
    code_b, out_b, _ = _inprocess(capsys, *args, "--cpu-pack")
    assert code_a == code_b == 0 and out_a == out_b


def test_text_chat_file_interactive(tiny_ckpt, tmp_path, capsys, monkeypatch):
    code, out, _ = _inprocess(capsys, tiny_ckpt, "--prompt", "Hello", "--chat", "--max-new-tokens", "4",
                              "--temperature", "0.7", "--top-p", "0.9", "--top-k", "20", "--seed", "1")
    assert code == 0 and out.strip()
    f = tmp_path / "prompts.txt"
    f.write_text("Hello world\nThe capital of France\n")
    code, out, _ = _inprocess(capsys, tiny_ckpt, "--input-file", str(f), "--max-new-tokens", "3")
    assert code == 0 and out.startswith("[0] ") and "\n[1] " in out
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nexit\n"))
    code, out, _ = _inprocess(capsys, tiny_ckpt, "--interactive", "--max-new-tokens", "2")
    assert code == 0 and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, needle", [
    (["--token-ids", "1", "2", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--token-ids", "1", "--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1"),
    (["--token-ids", "1", "--top-k", "-2"], "--top-k must be >= 0 (0 = no top-k filter), got -2"),
    (["--token-ids", "1", "--top-p", "0"], "--top-p must be in (0, 1], got 0"),
    (["--token-ids", "1", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--token-ids", "1", "--top-p", "nan"], "--top-p must be a finite number"),
    (["--token-ids", "1", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--input-file", "/no/such/file.txt"], "No such file"),
    (["--token-ids", "1", "--chat"], "--chat applies to text prompts"),
    (["--token-ids", "1", "--cpu-pack", "--batch-invariant"], "--cpu-pack and --batch-invariant exclude each other"),
])
def test_bad_input_exits_2(tiny_ckpt, capsys, extra, needle):
    code, _, err = _inprocess(capsys, tiny_ckpt, *extra)
    assert code == 2
    _one_error_line(err, needle)


def test_checkpoint_without_tokenizer(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _inprocess(capsys, str(tmp_path / "empty"), "--prompt", "hi")
    assert code == 2
    _one_error_line(err, "tokenizer.json")


def test_non_utf8_prompts_name_their_source(tiny_ckpt, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Hello\n\xff\xfe world\n")
    code, _, err = _inprocess(capsys, tiny_ckpt, "--input-file", str(bad), "--max-new-tokens", "2")
    assert code == 2
    _one_error_line(err, f"--input-file {bad}: not UTF-8 text (byte 0xff at offset 6)")
    stdin = io.TextIOWrapper(io.BytesIO(b"\xc3\x28 broken\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    code, _, err = _inprocess(capsys, tiny_ckpt, "--input-file", "-", "--max-new-tokens", "2")
    assert code == 2
    _one_error_line(err, "--input-file stdin: not UTF-8 text")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello\n\xff\n"), encoding="utf-8"))
    code, out, err = _inprocess(capsys, tiny_ckpt, "--interactive", "--max-new-tokens", "2")
    assert code == 2 and len(out.strip().splitlines()) == 1  # the good line was answered first
    _one_error_line(err.split("\n", 1)[1], "stdin (--interactive) line 2: not UTF-8 text (byte 0xff)")  # after the banner
    good = tmp_path / "good.txt"
    good.write_text("Hello\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello there\n"), encoding="utf-8"))
    code, out, _ = _inprocess(capsys, tiny_ckpt, "--input-file", "-", "--max-new-tokens", "2")
    assert code == 0 and out.strip()


def test_thread_count_bounded(tiny_ckpt, capsys):
    code = cli.main(["generate", tiny_ckpt, "--token-ids", "1", "--threads", "1000000"])  # no test default after it
    assert code == 2
    _one_error_line(capsys.readouterr().err, "--threads must be between 1 and the")
