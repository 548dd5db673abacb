"""Logits for every position against transformers' DeepseekV3/V2ForCausalLM on the same weights (fp32)."""

import json
import os

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.writer import write_checkpoint

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _export_dense(model, cfg_dict, out_dir):
    """Our (dequantized) fp32 weights, under HF names, MTP dropped: a checkpoint transformers can read."""
    n_layers = model.cfg.num_hidden_layers
    tensors = {schema.internal_to_hf(k, n_layers): v.detach().clone()
               for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    d = dict(cfg_dict)
    d.pop("quantization_config", None)
    d["num_nextn_predict_layers"] = 0
    return write_checkpoint(out_dir, tensors, d, num_shards=2)


def _hf(cls, path):
    model = cls.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _compare(ours, theirs, ids):
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits.float()
    diff = (a - b).abs().max().item()
    print(f"max |logit diff| = {diff:.3g} (logit scale {b.abs().max().item():.3g})")
    assert a.shape == b.shape
    assert diff <= TOL
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    return a


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (3, 19), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("attn", ["absorb", "naive"])
def test_v3_bf16_checkpoint(tiny_bf16, ids, attn):
    ours = dsm.from_pretrained(tiny_bf16, dtype=torch.float32, attn=attn)
    theirs = _hf(transformers.DeepseekV3ForCausalLM, tiny_bf16)
    _compare(ours, theirs, ids)


def test_v3_fp8_checkpoint_dequantized_by_us(tiny_fp8, ids, tmp_path):
    ours = dsm.from_pretrained(tiny_fp8, dtype=torch.float32, weights="bf16")
    assert ours.layers[1].attn.wkv_a.weight.dtype == torch.float32
    with open(os.path.join(tiny_fp8, "config.json")) as f:
        cfg_dict = json.load(f)
    theirs = _hf(transformers.DeepseekV3ForCausalLM, _export_dense(ours, cfg_dict, tmp_path))
    _compare(ours, theirs, ids)


def test_v2_lite_style_checkpoint(tiny_v2, ids):
    ours = dsm.from_pretrained(tiny_v2, dtype=torch.float32)
    assert ours.cfg.q_lora_rank is None and ours.cfg.scoring_func == "softmax"
    theirs = _hf(transformers.DeepseekV2ForCausalLM, tiny_v2)
    _compare(ours, theirs, ids)


def test_greedy_generation_matches_transformers(tiny_bf16):
    ours = dsm.from_pretrained(tiny_bf16, dtype=torch.float32)
    theirs = _hf(transformers.DeepseekV3ForCausalLM, tiny_bf16)
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    ref = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    cache, toks = ours.new_cache(), prompt
    with torch.no_grad():
        logits = ours(prompt, 0, cache)
        pos = prompt.shape[1]
        for _ in range(12):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks = torch.cat([toks, nxt], 1)
            logits = ours(nxt, pos, cache)
            pos += 1
    assert toks.tolist() == ref.tolist()
