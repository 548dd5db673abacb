"""MTP speculative decoding: greedy output identical to plain greedy, the accept path and rollback
exercised with an oracle drafter, honest acceptance statistics, seeded sampling reproducible."""

import torch

import deepseek_model as dsm

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
N_NEW = 64
NO_EOS: list[int] = []


def test_mtp_greedy_equals_plain_greedy(model):
    plain = dsm.generate(model, PROMPTS, max_new_tokens=N_NEW, eos=NO_EOS)
    spec = dsm.generate(model, PROMPTS, max_new_tokens=N_NEW, eos=NO_EOS, speculative="mtp")
    s = spec.stats
    print(f"MTP on random tiny weights: acceptance {s.acceptance_rate:.3f} ({s.accepted}/{s.drafted}), "
          f"{s.tokens_per_forward:.3f} tokens per main forward")
    assert spec.tokens == plain.tokens
    assert all(len(t) == N_NEW for t in spec.tokens)
    assert s.drafted > 0 and s.tokens_per_forward == s.new_tokens / s.token_forwards


class _OracleDrafts:
    """Wraps model.mtp_step: runs the real MTP block (its cache stays in use) but replaces the last
    row's logits with a one-hot on the true next-next token every other position, and a wrong one
    otherwise, so both the accept path and the rollback path run."""

    def __init__(self, model, full_sequence: list[int]):
        self.real, self.full = model.mtp_step, full_sequence

    def __call__(self, h, next_ids, start_pos, cache, **kw):
        logits = self.real(h, next_ids, start_pos, cache, **kw)
        target_pos = start_pos + h.shape[1] + 1  # the last row predicts this absolute position
        if target_pos < len(self.full):
            truth = self.full[target_pos]
            tok = truth if target_pos % 3 else (truth + 1) % logits.shape[-1]
            logits[:, -1] = -1e4
            logits[:, -1, tok] = 1e4
        return logits


def test_accept_and_rollback_paths_keep_greedy_output(model, monkeypatch):
    prompt = PROMPTS[0]
    plain = dsm.generate(model, [prompt], max_new_tokens=N_NEW, eos=NO_EOS).tokens[0]
    monkeypatch.setattr(model, "mtp_step", _OracleDrafts(model, prompt + plain))
    spec = dsm.generate(model, [prompt], max_new_tokens=N_NEW, eos=NO_EOS, speculative="mtp")
    s = spec.stats
    print(f"oracle drafter (2 of 3 right): acceptance {s.acceptance_rate:.3f}, {s.tokens_per_forward:.3f} tokens/forward")
    assert spec.tokens[0] == plain
    assert 0.4 < s.acceptance_rate < 0.9 and s.tokens_per_forward > 1.3
    assert s.main_forwards < N_NEW


def test_mtp_eos_stops(model):
    plain = dsm.generate(model, [PROMPTS[0]], max_new_tokens=20, eos=NO_EOS).tokens[0]
    stop = plain[5]
    spec = dsm.generate(model, [PROMPTS[0]], max_new_tokens=20, eos=stop, speculative="mtp")
    assert spec.tokens[0] == plain[: plain.index(stop) + 1] and spec.finish_reasons == ["eos"]


def test_mtp_sampling_reproducible(model):
    kw = dict(max_new_tokens=24, eos=NO_EOS, temperature=0.8, speculative="mtp")
    a = dsm.generate(model, PROMPTS, seed=3, **kw)
    b = dsm.generate(model, PROMPTS, seed=3, **kw)
    print(f"MTP sampling T=0.8: acceptance {a.stats.acceptance_rate:.3f}, {a.stats.tokens_per_forward:.3f} tokens/forward")
    assert a.tokens == b.tokens and all(len(t) == 24 for t in a.tokens)


def test_mtp_needs_mtp_module(tiny_ckpt):
    no_mtp = dsm.from_pretrained(tiny_ckpt, dtype=torch.float32, mtp=False)
    try:
        dsm.generate(no_mtp, [[1, 2]], max_new_tokens=2, speculative="mtp")
    except ValueError as e:
        assert "needs an MTP module: the checkpoint has none, or it was loaded with mtp=False" in str(e)
    else:
        raise AssertionError("expected ValueError")
