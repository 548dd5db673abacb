"""Rule rewards of DeepSeek-R1-Zero: the accuracy of the final answer and the output format.

A completion is well formed when it is exactly `<think>…</think><answer>…</answer>` (whitespace
allowed around and between the two parts, nothing else). Its answer is the text between
`<answer>` and `</answer>`; accuracy compares it, stripped, with the reference answer. No learned
reward model is involved: both rewards are verifiable rules.
"""

from __future__ import annotations

import math
import re
from typing import Callable

FORMAT_RE = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(?P<answer>.*?)</answer>", re.DOTALL)
FORMAT_WEIGHT = 0.1  # the format reward counts this much next to an accuracy of 1

RewardFn = Callable[[str, str], float]  # (completion text, reference answer) -> reward


def format_reward(completion: str) -> float:
    """1.0 when `completion` is exactly `<think>…</think><answer>…</answer>` (outer/middle whitespace
    allowed, the tags once each), else 0.0."""
    m = FORMAT_RE.fullmatch(completion)
    if m is None:
        return 0.0
    inner = m.group("think") + m.group("answer")
    return 0.0 if any(tag in inner for tag in ("<think>", "</think>", "<answer>", "</answer>")) else 1.0


def extract_answer(completion: str) -> str | None:
    """The stripped text of the last `<answer>…</answer>` in `completion`, or None without one."""
    found = ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer (see `extract_answer`) equals `answer` (stripped), else 0.0."""
    got = extract_answer(completion)
    return 1.0 if got is not None and got == answer.strip() else 0.0


def rule_reward(completion: str, answer: str, format_weight: float = FORMAT_WEIGHT) -> float:
    """accuracy + format_weight · format: the R1-Zero reward of one completion.

    Args:
        completion: the decoded output (without the EOS token).
        answer: the reference answer.
        format_weight: weight of the format reward.

    Returns:
        A reward in [0, 1 + format_weight].
    """
    return accuracy_reward(completion, answer) + format_weight * format_reward(completion)


class RewardError(ValueError):
    """A reward function raised or returned a non-finite value; the step is skipped."""


def score(reward_fn: RewardFn, completions: list[str], answers: list[str]) -> list[float]:
    """Rewards of every completion, or a RewardError describing the first failure.

    Args:
        reward_fn: called as reward_fn(completion, answer).
        completions: decoded outputs.
        answers: the reference answer of each output.

    Raises:
        RewardError: the function raised, returned a non-number, NaN or ±inf.
    """
    if len(completions) != len(answers):
        raise ValueError(f"answers: {len(answers)} answers for {len(completions)} completions")
    out = []
    for i, (c, a) in enumerate(zip(completions, answers)):
        try:
            r = reward_fn(c, a)
        except Exception as e:  # noqa: BLE001 — any failure of user code skips the step
            raise RewardError(f"reward function raised {type(e).__name__}: {e} (output {i})") from None
        try:
            value = float(r)
        except (TypeError, ValueError):
            raise RewardError(f"reward function returned {type(r).__name__}, not a number (output {i})") from None
        if not math.isfinite(value):
            raise RewardError(f"reward function returned {value} (output {i})")
        out.append(value)
    return out
