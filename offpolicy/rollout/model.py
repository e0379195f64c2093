"""Load a policy (model + tokenizer) from a Hugging Face folder, or the bundled tiny model; LoRA via PEFT.

Any ``AutoModelForCausalLM`` folder works. With ``model.lora.r > 0`` the policy is a PEFT
``PeftModel`` whose base weights are frozen: the optimiser, the checkpoints and the weight channel
to the explorer carry only the adapter (:func:`trainable_state`), the KL reference is the same
model with its adapter switched off (:class:`AdapterDisabled`, no second copy), and the final save
(:func:`save_policy`) writes a merged plain folder plus the adapter. See docs/models.md.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "tiny-arith"
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_model_path(path: str) -> Path:
    """'bundled' -> the shipped tiny arithmetic model, 'bundled:<name>' -> ``offpolicy/assets/<name>``
    (e.g. ``bundled:tiny-calc``, the calculator agent); otherwise the folder, checked to look like a HF model."""
    if path.startswith("bundled:"):
        folder = BUNDLED.parent / path.split(":", 1)[1]
    else:
        folder = BUNDLED if path == "bundled" else Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path: {folder} is not a directory")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {folder} has no config.json (not a Hugging Face model folder)")
    return folder


def load_tokenizer(path: str | Path):
    """The folder's tokenizer (or that of a model name :func:`resolve_model_path` takes, e.g. 'bundled'; any
    other path is a FileNotFoundError, never a download). A plain ``PreTrainedTokenizerFast`` is loaded with
    that exact class, so AutoTokenizer cannot swap it for an architecture default (see docs: the tokenizer
    trap)."""
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path).expanduser()
    if not folder.is_dir():
        folder = resolve_model_path(str(path))
    cfg_file = folder / "tokenizer_config.json"
    cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_device(device: str) -> None:
    """ConfigError when ``device`` names a CUDA device this machine does not have."""
    import torch

    from offpolicy.config import ConfigError

    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"model.device={device}: CUDA is not available (torch {torch.__version__}, built "
                          f"with CUDA {torch.version.cuda}); use model.device=cpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"model.device={device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def load_policy(path: str = "bundled", *, device: str = "cpu", dtype: str = "float32",
                attn_implementation: str | None = None):
    """(model, tokenizer) on ``device`` in ``dtype``; the model is in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from offpolicy.config import ConfigError

    hf_logging.disable_progress_bar()
    check_device(device)
    folder = resolve_model_path(path)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, _DTYPES[dtype]), **kw)
        tokenizer = load_tokenizer(folder)
    except SafetensorError as e:  # truncated or corrupt weights: name the file, not only the folder
        raise ConfigError(f"model.path: cannot load the weights {_corrupt_weights(folder)}: {e}") from None
    except (OSError, ValueError, KeyError, ImportError) as e:  # malformed config.json, missing weights, bad tokenizer, attention kernel
        raise ConfigError(f"model.path: cannot load {folder}: {type(e).__name__}: {e}") from None
    model.to(device).eval()
    return model, tokenizer


def _corrupt_weights(folder: Path) -> str:
    """The first ``*.safetensors`` file of ``folder`` whose header does not read (on the error path only)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except SafetensorError:
            return str(f)
    return ", ".join(map(str, files)) or str(folder)


def policy_from_config(model_cfg, *, training: bool = True):
    """(model, tokenizer) as ``model_cfg`` (a :class:`~offpolicy.config.ModelConfig`) describes it:
    loaded, with gradient checkpointing when ``training``, wrapped with a LoRA adapter when ``lora.r > 0``.
    The explorer process builds the same structure with ``training=False``."""
    from offpolicy.config import ConfigError, forward_impl_for, lean_clash

    model, tokenizer = load_policy(model_cfg.path, device=model_cfg.device, dtype=model_cfg.dtype,
                                   attn_implementation=model_cfg.attn_implementation)
    if training and model_cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"model.gradient_checkpointing: {type(model).__name__} does not support it")
        # non-reentrant: no need for inputs that require grad, so it also works with frozen embeddings (LoRA)
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    # a Config that was read has resolved 'auto' already (with the rollout / train settings too)
    if forward_impl_for(model_cfg, clash=lean_clash(model_cfg)) == "lean":
        from offpolicy.rollout.lean import enable_lean_forward, unsupported

        why = unsupported(model)
        if why is not None:
            raise ConfigError(f"model.forward_impl=lean: {model_cfg.path}: {why}; use model.forward_impl=transformers")
        enable_lean_forward(model)
    if model_cfg.autocast is not None:  # wraps the forward installed above
        enable_autocast(model, model_cfg.autocast)
    lora = model_cfg.lora
    if lora.r > 0:
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         target_modules=lora.target_modules)
    return model, tokenizer


def bf16_matmul_units(device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: CUDA with bf16 support; an x86 CPU with
    AMX-bf16 or AVX512-bf16, an Arm CPU with the BF16 extension (read from /proc/cpuinfo's flags, so a CPU that
    only emulates bf16, as AVX2 does, counts as not having them; False where the flags cannot be read)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def enable_autocast(model, dtype: str) -> None:
    """Mixed precision: run ``model``'s forward under ``torch.autocast`` in ``dtype`` (its parameters keep
    their own dtype: float32 master weights, bf16 matmuls). The log-probs are upcast to float32 by the
    callers, as for a bf16 model. ``dtype='auto'``: bfloat16 where :func:`bf16_matmul_units` finds them on the
    model's device, else nothing is changed."""
    import types

    import torch

    device_type = next(model.parameters()).device.type
    if dtype == "auto":
        if not bf16_matmul_units(next(model.parameters()).device):
            return
        dtype = "bfloat16"
    current = model.forward  # the lean forward when installed (model.forward_impl=lean), else the class's
    body = current.__func__ if isinstance(current, types.MethodType) else type(model).forward
    forward = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))(body)
    # bound as a method, so that copy.deepcopy (the KL reference, ReMix's pi_{k-1}) rebinds it to the copy
    model.forward = types.MethodType(forward, model)


@contextlib.contextmanager
def _quiet_peft():
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _peft():
    try:
        import peft
    except ImportError:
        from offpolicy.config import ConfigError

        raise ConfigError("model.lora.r > 0 needs PEFT: pip install 'offpolicy[lora]' (or pip install peft)") from None
    return peft


def add_lora(model, *, r: int, alpha: float, dropout: float = 0.0, target_modules="all-linear"):
    """Wrap ``model`` in a PEFT LoRA adapter (base weights frozen; B = 0, so it starts as the base policy).
    Adapter weights are float32 even on a bf16/fp16 base (PEFT's ``autocast_adapter_dtype``)."""
    from offpolicy.config import ConfigError

    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             task_type="CAUSAL_LM")
    try:
        with _quiet_peft():
            return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ConfigError(f"model.lora: {e}") from None


def is_lora(model) -> bool:
    """Whether ``model`` is a PEFT-wrapped policy."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


class AdapterDisabled:
    """The LoRA policy with its adapter switched off while it is called: exactly the initial policy (the base
    weights are frozen and B starts at 0), used as the KL reference without a second copy of the model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def __getattr__(self, name):  # config, get_base_model, ... of the wrapped policy
        return getattr(self.model, name)


def reference_policy(model):
    """The frozen initial policy for the KL term: the adapter-disabled view under LoRA, else a deep copy."""
    import copy

    if is_lora(model):
        return AdapterDisabled(model)
    return copy.deepcopy(model).eval().requires_grad_(False)


def trainable_state(model) -> dict:
    """The tensors training changes, by name (no copies): the full state dict, or under LoRA the adapter
    alone. Checkpoints and the weight channel carry exactly these."""
    if is_lora(model):
        return {k: p for k, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def tied_aliases(state: dict) -> dict[str, str]:
    """Names of ``state`` whose tensor is another's (tied weights: a tied model's ``lm_head.weight`` is its
    ``embed_tokens.weight``) -> the first name holding it. Whoever ships a state copies those once."""
    first: dict[tuple, str] = {}
    out = {}
    for k, v in state.items():
        if v.device.type == "meta" or not v.numel():
            continue
        try:
            key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride(), v.storage_offset())
        except RuntimeError:  # a tensor subclass without storage (a sharded DTensor): never taken as tied
            continue
        if key in first:
            out[k] = first[key]
        else:
            first[key] = k
    return out


def load_trainable_state(model, tensors: dict) -> None:
    """Copy ``tensors`` (from :func:`trainable_state` of a model of the same structure) into ``model``."""
    import torch

    if not is_lora(model):
        # a name tied in the model and in ``tensors`` alike is loaded once, through the name it shares
        aliases = {k: a for k, a in tied_aliases(model.state_dict()).items() if k in tensors and a in tensors
                   and tensors[k].data_ptr() == tensors[a].data_ptr()}
        res = model.load_state_dict({k: v for k, v in tensors.items() if k not in aliases}, strict=False)
        missing = [k for k in res.missing_keys if k not in aliases]
        if missing or res.unexpected_keys:
            model.load_state_dict(tensors)  # strict: raises naming what does not match
        return
    own = trainable_state(model)
    if own.keys() != tensors.keys():
        missing, extra = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
        raise ValueError(f"adapter weights do not match the model (missing {missing[:3]}, unexpected {extra[:3]}); "
                         "was it saved with another model.lora / model.path?")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(tensors[k])


def merged_state_dict(model) -> dict:
    """The plain (base-model) state dict with every LoRA update folded in: W + (alpha / r) * B @ A.
    Computed out of place (the live policy is untouched, no merge/unmerge rounding drift)."""
    import torch
    from peft.tuners.lora import LoraLayer

    if not is_lora(model):
        return model.state_dict()
    base = model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for name, mod in base.named_modules():
            if isinstance(mod, LoraLayer) and not mod.merged:
                for a in mod.active_adapters:
                    if a in mod.lora_A:
                        key = f"{name}.base_layer.weight"
                        deltas[key] = deltas.get(key, 0) + mod.get_delta_weight(a).float()
        out = {}
        for k, v in base.state_dict().items():
            if ".lora_" in k:
                continue
            if k in deltas:
                v = (v.float() + deltas[k]).to(v.dtype)
            out[k.replace(".base_layer.", ".")] = v
    return out


def save_policy(model, tokenizer, folder: str | Path) -> None:
    """Save the policy as a plain HF folder that :func:`load_policy` loads (no PEFT needed). Under LoRA the
    folder holds the merged weights, and ``<folder>/adapter`` the adapter alone (PEFT format)."""
    folder = Path(folder)
    if is_lora(model):
        model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(model))
        model.save_pretrained(folder / "adapter")
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_adapter(model, folder: str | Path, *, trainable: bool = False):
    """``model`` (a plain policy from :func:`load_policy` of the base folder) with the PEFT adapter in ``folder``."""
    peft = _peft()
    with _quiet_peft():
        return peft.PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
