import pytest


def _save_random_model(folder, arch: str, seed: int = 0):
    """A randomly initialised tiny ``arch`` causal LM with the bundled character tokenizer, saved as a
    plain HF folder (what a user's own model folder looks like)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from offpolicy.rollout.model import BUNDLED, load_tokenizer

    tok = load_tokenizer(BUNDLED)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "qwen2":  # q/k/v biases, untied output head, grouped-query attention
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """``model_folder("qwen2")`` / ``model_folder("llama")``: the path of a tiny random model folder."""
    made = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = _save_random_model(tmp_path_factory.mktemp(arch), arch)
        return made[arch]

    return get
