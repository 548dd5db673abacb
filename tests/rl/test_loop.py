"""The GRPO loop on the arithmetic recipe's tiny MoE model: it trains, skips bad rewards, refuses long prompts."""

import json
import math

import pytest
import torch

from deepseek_model.recipes.arithmetic import (BOS, EOS, ArithmeticCorpus, CharTokenizer, Problem, Recipe,
                                               max_new_tokens, model_config, run_recipe, split_problems)
from deepseek_model.rl.loop import GRPOConfig, GRPOTrainer, check_prompts, pack, token_logprobs
from deepseek_model.training import build_model

TOK = CharTokenizer()


def ones_reward(completion, answer):
    """A reward that varies between random outputs: how many '1' characters they hold."""
    return float(completion.count("1"))


@pytest.fixture
def model():
    return build_model(model_config(), seed=0)


def prompts(n=2):
    return [[BOS, *TOK.encode(Problem(12 + i, 30 + i).prompt)] for i in range(n)], [str(42 + 2 * i) for i in range(n)]


def test_tokenizer_round_trip_and_example():
    p = Problem(47, 38)
    text = p.prompt + p.solution(2)
    assert text == "47+38=<think>7+8=15 4+3+1=8</think><answer>85</answer>"
    ids = TOK.encode(text)
    assert len(ids) == 6 + 1 + 14 + 1 + 1 + 2 + 1
    assert TOK.decode([BOS, *ids, EOS]) == text
    assert Problem(5, 7).solution(2) == "<think>5+7=12 0+0+1=1</think><answer>12</answer>"
    with pytest.raises(ValueError, match="character 'x' is not in the arithmetic alphabet"):
        TOK.encode("1x2")


def test_corpus_mixes_worked_and_direct_examples():
    corpus = ArithmeticCorpus([Problem(47, 38), Problem(5, 7)], TOK, 2, reasoning_fraction=0.5)
    batch = corpus.sample(8, 64, torch.Generator().manual_seed(0))
    assert batch.ids.shape == (8, 64) and batch.doc_ids.shape == (8, 64)
    assert (batch.ids[:, 0] == BOS).all() and (batch.doc_ids[:, 0] == 0).all()
    docs = []
    for row, doc in zip(batch.ids.tolist(), batch.doc_ids.tolist()):
        for d in sorted(set(doc))[:-1]:  # complete documents (the last one may be cut)
            docs.append(TOK.decode([t for t, k in zip(row, doc) if k == d]))
    allowed = {"47+38=<think>7+8=15 4+3+1=8</think><answer>85</answer>", "47+38=<think></think><answer>85</answer>",
               "5+7=<think>5+7=12 0+0+1=1</think><answer>12</answer>", "5+7=<think></think><answer>12</answer>"}
    assert set(docs) == allowed  # 16+ documents: both problems in both styles


def test_split_is_disjoint():
    train, held = split_problems(2, 300, seed=0)
    assert len(train) == 9700 and len(held) == 300
    assert not set(train) & set(held)


def test_token_logprobs_match_one_row_at_a_time(model):
    model.eval()
    rows = [[BOS, 5, 6, 7], [BOS, 8]]
    outs = [[9, 10], [11, 12, 13, EOS]]
    ids, index, mask = pack(rows, outs)
    assert ids.shape == (2, 6) and index.shape == (2, 4) and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    with torch.no_grad():
        got = token_logprobs(model, ids, index)
        for i, (p, o) in enumerate(zip(rows, outs)):
            full = torch.tensor([p + o])
            logp = torch.log_softmax(model(full).float()[0], dim=-1)  # (L, V)
            want = torch.stack([logp[len(p) + j - 1, o[j]] for j in range(len(o))])
            torch.testing.assert_close(got[i, : len(o)], want, rtol=1e-5, atol=1e-5)


def test_grpo_steps_change_the_policy_not_the_reference(model):
    cfg = GRPOConfig(group_size=4, max_new_tokens=12, inner_steps=2, lr=1e-3, gamma=1e-2)
    trainer = GRPOTrainer(model, ones_reward, TOK.decode, EOS, cfg, metrics={"ones": ones_reward})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.ref.state_dict().items()}
    ps, ans = prompts(2)
    recs = [trainer.step(ps, ans, s, seed=1) for s in range(3)]
    for r in recs:
        assert "skipped" not in r
        assert 1.0 <= r["response_length"] <= 12.0
        assert r["reward"] == r["ones"]
        assert 0.0 <= r["clip_fraction"] <= 1.0
    assert recs[0]["kl"] == 0.0  # old = reference = policy before the first update
    assert recs[0]["kl_last"] > 0.0  # the second inner step sees the updated policy
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert any(".experts." in k for k in changed) and any("attn" in k for k in changed)
    assert any(k.endswith("gate.bias") for k in changed)  # routing-bias updates stay on
    for k, v in trainer.ref.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    bias = model.layers[1].ffn.gate.bias
    assert torch.allclose(bias / 1e-2, (bias / 1e-2).round(), atol=1e-4)  # whole ±γ steps
    assert 0.01 - 1e-6 <= bias.abs().max().item() <= 0.06 + 1e-6  # 6 updates of at most γ each
    assert model.mtp.block.ffn.gate.bias.abs().max().item() == 0.0  # the MTP block is not run by GRPO


@pytest.mark.parametrize("bad, needle", [
    (lambda c, a: 1 / 0, "reward function raised ZeroDivisionError"),
    (lambda c, a: math.nan, "reward function returned nan"),
])
def test_failing_reward_skips_the_step(model, bad, needle):
    trainer = GRPOTrainer(model, bad, TOK.decode, EOS, GRPOConfig(group_size=2, max_new_tokens=6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ps, ans = prompts(2)
    rec = trainer.step(ps, ans, 0)
    assert rec["step"] == 0 and needle in rec["skipped"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert trainer.opt.state == {}  # the optimizer never stepped


def test_prompt_longer_than_context_refused(model):
    trainer = GRPOTrainer(model, ones_reward, TOK.decode, EOS, GRPOConfig(group_size=2, max_new_tokens=10))
    long_prompt = [BOS] + [TOK.ids["1"]] * 59
    with pytest.raises(ValueError, match=r"prompts: a prompt of 60 tokens \+ 10 new tokens is longer than the "
                                         r"context \(64 tokens\)"):
        trainer.step([long_prompt], ["1"], 0)
    with pytest.raises(ValueError, match="prompts: empty batch"):
        check_prompts(model, [], 4)


def test_config_refusals():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1).validate()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GRPOConfig(temperature=0.0).validate()
    with pytest.raises(ValueError, match="control must be one of"):
        GRPOConfig(control="random").validate()


def tiny_recipe(**kw):
    base = {"held_out": 16, "pretrain_steps": 3, "pretrain_batch": 4, "grpo_steps": 3, "prompts_per_step": 2,
            "group_size": 2, "eval_every": 1, "save_every": 1}
    return Recipe(**{**base, **kw})


def test_recipe_runs_and_resumes_exactly(tmp_path):
    quiet = {"quiet": True, "say": lambda s: None}
    full = run_recipe(str(tmp_path / "full"), tiny_recipe(), **quiet)
    assert full["completed"] is True and len(full["history"]) == 3 and len(full["evals"]) == 4
    assert json.loads((tmp_path / "full" / "rl_log.json").read_text())["pass_at_1_after"] == full["pass_at_1_after"]
    part = run_recipe(str(tmp_path / "part"), tiny_recipe(), minutes=1e-9, **quiet)  # stops after one step
    assert part["completed"] is False and part["phase"] == "pretrain" and part["step"] == 1
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        run_recipe(str(tmp_path / "part"), tiny_recipe(), **quiet)
    with pytest.raises(ValueError, match="saved with different recipe settings"):
        run_recipe(str(tmp_path / "part"), tiny_recipe(seed=1), resume=True, **quiet)
    done = run_recipe(str(tmp_path / "part"), tiny_recipe(), resume=True, **quiet)
    assert done["completed"] is True
    assert done["pretrain_history"] == full["pretrain_history"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in done["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full["history"]]
    assert done["evals"] == full["evals"]


def test_control_shuffles_rewards(tmp_path):
    log = run_recipe(str(tmp_path / "c"), tiny_recipe(control="shuffled", pretrain_steps=0), quiet=True,
                     say=lambda s: None)
    assert log["recipe"]["control"] == "shuffled" and log["completed"] is True


def test_recipe_refusals(tmp_path):
    with pytest.raises(ValueError, match="--minutes must be a positive number, got 0"):
        run_recipe(str(tmp_path / "x"), tiny_recipe(), minutes=0)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        run_recipe(str(tmp_path / "x"), tiny_recipe(group_size=1))
    assert max_new_tokens(2) == 27
