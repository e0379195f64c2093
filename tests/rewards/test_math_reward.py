"""math_reward / format_reward / combine_rewards: answer formats, a hand-labelled table, GSM8K rows,
threads and worker processes, and the ``reward.function`` combination syntax."""

import json
import pickle
import threading
import time
from pathlib import Path

import pytest

from offpolicy.config import Config, ConfigError, RewardConfig
from offpolicy.pipeline.context import reward_function
from offpolicy.rewards import REWARDS, WeightedSum, combine_rewards, format_reward, math_reward
from offpolicy.rewards.guard import GuardedReward
from offpolicy.rewards.math import final_answer, truth_answer

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")


# ---------------------------------------------------------------------------------------------------
# Extraction rules, one by one


@pytest.mark.parametrize("response, answer", [
    ("48 + 24 = 72\n#### 72", "72"),
    ("#### 1,200", "1,200"),
    ("#### $18 dollars", "18"),
    ("so \\boxed{\\frac{1}{2}} and then", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("first \\boxed{3}, then \\boxed{4}", "4"),  # the last box
    ("$\\boxed 7$", "7"),
    ("\\boxed{18 \\text{ dollars}}", "18"),
    ("<think>2+2</think><answer>4</answer>", "4"),
    ("<answer>The answer is 12 apples.</answer>", "12"),
    ("<answer>48 + 24 = 72</answer>", "72"),
    ("The answer is 18.", "18"),
    ("So the final answer is: $1,000.", "1,000"),
    ("**Final Answer:** 42", "42"),
    ("Answer: -3", "-3"),
    ("The answer is 18 because 3 + 15 = 18.", "18"),
    ("Q: what is 2+3?\nA: 5", "5"),
    ("She has 5 apples and buys 3 more, so 8.", "8"),
    ("The price dropped to \u22123 dollars", "-3"),
    ("Half of them, i.e. 50%, left.", "50%"),
    ("on the 13th day she rode 6 miles", "6"),  # an ordinal is not a number
    ("", None), ("   ", None), ("no numbers here", None), (None, None), (12, None),
])
def test_final_answer(response, answer):
    assert final_answer(response) == answer


@pytest.mark.parametrize("truth, answer", [
    ("18", "18"), ("1,000", "1,000"), ("$5", "5"), ("-3", "-3"), ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"), ("#### 1,200", "1,200"),
    ("The area is $\\boxed{2\\sqrt{3}}$.", "2\\sqrt{3}"), (18, "18"), (0.5, "0.5"), ("", None), (None, None),
])
def test_truth_answer(truth, answer):
    assert truth_answer(truth) == answer


@pytest.mark.parametrize("response, truth", [
    ("1,000", "1000"), ("1000", "1,000"), ("$5", "5"), ("5", "$5.00"), ("18 dollars", "18"), ("5 cm", "5"),
    ("18.", "18"), ("50%", "50"), ("50%", "0.5"), ("50", "50\\%"), ("1/2", "0.5"), ("\\frac{1}{2}", "1/2"),
    ("\\dfrac{1}{2}", "0.5"), ("\\tfrac12", "0.5"), ("-3", "-3"), ("-$3", "-3"), ("0.50", "0.5"),
    ("$\\frac{3}{4}$", "0.75"), ("\\(\\frac{3}{4}\\)", "3/4"), ("\\[ 12 \\]", "12"), ("1{,}000", "1000"),
    ("007", "7"), ("0.3333333", "1/3"),
])
def test_equal_forms(response, truth):
    assert math_reward(f"The answer is {response}", truth) == 1.0


@pytest.mark.parametrize("response, truth", [
    ("-3", "3"), ("3", "-3"), ("0.5", "5"), ("50%", "5"), ("1/2", "2"), ("1,2", "12"), ("0.333", "1/3"),
    ("72", "7"), ("7", "72"), ("5 - 3 = 2", "-3"),
])
def test_unequal_forms(response, truth):
    assert math_reward(f"The answer is {response}", truth) == 0.0


@pytest.mark.parametrize("response, truth", [
    ("1450001", "1,450,000"), ("1,449,999", "1450000"), ("109200001", "109,200,000"), ("-2000001", "-2000000"),
])
def test_large_integers_off_by_one_are_wrong(response, truth):
    """The relative tolerance (1e-6) is for decimals: 1450001 is within 6.9e-7 of 1450000 but is a wrong answer
    (18 GSM8K answers are over a million)."""
    assert math_reward(f"The answer is {response}", f"#### {truth}") == 0.0
    assert math_reward(f"The answer is {truth}", f"#### {truth}") == 1.0


def test_several_numbers_final_answer_wins():
    text = "She buys 3 packs of 12 eggs, 36 eggs. She uses 18, so 36 - 18 = 18 are left."
    assert math_reward(text, "18") == 1.0
    assert math_reward(text, "36") == 0.0
    assert math_reward("Earlier I said 36, but the answer is 18.", "36") == 0.0
    assert math_reward("The answer is 36. Let me recheck: 36 - 18 = 18.", "36") == 1.0  # the stated answer


def test_priority_of_rules():
    assert math_reward("The answer is 5. \\boxed{6}", "6") == 1.0  # boxed beats "the answer is"
    assert math_reward("\\boxed{6}\n#### 7", "7") == 1.0  # #### beats boxed
    assert math_reward("<answer>8</answer> The answer is 9", "8") == 1.0  # the tag beats the phrase
    assert math_reward("The answer is 9. Then 10 more.", "9") == 1.0  # the phrase beats the last number


@pytest.mark.parametrize("response", ["", "   ", None, 5, b"18", "\\boxed{", "\\boxed{}", "####", "<answer></answer>",
                                      "}}}{{{\\frac{", "NaN", "inf", "1/0", "\\frac{1}{0}", "x" * 100_000,
                                      "9" * 5000, "1e999", "\\boxed{" * 1000])
def test_garbage_is_zero_and_does_not_raise(response):
    assert math_reward(response, "18") == 0.0


@pytest.mark.parametrize("response", [
    "\\boxed{" * 5000, "The answer is 5" + " " * 100_000 + "x", "answer" + " " * 100_000 + "x",
    "\nA:" + " " * 100_000, "-" * 100_000 + "5", "1," * 50_000, "{" * 50_000 + "\\boxed{" + "}" * 20_000,
    "answer: " * 20_000, "5 %" * 30_000,
])
def test_adversarial_input_is_linear_time(response):
    t0 = time.perf_counter()
    math_reward(response, "5")
    # 20-130 ms each on a quiet machine; a quadratic scan of 100k characters (~1e10 steps) or catastrophic
    # backtracking takes minutes. The bound leaves room for a loaded CI machine (1.0 s once failed at 1.01 s).
    assert time.perf_counter() - t0 < 10.0


@pytest.mark.parametrize("truth", ["", None, "   ", "####", [], {"a": 1}])
def test_bad_truth_is_zero(truth):
    assert math_reward("The answer is 18", truth) == 0.0


def test_symbolic_answers_use_math_verify():
    assert math_reward("\\boxed{\\sqrt{12}}", "2\\sqrt{3}") == 1.0
    assert math_reward("\\boxed{\\sqrt{13}}", "2\\sqrt{3}") == 0.0
    assert math_reward("The answer is $\\frac{\\pi}{2}$.", "\\pi/2") == 1.0
    assert math_reward("\\boxed{x + 5}", "5 + x") == 1.0
    assert math_reward("\\boxed{x = 5}", "5") == 1.0
    assert math_reward("\\boxed{(1, 2)}", "(1,2)") == 1.0
    assert math_reward("\\boxed{\\text{Monday}}", "Monday") == 1.0


# ---------------------------------------------------------------------------------------------------
# Hand-labelled table: realistic model outputs, each label decided by reading the response.

TABLE = [
    # GSM8K-style chain of thought, plain last number
    ("Each ticket costs $40, and 30 people come. 40 * 30 = 1200. So she pays $1,200 in total.", "1200", 1),
    ("Each ticket costs $40, and 30 people come. 40 * 30 = 1200. So she pays $1,200 in total.", "#### 1200", 1),
    ("Each ticket costs $40, and 30 people come. So she pays $1,100 in total.", "1200", 0),
    ("Natalia sold 48/2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips.", "72", 1),
    ("Natalia sold 48/2 = 24 clips in May.", "72", 0),
    ("He runs 3 sprints 3 times a week, 60 meters each: 3 * 3 * 60 = 540 meters a week.", "540", 1),
    ("Weng earns 12/60 = $0.2 per minute, so for 50 minutes she earns 0.2 x 50 = $10.", "10", 1),
    ("Weng earns 12/60 = $0.2 per minute, so for 50 minutes she earns 0.2 x 50 = $10.", "0.2", 0),
    ("The pool holds 60,000 liters.", "60000", 1),
    ("The pool holds 60,000 liters, and 6,000 evaporate, leaving 54,000 liters.", "60000", 0),
    ("The temperature fell from 5 to -7 degrees.", "-7", 1),
    ("The temperature fell by 12 degrees, from 5 to -7.", "12", 0),
    ("She saves 25% of her salary.", "25", 1),
    ("A dozen costs $3.50, so half a dozen costs $1.75.", "1.75", 1),
    ("A dozen costs $3.50, so half a dozen costs $1.75.", "3.5", 0),
    ("John is 3 times as old as Mary, who is 12, so John is 36 years old.", "36", 1),
    ("John is 36 years old.", "36.0", 1),
    ("The garden is 5 m by 4 m, so its area is 20 square meters.", "20", 1),
    ("It takes 2.5 hours.", "2.5", 1),
    ("It takes 2.5 hours.", "2", 0),
    # "The answer is" phrases, including wrong answers after the right number
    ("First 18 + 2 = 20, then half of that is 10. The answer is 10.", "10", 1),
    ("First she has 18 apples. After giving away 2 she has 16. The answer is 16.", "18", 0),
    ("The answer is 18, not 20.", "18", 1),
    ("The answer is 18, not 20.", "20", 0),
    ("Let me compute: 7 * 8 = 56. The final answer is: 56", "56", 1),
    ("Therefore, the answer is $\\$1,250$.", "1250", 1),
    ("Final Answer: The final answer is $42$. I hope it is correct.", "42", 1),
    ("Final Answer: The final answer is $41$. I hope it is correct.", "42", 0),
    ("So the answer is 3/4 of a cup.", "0.75", 1),
    ("Answer: 0.5", "\\frac{1}{2}", 1),
    ("Answer: 5", "0.5", 0),
    ("The answer is: 100 percent.", "100", 1),
    ("the answer is 6 feet", "6", 1),
    ("**Answer:**\nLet's think step by step. She has 3 + 4 = 7 apples.", "7", 1),
    ("The answer is Monday.", "Monday", 1),
    ("The answer is Monday.", "Tuesday", 0),
    ("The answer is 6 feet. 6 feet is 72 inches.", "72", 0),
    # Q/A few-shot style
    ("Q: Tom has 3 cats and 2 dogs. How many pets?\nA: 3 + 2 = 5", "5", 1),
    ("A: She reads 12 pages and then 24, so 36 pages in total.", "36", 1),
    ("A: 12\nQ: next question... 99", "12", 1),
    # GSM8K #### outputs
    ("Mark has 10 - 3 = 7 marbles left.\n#### 7", "7", 1),
    ("Mark has 10 - 3 = 7 marbles left.\n#### 3", "7", 0),
    ("She pays 1,200 dollars.\n#### 1,200", "1200", 1),
    ("#### $1,200.00", "1200", 1),
    # boxed LaTeX
    ("We have $x^2 = 16$, and $x > 0$, so $x = \\boxed{4}$.", "4", 1),
    ("We have $x^2 = 16$, so $x = \\boxed{-4}$.", "4", 0),
    ("The probability is $\\boxed{\\dfrac{3}{8}}$.", "3/8", 1),
    ("The probability is $\\boxed{\\dfrac{3}{8}}$.", "0.375", 1),
    ("The probability is $\\boxed{\\dfrac{5}{8}}$.", "3/8", 0),
    ("Thus the area is \\boxed{12\\pi}.", "12\\pi", 1),
    ("Thus the area is \\boxed{12\\pi}.", "12", 0),
    ("The distance is $\\boxed{2\\sqrt{5}}$ units.", "\\sqrt{20}", 1),
    ("The distance is $\\boxed{2\\sqrt{5}}$ units.", "2\\sqrt{3}", 0),
    ("I get \\boxed{18}, though earlier I wrote \\boxed{17}... no: \\boxed{18}", "18", 1),
    ("Candidate \\boxed{17}? No. Final: \\boxed{18}", "17", 0),
    ("The total is $\\boxed{\\$1{,}200}$.", "1200", 1),
    ("$$\\boxed{50\\%}$$", "50", 1),
    ("So $\\boxed{0.50}$ is the chance.", "\\frac12", 1),
    ("The roots are $\\boxed{1, 2}$.", "1,2", 1),
    # <answer> tags (R1 style)
    ("<think>48/2 = 24 in May; 48 + 24 = 72.</think>\n<answer>72</answer>", "72", 1),
    ("<think>48/2 = 24 in May; 48 + 24 = 72.</think>\n<answer>24</answer>", "72", 0),
    ("<think>The cost is 3 * 400.</think> <answer>$1,200</answer>", "1200", 1),
    ("<think>It is a half.</think><answer>\\frac{1}{2}</answer>", "0.5", 1),
    ("<think>Sum is 10.</think><answer>So the total is 10 apples.</answer>", "10", 1),
    ("<think>Sum is 10.</think><answer>So the total is 11 apples.</answer>", "10", 0),
    ("<think>x = 3</think><answer>x = 3</answer>", "3", 1),
    # truncated / rambling / no answer
    ("Let me think step by step. First, we need", "18", 0),
    ("I am not sure how to solve this.", "0", 0),
    ("The answer is", "18", 0),
    ("<answer></answer>", "18", 0),
]


def test_hand_labelled_table():
    assert len(TABLE) >= 60
    wrong = [(r, t, want) for r, t, want in TABLE if math_reward(r, t) != float(want)]
    assert not wrong, wrong


# ---------------------------------------------------------------------------------------------------
# GSM8K reference solutions


@pytest.mark.skipif(not GSM8K.exists(), reason="GSM8K data not present")
def test_gsm8k_reference_solutions():
    with GSM8K.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(500))]
    answers = [row["answer"].rsplit("####", 1)[1].strip() for row in rows]
    n = len(rows)
    own = sum(math_reward(row["answer"], row["answer"]) for row in rows)
    pairs = [(i, (i + 1) % n) for i in range(n) if answers[i] != answers[(i + 1) % n]]
    other = sum(math_reward(rows[i]["answer"], rows[j]["answer"]) for i, j in pairs)
    assert own / n >= 0.99 and other / len(pairs) <= 0.01
    # Without the "####" line only the last number is left, which is the answer in about 97% of rows.
    bare = sum(math_reward(row["answer"].rsplit("####", 1)[0], a) for row, a in zip(rows, answers))
    assert bare / n >= 0.95


@pytest.mark.skipif(not GSM8K.exists(), reason="GSM8K data not present")
def test_speed_on_gsm8k_chain_of_thought():
    with GSM8K.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(500))]
    responses = [row["answer"].rsplit("####", 1)[0] + " So the answer is 42." for row in rows]
    math_reward(responses[0], rows[0]["answer"])
    t0 = time.perf_counter()
    for response, row in zip(responses, rows):
        math_reward(response, row["answer"])
    assert (time.perf_counter() - t0) / len(rows) < 5e-3  # measured ~40 us; a loose bound for shared CPUs


# ---------------------------------------------------------------------------------------------------
# Threads and processes


def test_from_a_worker_thread():
    cases = [("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0), ("The answer is 18.", "18", 1.0),
             ("\\boxed{x+1}", "x+2", 0.0), ("garbage", "5", 0.0)]
    results, errors = [], []

    def work():
        try:
            results.extend(math_reward(r, t) for r, t, _ in cases)
        except BaseException as e:  # noqa: BLE001 -- surfaced below
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not errors and results == [want for _, _, want in cases]


def test_in_a_worker_process():
    guarded = GuardedReward(combine_rewards({"math": 1.0, "format": 0.5}), timeout_s=120)
    try:
        scored = guarded([("<think>2+2</think><answer>\\boxed{\\frac{8}{2}}</answer>", "4"), ("5", "4")])
    finally:
        guarded.close()
    assert [s.value for s in scored] == [1.5, 0.0]


# ---------------------------------------------------------------------------------------------------
# format_reward and combinations


@pytest.mark.parametrize("response, want", [
    ("<think>2+2=4</think><answer>4</answer>", 1.0),
    ("  <think>\nsteps\n</think>\n\n<answer> 4 </answer>\n", 1.0),
    ("<think></think><answer>4</answer>", 1.0),
    ("<think>x</think><answer> </answer>", 0.0),  # a blank answer
    ("<answer>4</answer>", 0.0),
    ("<think>x</think>", 0.0),
    ("<answer>4</answer><think>x</think>", 0.0),
    ("Sure! <think>x</think><answer>4</answer>", 0.0),
    ("<think>x</think><answer>4</answer> Hope this helps", 0.0),
    ("<think>x</think>middle<answer>4</answer>", 0.0),
    ("<think>x</think><answer>4</answer><answer>5</answer>", 0.0),
    ("<think>a<think>b</think><answer>4</answer>", 0.0),
    ("<think>x</think><answer>4", 0.0),
    ("", 0.0), (None, 0.0),
])
def test_format_reward(response, want):
    assert format_reward(response) == want
    assert format_reward(response, "anything") == want


def test_registry_and_public_names():
    import offpolicy.rewards as rewards

    assert REWARDS["math"] is math_reward and REWARDS["format"] is format_reward
    assert rewards.math_reward("#### 7", "7") == 1.0 and callable(rewards.combine_rewards)


def test_combine_rewards():
    response = "<think>2+2</think><answer>4</answer>"
    both = combine_rewards({"math": 1.0, "format": 0.1})
    assert both(response, "4") == pytest.approx(1.1, abs=1e-12)
    assert both(response, "5") == pytest.approx(0.1, abs=1e-12)
    assert both("4", "4") == 1.0
    listed = combine_rewards([(math_reward, 2.0), ("format", -0.5)])
    assert listed(response, "4") == 1.5
    assert repr(both) == "math_reward:1,format_reward:0.1"
    assert pickle.loads(pickle.dumps(both))(response, "4") == pytest.approx(1.1, abs=1e-12)
    with pytest.raises(ValueError, match="did you mean 'math'"):
        combine_rewards({"maths": 1.0})
    with pytest.raises(ValueError, match="finite"):
        combine_rewards({"math": float("nan")})
    with pytest.raises(ValueError, match="no rewards"):
        combine_rewards({})
    with pytest.raises(TypeError):
        combine_rewards([(3, 1.0)])


def _cfg(function: str) -> Config:
    return Config(reward=RewardConfig(function=function))


def test_reward_function_config_syntax():
    response = "<think>2+2</think><answer>4</answer>"
    assert reward_function(_cfg("math")) is math_reward
    assert reward_function(_cfg("offpolicy.rewards.math:format_reward")) is format_reward
    combined = reward_function(_cfg("math:1.0,format:0.1"))
    assert isinstance(combined, WeightedSum) and combined(response, "4") == pytest.approx(1.1, abs=1e-12)
    user = reward_function(_cfg(" offpolicy.rewards.math:math_reward:2 , format:1e-1 "))
    assert user(response, "4") == pytest.approx(2.1, abs=1e-12)
    assert reward_function(_cfg("format:0.5"))(response, "") == 0.5
    for bad, match in [("math,format", "needs a reward name and a weight"), ("math:1.0,format", "needs"),
                       ("maths:1.0", "unknown reward 'maths'"), (":1.0", "cannot import"),
                       ("math:1.0,nosuch.module:f:1", "cannot import")]:
        with pytest.raises(ConfigError, match=match):
            reward_function(_cfg(bad))
