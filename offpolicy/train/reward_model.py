"""Train a scalar reward model on preference pairs (``offpolicy reward-model train``).

Bradley-Terry (:func:`~offpolicy.algos.dpo.bradley_terry_loss`; Ouyang et al. 2022, eq. 1): each step draws
``batch_size`` pairs (epochs over the shuffled pairs), scores chosen and rejected sequences in one forward
(:func:`~offpolicy.rewards.reward_model.sequence_scores`, the score at the last non-padding token), and
minimises ``-log sigmoid(r_c - r_r - m)`` (+ ``center_coef * mean((r_c + r_r)^2)``) with AdamW. The margin
``m`` is the pair's ``margin`` column when it has one, else ``margin``. Held-out pair accuracy (the share of
pairs with ``r_c > r_r``) is measured before the first step, every ``eval_every`` steps and at the end.

Everything is tokenised before the first step (a pair the model cannot hold fails there). The output folder
holds the model and tokenizer (``AutoModelForSequenceClassification.from_pretrained(out)`` loads it, and so
does :class:`~offpolicy.rewards.reward_model.RewardModelScorer`), ``metrics.jsonl`` (``kind`` ``train`` and
``eval`` rows) and ``reward_model.json`` (the settings and the final numbers).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

from offpolicy.data.pairs import Pair, pair_token_ids
from offpolicy.data.task_files import DatasetError

if TYPE_CHECKING:
    import torch

# torch and transformers are imported by the functions that use them: the CLI reads RewardModelSettings
# (its flags' defaults) when it builds its parser, which must stay instant.


@dataclass(frozen=True)
class RewardModelSettings:
    """Hyperparameters of :func:`train_reward_model` (the CLI flags of ``offpolicy reward-model train``).
    The defaults suit the bundled model (its arithmetic pairs reach 0.9 held-out pair accuracy); a
    pretrained LM of real size wants a far lower ``lr`` (1e-5 and below, as TRL's reward trainer)."""

    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 64
    margin: float = 0.0  # used for pairs without a 'margin' column
    center_coef: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # constant | linear | cosine, after warm-up, down to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"


class PairAccuracy(NamedTuple):
    """Held-out numbers: share of pairs with r_c > r_r, and the mean r_c - r_r."""

    accuracy: float
    margin: float


class RewardModelResult(NamedTuple):
    out: Path
    eval: PairAccuracy | None  # after the last step (None without held-out pairs)
    initial_eval: PairAccuracy | None  # before the first step
    seconds: float  # training time, evaluations excluded


Tokenised = list[tuple[list[int], list[int], float]]  # (chosen sequence, rejected sequence, margin)


def tokenise(tokenizer, pairs: Sequence[Pair], default_margin: float, max_len: int | None) -> Tokenised:
    out = []
    for p in pairs:
        ids = pair_token_ids(tokenizer, p)
        chosen, rejected = ids.prompt_ids + ids.chosen_ids, ids.prompt_ids + ids.rejected_ids
        if max_len is not None and max(len(chosen), len(rejected)) > max_len:
            raise DatasetError(f"{p.where or p.pair_id}: {max(len(chosen), len(rejected))} tokens, more than the "
                               f"model's {max_len} positions")
        out.append((chosen, rejected, default_margin if p.margin is None else p.margin))
    return out


def _scores(model, batch: Tokenised, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    from offpolicy.rewards.reward_model import sequence_scores

    r = sequence_scores(model, [c for c, _, _ in batch] + [r for _, r, _ in batch], pad_id)
    return r[:len(batch)], r[len(batch):]


def pair_accuracy(model, data: Tokenised, pad_id: int, batch_size: int = 128) -> PairAccuracy:
    """Share of pairs whose chosen sequence scores above the rejected one, and the mean difference."""
    import torch

    was_training = model.training
    model.eval()
    diffs = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            rc, rr = _scores(model, data[i:i + batch_size], pad_id)
            diffs.append(rc - rr)
    model.train(was_training)
    d = torch.cat(diffs)
    return PairAccuracy(float((d > 0).float().mean()), float(d.mean()))


def train_reward_model(train_pairs: Sequence[Pair], eval_pairs: Sequence[Pair] | None, *, model: str = "bundled",
                       out: str | Path, settings: RewardModelSettings = RewardModelSettings(),
                       log: Callable[[str], None] = print) -> RewardModelResult:
    """Train a Bradley-Terry reward model from the causal-LM (or reward-model) folder ``model`` on
    ``train_pairs``, evaluate on ``eval_pairs``, save to ``out``; see the module docstring."""
    import torch

    from offpolicy.algos.dpo import bradley_terry_loss
    from offpolicy.pipeline.context import lr_multiplier
    from offpolicy.rewards.reward_model import load_reward_model

    s = settings
    if s.steps < 0 or s.batch_size < 1 or s.lr <= 0:
        raise ValueError(f"steps must be >= 0, batch_size >= 1 and lr > 0 (got {s.steps}, {s.batch_size}, {s.lr})")
    if s.lr_schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {s.lr_schedule!r}")
    torch.manual_seed(s.seed)
    rm, tokenizer = load_reward_model(model, device=s.device, dtype=s.dtype)
    pad_id = tokenizer.pad_token_id
    max_len = getattr(rm.config, "max_position_embeddings", None)
    train = tokenise(tokenizer, train_pairs, s.margin, max_len)
    held = tokenise(tokenizer, eval_pairs, s.margin, max_len) if eval_pairs else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = (out / "metrics.jsonl").open("w")

    def record(row: dict) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()

    def evaluate(step: int) -> PairAccuracy | None:
        if not held:
            return None
        acc = pair_accuracy(rm, held, pad_id, s.eval_batch_size)
        record({"kind": "eval", "step": step, "pair_accuracy": acc.accuracy, "reward_margin": acc.margin})
        log(f"step {step:5d}  held-out pair accuracy {acc.accuracy:.3f}  mean margin {acc.margin:+.3f}")
        return acc

    log(f"reward model from {model}: {sum(p.numel() for p in rm.parameters()):,} parameters, "
        f"{len(train)} training pairs, {len(held)} held-out pairs")
    initial = last = evaluate(0)
    opt = torch.optim.AdamW(rm.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(s))  # the policy trainer's schedule
    rng = random.Random(s.seed)
    order: list[int] = []
    rm.train()
    seconds = 0.0
    for step in range(1, s.steps + 1):
        t0 = time.perf_counter()
        while len(order) < s.batch_size:  # epochs over the shuffled pairs
            epoch = list(range(len(train)))
            rng.shuffle(epoch)
            order += epoch
        batch = [train[i] for i in order[:s.batch_size]]
        del order[:s.batch_size]
        rc, rr = _scores(rm, batch, pad_id)
        res = bradley_terry_loss(rc, rr, margin_B=torch.tensor([m for _, _, m in batch], device=rc.device),
                                 center_coef=s.center_coef)
        if not math.isfinite(res.loss.item()):
            raise FloatingPointError(f"reward-model loss is {res.loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(rm.parameters(), s.max_grad_norm)
        opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        record({"kind": "train", "step": step, "loss": res.loss.item(), "grad_norm": float(grad_norm),
                "lr": sched.get_last_lr()[0], "step_s": round(seconds, 4),
                **{k: float(v) for k, v in res.stats.items()}})
        if s.eval_every and step % s.eval_every == 0 or step == s.steps:
            rm.eval()
            last = evaluate(step)
            rm.train()
    metrics.close()
    rm.eval()
    rm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {"base": str(model), "train_pairs": len(train), "eval_pairs": len(held), "settings": asdict(s),
               "seconds": round(seconds, 2), "initial_eval": initial._asdict() if initial else None,
               "eval": last._asdict() if last else None}
    (out / "reward_model.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"saved the reward model to {out} ({seconds:.1f} s of training)")
    return RewardModelResult(out, last, initial, seconds)
