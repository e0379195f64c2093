"""Load a policy (model + tokenizer) from a Hugging Face folder, or the bundled tiny model."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "tiny-arith"
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_model_path(path: str) -> Path:
    """'bundled' -> the shipped tiny model; otherwise the folder, checked to look like a HF model."""
    folder = BUNDLED if path == "bundled" else Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path: {folder} is not a directory")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {folder} has no config.json (not a Hugging Face model folder)")
    return folder


def load_tokenizer(path: str | Path):
    """The folder's tokenizer. A plain ``PreTrainedTokenizerFast`` is loaded with that exact class,
    so AutoTokenizer cannot swap it for an architecture default (see docs: the tokenizer trap)."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path)
    cfg_file = folder / "tokenizer_config.json"
    cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(path: str = "bundled", *, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) on ``device`` in ``dtype``; the model is in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from offpolicy.config import ConfigError

    hf_logging.disable_progress_bar()
    folder = resolve_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, _DTYPES[dtype]))
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError, KeyError) as e:  # malformed config.json, missing weights, bad tokenizer
        raise ConfigError(f"model.path: cannot load {folder}: {type(e).__name__}: {e}") from None
    model.to(device).eval()
    return model, tokenizer
