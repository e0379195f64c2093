"""docs/config.md and `offpolicy config` come from the pydantic models; the doc must match a fresh render."""

import difflib

import pytest

from offpolicy.cli import main
from offpolicy.pipeline.opa_dpo_config import OpaDpoConfig
from offpolicy.config_docs import DOC_PATH, REGENERATE, render_markdown, sections


def test_docs_config_md_is_up_to_date():
    fresh, current = render_markdown(), DOC_PATH.read_text() if DOC_PATH.exists() else ""
    if current != fresh:
        diff = "".join(list(difflib.unified_diff(current.splitlines(True), fresh.splitlines(True),
                                                 "docs/config.md", "fresh render"))[:40])
        pytest.fail(f"docs/config.md is stale: the config models changed. Regenerate it with\n\n    {REGENERATE}\n\n"
                    f"and commit the result.\n{diff}")


def test_every_option_and_subsection_has_a_description():
    # The top-level sections (Config.model, Config.train, ...) are headings, not options, and are left out.
    missing = [o.key for s in sections() for o in s.options if not o.description.strip()]
    missing += [s.key for s in sections() if "." in s.key and not s.description.strip()]
    assert not missing, f"config fields without a description (add Field(..., description=...)): {missing}"


def test_reference_lists_every_leaf_of_the_models_with_type_and_default():
    keys = {o.key: o for s in sections() for o in s.options}
    assert len(keys) == sum(len(s.options) for s in sections())  # no key twice
    assert keys["model.lora.r"][1:3] == ("int (>= 0)", "0")
    assert keys["buffer.kind"][1:3] == ("'memory' | 'sqlite' | 'sql' | None", "None")
    assert keys["train.betas"][1:3] == ("tuple[float, float]", "(0.9, 0.99)")
    # every value of a default config is listed, and nothing else (dict values are sections or dict options)
    section_keys = {s.key for s in sections()}

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            key = f"{prefix}{k}"
            yield from leaves(v, f"{key}.") if key in section_keys else [key]

    assert set(leaves(OpaDpoConfig().model_dump())) == set(keys)  # the training config + opa_dpo

def test_cli_section_filter_and_plain_output_when_piped(capsys):
    assert main(["config", "model.lora"]) == 0
    out = capsys.readouterr().out
    assert "model.lora.r: int (>= 0) = 0" in out and "LoRA rank" in out
    assert "model.path" not in out and "\x1b[" not in out  # piped: no colours, only the section asked for
    assert main(["config", "model"]) == 0
    assert "model.lora.alpha" in capsys.readouterr().out  # a section includes its subsections
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == render_markdown()
    assert main(["config", "opa_dpo.revise"]) == 0  # the section only `offpolicy opa-dpo` reads is listed too
    out = capsys.readouterr().out
    assert "opa_dpo.revise.corrector: str = 'ground_truth'" in out and "opa_dpo.align.lr" not in out


def test_cli_unknown_section_is_an_error_naming_the_valid_ones(capsys):
    assert main(["config", "trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown config section 'trian'" in err and "did you mean 'train'" in err
    assert "model.lora" in err and "buffer" in err and "Traceback" not in err
    assert main(["config", "nosuch"]) == 2  # no close match: the valid sections still read as their own clause
    assert "unknown config section 'nosuch'; valid sections: model, model.lora," in capsys.readouterr().err
