"""DeepSeek-V3.2 sparse attention inside the model: indexer math, index-key cache, both attention
paths against a float64 masked reference, FP8 index keys, speculation, batch invariance, errors."""

import os

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.attention import IndexKeyCache, LatentCache
from deepseek_model.config import ConfigError, ModelConfig, builtin_config_dict
from deepseek_model.indexer import hadamard, rotary_like_mla
from deepseek_model.rope import apply_rotary_half, rotary_table

TOPK = 5  # tests/conftest.py TINY_V32_TOPK


@pytest.fixture(scope="module")
def model(tiny_v32):
    return dsm.from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------- config
def _v32(**changes):
    d = dict(builtin_config_dict("tiny-v32"))
    d.update(changes)
    return d


def test_v32_config_defaults_and_traps():
    d = _v32(head_dim=32, qk_head_dim=64, layer_types=["indexed_attention"] * 3, mlp_layer_types=["dense"] + ["sparse"] * 2)
    for key in ("scoring_func", "topk_method", "norm_topk_prob", "index_topk", "index_n_heads", "index_head_dim"):
        d.pop(key)
    cfg = ModelConfig.from_dict(d)  # transformers' v5 layout: head_dim is the rope dim, no routing fields
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("sigmoid", "noaux_tc", True)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048)  # transformers' defaults
    assert cfg.qk_head_dim == 64 and cfg.to_dict()["index_topk"] == 2048
    v3 = ModelConfig.builtin("tiny")
    assert not v3.has_indexer and "index_topk" not in v3.to_dict()


@pytest.mark.parametrize("changes, needle", [
    (dict(q_lora_rank=None), "needs q_lora_rank"),
    (dict(index_head_dim=16), "index_head_dim (16) is smaller than qk_rope_head_dim (32)"),
    (dict(index_topk=0), "index_topk must be positive"),
    (dict(index_n_heads=[4]), "'index_n_heads' must be an integer"),
    (dict(index_topk=1 << 30), "'index_topk' is 1073741824, beyond the sanity bound"),
    (dict(mlp_layer_types=["sparse"] * 3), "mlp_layer_types"),
])
def test_bad_v32_configs_are_one_line_errors(changes, needle):
    with pytest.raises(ConfigError, match=None) as e:
        ModelConfig.from_dict(_v32(**changes), source="cfg.json")
    assert needle in str(e.value) and str(e.value).startswith("cfg.json") and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------- pieces
def test_half_split_rotary_is_transformers_rotate_half():
    """apply_rotary_half equals x·cos + rotate_half(x)·sin with cos/sin = cat(freqs, freqs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 3, 8, generator=g, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    table = rotary_table(inv, 4, 7)  # positions 4..10
    ang = torch.outer(torch.arange(4, 11, dtype=torch.float64), inv.double())  # (T, 4)
    cos, sin = torch.cat([ang, ang], -1).cos()[None, :, None], torch.cat([ang, ang], -1).sin()[None, :, None]
    rotate_half = torch.cat([-x[..., 4:], x[..., :4]], -1)
    assert torch.allclose(apply_rotary_half(x, table).double(), x * cos + rotate_half * sin, atol=1e-6)
    # the indexer rotates its FIRST rope dims and passes the rest through
    wide = torch.cat([x, x[..., :4]], -1).float()  # (1, 7, 3, 12)
    y = rotary_like_mla(wide, table, 8)
    assert torch.equal(y[..., 8:], wide[..., 8:]) and torch.allclose(y[..., :8], apply_rotary_half(wide[..., :8], table))


def test_hadamard_is_orthogonal_and_refuses_other_orders():
    h = hadamard(64, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert set(h.abs().unique().tolist()) == {64 ** -0.5}
    with pytest.raises(ValueError, match="not a power of two"):
        hadamard(24)


def test_index_key_cache_rolls_back_with_the_latents():
    lat, idx = LatentCache(index=IndexKeyCache()), IndexKeyCache(fp8=True)
    keys = torch.randn(1, 6, 8)
    lat.index.update(0, keys, None)
    got, scale = lat.index.update(4, keys[:, :1] * 2, None)  # rewrite from position 4: length 5
    assert got.shape == (1, 5, 8) and scale is None and lat.index.length == 5
    assert torch.equal(got[:, :4], keys[:, :4]) and torch.equal(got[:, 4], keys[:, 0] * 2)
    with pytest.raises(ValueError, match="start_pos 7 is past the 5 cached positions"):
        lat.index.update(7, keys[:, :1], None)
    with pytest.raises(ValueError, match=r"index cache \(fp8=True\) got keys of dtype torch.float32"):
        idx.update(0, keys, None)
    lat.select(torch.tensor([0, 0]))
    assert lat.index.keys.shape[0] == 2


# ----------------------------------------------------------------------------------- model
def _masked_reference(model, ids) -> torch.Tensor:
    """Float64 reference for every layer's selection: each query's top-k visible keys by the
    indexer formula (ranked in Python), then plain naive attention restricted to them (no cache,
    no kernels)."""
    m = model.double()
    try:
        rotary = rotary_table(m.inv_freq, 0, ids.shape[1], m.rope_magnitude)
        x = m.embed(ids)
        t = ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        for layer in m.layers:
            a = layer.attn
            h = layer.attn_norm(x)
            latent = a.q_norm(a.wq_a(h))
            q = a.wq_b(latent).view(*h.shape[:2], a.n_heads, -1)
            q_nope, q_pe = q.split([a.nope, a.rope], -1)
            kv, k_pe = a.wkv_a(h).split([a.kv_lora_rank, a.rope], -1)
            kv = a.kv_norm(kv)
            from deepseek_model.attention import _rotate  # noqa: PLC0415
            q_pe, k_pe = _rotate(q_pe, rotary), _rotate(k_pe, rotary)
            ix = a.indexer
            iq = rotary_like_mla(ix.wq_b(latent).view(*h.shape[:2], ix.n_heads, ix.head_dim), rotary, a.rope)
            ik = ix.keys(h, rotary)
            w = h @ ix.weights_proj.weight.T
            score = torch.einsum("bth,bths->bts", w, torch.relu(torch.einsum("bthd,bsd->bths", iq, ik)))
            score = score.masked_fill(~causal, float("-inf"))
            keep = torch.zeros_like(score, dtype=torch.bool)
            for b in range(score.shape[0]):
                for i in range(t):  # the top TOPK visible keys; equal scores go to the later token
                    ranked = sorted(range(i + 1), key=lambda j: (score[b, i, j].item(), j), reverse=True)
                    keep[b, i, ranked[:TOPK]] = True
            kvb = a.wkv_b(kv).view(*kv.shape[:2], a.n_heads, -1)
            k_nope, v = kvb.split([a.nope, a.v_dim], -1)
            s = (torch.einsum("bthd,bshd->bths", q_nope, k_nope) + torch.einsum("bthr,bsr->bths", q_pe, k_pe)) * a.scale
            s = s.masked_fill(~keep[:, :, None, :], float("-inf"))
            o = torch.einsum("bths,bshd->bthd", s.softmax(-1), v)
            x = x + a.wo(o.flatten(2))
            x = x + layer.ffn(layer.ffn_norm(x))
        return m.head(m.norm(x))
    finally:
        model.float()


@pytest.mark.parametrize("attn", ["absorb", "naive", "auto"])
def test_prefill_and_cached_decode_equal_the_float64_reference(tiny_v32, ids, attn):
    model = dsm.from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16", attn=attn)
    with torch.no_grad():
        ref = _masked_reference(model, ids).float()
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :4], 0, cache)]
        steps += [model(ids[:, p:p + 1], p, cache) for p in range(4, ids.shape[1])]
    scale = ref.abs().max()
    assert (full - ref).abs().max() / scale <= 1e-5
    assert (torch.cat(steps, 1) - ref).abs().max() / scale <= 1e-5


@pytest.mark.parametrize("penalty", [0.5, 1.0])
def test_auto_splits_a_chunk_between_masked_and_gathered_queries(tiny_v32, ids, monkeypatch, penalty):
    """"auto": a chunk's queries that see many more keys than index_topk gather their selected
    latents, the earlier ones attend under a selection mask in query blocks (the first blocks, with at
    most index_topk keys, under the plain causal mask and never scored); a prefill and a chunk at
    position 6, each split inside, equal the float64 reference."""
    from deepseek_model import attention  # noqa: PLC0415

    model = dsm.from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16", attn="auto")
    monkeypatch.setattr(attention, "GATHER_PENALTY", penalty)
    monkeypatch.setattr(attention, "SPARSE_PREFILL_CHUNK", 3)
    monkeypatch.setattr(attention, "INDEX_SCORE_BYTES", 4 * ids.shape[0] * ids.shape[1] * 2)  # 2 queries a block
    t = ids.shape[1]
    split = model.layers[0].attn._gather_split
    assert 0 < split(t, t, TOPK) < t  # the prefill gathers from its split on
    chunk_split = split(t - 6, t, TOPK)
    assert (0 < chunk_split < t - 6) if penalty == 1.0 else chunk_split == 0  # the chunk: split inside / all gathered
    with torch.no_grad():
        ref = _masked_reference(model, ids).float()
        full = model(ids)
        cache = model.new_cache()
        chunks = torch.cat([model(ids[:, :6], 0, cache), model(ids[:, 6:], 6, cache)], 1)
    scale = ref.abs().max()
    assert (full - ref).abs().max() / scale <= 1e-5
    assert (chunks - ref).abs().max() / scale <= 1e-5


@pytest.mark.parametrize("attn,gemm_keys", [("auto", 2048), ("auto", 10), ("absorb", 2048)])
def test_left_padded_rows_equal_rows_alone_through_split_chunks(tiny_v32, monkeypatch, attn, gemm_keys):
    """A left-padded batch prefill in small query blocks (row masks: padding hidden, selections per
    row; "auto" split inside, "absorb" gathering every query; masked blocks over up to `gemm_keys`
    keys attend with GEMMs, later ones with the fused kernel): each row equals the row run alone."""
    from deepseek_model import attention  # noqa: PLC0415

    monkeypatch.setattr(attention, "GEMM_ATTENTION_MAX_KEYS", gemm_keys)
    model = dsm.from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16", attn=attn)
    monkeypatch.setattr(attention, "GATHER_PENALTY", 1.0)
    monkeypatch.setattr(attention, "SPARSE_PREFILL_CHUNK", 3)
    lens = torch.tensor([17, 11])
    t = int(lens.max())
    monkeypatch.setattr(attention, "INDEX_SCORE_BYTES", 4 * len(lens) * t * 2)  # 2 queries a block
    split = model.layers[0].attn._gather_split(t, t, TOPK)
    assert split == 0 if attn == "absorb" else 0 < split < t
    ids = torch.randint(2, 512, (len(lens), t), generator=torch.Generator().manual_seed(7))
    pad = t - lens  # (B,)
    valid = torch.arange(t)[None, :] >= pad[:, None]  # (B, T) left padding
    positions = (torch.arange(t)[None, :] - pad[:, None]).clamp_min(0)  # (B, T)
    with torch.no_grad():
        batch = model.hidden(ids, 0, model.new_cache(), positions=positions, valid=valid)
        for b, p in enumerate(pad.tolist()):
            alone = model.hidden(ids[b:b + 1, p:], 0, model.new_cache())[0]
            assert (batch[b, p:] - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_fp8_index_keys_stay_close_to_exact(model):
    """FP8 index keys/queries (Hadamard-rotated, one scale per row) move the index scores by a few
    percent of their range and keep ~all of the exact selection; the cache then holds e4m3 keys."""
    t = 64
    ids = torch.randint(0, 512, (2, t), generator=torch.Generator().manual_seed(3))
    rotary = rotary_table(model.inv_freq, 0, t, model.rope_magnitude)
    mask = torch.full((t, t), float("-inf")).triu_(1)
    layer = model.layers[0]
    ix = layer.attn.indexer
    with torch.no_grad():
        h = layer.attn_norm(model.embed(ids))
        q, w = ix.queries(layer.attn.q_norm(layer.attn.wq_a(h)), h, rotary)
        keys = ix.keys(h, rotary)
        exact = ix.scores(q, w, keys, None, mask)
        fp8 = ix.scores(q, w, *ix.quantize(keys), mask)
    seen = exact.isfinite()
    assert torch.equal(seen, fp8.isfinite())
    assert (fp8 - exact)[seen].abs().max() / exact[seen].abs().max() < 0.08  # measured 0.045
    a, b = ix.select(exact)[:, TOPK:], ix.select(fp8)[:, TOPK:]  # (B, T', K) queries with a real choice
    overlap = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a.flatten(0, 1), b.flatten(0, 1)))
    assert overlap / a.numel() >= 0.9  # measured 0.95
    with torch.no_grad():
        cache = model.new_cache(index_fp8=True)
        assert model(ids[:, :20], 0, cache).isfinite().all()
    held = cache.layers[1].index
    assert held.keys.dtype == torch.float8_e4m3fn and held.scale.shape == held.keys.shape[:2]
    assert cache.layers[1].kv.dtype == torch.float32  # only the index keys are FP8
    assert model.new_cache(fp8=True).layers[0].index.fp8
    assert not model.new_cache(fp8=True, index_fp8=False).layers[0].index.fp8


@pytest.mark.parametrize("index_fp8", [False, True])
def test_speculative_greedy_equals_plain_on_v32(model, index_fp8):
    prompts = [[3, 17, 42, 7, 99, 5, 8], [5, 11]]
    kw = dict(max_new_tokens=16, eos=[], cache_fp8=index_fp8)
    plain = dsm.generate(model, prompts, **kw)
    spec = dsm.generate(model, prompts, speculative="mtp", **kw)
    assert spec.tokens == plain.tokens
    assert spec.stats.drafted > 0


def test_batch_invariant_rows_alone_equal_rows_in_a_padded_batch(tiny_v32):
    model = dsm.from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16", batch_invariant=True)
    prompts = [[3, 17, 42, 7, 99, 5, 8, 9, 10], [5, 11, 12]]
    batch = dsm.generate(model, prompts, max_new_tokens=8, eos=[])
    for i, p in enumerate(prompts):
        assert dsm.generate(model, [p], max_new_tokens=8, eos=[]).tokens[0] == batch.tokens[i]


def test_a_cache_without_index_keys_is_refused(model, ids):
    cache = model.new_cache()
    cache.layers[0].index = None
    with pytest.raises(ValueError, match="its cache holds no index keys"):
        model(ids, 0, cache)


def test_loader_names_a_missing_or_extra_indexer_tensor(tiny_v32, tmp_path):
    from deepseek_model.checkpoint.reader import CheckpointReader  # noqa: PLC0415
    from deepseek_model.checkpoint.writer import write_checkpoint  # noqa: PLC0415

    reader = CheckpointReader(tiny_v32)
    cfg = reader.config()
    tensors = {n: reader.get(n) for n in reader.names()}
    missing = dict(tensors)
    del missing["model.layers.2.self_attn.indexer.k_norm.bias"]
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.indexer\.k_norm\.bias"):
        dsm.from_pretrained(write_checkpoint(str(tmp_path / "missing"), missing, cfg))
    as_v3 = dict(cfg, model_type="deepseek_v3")  # a V3 config cannot hold indexer tensors
    with pytest.raises(ValueError, match=r"indexer"):
        dsm.from_pretrained(write_checkpoint(str(tmp_path / "extra"), tensors, as_v3))


def test_selection_breaks_boundary_ties_toward_the_later_token(model):
    ix = model.layers[0].attn.indexer  # index_topk = 5
    inf = float("-inf")
    scores = torch.tensor([[[3.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0, inf],  # three zeros compete for 2 slots
                            [0.5, 4.0, -1.0, 3.0, 2.0, 1.0, -2.0, inf, inf],  # no tie: plain top-5
                            [1.0, -0.0, 0.0, inf, inf, inf, inf, inf, inf]]])  # 3 visible: the rest -1
    got = ix.select(scores, ordered=True)[0].tolist()
    assert got[0] == [0, 2, 4, 6, 7]  # the tied zeros at 1, 3, 5, 6, 7: the two latest win
    assert got[1] == [0, 1, 3, 4, 5]
    assert got[2] == [-1, -1, 0, 1, 2]
    assert ix.select(scores[:, 1:2])[0, 0].sort().values.tolist() == [0, 1, 3, 4, 5]  # unordered: same set


def test_long_prefill_scores_in_causal_query_blocks(model, ids, monkeypatch):
    """Index scores of a long prefill go in query blocks over the keys up to each block's end:
    the same selection, so the same logits as one block."""
    from deepseek_model import attention  # noqa: PLC0415

    with torch.no_grad():
        whole = model(ids)
        monkeypatch.setattr(attention, "INDEX_SCORE_BYTES", 4 * ids.shape[0] * ids.shape[1] * 3)  # 3 queries a block
        blocks = model(ids)
    assert (blocks - whole).abs().max() <= 1e-6 * whole.abs().max()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
@pytest.mark.parametrize("index_fp8", [False, True])
def test_triton_backend_runs_the_dsa_kernels_and_matches_torch(tiny_v32, monkeypatch, index_fp8):
    """backend="triton": the indexer scores with ops.index_logits and decode steps attend with
    ops.sparse_mla_decode (both Triton); cached greedy decoding past index_topk matches torch."""
    pytest.importorskip("triton")
    from deepseek_model.kernels import ops  # noqa: PLC0415

    calls = []
    for name in ("index_logits", "sparse_mla_decode"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(
            (_name, ops.resolve_backend(k["backend"]))) or _real(*a, **k))
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(4))
    out = {}
    for backend in ("torch", "triton"):
        model = dsm.from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16", backend=backend, mtp=False)
        cache, steps = model.new_cache(index_fp8=index_fp8), []
        with torch.no_grad():
            logits = model(ids, 0, cache)  # 7 > index_topk 5: the prefill selects too
            steps.append(logits)
            for pos in range(7, 10):
                logits = model(logits[:, -1:].argmax(-1), pos, cache)
                steps.append(logits)
        out[backend] = torch.cat(steps, 1)
    assert (out["torch"] - out["triton"]).abs().max() <= 1e-4 * out["torch"].abs().max()
    assert {("index_logits", "triton"), ("sparse_mla_decode", "triton")} <= set(calls)


@pytest.mark.parametrize("attn", ["absorb", "naive", "auto"])
def test_sparse_forward_with_autograd_on_equals_no_grad(tiny_v32, ids, attn):
    """A forward outside torch.no_grad (parameters require grad) takes the same sparse paths, and
    gradients flow through the gathered latents."""
    model = dsm.from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16", attn=attn)
    assert ids.shape[1] > model.cfg.index_topk
    with torch.no_grad():
        want = model(ids)
        cache = model.new_cache()
        model(ids[:, :-1], 0, cache)
    got = model(ids)
    step = model(ids[:, -1:], ids.shape[1] - 1, cache)  # a cached sparse decode step, autograd on
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.detach()[:, 0], want[:, -1], rtol=1e-5, atol=1e-5)
    got.logsumexp(-1).mean().backward()
    wkv_a = model.layers[0].attn.wkv_a.weight
    assert wkv_a.grad is not None and bool(torch.isfinite(wkv_a.grad).all()) and wkv_a.grad.abs().sum() > 0
