"""Text tokenizers behind one interface: call with a string or a list of strings, get (N, context_length) ids."""

from __future__ import annotations

import open_clip
import torch

import clipalign.model_configs  # noqa: F401  (registers our configs with open_clip)


def build_tokenizer(model_name: str, context_length: int | None = None):
    """The tokenizer of an open_clip model config (BPE for the CLIP text tower), picklable for DataLoader workers."""
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def tokenize(tokenizer, texts: str | list[str]) -> torch.Tensor:
    """Token ids, (N, context_length) int64, truncated with the end-of-text token kept as open_clip does."""
    return tokenizer([texts] if isinstance(texts, str) else list(texts))
