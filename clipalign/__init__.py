"""clipalign: CLIP-style contrastive image-text pretraining on WebDataset shards with Accelerate."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a checkpoint or an export directory as a ready model (see `clipalign.model.load`)."""
    from clipalign.model import load as _load

    return _load(path, device=device)


def load_image_encoder(path, device="cpu"):
    """Only the image tower of an export directory (see `clipalign.model.load_image_encoder`)."""
    from clipalign.model import load_image_encoder as _load

    return _load(path, device=device)


def load_text_encoder(path, device="cpu"):
    """Only the text tower of an export directory, with its tokenizer (see `clipalign.model.load_text_encoder`)."""
    from clipalign.model import load_text_encoder as _load

    return _load(path, device=device)


__all__ = ["__version__", "load", "load_image_encoder", "load_text_encoder"]
