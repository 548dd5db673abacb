"""The W8A8 model path: fp8 weights through ops (act_quant + fp8_gemm, fused MoE), torch vs Triton."""

import os

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.config import builtin_config_dict
from deepseek_model.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def fp8_block_aligned(tmp_path_factory):
    """Tiny fp8 checkpoint whose expert width (128) lets gate‖up stack on 128-row blocks."""
    d = builtin_config_dict("tiny")
    d["moe_intermediate_size"] = 128
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fp8_128"), d, fp8=True, seed=4)


def test_fused_moe_equals_per_expert_loop(fp8_block_aligned):
    model = dsm.from_pretrained(fp8_block_aligned, dtype=torch.float32, weights="w8a8")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(ids)
        assert model.layers[1].ffn._stacked is not None  # the grouped path ran
        for moe in (model.layers[1].ffn, model.layers[2].ffn, model.mtp.block.ffn):
            moe._fused_experts = lambda: None  # force the per-expert loop
        loop = model(ids)
    assert torch.equal(fused, loop)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
def test_triton_backend_matches_torch_backend(fp8_block_aligned):
    pytest.importorskip("triton")
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = dsm.from_pretrained(fp8_block_aligned, dtype=torch.float32, weights="w8a8", backend="torch")
    tri = dsm.from_pretrained(fp8_block_aligned, dtype=torch.float32, weights="w8a8", backend="triton", mtp=False)
    dense = dsm.from_pretrained(fp8_block_aligned, dtype=torch.float32, weights="bf16", mtp=False)
    with torch.no_grad():
        a, b, d = ref(ids), tri(ids), dense(ids)
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    print(f"triton vs torch W8A8: max diff {diff:.3g} (logit scale {scale:.3g}); "
          f"W8A8 vs dequantized weights: {(a - d).abs().max().item():.3g}")
    assert diff <= 1e-3 * scale
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
def test_triton_decode_step_uses_mla_decode(tiny_bf16, monkeypatch):
    """backend="triton": one-token absorbed decode runs ops.mla_decode over the latent cache;
    cached greedy decoding matches the torch backend."""
    pytest.importorskip("triton")
    from deepseek_model.kernels import ops

    calls = []
    real = ops.mla_decode
    monkeypatch.setattr(ops, "mla_decode", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(2))
    out = {}
    for backend in ("torch", "triton"):
        model = dsm.from_pretrained(tiny_bf16, dtype=torch.float32, backend=backend, mtp=False)
        cache, steps = model.new_cache(), []
        with torch.no_grad():
            logits = model(ids, 0, cache)
            for pos in range(5, 8):
                nxt = logits[:, -1:].argmax(-1)
                logits = model(nxt, pos, cache)
                steps.append(logits)
        out[backend] = torch.cat(steps, 1)
    diff = (out["torch"] - out["triton"]).abs().max().item()
    print(f"decode with mla_decode (triton) vs torch: max diff {diff:.3g}")
    assert diff <= 1e-5
    assert calls and set(calls) == {"triton"}  # 3 decode steps x 3 layers, none on the torch backend
