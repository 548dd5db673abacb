"""generate(): batched unequal prompts equal each prompt alone, sampling reproducibility, EOS, errors."""

import pytest
import torch

import deepseek_model as dsm

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400]]
NO_EOS: list[int] = []
FP8_CACHE_REL_TOL = 0.3  # e4m3 keeps 3 mantissa bits; random tiny weights amplify it (measured ~0.15)


def test_batched_unequal_prompts_equal_alone(model):
    batched = dsm.generate(model, PROMPTS, max_new_tokens=12, eos=NO_EOS)
    for i, p in enumerate(PROMPTS):
        alone = dsm.generate(model, [p], max_new_tokens=12, eos=NO_EOS)
        assert batched.tokens[i] == alone.tokens[0], i
    assert batched.finish_reasons == ["length"] * 3
    assert batched.stats.tokens_per_forward == 1.0 and batched.stats.new_tokens == 36


def test_padded_logits_equal_alone(model):
    """Left padding + per-row positions + key-validity mask: each row's logits equal its own forward,
    in the prefill and in a cached decode step."""
    a, b = [7, 8, 9, 10, 11], [20, 21]
    ids = torch.tensor([a, [0, 0, 0] + b])  # (2, 5) left-padded
    slots = torch.arange(5)
    pad = torch.tensor([0, 3])
    positions = (slots - pad[:, None]).clamp_min(0)
    valid = slots >= pad[:, None]
    with torch.no_grad():
        cache = model.new_cache()
        got = model(ids, 0, cache, positions=positions, valid=valid)
        step = model(torch.tensor([[1], [2]]), 5, cache, positions=(5 - pad)[:, None],
                     valid=torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1))
        ref_a = model(torch.tensor([a + [1]]))
        ref_b = model(torch.tensor([b + [2]]))
    torch.testing.assert_close(got[0], ref_a[0, :5], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], ref_b[0, :2], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[0, 0], ref_a[0, 5], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[1, 0], ref_b[0, 2], rtol=0, atol=1e-5)


def test_greedy_equals_full_recompute(model):
    out = dsm.generate(model, [PROMPTS[0]], max_new_tokens=8, eos=NO_EOS).tokens[0]
    seq = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == seq[0, len(PROMPTS[0]):].tolist()


def test_eos_stops_each_sequence(model):
    free = dsm.generate(model, PROMPTS, max_new_tokens=10, eos=NO_EOS)
    stop = free.tokens[1][2]  # prompt 1 stops at its third token; the others continue or stop on it too
    res = dsm.generate(model, PROMPTS, max_new_tokens=10, eos=stop)
    for i, toks in enumerate(free.tokens):
        cut = toks[: toks.index(stop) + 1] if stop in toks else toks
        assert res.tokens[i] == cut, i
        assert res.finish_reasons[i] == ("eos" if stop in toks else "length")
    assert res.tokens[1][-1] == stop and len(res.tokens[1]) <= 3
    alone = dsm.generate(model, [PROMPTS[0]], max_new_tokens=10, eos=stop)
    assert alone.tokens[0] == res.tokens[0]


def test_config_eos_is_the_default(model):
    assert model.cfg.eos_token_id == 1
    res = dsm.generate(model, [PROMPTS[0]], max_new_tokens=10)  # eos from config: id 1
    toks = res.tokens[0]
    assert 1 not in toks[:-1] and (toks[-1] == 1) == (res.finish_reasons[0] == "eos")


def test_sampling_reproducible_with_seed(model):
    kw = dict(max_new_tokens=16, eos=NO_EOS, temperature=0.9, top_p=0.9, top_k=40)
    a = dsm.generate(model, PROMPTS, seed=7, **kw)
    b = dsm.generate(model, PROMPTS, seed=7, **kw)
    c = dsm.generate(model, PROMPTS, seed=8, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    # row i samples from its own generator (seed + i): prompt 2 alone with seed 9 gives the same tokens
    alone = dsm.generate(model, [PROMPTS[2]], seed=9, **kw)
    assert alone.tokens[0] == a.tokens[2]


def test_top_k_one_is_greedy(model):
    greedy = dsm.generate(model, PROMPTS, max_new_tokens=8, eos=NO_EOS)
    topk1 = dsm.generate(model, PROMPTS, max_new_tokens=8, eos=NO_EOS, temperature=1.5, top_k=1)
    assert greedy.tokens == topk1.tokens


def test_fp8_cache_logit_error(model):
    """fp8 latents (per-token scale) vs the fp32 cache: bounded logit error, ~2.5x fewer bytes here."""
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_cache, fp8_cache = model.new_cache(), model.new_cache(fp8=True)
        ref = model(ids[:, :16], 0, ref_cache)
        got = model(ids[:, :16], 0, fp8_cache)
        for p in range(16, 24):
            ref = model(ids[:, p:p + 1], p, ref_cache)
            got = model(ids[:, p:p + 1], p, fp8_cache)
    err = (got - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    cfg = model.cfg
    print(f"fp8 latent cache vs fp32 cache: max abs logit error {err:.3g} (relative {rel:.3g}); "
          f"cache bytes {fp8_cache.nbytes()} vs {ref_cache.nbytes()}")
    assert rel < FP8_CACHE_REL_TOL
    per_tok_fp8 = (cfg.kv_lora_rank * 1 + 4 + cfg.qk_rope_head_dim * 4) * cfg.num_hidden_layers  # the MTP cache stays empty
    assert fp8_cache.nbytes() == fp8_cache.layers[0].capacity * 2 * per_tok_fp8


@pytest.mark.parametrize("kwargs, needle", [
    (dict(prompts=[[7] * 1100]), "longer than max_seq_len"),
    (dict(prompts=[[7] * 1000], max_new_tokens=100), "exceed max_seq_len"),
    (dict(prompts=[[1, 2, 512]]), "outside [0, vocab_size=512)"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 2]], max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompts=[[1, 2]], temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(prompts=[[1, 2]], temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(prompts=[[1, 2]], top_p=float("nan")), "top_p must be in"),
    (dict(prompts=[[1, 2]], top_p=0.0), "top_p must be in (0, 1]"),
    (dict(prompts=[[1, 2]], speculative="medusa"), "speculative must be one of"),
    (dict(prompts=[[1, 2.5]]), "token id 2.5 in prompt 0 is not an integer"),
    (dict(prompts=[[1, True]]), "token id True in prompt 0 is not an integer"),
    (dict(prompts=[[1, 2]], max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
    (dict(prompts=[[1, 2]], top_k=None), "top_k must be an integer, got None"),
    (dict(prompts=[[1, 2]], top_k=1.5), "top_k must be an integer, got 1.5"),
    (dict(prompts=[[1, 2]], temperature=None), "temperature must be a number, got None"),
    (dict(prompts=[[1, 2]], top_p="0.9"), "top_p must be a number, got '0.9'"),
    (dict(prompts=[[1, 2]], seed=None), "seed must be an integer, got None"),
    (dict(prompts=[[1, 2], [3]], seed=2**64 - 1), "seed must be in [-9223372036854775808, 18446744073709551614] for 2"),
    (dict(prompts=[[1, 2]], seed=-(2**63) - 1), "seed must be in"),
    (dict(prompts=[[1, 2]], eos="a"), "eos must be a token id, a list of them, [] or None, got 'a'"),
    (dict(prompts=[[1, 2]], eos=1.5), "eos must be a token id"),
    (dict(prompts=[[1, 2]], eos=[1, "x"]), "eos must be an integer, got 'x'"),
    (dict(prompts=[[1, 2]], cache_fp8="no"), "cache_fp8 must be True or False, got 'no'"),
    (dict(prompts=[[1, 2]], step_fn=5), "step_fn must be callable like the model, got 5"),
])
def test_one_line_errors(model, kwargs, needle):
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError) as e:
        dsm.generate(model, **kwargs)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_auto_attention_mode(tiny_ckpt, model):
    """attn="auto" (naive math for the prefill chunk, absorbed decode, same latent cache) gives the
    same logits and tokens as the absorbed model, including the ragged-batch path."""
    auto = dsm.from_pretrained(tiny_ckpt, dtype=torch.float32, attn="auto")
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(auto(ids), model(ids), rtol=0, atol=1e-5)
    a = dsm.generate(auto, PROMPTS, max_new_tokens=10, eos=NO_EOS)
    b = dsm.generate(model, PROMPTS, max_new_tokens=10, eos=NO_EOS)
    assert a.tokens == b.tokens


def test_writing_past_the_cached_positions_is_refused(model):
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8, 9]]), 0, cache)
        model(torch.tensor([[10]]), 5, cache)  # the next position: fine
        model(torch.tensor([[11]]), 3, cache)  # an earlier one overwrites (a rollback): fine
        with pytest.raises(ValueError, match=r"start_pos 6 is past the 4 cached positions"):
            model(torch.tensor([[12]]), 6, cache)  # slots 4..5 no longer hold this sequence


def test_numpy_integer_token_ids_and_seed(model):
    """numpy integers are token ids like Python ints (their message used to call an id in range outside it)."""
    np = pytest.importorskip("numpy")
    want = dsm.generate(model, [[3, 4, 5]], max_new_tokens=3, temperature=0.8, seed=5).tokens
    got = dsm.generate(model, [[np.int64(3), np.int32(4), 5]], max_new_tokens=np.int64(3), temperature=0.8,
                       seed=np.int64(5)).tokens
    assert got == want


@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_argmax(model, temperature):
    """logits / temperature overflows float32 for a tiny temperature: sampling then takes the gaps to
    the row's maximum, whose softmax is the argmax (as temperature -> 0), instead of NaN probabilities."""
    prompts = [[5, 6, 7], [9]]
    greedy = dsm.generate(model, prompts, max_new_tokens=5, eos=[]).tokens
    assert dsm.generate(model, prompts, max_new_tokens=5, eos=[], temperature=temperature, seed=1).tokens == greedy
    assert dsm.generate(model, prompts[:1], max_new_tokens=5, eos=[], temperature=temperature,
                        speculative="mtp").tokens == greedy[:1]
