import json
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
from safetensors.torch import load_file

import clipalign
from clipalign.checkpoint import resolve_checkpoint, save_checkpoint
from clipalign.config import Config, ModelConfig
from clipalign.evaluate import zero_shot_classification
from clipalign.export import EXPORT_WEIGHTS_FILE, export_model
from clipalign.layout import read_checkpoint_weights, write_weights
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


def _states(start_dir: Path, run: Path) -> tuple[dict, dict]:
    """The two endpoints' open_clip state dicts, read from their files."""
    finetuned = read_checkpoint_weights(resolve_checkpoint(run))
    return (load_file(start_dir / EXPORT_WEIGHTS_FILE),
            {k.removeprefix("clip."): v for k, v in finetuned.items() if k.startswith("clip.")})


def _embeddings(model):
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(model.tokenizer(CAPTIONS))


def test_mix_reproduces_both_ends_exactly_and_half_is_the_mean(pair):
    start_dir, run = pair
    start, finetuned = clipalign.load(start_dir), clipalign.load(run)
    want_start, want_finetuned = _embeddings(start), _embeddings(finetuned)
    assert not any(torch.allclose(a, b, atol=1e-3) for a, b in zip(want_start, want_finetuned))  # two models
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
    with pytest.raises(SystemExit) as e:
        main(["--finetuned", str(run), "--start", str(other_dir), "--data", str(sets[0]), "--device", "cpu"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == (f"clipalign-wiseft: error: cannot mix {other_dir} (start) with {run} (fine-tuned): the "
                            f"models' configs differ: embed_dim: 64 (start) vs 128 (fine-tuned)\n")
    assert not captured.out  # refused before any evaluation


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


@pytest.mark.filterwarnings("ignore:'clipalign.wiseft' found in sys.modules")  # run as python -m, in-process
def test_cli_scores_every_mix_and_exports_the_chosen_one(pair, sets, tmp_path, monkeypatch, capsys):
    start_dir, run = pair
    folder, captions = sets
    out, export = tmp_path / "wiseft.json", tmp_path / "export"
    monkeypatch.setattr(sys, "argv", ["clipalign-wiseft", "--finetuned", str(run), "--data", f"colours={folder}",
                                      "--retrieval", str(captions), "--alphas", "0", "0.5", "1", "--export",
                                      str(export), "--output", str(out), "--device", "cpu", "--no-progress"])
    runpy.run_module("clipalign.wiseft", run_name="__main__")
    printed = capsys.readouterr().out
    table = json.loads(out.read_text())
    assert table["start"] == str(start_dir / EXPORT_WEIGHTS_FILE)  # from the run's model.pretrained
    assert [row["alpha"] for row in table["rows"]] == [0, 0.5, 1]
    for row in table["rows"]:
        assert set(row["results"]) == {"colours", "captions"}
        assert {"top1", "num_images"} <= set(row["results"]["colours"])
        assert {"mean_recall@1", "image_retrieval_recall@1"} <= set(row["results"]["captions"])
    start = clipalign.load(start_dir)
    assert table["rows"][0]["results"]["colours"] == zero_shot_classification(start, folder, progress=False)
    assert "| α | colours top-1 | captions R@1 | mean |" in printed
    chosen = table["chosen"]["alpha"]
    assert f"| {chosen:g} * |" in printed and table["export"] == str(export)

    # the export is a plain open_clip directory holding the chosen mix
    clip = open_clip.create_model(f"local-dir:{export}")
    want = interpolate(*_states(start_dir, run), chosen)
    assert all(torch.equal(clip.state_dict()[k], v) for k, v in want.items())
    assert "WiSE-FT mix" in (export / "README.md").read_text()


def test_alpha_exports_one_mix_without_evaluating(pair, tmp_path, capsys):
    start_dir, run = pair
    main(["--finetuned", str(run), "--start", str(start_dir), "--alpha", "0.25", "--export", str(tmp_path / "e"),
          "--device", "cpu"])
    assert "α = 0.25" in capsys.readouterr().out
    exported = load_file(tmp_path / "e" / EXPORT_WEIGHTS_FILE)
    want = interpolate(*_states(start_dir, run), 0.25)
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], v) for k, v in want.items())


def test_tool_script_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tools/wiseft.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "wiseft.py"), run_name="__main__")
    assert e.value.code == 0 and "--alphas" in capsys.readouterr().out
