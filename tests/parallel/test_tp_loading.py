"""Loading under tensor/expert parallelism on real processes: slices only, refusals, failures.

Each rank reads its slices (a split tensor and its FP8 scale through safetensors slices, never
whole; only its own routed experts); a world size the model cannot be split over is refused on
every rank before any weight is read; a rank that fails to load makes every rank fail, and a rank
that dies makes the others exit instead of hanging.
"""

import pytest

import deepseek_model as dsm
from deepseek_model.config import ModelConfig
from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.schema import SPLIT_EXPERT, SPLIT_REPLICATED
from deepseek_model.checkpoint.writer import write_checkpoint
from deepseek_model.testing import make_tiny_tensors
from multiprocess_harness import results, run_workers
from parallel_workers import (die_before_collective, load_error, load_or_die, reads_during_load, split_kind,
                              stall_before_collective)

BAD_EXPERT = "model.layers.1.mlp.experts.15.up_proj.weight"  # expert 15: rank 1's alone at world size 2
DEAD_RANK_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 2.0  # collective timeout while a live rank stalls


def _expert(name: str) -> int:
    return int(name.split(".mlp.experts.")[1].split(".")[0])


def test_ranks_read_only_their_slices(tp_fp8):
    """FP8 weights and their scales are sliced, never read whole; experts only by their owner."""
    ranks = results(run_workers(reads_during_load, 2, tp_fp8))
    cfg = ModelConfig.from_json(tp_fp8)
    per_rank = cfg.n_routed_experts // 2
    for rank, r in enumerate(ranks):
        assert not r["refused"], r["refused"]
        whole, sliced = set(r["whole"]), set(r["sliced"])
        assert not whole & sliced
        for name in whole:
            kind = split_kind(name)
            assert kind in (SPLIT_REPLICATED, SPLIT_EXPERT), f"rank {rank} read split tensor '{name}' whole"
            if kind == SPLIT_EXPERT:
                assert _expert(name) // per_rank == rank, f"rank {rank} read another rank's expert '{name}'"
        assert sliced and all(split_kind(n) not in (SPLIT_REPLICATED, SPLIT_EXPERT) for n in sliced)
        assert any(schema.is_scale_name(n) for n in sliced), "FP8 scales must be sliced with their weights"
        owned = {n for n in whole if split_kind(n) == SPLIT_EXPERT}
        moe_layers = sum(map(cfg.is_moe_layer, range(cfg.num_hidden_layers))) + cfg.num_nextn_predict_layers
        assert len(owned) == per_rank * 3 * 2 * moe_layers  # experts x (gate, up, down) x (weight, scale)


def test_unsplittable_world_size_refused_before_any_read(tiny_fp8):
    """tiny in FP8 cannot run on 2 ranks: o_proj's 128 input columns would cut a 128-block."""
    ranks = results(run_workers(reads_during_load, 2, tiny_fp8))
    for r in ranks:
        assert r["whole"] == [] and r["sliced"] == [], "a weight was read before the refusal"
        (msg,) = r["refused"]
        assert msg.startswith("ParallelError: cannot split the model over world size 2: ")
        assert "o_proj columns (heads x v_head_dim) (128) splits into parts of 64, not a multiple of the FP8 128-block" in msg
        assert "\n" not in msg


def test_indivisible_heads_refused(tiny_bf16):
    ranks = results(run_workers(load_error, 3, tiny_bf16))
    for msg in ranks:
        assert msg.startswith("ParallelError: cannot split the model over world size 3: num_attention_heads (4) is "
                              "not divisible by 3; vocab_size (512) is not divisible by 3; n_routed_experts (16) is not divisible by 3")


def test_quantizing_at_load_obeys_fp8_blocks(tiny_bf16):
    """A bf16 checkpoint loaded as FP8 must also split on 128-blocks (its scales are built per slice)."""
    msg = results(run_workers(load_error, 2, tiny_bf16, "fp8"))[0]
    assert msg.startswith("ParallelError: cannot split the model over world size 2: o_proj columns")


def test_sharded_checkpoint_for_another_world_size_refused(tiny_bf16_tp2):
    with pytest.raises(dsm.CheckpointError, match=r"sharded for world size 2, this job has 1 ranks"):
        dsm.from_pretrained(tiny_bf16_tp2)


@pytest.fixture(scope="module")
def bad_expert_ckpt(tmp_path_factory):
    """tiny bf16 with one routed expert of rank 1 mis-shaped: only rank 1 can notice."""
    from deepseek_model.config import builtin_config_dict

    cfg_dict = builtin_config_dict("tiny")
    cfg_dict.pop("quantization_config")
    tensors = make_tiny_tensors(ModelConfig.from_dict(cfg_dict), seed=5)
    tensors[BAD_EXPERT] = tensors[BAD_EXPERT][:-1].clone()
    return write_checkpoint(tmp_path_factory.mktemp("bad_expert"), tensors, cfg_dict)


def test_rank_failing_to_load_fails_every_rank(bad_expert_ckpt):
    outcomes = run_workers(load_or_die, 2, bad_expert_ckpt)
    assert all(o.exitcode not in (0, None) for o in outcomes), [o.exitcode for o in outcomes]
    assert outcomes[1].error.startswith("CheckpointError: ")
    assert f"tensor '{BAD_EXPERT}' has shape [95, 256], the config needs [96, 256]" in outcomes[1].error.splitlines()[0]
    assert outcomes[0].error.splitlines()[0] == ("ParallelError: loading the checkpoint failed on rank 1 of 2 "
                                                 "(see that rank's error)")


def test_dead_rank_ends_the_job_instead_of_hanging(tiny_bf16):
    """Rank 1 exits before the collective; rank 0 must fail (peer gone or collective timeout)."""
    outcomes = run_workers(die_before_collective, 2, tiny_bf16, collective_timeout_s=DEAD_RANK_TIMEOUT_S,
                           timeout_s=6 * DEAD_RANK_TIMEOUT_S)
    assert outcomes[1].exitcode == 3
    assert outcomes[0].exitcode not in (0, None), outcomes[0].error


def test_stalled_rank_times_out_the_collective(tiny_bf16):
    """Rank 1 is alive but never reaches the post-load check: rank 0's collective times out."""
    outcomes = run_workers(stall_before_collective, 2, tiny_bf16, STALL_TIMEOUT_S * 2,
                           collective_timeout_s=STALL_TIMEOUT_S, timeout_s=60)
    assert outcomes[1].exitcode == 4
    assert outcomes[0].exitcode not in (0, None)
    print(outcomes[0].error.splitlines()[0][:300])
    assert "timed out" in outcomes[0].error.lower() or "timeout" in outcomes[0].error.lower(), outcomes[0].error[:500]


def test_fp8_kept_in_fp8_over_a_block_cutting_split_is_one_line(tiny_fp8):
    """weights="w8a8" (and "fp8") keep the 128-blocks, so a split that cuts one is refused, naming the
    dimension and the block, in one line; weights="bf16" loads (tests/parallel/test_tp_numerics.py)."""
    for weights in ("w8a8", "fp8"):
        for msg in results(run_workers(load_error, 2, tiny_fp8, weights)):
            assert msg.startswith("ParallelError: cannot split the model over world size 2: ") and "\n" not in msg
            assert "not a multiple of the FP8 128-block its scale is split by" in msg
