"""Distillation (`distill.*`): the term against a direct computation, the teacher's view of the student's batches,
precomputed embeddings looked up by key, refusals, and a short real run from an exported teacher of another image
size and tokenizer. The multi-process invariant (N processes give the gradients of one process on the global batch,
with accumulation) is checked by tests/test_loss.py's `local-2-accum2-distill` run of tests/dist_grad_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipalign.config import ConfigError, DistillConfig, ModelConfig
from clipalign.distill import (
    DistillationLoss,
    Teacher,
    TeacherEmbeddings,
    distillation_loss,
    load_teacher,
    same_tokenizer,
    shard_keys,
)
from clipalign.loss import ContrastiveLoss
from clipalign.model import create_model

REPO = Path(__file__).resolve().parent.parent


def _features(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_the_term_is_the_cross_entropy_of_the_teachers_distributions_both_ways():
    image, text = _features(6, 16, 0).requires_grad_(), _features(6, 16, 1).requires_grad_()
    t_image, t_text = _features(6, 24, 2), _features(6, 24, 3)
    scale, t_scale = torch.tensor(20.0, requires_grad=True), torch.tensor(50.0)
    value = distillation_loss(image, text, scale, t_image, t_text, t_scale)
    logits, teacher = scale * image @ text.T, t_scale * t_image @ t_text.T
    expected = (-(teacher.softmax(1) * logits.log_softmax(1)).sum(1).mean()
                - (teacher.T.softmax(1) * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    # at its minimum when the student's distributions are the teacher's: the entropy of the teacher's
    same = distillation_loss(t_image, t_text, t_scale, t_image, t_text, t_scale)
    entropy = -(teacher.softmax(1) * teacher.log_softmax(1)).sum(1).mean() / 2 \
        - (teacher.T.softmax(1) * teacher.T.log_softmax(1)).sum(1).mean() / 2
    assert same.item() == pytest.approx(entropy.item(), rel=1e-5) and value.item() > same.item()
    value.backward()
    assert image.grad.abs().sum() > 0 and scale.grad is not None  # the student learns; the teacher has no graph

    task = ContrastiveLoss()
    mixed = DistillationLoss(task, 0.5)
    total = mixed(image, text, scale, teacher_image=t_image, teacher_text=t_text, teacher_scale=t_scale)
    assert total.item() == pytest.approx(task(image, text, scale).item() + 0.5 * value.item(), rel=1e-6)
    assert mixed(image, text, scale).item() == task(image, text, scale).item()  # validation: the task loss alone
    with pytest.raises(ValueError, match="distill.weight must be a finite number >= 0"):
        DistillationLoss(task, -1.0)


def test_the_teacher_sees_its_own_image_size_normalisation_and_tokens():
    student_tok = create_model(ModelConfig(name="tiny-vit-64")).tokenizer  # BPE, 32 positions
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64", vision_cfg={"image_size": 48},
                                     text_cfg={"context_length": 40})).eval()
    assert not same_tokenizer(model.tokenizer, student_tok)  # another context length: its own ids
    assert same_tokenizer(create_model(ModelConfig(name="tiny-vit-64")).tokenizer, student_tok)
    teacher = Teacher(model, student_image_size=64, own_tokens=True)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    out = teacher(images, model.tokenizer(["a", "b", "c"]))
    resized = F.interpolate(images.float(), size=(48, 48), mode="bicubic", antialias=True).clamp(0, 255)
    expected = model.encode_image((resized - model.pixel_mean) / model.pixel_std)
    assert torch.allclose(out["image_features"], expected, atol=1e-6)
    assert not out["image_features"].requires_grad and out["logit_scale"].item() == pytest.approx(
        model.clip.logit_scale.exp().item())


def test_a_teacher_that_cannot_be_had_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.name 'no-such-model' is not an open_clip model config"):
        load_teacher(DistillConfig(teacher="no-such-model"))
    with pytest.raises(ConfigError, match="distill.teacher='tiny-vit-64' is a model name without weights"):
        load_teacher(DistillConfig(teacher="tiny-vit-64"))
    with pytest.raises(ConfigError, match="distill.teacher tiny-vit-64 .*nope.safetensors.*: cannot load its weights"):
        load_teacher(DistillConfig(teacher="tiny-vit-64", teacher_pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ConfigError, match="distill.teacher_pretrained='x' is for an open_clip model name"):
        load_teacher(DistillConfig(teacher=str(tmp_path), teacher_pretrained="x"))


def test_precomputed_embeddings_are_clipalign_embeds_looked_up_by_key_and_must_cover_the_shards(tmp_path):
    import random

    import clipalign
    from clipalign.data.synthetic import draw_sample
    from clipalign.data.writer import image_to_bytes, write_shards
    from clipalign.embed import embed_corpus
    from clipalign.embed.corpus import plan_shards
    from clipalign.export import export_model

    rng = random.Random(0)
    samples = []
    for i in range(10):
        image, caption, _ = draw_sample(rng, 64)
        samples.append({"__key__": f"{i:09d}", "jpg": image_to_bytes(image, "jpg"), "txt": caption})
    shards = write_shards(samples, tmp_path / "shards", samples_per_shard=5)
    torch.manual_seed(2)
    teacher = export_model(create_model(ModelConfig(name="tiny-vit-64", embed_dim=96)), tmp_path / "teacher")
    model = clipalign.load(teacher)
    embed_corpus(model, plan_shards(f"{tmp_path}/shards/train-{{000000..000001}}.tar"), tmp_path / "emb",
                 batch_size=4, workers=0, progress=False, model_path=teacher)
    table = TeacherEmbeddings(tmp_path / "emb")  # the teacher's temperature from embed.json
    assert table.logit_scale == pytest.approx(model.clip.logit_scale.exp().item(), rel=1e-5)
    table.check_keys(shard_keys(shards[0]), str(shards[0]))  # every key of the first shard is there
    out = table(["000000007", "000000002"], torch.device("cpu"))
    with torch.no_grad():
        expected = model.encode_text(model.tokenizer([samples[7]["txt"], samples[2]["txt"]]))
    assert out["text_features"].shape == (2, 96) and torch.allclose(out["text_features"], expected, atol=2e-3)
    other = write_shards([{"__key__": "stranger", "txt": "x"}], tmp_path / "other")
    with pytest.raises(ConfigError, match=r"has no embedding of 1 of the 1 samples of .*train-000000.tar, e.g. key "
                                          r"'stranger'"):
        table.check_keys(shard_keys(other[0]), str(other[0]))
    with pytest.raises(KeyError, match="no embedding of sample 'stranger'"):
        table(["stranger"], torch.device("cpu"))
    with pytest.raises(ConfigError, match="is not an embedding directory"):
        TeacherEmbeddings(tmp_path / "shards")


@pytest.mark.slow
def test_a_short_run_distils_from_an_exported_teacher_of_another_size_and_tokenizer(tmp_path):
    """The trainer end to end: the teacher's export (48 px, 40 text positions) beside a 64 px, 32-position student:
    the workers tokenize for it, its images are resized, and the metrics are finite."""
    from clipalign.export import export_model

    torch.manual_seed(1)
    teacher = create_model(ModelConfig(name="tiny-vit-64", vision_cfg={"image_size": 48},
                                       text_cfg={"context_length": 40}))
    export_model(teacher, tmp_path / "teacher")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "clipalign.train", str(REPO / "recipes" / "quickstart.yaml"),
           "data.synthetic_samples=256", "data.batch_size=8", "data.workers=1", "train.accum_steps=2",
           "train.steps=2", "train.log_every=1", "optim.warmup_steps=1", "eval.zeroshot=none", "eval.retrieval=none",
           "export.dir=", "train.log_with=none", f"train.output_dir={run}", f"distill.teacher={tmp_path / 'teacher'}",
           "distill.weight=0.5"]
    env = dict(os.environ, CLIPALIGN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"distilling from {tmp_path / 'teacher'} (weight 0.5, its own tokenizer; image size 48)" in proc.stdout
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(np.isfinite(m["loss"]) for m in lines)
    assert all(m["nonfinite_steps"] == 0 for m in lines)
