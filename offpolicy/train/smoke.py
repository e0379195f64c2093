"""A CPU smoke model for the GSM8K path: the shape of a chat model, in a few seconds.

A byte-level BPE tokenizer is trained here on the GSM8K training text (questions and solutions) with
Qwen's ChatML special tokens and chat template, and a tiny randomly initialised Qwen2-architecture LM
is built around it. It solves nothing; it exercises on a laptop what a real run on Qwen2.5 uses —
chat-template prompts of a few hundred tokens, BPE decoding, EOS = ``<|im_end|>``, the math reward —
so that a GSM8K config can be checked end to end before any GPU time is spent.

The tokenizer is saved as a plain ``PreTrainedTokenizerFast`` (class name written in
tokenizer_config.json, with the chat template): with a Qwen2 config, ``AutoTokenizer`` would otherwise
swap in ``Qwen2Tokenizer`` (the tokenizer trap; :func:`offpolicy.rollout.model.load_tokenizer`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2.5's ChatML layout, without its default system message. With ``tools``, Qwen2.5's tool block joins
# the system message (Hermes style: schemas in <tools>, calls as <tool_call> JSON); an assistant message's
# ``tool_calls`` render as <tool_call> blocks, and consecutive ``tool`` messages as <tool_response> blocks
# of one user turn. Plain system/user/assistant messages render as before.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools and loop.first %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split: single digits, words with a leading space or mark, punctuation runs, newlines.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts, *, vocab_size: int = 2000, max_length: int = 4096):
    """A byte-level BPE ``PreTrainedTokenizerFast`` learnt from ``texts``: ChatML specials and template,
    EOS ``<|im_end|>``, pad ``<|endoftext|>``, no BOS; decode(encode(x)) == x for any text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        model_max_length=max_length, clean_up_tokenization_spaces=False, chat_template=CHATML_TEMPLATE,
    )


def build_qwen2(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, max_positions: int = 4096, seed: int = 0):
    """A randomly initialised ``Qwen2ForCausalLM`` over ``tokenizer``'s vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


@dataclass
class SmokeModel:
    path: Path
    params: int
    vocab_size: int
    seconds: float


def gsm8k_texts(path: str | Path):
    """Question and solution text of every row of a GSM8K jsonl file."""
    from offpolicy.data.task_files import load_rows

    for t in load_rows(path, prompt_key="question", answer_key="answer"):
        yield t.prompt
        yield t.answer


def make_smoke_model(out_dir: str | Path, *, data: str | Path | None = None, vocab_size: int = 2000,
                     seed: int = 0) -> SmokeModel:
    """Train the tokenizer on ``data`` (default: the GSM8K train file), build the model, save both to ``out_dir``."""
    from transformers.utils import logging as hf_logging

    from offpolicy.data.task_files import gsm8k_dir

    hf_logging.disable_progress_bar()
    start = time.time()
    tokenizer = train_tokenizer(gsm8k_texts(data or gsm8k_dir() / "train.jsonl"), vocab_size=vocab_size)
    model = build_qwen2(tokenizer, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _plain_tokenizer_config(out)
    return SmokeModel(out, sum(p.numel() for p in model.parameters()), len(tokenizer), time.time() - start)


def _plain_tokenizer_config(folder: Path) -> None:
    """Name the class ``PreTrainedTokenizerFast`` (loaded as such by transformers 4.x and 5.x, never
    swapped for ``Qwen2Tokenizer``) and keep the chat template inside tokenizer_config.json, where
    every transformers version looks (5.x writes it to chat_template.jinja)."""
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHATML_TEMPLATE
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
