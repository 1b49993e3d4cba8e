"""Text tokenizers behind one interface, `Tokenizer`: call with a string or a list of strings, get (N, context_length)
ids; and the choice of the tokenizer a recipe or a saved model uses.

Two kinds: open_clip's tokenizer of a model config (BPE for the CLIP text tower), and `SentencePieceTokenizer`, a
SentencePiece model trained on your own captions (see `clipalign.train_tokenizer`). Which one:

- `recipe_tokenizer`: a recipe's (model config name, `model.tokenizer` SentencePiece file, context length);
- `directory_tokenizer`: a checkpoint's or export's (the SentencePiece model it carries, or open_clip's own);
- `load_tokenizer`: a spec on the command line, a `.model` path or an open_clip model name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import open_clip
import sentencepiece as spm
import torch
from open_clip.tokenizer import whitespace_clean

import clipalign.model_configs  # noqa: F401  (registers our configs with open_clip)
from clipalign.config import ConfigError
from clipalign.layout import EXPORT_CONFIG_FILE, TOKENIZER_FILE

DEFAULT_CONTEXT_LENGTH = 77  # CLIP's text context, the default for SentencePiece tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    """What clipalign takes for a tokenizer: open_clip's (`SimpleTokenizer`, `HFTokenizer`, `SigLipTokenizer`) or a
    `SentencePieceTokenizer`. Called on texts, it returns their ids, (N, context_length) int64, padded with 0."""

    context_length: int

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor: ...


def build_tokenizer(model_name: str, context_length: int | None = None) -> Tokenizer:
    """The tokenizer of an open_clip model config (BPE for the CLIP text tower), picklable for DataLoader workers."""
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def recipe_tokenizer(model_name: str, sentencepiece: str | os.PathLike | None = None,
                     context_length: int | None = None) -> Tokenizer:
    """The tokenizer a recipe trains with: the SentencePiece model `sentencepiece` (`model.tokenizer`) if given, else
    the model config's own.

    Args:
        model_name: the open_clip model config (`model.name`).
        sentencepiece: a SentencePiece `.model` file; empty or None for the config's tokenizer.
        context_length: the recipe's `model.text_cfg.context_length`; None for the model config's (77 if it has none).

    Raises:
        ConfigError: `sentencepiece` is neither a `.model` path nor an existing file.
    """
    if not sentencepiece:
        return build_tokenizer(model_name, context_length=context_length)
    path = Path(sentencepiece)
    if path.suffix != ".model" and not path.is_file():
        raise ConfigError(f"model.tokenizer {str(sentencepiece)!r}: expected a SentencePiece .model file "
                          f"(train one with clipalign-train-tokenizer), or leave it empty for the config's own")
    if context_length is None:
        text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
        context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    return SentencePieceTokenizer(path, context_length=context_length)


def directory_tokenizer(path: str | os.PathLike, text_cfg: dict, sentencepiece: bool) -> Tokenizer:
    """The tokenizer a text tower in directory `path` (an export) was trained with: the SentencePiece model there when
    `sentencepiece`, else what open_clip builds for the directory's open_clip config or for `text_cfg`.

    Raises:
        FileNotFoundError: `sentencepiece`, and the directory holds no SentencePiece model.
    """
    path = Path(path)
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    if sentencepiece:
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{path / TOKENIZER_FILE} does not exist; this text encoder was trained with a "
                                    f"SentencePiece tokenizer: copy {TOKENIZER_FILE} with the encoder's files")
        return SentencePieceTokenizer(path / TOKENIZER_FILE, context_length=context_length)
    if (path / EXPORT_CONFIG_FILE).is_file():
        return open_clip.get_tokenizer(f"local-dir:{path}")
    kwargs = text_cfg.get("tokenizer_kwargs", {})
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length, **kwargs)
    return open_clip.SimpleTokenizer(context_length=context_length, **kwargs)


def tokenize(tokenizer: Tokenizer, texts: str | list[str]) -> torch.Tensor:
    """Token ids, (N, context_length) int64, truncated with the end-of-text token kept as open_clip does."""
    return tokenizer([texts] if isinstance(texts, str) else list(texts))


def clean_text(text: str) -> str:
    """The text a SentencePiece tokenizer encodes: stripped, runs of white space collapsed to one space, case kept.

    Training applies the same cleaning to the captions, so the model learns on what it will be asked to encode.
    """
    return whitespace_clean(text)


class SentencePieceTokenizer:
    """A trained SentencePiece model with CLIP's special tokens, shaped like open_clip's BPE tokenizer.

    Ids: 0 is padding; SentencePiece piece `p` is `p + 1`; start-of-text is `pieces + 1` and end-of-text `pieces + 2`,
    the highest id, because open_clip's text tower pools the features at `text.argmax(dim=-1)`. A row is
    `[SOT, piece ids..., EOT, 0, 0, ...]`; a text too long for the context loses its last pieces, never its EOT.
    `vocab_size` (`pieces + 3`) is what the text tower's embedding table must hold.

    Picklable (DataLoader workers): the pickle carries the model itself, not only its path.

    Args:
        model_file: a `.model` file written by SentencePiece (e.g. by `clipalign-train-tokenizer`).
        context_length: ids per row, SOT and EOT included; at least 2.

    Raises:
        FileNotFoundError: `model_file` does not exist.
        ValueError: `model_file` is not a SentencePiece model, or `context_length` < 2.
    """

    pad_token_id = 0

    def __init__(self, model_file: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH):
        path = Path(model_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece tokenizer model {path} does not exist" +
                                    (" (it is a directory)" if path.is_dir() else ""))
        self._load(path, path.read_bytes(), context_length)

    def _load(self, model_file: Path, model_proto: bytes, context_length: int) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end of text), got {context_length}")
        expected = "expected a .model file written by SentencePiece, e.g. by clipalign-train-tokenizer"
        if not model_proto:
            raise ValueError(f"tokenizer model {model_file} is empty; {expected}")
        try:
            processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # SentencePiece reports a failed protobuf parse as a RuntimeError
            raise ValueError(f"tokenizer model {model_file} is not a SentencePiece model ({e}); {expected}") from e
        if processor.vocab_size() < 1:
            raise ValueError(f"tokenizer model {model_file} holds no pieces; {expected}")
        self._sp = processor
        self._proto = model_proto
        self.model_file = model_file
        self.context_length = context_length
        self.pieces = processor.vocab_size()
        self.sot_token_id = self.pieces + 1
        self.eot_token_id = self.pieces + 2
        self.vocab_size = self.pieces + 3

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids of `texts`, (N, context_length) int64; `context_length` overrides the tokenizer's own."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end of text), got {length}")
        encoded = self._sp.encode([clean_text(t) for t in texts])  # one call for the batch
        rows = []
        for ids in encoded:
            body = [p + 1 for p in ids[:length - 2]]
            rows.append([self.sot_token_id, *body, self.eot_token_id] + [self.pad_token_id] * (length - 2 - len(body)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), length)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of one row of ids, (context_length,) or shorter, with padding, SOT and EOT dropped.

        The text is SentencePiece's normalised form of what was encoded (NFKC for models trained here).

        Raises:
            ValueError: `ids` is not one row, or holds an id outside [0, vocab_size).
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        specials = (self.pad_token_id, self.sot_token_id, self.eot_token_id)
        pieces = [int(i) - 1 for i in ids if i not in specials]
        bad = [p + 1 for p in pieces if not 0 <= p < self.pieces]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside this tokenizer's range [0, {self.vocab_size})")
        return self._sp.decode(pieces)

    @property
    def model_proto(self) -> bytes:
        """The SentencePiece model in use, serialised: its own bytes, whatever `model_file` holds now."""
        return self._proto

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model in use (`model_proto`) to `path`, e.g. into an export."""
        path = Path(path)
        path.write_bytes(self.model_proto)
        return path

    def __getstate__(self) -> dict[str, Any]:
        return {"model_file": str(self.model_file), "model_proto": self._proto, "context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._load(Path(state["model_file"]), state["model_proto"], state["context_length"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.model_file)!r}, vocab_size={self.vocab_size}, "
                f"context_length={self.context_length})")


def load_tokenizer(spec: str | os.PathLike, context_length: int | None = None) -> Tokenizer:
    """A tokenizer from a spec: a SentencePiece `.model` file, or else the name of an open_clip model config.

    A spec that is a path object, ends in `.model` or names an existing file is a SentencePiece model
    (`SentencePieceTokenizer`, `context_length` defaulting to 77); anything else goes to `build_tokenizer`
    (`context_length` defaulting to the model config's own; for a name it does not know, open_clip logs a warning
    and returns CLIP's BPE tokenizer).

    Raises:
        FileNotFoundError: a `.model` spec that does not exist.
        ValueError: a file that is not a SentencePiece model.
    """
    if isinstance(spec, os.PathLike) or str(spec).endswith(".model") or os.path.isfile(spec):
        return SentencePieceTokenizer(spec, context_length or DEFAULT_CONTEXT_LENGTH)
    return build_tokenizer(spec, context_length)
