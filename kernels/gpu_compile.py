"""Ahead-of-time compile every Triton kernel for an NVIDIA target — no GPU needed.

The CPU interpreter checks none of the GPU rules (fp8 dot shapes, shared-memory size, dtype
support). triton.compile with an explicit GPUTarget runs the real pipeline (TTIR → TTGIR → LLVM
→ PTX → cubin via the bundled ptxas) at production sizes (BLOCK_K 128, kv_lora_rank 512, rope 64,
the tiles.json configs), so a kernel that would not build on sm_89 / sm_90 fails here.

Must run WITHOUT TRITON_INTERPRET (the interpreter replaces the JIT functions):
    python -m deepseek_model.kernels.gpu_compile [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

SM90 = 90
WARP_SIZE = 32
SMEM_LIMIT = {89: 99 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
DIVISIBILITY = 16
SPARSE_SPLIT = "_mla_split_kernel[SPARSE]"  # the split kernel's DSA form (gathered rows)
# Integer arguments that are multiples of 16 at every DeepSeek-V3 shape (K, N, 2I, 576-wide cache
# rows, ...). A real launch gets the same `tt.divisibility=16` specialisation from Triton's JIT for
# such values and for 16-byte-aligned pointers; without it the build would not vectorise or
# software-pipeline its loads, and the AOT shared-memory figures would not be the launched ones.
ALIGNED_INTS = frozenset({
    "stride_xm", "stride_ym", "stride_wn", "stride_on", "stride_am", "stride_cm", "stride_cs",
    "stride_ws", "stride_wm", "stride_we", "stride_gu", "stride_y", "stride_qlb", "stride_qlh",
    "stride_qrb", "stride_qrh", "stride_kvb", "stride_kvs", "stride_krb", "stride_krs", "stride_ob",
    "stride_oh", "stride_os", "stride_pb", "stride_ph", "stride_ps", "N", "K",
    "stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kn", "stride_ib",  # DSA: D = 128, top-k 2048
})


@dataclass(frozen=True)
class CompiledKernel:
    """What one AOT build produced."""

    name: str
    shared_bytes: int
    ptx: str


def _i32(*names: str) -> dict[str, str]:
    return {n: "i32" for n in names}


def _specs(tile) -> list[tuple]:
    """(kernel, signature, constexprs, options[, name]) at production sizes; unit strides as constexpr 1.
    The name defaults to the kernel's; a second build of one kernel (another constexpr form) names itself."""
    from deepseek_model.kernels import dsa, fp8_gemm, fp8_moe, fp8_quant, mla_decode  # noqa: PLC0415

    warps = {"num_warps": tile.num_warps, "num_stages": tile.num_stages, "enable_fp_fusion": False}
    gemm_tiles = {"BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N, "BLOCK_K": 128, "GROUP_M": tile.GROUP_M}
    mla_sig = {"ql_ptr": "*bf16", "qr_ptr": "*bf16", "kv_ptr": "*bf16", "kr_ptr": "*bf16", "len_ptr": "*i32",
               "start_ptr": "*i32", "idx_ptr": "*i32", "o_ptr": "*fp32", "lse_ptr": "*fp32", "H": "i32", "K": "i32",
               "scale": "fp32", **_i32("stride_qlb", "stride_qlh", "stride_qrb", "stride_qrh", "stride_kvb",
                                       "stride_kvs", "stride_krb", "stride_krs", "stride_ib", "stride_ob", "stride_oh",
                                       "stride_os", "stride_lb", "stride_lh"),
               "C": "constexpr", "R": "constexpr", "NUM_SPLITS": "constexpr", "SPARSE": "constexpr",
               "BLOCK_H": "constexpr", "BLOCK_N": "constexpr"}  # dense and sparse (DSA) decode splits
    return [
        (fp8_quant._act_quant_kernel,
         {"x_ptr": "*bf16", "y_ptr": "*u8", "s_ptr": "*fp32", **_i32("M", "K", "stride_xm", "stride_ym",
                                                                      "stride_sm", "stride_sk"),
          "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "UE8M0": "constexpr"},
         {"BLOCK_M": fp8_quant.ACT_ROWS_PER_PROGRAM, "BLOCK_K": 128, "UE8M0": True}, {}),
        (fp8_quant._weight_dequant_kernel,
         {"w_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*i16", **_i32("N", "K", "stride_wn", "stride_sn", "stride_on"),
          "BLOCK_SIZE": "constexpr", "OUT_KIND": "constexpr"},
         {"BLOCK_SIZE": 128, "OUT_KIND": 1}, {}),
        (fp8_gemm._fp8_gemm_kernel,
         {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "c_ptr": "*i16",
          **_i32("M", "N", "K", "KB_PER_SPLIT", "stride_am"), "stride_ak": "constexpr",
          **_i32("stride_asm", "stride_ask", "stride_wn"), "stride_wk": "constexpr",
          **_i32("stride_wsn", "stride_wsk", "stride_cs", "stride_cm"), "stride_cn": "constexpr",
          "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
          "BF16_OUT": "constexpr"},
         {"stride_ak": 1, "stride_wk": 1, "stride_cn": 1, **gemm_tiles, "BF16_OUT": True}, warps),
        (fp8_gemm._splitk_reduce_kernel,
         {"ws_ptr": "*fp32", "c_ptr": "*i16", **_i32("M", "N", "S", "stride_ws", "stride_wm", "stride_cm"),
          "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BF16_OUT": "constexpr"},
         {"BLOCK_M": fp8_gemm.REDUCE_BLOCK_M, "BLOCK_N": fp8_gemm.REDUCE_BLOCK_N, "BF16_OUT": True},
         {"enable_fp_fusion": False}),
        (fp8_moe._moe_gemm_kernel,
         {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "c_ptr": "*fp32",
          "tw_ptr": "*fp32", "sorted_ptr": "*i32", "expert_ptr": "*i32",
          **_i32("num_pairs", "N", "K", "num_rows", "stride_am", "stride_asm", "stride_ask", "stride_we",
                 "stride_wn", "stride_wse", "stride_wsn", "stride_cm"),
          "TOP_K": "constexpr", "A_PER_TOKEN": "constexpr", "MUL_WEIGHT": "constexpr", "BLOCK_M": "constexpr",
          "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"},
         {"TOP_K": 8, "A_PER_TOKEN": True, "MUL_WEIGHT": True, **gemm_tiles}, warps),
        (fp8_moe._silu_mul_quant_kernel,
         {"gu_ptr": "*fp32", "y_ptr": "*u8", "s_ptr": "*fp32", **_i32("P", "INTER", "stride_gu", "stride_y",
                                                                         "stride_s"),
          "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "UE8M0": "constexpr"},
         {"BLOCK_M": fp8_moe.SWIGLU_ROWS, "BLOCK_K": 128, "UE8M0": False}, {}),
        (mla_decode._mla_split_kernel, mla_sig,
         {"C": 512, "R": 64, "NUM_SPLITS": 8, "SPARSE": False, "BLOCK_H": mla_decode.BLOCK_H,
          "BLOCK_N": mla_decode.BLOCK_N},
         {"num_stages": mla_decode.NUM_STAGES}),
        (mla_decode._mla_combine_kernel,
         {"o_part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*fp32",
          **_i32("stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh", "stride_ob", "stride_oh"),
          "C": "constexpr", "NUM_SPLITS": "constexpr", "SPLITS_P2": "constexpr"},
         {"C": 512, "NUM_SPLITS": 8, "SPLITS_P2": 8}, {}),
        (dsa._index_logits_kernel,
         {"q_ptr": "*fp8e4nv", "qs_ptr": "*fp32", "k_ptr": "*fp8e4nv", "ks_ptr": "*fp32", "w_ptr": "*fp32",
          "out_ptr": "*fp32", **_i32("T", "H", "S", "D", "stride_qb", "stride_qt", "stride_qh", "stride_qsb",
                                     "stride_qst", "stride_kb", "stride_kn", "stride_ksb", "stride_wb", "stride_wt",
                                     "stride_ob", "stride_ot"),
          "Q_SCALED": "constexpr", "K_SCALED": "constexpr", "NATIVE_DOT": "constexpr", "BLOCK_H": "constexpr",
          "BLOCK_D": "constexpr", "BLOCK_S": "constexpr"},
         {"Q_SCALED": True, "K_SCALED": True, "NATIVE_DOT": True, "BLOCK_H": 64, "BLOCK_D": 128,
          "BLOCK_S": dsa.INDEX_BLOCK_S},
         {"num_warps": dsa.INDEX_NUM_WARPS}),
        (mla_decode._mla_split_kernel, mla_sig | {"idx_ptr": "*i32"},
         {"C": 512, "R": 64, "NUM_SPLITS": 16, "SPARSE": True, "BLOCK_H": mla_decode.BLOCK_H,
          "BLOCK_N": mla_decode.BLOCK_N},
         {"num_stages": mla_decode.NUM_STAGES}, SPARSE_SPLIT),
    ]


def compile_all(arch: int = SM90, tile=None, names: tuple[str, ...] | None = None) -> list[CompiledKernel]:
    """Build every kernel for sm_`arch`; raise if one fails or exceeds the shared-memory limit.

    Args:
        arch: compute capability × 10 (89 = Ada, 90 = Hopper).
        tile: GEMM TileConfig to build with (default: tiles.json's V3 q_a‖kv_a, M ≤ 16 entry).
        names: only the kernels with these names (function names, or SPARSE_SPLIT; default: all).

    Returns:
        One CompiledKernel per kernel built.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: unset it, AOT compilation needs the real JIT")
    if arch not in SMEM_LIMIT:
        raise ValueError(f"arch: expected one of {sorted(SMEM_LIMIT)}, got {arch}")
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    from deepseek_model.kernels.tiles import get_tile  # noqa: PLC0415

    tile = tile if tile is not None else get_tile(2112, 7168, 16)
    out = []
    for fn, sig, consts, opts, *label in _specs(tile):
        name = label[0] if label else fn.__name__
        if names is not None and name not in names:
            continue
        attrs = {(i,): [["tt.divisibility", DIVISIBILITY]] for i, (arg, ty) in enumerate(sig.items())
                 if ty.startswith("*") or (ty == "i32" and arg in ALIGNED_INTS)}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", arch, WARP_SIZE), options=opts)
        shared = int(kernel.metadata.shared)
        if shared > SMEM_LIMIT[arch]:
            raise ValueError(f"{name}: needs {shared} B of shared memory > {SMEM_LIMIT[arch]} on sm_{arch}")
        out.append(CompiledKernel(name, shared, kernel.asm["ptx"]))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: compile all kernels for the given archs and print shared memory per kernel."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[89, SM90])
    p.add_argument("--all-tiles", action="store_true", help="also build the GEMMs with every tiles.json entry")
    args = p.parse_args(argv)
    from deepseek_model.kernels import tiles  # noqa: PLC0415

    for arch in args.arch:
        for k in compile_all(arch):
            print(f"sm_{arch}  {k.name:28s} shared {k.shared_bytes:7d} B  ptx {len(k.ptx):7d} chars")
        if args.all_tiles:
            for cfg in tiles.all_tiles():
                for k in compile_all(arch, cfg, names=("_fp8_gemm_kernel", "_moe_gemm_kernel")):
                    print(f"sm_{arch}  {k.name:28s} shared {k.shared_bytes:7d} B  {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
