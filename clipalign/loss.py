"""Contrastive image-text losses, called on each process's local features; gathering across processes is their job.

`ContrastiveLoss` is CLIP's symmetric InfoNCE over the global batch. Its invariant: on N processes under DDP (which
averages parameter gradients over processes) the parameter gradients equal those of one process computing the loss
on the whole global batch. See docs/loss.md for the math and for why neither mode needs a rescaling factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipalign.config import ConfigError, LossConfig
from clipalign.distributed import all_gather_with_grad, get_rank, get_world_size

CONTRASTIVE_MODES = ("dense", "local")


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP loss) of local features against the features of the whole global batch.

    Modes (identical with one process):
        dense: every process builds the full (B_global, B_global) logit matrix and returns the global loss.
        local: every process builds only its own rows, (B_local, B_global) per direction, and returns the mean loss
            of those rows; the mean of the returned values over processes is the global loss.

    Args:
        mode: "dense" or "local".
        label_smoothing: as in `F.cross_entropy`, applied to each row over its B_global classes.
        gather: False scores the local batch alone (world-size-1 semantics, no collectives), e.g. for a reference.
    """

    def __init__(self, mode: str = "local", label_smoothing: float = 0.0, gather: bool = True):
        super().__init__()
        if mode not in CONTRASTIVE_MODES:
            raise ValueError(f"contrastive loss mode {mode!r} is not one of {', '.join(CONTRASTIVE_MODES)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.mode = mode
        self.label_smoothing = label_smoothing
        self.gather = gather

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, label_smoothing={self.label_smoothing}, gather={self.gather}"

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """The loss (a scalar) of this process's L2-normalised (B_local, D) features; `logit_scale` is exponentiated.

        dense returns the global loss on every process; local returns this process's share, whose mean over
        processes is the global loss (reduce it with `accelerator.reduce(loss.detach(), "mean")` to log it).
        """
        world_size = get_world_size() if self.gather else 1
        if world_size == 1:
            all_image, all_text = image_features, text_features
        else:
            all_image, all_text = _gather_features(image_features, text_features)  # (B_global, D) each

        if self.mode == "dense" or world_size == 1:
            logits_per_image = logit_scale * all_image @ all_text.T  # (B_global, B_global)
            if logit_bias is not None:
                logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_image.T  # (B_global, B_global)
            labels = torch.arange(all_image.shape[0], device=image_features.device)  # (B_global,)
        else:
            logits_per_image = logit_scale * image_features @ all_text.T  # (B_local, B_global)
            logits_per_text = logit_scale * text_features @ all_image.T  # (B_local, B_global)
            if logit_bias is not None:
                logits_per_image = logits_per_image + logit_bias
                logits_per_text = logits_per_text + logit_bias
            local_size = image_features.shape[0]
            # our rows sit at rank * B_local in the gathered (rank-ordered) columns
            labels = get_rank() * local_size + torch.arange(local_size, device=image_features.device)  # (B_local,)

        return (
            F.cross_entropy(logits_per_image, labels, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits_per_text, labels, label_smoothing=self.label_smoothing)
        ) / 2


def _gather_features(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both towers' features from all processes, with gradient, in one collective (and one batch-size check)."""
    both = all_gather_with_grad(torch.cat([image_features, text_features], dim=1))  # (B_global, D_image + D_text)
    return both.split([image_features.shape[1], text_features.shape[1]], dim=1)


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module a recipe's `loss` section asks for."""
    if cfg.kind != "contrastive":
        raise ConfigError(f"loss.kind {cfg.kind!r} is not supported; supported kinds: contrastive")
    return ContrastiveLoss(mode=cfg.mode, label_smoothing=cfg.label_smoothing)
