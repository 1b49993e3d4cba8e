import json
import os
import subprocess
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
from clipalign.config import Config, ModelConfig
from clipalign.evaluate import zero_shot_classification
from clipalign.export import EXPORT_WEIGHTS_FILE, export_model
from clipalign.layout import write_weights
from clipalign.model import create_model
from clipalign.wiseft import (
    Refused,
    WeightMix,
    choose_alpha,
    config_difference,
    interpolate,
    load_start,
    main,
    markdown_table,
)

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 235)}
CAPTIONS = ["a red square", "a green square", "a blue square", "two red circles"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A starting model exported (its weights file is what the fine-tuned run names as model.pretrained) and a
    fine-tuned checkpoint: the start after two SGD steps on every weight, the logit scale included."""
    root = tmp_path_factory.mktemp("wiseft")
    torch.manual_seed(0)
    start = create_model(ModelConfig(name="tiny-vit-64"))
    start_dir = export_model(start, root / "start")
    cfg = Config()
    cfg.model.name = "tiny-vit-64"
    cfg.model.pretrained = str(start_dir / EXPORT_WEIGHTS_FILE)
    finetuned = create_model(cfg.model)
    optimizer = torch.optim.SGD(finetuned.parameters(), lr=0.5)
    for _ in range(2):
        out = finetuned(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), finetuned.tokenizer(CAPTIONS))
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
        optimizer.step()
        optimizer.zero_grad()
    run = root / "finetune"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True)
        accelerator.prepare(finetuned)  # save_state only writes models that went through prepare
        save_checkpoint(accelerator, run, 2, cfg, {"samples_seen": 8})
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return start_dir, run


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A 3-class ImageFolder of solid colours and a retrieval CSV over the same images."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    rows = ["filepath,caption"]
    for name, colour in COLOURS.items():
        (root / "colours" / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (40, 40, 3)) + 8 * i, 0, 255).astype(np.uint8)
            path = root / "colours" / name / f"{i}.png"
            Image.fromarray(pixels).save(path)
            rows.append(f"{path},a {name} square")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root / "colours", root / "captions.csv"


def _embeddings(model):
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(model.tokenizer(CAPTIONS))


def test_mix_reproduces_both_ends_exactly_and_half_is_the_mean(pair):
    start_dir, run = pair
    start, finetuned = clipalign.load(start_dir), clipalign.load(run)
    want_start, want_finetuned = _embeddings(start), _embeddings(finetuned)
    start_state = {k: v.clone() for k, v in start.clip.state_dict().items()}
    finetuned_state = {k: v.clone() for k, v in finetuned.clip.state_dict().items()}

    mix = WeightMix(finetuned, load_start(str(start_dir / EXPORT_WEIGHTS_FILE), finetuned))
    assert "logit_scale" in mix.mixed_keys  # the temperature is mixed too
    assert all(torch.equal(a, b) for a, b in zip(_embeddings(mix.mix(0.0)), want_start))
    assert all(torch.equal(a, b) for a, b in zip(_embeddings(mix.mix(1.0)), want_finetuned))
    half, want = mix.mix(0.5).clip.state_dict(), interpolate(start_state, finetuned_state, 0.5)
    for key, value in half.items():
        torch.testing.assert_close(value, (start_state[key] + finetuned_state[key]) / 2, rtol=0, atol=1e-6)
        assert torch.equal(value, want[key])
    # the start given as its export directory reads the same weights as its file
    from_dir = load_start(str(start_dir), finetuned)
    assert all(torch.equal(from_dir[k], start_state[k]) for k in start_state)


def test_tensors_equal_in_both_are_left_alone():
    """A tower locked during fine-tuning (LiT) is the same in both models: no mix rewrites or holds it."""
    torch.manual_seed(0)
    finetuned = create_model(ModelConfig(name="tiny-vit-64"))
    start = {k: v.clone() if k.startswith("visual.") else v + 1 for k, v in finetuned.clip.state_dict().items()}
    mix = WeightMix(finetuned, start)
    assert mix.mixed_keys and not any(k.startswith("visual.") for k in mix.mixed_keys)
    before = {k: v.clone() for k, v in finetuned.clip.state_dict().items() if k.startswith("visual.")}
    mixed = mix.mix(0.3).clip.state_dict()
    assert all(torch.equal(mixed[k], v) for k, v in before.items())


def test_mismatched_models_are_refused_with_the_first_difference(pair, sets, tmp_path, capsys):
    start_dir, run = pair
    assert config_difference({"vision_cfg": {"width": 192, "patch_dropout": 0.5}, "embed_dim": 128},
                             {"vision_cfg": {"width": 256}, "embed_dim": 128}) == \
        "vision_cfg.width: 192 (start) vs 256 (fine-tuned)"
    other = create_model(ModelConfig(name="tiny-vit-64", embed_dim=64))
    other_dir = export_model(other, tmp_path / "other")
    weights = tmp_path / "other.safetensors"
    write_weights(weights, other.clip.state_dict())
    finetuned = clipalign.load(run)
    with pytest.raises(Refused, match=r"text_projection: .*\[192, 64\].*\[192, 128\]"):
        load_start(str(weights), finetuned)
    (tmp_path / "broken.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="broken.safetensors: cannot be read as open_clip weights"):
        load_start(str(tmp_path / "broken.safetensors"), finetuned)
    for start, refusal in ((other_dir, "the models' configs differ: embed_dim: 64 (start) vs 128 (fine-tuned)"),
                           (weights, "text_projection")):
        with pytest.raises(SystemExit) as e:
            main(["--finetuned", str(run), "--start", str(start), "--data", str(sets[0]), "--device", "cpu"])
        assert e.value.code == 2
        captured = capsys.readouterr()
        assert refusal in captured.err and len(captured.err.strip().splitlines()) == 1
        assert "α =" not in captured.err and not captured.out  # refused before any evaluation


def test_mistakes_are_named_before_any_model_loads(pair, sets, tmp_path, capsys):
    start_dir, run = pair
    folder, captions = sets
    cases = [
        (["--finetuned", str(start_dir), "--data", str(folder)], f"--start is needed: {start_dir} is an export"),
        (["--finetuned", str(run), "--start", "laion2b", "--data", str(folder)],
         "--start laion2b: not a file, not a directory, nor a pretrained tag of tiny-vit-64"),
        (["--finetuned", str(run), "--data", str(folder), "--choose", "colours.top5"],
         "--choose colours.top5: colours (classification) reports top1, mean_per_class_recall"),
        (["--finetuned", str(run), "--data", str(folder), "--retrieval", f"colours={captions}"],
         "a second set named 'colours'"),
        (["--finetuned", str(run), "--data", str(folder), "--classnames", "nope=cifar10"],
         "--classnames nope=cifar10: no classification set named 'nope'"),
        (["--finetuned", str(run), "--data", str(folder), "--export", str(folder)], "is not an export"),
        (["--finetuned", str(run), "--alpha", "0.5", "--data", str(folder), "--export", str(tmp_path / "e")],
         "--alpha exports one mix without evaluating"),
        (["--finetuned", str(run), "--alphas", "0", "1.5", "--data", str(folder)], "a mixing ratio is in [0, 1]"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--device", "cpu"])
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not (tmp_path / "e").exists()


def test_table_marks_the_best_row_and_ties_go_to_the_middle():
    rows = [{"alpha": a, "score": s, "results": {"d": {"top1": s}}} for a, s in ((0.0, 0.5), (0.25, 0.7),
                                                                                   (0.75, 0.7), (1.0, 0.6))]
    assert choose_alpha(rows)["alpha"] == 0.25  # as near 0.5 as 0.75: the smaller
    rows.append({"alpha": 0.5, "score": 0.7, "results": {"d": {"top1": 0.7}}})
    assert choose_alpha(rows)["alpha"] == 0.5
    table = markdown_table({"choose": "mean", "sets": [{"name": "d", "kind": "classification"}], "rows": rows,
                            "chosen": {"alpha": 0.5, "score": 0.7}})
    assert table.splitlines()[:3] == ["| α | d top-1 |", "| ---: | ---: |", "| 0 | 50.0 |"]
    assert "| 0.5 * | 70.0 |" in table
    assert table.endswith("\n* the chosen mix, α = 0.5: the highest mean of the sets' main scores (70.0 %)")


def test_cli_scores_every_mix_and_exports_the_chosen_one(pair, sets, tmp_path):
    start_dir, run = pair
    folder, captions = sets
    out, export = tmp_path / "wiseft.json", tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "clipalign.wiseft", "--finetuned", str(run), "--data",
                           f"colours={folder}", "--retrieval", str(captions), "--alphas", "0", "0.5", "1",
                           "--export", str(export), "--output", str(out), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    assert table["start"] == str(start_dir / EXPORT_WEIGHTS_FILE)  # from the run's model.pretrained
    assert [row["alpha"] for row in table["rows"]] == [0, 0.5, 1]
    for row in table["rows"]:
        assert set(row["results"]) == {"colours", "captions"}
        assert {"top1", "num_images"} <= set(row["results"]["colours"])
        assert {"mean_recall@1", "image_retrieval_recall@1"} <= set(row["results"]["captions"])
    start, finetuned = clipalign.load(start_dir), clipalign.load(run)
    assert table["rows"][0]["results"]["colours"]["top1"] == zero_shot_classification(start, folder)["top1"]
    assert table["rows"][2]["results"]["colours"]["top1"] == zero_shot_classification(finetuned, folder)["top1"]
    assert "| α | colours top-1 | captions R@1 | mean |" in done.stdout
    chosen = table["chosen"]["alpha"]
    assert f"| {chosen:g} * |" in done.stdout and table["export"] == str(export)

    # the export is a plain open_clip directory holding the chosen mix
    clip = open_clip.create_model(f"local-dir:{export}").eval()
    want = WeightMix(finetuned, start.clip.state_dict()).mix(chosen).clip.state_dict()
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in want.items())
    assert "WiSE-FT mix" in (export / "README.md").read_text()


def test_alpha_exports_one_mix_without_evaluating(pair, tmp_path, capsys):
    start_dir, run = pair
    main(["--finetuned", str(run), "--start", str(start_dir), "--alpha", "0.25", "--export", str(tmp_path / "e"),
          "--device", "cpu"])
    assert "α = 0.25" in capsys.readouterr().out
    exported = clipalign.load(tmp_path / "e").clip.state_dict()
    start, finetuned = clipalign.load(start_dir).clip.state_dict(), clipalign.load(run).clip.state_dict()
    want = interpolate(start, finetuned, 0.25)
    assert all(torch.equal(exported[k], v) for k, v in want.items())
