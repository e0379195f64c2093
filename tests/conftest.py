import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def random_tiny():
    """A randomly initialised tiny Llama with the bundled character tokenizer (no training)."""
    from offpolicy.train.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(len(tok), hidden=32, layers=2, heads=2, intermediate=64, seed=1).eval()
    return model, tok
