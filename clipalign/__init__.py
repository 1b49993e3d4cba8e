"""clipalign: CLIP-style contrastive image-text pretraining on WebDataset shards with Accelerate.

The loaders below import the model code only when called, so `import clipalign` stays light; the directories they
read are laid out as `clipalign.layout` names them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from clipalign.model import DualEncoder, ImageEncoder, TextEncoder

__version__ = "0.1.0"


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> DualEncoder:
    """Load a checkpoint or an export directory as a ready model (see `clipalign.model.load`)."""
    from clipalign.model import load as _load

    return _load(path, device=device)


def load_image_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageEncoder:
    """Only the image tower of an export directory (see `clipalign.model.load_image_encoder`)."""
    from clipalign.model import load_image_encoder as _load

    return _load(path, device=device)


def load_text_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> TextEncoder:
    """Only the text tower of an export directory, with its tokenizer (see `clipalign.model.load_text_encoder`)."""
    from clipalign.model import load_text_encoder as _load

    return _load(path, device=device)


__all__ = ["__version__", "load", "load_image_encoder", "load_text_encoder"]
