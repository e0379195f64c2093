"""Registry, bind/resolve_preset validation, presets, and missing-field errors."""

import pytest
import torch

from offpolicy.algos import (ADVANTAGES, AGGREGATIONS, FAMILIES, KL_ESTIMATORS, POLICY_LOSSES, PRESETS, LossInputs,
                             LossOut, Preset, bind, register, resolve_preset)

REQUIRED_PRESETS = ["reinforce", "grpo", "dr_grpo", "dapo", "rloo", "gspo", "cispo", "rec_oneside_nois",
                    "rec_oneside_is", "rec_twoside_is", "rec_ring_nois", "asymre", "opmd", "red_drop",
                    "red_weight", "decoupled_ppo", "bapo", "remix", "spear"]


def test_names_present():
    assert set(REQUIRED_PRESETS) <= set(PRESETS)
    assert {"group_mean", "grpo", "rloo", "opmd_baseline", "asymre"} <= set(ADVANTAGES)
    assert {"reinforce", "ppo_clip", "rec", "gspo", "cispo", "decoupled_ppo", "bapo", "mix_ppg", "sil",
            "sft", "opmd_legacy"} <= set(POLICY_LOSSES)
    assert {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"} == set(AGGREGATIONS)
    assert {"k1", "k2", "k3", "low_var_kl"} == set(KL_ESTIMATORS)
    assert all(type(t) is dict for t in FAMILIES.values())


def test_preset_contents():
    assert PRESETS["grpo"].advantage[0] == "grpo" and PRESETS["grpo"].aggregation[0] == "token_mean"
    assert PRESETS["grpo"].loss == ("ppo_clip", {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 3.0})
    assert PRESETS["dr_grpo"].advantage[0] == "group_mean"
    assert PRESETS["dr_grpo"].loss[0] == "ppo_clip"
    assert PRESETS["dr_grpo"].aggregation[0] == "seq_mean_token_sum_norm"
    assert PRESETS["dapo"].loss == ("ppo_clip", {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0})
    assert PRESETS["dapo"].advantage[0] == "grpo" and PRESETS["dapo"].aggregation[0] == "token_mean"
    assert PRESETS["red_drop"].advantage == ("group_mean", {"drop": "balance"})


@pytest.mark.parametrize("name", REQUIRED_PRESETS)
def test_every_preset_resolves_and_runs(name):
    adv_fn, loss_fn, agg_fn = resolve_preset(name)
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(8, generator=gen)
    adv = adv_fn(r, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    logp = (-torch.rand(8, 5, generator=gen)).requires_grad_(True)
    stale = logp.detach() + 0.1 * torch.randn(8, 5, generator=gen)
    mask = torch.ones(8, 5)
    out = loss_fn(logp, LossInputs(adv, mask, old_logp=stale, behav_logp=stale + 0.05, center_logp=stale))
    assert isinstance(out, LossOut)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.stats.values())
    loss = agg_fn(out.loss_BT, mask, num_tokens=mask.sum(), num_seqs=8)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


def test_resolve_preset_overrides_and_typos():
    _, loss_fn, _ = resolve_preset("grpo", loss_params={"eps_high": 0.3})
    assert loss_fn.keywords == {"eps_low": 0.2, "eps_high": 0.3, "dual_clip": 3.0}
    assert PRESETS["grpo"].loss[1]["eps_high"] == 0.2  # the preset template is untouched
    with pytest.raises(ValueError, match="'eps_hihg'.*did you mean 'eps_high'.*eps_low"):
        resolve_preset("grpo", loss_params={"eps_hihg": 0.3})
    with pytest.raises(ValueError, match="max_length.*max_len"):
        resolve_preset("dr_grpo", aggregation_params={"max_length": 512})
    with pytest.raises(ValueError, match="unknown preset 'grop'.*grpo"):
        resolve_preset("grop")


def test_bind():
    fn = bind("advantage", "grpo", {"unbiased_std": False})
    assert fn.keywords == {"unbiased_std": False}
    with pytest.raises(ValueError, match="unknown policy_loss 'ppo'.*ppo_clip"):
        bind("policy_loss", "ppo", {})
    with pytest.raises(ValueError, match="'logp_BT'"):  # call-time arguments cannot be bound
        bind("policy_loss", "reinforce", {"logp_BT": 1})
    with pytest.raises(ValueError, match="unknown family"):
        bind("loss", "reinforce", {})


def test_register_refuses_duplicates_and_adds_user_functions():
    def my_agg(loss_BT, mask_BT, *, num_tokens=None, num_seqs=None, scale=1.0):
        return scale * loss_BT.sum()

    with pytest.raises(ValueError, match="already registered"):
        register("aggregation", "token_mean", my_agg)
    register("aggregation", "_test_scaled_sum", my_agg)
    try:
        assert bind("aggregation", "_test_scaled_sum", {"scale": 2.0})(torch.ones(2, 2), torch.ones(2, 2)) == 8
        with pytest.raises(ValueError, match="already registered"):
            register("aggregation", "_test_scaled_sum", my_agg)
        register("preset", "_test_preset", Preset(("grpo", {}), ("reinforce", {}), ("_test_scaled_sum", {})))
        assert len(resolve_preset("_test_preset")) == 3
    finally:
        AGGREGATIONS.pop("_test_scaled_sum")
        PRESETS.pop("_test_preset", None)


NEEDS = {  # loss -> (params, the LossInputs field it needs)
    "ppo_clip": ({}, "old_logp"),
    "ppo_clip ": ({"ratio_to": "behav"}, "behav_logp"),
    "rec": ({}, "behav_logp"),
    "gspo": ({}, "old_logp"),
    "cispo": ({}, "old_logp"),
    "decoupled_ppo": ({}, "old_logp"),
    "bapo": ({}, "old_logp"),
    "mix_ppg": ({}, "behav_logp"),
    "sil": ({}, "behav_logp"),
}


@pytest.mark.parametrize("key", list(NEEDS))
def test_missing_field_error_names_field_and_loss(key):
    params, field = NEEDS[key]
    name = key.strip()
    with pytest.raises(ValueError, match=f"'{name}'.*LossInputs.{field}"):
        POLICY_LOSSES[name](torch.zeros(1, 2), LossInputs(torch.ones(1), torch.ones(1, 2)), **params)


def test_literal_values_are_checked_at_bind_time_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"ratio_to='bhav' is not valid; valid: \['old', 'behav'\]"):
        bind("policy_loss", "ppo_clip", {"ratio_to": "bhav"})
    with pytest.raises(ValueError, match=r"clip_mode='oneside'.*'one_side'"):
        resolve_preset("rec_oneside_nois", loss_params={"clip_mode": "oneside"})
    with pytest.raises(ValueError, match=r"drop='all'.*'balance'"):
        bind("advantage", "group_mean", {"drop": "all"})
    with pytest.raises(ValueError, match=r"mode='clip'.*'truncate', 'mask'"):
        bind("policy_loss", "decoupled_ppo", {"mode": "clip"})
    bind("policy_loss", "ppo_clip", {"ratio_to": "behav"})  # valid values bind


def test_numbers_and_flags_are_checked_at_bind_time():
    """A value YAML left as text (``cov_lb=1e9``: YAML 1.1 reads it as a string) fails at bind time, naming the
    key and the type, not at the first step's comparison."""
    with pytest.raises(ValueError, match=r"cov_lb='1e9' is not float \(YAML reads 1e9 as text: write 1.0e\+9\)"):
        bind("policy_loss", "sil", {"cov_lb": "1e9"})
    with pytest.raises(ValueError, match=r"dual_clip=True is not float or None$"):
        bind("policy_loss", "ppo_clip", {"dual_clip": True})
    with pytest.raises(ValueError, match=r"unbiased_std=1 is not bool"):
        bind("advantage", "grpo", {"unbiased_std": 1})
    bind("policy_loss", "sil", {"cov_lb": 5, "eps_low": 0.1})  # an int where a float is expected is fine
    bind("policy_loss", "ppo_clip", {"dual_clip": None})


DECLARED = {  # (loss, params) -> the log-probs it declares it reads
    ("ppo_clip", ()): {"old_logp"},
    ("ppo_clip", (("ratio_to", "behav"),)): {"behav_logp"},
    ("decoupled_ppo", ()): {"old_logp", "behav_logp"},
    ("rec", ()): {"behav_logp"},
    ("mix_ppg", ()): {"behav_logp", "center_logp"},
    ("sil", ()): {"behav_logp"},
    ("sil", (("ratio_to", "old"),)): {"old_logp"},
    ("sft", ()): set(),
}


@pytest.mark.parametrize("key", list(DECLARED))
def test_losses_declare_what_they_read_from_their_bound_parameters(key):
    from offpolicy.algos import reads_of

    name, params = key
    assert reads_of("policy_loss", name, dict(params)) == DECLARED[key]


def test_declared_reads_are_enough_to_run_the_loss():
    # every built-in loss runs when given exactly the fields it declares (and nothing else)
    from offpolicy.algos import reads_of

    logp = torch.zeros(2, 2, requires_grad=True)  # two rows: a pairwise loss (dpo) needs whole pairs
    full = {k: torch.zeros(2, 2) for k in ("old_logp", "behav_logp", "center_logp", "ref_logp")}
    for name, fn in POLICY_LOSSES.items():
        reads = reads_of("policy_loss", name)
        fn(logp, LossInputs(torch.ones(2), torch.ones(2, 2), **{k: v for k, v in full.items() if k in reads}))


def test_user_registration_declares_reads():
    def my_loss(logp_BT, inputs):
        return LossOut(-logp_BT, {})

    from offpolicy.algos import reads_of

    register("policy_loss", "_test_mine", my_loss, reads=("ref_logp",))
    try:
        assert reads_of("policy_loss", "_test_mine") == {"ref_logp"}
        with pytest.raises(ValueError, match="unknown inputs.*'logp_old'"):
            register("policy_loss", "_test_bad", my_loss, reads=("logp_old",))
        with pytest.raises(ValueError, match="only .* declare"):
            register("advantage", "_test_adv", my_loss, reads=("ref_logp",))
    finally:
        POLICY_LOSSES.pop("_test_mine")
        POLICY_LOSSES.pop("_test_bad", None)
