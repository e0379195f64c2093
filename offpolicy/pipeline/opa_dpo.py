"""OPA-DPO (Yang et al. 2025, "Mitigating Hallucinations in Large Vision-Language Models via DPO: On-Policy
Data Hold the Key", arXiv 2501.09695) as four stages, one command: ``offpolicy opa-dpo --config FILE``.

1. ``stage1_generate``: the policy samples ``y_gen`` for the training prompts (and the held-out ones);
   the task's reward says which answers are correct. The base policy's greedy accuracy is measured.
2. ``stage2_revise``: a corrector (:mod:`offpolicy.rollout.correctors`) revises each ``y_gen`` into
   ``y_rev``. Written: preference pairs ``y_rev > y_gen`` with token weights on the revised span (the tokens
   a token-level diff marks as changed weigh ``chosen_span_weight`` in ``y_rev`` and
   ``rejected_span_weight`` in ``y_gen``, the rest 1), pairs ``y_gt > y_gen`` (unweighted) where the
   ground truth differs from ``y_rev``, and the supervised data (``y_gt`` and ``y_rev`` per prompt).
3. ``stage3_align``: light supervised fine-tuning on ``y_gt`` and ``y_rev`` (LoRA when ``model.lora.r >
   0``, merged into the saved folder), so that the preferred responses become on-policy.
4. ``stage4_dpo``: an ``offpolicy train`` DPO run (preset ``dpo``, ``tasks.name=pairs``) from the aligned
   checkpoint, which is also its reference; the pairs' token weights reach the ``dpo`` loss.

Each stage writes its folder under the run directory and, last, ``DONE.json`` (its numbers). A rerun with
the same settings skips every stage that has its marker and redoes the first one that has not (a
partial folder is cleared first; stage 4 resumes from its newest checkpoint). Settings that differ from
the run's saved ``opa_dpo.json`` are refused, naming the keys.

Reported (``result.json``, :class:`OpaDpoResult`): held-out greedy accuracy of the base, aligned and final
policies; stage 4's held-out preference accuracy (implicit reward against its reference; 0.5 at the start)
and the reference-free pair accuracy (the share of held-out pairs whose chosen response is more likely
than the rejected one under the policy) of each policy.
"""

from __future__ import annotations

import difflib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from offpolicy.config import Config, ConfigError
from offpolicy.pipeline.opa_dpo_config import OpaDpoConfig, load_opa_dpo_config

STAGES = ("stage1_generate", "stage2_revise", "stage3_align", "stage4_dpo")
MARKER = "DONE.json"


# ---------------------------------------------------------------------------- revised span -> token weights


def span_weights(gen_ids: Sequence[int], rev_ids: Sequence[int], *, chosen_weight: float,
                 rejected_weight: float) -> tuple[list[float], list[float]]:
    """Token weights of a revision: (weights of ``rev_ids``, weights of ``gen_ids``). A token-level diff
    (longest matching blocks, :class:`difflib.SequenceMatcher`) marks the tokens the revision inserted or
    replaced in ``rev_ids`` (``chosen_weight``) and those it replaced or removed in ``gen_ids``
    (``rejected_weight``); every other token weighs 1. ``75<eos>`` -> ``85<eos>``: ``[w_c, 1, 1]`` and
    ``[w_r, 1, 1]``."""
    chosen = [1.0] * len(rev_ids)
    rejected = [1.0] * len(gen_ids)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=list(gen_ids), b=list(rev_ids), autojunk=False).get_opcodes():
        if tag != "equal":
            rejected[i1:i2] = [rejected_weight] * (i2 - i1)
            chosen[j1:j2] = [chosen_weight] * (j2 - j1)
    return chosen, rejected


# ---------------------------------------------------------------------------- stage folders


def stage_done(folder: Path) -> dict | None:
    """The stage's marker (its numbers), or None when the stage has not finished."""
    marker = folder / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def _finish(folder: Path, stats: dict, seconds: float) -> dict:
    record = {"stage": folder.name, "seconds": round(seconds, 2), **stats}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(folder / MARKER)  # the marker appears whole, after everything else
    return record


def _fresh(folder: Path) -> Path:
    """An empty stage folder (what an interrupted attempt left is removed)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------- measurements


def greedy_accuracy(model, tokenizer, cfg: Config, tasks) -> float:
    """Held-out greedy accuracy under the run's reward (as ``offpolicy eval``)."""
    from offpolicy.pipeline.context import reward_function
    from offpolicy.train.evaluate import evaluate

    return evaluate(model, tokenizer, tasks, reward_function(cfg), max_new_tokens=cfg.rollout.max_new_tokens)["accuracy"]


def pair_accuracy(model, tokenizer, pairs, *, batch_pairs: int = 128) -> float:
    """Reference-free: the share of ``pairs`` whose chosen response has the higher sequence log-prob under
    ``model`` (ties count 1/2)."""
    import torch

    from offpolicy.data.experience import collate
    from offpolicy.rollout.pairs import PairsWorkflow
    from offpolicy.rollout.workflow import Sampling
    from offpolicy.train.step import _to_device, response_logp

    wins = []
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_pairs):
            batch = _to_device(collate(PairsWorkflow()(None, tokenizer, pairs[i : i + batch_pairs], None,
                                                        sampling=Sampling()), tokenizer.pad_token_id), device)
            seq_B = (response_logp(model, batch)[0] * batch.mask_BT).sum(-1)
            margin_P = seq_B[0::2] - seq_B[1::2]
            wins += torch.where(margin_P.abs() < 1e-6, 0.5, (margin_P > 0).float()).tolist()
    model.train(was)
    return sum(wins) / max(len(wins), 1)


# ---------------------------------------------------------------------------- the stages


def _first_distinct(tasks: Iterable, n: int) -> list:
    """The first ``n`` tasks of a stream, stopping early where it comes back to a task it gave (a file's
    stream repeats it epoch after epoch; stage 1 answers each prompt once, ``generate.samples`` times)."""
    seen, out = set(), []
    for task in tasks:
        if len(out) == n or task.task_id in seen:
            break
        seen.add(task.task_id)
        out.append(task)
    return out


def generate_stage(cfg: OpaDpoConfig, out: Path, log: Callable[[str], None]) -> dict:
    """Stage 1: ``train.jsonl`` / ``eval.jsonl`` rows {task_id, prompt, answer, response, correct}."""
    import torch

    from offpolicy.pipeline.context import reward_function, seed_everything, task_source
    from offpolicy.rewards.guard import GuardedReward
    from offpolicy.rollout.engine import make_engine
    from offpolicy.rollout.model import load_policy

    seed_everything(cfg.train.seed)
    model, tok = load_policy(cfg.model.path, device=cfg.model.device, dtype=cfg.model.dtype,
                             attn_implementation=cfg.model.attn_implementation)
    train_iter, eval_tasks = task_source(cfg, tok, report=log)
    train_tasks = _first_distinct(train_iter, cfg.opa_dpo.generate.prompts)
    if len(train_tasks) < cfg.opa_dpo.generate.prompts:
        log(f"stage 1: the training tasks hold {len(train_tasks)} distinct prompts, fewer than "
            f"opa_dpo.generate.prompts={cfg.opa_dpo.generate.prompts}: each is answered once")
    scorer = GuardedReward.from_config(reward_function(cfg), cfg.reward)
    engine = make_engine(cfg.rollout, model, tok, seed=cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    stats = {}
    try:
        engine.update_weights(model, 0)  # an engine with its own copy (vLLM) serves this policy
        for split, tasks in (("train", train_tasks), ("eval", eval_tasks)):
            rows = _sample(engine, tok, tasks, scorer, cfg, gen)
            _write_jsonl(out / f"{split}.jsonl", rows)
            stats[f"{split}_samples"] = len(rows)
            stats[f"{split}_sample_accuracy"] = sum(row["correct"] for row in rows) / max(len(rows), 1)
    finally:
        scorer.close()
        engine.close()
    stats["greedy_accuracy"] = greedy_accuracy(model, tok, cfg, eval_tasks)
    log(f"stage 1: {stats['train_samples']} training samples ({stats['train_sample_accuracy']:.3f} correct), "
        f"{stats['eval_samples']} held-out; base policy held-out greedy accuracy {stats['greedy_accuracy']:.3f}")
    return stats


def _sample(engine, tok, tasks, scorer, cfg: OpaDpoConfig, gen) -> list[dict]:
    """``opa_dpo.generate.samples`` responses per task, 256 prompts at a time, each scored by the reward."""
    from offpolicy.rollout.workflow import decode_texts, encode_prompts

    r, k = cfg.rollout, cfg.opa_dpo.generate.samples
    rows = []
    for i in range(0, len(tasks), 256):
        chunk = tasks[i : i + 256]
        ro = engine.generate(encode_prompts(tok, chunk), n=k, max_new_tokens=r.max_new_tokens,
                             temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, generator=gen)
        texts = decode_texts(tok, ro.response_ids)
        truths = [chunk[j].answer for j in ro.prompt_index]
        for j, text, score in zip(ro.prompt_index, texts, scorer(list(zip(texts, truths)))):
            correct = score.correct if score.correct is not None else (score.value or 0.0) >= 1.0
            rows.append({"task_id": chunk[j].task_id, "prompt": chunk[j].prompt, "answer": chunk[j].answer,
                         "response": text, "correct": bool(correct)})
    return rows


def revise_stage(cfg: OpaDpoConfig, generated: Path, out: Path, log: Callable[[str], None]) -> dict:
    """Stage 2: ``train_pairs.jsonl`` / ``eval_pairs.jsonl`` (standard pairs with ``chosen_weights`` /
    ``rejected_weights``) and ``sft.jsonl`` rows {prompt, response, source: gt | rev}."""
    from offpolicy.data.pairs import response_ids
    from offpolicy.rollout.correctors import CorrectorError, Revisable, build_corrector
    from offpolicy.rollout.model import load_tokenizer, resolve_model_path

    s = cfg.opa_dpo.revise
    try:
        corrector = build_corrector(s.corrector, device=cfg.model.device, max_new_tokens=s.max_new_tokens)
    except CorrectorError as e:
        raise ConfigError(str(e)) from None
    tok = load_tokenizer(resolve_model_path(cfg.model.path))
    stats: dict = {}
    for split in ("train", "eval"):
        rows = _read_jsonl(generated / f"{split}.jsonl")
        revised = corrector([Revisable(r["prompt"], r["response"], r["answer"], r["correct"]) for r in rows])
        pairs, sft, seen = [], [], set()
        counts = {"revised": 0, "unchanged": 0, "left_out": 0}
        for n, (row, y_rev) in enumerate(zip(rows, revised)):
            y_gen, y_gt, prompt = row["response"], row["answer"], row["prompt"]
            if y_rev is None or not y_rev.strip():
                counts["left_out"] += 1
                continue
            counts["unchanged" if y_rev == y_gen else "revised"] += 1
            for source, text in (("gt", y_gt), ("rev", y_rev)):
                if text and (prompt, text) not in seen:
                    seen.add((prompt, text))
                    sft.append({"prompt": prompt, "response": text, "source": source})
            base = {"prompt": prompt, "rejected": y_gen, "answer": y_gt}
            if y_rev != y_gen and y_gen.strip():
                wc, wr = span_weights(response_ids(tok, y_gen), response_ids(tok, y_rev),
                                      chosen_weight=s.chosen_span_weight, rejected_weight=s.rejected_span_weight)
                pairs.append({**base, "id": f"{row['task_id']}/{n}/rev", "chosen": y_rev, "chosen_weights": wc,
                              "rejected_weights": wr})
            if s.gt_pairs and y_gt and y_gt not in (y_rev, y_gen) and y_gen.strip():
                pairs.append({**base, "id": f"{row['task_id']}/{n}/gt", "chosen": y_gt})
        _write_jsonl(out / f"{split}_pairs.jsonl", pairs)
        if split == "train":
            _write_jsonl(out / "sft.jsonl", sft)
            stats["sft_rows"] = len(sft)
        stats.update({f"{split}_{k}": v for k, v in counts.items()})
        stats[f"{split}_pairs"] = len(pairs)
    faults = getattr(corrector, "faults", 0)
    if faults:
        stats["corrector_faults"] = faults
        log(f"stage 2: the corrector raised on {faults} sample(s), left out; the first:\n{corrector.first_fault}")
    if not stats["train_pairs"]:
        raise RuntimeError(f"stage 2: no training pairs: of {stats['train_revised'] + stats['train_unchanged']} "
                           f"revisable samples none was revised ({stats['train_left_out']} left out); nothing for "
                           "DPO to prefer")
    if not stats["eval_pairs"] and not cfg.opa_dpo.eval_pairs:
        raise RuntimeError(f"stage 2: no held-out pairs from the {stats['eval_revised'] + stats['eval_unchanged']} "
                           "held-out samples (none was revised): raise tasks.eval_size or give opa_dpo.eval_pairs")
    log(f"stage 2: {stats['train_pairs']} training pairs, {stats['eval_pairs']} held-out pairs, "
        f"{stats['sft_rows']} supervised rows ({s.corrector})")
    return stats


def align_stage(cfg: OpaDpoConfig, revised: Path, out: Path, log: Callable[[str], None], eval_pairs) -> dict:
    """Stage 3: supervised fine-tuning on ``sft.jsonl``; the policy is saved in ``model/`` (merged under LoRA)."""
    import torch

    from offpolicy.data.experience import Experience, collate
    from offpolicy.data.pairs import encode_prompt_text, response_ids
    from offpolicy.pipeline.context import seed_everything, task_source
    from offpolicy.rollout.model import policy_from_config, save_policy
    from offpolicy.train.step import response_logp

    a = cfg.opa_dpo.align
    seed_everything(cfg.train.seed)
    model, tok = policy_from_config(cfg.model)
    base_pair_accuracy = pair_accuracy(model, tok, eval_pairs)  # before any update: the base policy
    rows = _read_jsonl(revised / "sft.jsonl")
    exps = []
    for row in rows:
        ids = response_ids(tok, row["response"])
        exps.append(Experience(torch.tensor(encode_prompt_text(tok, row["prompt"])), torch.tensor(ids),
                               torch.ones(len(ids)), torch.zeros(len(ids)), 0.0, "sft", "sft"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    rng = random.Random(cfg.train.seed)
    device = next(model.parameters()).device
    model.train()
    with (out / "metrics.jsonl").open("w") as metrics:
        for step in range(1, a.steps + 1):
            batch = collate(rng.sample(exps, min(a.batch_size, len(exps))), tok.pad_token_id)
            batch = replace(batch, input_ids_BL=batch.input_ids_BL.to(device), attn_BL=batch.attn_BL.to(device),
                            mask_BT=batch.mask_BT.to(device))
            logp_BT = response_logp(model, batch, share_prefix=False)[0]
            loss = -(logp_BT * batch.mask_BT).sum() / batch.mask_BT.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            metrics.write(json.dumps({"step": step, "loss": loss.item(), "grad_norm": float(grad_norm)}) + "\n")
    model.eval()
    save_policy(model, tok, out / "model")
    _, eval_tasks = task_source(cfg, tok, report=log)
    stats = {"rows": len(rows), "steps": a.steps, "lora": cfg.model.lora.r > 0, "base_pair_accuracy": base_pair_accuracy,
             "greedy_accuracy": greedy_accuracy(model, tok, cfg, eval_tasks),
             "pair_accuracy": pair_accuracy(model, tok, eval_pairs)}
    log(f"stage 3: {a.steps} supervised steps on {len(rows)} responses; aligned held-out greedy accuracy "
        f"{stats['greedy_accuracy']:.3f}, held-out pair accuracy {stats['pair_accuracy']:.3f}")
    return stats


def dpo_config(raw: dict, run_dir: Path, *, eval_pairs: Path, n_eval_pairs: int | None = None) -> Config:
    """Stage 4's ``offpolicy train`` config: the run's settings, with the stage-2 pairs as tasks, the aligned
    checkpoint as model (and so as reference), and ``run_dir/stage4_dpo`` as run directory. Of ``rollout``
    only ``prompts_per_step`` (pairs per step) and ``group_size`` are kept (stage 1's sampling temperature must
    not temper DPO's log-probs), and ``reward`` is dropped (the pairs workflow scores nothing)."""
    from pydantic import ValidationError

    data = json.loads(json.dumps({k: v for k, v in raw.items() if k != "opa_dpo"}))
    tasks = data.get("tasks") or {}
    data["tasks"] = {"name": "pairs", "train_path": str(run_dir / STAGES[1] / "train_pairs.jsonl"),
                     "eval_path": str(eval_pairs), "seed": tasks.get("seed", 0),
                     **({"eval_size": n_eval_pairs} if n_eval_pairs else {})}
    data.setdefault("model", {})["path"] = str(run_dir / STAGES[2] / "model")
    data.setdefault("run", {})["dir"] = str(run_dir / STAGES[3])
    data.pop("reward", None)
    rollout = {k: v for k, v in (data.get("rollout") or {}).items() if k in ("prompts_per_step", "group_size")}
    data["rollout"] = rollout
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()]
        raise ConfigError("opa-dpo stage 4 (DPO on the stage-2 pairs from the aligned checkpoint):\n"
                          + "\n".join(lines)) from None


def dpo_stage(cfg4: Config, out: Path, log: Callable[[str], None], eval_cfg: OpaDpoConfig, eval_pairs) -> dict:
    """Stage 4: the DPO run (resumed from its newest checkpoint if one exists), then the final policy's numbers."""
    from offpolicy.pipeline import run
    from offpolicy.pipeline.context import task_source
    from offpolicy.rollout.model import load_policy
    from offpolicy.train.checkpoint import latest_checkpoint

    resume = latest_checkpoint(out) is not None
    if not resume and out.exists():
        shutil.rmtree(out)
    if resume:
        log(f"stage 4: resuming the DPO run in {out}")
    res = run(cfg4, resume=resume, log=log)
    model, tok = load_policy(str(out / "final"), device=cfg4.model.device, dtype=cfg4.model.dtype)
    _, eval_tasks = task_source(eval_cfg, tok, report=log)
    stats = {"steps": res.steps, "dpo_seconds": round(res.seconds, 2),
             "preference_accuracy_before": res.eval_before["preference_accuracy"],
             "preference_accuracy": res.eval_after["preference_accuracy"],
             "reward_margin": res.eval_after.get("reward_margin"),
             "greedy_accuracy": greedy_accuracy(model, tok, eval_cfg, eval_tasks),
             "pair_accuracy": pair_accuracy(model, tok, eval_pairs)}
    log(f"stage 4: {res.steps} DPO steps; held-out preference accuracy {stats['preference_accuracy_before']:.3f} -> "
        f"{stats['preference_accuracy']:.3f}, greedy accuracy {stats['greedy_accuracy']:.3f}")
    return stats


# ---------------------------------------------------------------------------- the run


@dataclass
class OpaDpoResult:
    run_dir: Path
    stages: dict  # stage folder name -> its DONE.json record
    resumed: list  # stages skipped because they were done
    greedy_accuracy_base: float
    greedy_accuracy_aligned: float
    greedy_accuracy: float  # final policy
    preference_accuracy: float  # stage 4, implicit reward vs the aligned reference (0.5 at its start)
    pair_accuracy_base: float  # reference-free, held-out pairs
    pair_accuracy_aligned: float
    pair_accuracy: float
    seconds: float

    def summary(self) -> dict:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        return out


# settings that change how a run is shown or how fast it goes, not what it computes: a rerun may change them
_FREE = ("run.progress", "run.log_every", "run.loggers", "run.project", "train.threads")


def _changed(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting (but :data:`_FREE`) that differs."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b and f"{prefix}{k}" not in _FREE:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _log_to(run_dir: Path, echo: bool) -> Callable[[str], None]:
    def log(text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text}"
        if echo:
            print(line, flush=True)
        with (run_dir / "run.log").open("a") as f:
            f.write(line + "\n")

    return log


def run_opa_dpo(cfg: OpaDpoConfig, raw: dict, *, echo: bool = True) -> OpaDpoResult:
    """Run (or resume) the four stages of ``cfg``; ``raw``: the settings it was loaded from
    (:func:`~offpolicy.pipeline.opa_dpo_config.load_opa_dpo_config`)."""
    import torch

    from offpolicy.data.pairs import load_pairs
    from offpolicy.pipeline.context import bind_algorithm
    from offpolicy.threads import available_cpus

    start = time.perf_counter()
    run_dir = Path(cfg.run.dir.format(preset="opa_dpo", time=time.strftime("%Y%m%d-%H%M%S")))
    raw = json.loads(json.dumps(raw))
    raw.setdefault("run", {})["dir"] = str(run_dir)
    resolved = cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": str(run_dir)})}).model_dump(mode="json")
    saved_file = run_dir / "opa_dpo.json"
    if saved_file.is_file():
        changed = _changed(json.loads(saved_file.read_text())["resolved"], resolved)
        if changed:
            raise ConfigError(f"run.dir {run_dir} holds an OPA-DPO run with other settings:\n  " + "\n  ".join(changed)
                              + "\nrerun it with its own settings to resume it, or use another run.dir")
    eval_pairs_file = Path(cfg.opa_dpo.eval_pairs) if cfg.opa_dpo.eval_pairs else run_dir / STAGES[1] / "eval_pairs.jsonl"
    bind_algorithm(dpo_config(raw, run_dir, eval_pairs=eval_pairs_file))  # stage 4's settings fail here, not later
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_file.write_text(json.dumps({"raw": raw, "resolved": resolved}, indent=2) + "\n")
    torch.set_num_threads(cfg.train.threads or available_cpus())
    log = _log_to(run_dir, echo)
    folders = [run_dir / name for name in STAGES]
    records, resumed = {}, []

    def stage(i: int, body: Callable[[Path], dict]) -> dict:
        folder = folders[i]
        done = stage_done(folder)
        if done is not None:
            log(f"{STAGES[i]}: done earlier ({folder / MARKER}), skipped")
            resumed.append(STAGES[i])
        else:
            t0 = time.perf_counter()
            keep = i == 3  # the DPO run resumes from its own checkpoints
            stats = body(folder if keep else _fresh(folder))
            done = _finish(folder, stats, time.perf_counter() - t0)
        records[STAGES[i]] = done
        return done

    log(f"opa-dpo: run directory {run_dir}; corrector {cfg.opa_dpo.revise.corrector}; "
        f"model {cfg.model.path}{' (LoRA r=%d)' % cfg.model.lora.r if cfg.model.lora.r else ''}")
    s1 = stage(0, lambda out: generate_stage(cfg, out, log))
    stage(1, lambda out: revise_stage(cfg, folders[0], out, log))
    eval_pairs = load_pairs(eval_pairs_file)
    cfg4 = dpo_config(raw, run_dir, eval_pairs=eval_pairs_file, n_eval_pairs=len(eval_pairs))
    s3 = stage(2, lambda out: align_stage(cfg, folders[1], out, log, eval_pairs))
    s4 = stage(3, lambda out: dpo_stage(cfg4, out, log, cfg, eval_pairs))
    base_pairs = s3["base_pair_accuracy"]
    res = OpaDpoResult(run_dir, records, resumed, s1["greedy_accuracy"], s3["greedy_accuracy"], s4["greedy_accuracy"],
                       s4["preference_accuracy"], base_pairs, s3["pair_accuracy"], s4["pair_accuracy"],
                       time.perf_counter() - start)
    (run_dir / "result.json").write_text(json.dumps(res.summary(), indent=2) + "\n")
    log(f"opa-dpo done in {res.seconds:.0f} s: held-out greedy accuracy {res.greedy_accuracy_base:.3f} (base) -> "
        f"{res.greedy_accuracy_aligned:.3f} (aligned) -> {res.greedy_accuracy:.3f} (DPO); preference accuracy "
        f"{res.preference_accuracy:.3f}; pair accuracy {res.pair_accuracy_base:.3f} -> {res.pair_accuracy_aligned:.3f} "
        f"-> {res.pair_accuracy:.3f}")
    return res


def opa_dpo_run(config: str | Path | None = None, *, seed: int = 0, overrides: Sequence[str] = (),
                run_dir: str | Path | None = None, echo: bool = False) -> dict:
    """For benchmarks: OPA-DPO end to end for ``config`` (a YAML file or None) and ``seed`` (``train.seed``:
    sampling, data order, initialisation; the tasks stay those of ``tasks.seed``). Returns held-out
    ``greedy_accuracy`` and ``preference_accuracy`` of the final policy, the base and aligned greedy
    accuracies (``greedy_accuracy_base``, ``greedy_accuracy_aligned``), the reference-free
    ``pair_accuracy*`` numbers, ``seconds`` and ``run_dir``."""
    extra = [f"train.seed={seed}"] + ([f"run.dir={run_dir}"] if run_dir is not None else [])
    cfg, raw = load_opa_dpo_config(config, [*overrides, *extra])
    return run_opa_dpo(cfg, raw, echo=echo).summary()
