"""Validation during training (`data.val`, `eval.val_every`): the loss of a known model on the validation shards is
the training loss function on the same batches, the retrieval recall is that of the same features, N processes give
what one process with N times the batch gives, and a real training run logs, summarises and plots it. No mocks: real
shards, the real model, loss, trainer and launcher."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from multiproc import REPO, run_check_script
from PIL import Image

from clipalign.config import LossConfig, ModelConfig
from clipalign.data.synthetic import draw_sample
from clipalign.data.writer import image_to_bytes, write_shards
from clipalign.loss import build_loss
from clipalign.model import create_model
from clipalign.plot import main as plot_main
from clipalign.plot import plot_runs, read_metrics, read_val
from clipalign.validate import val_batches, validate

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SMALL = ["data.synthetic_samples=512", "data.batch_size=16", "data.workers=1", "data.shuffle_buffer=64",
         "optim.warmup_steps=2", "train.log_every=2", "export.dir=", "eval.zeroshot=none", "eval.retrieval=none"]
# raw samples that are not validated, by index: what they lack
NO_CAPTION, NO_IMAGE, CORRUPT = 2, 5, 11
SKIPPED = {"no_caption": 1, "no_image": 1, "bad_image": 1}


def _val_samples(count: int):
    for i in range(count):
        image, caption, _ = draw_sample(random.Random(1000 + i))
        sample = {"__key__": f"{i:06d}", "jpg": image_to_bytes(image), "txt": caption}
        if i == NO_CAPTION:
            del sample["txt"]
        elif i == NO_IMAGE:
            del sample["jpg"]
        elif i == CORRUPT:
            sample["jpg"] = b"\xff\xd8\xff\xe0 not the rest of a JPEG"
        yield sample


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    """60 captioned 64-px samples in 4 shards, three of them unusable early on (no caption, no image, corrupt)."""
    paths = write_shards(_val_samples(60), tmp_path_factory.mktemp("val"), prefix="val", samples_per_shard=16)
    assert len(paths) == 4
    return str(paths[0].parent / "val-{000000..000003}.tar")


def _usable_pairs(spec: str) -> list[tuple[Image.Image, str]]:
    """(image, caption) of every sample with a decodable image and a caption, in shard order, read here directly."""
    root = Path(spec).parent
    pairs = []
    for shard in sorted(root.glob("val-*.tar")):
        samples: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for sample in samples.values():
            if "jpg" not in sample or "txt" not in sample:
                continue
            try:
                image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            except OSError:
                continue
            pairs.append((image, sample["txt"].decode()))
    return pairs


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("loss", [{"kind": "contrastive", "mode": "local"}, {"kind": "contrastive", "mode": "dense"},
                                  {"kind": "sigmoid", "exchange": "ring"}], ids=["local", "dense", "sigmoid"])
def test_the_validation_loss_of_a_known_model_is_the_training_loss_function_on_the_same_batches(
        val_shards, accelerator, loss):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64"), loss["kind"])
    loss_fn = build_loss(LossConfig(**loss))
    batch, samples = 8, 36  # 4 batches of 8; the remainder (4) is dropped
    result = validate(model, loss_fn, accelerator, val_shards, batch, samples)
    assert model.training  # its mode is back

    # the same samples, the evaluation transform, the same model and the loss object, computed here
    pairs = _usable_pairs(val_shards)[:32]
    model.eval()
    losses, images, texts = [], [], []
    with torch.no_grad():
        for start in range(0, 32, batch):
            chunk = pairs[start:start + batch]
            out = model(torch.stack([model.preprocess(image) for image, _ in chunk]),
                        model.tokenizer([caption for _, caption in chunk]))
            losses.append(loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                                  out.get("logit_bias")))
            images.append(out["image_features"])
            texts.append(out["text_features"])
    model.train()
    expected = torch.stack(losses).double().mean().item()
    assert result["loss"] == pytest.approx(expected, abs=1e-6)
    assert (result["samples"], result["batches"], result["global_batch"]) == (32, 4, 8)
    assert result["skipped"] == SKIPPED
    scores = torch.cat(texts) @ torch.cat(images).T  # (texts, images); pair i is caption i with image i
    own = torch.arange(32)
    assert result["image_retrieval_recall@1"] == pytest.approx((scores.argmax(1) == own).double().mean().item())
    assert result["text_retrieval_recall@1"] == pytest.approx((scores.argmax(0) == own).double().mean().item())
    assert result["image_retrieval_recall@10"] >= result["image_retrieval_recall@5"] \
        >= result["image_retrieval_recall@1"]
    assert result["image_retrieval_chance"] == pytest.approx(1 / 32)


def test_each_process_holds_a_contiguous_block_of_every_global_batch(val_shards):
    """Two ranks in step (threads sharing a sum, as an all-reduce does): rank 0's rows then rank 1's make the global
    batch one process reads alone; the corrupt image (row 9 of the first batch, rank 1's) is dropped on both and the
    following samples move up."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64"))
    urls = sorted(str(p) for p in Path(val_shards).parent.glob("val-*.tar"))
    alone = list(val_batches(urls, model.preprocess, model.tokenizer, 16, 48))

    barrier, parts, out = threading.Barrier(2), {}, {}

    def rank(r: int) -> None:
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            parts[r] = t
            barrier.wait()
            total = parts[0] + parts[1]
            barrier.wait()
            return total

        skipped: Counter = Counter()
        out[r] = (list(val_batches(urls, model.preprocess, model.tokenizer, 8, 48, r, 2, reduce_sum,
                                   skipped=skipped)), skipped)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(alone) == 3 and len(out[0][0]) == len(out[1][0]) == 3
    for (images, texts), (images0, texts0), (images1, texts1) in zip(alone, out[0][0], out[1][0]):
        assert torch.equal(images, torch.cat([images0, images1])) and torch.equal(texts, torch.cat([texts0, texts1]))
    assert out[0][1] == out[1][1] == SKIPPED


@pytest.mark.slow
def test_two_processes_give_the_validation_of_one_process_with_twice_the_batch(val_shards, tmp_path, accelerator):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64"))
    alone = validate(model, build_loss(LossConfig()), accelerator, val_shards, 16, 40)
    result = run_check_script(REPO / "tests" / "dist_val_check.py", 2,
                              ["--shards", val_shards, "--batch-size", "8", "--samples", "40"], tmp_path / "out.json")
    assert result["processes"] == 2
    for way in ("whole", "fsdp"):  # DDP's case (whole model per process) and FSDP's (every forward needs both)
        val = result[way]
        assert (val["samples"], val["batches"], val["global_batch"]) == (32, 2, 16)
        assert val["skipped"] == alone["skipped"] == SKIPPED
        assert val["loss"] == pytest.approx(alone["loss"], abs=1e-5)
        for key in alone:
            if "recall" in key:
                assert val[key] == pytest.approx(alone[key], abs=1e-9), (way, key)


def test_the_plot_draws_validation_lines_by_step_or_by_samples(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "samples": 32 * s, "loss": 3 - s / 10, "lr": 1e-3} for s in (2, 4, 6)]
    lines += [{"step": s, "val": {"loss": 3.1 - s / 20, "samples": 64, "batches": 4, "global_batch": 16,
                                  "image_retrieval_recall@1": s / 100, "image_retrieval_chance": 1 / 64,
                                  "skipped": {}, "seconds": 0.5}} for s in (3, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r["step"] for r in read_metrics(run)[0]] == [2, 4, 6]  # the training lines alone
    assert read_val(run) == {"loss": [(s, 3.1 - s / 20) for s in (3, 6)],
                             "image_retrieval_recall@1": [(s, s / 100) for s in (3, 6)],
                             "image_retrieval_chance": [(s, 1 / 64) for s in (3, 6)]}
    for x in ("step", "samples"):
        with Image.open(plot_runs([run], tmp_path / f"{x}.png", x=x)) as img:
            assert img.height == 2 * 320  # loss (train and val), lr, validation retrieval


# ---- in a training run -------------------------------------------------------------------------------------------


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CLIPALIGN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "clipalign.train", str(QUICKSTART), *SMALL, *args], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_training_run_validates_at_val_every_and_at_the_end_and_plots_it(val_shards, tmp_path):
    run = tmp_path / "run"
    proc = _train(tmp_path, "train.steps=4", f"data.val={val_shards}", "eval.val_every=2", "eval.val_samples=40",
                  f"train.output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val" in r]
    assert [r["step"] for r in vals] == [2, 4]  # at val_every, and at the end
    for r in vals:
        assert (r["val"]["samples"], r["val"]["batches"], r["val"]["skipped"]) == (32, 2, SKIPPED)
        assert r["val"]["loss"] > 0 and 0 <= r["val"]["image_retrieval_recall@1"] <= 1
    assert vals[0]["val"]["loss"] != vals[1]["val"]["loss"]  # the model trained between them
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"] == vals[-1]["val"]
    events = b"".join(p.read_bytes() for p in run.rglob("events.out.tfevents*"))
    assert b"val/loss" in events and b"val/image_retrieval_recall@1" in events  # the tracker has them too

    series = read_val(run)
    assert series["loss"] == [(2, vals[0]["val"]["loss"]), (4, vals[1]["val"]["loss"])]
    assert [step for step, _ in series["text_retrieval_recall@5"]] == [2, 4]
    plot_main([str(run)])
    with Image.open(run / "curves.png") as img:
        # loss (train and val), logit scale, lr, samples/s, validation retrieval: five panels in three rows
        assert img.format == "PNG" and img.height == 3 * 320


@pytest.mark.parametrize("args, expected", [
    (["data.val=/nonexistent/val-{0..1}.tar"], "data.val source '/nonexistent/val-{0..1}.tar': 2 of 2 shards do "
                                               "not exist"),
    (["eval.val_every=5"], "eval.val_every=5 validates on data.val, which is not set"),
    (["data.val=VAL", "eval.val_samples=8"], "eval.val_samples=8 is less than one global batch of validation"),
])
def test_validation_settings_are_checked_before_anything_is_built(val_shards, tmp_path, args, expected):
    run = tmp_path / "run"
    proc = _train(tmp_path, *[a.replace("VAL", val_shards) for a in args], f"train.output_dir={run}")
    assert proc.returncode == 2 and f"clipalign-train: error: {expected}" in proc.stderr, proc.stderr[-3000:]
    assert not run.exists() and not (tmp_path / "cache").exists()
