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


@pytest.mark.parametrize("num_splits", [1, 3])
def test_ragged_left_padded_rows_match_twin_and_fp64(num_splits):
    """Rows that start late (left padding) attend over [start, len) only, in the kernel and the twin."""
    g = torch.Generator().manual_seed(20 + num_splits)
    q_lat, q_rope, kv, k_rope = _inputs(4, 5, 90, g)
    lens = torch.tensor([90, 90, 57, 90])
    starts = torch.tensor([0, 33, 56, 89])  # ragged; one row has a single key
    out = mla_decode(q_lat, q_rope, kv, k_rope, lens, 0.11, num_splits=num_splits, cache_starts=starts)
    ref = reference.mla_decode(q_lat, q_rope, kv, k_rope, lens, 0.11, cache_starts=starts)
    assert (out - ref).abs().max() / ref.abs().max() <= 1e-5
    for b in range(4):  # fp64, each row over exactly its keys
        c, r = kv[b, starts[b]:lens[b]].double(), k_rope[b, starts[b]:lens[b]].double()
        p = ((q_lat[b].double() @ c.T + q_rope[b].double() @ r.T) * 0.11).softmax(-1)  # (H, S_b)
        torch.testing.assert_close(ref[b].double(), p @ c, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cache_starts: every row needs 0 <= start < its length"):
        reference.mla_decode(q_lat, q_rope, kv, k_rope, lens, 0.11, cache_starts=torch.tensor([0, 0, 57, 0]))


def test_model_decodes_a_left_padded_batch_through_the_kernel(tiny_bf16, monkeypatch):
    """A ragged batch decodes through the Triton kernel (per-row starts) as through the torch path."""
    import deepseek_model as dsm

    torch_m = dsm.from_pretrained(tiny_bf16, backend="torch")
    tri_m = dsm.from_pretrained(tiny_bf16, backend="triton")
    prompts = [[5, 9, 14, 3, 7, 8, 21], [40, 41, 42], [7, 7]]
    a = dsm.generate(torch_m, prompts, max_new_tokens=6, eos=[])
    starts_seen, real = [], ops.mla_decode

    def spy(*args, **kw):
        starts_seen.append(kw.get("cache_starts"))
        return real(*args, **kw)

    monkeypatch.setattr(ops, "mla_decode", spy)
    b = dsm.generate(tri_m, prompts, max_new_tokens=6, eos=[])
    assert a.tokens == b.tokens
    assert starts_seen and starts_seen[0].tolist() == [0, 4, 5]  # each row's first real key
