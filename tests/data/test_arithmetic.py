from offpolicy.data import arithmetic


def test_generation_is_deterministic_in_seed():
    a = arithmetic.generate("train", 300, seed=7)
    b = arithmetic.generate("train", 300, seed=7)
    c = arithmetic.generate("train", 300, seed=8)
    assert [t.prompt for t in a] == [t.prompt for t in b]
    assert [t.prompt for t in a] != [t.prompt for t in c]


def test_train_and_eval_splits_are_disjoint_across_seeds():
    train = {t.prompt for s in range(3) for t in arithmetic.generate("train", 3000, seed=s)}
    held_out = {t.prompt for s in range(3) for t in arithmetic.generate("eval", 500, seed=s)}
    assert len(held_out) > 500  # seeds give different held-out draws
    assert not train & held_out


def test_answers_are_correct_and_levels_mix():
    tasks = arithmetic.generate("eval", 200, seed=0, levels=(1, 2))
    assert {t.level for t in tasks} == {1, 2}
    for t in tasks:
        assert t.prompt.endswith("=")
        assert int(t.answer) == eval(t.prompt[:-1])  # the expression is plain Python arithmetic
        assert (t.prompt.count("+") + t.prompt.count("-")) == t.level


def test_slipped_answer_drops_units_carries_and_borrows():
    # 37 + 48: units 7 + 8 = 15 carries, so the slip gives 75 instead of 85
    assert arithmetic.slipped_answer([(37, 48, "+")], 85) == 75
    # 52 - 27: units 2 < 7 borrows, so the slip gives 35 instead of 25
    assert arithmetic.slipped_answer([(52, 27, "-")], 25) == 35
    # 37 + 48 - 9 = 76: the carry (-10) and the borrow of 85 - 9 (5 < 9, +10) cancel: 76
    assert arithmetic.slipped_answer([(37, 48, "+"), (85, 9, "-")], 76) == 76
    # 37 + 48 - 3 = 82: only the carry slips -> 72
    assert arithmetic.slipped_answer([(37, 48, "+"), (85, 3, "-")], 82) == 72
    # no carry (31 + 42), no borrow (91 - 26 borrows? 1 < 6 yes -> 75; 96 - 21 no -> 75)
    assert arithmetic.slipped_answer([(31, 42, "+")], 73) == 73
    assert arithmetic.slipped_answer([(96, 21, "-")], 75) == 75
    assert arithmetic.slipped_answer([(91, 26, "-")], 65) == 75
    # a negative result is computed as -(65 - 12): no borrow there, so 12 - 65 is unchanged;
    # 17 - 62 = -(62 - 17) borrows (2 < 7): the slip gives -(55) instead of -(45)
    assert arithmetic.slipped_answer([(12, 65, "-")], -53) == -53
    assert arithmetic.slipped_answer([(17, 62, "-")], -45) == -55


def test_task_meta_records_the_slip():
    for t in arithmetic.generate("train", 200, seed=1):
        assert t.meta["carry"] == (t.meta["slipped"] != t.answer)


def test_stream_is_endless_and_reproducible():
    s1, s2 = arithmetic.stream(seed=3, chunk=50), arithmetic.stream(seed=3, chunk=50)
    first = [next(s1).prompt for _ in range(120)]
    assert first == [next(s2).prompt for _ in range(120)]
