"""Preference pairs: the standard format (text and conversational rows) from each source, row errors with
their place, token ids (prefix property under a real chat template), arithmetic pairs."""

import json

import pytest

from offpolicy.data.arithmetic import generate
from offpolicy.data.pairs import Pair, arithmetic_pairs, load_pairs, pair_token_ids, response_ids, write_pairs
from offpolicy.data.task_files import DatasetError
from offpolicy.rollout.model import BUNDLED, load_tokenizer

U = {"role": "user", "content": "What is 2+3?"}
SYS = {"role": "system", "content": "Answer with a number."}
GOOD = {"role": "assistant", "content": "5"}
BAD = {"role": "assistant", "content": "6"}

TEXT_ROW = {"prompt": "2+3=", "chosen": "5", "rejected": "6"}
CHAT_ROW = {"prompt": [SYS, U], "chosen": [GOOD], "rejected": [BAD]}
IMPLICIT_ROW = {"chosen": [SYS, U, GOOD], "rejected": [SYS, U, BAD]}  # no prompt: the shared prefix is it


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_and_conversational_rows_load_without_conversion(tmp_path):
    f = jsonl(tmp_path / "prefs.jsonl", [TEXT_ROW, CHAT_ROW, IMPLICIT_ROW, {**TEXT_ROW, "margin": 1.5, "extra": 0}])
    text, chat, implicit, margin = load_pairs(f)
    assert (text.prompt, text.chosen, text.rejected, text.conversational) == ("2+3=", "5", "6", False)
    assert text.pair_id == "prefs-1" and text.where == f"{f}:1"
    assert chat.conversational and chat.prompt_messages == (SYS, U)
    assert (chat.chosen_messages, chat.rejected_messages) == ((GOOD,), (BAD,))
    assert (chat.prompt, chat.chosen, chat.rejected) == ("What is 2+3?", "5", "6")
    assert implicit.prompt_messages == chat.prompt_messages and implicit.chosen_messages == (GOOD,)
    assert margin.margin == 1.5 and text.margin is None


def test_parquet_and_datasets_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [CHAT_ROW, {"prompt": [U], "chosen": [BAD], "rejected": [GOOD]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    a, b = load_pairs(tmp_path / "p.parquet")
    assert a.chosen_messages == (GOOD,) and b.prompt_messages == (U,) and b.where == f"{tmp_path / 'p.parquet'} row 1"
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([TEXT_ROW] * 2),
                          "test": datasets.Dataset.from_list([{**TEXT_ROW, "chosen": "4+1"}])}).save_to_disk(
        str(tmp_path / "ds"))
    assert len(load_pairs(tmp_path / "ds")) == 2
    (p,) = load_pairs(tmp_path / "ds", split="test")
    assert p.chosen == "4+1" and p.where.endswith("[test] row 0")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "2+3=", "chosen": "5"}, "missing field 'rejected'"),
    ({"chosen": "5", "rejected": "6"}, "missing field 'prompt'"),  # text rows need their prompt
    ({**TEXT_ROW, "chosen": "  "}, "field 'chosen' is empty"),
    ({**TEXT_ROW, "rejected": 6}, "field 'rejected' holds a int"),
    ({**TEXT_ROW, "rejected": "5"}, "'chosen' and 'rejected' are the same"),
    ({**CHAT_ROW, "rejected": [GOOD]}, "'chosen' and 'rejected' are the same"),
    ({"chosen": [U, GOOD], "rejected": [U, GOOD]}, "same conversation"),
    ({"chosen": [U, GOOD], "rejected": [U]}, "prefix of the other"),
    ({"chosen": [GOOD], "rejected": [BAD]}, "share no leading messages"),
    ({**CHAT_ROW, "chosen": "5"}, "are message lists but chosen is text"),
    ({**CHAT_ROW, "chosen": [{"role": "assistant"}]}, "message 0 must be an object"),
    ({**CHAT_ROW, "chosen": []}, "empty message list"),
    ({**CHAT_ROW, "chosen": [U, GOOD]}, "must start with an assistant message"),
    ({**TEXT_ROW, "margin": "big"}, "'margin' must be a finite number"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    f = jsonl(tmp_path / "bad.jsonl", [TEXT_ROW, "", row])  # the bad row is on line 3 (line 2 is blank)
    with pytest.raises(DatasetError) as e:
        load_pairs(f)
    assert str(e.value).startswith(f"{f}:3: ") and message in str(e.value)


def test_empty_and_unknown_sources(tmp_path):
    with pytest.raises(DatasetError, match="no preference pairs"):
        load_pairs(jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(DatasetError, match="unknown task file format"):
        load_pairs(tmp_path / "pairs.txt")


def test_plain_pair_ids_bundled_tokenizer():
    tok = load_tokenizer(BUNDLED)
    ids = pair_token_ids(tok, Pair("p", "37+48=", "85", "75"))
    assert ids.prompt_ids == tok("37+48=")["input_ids"] and ids.prompt_ids[0] == tok.bos_token_id
    assert ids.chosen_ids == tok("85", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids.rejected_ids) == "75<eos>"


def test_chat_pair_ids_are_the_conversation_after_the_prompt(smoke_model_dir):
    tok = load_tokenizer(str(smoke_model_dir))
    (pair,) = load_pairs(jsonl(smoke_model_dir.parent / "chat.jsonl", [CHAT_ROW]))
    ids = pair_token_ids(tok, pair)
    prompt_text = tok.apply_chat_template([SYS, U], tokenize=False, add_generation_prompt=True)
    assert ids.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    for reply, got in ((GOOD, ids.chosen_ids), (BAD, ids.rejected_ids)):
        full = tok(tok.apply_chat_template([SYS, U, reply], tokenize=False), add_special_tokens=False)["input_ids"]
        assert full[:len(ids.prompt_ids)] == ids.prompt_ids  # the prefix property
        assert ids.prompt_ids + got == full[:len(ids.prompt_ids) + len(got)]
        assert got[-1] == tok.eos_token_id and tok.decode(got) == reply["content"] + "<|im_end|>"
    # a plain pair with the same tokenizer: concatenation, then EOS
    plain = pair_token_ids(tok, Pair("p", "What is 2+3? ", "5", "6"))
    assert plain.chosen_ids == response_ids(tok, "5") and plain.chosen_ids[-1] == tok.eos_token_id


def test_a_template_that_breaks_the_prefix_is_refused(smoke_model_dir):
    tok = load_tokenizer(str(smoke_model_dir))
    # the generation prompt says "assistant:" but a rendered assistant turn says "bot:" — no prefix
    tok.chat_template = ("{% for m in messages %}{{ (m['role'] if m['role'] != 'assistant' else 'bot') + ': ' + "
                         "m['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DatasetError, match="not a prefix"):
        pair_token_ids(tok, Pair("p", "q", "5", "6", (U,), (GOOD,), (BAD,), where="f.jsonl:7"))
    # the bundled tokenizer (no template: plain rendering) knows only digits, + - =: the rest is refused
    with pytest.raises(DatasetError, match="f.jsonl:7: the prompt holds text the tokenizer cannot encode"):
        pair_token_ids(load_tokenizer(BUNDLED), Pair("p", "q", "5", "6", (U,), (GOOD,), (BAD,), where="f.jsonl:7"))


def test_arithmetic_pairs_and_round_trip(tmp_path):
    pairs = arithmetic_pairs("eval", 200, seed=3)
    tasks = generate("eval", 200, seed=3, levels=(1,))
    for p, t in zip(pairs, tasks):
        assert (p.prompt, p.chosen, p.answer) == (t.prompt, t.answer, t.answer)
        assert p.rejected != p.chosen and int(p.rejected) != int(t.answer)
        if t.meta["slipped"] != t.answer:  # 37+48 -> 75: the bundled model's typical slip
            assert p.rejected == t.meta["slipped"]
        else:
            assert int(p.rejected) - int(t.answer) in (-10, -2, -1, 1, 2, 10)
    assert 0 < sum(p.rejected == t.meta["slipped"] for p, t in zip(pairs, tasks)) < 200
    assert arithmetic_pairs("eval", 200, seed=3) == pairs  # deterministic
    for conversational in (False, True):
        back = load_pairs(write_pairs(tmp_path / f"a{conversational}.jsonl", pairs, conversational=conversational))
        assert [(b.prompt, b.chosen, b.rejected, b.answer) for b in back] == \
               [(p.prompt, p.chosen, p.rejected, p.answer) for p in pairs]
        assert all(b.conversational == conversational for b in back)


# ---------------------------------------------------------------------------- conversational rows (issue 14)

TOOL = {"role": "tool", "content": "5"}


@pytest.mark.parametrize("row, message", [
    ({**CHAT_ROW, "prompt": [{"role": "human", "content": "2+3="}]}, "field 'prompt' message 0 has role 'human'"),
    ({**CHAT_ROW, "chosen": [{"role": "gpt", "content": "5"}]}, "field 'chosen' message 0 has role 'gpt'"),
    ({**CHAT_ROW, "rejected": [{"role": 1, "content": "6"}]}, "field 'rejected' message 0 must be an object"),
    ({**CHAT_ROW, "chosen": [{"role": "assistant", "text": "5"}]}, "field 'chosen' message 0 must be an object"),
    ({**CHAT_ROW, "chosen": [{"role": "assistant", "content": None}]}, "message 0 must be an object"),
    ({**CHAT_ROW, "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "5"}]}]},
     "message 0 must be an object"),
    ({**CHAT_ROW, "prompt": [U, "hi"]}, "field 'prompt' message 1 must be an object"),
    ({**CHAT_ROW, "chosen": [GOOD, U]}, "the 'chosen' response must end with an assistant message, got role 'user'"),
    ({**CHAT_ROW, "rejected": [BAD, TOOL]}, "the 'rejected' response must end with an assistant message"),
    ({**CHAT_ROW, "rejected": [TOOL, BAD]}, "the 'rejected' response must start with an assistant message"),
    ({**CHAT_ROW, "chosen": [{"role": "assistant", "content": " "}]}, "field 'chosen' is empty"),
    ({"chosen": [U, GOOD, U], "rejected": [U, BAD]}, "'chosen' response must end with an assistant message"),
    ({**CHAT_ROW, "prompt": []}, "field 'prompt' is an empty message list"),
    ({**CHAT_ROW, "prompt": {"role": "user", "content": "2+3="}}, "field 'prompt' holds a dict"),
])
def test_bad_conversational_rows_name_file_and_line(tmp_path, row, message):
    f = jsonl(tmp_path / "bad.jsonl", [CHAT_ROW, TEXT_ROW, row])
    with pytest.raises(DatasetError) as e:
        load_pairs(f)
    assert str(e.value).startswith(f"{f}:3: ") and message in str(e.value)


def test_multi_turn_responses_and_every_role(tmp_path):
    """A response may hold tool turns between assistant turns; every role of ROLES is accepted."""
    from offpolicy.data.pairs import ROLES

    dev = {"role": "developer", "content": "Be brief."}
    (p,) = load_pairs(jsonl(tmp_path / "t.jsonl", [{"prompt": [dev, SYS, U], "chosen": [GOOD, TOOL, GOOD],
                                                     "rejected": [BAD]}]))
    assert p.chosen_messages == (GOOD, TOOL, GOOD) and p.chosen == "5\n5\n5" and set(ROLES) >= {"developer", "tool"}


def test_bad_rows_in_parquet_and_datasets_sources_name_their_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [CHAT_ROW, {**CHAT_ROW, "chosen": [GOOD, U]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with pytest.raises(DatasetError, match=r"p\.parquet row 1: the 'chosen' response must end with an assistant"):
        load_pairs(tmp_path / "p.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DatasetError, match=r"ds\[train\] row 1: the 'chosen' response must end"):
        load_pairs(tmp_path / "ds")


def test_text_parquet_and_conversational_datasets_sources(tmp_path):
    """Both kinds of rows from both columnar sources (a column has one type, so a Parquet file or a dataset
    holds one kind of row; JSON lines may mix them), with the ids equal to the same rows from JSON lines."""
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    text_rows = [{"prompt": "37+48=", "chosen": "85", "rejected": "75", "answer": "85"}, TEXT_ROW]
    pq.write_table(pa.Table.from_pylist(text_rows), tmp_path / "t.parquet")
    chat_rows = [CHAT_ROW, IMPLICIT_ROW]
    datasets.Dataset.from_list(chat_rows).save_to_disk(str(tmp_path / "chat_ds"))  # a Dataset, not a dict
    want = load_pairs(jsonl(tmp_path / "all.jsonl", text_rows + chat_rows))
    got = load_pairs(tmp_path / "t.parquet") + load_pairs(tmp_path / "chat_ds")
    key = lambda p: (p.prompt, p.chosen, p.rejected, p.prompt_messages, p.chosen_messages, p.answer)  # noqa: E731
    assert [key(p) for p in got] == [key(p) for p in want]
    assert got[0].answer == "85" and got[2].conversational and got[3].prompt_messages == (SYS, U)


def test_conversational_pairs_without_a_chat_template_train_on_the_plain_text():
    """The bundled tokenizer has no chat template: a conversational pair is its messages' text, so a
    one-turn arithmetic conversation has exactly the ids of the same text pair; more messages are joined
    by blank lines (as an untemplated task prompt's blocks)."""
    from offpolicy.data.pairs import PLAIN_SEPARATOR, plain_rendering

    tok = load_tokenizer(BUNDLED)
    assert not getattr(tok, "chat_template", None)
    text = Pair("p", "37+48=", "85", "75")
    chat = Pair("p", "37+48=", "85", "75", ({"role": "user", "content": "37+48="},),
                ({"role": "assistant", "content": "85"},), ({"role": "assistant", "content": "75"},))
    assert pair_token_ids(tok, chat) == pair_token_ids(tok, text)
    assert tok.decode(pair_token_ids(tok, chat).prompt_ids) == "<bos>37+48="
    multi = Pair("m", "q", "5", "6", (SYS, U), (GOOD, TOOL, GOOD), (BAD,))
    assert PLAIN_SEPARATOR == "\n\n"
    assert plain_rendering(multi) == ("Answer with a number.\n\nWhat is 2+3?", "5\n\n5\n\n5", "6")


def test_chat_template_multi_turn_response_ids(smoke_model_dir):
    """With a chat template, a response of several turns is everything the conversation adds after the
    prompt, through its last EOS (ChatML: the tool turn's tokens are in it, as in TRL)."""
    tok = load_tokenizer(str(smoke_model_dir))
    ids = pair_token_ids(tok, Pair("p", "q", "5", "6", (U,), (GOOD, TOOL, GOOD), (BAD,)))
    full = tok.apply_chat_template([U, GOOD, TOOL, GOOD], tokenize=False)  # Qwen's: a tool turn is a user turn
    assert "<tool_response>" in full and tok.decode(ids.prompt_ids + ids.chosen_ids) == full.rstrip("\n")
    assert ids.chosen_ids[-1] == tok.eos_token_id and tok.decode(ids.chosen_ids).count("<|im_end|>") == 3


def test_encode_pairs_batched_equals_one_at_a_time_and_is_reused(tmp_path, smoke_model_dir):
    """encode_pairs (batched for text; at start-up) gives the ids pair_token_ids computes pair by pair, and
    pair_token_ids then returns them without tokenizing again; a changed chat template is not served stale."""
    from offpolicy.data import pairs as P

    bos_text = Pair("b", "<bos>1+1=", "2", "3")  # a prompt that already holds BOS: no second one
    for tok, rows in ((load_tokenizer(BUNDLED), arithmetic_pairs("train", 64) + [bos_text]),
                      (load_tokenizer(str(smoke_model_dir)),
                       load_pairs(jsonl(tmp_path / "m.jsonl", [TEXT_ROW, CHAT_ROW, IMPLICIT_ROW, TEXT_ROW])))):
        fresh = [P._encode(tok, p) for p in rows]
        P.encode_pairs(tok, rows)
        assert [P.pair_token_ids(tok, p) for p in rows] == fresh
        assert all(P.pair_token_ids(tok, p) is P._ENCODED[tok][id(p)][2] for p in rows)  # served, not recomputed
    bundled = load_tokenizer(BUNDLED)
    assert P.pair_token_ids(bundled, bos_text).prompt_ids.count(bundled.bos_token_id) == 1
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = rows[1]
    assert P.pair_token_ids(tok, chat) is not P._ENCODED[tok][id(chat)][2]  # re-encoded under the new template
    other = Pair(chat.pair_id, chat.prompt, chat.chosen, chat.rejected, chat.prompt_messages,
                 chat.chosen_messages, chat.rejected_messages)
    assert P.pair_token_ids(tok, other) == P._encode(tok, other)  # an equal pair that was never encoded


def test_encode_pairs_names_the_row_the_tokenizer_cannot_encode(tmp_path):
    from offpolicy.data.pairs import encode_pairs

    f = jsonl(tmp_path / "p.jsonl", [TEXT_ROW, TEXT_ROW, {"prompt": "2+3=", "chosen": "five", "rejected": "6"}])
    with pytest.raises(DatasetError, match=rf"^{f}:3: the chosen holds text the tokenizer cannot encode"):
        encode_pairs(load_tokenizer(BUNDLED), load_pairs(f))


def test_csv_text_rows_with_a_margin_column(tmp_path):
    """CSV holds text rows; its cells are text, so a margin cell is read as a number (empty = none)."""
    f = tmp_path / "p.csv"
    f.write_text('prompt,chosen,rejected,margin\n2+3=,5,6,1.5\n"1+1=",2,3,\n4+4=,8,9,big\n')
    with pytest.raises(DatasetError, match=rf"^{f}:4: field 'margin' must be a finite number, got 'big'"):
        load_pairs(f)
    f.write_text("\n".join(f.read_text().splitlines()[:3]) + "\n")
    a, b = load_pairs(f)
    assert (a.prompt, a.chosen, a.rejected, a.margin, a.where) == ("2+3=", "5", "6", 1.5, f"{f}:2")
    assert b.margin is None and b.chosen == "2"


def test_a_tokenizer_without_weak_references_is_encoded_uncached():
    """A stand-in tokenizer (no __weakref__) still encodes; nothing is cached for it."""
    from offpolicy.data.pairs import encode_pairs

    class Stub:
        __slots__ = ("inner",)

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name) if name != "inner" else None

        def __call__(self, *a, **kw):
            return self.inner(*a, **kw)

    tok = load_tokenizer(BUNDLED)
    pairs = arithmetic_pairs("eval", 4)
    encode_pairs(Stub(tok), pairs)
    assert [pair_token_ids(Stub(tok), p) for p in pairs] == [pair_token_ids(tok, p) for p in pairs]


def test_a_run_reads_the_splits_of_a_datasets_folder_and_refuses_splits_of_a_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    from offpolicy.config import ConfigError, load_config
    from offpolicy.pipeline.context import task_source

    datasets.DatasetDict({"train": datasets.Dataset.from_list([TEXT_ROW] * 3),
                          "test": datasets.Dataset.from_list([{**TEXT_ROW, "chosen": "5", "rejected": "7"}])}
                         ).save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(None, ["tasks.name=pairs", f"tasks.train_path={tmp_path / 'ds'}",
                             f"tasks.eval_path={tmp_path / 'ds'}", "tasks.eval_split=test"])
    stream, held = task_source(cfg)
    assert [p.rejected for p in held] == ["7"] and next(stream).rejected == "6"
    f = jsonl(tmp_path / "p.jsonl", [TEXT_ROW])
    cfg = load_config(None, ["tasks.name=pairs", f"tasks.train_path={f}", "tasks.eval_split=test"])
    with pytest.raises(ConfigError, match="tasks.eval_split=test: .*p.jsonl is a file"):
        task_source(cfg)
