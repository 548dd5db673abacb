"""ModelConfig parsing and validation against the published configs' values."""

import json
import math

import pytest

from deepseek_model.config import BUILTIN_CONFIGS, ConfigError, ModelConfig, builtin_config_dict
from deepseek_model.rope import yarn_correction_range


def test_v3_published_values():
    cfg = ModelConfig.builtin("deepseek-v3")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.mtp_layer_index) == (7168, 61, 61)
    assert cfg.latent_dim == 576 and cfg.qk_head_dim == 192
    assert cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc" and cfg.norm_topk_prob
    assert cfg.quantization.block_size == (128, 128) and cfg.quantization.scale_fmt is None
    # 192^-0.5 * (0.1 * ln 40 + 1)^2
    assert cfg.softmax_scale == pytest.approx(0.13523, abs=1e-5)
    assert yarn_correction_range(32, 1, 64, 10000, 4096) == (10, 23)
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, False, False, True]


def test_variants():
    assert ModelConfig.builtin("deepseek-v3.1").quantization.scale_fmt == "ue8m0"
    v2 = ModelConfig.builtin("deepseek-v2")
    assert (v2.scoring_func, v2.topk_method, v2.topk_group, v2.routed_scaling_factor) == (
        "softmax", "group_limited_greedy", 3, 16.0)
    lite = ModelConfig.builtin("deepseek-v2-lite")
    assert lite.q_lora_rank is None and lite.topk_method == "greedy" and lite.n_shared_experts == 2
    assert lite.rope_scaling.mscale_all_dim == pytest.approx(0.707)
    for name in BUILTIN_CONFIGS:
        ModelConfig.builtin(name)


def test_transformers_5_spellings():
    d = builtin_config_dict("deepseek-v3")
    rope = d.pop("rope_scaling")
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in rope.items() if k != "type"}}
    d["rope_parameters"] = rope
    d["dtype"] = d.pop("torch_dtype")
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_scaling == ModelConfig.builtin("deepseek-v3").rope_scaling
    assert cfg.torch_dtype == "bfloat16" and cfg.rope_theta == 10000.0


@pytest.mark.parametrize("change, message", [
    ({"n_group": 7}, "not divisible by n_group"),
    ({"topk_group": 9}, "topk_group (9) exceeds n_group (8)"),
    ({"scoring_func": "relu"}, "unknown scoring_func 'relu'"),
    ({"topk_method": "random"}, "unknown topk_method 'random'"),
    ({"hidden_size": None}, "missing required field 'hidden_size'"),
    ({"qk_rope_head_dim": 63}, "must be even"),
    ({"num_experts_per_tok": 257}, "exceeds n_routed_experts"),
    ({"hidden_size": [64]}, "'hidden_size' must be an integer, got [64]"),
    ({"hidden_size": "7168"}, "'hidden_size' must be an integer, got '7168'"),
    ({"num_hidden_layers": True}, "'num_hidden_layers' must be an integer, got True"),
    ({"num_hidden_layers": 1000000000}, "'num_hidden_layers' is 1000000000, beyond the sanity bound 1024"),
    ({"vocab_size": 10 ** 12}, "'vocab_size' is 1000000000000, beyond the sanity bound"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite number, got nan"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps must be positive, got 0.0"),
    ({"routed_scaling_factor": float("inf")}, "'routed_scaling_factor' must be a finite number, got inf"),
    ({"rope_theta": -1.0}, "rope_theta must be positive"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "unsupported rope scaling type"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings is true, but DeepSeek models keep a separate lm_head"),
    ({"tie_word_embeddings": "no"}, "'tie_word_embeddings' must be true or false, got 'no'"),
    ({"norm_topk_prob": "false"}, "'norm_topk_prob' must be true or false, got 'false'"),  # bool("false") is True
    ({"model_type": "llama"}, "model_type 'llama' is not a DeepSeek V2/V3-style model (expected one of deepseek_v2"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object or null, got 'yarn'"),
    ({"rope_scaling": None, "rope_parameters": [4.0]}, "rope_scaling must be an object or null, got [4.0]"),
    ({"eos_token_id": -1}, "'eos_token_id' must be a token id, a list of them or null, got -1"),
    ({"eos_token_id": [1, "2"]}, "'eos_token_id' must be a token id, a list of them or null, got [1, '2']"),
    ({"bos_token_id": [0]}, "'bos_token_id' must be a token id or null, got [0]"),
    ({"n_group": 0}, "n_group must be positive, got 0"),  # not silently taken as 1
    ({"topk_group": 0}, "topk_group must be positive, got 0"),
    ({"n_shared_experts": -1}, "n_shared_experts must be >= 0, got -1"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be positive, got 0"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported (DeepSeek models use 'silu'"),
    ({"attention_bias": True}, "attention_bias True is not supported"),
    ({"rope_interleave": False}, "rope_interleave False is not supported"),
    ({"quantization_config": [1]}, "quantization_config must be an object or null, got [1]"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 64]}},
     "weight_block_size must be two equal integers [b, b] (square blocks), got [128, 64]"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": "ab"}}, "weight_block_size must be two"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 0]}},
     "weight_block_size [0, 0] is invalid"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
     "activation_scheme 'static' unsupported (dynamic)"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 0}},
     "rope_scaling.original_max_position_embeddings must be positive, got 0"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 0}},
     "rope_scaling.beta_fast must be positive"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 1,
                       "beta_slow": 32}}, "rope_scaling.beta_fast (1) is below beta_slow (32)"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "mscale": -1}},
     "rope_scaling.mscale must be >= 0"),
])
def test_validation_errors(change, message):
    d = builtin_config_dict("deepseek-v3")
    d.update(change)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d, source="x/config.json")
    assert message in str(e.value) and str(e.value).startswith("x/config.json:")
    assert "\n" not in str(e.value)


def test_token_ids_and_flags_are_read_as_written():
    d = dict(builtin_config_dict("deepseek-v3"), eos_token_id=[1, 7], bos_token_id=0, norm_topk_prob=False)
    cfg = ModelConfig.from_dict(d)
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.norm_topk_prob) == ([1, 7], 0, False)


def test_from_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_to_dict_round_trip(tmp_path):
    cfg = ModelConfig.builtin("tiny")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    again = ModelConfig.from_json(tmp_path)
    assert again == cfg
    assert math.isclose(again.softmax_scale, cfg.softmax_scale)
