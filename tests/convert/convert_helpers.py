"""Helpers shared by the converter tests (imported as `convert_helpers`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from deepseek_model.config import builtin_config_dict

EXTRA_FILES = {  # files a real repository ships next to the weights; the converters must copy them
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"chat_template": "{{ messages }}"}',
    "modeling_deepseek.py": "# custom code\n",
}


def add_extra_files(path: str) -> str:
    for name, text in EXTRA_FILES.items():
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(text)
    return path


def aligned_config() -> dict:
    """A tiny V3 config whose column/row splits at N=2 fall on 128-blocks (so FP8 can be sharded)."""
    d = builtin_config_dict("tiny")
    d.update(qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, intermediate_size=256,
             moe_intermediate_size=256, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    return d


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m deepseek_model.convert.cli ARGS` and capture its output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "deepseek_model.convert.cli", *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=300)


def tree_checksums(path: str) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (plus modes, to see writes of any kind)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest() + oct(os.stat(p).st_mode)
    return out


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_inproc(*args: str) -> subprocess.CompletedProcess:
    """Run `convert.cli.main(ARGS)` in this process (fast: no torch import), capturing stdout/stderr."""
    import contextlib
    import io

    from deepseek_model.convert.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
