"""The directory layouts: one name per file, and the helpers that read and write run, checkpoint and export files."""

import pytest
import torch
from safetensors.torch import load_file

from clipalign import layout


def test_every_file_has_its_own_name():
    names = {k: v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
    assert len(set(names.values())) == len(names), names
    # the checkpoint's weights (Accelerate's name) and the export's (open_clip's) are different files
    assert layout.CHECKPOINT_WEIGHTS_FILE != layout.EXPORT_WEIGHTS_FILE


def test_checkpoint_names_round_trip(tmp_path):
    ckpt = layout.checkpoint_dir(tmp_path / "run", 42)
    assert ckpt == tmp_path / "run" / layout.CHECKPOINTS_DIR / "step_00000042"
    assert layout.checkpoint_step(ckpt) == 42 and layout.checkpoint_run_dir(ckpt) == tmp_path / "run"
    for name in ("step_0042", ".tmp-step_00000042", "notes"):
        assert layout.checkpoint_step(tmp_path / name) is None
    assert layout.keys_file(tmp_path, 3) == tmp_path / layout.KEYS_DIR / "rank3.jsonl"


def test_export_files_round_trip(tmp_path):
    assert not layout.is_export(tmp_path)
    config = {"model_cfg": {"embed_dim": 8}, "preprocess_cfg": {}, "model_name": "m"}
    layout.write_json(tmp_path / layout.EXPORT_CONFIG_FILE, config)
    assert layout.is_export(tmp_path) and layout.read_export_config(tmp_path) == config
    assert (tmp_path / layout.EXPORT_CONFIG_FILE).read_text().endswith("}\n")
    base = torch.arange(12.0).view(3, 4)
    layout.write_weights(tmp_path / layout.TEXT_ENCODER_WEIGHTS, {"a": base, "b": base, "t": base.t()})
    with pytest.raises(FileNotFoundError, match=rf"{layout.TEXT_ENCODER_CONFIG} does not exist; export the model"):
        layout.read_tower(tmp_path, "text")
    layout.write_json(tmp_path / layout.TEXT_ENCODER_CONFIG, {"tower": "text"})
    cfg, weights = layout.read_tower(tmp_path, "text")
    assert cfg == {"tower": "text"} and torch.equal(weights["t"], base.t()) and torch.equal(weights["b"], base)
    assert load_file(str(tmp_path / layout.TEXT_ENCODER_WEIGHTS)).keys() == {"a", "b", "t"}


def test_checkpoint_without_weights_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{layout.CHECKPOINT_WEIGHTS_FILE}: no model weights"):
        layout.read_checkpoint_weights(tmp_path)
