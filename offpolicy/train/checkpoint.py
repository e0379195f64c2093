"""Checkpoints of the whole run state, written atomically, and the newest one found for resume.

A checkpoint is a folder ``<run_dir>/checkpoints/step-<N>/`` holding:

- ``model.safetensors``: the policy weights (shared tensors handled by safetensors), or under LoRA
  ``adapter.safetensors``: the adapter alone (the frozen base is reloaded from ``model.path`` on resume);
- ``trainer.pt``: optimiser and LR-schedule state, the RNG states (python, torch, CUDA, and named generator
  states such as the explorer's sampling generator, as the bytes given), loaded back with
  ``torch.load(weights_only=True)`` (no arbitrary pickle);
- ``<name>.safetensors``: frozen models the run keeps beside the policy and cannot rebuild, by name (KL-Convex's
  pi_{k-1}: ``prev_policy``), whole (under LoRA too), read back with :func:`load_frozen`;
- ``state.json``: step / policy version, the sample strategy's state, the explorer's progress (next
  batch index, tasks consumed), the evaluation before training, and the config it was written under.

It is written to a temporary folder and renamed into place, so a crash mid-write leaves the previous
checkpoint intact; only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from offpolicy.config import ConfigError

CKPT_DIR = "checkpoints"


def _step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only run directory); the message says which one,
    why, and which earlier checkpoint is intact."""


def save_checkpoint(run_dir: str | Path, step: int, *, model, optimizer, scheduler, state: dict,
                    generators: dict[str, bytes], keep: int = 2, frozen: dict | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically (temp folder + rename) and prune to the newest ``keep``.

    ``generators``: named generator states as bytes (``bytes(g.get_state().numpy())``), stored as given.
    ``frozen``: name -> a model saved whole beside the policy (see :func:`load_frozen`).
    A write that fails (``OSError``: no space, read-only, quota) removes the temporary folder, leaves every
    earlier checkpoint as it was, and raises :class:`CheckpointError`.
    """
    from safetensors import SafetensorError

    final = _step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        for stale in final.parent.glob(".tmp-step-*") if final.parent.is_dir() else ():  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write(tmp, step, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
               generators=generators, frozen=frozen or {})
        if final.exists():  # a re-save of the same step (resumed a finished run): swap, then drop the old one
            old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except (OSError, SafetensorError, RuntimeError) as e:  # a full disk surfaces as any of the three
        shutil.rmtree(tmp, ignore_errors=True)
        partial = f"the partial folder {tmp} could not be removed" if tmp.exists() else "the partial folder was removed"
        raise CheckpointError(f"could not write the checkpoint of step {step} to {final}: {_reason(e, run_dir)}; "
                              f"{partial}, {_kept(run_dir)}") from e
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _reason(e: BaseException, run_dir) -> str:
    """Why a write failed: the OS's words when there are some, with the free space left on the disk
    (safetensors and torch.save report a full disk in their own terms: "I/O error", "unexpected pos")."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return text
    return f"{text} ({free / 2**20:,.1f} MiB free on that disk)"


def _kept(run_dir) -> str:
    last = latest_checkpoint(run_dir)
    return f"the last good checkpoint {last} is intact" if last else "no earlier checkpoint exists"


def _write(folder: Path, step: int, *, model, optimizer, scheduler, state: dict, generators: dict,
           frozen: dict) -> None:
    """The checkpoint's files; ``state.json`` last, as it marks the folder complete."""
    from safetensors.torch import save_file, save_model

    from offpolicy.rollout.model import is_lora, trainable_state

    if is_lora(model):
        save_file({k: v.detach().contiguous() for k, v in trainable_state(model).items()},
                  str(folder / "adapter.safetensors"))
    else:
        save_model(model, str(folder / "model.safetensors"))
    for name, other in frozen.items():
        save_model(other, str(folder / f"{name}.safetensors"))
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        # on a GPU the step's random draws (RED-Drop, Clip-Cov, dropout) come from the CUDA generators
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None,
        "generators": {k: bytes(g) for k, g in generators.items()},
    }, folder / "trainer.pt")
    (folder / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler,
                    generators: dict[str, torch.Generator] | None = None) -> dict:
    """Restore everything :func:`save_checkpoint` wrote into the given objects; returns ``state.json``
    with the saved generator states under ``"generators"`` (name -> bytes). ``generators``: torch
    generators to set from the saved states of the same names as well."""
    from safetensors.torch import load_file, load_model

    from offpolicy.rollout.model import is_lora, load_trainable_state

    path = Path(path)
    saved_lora = (path / "adapter.safetensors").is_file()
    _check_lora(path, model, saved_lora)
    if saved_lora:
        try:
            load_trainable_state(model, load_file(str(path / "adapter.safetensors"), device=str(_device(model))))
        except ValueError as e:  # other target modules
            raise ConfigError(f"model.lora: {path}: {e}") from None
    else:
        load_model(model, str(path / "model.safetensors"), device=str(_device(model)))
    blob = torch.load(path / "trainer.pt", weights_only=True)
    _load_optimizer(optimizer, scheduler, blob["optimizer"], blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(_as_tuple(blob["python_rng"]))
    cuda_rng = blob.get("cuda_rng")
    if cuda_rng is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_rng):
        torch.cuda.set_rng_state_all(cuda_rng)
    # checkpoints written before generator states were bytes hold uint8 tensors
    saved = {k: v if isinstance(v, bytes) else bytes(v.numpy()) for k, v in blob["generators"].items()}
    for k, g in (generators or {}).items():
        g.set_state(torch.frombuffer(bytearray(saved[k]), dtype=torch.uint8))
    return {**json.loads((path / "state.json").read_text()), "generators": saved}


def checkpoint_step(path: str | Path) -> int:
    """The step of the checkpoint at ``path`` (its ``state.json``; 0 where that does not read)."""
    try:
        return int(json.loads((Path(path) / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _lora_rank(shapes: dict[str, tuple]) -> int | None:
    """The adapter's rank from its ``lora_A`` weights' shapes ([r, in]); None when it has none."""
    ranks = {shape[0] for name, shape in shapes.items() if ".lora_A." in name and len(shape) == 2}
    return max(ranks) if ranks else None


def _check_lora(path: Path, model, saved_lora: bool) -> None:
    """A ConfigError naming ``model.lora.r`` when the checkpoint's adapter (or its absence) does not fit the
    model as this run's config built it: checked before anything is loaded."""
    from safetensors import safe_open

    from offpolicy.rollout.model import is_lora, trainable_state

    ours = _lora_rank({k: tuple(v.shape) for k, v in trainable_state(model).items()}) if is_lora(model) else None
    if saved_lora:
        with safe_open(str(path / "adapter.safetensors"), "pt") as f:
            saved = _lora_rank({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    else:
        saved = None
    if saved_lora == is_lora(model) and saved == ours:
        return
    held = f"a LoRA adapter of rank {saved}" if saved_lora else "the full weights (no LoRA adapter)"
    built = f"model.lora.r={ours or 0}" + (" (full fine-tuning)" if not is_lora(model) else "")
    want = f"model.lora.r={saved}" if saved_lora else "model.lora.r=0"
    raise ConfigError(f"model.lora.r: the checkpoint {path} holds {held}, but this run's {built} does not fit it; "
                      f"resume with {want} (the run's own setting)")


def load_frozen(path: str | Path, name: str, model) -> bool:
    """Load the frozen model ``name`` of the checkpoint at ``path`` into ``model``; False where the checkpoint
    holds none (written before it kept one)."""
    from safetensors.torch import load_model

    file = Path(path) / f"{name}.safetensors"
    if not file.is_file():
        return False
    load_model(model, str(file), device=str(_device(model)))
    return True


def _load_optimizer(optimizer, scheduler, saved_optimizer: dict, saved_scheduler: dict | None) -> None:
    """The checkpoint's optimiser *state* (moments, step counts) and schedule position under this run's
    *settings*. torch's ``load_state_dict`` would also restore the saved param groups' settings (lr, betas,
    weight decay, the fused / foreach implementation) and the scheduler's base learning rates, so a resume
    with ``--allow-changed-config train.lr=...`` (or ``train.optimizer_impl``, ...) would silently keep the
    old values. The groups' settings are therefore taken from the optimiser as this run's config built it
    (before loading, so the state is placed as that implementation needs), and the learning rate is the
    config's base rate times the schedule's factor at the restored position."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    if len(settings) != len(saved_optimizer["param_groups"]):
        raise ValueError(f"the checkpoint's optimiser has {len(saved_optimizer['param_groups'])} parameter "
                         f"groups, this run's {len(settings)}")
    saved_optimizer = {**saved_optimizer, "param_groups": [
        {**saved, **mine} for saved, mine in zip(saved_optimizer["param_groups"], settings)]}
    optimizer.load_state_dict(saved_optimizer)
    if scheduler is None or saved_scheduler is None:
        return
    base_lrs = list(scheduler.base_lrs)
    scheduler.load_state_dict(saved_scheduler)
    scheduler.base_lrs = base_lrs
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, base, factor in zip(optimizer.param_groups, base_lrs, factors):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
