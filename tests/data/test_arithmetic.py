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


def test_slipped_answer_adds_without_carry_and_subtracts_smaller_from_larger():
    # 37 + 48: columns 3+4=7, 7+8=15 -> 5 (carry dropped): 75 instead of 85
    assert arithmetic.slipped_answer([(37, 48, "+")]) == 75
    # 85 + 37: 8+3=11 -> 1, 5+7=12 -> 2: 12 instead of 122 (both carries dropped)
    assert arithmetic.slipped_answer([(85, 37, "+")]) == 12
    # 52 - 27: |5-2|=3, |2-7|=5: 35 instead of 25 (smaller from larger, no borrow)
    assert arithmetic.slipped_answer([(52, 27, "-")]) == 35
    # 17 - 62 = -(62 - 17): |6-1|=5, |2-7|=5 -> -55 instead of -45
    assert arithmetic.slipped_answer([(17, 62, "-")]) == -55
    # no carry / no borrow: unchanged (31 + 42 = 73, 96 - 21 = 75, 12 - 65 = -(53))
    assert arithmetic.slipped_answer([(31, 42, "+")]) == 73
    assert arithmetic.slipped_answer([(96, 21, "-")]) == 75
    assert arithmetic.slipped_answer([(12, 65, "-")]) == -53
    # two steps: 37 + 48 - 9 -> 75 (slipped) then 75 - 09: |7-0|=7, |5-9|=4 -> 74 (true answer 76)
    assert arithmetic.slipped_answer([(37, 48, "+"), (85, 9, "-")]) == 74


def test_task_meta_records_the_slip():
    for t in arithmetic.generate("train", 200, seed=1):
        assert t.meta["carry"] == (t.meta["slipped"] != t.answer)


def test_stream_is_endless_and_reproducible():
    s1, s2 = arithmetic.stream(seed=3, chunk=50), arithmetic.stream(seed=3, chunk=50)
    first = [next(s1).prompt for _ in range(120)]
    assert first == [next(s2).prompt for _ in range(120)]
