"""The embedding directory on disk: parts written whole, the plan and markers a resume reads, embed.json last.

The names are `clipalign.layout`'s. A part's arrays and metadata are each written atomically, then its marker
(`parts/part_NNNNN.json`); a part without a marker is unfinished, whatever files it has, and is written again by the
next run. The plan (`parts/plan.json`) is written before any part: a run resumes a directory only if its own plan is
the same (model, input, modalities, settings that change the numbers, parts), and otherwise refuses in one line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipalign.layout import (
    EMBED_CONFIG_FILE,
    EMBED_PARTS_DIR,
    EMBEDDING_DIRS,
    METADATA_DIR,
    RUN_LOCK_FILE,
    RunDirBusy,
    atomic_path,
    embed_part_marker,
    embed_plan_file,
    embedding_part,
    lock_run_dir,
    metadata_part,
    release_run_dir,
    write_atomic,
)

if TYPE_CHECKING:
    import pyarrow as pa

DTYPE = "float16"
NORMALIZATION = "l2"  # every embedding row has unit L2 norm (computed in float32, then stored as float16)
# what a resume compares between the plan on disk and its own, in this order (the first difference is reported);
# the model by its weights, not by where they were read from
COMPARED = ("model", "source", "modalities", "settings", "parts")
_NOT_COMPARED = {"model": ("path",)}
_OURS = (EMBED_CONFIG_FILE, *EMBEDDING_DIRS.values(), METADATA_DIR, EMBED_PARTS_DIR)
_COLUMN_TYPES = {"key": "string", "caption": "string", "shard": "string", "image_path": "string", "row": "int64"}


class EmbedDirError(ValueError):
    """An output directory this run must not write into, or an embedding directory that cannot be read."""


def require_pyarrow() -> None:
    """Fail before any work when pyarrow, which writes the metadata, is missing."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError("clipalign-embed writes its metadata as parquet, which needs pyarrow: "
                                  "pip install 'clipalign[embed]' (or pip install pyarrow)") from None


# ----------------------------------------------------------------------------------------------------------------
# starting or resuming


def prepare(out: str | os.PathLike, plan: dict[str, Any], overwrite: bool = False) -> list[int]:
    """Lock `out` for this run and return the parts still to embed; only the main process calls this.

    A missing or empty directory starts afresh; an unfinished embedding with the same plan resumes (the parts that
    have a marker are kept; temporary files of a killed run are removed). With `overwrite`, an embedding directory
    (finished or not, of any plan) is emptied of its embedding files first; files of other kinds are never removed.

    Raises:
        EmbedDirError: another run writes there, it holds a finished embedding or an unfinished one of another plan
            (without `overwrite`), or it holds files that are not an embedding's.
    """
    out = Path(out)
    try:
        lock_run_dir(out)  # creates the directory
    except RunDirBusy:
        raise EmbedDirError(f"{out} is being written by another run (pid {_lock_holder(out)} holds "
                            f"{out / RUN_LOCK_FILE}); wait for it to end or choose another --out") from None
    present = sorted(name for name in os.listdir(out) if name != RUN_LOCK_FILE)
    foreign = [name for name in present if name not in _OURS]
    if present and not (out / EMBED_CONFIG_FILE).is_file() and not embed_plan_file(out).is_file():
        raise EmbedDirError(f"{out} is not empty and holds no embedding (it has {_names(present)}); choose an empty "
                            f"or new --out")
    if overwrite:
        for name in present:
            if name not in foreign:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif (out / EMBED_CONFIG_FILE).is_file():
        rows = json.loads((out / EMBED_CONFIG_FILE).read_text()).get("rows")
        raise EmbedDirError(f"{out} already holds a finished embedding ({rows} rows, see {EMBED_CONFIG_FILE}); give "
                            f"--overwrite to replace it, or choose another --out")
    elif present:
        difference = plan_difference(json.loads(embed_plan_file(out).read_text()), plan)
        if difference:
            raise EmbedDirError(f"{out} holds an unfinished embedding of something else ({difference}); run the "
                                f"command that started it to resume it, or give --overwrite to start over")
        _remove_temporaries(out)
        done = finished_parts(out)
        return [part["part"] for part in plan["parts"] if part["part"] not in done]
    write_atomic(embed_plan_file(out), json.dumps(plan, indent=2) + "\n")
    return [part["part"] for part in plan["parts"]]


def plan_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two plans, in a few words ("" when they agree on everything a resume compares)."""
    for key in COMPARED:
        was, now = old.get(key), new.get(key)
        if isinstance(was, dict) and isinstance(now, dict):
            was, now = ({k: v for k, v in d.items() if k not in _NOT_COMPARED.get(key, ())} for d in (was, now))
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            for sub in sorted(set(was) | set(now)):
                if was.get(sub) != now.get(sub):
                    return f"{key} {sub}: was {_short(was.get(sub))}, now {_short(now.get(sub))}"
        if key == "parts":
            return f"parts: was {len(was or [])}, now {len(now or [])}, or their sources differ"
        return f"{key}: was {_short(was)}, now {_short(now)}"
    return ""


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _lock_holder(out: Path) -> str:
    try:
        return (out / RUN_LOCK_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _remove_temporaries(out: Path) -> None:
    """The hidden temporary files (`layout.temp_name`) that a killed run left in the embedding's folders."""
    for folder in (*EMBEDDING_DIRS.values(), METADATA_DIR, EMBED_PARTS_DIR):
        if (out / folder).is_dir():
            for path in (out / folder).iterdir():
                if path.name.startswith(".") and ".tmp-" in path.name:
                    path.unlink(missing_ok=True)


def release(out: str | os.PathLike) -> None:
    """Release the main process's lock on `out`."""
    release_run_dir(out)


# ----------------------------------------------------------------------------------------------------------------
# parts


def write_part(out: str | os.PathLike, part: int, embeddings: dict[str, np.ndarray], meta: dict[str, list],
               columns: Sequence[str], marker: dict[str, Any]) -> None:
    """Part `part`'s arrays (modality -> float16 (n, D)) and metadata (column -> n values), each atomically, then its
    marker; the marker's presence is what makes the part finished."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for modality, array in embeddings.items():
        with atomic_path(embedding_part(out, modality, part)) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    table = pa.table({name: meta[name] for name in columns}, schema=metadata_schema(columns))
    with atomic_path(metadata_part(out, part)) as tmp:
        pq.write_table(table, str(tmp))
    write_atomic(embed_part_marker(out, part), json.dumps(marker) + "\n")


def metadata_schema(columns: Sequence[str]) -> pa.Schema:
    """The parquet schema of the metadata columns (typed even for a part with no rows)."""
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(_COLUMN_TYPES[name])) for name in columns])


def finished_parts(out: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """The markers of the finished parts in `out`, by part."""
    folder = Path(out) / EMBED_PARTS_DIR
    markers = {}
    for path in folder.glob("part_*.json") if folder.is_dir() else ():
        marker = json.loads(path.read_text())
        markers[marker["part"]] = marker
    return markers


def finish(out: str | os.PathLike, plan: dict[str, Any]) -> dict[str, Any]:
    """Write embed.json from the plan and every part's marker, and return it.

    Raises:
        EmbedDirError: a part of the plan has no marker (a process did not finish its parts).
    """
    markers = finished_parts(out)
    missing = [part["part"] for part in plan["parts"] if part["part"] not in markers]
    if missing:
        raise EmbedDirError(f"{out}: {len(missing)} parts are unfinished (first: {missing[0]}); run the same command "
                            f"again to embed them")
    ordered = [markers[part["part"]] for part in plan["parts"]]
    rows = sum(m["rows"] for m in ordered)
    zero_rows = _sum(m["zero_rows"] for m in ordered)
    config = {
        "clipalign_version": plan["clipalign_version"],
        "model": plan["model"],
        "source": plan["source"],
        "modalities": plan["modalities"],
        "embed_dim": plan["model"]["embed_dim"],
        "dtype": DTYPE,
        "normalization": NORMALIZATION,
        "rows": rows,
        "embedded": {m: rows - (sum(zero_rows.values()) if m == "text" else 0) for m in plan["modalities"]},
        "zero_rows": {"text": zero_rows} if zero_rows else {},
        "samples": sum(m["samples"] for m in ordered),
        "skipped": _sum(m["skipped"] for m in ordered),
        "columns": plan["columns"],
        "folders": {**{m: EMBEDDING_DIRS[m] for m in plan["modalities"]}, "metadata": METADATA_DIR},
        "settings": plan["settings"],
        "parts": [{key: m[key] for key in ("part", "source", "rows", "skipped", "zero_rows", "errors")
                   if m.get(key) or key in ("part", "source", "rows")} for m in ordered],
    }
    write_atomic(Path(out) / EMBED_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return config


def _sum(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))


# ----------------------------------------------------------------------------------------------------------------
# reading a finished embedding


def read_embed_config(embed_dir: str | os.PathLike) -> dict[str, Any]:
    """embed.json of a finished embedding directory.

    Raises:
        EmbedDirError: there is none (an unfinished run, or not an embedding directory).
    """
    path = Path(embed_dir) / EMBED_CONFIG_FILE
    if not path.is_file():
        unfinished = embed_plan_file(embed_dir).is_file()
        raise EmbedDirError(f"{embed_dir}: no {EMBED_CONFIG_FILE}; "
                            + ("its embedding is unfinished: run the command that started it again to finish it"
                               if unfinished else "not an embedding directory (clipalign-embed writes one)"))
    return json.loads(path.read_text())


def load_embeddings(embed_dir: str | os.PathLike, modality: str = "image") -> np.ndarray:
    """All of a finished embedding's `modality` rows, (rows, D) float16, parts in order (the metadata's order)."""
    config = read_embed_config(embed_dir)
    if modality not in config["modalities"]:
        raise EmbedDirError(f"{embed_dir} holds no {modality} embeddings (modalities: "
                            f"{', '.join(config['modalities'])})")
    arrays = [np.load(embedding_part(embed_dir, modality, part["part"])) for part in config["parts"]]
    return np.concatenate(arrays) if arrays else np.zeros((0, config["embed_dim"]), dtype=DTYPE)


def load_metadata(embed_dir: str | os.PathLike) -> pa.Table:
    """All of a finished embedding's metadata rows as one pyarrow table, parts in order (`.to_pandas()` for pandas)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = read_embed_config(embed_dir)
    tables = [pq.read_table(metadata_part(embed_dir, part["part"])) for part in config["parts"]]
    return pa.concat_tables(tables) if tables else metadata_schema(config["columns"]).empty_table()
