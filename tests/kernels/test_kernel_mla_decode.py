"""Triton split-K MLA decode vs the plain absorbed-attention torch twin (tiny dims)."""

import pytest
import torch

from deepseek_model.kernels import ops, reference
from deepseek_model.kernels.mla_decode import mla_decode

C, R = 64, 16  # tiny stand-ins for kv_lora_rank 512 and qk_rope_head_dim 64


def _inputs(batch, heads, seq, gen, dtype=torch.float32):
    q = torch.randn(batch, heads, C + R, generator=gen).to(dtype)  # (B, H, C+R)
    cache = torch.randn(batch, seq, C + R, generator=gen).to(dtype)  # (B, S, C+R): one 576-style cache
    return q[..., :C], q[..., C:], cache[..., :C], cache[..., C:]


@pytest.mark.parametrize("num_splits", [1, 3, 4, 7])
def test_split_decode_matches_twin(num_splits):
    g = torch.Generator().manual_seed(num_splits)
    q_lat, q_rope, kv, k_rope = _inputs(3, 5, 100, g)
    lens = torch.tensor([1, 37, 100])  # not multiples of the split; one split of 7 is empty for len 1
    out = mla_decode(q_lat, q_rope, kv, k_rope, lens, 0.135, num_splits=num_splits)
    ref = reference.mla_decode(q_lat, q_rope, kv, k_rope, lens, 0.135)
    assert out.shape == (3, 5, C) and out.dtype == torch.float32
    assert (out - ref).abs().max() / ref.abs().max() <= 1e-5


def test_bf16_cache_more_heads_than_a_block_and_dispatch():
    g = torch.Generator().manual_seed(11)
    q_lat, q_rope, kv, k_rope = _inputs(2, 20, 70, g, torch.bfloat16)  # 20 heads: two head blocks
    lens = torch.tensor([70, 33])
    out = ops.mla_decode(q_lat, q_rope, kv, k_rope, lens, 0.2, backend="triton")
    ref = ops.mla_decode(q_lat, q_rope, kv, k_rope, lens, 0.2, backend="auto")
    assert (out - ref).abs().max() / ref.abs().max() <= 1e-5


def test_twin_equals_naive_fp64_attention():
    """Independent check of the twin: per-sequence fp64 softmax over the valid prefix only."""
    g = torch.Generator().manual_seed(12)
    q_lat, q_rope, kv, k_rope = _inputs(2, 3, 40, g)
    lens = torch.tensor([40, 9])
    got = reference.mla_decode(q_lat, q_rope, kv, k_rope, lens, 0.3)
    for b in range(2):
        n = int(lens[b])
        k = torch.cat([kv[b, :n], k_rope[b, :n]], dim=-1).double()  # (n, C+R): the 576-wide key
        q = torch.cat([q_lat[b], q_rope[b]], dim=-1).double()  # (H, C+R)
        p = torch.softmax(q @ k.T * 0.3, dim=-1)  # (H, n)
        assert (got[b].double() - p @ kv[b, :n].double()).abs().max() <= 1e-5


def test_mla_decode_rejects_bad_input():
    g = torch.Generator().manual_seed(13)
    q_lat, q_rope, kv, k_rope = _inputs(2, 4, 16, g)
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_decode(q_lat, q_rope, kv, k_rope, torch.tensor([0, 16]), 0.1)
    with pytest.raises(ValueError, match="kv"):
        mla_decode(q_lat, q_rope, kv[..., :32], k_rope, torch.tensor([4, 16]), 0.1)
    with pytest.raises(ValueError, match="powers of two"):
        mla_decode(q_lat[..., :48], q_rope, kv[..., :48], k_rope, torch.tensor([4, 16]), 0.1)
