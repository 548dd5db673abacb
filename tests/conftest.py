"""Test-wide setup and the shared tiny checkpoints.

Triton runs in its CPU interpreter (set before triton is imported). The whole session, and every
process it starts (the CLI cases, torchrun ranks, converters killed mid-run), runs with its address
space capped at ADDRESS_SPACE_CAP, what `ulimit -v 8000000` sets: a case that tries to allocate
before estimating fails here instead of taking a machine down. The tiny checkpoints below are
the one set every test package uses (built once per session, deterministic, never modified; a
package that needs something more — the converters' repository files, a block-aligned config —
derives its own from these or documents why it differs).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import resource
except ImportError:  # not a POSIX system: no cap
    resource = None

ADDRESS_SPACE_CAP = 8_000_000 * 1024  # bytes: `ulimit -v 8000000` (KiB)

import pytest  # noqa: E402

from deepseek_model.testing import make_tiny_checkpoint, one_thread  # noqa: E402


def pytest_configure(config):
    """Cap the address space (soft limit; never raised above what the shell already allows)."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = ADDRESS_SPACE_CAP if hard == resource.RLIM_INFINITY else min(hard, ADDRESS_SPACE_CAP)
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


@pytest.fixture(scope="session")
def address_space_cap() -> int:
    """The cap in bytes (test packages have conftest modules of their own: ask for it, do not import it)."""
    return ADDRESS_SPACE_CAP


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> str:
    """The `tiny` V3 config (MLA with q LoRA, 16 experts, MTP) in bf16, with its tokenizer."""
    with one_thread():
        return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bf16"), "tiny", fp8=False, seed=1)


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory) -> str:
    """The `tiny` V3 config in the published FP8 layout (ragged blocks, scales in other shards)."""
    with one_thread():
        return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_fp8"), "tiny", fp8=True, seed=2)


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory) -> str:
    """V2-Lite style: plain q_proj (no q LoRA), softmax greedy routing, 2 shared experts, no MTP."""
    with one_thread():
        return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v2"), "tiny-v2", fp8=False, seed=3)


TINY_V32_TOPK = 5  # far below the tests' sequence lengths, so the indexer's selection decides the output


@pytest.fixture(scope="session")
def tiny_v32(tmp_path_factory) -> str:
    """DeepSeek-V3.2 (lightning indexer + sparse MLA, MTP) in the published FP8 layout, index_topk 5."""
    from deepseek_model.config import builtin_config_dict  # noqa: PLC0415

    with one_thread():
        config = dict(builtin_config_dict("tiny-v32"), index_topk=TINY_V32_TOPK)
        return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v32"), config, fp8=True, seed=4)
