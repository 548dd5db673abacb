"""Checkpoints of the multi-process tests beyond the shared tiny ones of tests/conftest.py.

`tiny` (4 heads, 16 experts, vocab 512) splits over 2 and 4 ranks in bf16, but not in FP8 at 2:
its o_proj input (4 x 32 = 128 columns) would be cut into 64-column halves of one 128-block. The
`tp` config changes only head and MLP widths so every FP8 split at 2 ranks falls on 128-blocks.
"""

import pytest

from deepseek_model.config import builtin_config_dict
from deepseek_model.convert.shard import shard
from deepseek_model.testing import make_tiny_checkpoint, one_thread

# Per-rank parts at world size 2: q_b 4·128/2, kv_b 4·128/2, o_proj 4·64/2, dense 256/2, shared 2·128/2.
TP_FP8_CHANGES = {"qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64, "intermediate_size": 256,
                  "moe_intermediate_size": 128, "n_shared_experts": 2}


def tp_fp8_config() -> dict:
    """The tiny config with head/MLP widths whose 2-way splits are whole FP8 128-blocks."""
    return {**builtin_config_dict("tiny"), **TP_FP8_CHANGES}


@pytest.fixture(scope="session")
def tp_fp8(tmp_path_factory):
    with one_thread():
        return make_tiny_checkpoint(tmp_path_factory.mktemp("par_tp_fp8"), tp_fp8_config(), fp8=True, seed=4)


@pytest.fixture(scope="session")
def tiny_bf16_tp2(tiny_bf16, tmp_path_factory):
    dst = tmp_path_factory.mktemp("par_sharded") / "tiny_bf16_tp2"
    return shard(tiny_bf16, str(dst), 2, quiet=True)["dst"]


@pytest.fixture(scope="session")
def tp_fp8_tp2(tp_fp8, tmp_path_factory):
    dst = tmp_path_factory.mktemp("par_sharded") / "tp_fp8_tp2"
    return shard(tp_fp8, str(dst), 2, quiet=True)["dst"]
