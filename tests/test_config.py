import pytest

from offpolicy.config import ConfigError, load_config


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "rollout.group_size=4", "algorithm.loss_params={eps_high: 0.3}"])
    assert cfg.train.lr == 1e-4 and cfg.rollout.group_size == 4
    assert cfg.algorithm.loss_params == {"eps_high": 0.3}
    assert load_config().algorithm.preset == "grpo"


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'; did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'rollout\.group_sise'; did you mean 'rollout\.group_size'"):
        load_config(None, ["rollout.group_sise=4"])
    with pytest.raises(ConfigError, match=r"'trian'; did you mean 'train'"):
        load_config(None, ["trian.lr=1"])


def test_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n  gradclip: 1.0\n")
    with pytest.raises(ConfigError, match=r"'train\.gradclip'; did you mean 'train\.grad_clip'"):
        load_config(f)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  steps: 3\n  lr: [1e-4\nrollout:\n  group_size: 4\n")
    with pytest.raises(ConfigError, match=rf"{f}:\d+"):
        load_config(f)


def test_wrong_type_and_range_name_the_field():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"rollout\.top_p"):
        load_config(None, ["rollout.top_p=1.5"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])


def test_task_settings_a_source_does_not_read_are_refused():
    import pytest

    from offpolicy.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tasks.levels is not read by tasks.name=calculator"):
        load_config(None, ["tasks.name=calculator", "tasks.levels=[2]"])
    with pytest.raises(ConfigError, match="tasks.template is not read by tasks.name=pairs"):
        load_config(None, ["tasks.name=pairs", "tasks.train_path=p.jsonl", "tasks.template={prompt}?"])
    with pytest.raises(ConfigError, match="tasks.few_shot is not read by tasks.name=calculator"):
        load_config(None, ["tasks.name=calculator", "tasks.few_shot=2"])
    load_config(None, ["tasks.name=calculator", "tasks.system_prompt=Use the calculator."])  # read: formatting


def test_an_invalid_value_names_the_file_and_the_overrides_it_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: -0.001\n")
    with pytest.raises(ConfigError, match=rf"invalid config in {path}:\n  train.lr"):
        load_config(path, [])
    with pytest.raises(ConfigError, match=rf"invalid config \({path} with the overrides train.lr=-1\):\n  train.lr"):
        load_config(path, ["train.lr=-1"])
