"""MTP logits against an independent fp64 computation built from transformers' decoder block."""

import json
import os

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.checkpoint.reader import CheckpointReader

transformers = pytest.importorskip("transformers")


def read_hf_tensors(ckpt, prefix):
    """{name without prefix: tensor} for every checkpoint tensor under `prefix`."""
    with CheckpointReader(ckpt) as r:
        return {n[len(prefix):]: r.get(n) for n in r.names() if n.startswith(prefix)}


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mtp_reference(ckpt, ids, embedding_first=True):
    """fp64: h from transformers' main model (after model.norm), then eh_proj(cat[enorm(e), hnorm(h)]),
    then the MTP decoder block run as a one-layer transformers model whose final norm and head are
    shared_head.norm / shared_head.head."""
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    n, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    main = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    t = read_hf_tensors(ckpt, prefix=f"model.layers.{n}.")
    with torch.no_grad():
        h = main.model(ids).last_hidden_state[:, :-1]  # (B, T-1, H), after model.norm
        e = t["embed_tokens.weight"].double()[ids[:, 1:]]  # (B, T-1, H)
        en, hn = _rms(e, t["enorm.weight"].double(), eps), _rms(h, t["hnorm.weight"].double(), eps)
        cat = torch.cat([en, hn] if embedding_first else [hn, en], -1)
        x = cat @ t["eh_proj.weight"].double().T
    one = dict(cfg, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
    one.pop("quantization_config", None)
    block_model = transformers.DeepseekV3ForCausalLM._from_config(
        transformers.DeepseekV3Config(**one), experts_implementation="eager").double().eval()
    state = {}
    for k, v in t.items():
        if k.startswith(("self_attn.", "mlp.", "input_layernorm", "post_attention_layernorm")):
            state[f"model.layers.0.{k}"] = v
    state["model.norm.weight"] = t["shared_head.norm.weight"]
    state["lm_head.weight"] = t["shared_head.head.weight"]
    state["model.embed_tokens.weight"] = t["embed_tokens.weight"]
    fused = {}
    for k in list(state):  # transformers 5 holds routed experts fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        if ".mlp.experts." in k:
            fused[k] = state.pop(k)
    e_count = cfg["n_routed_experts"]
    state["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack([
        torch.cat([fused[f"model.layers.0.mlp.experts.{i}.gate_proj.weight"],
                   fused[f"model.layers.0.mlp.experts.{i}.up_proj.weight"]]) for i in range(e_count)])
    state["model.layers.0.mlp.experts.down_proj"] = torch.stack(
        [fused[f"model.layers.0.mlp.experts.{i}.down_proj.weight"] for i in range(e_count)])
    missing, unexpected = block_model.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        return block_model(inputs_embeds=x).logits


@pytest.mark.parametrize("attn", ["absorb", "naive"])
def test_mtp_logits_match_independent_fp64(tiny_bf16, attn):
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(3))
    model = dsm.from_pretrained(tiny_bf16, dtype=torch.float32, attn=attn)
    with torch.no_grad():
        ours = model.mtp_logits(ids)
    ref = _mtp_reference(tiny_bf16, ids)
    assert ours.shape == (2, 10, 512)
    diff = (ours.double() - ref).abs().max().item()
    print(f"MTP max diff vs fp64 reference {diff:.3g} (scale {ref.abs().max().item():.3g})")
    assert diff <= 1e-4
    # the concat order matters: the paper's order (hidden first) gives different logits
    swapped = _mtp_reference(tiny_bf16, ids, embedding_first=False)
    assert (ours.double() - swapped).abs().max().item() > 1e-2


def test_mtp_step_with_cache_equals_mtp_logits(tiny_bf16):
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    model = dsm.from_pretrained(tiny_bf16, dtype=torch.float32)
    with torch.no_grad():
        want = model.mtp_logits(ids)
        cache = model.new_cache()
        h = model.hidden(ids, 0, cache)
        got = torch.cat([model.mtp_step(h[:, :5], ids[:, 1:6], 0, cache),
                         model.mtp_step(h[:, 5:8], ids[:, 6:9], 5, cache)], 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_mtp_optional(tiny_bf16):
    model = dsm.from_pretrained(tiny_bf16, mtp=False)
    assert model.mtp is None
    with pytest.raises(ValueError, match="no MTP"):
        model.mtp_logits(torch.zeros(1, 3, dtype=torch.long))


def test_mtp_logits_of_one_token_are_empty(tiny_bf16):
    """One token leaves nothing to predict two ahead: (B, 0, V) logits, and an empty routing record."""
    model = dsm.from_pretrained(tiny_bf16, dtype=torch.float32)
    ids = torch.tensor([[5], [7]])
    with torch.no_grad():
        assert model.mtp_logits(ids).shape == (2, 0, 512)
        out = model(ids, outputs={"mtp_logits", "router"})
        longer = model(torch.tensor([[5, 6], [7, 8]]), outputs={"mtp_logits", "router"})
    assert out.mtp_logits.shape == (2, 0, 512) and out.logits.shape == (2, 1, 512)
    assert len(out.router) == len(longer.router)  # the MTP block's record is there, for no tokens
    assert out.router[-1].layer == "mtp.block.ffn" and out.router[-1].indices.shape == (2, 0, 4)
