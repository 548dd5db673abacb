"""ModelConfig: the architecture of a DeepSeek-V2/V3 checkpoint, parsed from its HF config.json.

Everything the model needs to know is read from the checkpoint's own config; nothing is inferred
from tensor sizes. Both spellings written by transformers are accepted (`rope_scaling` or
`rope_parameters`, `torch_dtype` or `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from deepseek_model.constants import FP8_BLOCK

SCORING_FUNCS = ("sigmoid", "softmax")
# transformers' config switches whose other settings change the math: a config.json may state the
# DeepSeek value (or leave it out); any other value is refused rather than silently computed as DeepSeek's
UNSUPPORTED_VARIANTS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_interleave": True}
# Sanity bounds on size fields, far above any published model (DeepSeek-V3: vocab 129,280, hidden
# 7,168, 61 layers, 256 experts, 163,840 positions) and far below what would exhaust a machine
# before the memory estimate runs.
SIZE_BOUNDS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 18,
    "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10, "kv_lora_rank": 1 << 14, "q_lora_rank": 1 << 16,
    "qk_nope_head_dim": 1 << 12, "qk_rope_head_dim": 1 << 12, "v_head_dim": 1 << 12, "n_routed_experts": 1 << 13,
    "n_shared_experts": 1 << 6, "num_experts_per_tok": 1 << 10, "n_group": 1 << 10, "topk_group": 1 << 10,
    "first_k_dense_replace": 1 << 10, "moe_layer_freq": 1 << 10, "num_nextn_predict_layers": 1 << 4,
    "max_position_embeddings": 1 << 24, "index_n_heads": 1 << 10, "index_head_dim": 1 << 12, "index_topk": 1 << 24,
}
SPARSE_MODEL_TYPE = "deepseek_v32"  # DeepSeek-V3.2: MLA plus the lightning indexer (DeepSeek Sparse Attention)
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", SPARSE_MODEL_TYPE)  # config.json model_type values this package runs
# transformers' DeepseekV32Config defaults, used when a deepseek_v32 config.json omits a field
V32_DEFAULTS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, "scoring_func": "sigmoid",
                "topk_method": "noaux_tc", "norm_topk_prob": True}
# what a DeepSeek-V2/V3 config.json without routing fields means (transformers' DeepseekV2Config defaults)
V2_ROUTING_DEFAULTS = {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False}
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
SCALE_FMTS = (None, "ue8m0")
BUILTIN_CONFIGS = ("deepseek-v3", "deepseek-v3.1", "deepseek-v3.2", "deepseek-v2", "deepseek-v2-lite", "tiny",
                   "tiny-v2", "tiny-v32", "small", "mini-shakespeare")


class ConfigError(ValueError):
    """A config.json that does not describe a valid DeepSeek model."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (the only scaling DeepSeek checkpoints ship)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0  # 0: no attention-temperature correction of the softmax scale


@dataclass(frozen=True)
class QuantConfig:
    """The `quantization_config` of an FP8 checkpoint."""

    fmt: str = "e4m3"
    block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    scale_fmt: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Frozen architecture description; field names follow HF config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"  # V3 (bias-corrected groups); V2: "greedy" / "group_limited_greedy"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0  # leading layers with a dense MLP instead of MoE
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0  # MTP layers stored after the main stack
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False  # must stay False: DeepSeek heads are separate tensors
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"
    quantization: QuantConfig | None = None
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------- derived quantities
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: nope + rope."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: kv_lora_rank + rope."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        """Whether every attention layer has a lightning indexer (DeepSeek-V3.2 sparse attention)."""
        return self.index_topk is not None

    @property
    def mtp_layer_index(self) -> int:
        """The layer index under which the checkpoint stores the MTP module."""
        return self.num_hidden_layers

    @property
    def softmax_scale(self) -> float:
        """Attention scale (qk_head_dim^-0.5, times mscale² under YaRN with factor > 1)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.factor > 1 and rs.mscale_all_dim:
            m = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` is an MoE layer (else a dense SwiGLU MLP)."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    # ----------------------------------------------------------------- parsing
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        """Parse and validate an HF config dict.

        Args:
            d: the parsed config.json.
            source: a name for error messages (usually the file path).

        Returns:
            The validated config.

        Raises:
            ConfigError: a required field is missing or a value is inconsistent.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: not a JSON object")

        def need(key: str) -> Any:
            if key not in d or (d[key] is None and key != "q_lora_rank"):
                raise ConfigError(f"{source}: missing required field '{key}'")
            return d[key]

        def as_int(key: str, value: Any) -> int:
            """An integer field within its sanity bound (JSON integers only: no lists, strings, bools)."""
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
            value = int(value)
            bound = SIZE_BOUNDS.get(key)
            if bound is not None and value > bound:
                raise ConfigError(f"{source}: '{key}' is {value}, beyond the sanity bound {bound}")
            return value

        def as_float(key: str, value: Any) -> float:
            """A finite number field."""
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
            return float(value)

        def req_int(key: str) -> int:
            return as_int(key, need(key))

        def opt_int(key: str, default: int) -> int:
            value = d.get(key)
            return default if value is None else as_int(key, value)

        def opt_float(key: str, default: float) -> float:
            value = d.get(key)
            return default if value is None else as_float(key, value)

        def opt_bool(key: str, default: bool) -> bool:
            value = d.get(key)
            if value is None:
                return default
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
            return value

        def token_ids(key: str, many: bool) -> int | list[int] | None:
            """A token id (or, if `many`, a list of them) or null."""
            value = d.get(key)
            is_id = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
            if value is None or is_id(value):
                return value
            if many and isinstance(value, list) and all(map(is_id, value)):
                return list(value)
            kind = "a token id, a list of them or null" if many else "a token id or null"
            raise ConfigError(f"{source}: '{key}' must be {kind}, got {value!r}")

        model_type = d.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not a DeepSeek V2/V3-style model "
                              f"(expected one of {', '.join(MODEL_TYPES)})")
        rope = d.get("rope_scaling") if d.get("rope_scaling") is not None else d.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object or null, got {rope!r}")
        rope_theta = d.get("rope_theta")
        rope_scaling = None
        if isinstance(rope, dict):
            rope_theta = rope.get("rope_theta", rope_theta)
            kind = rope.get("type", rope.get("rope_type", "default"))
            if kind == "yarn":
                try:
                    rope_scaling = RopeScaling(
                        factor=as_float("rope_scaling.factor", rope["factor"]),
                        original_max_position_embeddings=as_int("rope_scaling.original_max_position_embeddings",
                                                                rope["original_max_position_embeddings"]),
                        beta_fast=as_float("rope_scaling.beta_fast", rope.get("beta_fast", 32)),
                        beta_slow=as_float("rope_scaling.beta_slow", rope.get("beta_slow", 1)),
                        mscale=as_float("rope_scaling.mscale", rope.get("mscale", 1.0) or 1.0),
                        mscale_all_dim=as_float("rope_scaling.mscale_all_dim", rope.get("mscale_all_dim", 0.0) or 0.0),
                    )
                except KeyError as e:
                    raise ConfigError(f"{source}: rope_scaling of type yarn lacks {e.args[0]!r}") from None
            elif kind not in ("default", None):
                raise ConfigError(f"{source}: unsupported rope scaling type {kind!r} (DeepSeek uses 'yarn')")

        sparse = d.get("model_type") == SPARSE_MODEL_TYPE
        routing = V32_DEFAULTS if sparse else V2_ROUTING_DEFAULTS
        index = {key: opt_int(key, V32_DEFAULTS[key]) if sparse else None
                 for key in ("index_n_heads", "index_head_dim", "index_topk")}
        if sparse and d.get("q_lora_rank") is None:
            raise ConfigError(f"{source}: model_type {SPARSE_MODEL_TYPE} needs q_lora_rank (the indexer reads the "
                              f"query latent)")
        layer_kinds = d.get("mlp_layer_types")
        if layer_kinds is not None:
            n_layers, dense = req_int("num_hidden_layers"), opt_int("first_k_dense_replace", 0)
            implied = ["dense"] * min(dense, n_layers) + ["sparse"] * max(n_layers - dense, 0)
            if layer_kinds != implied:
                raise ConfigError(f"{source}: mlp_layer_types {layer_kinds!r} contradicts first_k_dense_replace "
                                  f"{dense} over {n_layers} layers (expected {dense} dense, then sparse)")

        for key, supported in UNSUPPORTED_VARIANTS.items():  # switches of transformers' configs this math does not follow
            if key in d and d[key] is not None and d[key] != supported:
                raise ConfigError(f"{source}: {key} {d[key]!r} is not supported (DeepSeek models use {supported!r}; "
                                  f"this package computes that)")

        quant = None
        qc = d.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise ConfigError(f"{source}: quantization_config must be an object or null, got {qc!r}")
        if qc:
            if qc.get("quant_method") != "fp8":
                raise ConfigError(f"{source}: unsupported quantization_config.quant_method {qc.get('quant_method')!r}")
            block = qc.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
            if not isinstance(block, (list, tuple)) or len(block) != 2 or block[0] != block[1]:
                raise ConfigError(f"{source}: quantization_config.weight_block_size must be two equal integers "
                                  f"[b, b] (square blocks), got {block!r}")
            quant = QuantConfig(
                fmt=qc.get("fmt", "e4m3"),
                block_size=(as_int("quantization_config.weight_block_size", block[0]),) * 2,
                activation_scheme=qc.get("activation_scheme", "dynamic"),
                scale_fmt=qc.get("scale_fmt"),
            )

        cfg = cls(
            vocab_size=req_int("vocab_size"),
            hidden_size=req_int("hidden_size"),
            intermediate_size=req_int("intermediate_size"),
            moe_intermediate_size=req_int("moe_intermediate_size"),
            num_hidden_layers=req_int("num_hidden_layers"),
            num_attention_heads=req_int("num_attention_heads"),
            kv_lora_rank=req_int("kv_lora_rank"),
            q_lora_rank=None if d.get("q_lora_rank") is None else as_int("q_lora_rank", d["q_lora_rank"]),
            qk_nope_head_dim=req_int("qk_nope_head_dim"),
            qk_rope_head_dim=req_int("qk_rope_head_dim"),
            v_head_dim=req_int("v_head_dim"),
            n_routed_experts=req_int("n_routed_experts"),
            n_shared_experts=opt_int("n_shared_experts", 0),
            num_experts_per_tok=req_int("num_experts_per_tok"),
            n_group=opt_int("n_group", 1),
            topk_group=opt_int("topk_group", 1),
            topk_method=d.get("topk_method", routing["topk_method"]),
            scoring_func=d.get("scoring_func", routing["scoring_func"]),
            norm_topk_prob=opt_bool("norm_topk_prob", routing["norm_topk_prob"]),
            routed_scaling_factor=opt_float("routed_scaling_factor", 1.0),
            first_k_dense_replace=opt_int("first_k_dense_replace", 0),
            moe_layer_freq=opt_int("moe_layer_freq", 1),
            num_nextn_predict_layers=opt_int("num_nextn_predict_layers", 0),
            rms_norm_eps=opt_float("rms_norm_eps", 1e-6),
            rope_theta=as_float("rope_theta", rope_theta) if rope_theta is not None else 10000.0,
            max_position_embeddings=opt_int("max_position_embeddings", 4096),
            rope_scaling=rope_scaling,
            tie_word_embeddings=opt_bool("tie_word_embeddings", False),
            bos_token_id=token_ids("bos_token_id", many=False),
            eos_token_id=token_ids("eos_token_id", many=True),
            torch_dtype=str(d.get("torch_dtype", d.get("dtype", "bfloat16"))),
            quantization=quant,
            **index,
            raw=dict(d),
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Check internal consistency; raise ConfigError naming the offending field."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{source}: {name} must be positive, got {getattr(self, name)}")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{source}: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_position_embeddings <= 0:
            raise ConfigError(f"{source}: max_position_embeddings must be positive, got {self.max_position_embeddings}")
        for name in ("rms_norm_eps", "routed_scaling_factor", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{source}: {name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"{source}: q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.tie_word_embeddings:
            raise ConfigError(f"{source}: tie_word_embeddings is true, but DeepSeek models keep a separate lm_head "
                              f"(this package does not tie them)")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{source}: qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"{source}: unknown scoring_func {self.scoring_func!r} (expected one of {SCORING_FUNCS})")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"{source}: unknown topk_method {self.topk_method!r} (expected one of {TOPK_METHODS})")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"{source}: n_routed_experts ({self.n_routed_experts}) is not divisible by "
                              f"n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ConfigError(f"{source}: topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"n_routed_experts ({self.n_routed_experts})")
        experts_per_group = self.n_routed_experts // self.n_group
        if self.topk_method != "greedy" and self.num_experts_per_tok > self.topk_group * experts_per_group:
            raise ConfigError(f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in "
                              f"topk_group groups ({self.topk_group}x{experts_per_group})")
        if self.topk_method == "noaux_tc" and experts_per_group < 2:
            raise ConfigError(f"{source}: noaux_tc routing needs at least 2 experts per group (top-2 group score)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"{source}: first_k_dense_replace ({self.first_k_dense_replace}) is outside "
                              f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.num_nextn_predict_layers not in (0, 1):
            raise ConfigError(f"{source}: num_nextn_predict_layers {self.num_nextn_predict_layers} unsupported "
                              f"(0 or 1)")
        if self.quantization is not None:
            q = self.quantization
            if q.fmt != "e4m3":
                raise ConfigError(f"{source}: quantization_config.fmt {q.fmt!r} unsupported (e4m3)")
            if len(q.block_size) != 2 or any(b <= 0 for b in q.block_size):
                raise ConfigError(f"{source}: quantization_config.weight_block_size {list(q.block_size)} is invalid")
            if q.scale_fmt not in SCALE_FMTS:
                raise ConfigError(f"{source}: quantization_config.scale_fmt {q.scale_fmt!r} unsupported")
        index = (self.index_n_heads, self.index_head_dim, self.index_topk)
        if any(v is not None for v in index):
            if any(v is None for v in index):
                raise ConfigError(f"{source}: index_n_heads, index_head_dim and index_topk come together")
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"{source}: {name} must be positive, got {getattr(self, name)}")
            if self.q_lora_rank is None:
                raise ConfigError(f"{source}: the indexer needs q_lora_rank (it reads the query latent)")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise ConfigError(f"{source}: index_head_dim ({self.index_head_dim}) is smaller than "
                                  f"qk_rope_head_dim ({self.qk_rope_head_dim}), the indexer's rotary part")
        rs = self.rope_scaling
        if rs is not None:
            for name in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                if not getattr(rs, name) > 0:
                    raise ConfigError(f"{source}: rope_scaling.{name} must be positive, got {getattr(rs, name)}")
            for name in ("mscale", "mscale_all_dim"):
                if getattr(rs, name) < 0:
                    raise ConfigError(f"{source}: rope_scaling.{name} must be >= 0, got {getattr(rs, name)}")
            if rs.beta_fast < rs.beta_slow:
                raise ConfigError(f"{source}: rope_scaling.beta_fast ({rs.beta_fast:g}) is below beta_slow "
                                  f"({rs.beta_slow:g})")
        if self.quantization is not None and self.quantization.activation_scheme != "dynamic":
            raise ConfigError(f"{source}: quantization_config.activation_scheme "
                              f"{self.quantization.activation_scheme!r} unsupported (dynamic)")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read `config.json` (or a checkpoint directory containing one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=path)

    @classmethod
    def builtin(cls, name: str) -> ModelConfig:
        """One of the configs shipped in configs/ (see BUILTIN_CONFIGS)."""
        return cls.from_dict(builtin_config_dict(name), source=f"configs/{name}.json")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The HF config.json dict: the original one with this config's values written back."""
        d = dict(self.raw)
        for f in dataclasses.fields(self):
            if f.name in ("raw", "rope_scaling", "quantization"):
                continue
            if f.name.startswith("index_") and getattr(self, f.name) is None:
                d.pop(f.name, None)
                continue
            d[f.name] = getattr(self, f.name)
        d.pop("dtype", None)
        d.pop("rope_parameters", None)
        if self.rope_scaling is None:
            d.pop("rope_scaling", None)
        else:
            d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        if self.quantization is None:
            d.pop("quantization_config", None)
        else:
            q = self.quantization
            d["quantization_config"] = {"quant_method": "fp8", "fmt": q.fmt, "activation_scheme": q.activation_scheme,
                                        "weight_block_size": list(q.block_size)}
            if q.scale_fmt:
                d["quantization_config"]["scale_fmt"] = q.scale_fmt
        return d


def builtin_config_dict(name: str) -> dict[str, Any]:
    """The raw dict of a shipped config (configs/NAME.json)."""
    if name not in BUILTIN_CONFIGS:
        raise ConfigError(f"unknown built-in config {name!r} (choose from {', '.join(BUILTIN_CONFIGS)})")
    text = resources.files("deepseek_model.configs").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)
