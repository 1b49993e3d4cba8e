import subprocess
import sys

import pytest
import yaml

from clipalign.config import Config, ConfigError, load_config, read_config


def _recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_then_recipe_then_overrides(tmp_path):
    path = _recipe(tmp_path, "data:\n  batch_size: 32\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["optim.lr=2e-4", "train.steps=7", "train.resume=auto", "data.train=/d/{0..3}.tar"])
    assert cfg.data.batch_size == 32  # recipe
    assert cfg.optim.lr == 2e-4  # override wins over recipe
    assert cfg.train.steps == 7 and cfg.train.resume == "auto"
    assert cfg.data.train == "/d/{0..3}.tar"
    assert cfg.data.workers == Config().data.workers  # default kept


def test_int_accepted_for_float_and_numeric_text_kept_for_str(tmp_path):
    cfg = load_config(None, ["optim.lr=1", "train.output_dir=123"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.output_dir == "123"


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    path = _recipe(tmp_path, "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "weight_decay" in msg and str(path) in msg


def test_unknown_section_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="unknown section 'optimizer'.*valid sections: data, eval"):
        load_config(None, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="exactly one dot"):
        load_config(None, ["steps=3"])


@pytest.mark.parametrize("override, expected", [
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("train.steps=1.5", "expected an integer"),
    ("data.synthetic=maybe", "data.synthetic: expected true or false"),
    ("optim.lr=fast", "optim.lr: expected a float"),
    ("train.precision=fp8", "'fp8' is not one of fp32, bf16, fp16"),
    ("loss.kind=triplet", "is not one of contrastive, sigmoid"),
])
def test_wrong_types_and_choices(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_recipe_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(_recipe(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(_recipe(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=11", "model.name=RN50", "eval.zeroshot=/x"])
    cfg.save(tmp_path / "run" / "config.yaml")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(text)["train"]["steps"] == 11
    assert read_config(tmp_path / "run" / "config.yaml") == cfg


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        assert recipe.read_text().startswith("#"), f"{recipe} must start with its launch command comment"
        load_config(recipe)


def test_cli_reports_config_error_with_exit_2(tmp_path):
    path = _recipe(tmp_path, "train:\n  stepz: 3\n")
    proc = subprocess.run([sys.executable, "-m", "clipalign.train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown key train.stepz" in proc.stderr and "steps" in proc.stderr
