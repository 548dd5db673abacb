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


def test_fused_moe_equals_per_expert_sum(fp8_block_aligned):
    """The grouped W8A8 expert op equals Σ_k weight_k · expert_k(x) + shared(x), each expert run through
    its own W8A8 Linears (the published per-expert formulation), in ascending expert order."""
    model = dsm.from_pretrained(fp8_block_aligned, dtype=torch.float32, weights="w8a8")
    x = torch.randn(2, 9, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    for moe in (model.layers[1].ffn, model.layers[2].ffn, model.mtp.block.ffn):
        assert moe.experts[0].w1.weight.dtype == torch.float8_e4m3fn
        with torch.no_grad():
            fused = moe(x)  # (2, 9, H)
            flat = x.reshape(-1, x.shape[-1])  # (18, H)
            routing = moe.gate(flat)
            want = torch.zeros_like(flat)
            for n in range(flat.shape[0]):
                for e in sorted(routing.indices[n].tolist()):
                    k = routing.indices[n].tolist().index(e)
                    want[n] += moe.experts[e](flat[n:n + 1])[0] * routing.weights[n, k]
            want = want + moe.shared_experts(flat)
        torch.testing.assert_close(fused.reshape(-1, x.shape[-1]), want, rtol=1e-6, atol=1e-6)


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
