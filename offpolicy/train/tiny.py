"""Build the bundled tiny model: a character-level tokenizer and a small Llama-architecture LM,
warm-started by supervised learning on arithmetic so that RL has something to improve.

The warm start is deliberately imperfect: on a fraction ``slip`` of the problems whose first
addition carries, the label drops the carry (``37+48=75``). The model therefore leaves real
probability on the right answer without preferring it, which is the situation RL fine-tuning
is for. The result is saved as a plain Hugging Face folder (safetensors + config + tokenizer)
that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load.

A Llama config (not Qwen2) is used on purpose: with a Qwen2 config, transformers' AutoTokenizer
may swap a custom tokenizer for ``Qwen2Tokenizer`` and silently drop characters.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from offpolicy.data import arithmetic

SPECIALS = ("<pad>", "<bos>", "<eos>")
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-arith"


def build_tokenizer(alphabet: str = arithmetic.ALPHABET):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, no normaliser."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<pad>", padding_side="left", model_max_length=64,
    )


def build_model(vocab_size: int, *, hidden: int = 128, layers: int = 2, heads: int = 4,
                intermediate: int = 512, max_positions: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _portable_tokenizer_class(folder: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load
    (5.x writes its internal name ``TokenizersBackend``, unknown to 4.x)."""
    import json

    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


@dataclass
class PretrainResult:
    path: Path
    params: int
    accuracy: float
    seconds: float


def _sft_batch(tokenizer, tasks, rng: random.Random, slip: float):
    """Input ids and a loss mask on answer + EOS tokens (prompt tokens are not trained)."""
    texts, starts = [], []
    for t in tasks:
        answer = t.answer
        if t.meta.get("carry") and rng.random() < slip:
            answer = t.meta["slipped"]
        prompt_ids = tokenizer(t.prompt)["input_ids"]
        texts.append(prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]
                     + [tokenizer.eos_token_id])
        starts.append(len(prompt_ids))
    L = max(len(x) for x in texts)
    ids = torch.full((len(texts), L), tokenizer.pad_token_id)
    labels = torch.full((len(texts), L), -100)
    for i, (x, s) in enumerate(zip(texts, starts)):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, s : len(x)] = torch.tensor(x[s:])
    return ids, labels


def sft_warm_start(model, batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, steps: int, lr: float,
                   report: Callable[[int, torch.Tensor], None] | None = None) -> None:
    """The supervised warm start of the bundled models: ``steps`` AdamW steps (betas (0.9, 0.98), no weight
    decay, 50 linear warm-up steps then constant ``lr``, gradient norm clipped to 1) on ``batch()`` ->
    (input ids, labels with -100 where untrained). ``report(step, loss)`` after each step (1-based); the
    model is left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    for step in range(steps):
        ids, labels = batch()
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if report is not None:
            report(step + 1, loss)
    model.eval()


def save_tiny(model, tokenizer, out_dir: str | Path) -> tuple[Path, int]:
    """Save a bundled model's folder (safetensors, a tokenizer any transformers loads); (folder, parameters)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_class(out)
    return out, sum(p.numel() for p in model.parameters())


def pretrain_tiny(out_dir: str | Path = DEFAULT_DIR, *, seed: int = 0, steps: int = 1000,
                  batch_size: int = 128, lr: float = 1e-3, slip: float = 0.65, levels: tuple[int, ...] = (1,),
                  eval_n: int = 256, log=print) -> PretrainResult:
    """Build, warm-start and save the tiny model. Same seed and arguments give the same weights.

    The recipe (AdamW, betas (0.9, 0.98), 50 warm-up steps then constant ``lr``, batch 128, slip
    0.65, 1000 steps, ~1.5 min on 2 cores) was picked by measurement: the model becomes nearly exact
    on problems without a carry/borrow, while on the ~60% with one the slipped answer stays the
    greedy choice and the right one keeps real probability — held-out greedy accuracy ~0.44.
    """
    from offpolicy.rewards import exact_match
    from offpolicy.train.evaluate import evaluate

    def greedy_accuracy(model, tokenizer, tasks) -> float:
        return evaluate(model, tokenizer, tasks, exact_match, max_new_tokens=6)["accuracy"]

    start = time.time()
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed)
    rng = random.Random(seed)
    pool = arithmetic.generate("train", 10_000, seed=seed, levels=levels)
    eval_tasks = arithmetic.generate("eval", eval_n, seed=0, levels=levels)

    def report(step: int, loss: torch.Tensor) -> None:
        if step % 250 == 0:
            model.eval()
            acc = greedy_accuracy(model, tokenizer, eval_tasks)
            model.train()
            log(f"pretrain step {step}/{steps} loss {loss.item():.4f} held-out greedy accuracy {acc:.3f}")

    sft_warm_start(model, lambda: _sft_batch(tokenizer, rng.sample(pool, batch_size), rng, slip), steps=steps,
                   lr=lr, report=report)
    acc = greedy_accuracy(model, tokenizer, eval_tasks)
    out, n_params = save_tiny(model, tokenizer, out_dir)
    log(f"saved {out} ({n_params:,} parameters), held-out greedy accuracy {acc:.3f}")
    return PretrainResult(out, n_params, acc, time.time() - start)
