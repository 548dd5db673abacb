"""DeepSeek-V3.2 sparse attention kernels (Triton, interpreted) vs their torch twins vs fp64 loops.

Indexer logits: ragged key tiles, head counts and widths that are not powers of two, fp8 operands
with act_quant scales (all-zero rows included), float operands. Sparse MLA decode: -1 padding,
whole tiles and whole splits without a key, K not a multiple of the tile, K = 1, bf16 caches.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from deepseek_model.kernels import dsa, ops, reference

FP8 = torch.float8_e4m3fn
C, R = 64, 16  # tiny stand-ins for kv_lora_rank 512 and qk_rope_head_dim 64


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


# ---------------------------------------------------------------- indexer logits


def _index_inputs(b, t, h, d, s, seed, dtype=torch.float32, k_dtype=None, zero_rows=False):
    """(q, q_scale, k, k_scale, weights): fp8 with act_quant per-row scales when dtype is FP8."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g) * torch.exp2(torch.empty(b, t, h, 1).uniform_(-3, 3, generator=g))
    k = torch.randn(b, s, d, generator=g) * torch.exp2(torch.empty(b, s, 1).uniform_(-3, 3, generator=g))
    w = torch.randn(b, t, h, generator=g)  # mixed signs: heads cancel, as learned weights do
    if zero_rows:
        q[0, 0, 0] = 0.0  # an all-zero head: its scale is the act_quant floor
        k[0, :7] = 0.0
        k[-1, -1] = 0.0
    if dtype != FP8:
        return q.to(dtype), None, k.to(k_dtype or dtype), None, w
    q8, qs = reference.act_quant(q, d)  # (B, T, H, D), (B, T, H, 1): one scale per head row
    k8, ks = reference.act_quant(k, d)  # (B, S, D), (B, S, 1)
    return q8, qs.squeeze(-1), k8, ks.squeeze(-1), w


def _index_fp64(q, q_scale, k, k_scale, w):
    """The formula, term by term in fp64: Σ_h w · ReLU((q·q_scale)·(k·k_scale)) per (b, t, s)."""
    b, t, h, _ = q.shape
    out = torch.zeros(b, t, k.shape[1], dtype=torch.float64)
    for bi in range(b):
        keys = k[bi].double() * (1.0 if k_scale is None else k_scale[bi].double()[:, None])  # (S, D)
        for ti in range(t):
            for hi in range(h):
                qv = q[bi, ti, hi].double() * (1.0 if q_scale is None else float(q_scale[bi, ti, hi]))  # (D,)
                out[bi, ti] += float(w[bi, ti, hi]) * (keys @ qv).clamp_min(0.0)  # (S,)
    return out


@pytest.mark.parametrize("b, t, h, d, s, dtype, k_dtype", [
    (2, 1, 3, 24, 200, torch.float32, None),  # S = 1 full tile + 72; H, D not powers of two
    (1, 3, 5, 40, 130, torch.float32, None),  # T > 1
    (2, 2, 3, 24, 70, torch.bfloat16, None),  # bf16: upcast, fp32 dot
    (1, 2, 6, 48, 129, torch.float16, None),  # fp16: fed to tl.dot as is
    (2, 1, 4, 16, 50, torch.float32, torch.bfloat16),  # mixed dtypes
])
def test_index_kernel_matches_twin_float(b, t, h, d, s, dtype, k_dtype):
    args = _index_inputs(b, t, h, d, s, seed=s, dtype=dtype, k_dtype=k_dtype)
    out = dsa.index_logits(*args)
    ref = reference.index_logits(*args)
    assert out.shape == (b, t, s) and out.dtype == torch.float32
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("b, t, h, d, s", [(2, 2, 3, 24, 150), (1, 1, 64, 128, 140)])  # tiny; the published H, D
def test_index_kernel_matches_twin_fp8_with_zero_rows(b, t, h, d, s):
    q, qs, k, ks, w = _index_inputs(b, t, h, d, s, seed=d, dtype=FP8, zero_rows=True)
    floor = torch.tensor(reference.ACT_AMAX_FLOOR, dtype=torch.float32) / 448.0
    assert float(ks[0, 0]) == float(floor) and float(qs[0, 0, 0]) == float(floor)  # zero rows: the floor
    out = dsa.index_logits(q, qs, k, ks, w)
    ref = reference.index_logits(q, qs, k, ks, w)
    assert _rel(out, ref) <= 1e-5
    assert torch.equal(out[0, :, :7], torch.zeros(t, 7)) and torch.equal(out[-1, :, -1], torch.zeros(t))


def test_index_twin_equals_fp64_loop(monkeypatch):
    """Independent check of the twin (fp8 with scales, and float), including its token chunking."""
    for dtype in (FP8, torch.float32):
        args = _index_inputs(2, 3, 5, 24, 33, seed=7, dtype=dtype, zero_rows=True)
        torch.testing.assert_close(reference.index_logits(*args).double(), _index_fp64(*args),
                                   rtol=1e-5, atol=1e-5 * float(_index_fp64(*args).abs().max()))
    args = _index_inputs(2, 5, 3, 16, 20, seed=8)
    whole = reference.index_logits(*args)
    monkeypatch.setattr(reference, "INDEX_TWIN_ELEMS", 3 * 20 * 2)  # two tokens (of 3 heads x 20 keys) per chunk: 2, 2, 1
    chunked = reference.index_logits(*args)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_index_twin_autograd_and_empty_shapes():
    """With a gradient wanted the twin takes its differentiable path: the same logits, and gradients
    that match float64; zero queries or keys give empty logits."""
    for dtype in (FP8, torch.float32):
        q, qs, k, ks, w = _index_inputs(2, 4, 3, 16, 9, seed=11, dtype=dtype)
        with torch.no_grad():
            plain = reference.index_logits(q, qs, k, ks, w)
        w = w.clone().requires_grad_(True)
        traced = reference.index_logits(q, qs, k, ks, w)
        assert traced.requires_grad
        torch.testing.assert_close(traced.detach(), plain, rtol=1e-6, atol=1e-6)
        traced.sum().backward()
        # d(Σ logits)/dw[b, t, h] = Σ_s ReLU(q·k)·q_scale·k_scale, in float64
        qd = q.double() * (1.0 if qs is None else qs.double()[..., None])  # (B, T, H, D)
        kd = k.double() * (1.0 if ks is None else ks.double()[..., None])  # (B, S, D)
        expect = torch.einsum("bthd,bsd->bths", qd, kd).relu().sum(-1)  # (B, T, H)
        torch.testing.assert_close(w.grad.double(), expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))
    q, qs, k, ks, w = _index_inputs(2, 3, 2, 16, 5, seed=12, dtype=FP8)
    plain = reference.index_logits(q, qs, k, ks, w)
    for name in ("q_scale", "k_scale"):  # a gradient of a scale alone also takes the differentiable path
        scales = {"q_scale": qs.clone(), "k_scale": ks.clone()}
        scales[name].requires_grad_(True)
        traced = reference.index_logits(q, scales["q_scale"], k, scales["k_scale"], w)
        traced.sum().backward()
        torch.testing.assert_close(traced.detach(), plain, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(scales[name].grad).all() and scales[name].grad.abs().sum() > 0
    q, qs, k, ks, w = _index_inputs(1, 3, 2, 16, 5, seed=12)
    assert reference.index_logits(q[:, :0], qs, k, ks, w[:, :0]).shape == (1, 0, 5)
    assert reference.index_logits(q, qs, k[:, :0], ks, w).shape == (1, 3, 0)
    no_heads = reference.index_logits(q[:, :, :0], qs, k, ks, w[:, :, :0])  # zero index heads: zero logits
    assert no_heads.shape == (1, 3, 5) and not no_heads.any()


def test_index_ops_dispatch():
    args = _index_inputs(2, 2, 3, 24, 40, seed=9, dtype=FP8)
    out = ops.index_logits(*args, backend="triton")
    ref = ops.index_logits(*args, backend="auto")  # torch on CPU
    assert _rel(out, ref) <= 1e-5


def test_index_rejects_bad_input():
    q, qs, k, ks, w = _index_inputs(2, 1, 3, 24, 10, seed=10, dtype=FP8)
    bad = [
        ((q[0], qs, k, ks, w), "q:"),
        ((q, qs, k[..., :16], ks, w), "k:"),
        ((q, qs, k[:1], ks[:1], w), "k:"),
        ((q, None, k, ks, w), "q_scale"),
        ((q, qs[..., :2], k, ks, w), "q_scale"),
        ((q, qs, k, ks.double(), w), "k_scale"),
        ((q, qs, k, None, w), "k_scale"),
        ((q, qs, k, ks, w[:, :, :2]), "weights"),
        ((q.float().to(torch.int8), None, k.float(), None, w), "q:"),
    ]
    for fn in (reference.index_logits, dsa.index_logits):
        for args, name in bad:
            with pytest.raises(ValueError, match=name):
                fn(*args)
    with pytest.raises(ValueError, match="q: the last dimension"):
        dsa.index_logits(q.float().transpose(2, 3).contiguous().transpose(2, 3), None, k.float(), None, w)


# ---------------------------------------------------------------- sparse MLA decode


def _mla_inputs(b, h, s, seed, dtype=torch.float32, c=C, r=R):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, c + r, generator=g).to(dtype)  # (B, H, C+R)
    cache = torch.randn(b, s, c + r, generator=g).to(dtype)  # (B, S, C+R): one 576-style cache
    return q[..., :c], q[..., c:], cache[..., :c], cache[..., c:]


def _ragged_indices(b, k, s, seed):
    """[B, K] distinct positions per row with -1 padding: row 0 leads with 20 (a whole 16-slot tile)
    of -1, row 1 has -1 scattered, row 2 (if any) a single valid index, the rest are full."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(b)])  # (B, K)
    idx[0, :20] = -1
    if b > 1:
        idx[1, ::3] = -1
    if b > 2:
        idx[2, :-1] = -1
    return idx


def _sparse_fp64(q_lat, q_rope, kv, k_rope, indices, scale):
    """Per (b, h): softmax over the listed keys (each occurrence counted), in fp64."""
    b, h, c = q_lat.shape
    out = torch.zeros(b, h, c, dtype=torch.float64)
    for bi in range(b):
        rows = [int(i) for i in indices[bi] if int(i) >= 0]
        for hi in range(h):
            s = torch.stack([(q_lat[bi, hi].double() @ kv[bi, i].double()
                              + q_rope[bi, hi].double() @ k_rope[bi, i].double()) * scale for i in rows])  # (n,)
            e = torch.exp(s - s.max())  # (n,)
            out[bi, hi] = sum(ej * kv[bi, i].double() for ej, i in zip(e, rows)) / e.sum()
    return out


@pytest.mark.parametrize("num_splits", [None, 1, 3, 7])
def test_sparse_kernel_matches_twin(num_splits):
    """K = 37 (2 tiles + 5); 1 split: a first tile of only -1; 3 splits: a split without a key; 7: empty splits."""
    q_lat, q_rope, kv, k_rope = _mla_inputs(3, 5, 90, seed=num_splits or 0)
    idx = _ragged_indices(3, 37, 90, seed=1)
    out = dsa.sparse_mla_decode(q_lat, q_rope, kv, k_rope, idx, 0.13, num_splits=num_splits)
    ref = reference.sparse_mla_decode(q_lat, q_rope, kv, k_rope, idx, 0.13)
    assert out.shape == (3, 5, C) and out.dtype == torch.float32
    assert _rel(out, ref) <= 1e-5


def test_sparse_kernel_single_index_and_duplicates():
    q_lat, q_rope, kv, k_rope = _mla_inputs(2, 3, 20, seed=2)
    one = torch.tensor([[5], [19]])  # K = 1: the output is that row of the cache
    out = dsa.sparse_mla_decode(q_lat, q_rope, kv, k_rope, one, 0.2)
    assert _rel(out, reference.sparse_mla_decode(q_lat, q_rope, kv, k_rope, one, 0.2)) <= 1e-5
    torch.testing.assert_close(out, torch.stack([kv[0, 5], kv[1, 19]])[:, None].expand(2, 3, C), rtol=0, atol=0)
    dup = torch.tensor([[3, 3, 7, -1], [0, 1, 1, 1]])  # a repeated position counts once per occurrence
    out = dsa.sparse_mla_decode(q_lat, q_rope, kv, k_rope, dup, 0.2)
    ref = reference.sparse_mla_decode(q_lat, q_rope, kv, k_rope, dup, 0.2)
    assert _rel(out, ref) <= 1e-5
    torch.testing.assert_close(ref.double(), _sparse_fp64(q_lat, q_rope, kv, k_rope, dup, 0.2), rtol=1e-5, atol=1e-6)


def test_sparse_bf16_cache_two_head_blocks_int32_and_dispatch():
    q_lat, q_rope, kv, k_rope = _mla_inputs(2, 20, 70, seed=3, dtype=torch.bfloat16)  # 20 heads: 2 blocks
    idx = _ragged_indices(2, 45, 70, seed=4).to(torch.int32)
    out = ops.sparse_mla_decode(q_lat, q_rope, kv, k_rope, idx, 0.2, backend="triton")
    ref = ops.sparse_mla_decode(q_lat, q_rope, kv, k_rope, idx, 0.2, backend="auto")
    assert _rel(out, ref) <= 1e-5


def test_sparse_kernel_published_widths():
    """C = 512, R = 64, 16 heads (H / TP at TP 8), with the default split of 40 selected keys."""
    q_lat, q_rope, kv, k_rope = _mla_inputs(1, 16, 64, seed=5, c=512, r=64)
    idx = _ragged_indices(1, 40, 64, seed=6)
    out = dsa.sparse_mla_decode(q_lat, q_rope, kv, k_rope, idx, 576 ** -0.5)
    assert _rel(out, reference.sparse_mla_decode(q_lat, q_rope, kv, k_rope, idx, 576 ** -0.5)) <= 1e-5


def test_sparse_twin_equals_fp64_loop():
    q_lat, q_rope, kv, k_rope = _mla_inputs(3, 2, 30, seed=7)
    idx = _ragged_indices(3, 25, 30, seed=8)
    got = reference.sparse_mla_decode(q_lat, q_rope, kv, k_rope, idx, 0.3)
    torch.testing.assert_close(got.double(), _sparse_fp64(q_lat, q_rope, kv, k_rope, idx, 0.3), rtol=1e-5, atol=1e-6)


def test_sparse_rejects_bad_input():
    q_lat, q_rope, kv, k_rope = _mla_inputs(2, 4, 16, seed=9)
    ok = torch.tensor([[0, 5, -1], [15, 2, 3]])
    bad = [
        ((q_lat, q_rope, kv, k_rope, torch.tensor([[0, 16, 1], [1, 2, 3]])), "indices: entries must lie in"),
        ((q_lat, q_rope, kv, k_rope, torch.tensor([[0, -2, 1], [1, 2, 3]])), "indices: entries must lie in"),
        ((q_lat, q_rope, kv, k_rope, torch.tensor([[-1, -1, -1], [1, 2, 3]])), "indices: every row"),
        ((q_lat, q_rope, kv, k_rope, ok[:1]), "indices: expected"),
        ((q_lat, q_rope, kv, k_rope, ok.float()), "indices: expected"),
        ((q_lat, q_rope, kv, k_rope, ok[:, :0]), "indices: expected"),
        ((q_lat, q_rope, kv[..., :32], k_rope, ok), "kv"),
        ((q_lat, q_rope, kv, k_rope[:, :8], ok), "k_rope"),
        ((q_lat[:1], q_rope, kv, k_rope, ok), "q_lat/q_rope"),
    ]
    for fn in (reference.sparse_mla_decode, dsa.sparse_mla_decode):
        for args, msg in bad:
            with pytest.raises(ValueError, match=msg):
                fn(*args, 0.1)
    with pytest.raises(ValueError, match="powers of two"):
        dsa.sparse_mla_decode(q_lat[..., :48], q_rope, kv[..., :48], k_rope, ok, 0.1)
    with pytest.raises(ValueError, match="num_splits"):
        dsa.sparse_mla_decode(q_lat, q_rope, kv, k_rope, ok, 0.1, num_splits=0)


# ---------------------------------------------------------------- ahead-of-time GPU builds

AOT_SCRIPT = r"""
import json
from deepseek_model.kernels.gpu_compile import compile_all
out = {}
for arch in (89, 90):
    for k in compile_all(arch, names=("_index_logits_kernel", "_mla_split_kernel[SPARSE]")):
        mma = sorted({l.split()[0] for l in k.ptx.splitlines() if "mma" in l and not l.strip().startswith("//")})
        out[f"{arch}/{k.name}"] = {"shared": k.shared_bytes, "mma": mma, "cp_async": k.ptx.count("cp.async")}
print("JSON" + json.dumps(out))
"""


def test_dsa_kernels_build_for_ada_and_hopper():
    """The real sm_89 / sm_90 pipeline at published sizes: fp8 tensor-core indexer, pipelined gathers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton's bundled ptxas is unavailable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    builds = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("JSON"))[4:])
    assert any("e4m3.e4m3" in m for m in builds["89/_index_logits_kernel"]["mma"])  # mma.sync e4m3
    assert any("wgmma.mma_async" in m and "e4m3.e4m3" in m for m in builds["90/_index_logits_kernel"]["mma"])
    for arch in (89, 90):
        assert builds[f"{arch}/_mla_split_kernel[SPARSE]"]["cp_async"] > 0  # gathered rows are prefetched
