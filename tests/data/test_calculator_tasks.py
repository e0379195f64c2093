from offpolicy.data import calculator


def test_generation_is_deterministic_in_seed():
    a = calculator.generate("train", 300, seed=7)
    b = calculator.generate("train", 300, seed=7)
    c = calculator.generate("train", 300, seed=8)
    assert [t.prompt for t in a] == [t.prompt for t in b]
    assert [t.prompt for t in a] != [t.prompt for t in c]


def test_train_and_eval_splits_are_disjoint_across_seeds():
    train = {t.prompt for s in range(3) for t in calculator.generate("train", 3000, seed=s)}
    held_out = {t.prompt for s in range(3) for t in calculator.generate("eval", 500, seed=s)}
    assert len(held_out) > 500  # seeds give different held-out draws
    assert not train & held_out


def test_answers_are_exact_products_and_shapes_take_turns():
    tasks = calculator.generate("eval", 200, seed=0)
    for i, t in enumerate(tasks):
        a, b = t.prompt.removesuffix("=").split("*")
        assert (len(a), len(b)) == calculator.SHAPES[i % 2] and t.level == len(b)
        assert t.answer == str(int(a) * int(b))
        assert set(t.prompt) <= set(calculator.ALPHABET)
    assert len({t.prompt for t in tasks}) == 200


def test_calculator_computes_int_op_int_and_refuses_the_rest():
    assert calculator.calculate("482*77") == "37114"
    assert calculator.calculate("12+5") == "17"
    assert calculator.calculate("12-50") == "-38"
    for bad in ("", "482*", "*77", "4*7*7", "[482*77", "48?2*77", "482=77"):
        assert calculator.calculate(bad) == "?"


def test_tool_demonstration_is_call_observation_answer():
    task = calculator.Task("t", "482*77=", "37114")
    assert calculator.tool_demonstration(task) == ("[482*77]", "{37114}", "37114")


def test_stream_is_endless_and_reproducible():
    s1, s2 = calculator.stream(seed=3, chunk=50), calculator.stream(seed=3, chunk=50)
    first = [next(s1).prompt for _ in range(120)]
    assert first == [next(s2).prompt for _ in range(120)]
