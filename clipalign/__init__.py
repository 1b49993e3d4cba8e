"""clipalign: CLIP-style contrastive image-text pretraining on WebDataset shards with Accelerate."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a checkpoint or an export directory as a ready model (see `clipalign.model.load`)."""
    from clipalign.model import load as _load

    return _load(path, device=device)


__all__ = ["__version__", "load"]
