"""Task files and datasets: each format, field mapping, prompt formatting, row errors, the gsm8k preset."""

import json
from itertools import islice

import pytest

from offpolicy.config import ConfigError, load_config
from offpolicy.data.task_files import DatasetError, PromptFormat, load_rows
from offpolicy.pipeline.context import task_source
from offpolicy.rollout.workflow import encode_prompt

ROWS = [{"q": "What is 2+3?", "a": "5", "id": 0}, {"q": "What is 7*6?", "a": 42, "id": 1},
        {"q": "What is 9-4?", "a": "5", "id": 2}]
TEXT_ROWS = [{k: str(v) for k, v in r.items()} for r in ROWS]  # one type per column, as Arrow wants


def write(path, rows=ROWS):
    """``rows`` in the format of ``path``'s extension."""
    fmt = path.suffix
    if fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == ".csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{k: str(v) for k, v in r.items()} for r in rows]), path)
    return path


def cfg(*overrides):
    # chat_template=off unless a test asks: no tokenizer is loaded
    return load_config(None, ["tasks.chat_template=off", *overrides])


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_each_file_format_maps_fields(tmp_path, ext):
    f = write(tmp_path / f"rows{ext}")
    tasks = load_rows(f, prompt_key="q", answer_key="a")
    assert [(t.prompt, t.answer) for t in tasks] == [("What is 2+3?", "5"), ("What is 7*6?", "42"),
                                                      ("What is 9-4?", "5")]
    assert len({t.task_id for t in tasks}) == 3
    train, held_out = task_source(cfg("tasks.name=file", f"tasks.train_path={f}", "tasks.prompt_key=q",
                                      "tasks.answer_key=a", "tasks.eval_size=2"))
    assert [t.answer for t in held_out] == ["5", "42"]  # the first eval_size rows
    assert sorted(t.answer for t in islice(train, 3)) == ["42", "5", "5"]  # one shuffled epoch


def test_jsonl_name_is_an_alias_of_file(tmp_path):
    f = write(tmp_path / "rows.jsonl")
    a = task_source(cfg("tasks.name=jsonl", f"tasks.train_path={f}", "tasks.prompt_key=q", "tasks.answer_key=a"))[1]
    b = task_source(cfg("tasks.name=file", f"tasks.train_path={f}", "tasks.prompt_key=q", "tasks.answer_key=a"))[1]
    assert a == b


def test_unknown_extension_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"rows\.txt: unknown task file format '\.txt'"):
        task_source(cfg("tasks.name=file", f"tasks.train_path={tmp_path / 'rows.txt'}"))


@pytest.mark.parametrize("ext, content, message", [
    (".jsonl", '{"q": "a", "a": "1"}\n\n{"q": "b"}\n', r"rows\.jsonl:3: missing field 'a'"),
    (".jsonl", '{"q": "a", "a": null}\n', r"rows\.jsonl:1: field 'a' is empty"),
    (".jsonl", '{"q": ["a"], "a": "1"}\n', r"rows\.jsonl:1: field 'q' holds a list"),
    (".csv", "q,a\nwhat,1\nwhy\n", r"rows\.csv:3: field 'a' is empty"),
    (".csv", "q,a\nwhat,1,2\n", r"rows\.csv:2: 1 more field\(s\) than the header's 2"),
    (".csv", "question,a\nwhat,1\n", r"rows\.csv:2: missing field 'q' \(fields: \['a', 'question'\]\)"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, ext, content, message):
    f = tmp_path / f"rows{ext}"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        task_source(cfg("tasks.name=file", f"tasks.train_path={f}", "tasks.prompt_key=q", "tasks.answer_key=a"))


@pytest.mark.parametrize("sep", ["\f", "\v", "\x1c", "\x85", "\u2028", "\u2029"])
@pytest.mark.parametrize("quoted", [False, True])
def test_csv_rows_split_only_at_line_ends(tmp_path, sep, quoted):
    """A form feed or a Unicode line separator inside a CSV field is text, not the end of the row, and the rows
    after it keep their line numbers."""
    q = f"What is 2{sep}+2?"
    cell = f'"{q}"' if quoted else q
    f = tmp_path / "rows.csv"
    f.write_text(f'q,a\n{cell},4\nWhat is 3+3?,6\nwhy\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"rows\.csv:4: field 'a' is empty"):
        load_rows(f, prompt_key="q", answer_key="a")
    f.write_text(f'q,a\n{cell},4\r\nWhat is 3+3?,6\r\n', encoding="utf-8")
    assert [(t.prompt, t.answer) for t in load_rows(f, prompt_key="q", answer_key="a")] == [(q, "4"),
                                                                                            ("What is 3+3?", "6")]


def test_malformed_parquet_row_names_its_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "a", "a": "1"}, {"q": "b", "a": None}]), f)
    with pytest.raises(DatasetError, match=r"rows\.parquet row 1: field 'a' is empty"):
        load_rows(f, prompt_key="q", answer_key="a")


def test_hf_dataset_folder_splits_and_row_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT_ROWS[:2]),
                          "test": datasets.Dataset.from_list(TEXT_ROWS[2:])}).save_to_disk(str(folder))
    train, held_out = task_source(cfg("tasks.name=hf", f"tasks.train_path={folder}", "tasks.eval_split=test",
                                      "tasks.prompt_key=q", "tasks.answer_key=a"))
    assert [t.prompt for t in held_out] == ["What is 9-4?"]
    assert sorted(t.answer for t in islice(train, 2)) == ["42", "5"]
    with pytest.raises(DatasetError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        load_rows(folder, kind="hf", prompt_key="q", answer_key="a", split="validation")
    with pytest.raises(DatasetError, match=r"ds\[train\] row 0: missing field 'question'"):
        load_rows(folder, kind="hf", prompt_key="question", answer_key="a")


def test_hf_local_data_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # nothing under ~/.cache
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train.jsonl", TEXT_ROWS)
    tasks = load_rows(tmp_path / "data", kind="hf", prompt_key="q", answer_key="a")
    assert [t.answer for t in tasks] == ["5", "42", "5"]


def test_system_prompt_template_and_few_shot_from_the_train_file(tmp_path):
    f = write(tmp_path / "rows.jsonl")
    train, held_out = task_source(cfg("tasks.name=file", f"tasks.train_path={f}", "tasks.prompt_key=q",
                                      "tasks.answer_key=a", "tasks.system_prompt=Answer briefly.",
                                      r'tasks.template="Q: {prompt}\nA:"', "tasks.few_shot=1"))
    shot = "Q: What is 2+3?\nA:\n5"
    assert held_out[1].prompt == f"Answer briefly.\n\n{shot}\n\nQ: What is 7*6?\nA:"
    assert not held_out[1].has_special_tokens
    assert sorted(t.answer for t in islice(train, 4)) == ["42", "42", "5", "5"]  # row 1 (the shot) left out


def test_few_shot_from_a_file(tmp_path):
    f = write(tmp_path / "rows.jsonl")
    shots = write(tmp_path / "shots.csv", [{"q": "1+1?", "a": "2"}])
    held_out = task_source(cfg("tasks.name=file", f"tasks.train_path={f}", "tasks.prompt_key=q",
                               "tasks.answer_key=a", f"tasks.few_shot={shots}"))[1]
    assert held_out[0].prompt == "1+1?\n2\n\nWhat is 2+3?"
    with pytest.raises(ConfigError, match="leaves no training rows"):
        task_source(cfg("tasks.name=file", f"tasks.train_path={f}", "tasks.prompt_key=q", "tasks.answer_key=a",
                        "tasks.few_shot=3"))


def test_chat_template_rendering(tmp_path, smoke_model_dir):
    f = write(tmp_path / "rows.jsonl")
    base = ["tasks.name=file", f"tasks.train_path={f}", "tasks.prompt_key=q", "tasks.answer_key=a",
            "tasks.system_prompt=Be exact.", "tasks.few_shot=1", f"model.path={smoke_model_dir}"]
    held_out = task_source(load_config(None, base))[1]  # chat_template=auto: the smoke model has one
    assert held_out[1].prompt == ("<|im_start|>system\nBe exact.<|im_end|>\n"
                                  "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
                                  "<|im_start|>user\nWhat is 7*6?<|im_end|>\n<|im_start|>assistant\n")
    assert held_out[1].has_special_tokens
    assert task_source(load_config(None, [*base, "tasks.chat_template=off"]))[1][1].prompt.startswith("Be exact.\n\n")
    with pytest.raises(ConfigError, match="chat_template=on but the model's tokenizer has no chat_template"):
        task_source(load_config(None, ["tasks.chat_template=on"]))  # the bundled model has none


def test_chat_prompts_are_tokenized_without_special_tokens_added_twice(smoke_model_dir):
    """A tokenizer that adds a BOS (like Llama's) and a template that writes one: exactly one BOS."""
    from tokenizers import processors

    from offpolicy.data.arithmetic import Task
    from offpolicy.rollout.model import load_tokenizer

    tok = load_tokenizer(smoke_model_dir)
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                         special_tokens=[("<|endoftext|>", bos)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    fmt = PromptFormat(tokenizer=tok)
    chat = fmt.apply(Task("t", "What is 2+3?", "5"))
    plain = PromptFormat().apply(Task("t", "What is 2+3?", "5"))
    ids = encode_prompt(tok, chat)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.decode(ids) == chat.prompt
    assert encode_prompt(tok, plain)[0] == bos  # a plain prompt still gets the tokenizer's BOS


def test_smoke_tokenizer_round_trips_gsm8k(smoke_model_dir):
    from offpolicy.rollout.model import load_policy

    model, tok = load_policy(str(smoke_model_dir))
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_key_value_heads == 2
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")  # not swapped: the trap
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.chat_template
    rows = load_rows(cfg("tasks.preset=gsm8k").tasks.eval_path, prompt_key="question")
    texts = [t.prompt for t in rows] + [t.answer for t in rows[:200]]
    assert tok.batch_decode(tok(texts)["input_ids"]) == texts
    assert len(tok) <= 2000 and len(tok(rows[0].prompt)["input_ids"]) < len(rows[0].prompt) / 2  # real merges


def test_gsm8k_preset_rows_and_defaults(gsm8k_data, smoke_model_dir):
    c = cfg("tasks.preset=gsm8k")
    t = c.tasks
    assert (t.name, t.prompt_key, t.answer_key, t.eval_size) == ("file", "question", "answer", 1319)
    assert t.train_path.endswith("gsm8k/train.jsonl") and t.eval_path.endswith("gsm8k/test.jsonl")
    assert c.reward.function == "math" and c.rollout.max_new_tokens == 512 and "####" in t.system_prompt
    assert len(load_rows(t.train_path, prompt_key="question")) == 7473
    # a model whose context holds GSM8K prompts (the bundled one's 64 tokens hold none); plain text prompts
    train, held_out = task_source(cfg("tasks.preset=gsm8k", f"model.path={smoke_model_dir}", "tasks.chat_template=off"))
    assert len(held_out) == 1319 and held_out[0].prompt.endswith("Janet\u2019s ducks lay 16 eggs per day. She eats "
                                                                 "three for breakfast every morning and bakes muffins "
                                                                 "for her friends every day with four. She sells the "
                                                                 "remainder at the farmers' market daily for $2 per "
                                                                 "fresh duck egg. How much in dollars does she make "
                                                                 "every day at the farmers' market?")
    assert held_out[0].answer.endswith("#### 18") and next(train).answer


def test_gsm8k_preset_leaves_the_reward_to_a_multi_turn_environment(gsm8k_data):
    """The environment scores a multi-turn episode, so the preset's reward.function=math would be refused."""
    c = cfg("tasks.preset=gsm8k", "workflow.name=multi_turn", "workflow.env=python")
    assert c.reward.function == "exact_match" and c.tasks.train_path.endswith("gsm8k/train.jsonl")
    assert c.rollout.max_new_tokens == 512


def test_gsm8k_preset_explicit_settings_win(tmp_path, monkeypatch, gsm8k_data):
    c = cfg("tasks.preset=gsm8k", "reward.function=exact_match", "tasks.system_prompt=Think.",
            "rollout.max_new_tokens=64", "tasks.eval_size=10", "tasks.eval_path=mine.jsonl")
    assert (c.reward.function, c.tasks.system_prompt, c.rollout.max_new_tokens, c.tasks.eval_size,
            c.tasks.eval_path) == ("exact_match", "Think.", 64, 10, "mine.jsonl")
    assert c.tasks.train_path.endswith("gsm8k/train.jsonl")
    # a saved config (every key explicit) reloads unchanged
    again = type(c).model_validate(c.model_dump(mode="json"))
    assert again == c
    # the folder from the environment
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    monkeypatch.setenv("OFFPOLICY_GSM8K_DIR", str(tmp_path))
    assert cfg("tasks.preset=gsm8k").tasks.train_path == str(tmp_path / "train.jsonl")
    monkeypatch.setenv("OFFPOLICY_GSM8K_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="GSM8K files .* not found .*OFFPOLICY_GSM8K_DIR"):
        cfg("tasks.preset=gsm8k")
    both = cfg("tasks.preset=gsm8k", "tasks.train_path=a.jsonl", "tasks.eval_path=b.jsonl")  # no folder needed
    assert (both.tasks.train_path, both.tasks.eval_path) == ("a.jsonl", "b.jsonl")
