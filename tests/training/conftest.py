"""Training tests: one intra-op thread (the machine is shared; small GEMMs gain nothing from more)."""

import pytest

from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model.testing import one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def micro_cfg():
    """The tiny architecture, shrunk further: 2 layers (1 dense, 1 MoE) + MTP, 8 experts in 4 groups."""
    d = builtin_config_dict("tiny")
    d.update({"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 32,
              "q_lora_rank": 48, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
              "n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2})
    return ModelConfig.from_dict(d, source="micro")
