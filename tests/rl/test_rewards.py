"""Rule rewards on hand-written strings; a failing reward function is reported, not trained on."""

import math

import pytest

from deepseek_model.rl import accuracy_reward, extract_answer, format_reward, rule_reward
from deepseek_model.rl.rewards import RewardError, score


@pytest.mark.parametrize("text, want", [
    ("<think>7+8=15 4+3+1=8</think><answer>85</answer>", 1.0),
    ("  <think>x</think>\n<answer>85</answer>\n", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<answer>85</answer>", 0.0),  # no reasoning part
    ("<think>x</think>", 0.0),  # no answer
    ("<answer>85</answer><think>x</think>", 0.0),  # wrong order
    ("<think>x</think><answer>85</answer> 1", 0.0),  # trailing text
    ("<think>x</think><answer>85</answer><answer>9</answer>", 0.0),  # two answers
    ("<think><think>x</think><answer>85</answer>", 0.0),  # tag repeated inside
    ("<think>x<answer>85</answer>", 0.0),  # reasoning never closed
    ("", 0.0),
])
def test_format_reward(text, want):
    assert format_reward(text) == want


@pytest.mark.parametrize("text, answer, want", [
    ("<think>7+8=15 4+3+1=8</think><answer>85</answer>", "85", 1.0),
    ("<think>...</think><answer> 85 </answer>", "85", 1.0),  # stripped
    ("<think>...</think><answer>86</answer>", "85", 0.0),
    ("<think>...</think><answer>850</answer>", "85", 0.0),
    ("85", "85", 0.0),  # an answer outside the tags does not count
    ("<answer>85</answer>", "85", 1.0),  # accuracy ignores the format
    ("<answer>1</answer> then <answer>85</answer>", "85", 1.0),  # the last answer counts
    ("<think>85</think><answer>", "85", 0.0),  # unterminated
])
def test_accuracy_reward(text, answer, want):
    assert accuracy_reward(text, answer) == want


def test_extract_answer():
    assert extract_answer("<think>a</think><answer> 12 </answer>") == "12"
    assert extract_answer("<think>a</think>") is None


def test_rule_reward_sums_accuracy_and_weighted_format():
    good = "<think>4+5=9</think><answer>9</answer>"
    assert rule_reward(good, "9") == 1.1
    assert rule_reward(good, "8") == pytest.approx(0.1)
    assert rule_reward("<answer>9</answer>", "9") == 1.0
    assert rule_reward("9", "9") == 0.0
    assert rule_reward(good, "9", format_weight=0.5) == 1.5


def test_score_reports_failures():
    assert score(lambda c, a: float(c == a), ["1", "2"], ["1", "1"]) == [1.0, 0.0]

    def boom(c, a):
        raise KeyError("no such problem")

    with pytest.raises(RewardError, match="reward function raised KeyError: 'no such problem' \\(output 0\\)"):
        score(boom, ["x"], ["y"])
    with pytest.raises(RewardError, match="reward function returned nan \\(output 1\\)"):
        score(lambda c, a: math.nan if c == "b" else 1.0, ["a", "b"], ["", ""])
    with pytest.raises(RewardError, match="returned inf"):
        score(lambda c, a: math.inf, ["a"], [""])
    with pytest.raises(RewardError, match="returned str, not a number"):
        score(lambda c, a: "high", ["a"], [""])
    with pytest.raises(ValueError, match="answers: 1 answers for 2 completions"):
        score(lambda c, a: 0.0, ["a", "b"], ["x"])
