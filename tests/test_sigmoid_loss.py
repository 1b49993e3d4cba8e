"""SigmoidLoss: one process against open_clip's SigLipLoss, and the DDP invariant on real gloo processes."""

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from dist_common import saved_shapes
from multiproc import check_runner

from clipalign.config import LossConfig
from clipalign.distributed import ring_exchange_with_grad
from clipalign.loss import SigmoidLoss, build_loss

REPO = Path(__file__).resolve().parent.parent
SIGMOID_CHECK = REPO / "tests" / "dist_sigmoid_check.py"
RTOL = 1e-5  # fp32: the DDP and one-process gradients differ only by summation order (~3e-7 seen)

# name -> (processes, script arguments); each is one `accelerate launch` that checks both exchanges
_RUNS = {
    # the SigLIP init (scale 10, bias -10): what training starts from
    "2": (2, ["--open-clip"]),
    # bias 0: the negatives carry much of the gradient, so a gradient that misses its owner shows (~1e-1, not ~1e-4)
    "4": (4, ["--open-clip", "--logit-bias", "0", "--mismatch"]),
}


def _inputs(batch: int = 12, dim: int = 32, bias: float = -10.0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    text.data[:4] = image.data[:4]  # a few pairs at similarity 1, so the positives span a range of logits
    return [image, text, torch.tensor(10.0).requires_grad_(), torch.tensor(bias).requires_grad_()]


def _value_and_grads(loss_fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    loss = loss_fn(*inputs)
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("exchange", ["ring", "gather"])
@pytest.mark.parametrize("bias", [-10.0, 0.0])
def test_single_process_equals_open_clip(exchange, bias):
    inputs = _inputs(bias=bias)
    ours = _value_and_grads(SigmoidLoss(exchange), inputs)
    theirs = _value_and_grads(open_clip.loss.SigLipLoss(), inputs)
    for name, a, b in zip(["loss", "d image", "d text", "d logit_scale", "d logit_bias"], ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{name}: SigmoidLoss != open_clip SigLipLoss")
    assert all(g.abs().max() > 0 for g in ours[1:])


def test_without_bias_and_with_python_floats():
    image, text, scale, _ = _inputs()
    no_bias = SigmoidLoss()(image, text, scale)
    torch.testing.assert_close(no_bias, open_clip.loss.SigLipLoss()(image, text, scale, None), rtol=1e-6, atol=0)
    as_floats = SigmoidLoss()(image, text, 10.0, -10.0)
    torch.testing.assert_close(as_floats, SigmoidLoss()(image, text, scale, torch.tensor(-10.0)), rtol=0, atol=0)


def test_low_precision_features_give_an_fp32_loss_and_gradients_of_their_dtype():
    image, text, scale, bias = (x.detach().bfloat16().requires_grad_() for x in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SigmoidLoss()(image, text, scale, bias)
    grads = torch.autograd.grad(loss, [image, text, scale, bias])
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    reference = open_clip.loss.SigLipLoss()(*(x.detach().float() for x in (image, text, scale, bias)))
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-6, atol=0)


def test_backward_keeps_features_not_logits():
    image, text, scale, bias = _inputs(batch=12, dim=32)
    with saved_shapes() as shapes:
        SigmoidLoss()(image, text, scale, bias)
    assert shapes == {(12, 32), ()}


def test_gather_false_never_exchanges():
    inputs = _inputs()
    torch.testing.assert_close(SigmoidLoss(gather=False)(*inputs), SigmoidLoss()(*inputs), rtol=0, atol=0)
    assert list(ring_exchange_with_grad(inputs[1])) == []  # one process: nothing to receive


def test_build_loss_and_its_errors():
    assert build_loss(LossConfig(kind="sigmoid")).exchange == "ring"
    loss = build_loss(LossConfig(kind="sigmoid", exchange="gather"))
    assert isinstance(loss, SigmoidLoss) and (loss.exchange, loss.gather) == ("gather", True)
    assert repr(loss) == "SigmoidLoss(exchange='gather', gather=True)"
    with pytest.raises(ValueError, match=r"exchange 'bidir' is not one of ring, gather"):
        SigmoidLoss("bidir")
    image, text, scale, bias = _inputs()
    with pytest.raises(ValueError, match="one text per image, got 12 image and 11 text features"):
        SigmoidLoss()(image, text[:11], scale, bias)


# ---- real processes: accelerate launch, gloo on CPU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sigmoid_check(tmp_path_factory):
    """Run (once) one of the `_RUNS` under accelerate launch and return the JSON rank 0 wrote."""
    return check_runner(SIGMOID_CHECK, _RUNS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["ring", "gather"])
@pytest.mark.parametrize("name", list(_RUNS))
def test_ddp_gradients_equal_one_process_on_the_global_batch(sigmoid_check, name, exchange):
    num_processes, _ = _RUNS[name]
    r = sigmoid_check(name)
    assert (r["world_size"], r["distributed_type"]) == (num_processes, "DistributedType.MULTI_CPU")
    run = r["exchanges"][exchange]
    missing = [k for k, g in run["grads"].items() if "rel_diff" not in g]
    assert not missing, f"parameters without a gradient (DDP, reference): {missing}"
    assert "clip.logit_bias" in run["grads"]
    worst = sorted(run["grads"].items(), key=lambda kv: -kv[1]["rel_diff"])[:3]
    assert run["max_rel_diff"] < RTOL, f"{name} {exchange}: worst parameters {worst}"
    # each rank returns its share (its images against all texts, / B_local); their mean is the global loss
    assert run["loss"] == pytest.approx(r["ref_loss"], rel=RTOL)
    assert len(set(run["losses"])) == num_processes
    # what the loss keeps for the backward: (B_local, D) features and scalars, never a block of logits
    assert sorted(map(tuple, run["saved_shapes"])) == [(), (r["local_batch"], 128)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_RUNS))
def test_equal_to_open_clip_siglip_on_the_same_processes(sigmoid_check, name):
    diffs = sigmoid_check(name)["open_clip"]
    # open_clip's neighbour exchanges (bidir, shift) are torch.distributed P2P, which gloo runs too
    pairs = {f"{ours} vs {theirs}" for ours in ("ring", "gather") for theirs in ("bidir", "shift", "gather")}
    assert set(diffs) == pairs
    for pair, rel in diffs.items():
        assert max(rel.values()) < RTOL, f"{pair}: {rel}"


@pytest.mark.slow
def test_mismatched_local_batch_sizes_raise_a_clear_error(sigmoid_check):
    errors = sigmoid_check("4")["mismatch_errors"]
    for exchange, user in [("ring", "ring_exchange_with_grad"), ("gather", "all_gather_with_grad")]:
        assert errors[exchange] is not None and f"{user} needs the same local batch size" in errors[exchange]
        assert "[8, 6, 8, 8]" in errors[exchange]
