"""Search an index directory by text, by image or by an indexed sample (`clipalign-search`); `--serve` serves a page.

The model is the one index.json names (the embedding directory's, from its embed.json); a text query goes through
the text tower, an image through the image tower, and either searches the image index (images that match) or the
text index (captions that match). Searching by an indexed sample's key uses its stored image embedding. A hit's row
is its row in the embedding directory, whose metadata gives the key, the caption and where the image is: a file
(`image_path`, or `path` where that is a file) or a sample in a tar shard (`shard`), read with `read_shard`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipalign.index import (
    MODALITIES,
    IndexInputError,
    embedding_modalities,
    load_index,
    open_embeddings,
    read_embed_config,
    read_index_config,
    read_metadata,
)
from clipalign.layout import EMBED_CONFIG_FILE

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from clipalign.model import DualEncoder

MAX_QUERY_CHARS = 1000  # a caption is far shorter; the tokenizer would keep only the first 77 tokens anyway
MAX_K = 1000
IMAGE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
_IMAGE_CACHE = 256  # images read from shards kept in memory: a page of results and the pages around it


class SearchError(ValueError):
    """A query or an index that cannot be searched; the message says why, in one line."""


class UnknownKey(SearchError):
    """No indexed sample has the key asked for."""


@dataclass
class Hit:
    """One result: its rank (from 1), similarity, row in the embedding directory, key and caption, and where the
    image came from (`image_path`, or `shard` for an image inside a tar shard)."""

    rank: int
    score: float
    row: int
    key: str
    caption: str | None
    image_path: str | None
    shard: str | None


def _short(text: str, limit: int = 60) -> str:
    """`text` quoted for a message, cut to `limit` characters (a query may be huge)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_text_query(text: str) -> str:
    """The query with surrounding white space removed.

    Raises:
        SearchError: empty, or over `MAX_QUERY_CHARS` characters.
    """
    text = (text or "").strip()
    if not text:
        raise SearchError("empty query: type a few words that describe the image")
    if len(text) > MAX_QUERY_CHARS:
        raise SearchError(f"query too long: {len(text)} characters, at most {MAX_QUERY_CHARS}")
    return text


class Searcher:
    """An index directory with its model and metadata, ready to answer queries.

    Args:
        index_dir: from clipalign-index.
        model: the model's directory, where it is no longer where the embeddings say (default: theirs).
        embeddings: the embedding directory, where it is no longer where index.json says (default: that).
        device: where the model runs.

    Raises:
        SearchError: a missing or unusable index, embedding directory or model; the message says which.
    """

    def __init__(self, index_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                 embeddings: str | os.PathLike | None = None, device: str = "cpu"):
        try:
            self.index_dir = Path(index_dir)
            self.config = read_index_config(self.index_dir)
            self.embed_dir = Path(embeddings or self.config.get("embeddings", ""))
            if not (self.embed_dir / EMBED_CONFIG_FILE).is_file():
                raise SearchError(f"the embedding directory {self.embed_dir} that {self.index_dir} indexes is not "
                                  f"there (moved?); pass --embeddings DIR")
            self.embed_config = read_embed_config(self.embed_dir)
            self.modalities = [m for m in MODALITIES if m in self.config["indexes"]]
            if not self.modalities:
                raise SearchError(f"{self.index_dir}: holds no index yet; build one with clipalign-index")
            self.indexes = {m: load_index(self.index_dir, m) for m in self.modalities}
            self.metadata = read_metadata(self.embed_dir, self.modalities[0])
        except IndexInputError as e:
            raise SearchError(str(e)) from None
        for modality, index in self.indexes.items():
            if index.ntotal != self.metadata.num_rows:
                raise SearchError(f"{self.index_dir}: the {modality} index holds {index.ntotal} vectors but "
                                  f"{self.embed_dir} has {self.metadata.num_rows} rows: the embeddings changed since "
                                  f"they were indexed; build the index again")
        recorded = self.config.get("model") or {}
        self.model_path = Path(model or recorded.get("path") or "")
        self.model_name = recorded.get("name")
        if not model and not recorded.get("path"):
            raise SearchError(f"{self.embed_dir / EMBED_CONFIG_FILE} names no model; pass --model PATH")
        if not self.model_path.exists():
            moved = "" if model else f" that made {self.embed_dir}"
            raise SearchError(f"the model {self.model_path}{moved} is not there (moved or deleted?); "
                              f"pass --model PATH")
        self.device = device
        self._model: DualEncoder | None = None
        self._lock = threading.Lock()  # one query through the model at a time; faiss and pyarrow read concurrently
        self._images: OrderedDict[int, tuple[bytes, str]] = OrderedDict()  # shard images read lately, by row
        self._images_lock = threading.Lock()
        self._stored: dict[str, Any] = {}

    # ---- the model and the query embeddings ----------------------------------------------------------------------

    @property
    def model(self) -> DualEncoder:
        """The model, loaded on first use."""
        if self._model is None:
            import clipalign

            try:
                model = clipalign.load(self.model_path, device=self.device)
            except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
                raise SearchError(f"{self.model_path}: cannot load a model from it ({type(e).__name__}: {e})") \
                    from None
            dim = next(iter(self.indexes.values())).d
            width = model.model_cfg.get("embed_dim")
            if width is not None and width != dim:
                raise SearchError(f"the model {self.model_path} makes {width}-dim embeddings but the index holds "
                                  f"{dim}-dim ones: not the model that made {self.embed_dir}")
            self.model_name = self.model_name or model.name
            self._model = model
        return self._model

    def _text_vector(self, text: str) -> np.ndarray:
        import torch

        model = self.model
        with self._lock, torch.no_grad():
            return model.encode_text(model.tokenizer([text]).to(self.device)).float().cpu().numpy()

    def _image_vector(self, image: Image.Image) -> np.ndarray:
        import torch

        model = self.model
        with self._lock, torch.no_grad():
            pixels = model.preprocess(image).unsqueeze(0).to(self.device)
            return model.encode_image(pixels).float().cpu().numpy()

    # ---- queries -------------------------------------------------------------------------------------------------

    def search_text(self, text: str, k: int = 10, modality: str = "image") -> list[Hit]:
        """The k rows whose `modality` embeddings best match a text.

        Raises:
            SearchError: an empty or too long query, k out of range, or no such index.
        """
        return self._search(self._text_vector(check_text_query(text)), k, modality)

    def search_image(self, image: Image.Image | str | os.PathLike | bytes, k: int = 10,
                     modality: str = "image") -> list[Hit]:
        """The k rows whose `modality` embeddings best match an image (PIL image, file or encoded bytes).

        Raises:
            SearchError: an image that does not open, k out of range, or no such index.
        """
        if not hasattr(image, "convert"):
            image = open_query_image(image)
        return self._search(self._image_vector(image.convert("RGB")), k, modality)

    def search_key(self, key: str, k: int = 10, modality: str = "image") -> list[Hit]:
        """The k rows nearest an indexed sample's stored image embedding (its text one where no image is stored).

        Raises:
            SearchError: no sample has this key, k out of range, or no such index.
        """
        row = self.row_of(key)
        return self._search(self._stored_vector(row), k, modality)

    def row_of(self, key: str) -> int:
        """The row of the sample with this key.

        Raises:
            SearchError: none has it.
        """
        import pyarrow.compute as pc

        row = pc.index(self.metadata["key"], key).as_py() if isinstance(key, str) and key else -1
        if row < 0:
            raise UnknownKey(f"no sample with key {_short(str(key))} in {self.embed_dir}")
        return row

    def _stored_vector(self, row: int) -> np.ndarray:
        try:
            if "embeddings" not in self._stored:
                present = embedding_modalities(self.embed_dir)
                self._stored["embeddings"] = open_embeddings(self.embed_dir, "image" if "image" in present else "text")
            return self._stored["embeddings"].rows([row])
        except IndexInputError as e:
            raise SearchError(str(e)) from None

    def _search(self, vector: np.ndarray, k: int, modality: str) -> list[Hit]:
        if modality not in self.indexes:
            raise SearchError(f"{self.index_dir}: no {modality} index (it holds: {', '.join(self.modalities)})")
        if not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise SearchError(f"k={k!r}: expected a whole number from 1 to {MAX_K}")
        # a sample without a caption has a row of zeros in the text embeddings (clipalign-embed keeps the parts'
        # rows aligned): it is no match for any query, so it is left out of text results
        # embed.json counts them per modality and reason: {"text": {"no_caption": n}}
        zero_rows = (self.embed_config.get("zero_rows") or {}).get(modality, {})
        extra = sum(zero_rows.values()) if modality == "text" else 0
        scores, rows = self.indexes[modality].search(vector, k + extra)
        found = [(float(s), int(r)) for s, r in zip(scores[0], rows[0]) if r >= 0]
        records = self.metadata.take([r for _, r in found]).to_pylist()
        if extra:
            kept = [(hit, rec) for hit, rec in zip(found, records) if rec.get("caption") is not None][:k]
            found, records = [hit for hit, _ in kept], [rec for _, rec in kept]
        return [Hit(rank, round(score, 4), row, str(rec["key"]), rec.get("caption"), self._image_path(rec),
                    rec.get("shard")) for rank, ((score, row), rec) in enumerate(zip(found, records), start=1)]

    # ---- images --------------------------------------------------------------------------------------------------

    def _image_path(self, record: dict[str, Any]) -> str | None:
        """The image file of a metadata row: `image_path` (relative ones from the source folder), else `path` where it
        names an image file (it may name the shard or table a sample came from)."""
        from clipalign.data.sample import IMAGE_EXTENSIONS

        for column in ("image_path", "path"):
            value = record.get(column)
            if not value or (column == "path" and Path(value).suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS):
                continue
            path = Path(value)
            if not path.is_absolute():
                source = self.embed_config.get("source")
                path = (Path(source) if isinstance(source, str) and Path(source).is_dir() else self.embed_dir) / path
            if column == "image_path" or path.is_file():
                return str(path)
        return None

    def image_bytes(self, key: str) -> tuple[bytes, str]:
        """The image of the sample with this key, and its MIME type: from its file, or read out of its shard.

        Raises:
            SearchError: no such key, no image for it, or bytes that are not an image.
        """
        row = self.row_of(key)
        with self._images_lock:
            if row in self._images:
                self._images.move_to_end(row)
                return self._images[row]
        record = self.metadata.slice(row, 1).to_pylist()[0]
        path = self._image_path(record)
        if path:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise SearchError(f"the image of {_short(key)} cannot be read: {e.strerror}: {path}") from None
        elif record.get("shard"):
            data = self._shard_image(record["shard"], str(record["key"]))
        else:
            raise SearchError(f"no image is recorded for {_short(key)} (its metadata has no image_path or shard)")
        found = data, _image_type(data, key)
        if not path:  # files are read again cheaply; a shard is read from its start up to the sample
            with self._images_lock:
                self._images[row] = found
                while len(self._images) > _IMAGE_CACHE:
                    self._images.popitem(last=False)
        return found

    def _shard_image(self, shard: str, key: str) -> bytes:
        from clipalign.data.sample import image_bytes
        from clipalign.data.shards import ShardReadError, read_shard

        try:
            for sample in read_shard(shard):
                if sample["__key__"] == key:
                    data = image_bytes(sample)
                    if data is None:
                        raise SearchError(f"sample {_short(key)} in {shard} holds no image")
                    return data
        except ShardReadError as e:
            raise SearchError(f"{shard}: cannot read the image of {_short(key)}: {e}") from None
        raise SearchError(f"sample {_short(key)} is not in {shard} any more")

    # ---- what the page shows -------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The model, the embedding directory and each index (kind, vectors, parameters, recall)."""
        indexes = {}
        for modality in self.modalities:
            record = self.config["indexes"][modality]
            recall = record.get("recall") or {}
            indexes[modality] = {"index_key": record.get("index_key"), "kind": record.get("kind"),
                                 "vectors": record.get("vectors"), "params": record.get("params", {}),
                                 "recall_at_10": recall.get("same_modality"),
                                 "cross_modal_recall_at_10": recall.get("cross_modal")}
        return {"model": {"name": self.model_name or self.model_path.name, "path": str(self.model_path)},
                "index": str(self.index_dir), "embeddings": str(self.embed_dir), "indexes": indexes,
                "max_query_chars": MAX_QUERY_CHARS}


def _image_type(data: bytes, key: str) -> str:
    """The MIME type of image bytes, checked by decoding the header (a recorded path is not trusted to be an image).

    Raises:
        SearchError: not an image of a type browsers show.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            kind = img.format
    except (UnidentifiedImageError, OSError):
        kind = None
    if kind not in IMAGE_FORMATS:
        raise SearchError(f"the image of {_short(key)} is not a JPEG, PNG, WebP or GIF image")
    return IMAGE_FORMATS[kind]


def open_query_image(source: str | os.PathLike | bytes) -> Image.Image:
    """An image to search by, decoded to RGB (the pixel limit of training's decoder applies).

    Raises:
        SearchError: missing, not an image, or corrupt; naming the file.
    """
    from clipalign.data.transforms import decode_image

    name = "the uploaded image" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise SearchError(f"{name}: no such image file")
    try:
        return decode_image(source)
    except Exception as e:  # Pillow raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        raise SearchError(f"{name}: cannot open it as an image ({type(e).__name__}: {e})") from None


def _print_hits(searcher: Searcher, query: str, modality: str, hits: list[Hit]) -> None:
    record = searcher.config["indexes"][modality]
    params = ", ".join(f"{k} {v}" for k, v in record.get("params", {}).items())
    print(f"{query} -> {modality} index {record['index_key']}" + (f" ({params})" if params else "")
          + f", {record['vectors']} vectors")
    if not hits:
        print("no results")
        return
    width = max(len(h.key) for h in hits)
    print(f"{'rank':>4}  {'score':>6}  {'key':<{width}}  caption")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:>6.3f}  {hit.key:<{width}}  {hit.caption or ''}")


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-search`: query an index directory (clipalign-index's) by text, image or key, or serve its page."""
    parser = argparse.ArgumentParser(prog="clipalign-search", description=main.__doc__)
    parser.add_argument("index_dir", help="index directory (index.json, image.index, text.index)")
    query = parser.add_mutually_exclusive_group()
    query.add_argument("--text", help="find images (or captions) that match this text")
    query.add_argument("--image", help="find images (or captions) that match this image file")
    query.add_argument("--key", help="find images (or captions) like the indexed sample with this key")
    query.add_argument("--serve", action="store_true", help="serve a search page instead")
    parser.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    parser.add_argument("--modality", choices=MODALITIES, default="image",
                        help="search the image index (default) or the text index (captions)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--model", help="the model, if it is no longer where the embeddings say")
    parser.add_argument("--embeddings", help="the embedding directory, if it is no longer where the index says")
    parser.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on (default 127.0.0.1; "
                                                            "0.0.0.0 lets other machines in)")
    parser.add_argument("--port", type=int, default=8000, help="--serve: the port (default 8000; 0: any free one)")
    args = parser.parse_args(argv)
    if args.text is None and args.image is None and args.key is None and not args.serve:
        parser.error("give a query (--text, --image or --key) or --serve")
    try:
        searcher = Searcher(args.index_dir, model=args.model, embeddings=args.embeddings, device=args.device)
        if args.serve:
            from clipalign.search_page import serve

            serve(searcher, args.host, args.port)
            return
        if args.text is not None:
            hits, label = searcher.search_text(args.text, args.k, args.modality), f"text {_short(args.text)}"
        elif args.image is not None:
            image = open_query_image(args.image)
            hits, label = searcher.search_image(image, args.k, args.modality), f"image {args.image}"
        else:
            hits, label = searcher.search_key(args.key, args.k, args.modality), f"key {_short(args.key)}"
    except SearchError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.json:
        query = {"text": args.text} if args.text is not None else (
            {"image": args.image} if args.image is not None else {"key": args.key})
        json.dump({"query": query, "modality": args.modality, "index": str(args.index_dir),
                   "results": [asdict(h) for h in hits]}, sys.stdout, ensure_ascii=False)
        print()
    else:
        _print_hits(searcher, label, args.modality, hits)


if __name__ == "__main__":  # through the module's own name, so that the page's imports of it share its classes
    from clipalign.search import main as _main

    _main()
