import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml

from clipalign.config import Config, ConfigError, Range, config_from_dict, load_config, read_config


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
    with pytest.raises(ConfigError, match="unknown section 'optimizer'.*valid sections: data, distill, eval"):
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


# --- value ranges -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("data.batch_size=0", "override 'data.batch_size=0': data.batch_size must be >= 1, got 0"),
    ("data.batch_size=-8", "data.batch_size must be >= 1, got -8"),
    ("data.workers=-1", "data.workers must be >= 0, got -1"),
    ("data.max_image_pixels=-1", "data.max_image_pixels must be >= 0, got -1"),
    ("data.train_crop_scale=0", "data.train_crop_scale must be in (0, 1], got 0.0"),
    ("data.train_crop_scale=1.5", "data.train_crop_scale must be in (0, 1], got 1.5"),
    ("data.weights=[1, -0.5]", "data.weights[1] must be >= 0, got -0.5"),
    ("data.weights=[0, 0]", "data.weights needs at least one entry > 0, got [0.0, 0.0]"),
    ("model.patch_dropout=1", "model.patch_dropout must be in [0, 1), got 1.0"),
    ("model.embed_dim=-512", "model.embed_dim must be >= 0, got -512"),
    ("loss.tile_size=-1", "loss.tile_size must be >= 0, got -1"),
    ("loss.label_smoothing=-0.1", "loss.label_smoothing must be in [0, 1), got -0.1"),
    ("optim.lr=-1e-3", "optim.lr must be >= 0, got -0.001"),
    ("optim.lr=.nan", "optim.lr must be a finite number >= 0, got nan"),
    ("optim.weight_decay=.inf", "optim.weight_decay must be a finite number >= 0, got inf"),
    ("optim.beta2=1.0", "optim.beta2 must be in [0, 1), got 1.0"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.min_lr_ratio=1.01", "optim.min_lr_ratio must be in [0, 1], got 1.01"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0, got -1.0"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("train.accum_steps=0", "train.accum_steps must be >= 1, got 0"),
    ("train.seed=-1", "train.seed must be in [0, 4294967295], got -1"),
    ("train.checkpoint_every=-5", "train.checkpoint_every must be >= 0, got -5"),
    ("train.peak_tflops=-989", "train.peak_tflops must be >= 0, got -989.0"),
    ("eval.every=-1", "eval.every must be >= 0, got -1"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
])
def test_out_of_range_names_key_value_and_range(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)


def test_out_of_range_in_recipe_and_run_config_names_the_file(tmp_path):
    path = _recipe(tmp_path, "train:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match=f"{path}: train.log_every must be >= 1, got 0"):
        load_config(path)
    saved = Config().to_dict()
    saved["data"]["batch_size"] = -1
    with pytest.raises(ConfigError, match="run/config.yaml: data.batch_size must be >= 1, got -1"):
        config_from_dict(saved, source="run/config.yaml")


@pytest.mark.parametrize("override", [
    "data.batch_size=1", "data.workers=0", "data.shuffle_buffer=0", "data.num_samples=0", "data.train_crop_scale=1",
    "data.train_crop_scale=0.01", "data.weights=[0, 1]", "data.weights=[]", "data.synthetic_samples=1",
    "data.max_image_pixels=0",
    "model.embed_dim=0", "model.patch_dropout=0", "model.patch_dropout=0.99", "model.lock_image_unlocked_groups=0",
    "loss.tile_size=0", "loss.label_smoothing=0", "loss.label_smoothing=0.999",
    "optim.lr=0", "optim.weight_decay=0", "optim.beta1=0", "optim.beta2=0.999999", "optim.eps=1.0e-12",
    "optim.warmup_steps=0", "optim.min_lr_ratio=0", "optim.min_lr_ratio=1", "optim.grad_clip=0",
    "train.steps=1", "train.seed=0", "train.seed=4294967295", "train.accum_steps=1", "train.log_every=1",
    "train.checkpoint_every=0", "train.keep_checkpoints=0", "train.max_nonfinite=0", "train.peak_tflops=0",
    "train.cpu_threads=0", "eval.every=0", "eval.batch_size=1",
])
def test_boundary_values_are_accepted(override):
    dotted, value = override.split("=")
    section, key = dotted.split(".")
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, section), key) == yaml.safe_load(value)


def _numeric(annotation) -> bool:
    """int or float (not bool), alone, optional, or as the items of a list."""
    if annotation in (int, float):
        return True
    return any(_numeric(arg) for arg in typing.get_args(annotation))


def test_every_numeric_key_has_a_range_and_its_default_is_in_it():
    numeric = []
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            if not _numeric(hints[f.name]):
                continue
            numeric.append(f"{section.name}.{f.name}")
            valid = f.metadata.get("range")
            assert isinstance(valid, Range), f"{section.name}.{f.name} has no range: add one with _key(..., valid=)"
            default = getattr(getattr(Config(), section.name), f.name)
            assert all(v in valid for v in (default if isinstance(default, list) else [default]))
    assert "data.batch_size" in numeric and "optim.lr" in numeric and "data.weights" in numeric
    assert "model.vision_cfg" not in numeric and "train.compile" not in numeric  # dicts and bools have no range


def test_every_key_has_one_line_of_help():
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            doc = f.metadata.get("help", "")
            assert doc and "\n" not in doc, f"{section.name}.{f.name} needs one line of help: _key(default, help)"


def test_cli_help_lists_every_key_with_its_default():
    proc = subprocess.run([sys.executable, "-m", "clipalign.train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    listed = {}
    for line in proc.stdout.splitlines():
        name, sep, default = line.strip().split("  ")[0].partition("=")
        if sep and "." in name and " " not in name:
            listed[name] = yaml.safe_load(default)
    defaults = Config().to_dict()
    expected = {f"{section}.{key}": value for section, values in defaults.items() for key, value in values.items()}
    assert listed == expected  # every key, no other, each with its default (as YAML one can paste as an override)
    assert "data.batch_size=256" in proc.stdout and "must be >= 1" in proc.stdout
    assert proc.stdout.index("\ndata:\n") < proc.stdout.index("\nmodel:\n") < proc.stdout.index("\nexport:\n")
