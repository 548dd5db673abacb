"""The console script: make-tiny, inspect, demo; bad input exits non-zero with one line, no traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.testing import make_tiny_checkpoint


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "deepseek_model.cli", *args], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_make_tiny_and_inspect(tmp_path):
    out = tmp_path / "ck"
    _cli("make-tiny", str(out), "--fp8", "--seed", "3")
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "model-00001-of-000004.safetensors").exists()
    s = json.loads(_cli("inspect", str(out), "--json").stdout)
    assert s["checkpoint"]["fp8_weights"] == s["checkpoint"]["fp8_eligible"] > 0
    assert s["checkpoint"]["mtp_present"] is True
    # same seed → identical bytes
    again = tmp_path / "ck2"
    _cli("make-tiny", str(again), "--fp8", "--seed", "3")
    for f in out.iterdir():
        assert f.read_bytes() == (again / f.name).read_bytes(), f.name


def test_inspect_describes_a_tensor_parallel_checkpoint(tiny_bf16, tmp_path, capsys):
    """A `convert shard` output has per-rank files and a manifest: inspect describes it from the
    manifest's config, as it describes the HF checkpoint it came from."""
    from deepseek_model.cli import main

    assert main(["convert", "shard", tiny_bf16, str(tmp_path / "sh"), "-n", "2", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "sh"), "--json"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert main(["inspect", tiny_bf16, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert sharded["sharded"]["world_size"] == 2 and sharded["sharded"]["manifest"].endswith("tp_manifest.json")
    assert sharded["architecture"] == whole["architecture"] and sharded["parameters"] == whole["parameters"]
    assert main(["inspect", str(tmp_path / "sh")]) == 0
    assert "tensor-parallel checkpoint split over 2 ranks" in capsys.readouterr().out


def test_inspect_v3_published_sizes():
    s = json.loads(_cli("inspect", "deepseek-v3", "--json").stdout)
    assert round(s["parameters"]["total"] / 1e9) == 671
    assert round(s["parameters"]["active"] / 1e9) in (37, 38)
    c = s["cache_bytes_per_token"]
    assert c["latent"] == 576 * 61 * 2 and c["per_head_kv"] / c["latent"] > 71


def test_inspect_v32_published_sizes():
    s = json.loads(_cli("inspect", "deepseek-v3.2", "--json").stdout)
    assert s["architecture"]["sparse_attention"] == {"index_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    p, c = s["parameters"], s["cache_bytes_per_token"]
    assert p["indexer"] == 61 * (64 * 128 * 1536 + 128 * 7168 + 2 * 128 + 64 * 7168)
    assert round((p["total"] + p["mtp"]) / 1e9) == 685  # the published "685B" (MTP layer included)
    assert c["index_keys"] == 128 * 61 * 2 and c["index_keys_fp8"] == (128 + 4) * 61
    assert "sparse attention (DeepSeek-V3.2)" in _cli("inspect", "deepseek-v3.2").stdout
    assert json.loads(_cli("inspect", "deepseek-v3", "--json").stdout)["architecture"]["sparse_attention"] is None


def test_generate_v32_with_mtp_speculation(tiny_v32):
    """make-tiny --config tiny-v32 builds the published FP8 layout; generate speculates with MTP past
    index_topk and prints the plain greedy tokens."""
    base = ["generate", tiny_v32, "--token-ids", "3", "17", "42", "7", "--max-new-tokens", "12"]
    plain = _cli(*base).stdout
    assert _cli(*base, "--speculative", "mtp").stdout == plain
    assert _cli(*base, "--speculative", "mtp", "--fp8-cache").returncode == 0


def test_demo_runs():
    proc = _cli("demo", "--new-tokens", "4")
    out = proc.stdout
    assert "loaded the shipped 'mini-shakespeare'" in out and "absorbed vs naive" in out
    bpb = float(out.split("held-out bits/byte on a passage")[1].split("): ")[1].split(" ")[0])
    assert 0.5 < bpb < 2.6  # the trained model, not random weights (≈ 8)
    assert "identical tokens True" in out and "checks ok;" in out and "FAILED" not in out


@pytest.mark.parametrize("args, needle", [
    (["inspect", "/no/such/dir"], "not a checkpoint directory or a built-in config"),
    (["demo", "--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["bench", "mini", "--checkpoint", "/no/such/dir"], "/no/such/dir: --checkpoint is not a checkpoint directory"),
])
def test_bad_input_one_line(args, needle):
    proc = _cli(*args, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


@pytest.mark.parametrize("args, prog, needle", [
    (["generate", "x", "--token-ids", "1", "--top-k", "abc"], "deepseek-model generate", "invalid int value: 'abc'"),
    (["convert", "shard"], "deepseek-model convert shard", "the following arguments are required: SRC, DST"),
    (["bench", "model", "--threads", "x"], "deepseek-model bench model", "invalid int value: 'x'"),
    (["bench", "rl", "--bogus"], "deepseek-model bench rl", "unrecognized arguments: --bogus"),
    (["train", "--steps", "x"], "deepseek-model train", "invalid int value: 'x'"),
    (["bench", "kernels", "--m", "-5"], "deepseek-model bench kernels", "--m: expected positive integers, got [-5]"),
    (["bench", "kernels", "--m", "0"], "deepseek-model bench kernels", "--m: expected positive integers, got [0]"),
    (["bench", "train", "--seq-len", "1"], "deepseek-model bench train", "--seq-len: expected at least 3"),
    (["bench", "model", "--contexts", "100000000"], "deepseek-model bench model",
     "--contexts: 100000000 + 9 decoded positions exceed the small config's max_position_embeddings"),
    (["generate", "x", "--seed", "-3"], "deepseek-model generate", "argument --seed: must be an integer in [0, "),
    (["generate", "x", "--prompt", "a", "--prompt", "b"], "deepseek-model generate",
     "argument --prompt: given more than once (pass one value)"),
    (["nope"], "deepseek-model", "invalid choice: 'nope'"),
])
def test_usage_errors_are_one_line(capsys, args, prog, needle):
    """A bad command line names the command and the argument in one line, not the whole usage block."""
    from deepseek_model.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"{prog}: error: ") and needle in line and line.endswith(f"(see {prog} --help)")


def test_make_tiny_refuses_non_empty(tmp_path):
    (tmp_path / "x").write_text("keep me")
    proc = _cli("make-tiny", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not an empty directory" in proc.stderr
    assert (tmp_path / "x").read_text() == "keep me"


def test_corrupt_checkpoint_inspect(tmp_path):
    out = tmp_path / "ck"
    _cli("make-tiny", str(out))
    (out / "model.safetensors.index.json").write_text("{")
    proc = _cli("inspect", str(out), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not valid JSON" in proc.stderr


@pytest.mark.parametrize("argv", [["convert", "--help"], ["convert", "shard", "--help"], ["inspect", "deepseek-v3"],
                                  ["inspect", "tiny", "--json", "--world-size", "2"]])
def test_light_commands_do_not_import_torch(argv):
    """`convert --help` and `inspect CONFIG` start without torch (the import alone takes seconds)."""
    code = ("import sys\nfrom deepseek_model import cli\n"
            "try:\n    rc = cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH 0"


def test_package_names_resolve_lazily():
    import deepseek_model as dsm
    import deepseek_model.generate as gen_module  # noqa: F401  (binds the submodule onto the package)
    from deepseek_model.generate import generate

    assert dsm.generate is generate and callable(dsm.generate)
    assert dsm.from_pretrained.__module__ == "deepseek_model.loading"
    assert set(dsm.__all__) >= {"from_pretrained", "generate", "pretrained_path", "CheckpointError", "ModelConfig"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dsm.nope  # noqa: B018


def test_the_suite_and_its_processes_run_under_the_address_space_cap(address_space_cap):
    """Every case in the suite (in-process and in the processes it starts) meets `ulimit -v 8000000`:
    the cap is in force, inherited, and an allocation beyond it fails as an error, not a kill."""
    import resource

    assert 0 < resource.getrlimit(resource.RLIMIT_AS)[0] <= address_space_cap
    child = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"],
                           capture_output=True, text=True, timeout=60)
    assert 0 < int(child.stdout) <= address_space_cap
    with pytest.raises(RuntimeError):
        torch.empty(address_space_cap, dtype=torch.uint8)


def _cli_limited(*args, limit_as: int | None = None):
    import resource

    def limit():
        if limit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    return subprocess.run([sys.executable, "-m", "deepseek_model.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


@pytest.mark.parametrize("config, fp8, gib", [("deepseek-v3", False, "2804.9"), ("deepseek-v3.2", True, "1412.8")])
def test_a_build_beyond_memory_is_refused_before_allocating(tmp_path, config, fp8, gib):
    out = tmp_path / config
    proc = _cli_limited("make-tiny", out, "--config", config, *(["--fp8"] if fp8 else []), limit_as=8_000_000_000)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: building the checkpoint in {out} needs about {gib} GiB, but only")
    assert not out.exists()


def test_v32_runs_under_an_address_space_limit(tiny_v32, tmp_path):
    """generate, inspect and fp8-to-bf16 on a V3.2 checkpoint with the address space capped at 8 GB."""
    limit = 8_000_000_000
    gen = _cli_limited("generate", tiny_v32, "--token-ids", "1", "2", "3", "--max-new-tokens", "4", limit_as=limit)
    assert gen.returncode == 0 and len(gen.stdout.split()) == 4, gen.stderr
    assert _cli_limited("inspect", tiny_v32, limit_as=limit).returncode == 0
    conv = _cli_limited("convert", "fp8-to-bf16", tiny_v32, tmp_path / "bf16", "-q", limit_as=limit)
    assert conv.returncode == 0, conv.stderr


def test_loading_under_an_address_space_limit_is_refused_with_the_estimate(tmp_path, monkeypatch):
    from deepseek_model import memory

    path = make_tiny_checkpoint(tmp_path / "tiny", "tiny")
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)  # 1 MiB left
    with pytest.raises(memory.InsufficientMemory, match=r"^loading .*tiny \(bf16 weights, float32(, with its "
                                                         r"memory-mapped shards)?\) needs about 0\.0 GiB, but only "
                                                         r"0\.0 GiB is available"):
        dsm.from_pretrained(path)


def test_mapped_shards_count_under_an_address_space_limit(tmp_path):
    """Under `ulimit -v` a load maps its shards into the same address space: a load whose weights fit
    but whose mapped shards do not is refused with the estimate, not with an mmap error on a shard."""
    path = make_tiny_checkpoint(tmp_path / "small", "small")
    proc = _cli_limited("generate", str(path), "--token-ids", "3", "4", "--max-new-tokens", "2", limit_as=1_600_000 * 1024)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "with its memory-mapped shards) needs about" in line


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m deepseek_model.cli inspect deepseek-v3 --json | head -c 10",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout == '{\n  "archi' and proc.stderr == ""


def test_plots_are_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    """The base install has no matplotlib: benchmarks still write JSON and markdown and say why no PNG."""
    import builtins

    from deepseek_model import plotting

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plotting.pyplot("results.png") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["matplotlib is not installed (pip install 'deepseek-model[bench]'): no results.png; the JSON "
                   "and markdown have every value"]


def test_train_disk_full_leaves_no_output(tmp_path, monkeypatch, capsys):
    import errno

    from deepseek_model import cli
    from deepseek_model.checkpoint import writer

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_file", full_disk)
    out = tmp_path / "run"
    code = cli.main(["train", "--config", "tiny", "--steps", "1", "--batch-size", "1", "--seq-len", "8",
                     "--threads", "1", "--out", str(out)])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "No space left on device" in err[0] and ".safetensors" in err[0]
    assert os.listdir(tmp_path) == []
