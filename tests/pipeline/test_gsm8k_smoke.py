"""The GSM8K path on CPU: the smoke model (ChatML template, BPE) trained on the real train file with the
math reward through the normal entry point, and ``offpolicy eval --tasks gsm8k``."""

from offpolicy.cli import main
from offpolicy.config import load_config
from offpolicy.pipeline import run
from offpolicy.train.metrics import read_metrics


def test_gsm8k_smoke_run_scores_every_sample(tmp_path, smoke_model_dir):
    cfg = load_config(None, ["tasks.preset=gsm8k", f"model.path={smoke_model_dir}", "train.steps=3",
                             "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16",
                             "tasks.eval_size=4", "eval.every=0", "run.progress=false", "run.loggers=[]",
                             "train.threads=1", f"run.dir={tmp_path / 'run'}"])  # 1 thread: the model is tiny
    assert cfg.reward.function == "math" and cfg.tasks.chat_template == "auto"
    res = run(cfg, log=lambda *a: None)
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["samples"] == 16 and r["reward_scored"] == 16 and r["reward_invalid_frac"] == 0
        assert not any(k.startswith("reward_faults/") for k in r)
        assert 0 < r["response_len"] <= 16
    evals = read_metrics(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [0, 3] and res.steps == 3
    # the saved policy keeps its chat tokenizer (class, template, exact round trip)
    from offpolicy.rollout.model import load_policy

    _, tok = load_policy(str(res.run_dir / "final"))
    q = "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting."
    assert tok.chat_template and tok.decode(tok(q)["input_ids"]) == q


def test_prompts_of_the_run_use_the_chat_template(smoke_model_dir):
    from offpolicy.pipeline.context import task_source

    cfg = load_config(None, ["tasks.preset=gsm8k", f"model.path={smoke_model_dir}", "tasks.eval_size=2"])
    train, held_out = task_source(cfg)
    first = next(train)
    assert first.has_special_tokens and first.prompt.startswith("<|im_start|>system\nSolve the math word problem.")
    assert held_out[0].prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_eval_command_on_gsm8k(smoke_model_dir, capsys):
    assert main(["eval", "--model", str(smoke_model_dir), "--tasks", "gsm8k", "--limit", "3", "--k", "2",
                 "rollout.max_new_tokens=8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "3 held-out gsm8k tasks, reward math" in out and "greedy accuracy 0.000" in out and "pass@2" in out
