"""A checkpoint restores the CUDA RNG as it restores the CPU one: on a GPU the step's random draws (RED-Drop's
dropped negatives, Clip-Cov's tokens, dropout) come from the CUDA generator, so a resume that kept the
fresh process's CUDA state would not continue the run it resumes."""

import torch

from offpolicy.train.checkpoint import load_checkpoint, save_checkpoint


def test_cuda_rng_states_round_trip(tmp_path, monkeypatch):
    cuda = {"state": [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in cuda["state"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: cuda.update(state=list(states)))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=None, state={}, generators={})
    saved = [s.clone() for s in cuda["state"]]
    cuda["state"] = [torch.zeros(8, dtype=torch.uint8)] * 2  # the fresh process's
    load_checkpoint(path, model=model, optimizer=opt, scheduler=None)
    assert all(torch.equal(a, b) for a, b in zip(cuda["state"], saved)) and len(cuda["state"]) == 2
