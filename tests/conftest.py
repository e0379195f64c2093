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


@pytest.fixture(scope="session")
def gsm8k_data():
    """The shared GSM8K files (``../shared/data/gsm8k`` beside the repository or ``$OFFPOLICY_GSM8K_DIR``);
    tests that need them are skipped, saying why, on a checkout without them."""
    from offpolicy.data.task_files import DatasetError, gsm8k_dir

    try:
        return gsm8k_dir()
    except DatasetError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smoke_model_dir(tmp_path_factory, gsm8k_data):
    """The GSM8K smoke model (BPE tokenizer trained on GSM8K, ChatML template, random tiny Qwen2), built once."""
    from offpolicy.train.smoke import make_smoke_model

    return make_smoke_model(tmp_path_factory.mktemp("smoke") / "model").path
