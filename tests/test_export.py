import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image

import clipalign
from clipalign.checkpoint import save_checkpoint
from clipalign.config import Config
from clipalign.export import CONFIG_FILE, IMAGE_ONNX, TEXT_ONNX, WEIGHTS_FILE, export_model, main
from clipalign.model import (
    IMAGE_ENCODER_CONFIG,
    IMAGE_ENCODER_WEIGHTS,
    TEXT_ENCODER_CONFIG,
    TEXT_ENCODER_WEIGHTS,
    create_model,
)

REPO = Path(__file__).resolve().parents[1]
TOWER_FILES = (IMAGE_ENCODER_WEIGHTS, IMAGE_ENCODER_CONFIG, TEXT_ENCODER_WEIGHTS, TEXT_ENCODER_CONFIG)
CAPTIONS = ["a red circle", "two blue squares on a green background", "a photo of a cat.", ""]


def _config() -> Config:
    cfg = Config()
    cfg.model.name = "tiny-vit-64"
    cfg.train.precision = "fp32"
    cfg.data.train = "/data/cc3m/{00000..00331}.tar"  # recorded in the config; the model card names it
    return cfg


def _save_checkpoint(model, run_dir: Path, cfg: Config, step: int) -> Path:
    """A real checkpoint: Accelerate state (save_state only writes models that went through prepare) + config."""
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True)
        accelerator.prepare(model)
        return save_checkpoint(accelerator, run_dir, step, cfg, {"samples_seen": step * 8})
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-vit-64 model with one optimizer step taken (so weights and temperature are off their init), saved."""
    torch.manual_seed(0)
    cfg = _config()
    model = create_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), model.tokenizer(CAPTIONS))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    optimizer.step()
    model.eval()
    run_dir = tmp_path_factory.mktemp("run")
    ckpt = _save_checkpoint(model, run_dir, cfg, step=3)
    return model, run_dir, ckpt


@pytest.fixture(scope="module")
def batch(trained):
    model = trained[0]
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return pixels, model.tokenizer(CAPTIONS)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_model(trained[2], tmp_path_factory.mktemp("exports") / "tiny")


def _embeddings(encode_image, encode_text, batch):
    pixels, ids = batch
    with torch.no_grad():
        return encode_image(pixels), encode_text(ids)


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() < 1e-6


def test_load_checkpoint_and_run_dir_give_the_saved_embeddings(trained, batch):
    model, run_dir, ckpt = trained
    want = _embeddings(model.encode_image, model.encode_text, batch)
    for path in (ckpt, run_dir):
        loaded = clipalign.load(path)
        assert not loaded.training
        _assert_same(_embeddings(loaded.encode_image, loaded.encode_text, batch), want)


def test_export_loads_in_open_clip_with_identical_embeddings(trained, batch, exported):
    model = trained[0]
    assert {p.name for p in exported.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, "README.md", *TOWER_FILES}
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in exported.iterdir())  # safetensors alone: 0600
    config = json.loads((exported / CONFIG_FILE).read_text())
    assert config["model_name"] == "tiny-vit-64"
    assert config["model_cfg"] == open_clip.get_model_config("tiny-vit-64")

    uri = f"local-dir:{exported}"
    clip, _, preprocess = open_clip.create_model_and_transforms(uri)
    clip.eval()  # open_clip returns train mode; eval takes the same attention kernels as ours
    want = _embeddings(model.encode_image, model.encode_text, batch)
    got = _embeddings(lambda x: clip.encode_image(x, normalize=True), lambda t: clip.encode_text(t, normalize=True),
                      batch)
    _assert_same(got, want)
    assert torch.equal(open_clip.get_tokenizer(uri)(CAPTIONS), model.tokenizer(CAPTIONS))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    assert torch.equal(preprocess(image), model.preprocess(image))

    reloaded = clipalign.load(exported)
    assert reloaded.name == "tiny-vit-64"
    _assert_same(_embeddings(reloaded.encode_image, reloaded.encode_text, batch), want)


def test_model_card_names_the_model_and_training_steps(exported):
    card = (exported / "README.md").read_text()
    assert "tiny-vit-64" in card and "| embedding dim | 128 |" in card and "| image size | 64 px |" in card
    assert "| context length | 32 tokens |" in card and "| training steps | 3 |" in card
    assert f'create_model_and_transforms("local-dir:{exported}")' in card


def test_each_tower_loads_on_its_own_with_the_full_models_embeddings(trained, batch, exported, tmp_path):
    from safetensors.torch import load_file

    model = trained[0]
    want_image, want_text = _embeddings(model.encode_image, model.encode_text, batch)
    image_keys = set(load_file(str(exported / IMAGE_ENCODER_WEIGHTS)))
    text_keys = set(load_file(str(exported / TEXT_ENCODER_WEIGHTS)))
    assert "conv1.weight" in image_keys and "token_embedding.weight" in text_keys
    assert "conv1.weight" not in text_keys and "token_embedding.weight" not in image_keys
    assert not any(k.startswith(("visual.", "logit_")) for k in text_keys)
    # each tower's files copied alone into a directory of their own, as a downstream service would ship them
    for kind, names in (("image", TOWER_FILES[:2]), ("text", TOWER_FILES[2:])):
        (tmp_path / kind).mkdir()
        for name in names:
            (tmp_path / kind / name).write_bytes((exported / name).read_bytes())
    image_encoder = clipalign.load_image_encoder(tmp_path / "image")
    text_encoder = clipalign.load_text_encoder(tmp_path / "text")
    assert not image_encoder.training and not text_encoder.training
    assert sum(p.numel() for p in image_encoder.parameters()) == sum(p.numel() for p in model.clip.visual.parameters())
    pixels, _ = batch
    with torch.no_grad():
        _assert_same([image_encoder(pixels), text_encoder(text_encoder.tokenizer(CAPTIONS))], [want_image, want_text])
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    assert torch.equal(image_encoder.preprocess(picture), model.preprocess(picture))
    assert json.loads((exported / TEXT_ENCODER_CONFIG).read_text())["text_cfg"]["context_length"] == 32
    with pytest.raises(FileNotFoundError, match=r"image_encoder_config\.json does not exist; export the model"):
        clipalign.load_image_encoder(tmp_path / "text")


def test_model_card_reports_training_data_and_the_last_evaluation(trained, tmp_path):
    _, run_dir, ckpt = trained
    records = [{"step": 1, "zeroshot": {"top1": 0.1, "num_classes": 30, "chance": 1 / 30}},
               {"step": 3, "zeroshot": {"top1": 0.457, "top5": 1.0, "mean_per_class_recall": 0.45,
                                        "num_classes": 30, "chance": 1 / 30},
                "retrieval": {f"{d}_retrieval_recall@{k}": k / 100 for d in ("image", "text") for k in (1, 5, 10)}},
               {"step": 9, "zeroshot": {"top1": 0.9}}]  # after the checkpoint: not this model's
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "zero')
    try:
        card = (export_model(ckpt, tmp_path / "carded") / "README.md").read_text()
    finally:
        (run_dir / "metrics.jsonl").unlink()
    assert "| loss | contrastive (local) |" in card and "| training data | `/data/cc3m/{00000..00331}.tar` |" in card
    assert "## Evaluation at step 3" in card and "| zero-shot top-1 | 45.7 % |" in card
    assert "| zero-shot classes (chance) | 30 (3.3 %) |" in card
    assert "| retrieval text to image, recall@1/5/10 | 1.0 / 5.0 / 10.0 % |" in card


def test_export_of_a_model_object_replaces_an_earlier_export_and_nothing_else(trained, batch, tmp_path, capsys):
    model = trained[0]
    out = tmp_path / "export"
    export_model(model, out)
    (out / "stale.txt").write_text("from an earlier export")
    export_model(model, out)  # an earlier export is replaced whole
    assert not (out / "stale.txt").exists()
    assert "training steps" not in (out / "README.md").read_text()  # unknown for a bare model
    reloaded = clipalign.load(out)
    _assert_same(_embeddings(reloaded.encode_image, reloaded.encode_text, batch),
                 _embeddings(model.encode_image, model.encode_text, batch))

    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not-an-export"):
        export_model(model, other)
    assert (other / "notes.txt").read_text() == "keep me"
    # the command line says so in one line, before it reads a checkpoint
    from clipalign.export import main as export_main

    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(tmp_path / "no-run"), "--out", str(other)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"clipalign-export: error: --out {other} exists and is not an export (it holds notes.txt)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "not-an-export"]  # no temporary leftovers


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_onnx_towers_match_pytorch_on_other_batch_sizes(trained, tmp_path, exporter):
    import onnxruntime

    model = trained[0]
    out = export_model(trained[1], tmp_path / "export", onnx=True, onnx_exporter=exporter)
    card = (out / "README.md").read_text()
    assert ("| dynamo |" if exporter == "auto" else "| torchscript |") in card
    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ids = model.tokenizer(["a", "b c", "a green triangle", "", "the quick brown fox"])
    for filename, inputs, encode in [(IMAGE_ONNX, pixels, model.encode_image), (TEXT_ONNX, ids, model.encode_text)]:
        session = onnxruntime.InferenceSession(str(out / filename), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        assert inp.shape[0] == "batch"
        for n in (1, 5):  # the example batch at export time was 2, the check batch 3
            got = session.run(None, {inp.name: inputs[:n].numpy()})[0]
            with torch.no_grad():
                want = encode(inputs[:n]).numpy()
            assert got.shape == want.shape
            assert np.abs(got - want).max() < 1e-4


def test_cli_exports_a_run_directory(trained, tmp_path, capsys):
    out = tmp_path / "cli-export"
    main(["--checkpoint", str(trained[1]), "--out", str(out)])
    assert (out / WEIGHTS_FILE).is_file() and str(out) in capsys.readouterr().out
    with pytest.raises(ValueError, match="onnx_exporter"):
        export_model(trained[0], tmp_path / "x", onnx=True, onnx_exporter="tracer")


def test_onnx_export_without_its_packages_is_one_line_naming_the_extra(trained, tmp_path, capsys, monkeypatch):
    # a None entry in sys.modules is how Python marks a package as not importable: the state of an install without
    # the onnx extra, for these packages only
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(trained[1]), "--out", str(tmp_path / "out"), "--onnx"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "ONNX export needs onnxruntime (not installed): pip install 'clipalign[onnx]'" in err
    assert not (tmp_path / "out").exists()
    main(["--checkpoint", str(trained[1]), "--out", str(tmp_path / "out")])  # without --onnx nothing is missing
    assert (tmp_path / "out" / WEIGHTS_FILE).is_file()


@pytest.mark.parametrize("script", ["tools/export.py", "tools/zero_shot.py", "tools/train_tokenizer.py"])
def test_tool_scripts_run(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
