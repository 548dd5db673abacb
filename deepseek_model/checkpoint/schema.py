"""THE schema of the HuggingFace DeepSeek-V2/V3 checkpoint layout: one table, every rule derived.

Each `TensorFamily` states, once, for one kind of tensor:

* `hf` — its HF name (inside a decoder layer for layer families; `{e}` stands for a routed
  expert's index),
* `internal` — the module parameter it loads into (same scope),
* `split` — how tensor/expert parallelism cuts it: "column" (dim 0), "row" (dim 1), "expert"
  (whole, on the rank owning the expert) or "replicated",
* `fp8` — whether the published checkpoint stores it as float8_e4m3fn with a 128×128-block
  `weight_scale_inv` beside it (the scale follows its weight everywhere: name, split, shard),
* `shape` — its shape from the config (None where the config has no such tensor),
* `label` — the config size a column/row split cuts, for messages ("vocab_size", ...),
* `keep_fp32` — stored in fp32 whatever the checkpoint's dtype (the router's correction bias).

The loader, tensor-parallel slicing, `convert shard`/`merge`, the converters, `inspect`, the
tiny-checkpoint builder and training's save all ask this table. Scopes place a family in the
network: "pre" (before the decoder stack), "layer" (every decoder layer, and the MTP layer's block),
"post" (after the stack), "mtp_pre" / "mtp_post" (the MTP layer's own tensors around its block,
stored as layer `num_hidden_layers`).

Adding a tensor family is one entry plus the module that owns the parameter, e.g. a per-layer
extra norm::

    fam = TensorFamily("self_attn.extra_norm.weight", "attn.extra_norm.weight", LAYER, SPLIT_REPLICATED,
                       fp8=False, shape=lambda cfg, moe: (cfg.hidden_size,))
    schema = SCHEMA.with_families(fam)      # a new Schema; SCHEMA itself never changes
    schema.hf_weight_shapes(cfg)            # now lists model.layers.{i}.self_attn.extra_norm.weight
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

SPLIT_COLUMN, SPLIT_ROW, SPLIT_REPLICATED, SPLIT_EXPERT = "column", "row", "replicated", "expert"
SPLIT_KINDS = (SPLIT_COLUMN, SPLIT_ROW, SPLIT_REPLICATED, SPLIT_EXPERT)
SPLIT_DIM = {SPLIT_COLUMN: 0, SPLIT_ROW: 1}
PRE, LAYER, POST, MTP_PRE, MTP_POST = "pre", "layer", "post", "mtp_pre", "mtp_post"
SCOPES = (PRE, LAYER, POST, MTP_PRE, MTP_POST)
SCALE_SUFFIX = "_scale_inv"  # `x.weight` → `x.weight_scale_inv`
INTERNAL_SCALE = "scale"  # the Linear parameter holding a weight's block scale
EXPERT_FIELD = "{e}"
HEADS_LABEL = "num_attention_heads"
EXPERTS_LABEL = "n_routed_experts"
HEADS_MARK = "heads x"  # labels of split sizes that are multiples of the head count

ShapeFn = Callable[[Any, bool], "tuple[int, ...] | None"]  # (config, is a MoE layer) → shape or None


@dataclass(frozen=True)
class TensorFamily:
    """One kind of checkpoint tensor (see the module docstring for the fields)."""

    hf: str
    internal: str
    scope: str
    split: str
    fp8: bool
    shape: ShapeFn
    label: str | None = None
    keep_fp32: bool = False

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"TensorFamily {self.hf}: scope must be one of {SCOPES}, got {self.scope!r}")
        if self.split not in SPLIT_KINDS:
            raise ValueError(f"TensorFamily {self.hf}: split must be one of {SPLIT_KINDS}, got {self.split!r}")
        if (EXPERT_FIELD in self.hf) != (self.split == SPLIT_EXPERT) or (EXPERT_FIELD in self.internal) != (
                EXPERT_FIELD in self.hf):
            raise ValueError(f"TensorFamily {self.hf}: routed-expert families (and only they) name {EXPERT_FIELD}")
        if self.fp8 and not (self.hf.endswith(".weight") and self.internal.endswith(".weight")):
            raise ValueError(f"TensorFamily {self.hf}: only a `.weight` can be fp8")

    @property
    def per_expert(self) -> bool:
        """Whether the family has one tensor per routed expert."""
        return self.split == SPLIT_EXPERT


def _pattern(template: str) -> re.Pattern:
    """`mlp.experts.{e}.up_proj.weight` → a regex capturing the expert index as group `e`."""
    head, _, tail = template.partition(EXPERT_FIELD)
    return re.compile("^" + re.escape(head) + (r"(?P<e>\d+)" + re.escape(tail) if _ else "") + "$")


# ---------------------------------------------------------------------------------------- shapes
def _q_heads(cfg) -> int:
    return cfg.num_attention_heads * cfg.qk_head_dim


def _kv_b_rows(cfg) -> int:
    return cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)


def _moe(shape: Callable[[Any], tuple[int, ...]]) -> ShapeFn:
    return lambda cfg, moe: shape(cfg) if moe else None


def _swiglu(hf: str, internal: str, split_in: str, split_out: str, width: Callable[[Any, bool], int | None],
            label: str) -> tuple[TensorFamily, ...]:
    """The three FP8 projections of one SwiGLU MLP: gate and up [width, hidden] split `split_in`, down
    [hidden, width] split `split_out` (HF's gate/up/down_proj are w1/w3/w2 inside); none in a layer
    where width(cfg, moe) is None."""
    def shape(down: bool) -> ShapeFn:
        def fn(cfg, moe):
            w = width(cfg, moe)
            return None if w is None else (cfg.hidden_size, w) if down else (w, cfg.hidden_size)
        return fn

    projections = (("gate_proj", "w1", split_in, False), ("up_proj", "w3", split_in, False),
                   ("down_proj", "w2", split_out, True))
    return tuple(TensorFamily(f"{hf}.{proj}.weight", f"{internal}.{ours}.weight", LAYER, split, True, shape(down), label)
                 for proj, ours, split, down in projections)


def _always(shape: Callable[[Any], tuple[int, ...]]) -> ShapeFn:
    return lambda cfg, moe: shape(cfg)


def _families() -> tuple[TensorFamily, ...]:
    h = lambda cfg: cfg.hidden_size  # noqa: E731
    vocab_rows = _always(lambda cfg: (cfg.vocab_size, cfg.hidden_size))
    hidden = _always(lambda cfg: (cfg.hidden_size,))
    no_q_lora = lambda shape: lambda cfg, moe: shape(cfg) if cfg.q_lora_rank is None else None  # noqa: E731
    q_lora = lambda shape: lambda cfg, moe: None if cfg.q_lora_rank is None else shape(cfg)  # noqa: E731
    indexer = lambda shape: lambda cfg, moe: shape(cfg) if cfg.has_indexer else None  # noqa: E731
    index_dim = indexer(lambda cfg: (cfg.index_head_dim,))
    F = TensorFamily
    return (
        F("model.embed_tokens.weight", "embed.weight", PRE, SPLIT_COLUMN, False, vocab_rows, "vocab_size"),
        # ---- decoder layer: norms and MLA
        F("input_layernorm.weight", "attn_norm.weight", LAYER, SPLIT_REPLICATED, False, hidden),
        F("post_attention_layernorm.weight", "ffn_norm.weight", LAYER, SPLIT_REPLICATED, False, hidden),
        F("self_attn.q_proj.weight", "attn.wq.weight", LAYER, SPLIT_COLUMN, True,
          no_q_lora(lambda cfg: (_q_heads(cfg), h(cfg))), "q_proj rows (heads x qk_head_dim)"),
        F("self_attn.q_a_proj.weight", "attn.wq_a.weight", LAYER, SPLIT_REPLICATED, True,
          q_lora(lambda cfg: (cfg.q_lora_rank, h(cfg)))),
        F("self_attn.q_a_layernorm.weight", "attn.q_norm.weight", LAYER, SPLIT_REPLICATED, False,
          q_lora(lambda cfg: (cfg.q_lora_rank,))),
        F("self_attn.q_b_proj.weight", "attn.wq_b.weight", LAYER, SPLIT_COLUMN, True,
          q_lora(lambda cfg: (_q_heads(cfg), cfg.q_lora_rank)), "q_b_proj rows (heads x qk_head_dim)"),
        F("self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a.weight", LAYER, SPLIT_REPLICATED, True,
          _always(lambda cfg: (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h(cfg)))),
        F("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight", LAYER, SPLIT_REPLICATED, False,
          _always(lambda cfg: (cfg.kv_lora_rank,))),
        F("self_attn.kv_b_proj.weight", "attn.wkv_b.weight", LAYER, SPLIT_COLUMN, True,
          _always(lambda cfg: (_kv_b_rows(cfg), cfg.kv_lora_rank)), "kv_b_proj rows (heads x (qk_nope + v))"),
        F("self_attn.o_proj.weight", "attn.wo.weight", LAYER, SPLIT_ROW, True,
          _always(lambda cfg: (h(cfg), cfg.num_attention_heads * cfg.v_head_dim)), "o_proj columns (heads x v_head_dim)"),
        # ---- DeepSeek-V3.2 lightning indexer: small, replicated on every rank (as the official code
        # does); its two projections are FP8 in the release, the head weights and the norm are not
        F("self_attn.indexer.wq_b.weight", "attn.indexer.wq_b.weight", LAYER, SPLIT_REPLICATED, True,
          indexer(lambda cfg: (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank))),
        F("self_attn.indexer.wk.weight", "attn.indexer.wk.weight", LAYER, SPLIT_REPLICATED, True,
          indexer(lambda cfg: (cfg.index_head_dim, h(cfg)))),
        F("self_attn.indexer.k_norm.weight", "attn.indexer.k_norm.weight", LAYER, SPLIT_REPLICATED, False, index_dim),
        F("self_attn.indexer.k_norm.bias", "attn.indexer.k_norm.bias", LAYER, SPLIT_REPLICATED, False, index_dim),
        F("self_attn.indexer.weights_proj.weight", "attn.indexer.weights_proj.weight", LAYER, SPLIT_REPLICATED, False,
          indexer(lambda cfg: (cfg.index_n_heads, h(cfg))), keep_fp32=True),
        # ---- dense layers: SwiGLU MLP
        *_swiglu("mlp", "ffn", SPLIT_COLUMN, SPLIT_ROW, lambda cfg, moe: None if moe else cfg.intermediate_size,
                 "intermediate_size (dense MLP)"),
        # ---- MoE layers: router, routed experts, shared experts
        F("mlp.gate.weight", "ffn.gate.weight", LAYER, SPLIT_REPLICATED, False,
          _moe(lambda cfg: (cfg.n_routed_experts, h(cfg)))),
        F("mlp.gate.e_score_correction_bias", "ffn.gate.bias", LAYER, SPLIT_REPLICATED, False,
          lambda cfg, moe: (cfg.n_routed_experts,) if moe and cfg.topk_method == "noaux_tc" else None,
          keep_fp32=True),
        *_swiglu(f"mlp.experts.{EXPERT_FIELD}", f"ffn.experts.{EXPERT_FIELD}", SPLIT_EXPERT, SPLIT_EXPERT,
                 lambda cfg, moe: cfg.moe_intermediate_size if moe else None, EXPERTS_LABEL),
        *_swiglu("mlp.shared_experts", "ffn.shared_experts", SPLIT_COLUMN, SPLIT_ROW,
                 lambda cfg, moe: cfg.n_shared_experts * cfg.moe_intermediate_size if moe and cfg.n_shared_experts
                 else None, "shared-expert width (n_shared x moe_intermediate)"),
        # ---- after the stack
        F("model.norm.weight", "norm.weight", POST, SPLIT_REPLICATED, False, hidden),
        F("lm_head.weight", "head.weight", POST, SPLIT_COLUMN, False, vocab_rows, "vocab_size"),
        # ---- the MTP layer around its block (its embedding and head share the main ones' shapes)
        F("embed_tokens.weight", "embed.weight", MTP_PRE, SPLIT_COLUMN, False, vocab_rows, "vocab_size"),
        F("enorm.weight", "enorm.weight", MTP_PRE, SPLIT_REPLICATED, False, hidden),
        F("hnorm.weight", "hnorm.weight", MTP_PRE, SPLIT_REPLICATED, False, hidden),
        F("eh_proj.weight", "eh_proj.weight", MTP_PRE, SPLIT_REPLICATED, False,
          _always(lambda cfg: (cfg.hidden_size, 2 * cfg.hidden_size))),
        F("shared_head.norm.weight", "norm.weight", MTP_POST, SPLIT_REPLICATED, False, hidden),
        F("shared_head.head.weight", "head.weight", MTP_POST, SPLIT_COLUMN, False, vocab_rows, "vocab_size"),
    )


@dataclass(frozen=True)
class Match:
    """Where an HF (or internal) name falls in the schema.

    Attributes:
        family: the tensor family.
        layer: decoder-layer index in the HF layout (num_hidden_layers for the MTP layer), or None.
        expert: routed-expert index, or None.
        scale: the name is the block scale of an fp8 weight, not the weight.
    """

    family: TensorFamily
    layer: int | None
    expert: int | None
    scale: bool


_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_INTERNAL_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTP_PREFIX, _MTP_BLOCK_PREFIX = "mtp.", "mtp.block."


class Schema:
    """The checkpoint layout as a table of TensorFamily entries; every query derives from it.

    Args:
        families: the entries, in checkpoint order within each scope.
    """

    def __init__(self, families: tuple[TensorFamily, ...]):
        self.families = tuple(families)
        seen: set[tuple[str, str, str]] = set()
        for fam in self.families:
            for key in (("hf", fam.scope, fam.hf), ("internal", fam.scope, fam.internal)):
                if key in seen:
                    raise ValueError(f"TensorFamily {fam.hf}: name {key[1]!r} is already in the schema")
                seen.add(key)
        # exact names in a dict; only the routed-expert families need a pattern
        self._hf = ({(f.scope, f.hf): f for f in self.families if not f.per_expert},
                    tuple((f, _pattern(f.hf)) for f in self.families if f.per_expert))
        self._internal = ({(f.scope, f.internal): f for f in self.families if not f.per_expert},
                          tuple((f, _pattern(f.internal)) for f in self.families if f.per_expert))

    def with_families(self, *families: TensorFamily) -> Schema:
        """A new schema with `families` appended (this one is unchanged)."""
        return Schema(self.families + tuple(families))

    # ------------------------------------------------------------------------------ lookups
    @staticmethod
    def _find(table, scopes: tuple[str, ...], rel: str) -> tuple[TensorFamily, int | None] | None:
        exact, patterns = table
        for scope in scopes:
            fam = exact.get((scope, rel))
            if fam is not None:
                return fam, None
        for fam, pattern in patterns:
            if fam.scope in scopes:
                m = pattern.match(rel)
                if m:
                    return fam, int(m.group("e"))
        return None

    def match(self, hf_name: str, num_hidden_layers: int | None = None) -> Match | None:
        """The family of an HF tensor name (a weight or its `_scale_inv`), or None when unknown.

        Args:
            hf_name: e.g. `model.layers.3.mlp.experts.7.up_proj.weight_scale_inv`.
            num_hidden_layers: from the config; layer `num_hidden_layers` is the MTP layer. None
                (unknown): any layer may be a decoder layer or the MTP layer.
        """
        scale = hf_name.endswith(SCALE_SUFFIX)
        base = hf_name[: -len(SCALE_SUFFIX)] if scale else hf_name
        m = _HF_LAYER_RE.match(base)
        if m is None:
            found, layer = self._find(self._hf, (PRE, POST), base), None
        else:
            layer = int(m.group(1))
            if num_hidden_layers is None or layer == num_hidden_layers:
                scopes = (LAYER, MTP_PRE, MTP_POST)
            else:
                scopes = (LAYER,) if layer < num_hidden_layers else ()
            found = self._find(self._hf, scopes, m.group(2))
        if found is None or (scale and not found[0].fp8):
            return None
        return Match(found[0], layer, found[1], scale)

    def hf_to_internal(self, hf_name: str, num_hidden_layers: int) -> str | None:
        """The internal parameter name of an HF tensor (None if the name is not in the schema)."""
        m = self.match(hf_name, num_hidden_layers)
        if m is None:
            return None
        internal = m.family.internal
        if m.scale:
            internal = internal[: -len("weight")] + INTERNAL_SCALE
        if m.expert is not None:
            internal = internal.replace(EXPERT_FIELD, str(m.expert))
        scope = m.family.scope
        if scope in (PRE, POST):
            return internal
        if scope in (MTP_PRE, MTP_POST):
            return _MTP_PREFIX + internal
        return (f"layers.{m.layer}." if m.layer < num_hidden_layers else _MTP_BLOCK_PREFIX) + internal

    def internal_to_hf(self, name: str, num_hidden_layers: int) -> str:
        """Inverse of hf_to_internal.

        Raises:
            KeyError: `name` is not a parameter the schema knows.
        """
        scale = name.endswith("." + INTERNAL_SCALE)
        base = name[: -len(INTERNAL_SCALE)] + "weight" if scale else name
        m = _INTERNAL_LAYER_RE.match(base)
        if m is not None:
            layer, scopes, rel = int(m.group(1)), (LAYER,), m.group(2)
        elif base.startswith(_MTP_BLOCK_PREFIX):
            layer, scopes, rel = num_hidden_layers, (LAYER,), base[len(_MTP_BLOCK_PREFIX):]
        elif base.startswith(_MTP_PREFIX):
            layer, scopes, rel = num_hidden_layers, (MTP_PRE, MTP_POST), base[len(_MTP_PREFIX):]
        else:
            layer, scopes, rel = None, (PRE, POST), base
        found = self._find(self._internal, scopes, rel)
        if found is None or (scale and not found[0].fp8):
            raise KeyError(name)
        fam, expert = found
        hf = fam.hf if expert is None else fam.hf.replace(EXPERT_FIELD, str(expert))
        hf = hf if layer is None else f"model.layers.{layer}.{hf}"
        return hf + SCALE_SUFFIX if scale else hf

    def is_fp8_weight(self, hf_name: str) -> bool:
        """Whether the published FP8 checkpoint stores this weight as float8_e4m3fn with a block scale."""
        m = self.match(hf_name)
        return m is not None and m.family.fp8 and not m.scale

    def split_rule(self, hf_name: str) -> tuple[str, int | None]:
        """(split kind, split dim) of an HF tensor; a scale follows its weight; unknown names replicate."""
        m = self.match(hf_name)
        if m is None:
            return SPLIT_REPLICATED, None
        return m.family.split, SPLIT_DIM.get(m.family.split)

    def expert_index(self, hf_name: str) -> int | None:
        """The routed-expert index of an HF name, or None when it is not a routed-expert tensor."""
        m = self.match(hf_name)
        return None if m is None else m.expert

    # ------------------------------------------------------------------------------ inventories
    def _layer_tensors(self, cfg, layer: int) -> Iterator[tuple[str, tuple[int, ...], TensorFamily]]:
        """(HF name, shape, family) of one decoder layer; the routed experts come expert by expert,
        each with all its per-expert families, where the first per-expert family stands in the table."""
        moe = cfg.is_moe_layer(layer)
        present = [(fam, fam.shape(cfg, moe)) for fam in self.families if fam.scope == LAYER]
        present = [(fam, tuple(shape)) for fam, shape in present if shape is not None]
        per_expert = [(fam, shape) for fam, shape in present if fam.per_expert]
        p = f"model.layers.{layer}."
        for fam, shape in present:
            if not fam.per_expert:
                yield p + fam.hf, shape, fam
            elif fam is per_expert[0][0]:
                for e in range(cfg.n_routed_experts):
                    for efam, eshape in per_expert:
                        yield p + efam.hf.replace(EXPERT_FIELD, str(e)), eshape, efam

    def _scope_tensors(self, cfg, scope: str, prefix: str = "") -> Iterator[tuple[str, tuple[int, ...], TensorFamily]]:
        for fam in self.families:
            if fam.scope == scope:
                shape = fam.shape(cfg, False)
                if shape is not None:
                    yield prefix + fam.hf, tuple(shape), fam

    def hf_weights(self, cfg, mtp: bool = True) -> list[tuple[str, tuple[int, ...], TensorFamily]]:
        """Every non-scale tensor of the HF checkpoint described by `cfg`, in checkpoint order.

        Args:
            cfg: a ModelConfig (only its fields are read).
            mtp: include the MTP layer (index num_hidden_layers) when the config has one.

        Returns:
            [(HF name, shape, family)].
        """
        out = list(self._scope_tensors(cfg, PRE))
        for layer in range(cfg.num_hidden_layers):
            out.extend(self._layer_tensors(cfg, layer))
        out.extend(self._scope_tensors(cfg, POST))
        if mtp and cfg.num_nextn_predict_layers:
            prefix = f"model.layers.{cfg.num_hidden_layers}."
            out.extend(self._scope_tensors(cfg, MTP_PRE, prefix))
            out.extend(self._layer_tensors(cfg, cfg.num_hidden_layers))
            out.extend(self._scope_tensors(cfg, MTP_POST, prefix))
        return out

    def hf_weight_shapes(self, cfg, mtp: bool = True) -> dict[str, tuple[int, ...]]:
        """{HF name: shape} of every non-scale tensor, in checkpoint order (see `hf_weights`).

        Add `scale_name(n)` of grid [ceil(out/b), ceil(in/b)] for each `is_fp8_weight(n)` to get
        an FP8 checkpoint's full inventory.
        """
        return {name: shape for name, shape, _ in self.hf_weights(cfg, mtp)}

    def split_dims(self, cfg) -> list[tuple[str, int, bool]]:
        """Every config size tensor/expert parallelism cuts.

        Returns:
            [(label, size, cut_through_fp8_weight)]: the size must divide by the world size and,
            when the third item is True, its per-rank part must be a multiple of the FP8 block (the
            weight's scale is split with it). Families sharing a label cut the same size.
        """
        kinds = {cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers + (1 if cfg.num_nextn_predict_layers else 0))}
        dims: dict[str, tuple[int, bool]] = {HEADS_LABEL: (cfg.num_attention_heads, False)}
        for fam in self.families:
            if fam.split == SPLIT_REPLICATED:
                continue
            for moe in (sorted(kinds) if fam.scope == LAYER else [False]):
                shape = fam.shape(cfg, moe)
                if shape is None:
                    continue
                size = cfg.n_routed_experts if fam.per_expert else shape[SPLIT_DIM[fam.split]]
                label = fam.label or f"{fam.hf} dim {SPLIT_DIM.get(fam.split)}"
                old = dims.get(label, (size, False))
                if old[0] != size:
                    raise ValueError(f"schema: label {label!r} names sizes {old[0]} and {size}")
                dims[label] = (size, old[1] or (fam.fp8 and not fam.per_expert))
        return [(label, size, fp8) for label, (size, fp8) in dims.items()]

    def split_problems(self, cfg, world_size: int, fp8_block: int | None) -> list[str]:
        """Why `cfg` cannot be split over `world_size` ranks (empty when it can).

        Args:
            cfg: a ModelConfig.
            world_size: number of tensor/expert-parallel ranks.
            fp8_block: the FP8 block size when the weights are (or will be) FP8 with block scales,
                else None (no block constraint).
        """
        if world_size < 1:
            return [f"world size must be >= 1, got {world_size}"]
        if world_size == 1:
            return []  # nothing is cut
        problems = []
        heads_split = cfg.num_attention_heads % world_size == 0
        for what, size, fp8_cut in self.split_dims(cfg):
            if not heads_split and HEADS_MARK in what:
                continue  # already reported as num_attention_heads
            if size % world_size:
                problems.append(f"{what} ({size}) is not divisible by {world_size}")
            elif fp8_cut and fp8_block and (size // world_size) % fp8_block:
                problems.append(f"{what} ({size}) splits into parts of {size // world_size}, not a multiple of the "
                                f"FP8 {fp8_block}-block its scale is split by")
        return problems


    def inventory_problem(self, cfg, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """The first way a checkpoint's tensors contradict its config, or None when they agree.

        Checks, as the loader does: every tensor is one the config describes (block scales of the
        FP8 weights included), with the shape the config gives it, and none is missing (the MTP
        layer may be absent: it is optional).

        Args:
            cfg: the checkpoint's ModelConfig.
            shapes: {HF name: shape} of every tensor of the checkpoint.
        """
        want = self.hf_weight_shapes(cfg, mtp=True)
        mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
        for name, shape in shapes.items():
            if is_scale_name(name):
                weight = weight_of_scale(name)
                if weight not in want or not self.is_fp8_weight(weight):
                    return f"unexpected tensor '{name}' (not the block scale of an FP8 weight the config describes)"
                continue
            if name not in want:
                return f"unexpected tensor '{name}' (the config describes no such tensor)"
            if tuple(shape) != want[name]:
                return f"tensor '{name}' has shape {list(shape)}, the config needs {list(want[name])}"
        missing = [n for n in want if n not in shapes and not n.startswith(mtp_prefix)]
        if missing:
            return f"missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        return None


SCHEMA = Schema(_families())


# ------------------------------------------------------------------------- name helpers (scales)
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
    m = _HF_LAYER_RE.match(hf_name)
    return int(m.group(1)) if m else None


# The default schema's queries as functions (what most callers need).
hf_to_internal = SCHEMA.hf_to_internal
internal_to_hf = SCHEMA.internal_to_hf
is_fp8_weight = SCHEMA.is_fp8_weight
split_rule = SCHEMA.split_rule
expert_index = SCHEMA.expert_index
hf_weight_shapes = SCHEMA.hf_weight_shapes
hf_weights = SCHEMA.hf_weights
match = SCHEMA.match
inventory_problem = SCHEMA.inventory_problem
split_dims = SCHEMA.split_dims
split_problems = SCHEMA.split_problems
