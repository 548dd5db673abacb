"""Absorbed vs naive MLA, the growing latent cache, and incremental decoding from any start_pos."""

import pytest
import torch

import deepseek_model as dsm
from deepseek_model import attention
from deepseek_model.attention import LatentCache


@pytest.fixture(scope="module")
def models(tiny_bf16):
    return {mode: dsm.from_pretrained(tiny_bf16, dtype=torch.float32, attn=mode) for mode in ("absorb", "naive")}


def test_absorbed_equals_naive(models):
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, n = models["absorb"](ids), models["naive"](ids)
    diff = (a - n).abs().max().item()
    print(f"absorb vs naive max diff {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("max_keys", [0, 4096])
def test_naive_chunks_through_gemms_or_the_fused_kernel_equal_absorbed(models, monkeypatch, max_keys):
    """Naive multi-token chunks attend with two GEMMs per query block and batch row (up to
    GEMM_ATTENTION_MAX_KEYS keys) or with the fused kernel (0: always): in ragged 5-query blocks,
    for a left-padded batch and for a chunk at start_pos 9 after a cached prefix, both equal the
    absorbed model, which attends in latent space."""
    monkeypatch.setattr(attention, "GEMM_ATTENTION_MAX_KEYS", max_keys)
    monkeypatch.setattr(attention, "GEMM_ATTENTION_QUERIES", 5)
    naive, absorb = models["naive"], models["absorb"]
    t = 23
    ids = torch.randint(2, 512, (2, t), generator=torch.Generator().manual_seed(5))
    pad = torch.tensor([0, 9])  # row 1 is left-padded
    valid = torch.arange(t)[None, :] >= pad[:, None]  # (B, T)
    positions = (torch.arange(t)[None, :] - pad[:, None]).clamp_min(0)  # (B, T)
    with torch.no_grad():
        a = naive.hidden(ids, 0, naive.new_cache(), positions=positions, valid=valid)
        b = absorb.hidden(ids, 0, absorb.new_cache(), positions=positions, valid=valid)
        for row, p in enumerate(pad.tolist()):
            assert torch.isfinite(a[row]).all()
            torch.testing.assert_close(a[row, p:], b[row, p:], rtol=0, atol=1e-5 * b.abs().max().item())
        caches = naive.new_cache(), absorb.new_cache()
        naive(ids[:, :9], 0, caches[0])
        absorb(ids[:, :9], 0, caches[1])
        torch.testing.assert_close(naive(ids[:, 9:], 9, caches[0]), absorb(ids[:, 9:], 9, caches[1]), rtol=0, atol=1e-5)


def test_values_wider_than_keys_through_the_fused_kernel(tmp_path, monkeypatch):
    """v_head_dim > qk_nope + qk_rope (a config the loader accepts): the fused kernel, which needs
    equal head dims, gets q and k zero-padded to the value width; naive equals absorbed."""
    from deepseek_model.config import builtin_config_dict
    from deepseek_model.testing import make_tiny_checkpoint

    cfg = builtin_config_dict("tiny")
    wide = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + 32
    path = make_tiny_checkpoint(str(tmp_path / "wide"), dict(cfg, v_head_dim=wide), seed=1)
    ids = torch.randint(2, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(attention, "GEMM_ATTENTION_MAX_KEYS", 4)  # stands in for a chunk over > 2048 keys
    with torch.no_grad():
        ref = dsm.from_pretrained(str(path), dtype=torch.float32, attn="absorb")(ids)
        out = dsm.from_pretrained(str(path), dtype=torch.float32, attn="naive")(ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("mode", ["absorb", "naive"])
def test_cached_decoding_equals_recompute(models, mode):
    """Prefill 6 tokens, then a 3-token chunk at start_pos=6, then single tokens: every step's
    logits equal a full no-cache forward of the whole prefix."""
    model = models[mode]
    ids = torch.randint(0, 512, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        chunks = [(0, 6), (6, 9)] + [(p, p + 1) for p in range(9, 14)]
        for lo, hi in chunks:
            step = model(ids[:, lo:hi], start_pos=lo, cache=cache)
            torch.testing.assert_close(step, full[:, lo:hi], rtol=0, atol=1e-5)


def test_greedy_with_cache_equals_recompute(models):
    model = models["absorb"]
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        cache = model.new_cache()
        logits = model(prompt, 0, cache)
        toks = prompt
        for pos in range(4, 16):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks = torch.cat([toks, nxt], 1)
            logits = model(nxt, pos, cache)
        # recompute without a cache: each greedy token is the argmax of the full prefix
        ref = prompt
        for _ in range(12):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(toks, ref)


def test_cache_grows_with_use_and_stores_latents_only(models):
    model = models["absorb"]
    cfg = model.cfg
    cache = model.new_cache()
    assert cache.nbytes() == 0  # nothing preallocated
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), 0, cache)
    layer = cache.layers[0]
    assert layer.capacity == 5 and layer.kv.shape == (1, 5, cfg.kv_lora_rank) and layer.pe.shape == (1, 5, 32)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * cfg.num_hidden_layers
    assert cache.nbytes() == 5 * per_token
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), 5, cache)
    assert layer.capacity == 10  # geometric growth


def test_cache_errors():
    c = LatentCache()
    with pytest.raises(ValueError, match="cache is empty"):
        c.update(3, torch.zeros(1, 1, 4), torch.zeros(1, 1, 2))
    c.update(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="batch size"):
        c.update(2, torch.zeros(2, 1, 4), torch.zeros(2, 1, 2))


def test_bf16_compute_close_to_fp32(tiny_bf16):
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    m32 = dsm.from_pretrained(tiny_bf16, dtype=torch.float32)
    m16 = dsm.from_pretrained(tiny_bf16, dtype="bfloat16")
    with torch.no_grad():
        a, b = m32(ids), m16(ids)
    assert b.dtype == torch.float32  # logits always fp32
    rel = ((a - b).abs().max() / a.abs().max()).item()
    print(f"bf16 vs fp32 relative logit diff {rel:.3g}")
    assert rel < 0.1


def test_input_errors(models):
    model = models["absorb"]
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, model.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a cache"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=3)
