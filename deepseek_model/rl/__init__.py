"""GRPO (DeepSeekMath / DeepSeek-R1-Zero): the exact objective, rule rewards and the sampling loop."""

from deepseek_model.rl.objective import GRPOTerms, group_advantages, grpo_loss, grpo_terms
from deepseek_model.rl.rewards import accuracy_reward, extract_answer, format_reward, rule_reward

__all__ = ["GRPOTerms", "accuracy_reward", "extract_answer", "format_reward", "group_advantages", "grpo_loss",
           "grpo_terms", "rule_reward"]
