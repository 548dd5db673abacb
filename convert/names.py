"""The HF ⇄ internal tensor-name table and the published checkpoint's tensor inventory.

The name table the converter, the loader and the checkpoint generator share. It depends on nothing
but the standard library. (The split rules of convert/shard.py and parallel.py still name tensors
too; one schema for all of them is open work.)

Internal names follow the official inference code: `embed`, `layers.{i}.attn.{wq_a, q_norm, wq_b |
wq, wkv_a, kv_norm, wkv_b, wo}`, `layers.{i}.ffn.{w1, w2, w3}` (dense), `layers.{i}.ffn.gate.{weight,
bias}`, `layers.{i}.ffn.experts.{e}.{w1,w2,w3}`, `layers.{i}.ffn.shared_experts.{w1,w2,w3}`, `norm`,
`head`, and the MTP module under `mtp.` (`embed, enorm, hnorm, eh_proj, block.*, norm, head`).
An fp8 weight's `weight_scale_inv` maps to the internal `scale`.
"""

from __future__ import annotations

import re
from typing import Iterator

SCALE_SUFFIX = "_scale_inv"

# HF suffix inside a decoder layer → internal suffix.
_LAYER_NAMES: tuple[tuple[str, str], ...] = (
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_a_proj", "attn.wq_a"),
    ("self_attn.q_a_layernorm", "attn.q_norm"),
    ("self_attn.q_b_proj", "attn.wq_b"),
    ("self_attn.q_proj", "attn.wq"),
    ("self_attn.kv_a_proj_with_mqa", "attn.wkv_a"),
    ("self_attn.kv_a_layernorm", "attn.kv_norm"),
    ("self_attn.kv_b_proj", "attn.wkv_b"),
    ("self_attn.o_proj", "attn.wo"),
    ("mlp.gate_proj", "ffn.w1"),
    ("mlp.down_proj", "ffn.w2"),
    ("mlp.up_proj", "ffn.w3"),
    ("mlp.shared_experts.gate_proj", "ffn.shared_experts.w1"),
    ("mlp.shared_experts.down_proj", "ffn.shared_experts.w2"),
    ("mlp.shared_experts.up_proj", "ffn.shared_experts.w3"),
)
_MTP_NAMES: tuple[tuple[str, str], ...] = (
    ("embed_tokens", "embed"),
    ("enorm", "enorm"),
    ("hnorm", "hnorm"),
    ("eh_proj", "eh_proj"),
    ("shared_head.norm", "norm"),
    ("shared_head.head", "head"),
)
_GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "head.weight"),
)
_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_PROJ_BACK = {v: k for k, v in _PROJ.items()}

_FP8_RE = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.((experts\.\d+|shared_experts)\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def is_fp8_weight(hf_name: str) -> bool:
    """Whether the published FP8 checkpoint stores `hf_name` as float8_e4m3fn with a block scale.

    Every attention projection, dense MLP, routed and shared expert weight (also in the MTP block)
    is fp8; embeddings, lm_head, norms, the router, eh_proj and shared_head stay bf16.
    """
    return bool(_FP8_RE.match(hf_name))


def scale_name(hf_weight_name: str) -> str:
    """`x.weight` → `x.weight_scale_inv`."""
    return hf_weight_name + SCALE_SUFFIX


def is_scale_name(hf_name: str) -> bool:
    """Whether `hf_name` is a block scale (`..._scale_inv`)."""
    return hf_name.endswith(SCALE_SUFFIX)


def weight_of_scale(hf_scale_name: str) -> str:
    """`x.weight_scale_inv` → `x.weight`."""
    return hf_scale_name[: -len(SCALE_SUFFIX)]


def layer_index(hf_name: str) -> int | None:
    """The decoder-layer index of a `model.layers.{L}.…` name, else None."""
    m = _LAYER_RE.match(hf_name)
    return int(m.group(1)) if m else None


def _split_param(rest: str) -> tuple[str, str] | None:
    """`mod.path.weight_scale_inv` → (`mod.path`, `scale`); `.weight` → weight; `.e_score_correction_bias`."""
    for hf_suffix, internal in ((".weight_scale_inv", "scale"), (".weight", "weight"),
                                (".e_score_correction_bias", "bias")):
        if rest.endswith(hf_suffix):
            return rest[: -len(hf_suffix)], internal
    return None


def _layer_module_to_internal(mod: str) -> str | None:
    for hf, internal in _LAYER_NAMES:
        if mod == hf:
            return internal
    if mod == "mlp.gate":
        return "ffn.gate"
    m = _EXPERT_RE.match(mod)
    if m:
        return f"ffn.experts.{m.group(1)}.{_PROJ[m.group(2)]}"
    return None


def hf_to_internal(hf_name: str, num_hidden_layers: int) -> str | None:
    """Map an HF tensor name to the internal parameter name (None if the name is not recognised).

    Args:
        hf_name: e.g. `model.layers.3.mlp.experts.7.up_proj.weight_scale_inv`.
        num_hidden_layers: from the config; layer `num_hidden_layers` is the MTP module.
    """
    for hf, internal in _GLOBAL_NAMES:
        if hf_name == hf:
            return internal
    m = _LAYER_RE.match(hf_name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    split = _split_param(rest)
    if split is None:
        return None
    mod, param = split
    if layer < num_hidden_layers:
        internal = _layer_module_to_internal(mod)
        return None if internal is None else f"layers.{layer}.{internal}.{param}"
    if layer == num_hidden_layers:
        for hf, internal in _MTP_NAMES:
            if mod == hf:
                return f"mtp.{internal}.{param}"
        internal = _layer_module_to_internal(mod)
        return None if internal is None else f"mtp.block.{internal}.{param}"
    return None


def internal_to_hf(name: str, num_hidden_layers: int) -> str:
    """Inverse of hf_to_internal.

    Raises:
        KeyError: `name` is not an internal parameter name of this model family.
    """
    for hf, internal in _GLOBAL_NAMES:
        if name == internal:
            return hf
    mod, _, param = name.rpartition(".")
    hf_param = {"weight": "weight", "scale": "weight_scale_inv", "bias": "e_score_correction_bias"}.get(param)
    if hf_param is None:
        raise KeyError(name)
    if mod.startswith("mtp."):
        prefix, mod = f"model.layers.{num_hidden_layers}.", mod[len("mtp."):]
        for hf, internal in _MTP_NAMES:
            if mod == internal:
                return f"{prefix}{hf}.{hf_param}"
        if not mod.startswith("block."):
            raise KeyError(name)
        mod = mod[len("block."):]
    else:
        m = re.match(r"^layers\.(\d+)\.(.+)$", mod)
        if not m:
            raise KeyError(name)
        prefix, mod = f"model.layers.{m.group(1)}.", m.group(2)
    for hf, internal in _LAYER_NAMES:
        if mod == internal:
            return f"{prefix}{hf}.{hf_param}"
    if mod == "ffn.gate":
        return f"{prefix}mlp.gate.{hf_param}"
    m = re.match(r"^ffn\.experts\.(\d+)\.(w[123])$", mod)
    if m:
        return f"{prefix}mlp.experts.{m.group(1)}.{_PROJ_BACK[m.group(2)]}.{hf_param}"
    raise KeyError(name)


def _decoder_layer_shapes(cfg, layer: int, moe: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of one decoder layer's weights (scales not included)."""
    p = f"model.layers.{layer}."
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    yield p + "input_layernorm.weight", (h,)
    yield p + "post_attention_layernorm.weight", (h,)
    if cfg.q_lora_rank is None:
        yield p + "self_attn.q_proj.weight", (heads * cfg.qk_head_dim, h)
    else:
        yield p + "self_attn.q_a_proj.weight", (cfg.q_lora_rank, h)
        yield p + "self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,)
        yield p + "self_attn.q_b_proj.weight", (heads * cfg.qk_head_dim, cfg.q_lora_rank)
    yield p + "self_attn.kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
    yield p + "self_attn.kv_a_layernorm.weight", (cfg.kv_lora_rank,)
    yield p + "self_attn.kv_b_proj.weight", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    yield p + "self_attn.o_proj.weight", (h, heads * cfg.v_head_dim)
    if not moe:
        inter = cfg.intermediate_size
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
        return
    inter = cfg.moe_intermediate_size
    yield p + "mlp.gate.weight", (cfg.n_routed_experts, h)
    if cfg.topk_method == "noaux_tc":
        yield p + "mlp.gate.e_score_correction_bias", (cfg.n_routed_experts,)
    for e in range(cfg.n_routed_experts):
        yield p + f"mlp.experts.{e}.gate_proj.weight", (inter, h)
        yield p + f"mlp.experts.{e}.up_proj.weight", (inter, h)
        yield p + f"mlp.experts.{e}.down_proj.weight", (h, inter)
    if cfg.n_shared_experts:
        shared = cfg.n_shared_experts * inter
        yield p + "mlp.shared_experts.gate_proj.weight", (shared, h)
        yield p + "mlp.shared_experts.up_proj.weight", (shared, h)
        yield p + "mlp.shared_experts.down_proj.weight", (h, shared)


def hf_weight_shapes(cfg, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every non-scale tensor of the HF checkpoint described by `cfg`, in checkpoint order.

    Args:
        cfg: a ModelConfig (duck-typed: only its fields are read).
        mtp: include the MTP layer(s) (layer index num_hidden_layers) when the config has them.

    Returns:
        {HF name: shape}. Add `scale_name(n)` of grid [ceil(out/b), ceil(in/b)] for each
        `is_fp8_weight(n)` to get an FP8 checkpoint's full inventory.
    """
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_hidden_layers):
        shapes.update(_decoder_layer_shapes(cfg, layer, cfg.is_moe_layer(layer)))
    shapes["model.norm.weight"] = (cfg.hidden_size,)
    shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    if mtp and cfg.num_nextn_predict_layers:
        layer = cfg.num_hidden_layers
        p = f"model.layers.{layer}."
        shapes[p + "embed_tokens.weight"] = (cfg.vocab_size, cfg.hidden_size)
        shapes[p + "enorm.weight"] = (cfg.hidden_size,)
        shapes[p + "hnorm.weight"] = (cfg.hidden_size,)
        shapes[p + "eh_proj.weight"] = (cfg.hidden_size, 2 * cfg.hidden_size)
        shapes.update(_decoder_layer_shapes(cfg, layer, cfg.is_moe_layer(layer)))
        shapes[p + "shared_head.norm.weight"] = (cfg.hidden_size,)
        shapes[p + "shared_head.head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes
