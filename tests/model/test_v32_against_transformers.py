"""DeepSeek-V3.2 (sparse attention) against transformers' DeepseekV32ForCausalLM on the same weights.

The checkpoints are built here with transformers from a seeded random init (odd sizes; index_topk
far below the sequence length so the selection decides the output) and saved with
`save_pretrained` in bf16 storage; both sides then run them in float32.
"""

import json
import os
import shutil

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.testing import write_dense_twin

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV32ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV32ForCausalLM", allow_module_level=True)

TOL = 1e-4  # max |logit diff| relative to the largest logit, float32
TOPK = 6
SEQ = 19


def _v32_config(index_topk: int = TOPK):
    return transformers.DeepseekV32Config(
        vocab_size=384, hidden_size=96, intermediate_size=160, moe_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=40, q_lora_rank=56, qk_rope_head_dim=8, v_head_dim=20,
        qk_nope_head_dim=12, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=256, index_topk=index_topk, index_head_dim=24, index_n_heads=5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        initializer_range=0.1, eos_token_id=None)


@pytest.fixture(scope="module")
def v32_bf16(tmp_path_factory) -> str:
    """A seeded random DeepseekV32ForCausalLM saved by transformers in bf16."""
    torch.manual_seed(0)
    model = transformers.DeepseekV32ForCausalLM(_v32_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                p.uniform_(-0.2, 0.2)
            elif "norm" in name:  # norms and the indexer's LayerNorm bias: away from their init
                p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("v32") / "bf16")
    model.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 384, (2, SEQ), generator=torch.Generator().manual_seed(7))


def _theirs(path):
    return transformers.DeepseekV32ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _with_config(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        d = json.load(f)
    d.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(d, f)
    return dst


@pytest.fixture(scope="module")
def reference_logits(v32_bf16, ids):
    with torch.no_grad():
        return _theirs(v32_bf16)(ids).logits.float()


@pytest.mark.parametrize("attn", ["absorb", "naive"])
def test_prefill_logits_match_transformers(v32_bf16, ids, reference_logits, attn):
    ours = dsm.from_pretrained(v32_bf16, dtype=torch.float32, attn=attn)
    assert ours.cfg.has_indexer and ours.cfg.index_topk == TOPK < SEQ
    assert ours.cfg.scoring_func == "sigmoid" and ours.cfg.topk_method == "noaux_tc"  # the v32 defaults
    assert ours.layers[0].attn.indexer.weights_proj.weight.dtype == torch.float32
    with torch.no_grad():
        logits = ours(ids)
    assert _logit_diff(logits, reference_logits) <= TOL
    assert torch.equal(logits.argmax(-1), reference_logits.argmax(-1))


def test_topk_decides_the_logits_and_covering_topk_is_v3(v32_bf16, ids, reference_logits, tmp_path):
    """index_topk really selects: changing it changes the logits; with index_topk >= the sequence
    the V3.2 model is exactly V3 on the same weights (indexer dropped)."""
    wide = _with_config(v32_bf16, str(tmp_path / "wide"), index_topk=SEQ)
    with torch.no_grad():
        dense = dsm.from_pretrained(wide, dtype=torch.float32)(ids)
        narrow = dsm.from_pretrained(_with_config(v32_bf16, str(tmp_path / "k3"), index_topk=3),
                                     dtype=torch.float32)(ids)
    assert _logit_diff(dense, reference_logits) > 100 * TOL  # the selection at topk=6 mattered
    assert _logit_diff(narrow, reference_logits) > 100 * TOL
    with torch.no_grad():
        theirs_wide = _theirs(wide)(ids).logits.float()
    assert _logit_diff(dense, theirs_wide) <= TOL

    # the same weights as a DeepSeek-V3 checkpoint: no indexer tensors, model_type deepseek_v3
    v3 = write_dense_twin(v32_bf16, str(tmp_path / "v3"))
    with torch.no_grad():
        as_v3 = dsm.from_pretrained(v3, dtype=torch.float32)(ids)
    assert torch.equal(dense, as_v3)


@pytest.mark.parametrize("attn", ["absorb", "naive"])
def test_cached_greedy_decoding_beyond_topk_matches_transformers(v32_bf16, attn):
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    new = 14  # 19 positions: well past index_topk = 6
    with torch.no_grad():
        ref = _theirs(v32_bf16).generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
    ours = dsm.from_pretrained(v32_bf16, dtype=torch.float32, attn=attn)
    cache, toks = ours.new_cache(), prompt
    with torch.no_grad():
        logits = ours(prompt, 0, cache)
        for pos in range(prompt.shape[1], prompt.shape[1] + new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks = torch.cat([toks, nxt], 1)
            logits = ours(nxt, pos, cache)
    assert toks.tolist() == ref.tolist()
    assert cache.layers[0].index.length == prompt.shape[1] + new


def test_fp8_layout_matches_transformers_on_the_dequantized_weights(v32_bf16, ids, tmp_path):
    """The published FP8 layout (indexer wq_b/wk quantized, weights_proj and k_norm not), made by our
    converter, loaded by us dequantized, against transformers on our fp8→bf16 conversion of it."""
    from deepseek_model.convert.fp8 import bf16_to_fp8, fp8_to_bf16

    fp8 = str(tmp_path / "fp8")
    bf16_to_fp8(v32_bf16, fp8, scale_fmt="ue8m0", quiet=True)
    reader = CheckpointReader(fp8)
    layer = "model.layers.1.self_attn.indexer."
    assert reader.dtype(layer + "wq_b.weight") == torch.float8_e4m3fn
    assert reader.dtype(layer + "wk.weight") == torch.float8_e4m3fn
    assert layer + "wk.weight_scale_inv" in reader
    source = CheckpointReader(v32_bf16)
    for name in ("weights_proj.weight", "k_norm.weight", "k_norm.bias"):  # copied as they were
        assert reader.dtype(layer + name) == source.dtype(layer + name) != torch.float8_e4m3fn
        assert layer + name + "_scale_inv" not in reader
    back = str(tmp_path / "back")
    fp8_to_bf16(fp8, back, quiet=True)
    ours = dsm.from_pretrained(fp8, dtype=torch.float32, weights="bf16")
    with torch.no_grad():
        assert _logit_diff(ours(ids), _theirs(back)(ids).logits.float()) <= TOL
