"""The checkpoint schema: names ⇄ module parameters, splits against the modules, a new family end to end."""

from __future__ import annotations

import pytest
import torch

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.checkpoint.schema import (LAYER, SCHEMA, SPLIT_COLUMN, SPLIT_EXPERT, SPLIT_REPLICATED, SPLIT_ROW,
                                              Schema, TensorFamily)
from deepseek_model.checkpoint.sharded import load_rank, read_manifest
from deepseek_model.checkpoint.writer import write_checkpoint
from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model.constants import block_grid
from deepseek_model.convert.shard import merge, shard
from deepseek_model.layers import LinearSpec
from deepseek_model.model import Transformer
from deepseek_model.parallel import ParallelContext
from deepseek_model.testing import make_tiny_tensors

BUILTIN = ("deepseek-v3", "deepseek-v3.1", "deepseek-v2", "deepseek-v2-lite", "tiny", "tiny-v2", "small",
           "mini-shakespeare")


def _cfg(name: str) -> ModelConfig:
    return ModelConfig.from_dict(builtin_config_dict(name))


def _inventory(cfg: ModelConfig, fp8: bool) -> dict[str, tuple[int, ...]]:
    shapes = schema.hf_weight_shapes(cfg)
    if fp8:
        shapes.update({schema.scale_name(n): block_grid(s) for n, s in list(shapes.items()) if schema.is_fp8_weight(n)})
    return shapes


@pytest.mark.parametrize("name", BUILTIN)
def test_every_name_maps_and_maps_back(name):
    cfg = _cfg(name)
    n = cfg.num_hidden_layers
    for hf in _inventory(cfg, fp8=True):
        internal = schema.hf_to_internal(hf, n)
        assert internal is not None, hf
        assert schema.internal_to_hf(internal, n) == hf


@pytest.mark.parametrize("name,fp8", [("tiny", False), ("tiny", True), ("tiny-v2", False), ("mini-shakespeare", True)])
def test_schema_names_are_the_model_parameters(name, fp8):
    """The schema's inventory is exactly the model's state dict, with the shapes the modules build."""
    cfg = _cfg(name)
    with torch.device("meta"):
        model = Transformer(cfg, LinearSpec(fp8=fp8, device="meta"))
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {schema.hf_to_internal(hf, cfg.num_hidden_layers): shape for hf, shape in _inventory(cfg, fp8).items()}
    assert mapped == state


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_split_rules_are_what_the_parallel_modules_build(name):
    """Rank 0 of 2: a column tensor holds half the rows, a row tensor half the columns, an expert is
    whole or absent, the rest whole — as the schema says."""
    cfg = _cfg(name)
    with torch.device("meta"):
        model = Transformer(cfg, LinearSpec(device="meta"), ctx=ParallelContext(rank=0, world_size=2))
    local = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kinds = set()
    for hf, full in schema.hf_weight_shapes(cfg).items():
        kind, dim = schema.split_rule(hf)
        kinds.add(kind)
        internal = schema.hf_to_internal(hf, cfg.num_hidden_layers)
        if kind == SPLIT_EXPERT:
            owner = schema.expert_index(hf) // (cfg.n_routed_experts // 2)
            assert (internal in local) == (owner == 0), hf
            continue
        want = list(full)
        if dim is not None:
            want[dim] //= 2
        assert local[internal] == tuple(want), hf
    assert kinds == {SPLIT_COLUMN, SPLIT_ROW, SPLIT_EXPERT, SPLIT_REPLICATED}


def test_rules_of_single_names():
    n = 61
    assert schema.split_rule("model.layers.3.self_attn.o_proj.weight_scale_inv") == (SPLIT_ROW, 1)
    assert schema.split_rule("model.layers.61.shared_head.head.weight") == (SPLIT_COLUMN, 0)
    assert schema.split_rule("model.layers.61.eh_proj.weight") == (SPLIT_REPLICATED, None)
    assert schema.expert_index("model.layers.7.mlp.experts.255.down_proj.weight_scale_inv") == 255
    assert schema.expert_index("model.layers.7.mlp.shared_experts.down_proj.weight") is None
    assert schema.is_fp8_weight("model.layers.61.mlp.experts.3.up_proj.weight")
    assert not schema.is_fp8_weight("model.layers.61.eh_proj.weight")
    assert not schema.is_fp8_weight("model.layers.3.mlp.gate.weight")
    assert schema.hf_to_internal("model.layers.61.enorm.weight", n) == "mtp.enorm.weight"
    assert schema.hf_to_internal("model.layers.61.self_attn.wkv_b.weight", n) is None  # internal name, not HF
    assert schema.hf_to_internal("model.layers.62.enorm.weight", n) is None  # past the MTP layer
    assert schema.hf_to_internal("model.layers.3.enorm.weight", n) is None  # MTP-only tensor in a decoder layer
    assert schema.hf_to_internal("model.norm.weight_scale_inv", n) is None  # a scale of a non-fp8 tensor
    assert schema.hf_to_internal("model.layers.3.mlp.experts.x.up_proj.weight", n) is None
    with pytest.raises(KeyError):
        schema.internal_to_hf("layers.3.attn.nonexistent.weight", n)
    with pytest.raises(KeyError):
        schema.internal_to_hf("norm.scale", n)


def test_bad_families_are_refused():
    shape = lambda cfg, moe: (cfg.hidden_size,)  # noqa: E731
    with pytest.raises(ValueError, match="scope"):
        TensorFamily("a.weight", "a.weight", "nowhere", SPLIT_REPLICATED, False, shape)
    with pytest.raises(ValueError, match="routed-expert"):
        TensorFamily("mlp.experts.{e}.w.weight", "ffn.experts.{e}.w.weight", LAYER, SPLIT_COLUMN, False, shape)
    with pytest.raises(ValueError, match="only a `.weight` can be fp8"):
        TensorFamily("mlp.gate.e_score_correction_bias", "ffn.gate.bias2", LAYER, SPLIT_REPLICATED, True, shape)
    with pytest.raises(ValueError, match="already in the schema"):
        SCHEMA.with_families(TensorFamily("input_layernorm.weight", "x.weight", LAYER, SPLIT_REPLICATED, False, shape))


# A hypothetical new tensor family: a per-layer projection split by rows across ranks.
EXTRA = TensorFamily("self_attn.extra_proj.weight", "attn.extra_proj.weight", LAYER, SPLIT_COLUMN, fp8=False,
                     shape=lambda cfg, moe: (2 * cfg.hidden_size, cfg.hidden_size), label="extra_proj rows")


def test_a_registered_family_round_trips_write_shard_merge_load(tmp_path):
    layout = SCHEMA.with_families(EXTRA)
    assert SCHEMA.match("model.layers.0.self_attn.extra_proj.weight") is None  # the default table is unchanged
    cfg = ModelConfig.from_dict(builtin_config_dict("tiny"))
    tensors = make_tiny_tensors(cfg, fp8=False, seed=4)
    extra = {n: s for n, s in layout.hf_weight_shapes(cfg).items() if n not in tensors}
    assert sorted(extra) == [f"model.layers.{i}.self_attn.extra_proj.weight" for i in range(cfg.num_hidden_layers + 1)]
    gen = torch.Generator().manual_seed(0)
    tensors.update({n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in extra.items()})
    src = write_checkpoint(tmp_path / "src", tensors, cfg.to_dict(), num_shards=3)
    name = "model.layers.1.self_attn.extra_proj.weight"
    assert layout.hf_to_internal(name, cfg.num_hidden_layers) == "layers.1.attn.extra_proj.weight"
    assert layout.hf_to_internal(f"model.layers.{cfg.num_hidden_layers}.self_attn.extra_proj.weight",
                                 cfg.num_hidden_layers) == "mtp.block.attn.extra_proj.weight"
    assert ("extra_proj rows", 2 * cfg.hidden_size, False) in layout.split_dims(cfg)

    shard(src, tmp_path / "tp2", 2, quiet=True, layout=layout)
    assert read_manifest(tmp_path / "tp2")["tensors"][name]["split"] == SPLIT_COLUMN
    ranks = [load_rank(tmp_path / "tp2", r) for r in range(2)]
    half = cfg.hidden_size
    for r in range(2):
        assert torch.equal(ranks[r][name], tensors[name][r * half:(r + 1) * half])
    merge(tmp_path / "tp2", tmp_path / "merged", quiet=True)
    back = CheckpointReader(tmp_path / "merged")
    for n in extra:
        assert torch.equal(back.get(n), tensors[n]), n

    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.extra_proj.weight'"):
        shard(src, tmp_path / "default", 2, quiet=True)  # the default table does not know the family
    assert not (tmp_path / "default").exists()


def test_schema_is_not_mutable_state():
    before = len(SCHEMA.families)
    SCHEMA.with_families(EXTRA)
    assert len(SCHEMA.families) == before and isinstance(SCHEMA, Schema)
