"""Gradient-cache accumulation: k micro-batches give the gradients of one big batch (single process here; the
multi-process check runs in tests/dist_grad_check.py)."""

import copy

import open_clip
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from clipalign.accumulate import forward_backward
from clipalign.config import LossConfig, ModelConfig
from clipalign.loss import build_loss
from clipalign.model import create_model

RTOL = 1e-5


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def _batch(model, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, 64, 64), dtype=torch.uint8, generator=g)
    words = ["red", "green", "blue", "circle", "square", "cross", "small", "large"]
    picks = torch.randint(0, len(words), (size, 2), generator=g).tolist()
    texts = model.tokenizer([f"a {words[a]} {words[b]} {i}" for i, (a, b) in enumerate(picks)])
    return images, texts


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        rel = (a[name] - b[name]).abs().max() / b[name].abs().max().clamp_min(1e-30)
        assert rel < RTOL, f"{name}: relative difference {rel:.2e}"


@pytest.mark.parametrize("kind, mode, lock_image", [("contrastive", "local", False), ("contrastive", "dense", False),
                                                    ("contrastive", "local", True)])
def test_accumulated_micro_batches_give_the_big_batch_gradients(accelerator, kind, mode, lock_image):
    # lock_image: a locked image tower (LiT) gives features without a graph; only the text side is back-propagated
    set_seed(0)
    big = create_model(ModelConfig(name="tiny-vit-64", lock_image=lock_image), kind)
    small = copy.deepcopy(big)
    loss_fn = build_loss(LossConfig(kind=kind, mode=mode))
    images, texts = _batch(big, 16)

    big_loss = forward_backward(big, loss_fn, [(images, texts)], accelerator)
    micro = [(images[i:i + 4], texts[i:i + 4]) for i in range(0, 16, 4)]
    acc_loss = forward_backward(small, loss_fn, micro, accelerator)

    torch.testing.assert_close(acc_loss, big_loss, rtol=1e-6, atol=1e-6)
    _assert_same_grads(_grads(small), _grads(big))
    assert small.clip.logit_scale.grad.abs() > 0  # the temperature is trained under accumulation too


def test_naive_accumulation_would_differ(accelerator):
    """The check above has teeth: summing per-micro-batch losses (plain accumulation) changes the gradients."""
    set_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64"))
    naive = copy.deepcopy(model)
    loss_fn = build_loss(LossConfig())
    images, texts = _batch(model, 16)
    forward_backward(model, loss_fn, [(images, texts)], accelerator)
    for i in range(0, 16, 4):
        forward_backward(naive, loss_fn, [(images[i:i + 4], texts[i:i + 4])], accelerator)
    name = "clip.visual.conv1.weight"
    rel = (_grads(naive)[name] / 4 - _grads(model)[name]).abs().max() / _grads(model)[name].abs().max()
    assert rel > 1e-2


def test_random_layers_are_replayed_in_the_second_forward(accelerator):
    """With patch dropout, the re-forward must see the masks of the cached forward, or gradients are wrong."""
    set_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64"))
    model.clip.visual.patch_dropout = open_clip.transformer.PatchDropout(0.5)
    reference = copy.deepcopy(model)
    loss_fn = build_loss(LossConfig())
    images, texts = _batch(model, 12)
    micro = [(images[i:i + 4], texts[i:i + 4]) for i in range(0, 12, 4)]

    torch.manual_seed(7)
    forward_backward(model, loss_fn, micro, accelerator)
    # the reference draws the same masks in the same order, keeping every graph
    torch.manual_seed(7)
    outs = [reference(i, t) for i, t in micro]
    loss = loss_fn(torch.cat([o["image_features"] for o in outs]), torch.cat([o["text_features"] for o in outs]),
                   outs[-1]["logit_scale"])
    loss.backward()
    _assert_same_grads(_grads(model), _grads(reference))
