"""ContrastiveLoss: one process against open_clip's ClipLoss, and the DDP invariant on real gloo processes."""

import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from multiproc import check_runner

from clipalign.config import LossConfig
from clipalign.distributed import all_gather_with_grad, get_rank, get_world_size
from clipalign.loss import TILE_BUDGET_BYTES, ContrastiveLoss, _tiled_contrastive_loss, auto_tile_size, build_loss

REPO = Path(__file__).resolve().parent.parent
GRAD_CHECK = REPO / "tests" / "dist_grad_check.py"
RTOL = 1e-5  # fp32: the DDP and one-process gradients differ only by summation order (~5e-6 at worst seen)

# name -> (processes, script arguments); each is one `accelerate launch`, run once per module and shared by tests
_RUNS = {
    "dense-2": (2, ["--mode", "dense"]),
    "local-2": (2, ["--mode", "local", "--mismatch"]),
    "local-4-smoothing": (4, ["--mode", "local", "--label-smoothing", "0.1"]),
    # tile sizes that divide neither the global batch (16, 32) nor the local one (8): a ragged last tile
    "tiled-2": (2, ["--mode", "tiled", "--tile-size", "3"]),
    "tiled-4-smoothing": (4, ["--mode", "tiled", "--tile-size", "5", "--label-smoothing", "0.1"]),
    # gradient-cache accumulation, 4 micro-batches per rank: the gradients of the single big batch
    "local-2-accum4": (2, ["--mode", "local", "--accum", "4"]),
    # distillation from a frozen teacher: the same invariant, with accumulation, over the gathered global batch
    "local-2-accum2-distill": (2, ["--mode", "local", "--accum", "2", "--distill", "0.5"]),
    "tiled-4-accum4": (4, ["--mode", "tiled", "--tile-size", "5", "--accum", "4", "--label-smoothing", "0.1"]),
    "sigmoid-ring-2-accum4": (2, ["--kind", "sigmoid", "--exchange", "ring", "--accum", "4"]),
    "sigmoid-gather-4-accum4": (4, ["--kind", "sigmoid", "--exchange", "gather", "--accum", "4"]),
}


def _features(batch: int = 12, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07).requires_grad_()
    return image, text, scale


def _value_and_grads(loss_fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    loss = loss_fn(*inputs)
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


def test_not_distributed_in_a_plain_process():
    x = torch.randn(3, 4)
    assert (get_world_size(), get_rank()) == (1, 0)
    assert all_gather_with_grad(x) is x


@pytest.mark.parametrize("logit_bias", [None, -2.0])
def test_single_process_dense_and_local_equal_open_clip(logit_bias):
    inputs = _features()
    theirs = _value_and_grads(lambda i, t, s: open_clip.loss.ClipLoss()(i, t, s, logit_bias), *inputs)
    dense = _value_and_grads(lambda i, t, s: ContrastiveLoss("dense")(i, t, s, logit_bias), *inputs)
    local = _value_and_grads(lambda i, t, s: ContrastiveLoss("local")(i, t, s, logit_bias), *inputs)
    for name, a, b, c in zip(["loss", "d image", "d text", "d logit_scale"], dense, local, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: dense != local")
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7, msg=f"{name}: dense != open_clip ClipLoss")
    assert dense[-1].abs().item() > 0  # the temperature gets a gradient too


@pytest.mark.parametrize("mode", ["dense", "local"])
def test_label_smoothing_matches_cross_entropy(mode):
    image, text, scale = _features()
    smooth = 0.1

    def by_hand(i, t, s):
        logits = s * i @ t.T
        labels = torch.arange(len(i))
        return (F.cross_entropy(logits, labels, label_smoothing=smooth)
                + F.cross_entropy(logits.T, labels, label_smoothing=smooth)) / 2

    ours = _value_and_grads(ContrastiveLoss(mode, label_smoothing=smooth), image, text, scale)
    for a, b in zip(ours, _value_and_grads(by_hand, image, text, scale)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    plain = ContrastiveLoss(mode)(image, text, scale)
    assert not math.isclose(ours[0].item(), plain.item(), rel_tol=1e-3)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("tile_size", [1, 3, 7, 12, 50])  # B = 12: one column, ragged tiles, exactly B, more than B
def test_tiled_equals_dense_and_open_clip(tile_size, label_smoothing):
    image, text, scale = _features()
    bias = torch.tensor(-2.0).requires_grad_()
    inputs = (image, text, scale, bias)
    tiled = _value_and_grads(ContrastiveLoss("tiled", label_smoothing, tile_size=tile_size), *inputs)
    dense = _value_and_grads(ContrastiveLoss("dense", label_smoothing), *inputs)
    references = {"dense": dense}
    if label_smoothing == 0:  # ClipLoss has no label smoothing
        references["open_clip ClipLoss"] = _value_and_grads(open_clip.loss.ClipLoss(), *inputs)
    for ref_name, ref in references.items():
        for name, a, b in zip(["loss", "d image", "d text", "d logit_scale"], tiled, ref):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-7, msg=f"{name}: tiled != {ref_name}")
        # a bias shared by all logits cancels out of every softmax: its gradient is zero up to rounding
        assert abs(tiled[-1].item()) < 1e-6 and abs(ref[-1].item()) < 1e-6
    assert tiled[3].abs().item() > 0


def test_tiled_under_bf16_autocast_follows_dense():
    inputs = _features(batch=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiled = _value_and_grads(ContrastiveLoss("tiled", 0.1, tile_size=10), *inputs)
        dense = _value_and_grads(ContrastiveLoss("dense", 0.1), *inputs)
    for name, a, b in zip(["loss", "d image", "d text", "d logit_scale"], tiled, dense):
        assert a.dtype == b.dtype == torch.float32, name
        # both multiply in bf16; only where the products are rounded back differs
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3, msg=f"{name}: tiled != dense under autocast")


def test_tiled_keeps_no_logit_matrix_for_backward():
    batch, dim, tile = 64, 16, 8  # a (batch, batch) matrix has more elements than any feature tensor
    inputs = _features(batch=batch, dim=dim)
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[mode].append(t.numel())
        return t

    for mode in ("local", "tiled"):
        saved[mode] = []
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = ContrastiveLoss(mode, 0.1, tile_size=tile)(*inputs)
        loss.backward()
    assert max(saved["local"]) >= batch * batch  # the check sees the matrix where there is one
    assert max(saved["tiled"]) <= batch * 2 * dim, saved["tiled"]  # at most the [image | text] features


def test_tiled_gradient_written_over_gathered_copies():
    # With several processes the columns are the gather's fresh copies, and the backward writes their gradient over
    # them; copies made here stand in for them. The result must not change, and a second backward must fail loudly.
    image, text, scale = _features()

    def with_copies(i, t, s):
        return _tiled_contrastive_loss(i, t, (i.clone(), t.clone()), s, None, 0.1, 5)

    torch.testing.assert_close(_value_and_grads(with_copies, image, text, scale),
                               _value_and_grads(ContrastiveLoss("tiled", 0.1, tile_size=5), image, text, scale),
                               rtol=0, atol=0)
    loss = with_copies(image, text, scale)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(("rows", "cols", "tile"), [
    (12, 12, 12),  # small: every column at once (at least 64, at most B_global)
    (300, 1000, 192),  # a quarter of the columns, rounded down to 64: at most 1/8 of local mode's logits
    (512, 32768, 8192),  # 512 rows x 32k columns on 64 processes: a quarter of the columns
    (4096, 65536, 5440),  # the byte budget: 3 fp32 blocks of 4096 x 5440 are <= 256 MiB
    (32768, 32768, 640),  # one process at 32k
    (65536, 65536, 320),
    (2**22, 2**22, 64),  # never below 64 columns
])
def test_auto_tile_size_from_the_budget(rows, cols, tile):
    assert auto_tile_size(rows, cols) == tile
    if 64 < tile < cols:
        assert 3 * 4 * rows * tile <= TILE_BUDGET_BYTES and 4 * tile <= cols + 3


def test_tile_size_zero_is_auto_and_equals_explicit_tiles():
    assert ContrastiveLoss().tile_size == 0 and LossConfig().tile_size == 0
    inputs = _features(batch=300, dim=8)  # auto: a quarter of the 300 columns rounded to 64, so 64 + a ragged tile
    assert auto_tile_size(300, 300) == 64
    auto = _value_and_grads(ContrastiveLoss("tiled", 0.1), *inputs)
    explicit = _value_and_grads(ContrastiveLoss("tiled", 0.1, tile_size=64), *inputs)
    dense = _value_and_grads(ContrastiveLoss("dense", 0.1), *inputs)
    for name, a, b, c in zip(["loss", "d image", "d text", "d logit_scale"], auto, explicit, dense):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: tile_size=0 != tile_size=64")
        torch.testing.assert_close(a, c, rtol=RTOL, atol=1e-7, msg=f"{name}: tiled != dense")


def test_gather_false_never_gathers():
    inputs = _features()
    torch.testing.assert_close(ContrastiveLoss("local", gather=False)(*inputs), ContrastiveLoss("local")(*inputs))


def test_build_loss_and_its_errors():
    loss = build_loss(LossConfig(kind="contrastive", mode="dense", label_smoothing=0.2))
    assert isinstance(loss, ContrastiveLoss) and (loss.mode, loss.label_smoothing) == ("dense", 0.2)
    loss = build_loss(LossConfig(kind="contrastive", mode="tiled", tile_size=256))
    assert (loss.mode, loss.tile_size) == ("tiled", 256) and "tile_size=256" in repr(loss)
    loss = build_loss(LossConfig(kind="contrastive", mode="tiled", tiled_kernel="torch"))
    assert (loss.tile_size, loss.tiled_kernel) == (0, "torch") and "tiled_kernel='torch'" in repr(loss)
    with pytest.raises(ValueError, match=r"loss\.kind 'triplet' is not supported; supported kinds: contrastive"):
        build_loss(LossConfig(kind="triplet"))  # sigmoid is SigmoidLoss's (tests/test_sigmoid_loss.py)
    with pytest.raises(ValueError, match=r"'tiles' is not one of dense, local, tiled"):
        ContrastiveLoss("tiles")
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"tile_size must be a positive integer .*got {bad!r}"):
            ContrastiveLoss("tiled", tile_size=bad)
    with pytest.raises(ValueError, match="tiled_kernel 'cuda' is not one of auto, torch, triton"):
        ContrastiveLoss("tiled", tiled_kernel="cuda")
    with pytest.raises(ValueError, match="label_smoothing"):
        ContrastiveLoss(label_smoothing=1.0)


# ---- real processes: accelerate launch, gloo on CPU ------------------------------------------------------------------


@pytest.fixture(scope="module")
def grad_check(tmp_path_factory):
    """Run (once) one of the `_RUNS` under accelerate launch and return the JSON rank 0 wrote."""
    return check_runner(GRAD_CHECK, _RUNS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_RUNS))
def test_ddp_gradients_equal_one_process_on_the_global_batch(grad_check, name):
    num_processes, _ = _RUNS[name]
    r = grad_check(name)
    assert (r["world_size"], r["distributed_type"]) == (num_processes, "DistributedType.MULTI_CPU")
    missing = [k for k, g in r["grads"].items() if "rel_diff" not in g]
    assert not missing, f"parameters without a gradient (DDP, reference): {missing}"
    worst = sorted(r["grads"].items(), key=lambda kv: -kv[1]["rel_diff"])[:3]
    assert r["max_rel_diff"] < RTOL, f"{name}: worst parameters {worst}"
    # the returned value: dense gives the global loss on every rank, local a share whose mean over ranks is it
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=RTOL)
    if r["kind"] == "contrastive" and r["mode"] == "dense":
        assert len(set(r["losses"])) == 1
    else:
        assert len(set(r["losses"])) == num_processes


@pytest.mark.slow
def test_mismatched_local_batch_sizes_raise_a_clear_error(grad_check):
    error = grad_check("local-2")["mismatch_error"]
    assert error is not None and "same local batch size" in error and "[8, 6]" in error
