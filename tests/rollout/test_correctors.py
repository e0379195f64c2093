"""OPA-DPO correctors (offpolicy.rollout.correctors): ground truth, a stronger model's minimal revision,
a user function with per-sample faults, and the errors of a bad spec."""

import pytest

from offpolicy.rollout.correctors import CorrectorError, Revisable, build_corrector

ITEMS = [Revisable("44+29=", "63", "73", False), Revisable("69-25=", "44", "44", True)]


def test_ground_truth_keeps_correct_answers_and_replaces_wrong_ones():
    assert build_corrector("ground_truth")(ITEMS) == ["73", "44"]


def _fix_tens(prompt, response, answer):
    if response == "boom":
        raise ZeroDivisionError("user bug")
    return answer[0] + response[1:]


def test_a_user_function_revises_and_its_faults_stay_with_their_samples():
    corrector = build_corrector(f"{__name__}:_fix_tens")
    assert corrector([*ITEMS, Revisable("1+1=", "boom", "2", False)]) == ["73", "44", None]
    assert corrector.faults == 1 and "ZeroDivisionError: user bug" in corrector.first_fault


def test_a_stronger_model_keeps_the_prefix_it_agrees_with_and_continues_greedily():
    import torch

    from offpolicy.rollout.engine import HFEngine
    from offpolicy.rollout.model import load_policy
    from offpolicy.rollout.workflow import encode_prompt
    from offpolicy.data.arithmetic import generate

    model, tok = load_policy("bundled")
    tasks = generate("eval", 8, seed=0, levels=(1,))
    ro = HFEngine(model, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id).generate(
        [encode_prompt(tok, t) for t in tasks], max_new_tokens=5, greedy=True)
    greedy = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
    corrector = build_corrector("model:bundled", max_new_tokens=5)  # the expert is the policy itself here
    wrong = [str(9 - int(g[0])) + g[1:] if g[0].isdigit() else "7" + g[1:] for g in greedy]  # first token differs
    items = [Revisable(t.prompt, w, t.answer, False) for t, w in zip(tasks, wrong)]
    assert corrector(items) == greedy  # diverges at token 0: the expert's greedy answer from the start
    # a response the expert agrees with stays; a correct one is not sent to the expert at all
    assert corrector([Revisable(t.prompt, g, t.answer, False) for t, g in zip(tasks, greedy)]) == greedy
    assert corrector([Revisable(tasks[0].prompt, "12345", tasks[0].answer, True)]) == ["12345"]
    # a slip after an agreed prefix keeps the prefix: greedy "ab<eos>" and y_gen "a9" -> "ab"
    two = [(t, g) for t, g in zip(tasks, greedy) if len(g) >= 2][0]
    slip = two[1][0] + str((int(two[1][1]) + 1) % 10) + "0"
    assert corrector([Revisable(two[0].prompt, slip, two[0].answer, False)]) == [two[1]]
    # a response cut short, which the expert would go on writing, is extended: y_gen "7" for greedy "73"
    cut = [(t, g) for t, g in zip(tasks, greedy) if len(g) >= 2][0]
    assert corrector([Revisable(cut[0].prompt, cut[1][:-1], cut[0].answer, False)]) == [cut[1]]
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("spec, message", [
    ("grond_truth", "unknown corrector"),
    ("model:", "needs a model folder"),
    ("model:/no/such/folder", "is not a directory"),
    ("no_such_module_xyz:fn", "cannot import it"),
    ("ground_truth:extra", "takes no argument"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(CorrectorError, match=message):
        build_corrector(spec)
