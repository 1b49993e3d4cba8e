"""Robust fine-tuning (WiSE-FT, Wortsman et al. 2022): mix a fine-tuned model's weights with its starting weights.

    θ(α) = (1 - α)·θ_start + α·θ_finetuned        α = 0: the starting model, α = 1: the fine-tuned one

for every floating-point parameter and buffer, key by key, in float32 (`torch.lerp`, exact at both ends); the logit
scale (and a SigLIP logit bias) is mixed too, as the paper's code mixes every weight. Tensors equal in both (a tower
locked during fine-tuning, LiT-style) stay as they are, and integer buffers are the fine-tuned model's. The mix
keeps the fine-tuned model's tokenizer and preprocessing. Each mixing ratio is scored on the evaluation sets, the
table printed and written, and the chosen ratio's model exported:

    clipalign-wiseft --finetuned runs/ft --start runs/pretrain/export/open_clip_model.safetensors \\
        --data domain=/data/pets/test reference=/data/imagenet/val --dataset reference=imagenet1k \\
        --export exports/ft-wise --output runs/ft/wiseft.json
    clipalign-wiseft --finetuned runs/ft --alpha 0.5 --export exports/ft-wise   # one mix, no evaluation

`--start` defaults to the fine-tuned run's `model.pretrained` when that names a local file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from clipalign.checkpoint import resolve_checkpoint
from clipalign.cli import DEFAULT_ALPHAS, DEFAULT_CHOICE, wiseft_parser
from clipalign.config import read_config
from clipalign.data.sample import BUILTIN_SETS, resolve_lines
from clipalign.evaluate import (
    check_classification_source,
    check_retrieval_source,
    zero_shot_classification,
    zero_shot_retrieval,
)
from clipalign.layout import RUN_CONFIG_FILE, is_export, read_export_config, write_atomic
from clipalign.tokenizer import tokenize

if TYPE_CHECKING:
    from clipalign.model import DualEncoder

# model config keys that change how a model trains, not its weights or what it computes at evaluation
TRAINING_ONLY_KEYS = frozenset({"patch_dropout"})
# each set's main score, what "mean" averages and what `--choose SET` picks: top-1 for classification, and for
# retrieval the mean of its two recall@1 (text to image, image to text)
MAIN_SCORE = {"classification": "top1", "retrieval": "mean_recall@1"}
SCORE_KEYS = {"classification": ("top1", "top5", "mean_per_class_recall"),
              "retrieval": ("mean_recall@1", *(f"{side}_retrieval_recall@{k}" for side in ("image", "text")
                                               for k in (1, 5, 10)))}
_PROBE_TEXTS = ["a photo of a cat.", "two red squares on a blue background", ""]
_NAME = re.compile(r"^([A-Za-z0-9_-]+)=(.+)$")


class Refused(ValueError):
    """The two models cannot be mixed; the message names the first difference."""


# ---- mixing -------------------------------------------------------------------------------------------------------


def config_difference(start: Mapping[str, Any], finetuned: Mapping[str, Any], where: str = "") -> str | None:
    """The first difference between two open_clip model configs ("vision_cfg.width: 192 vs 256"), or None.

    Keys in `TRAINING_ONLY_KEYS` are ignored: they change training, not the weights."""
    for key in sorted(set(start) | set(finetuned)):
        if key in TRAINING_ONLY_KEYS:
            continue
        name = f"{where}{key}"
        if key not in start or key not in finetuned:
            return f"{name}: only in the {'fine-tuned' if key not in start else 'starting'} model's config"
        a, b = start[key], finetuned[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = config_difference(a, b, f"{name}.")
            if found:
                return found
        elif a != b:
            return f"{name}: {a!r} (start) vs {b!r} (fine-tuned)"
    return None


def state_difference(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> str | None:
    """The first difference in parameter names or shapes between two state dicts, or None when they match."""
    for key in finetuned:
        if key not in start:
            return f"{key}: only in the fine-tuned model"
        if start[key].shape != finetuned[key].shape:
            return f"{key}: shape {tuple(start[key].shape)} (start) vs {tuple(finetuned[key].shape)} (fine-tuned)"
    for key in start:
        if key not in finetuned:
            return f"{key}: only in the starting model"
    return None


def interpolate(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) = (1 - α)·start + α·finetuned for every floating-point tensor, computed in float32 and returned in the
    fine-tuned tensor's dtype; other tensors are the fine-tuned ones. A new state dict; `WeightMix` does the same in
    place.

    Raises:
        Refused: the names or shapes differ.
    """
    difference = state_difference(start, finetuned)
    if difference:
        raise Refused(difference)
    return {key: torch.lerp(start[key].float(), value.float(), alpha).to(value.dtype)
            if value.is_floating_point() else value.clone() for key, value in finetuned.items()}


class WeightMix:
    """A fine-tuned model whose weights `mix(alpha)` rewrites in place, from the two endpoints held once.

    Only tensors that differ between the endpoints are held (as float32, on the model's device) and rewritten: a
    tower locked during fine-tuning costs nothing. Move the model before building the mix, not after.

    Args:
        model: the fine-tuned `DualEncoder`; its tokenizer and preprocessing are those of every mix.
        start: the starting weights, a state dict of `model.clip` (same names and shapes).
    """

    def __init__(self, model: DualEncoder, start: Mapping[str, torch.Tensor]):
        own = model.clip.state_dict()
        difference = state_difference(start, own)
        if difference:
            raise Refused(difference)
        device = next(model.parameters()).device
        self.model = model
        self.alpha = 1.0
        self._start: dict[str, torch.Tensor] = {}
        self._finetuned: dict[str, torch.Tensor] = {}
        for key, value in own.items():
            if not value.is_floating_point():
                continue  # integer buffers (BatchNorm's counters): the fine-tuned model's
            theirs = start[key].to(device)
            if torch.equal(theirs.to(value.dtype), value):
                continue
            self._start[key] = theirs.float()
            self._finetuned[key] = value.detach().float().clone()  # the model's own tensors are overwritten
        self.tensors = len(own)

    @property
    def mixed_keys(self) -> list[str]:
        """The state-dict keys whose tensors differ between the endpoints (the ones each mix rewrites)."""
        return list(self._finetuned)

    @torch.no_grad()
    def mix(self, alpha: float) -> DualEncoder:
        """Set the model's weights to θ(α) in place and return the model."""
        state = self.model.clip.state_dict()  # views of the live tensors, fetched anew in case they moved
        for key, finetuned in self._finetuned.items():
            target = state[key]
            if target.dtype == torch.float32:
                torch.lerp(self._start[key], finetuned, alpha, out=target)
            else:
                target.copy_(torch.lerp(self._start[key], finetuned, alpha))
        self.alpha = alpha
        return self.model


# ---- the starting weights -----------------------------------------------------------------------------------------


def finetuned_name(finetuned: str | os.PathLike) -> str:
    """The model name (open_clip config) of a checkpoint, run or export directory, read without loading it."""
    if is_export(finetuned):
        return read_export_config(finetuned).get("model_name", Path(finetuned).name)
    return read_config(resolve_checkpoint(finetuned) / RUN_CONFIG_FILE).model.name


def default_start(finetuned: str | os.PathLike) -> str:
    """The starting weights a fine-tuned run records: its `model.pretrained`, when that names a local file.

    Raises:
        ValueError: the run records none, records a pretrained tag or a file not here, or `finetuned` is an export
            (which records none); the message says what to give --start.
    """
    import open_clip

    if is_export(finetuned):
        raise ValueError(f"--start is needed: {finetuned} is an export, which does not record the weights its "
                         f"training started from")
    config = resolve_checkpoint(finetuned) / RUN_CONFIG_FILE
    model = read_config(config).model
    if not model.pretrained:
        raise ValueError(f"--start is needed: {config} has no model.pretrained (the run started from random "
                         f"weights); give the weights to mix with")
    if Path(model.pretrained).is_file():
        return model.pretrained
    if open_clip.get_pretrained_cfg(model.name, model.pretrained):
        raise ValueError(f"--start is needed: model.pretrained in {config} is {model.pretrained!r}, a pretrained tag "
                         f"of {model.name}; give --start {model.pretrained} (open_clip downloads it) or a local copy")
    raise ValueError(f"--start is needed: model.pretrained in {config} is {model.pretrained}, which does not exist "
                     f"here; give the starting weights")


def check_start(spec: str, model_name: str) -> str:
    """How `--start` is read: "directory" (a clipalign checkpoint, run or export), "file" (open_clip weights) or
    "tag" (open_clip pretrained weights of `model_name`'s architecture, `TAG` or `NAME:TAG`).

    Raises:
        FileNotFoundError, ValueError: naming what `spec` is not.
    """
    import open_clip

    path = Path(spec)
    if path.is_dir():
        if not is_export(path):
            resolve_checkpoint(path)  # a FileNotFoundError naming what the directory lacks
        return "directory"
    if path.is_file():
        return "file"
    name, tag = _name_and_tag(spec, model_name)
    if open_clip.get_pretrained_cfg(name, tag):
        return "tag"
    known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "it has none"
    raise FileNotFoundError(f"--start {spec}: not a file, not a directory, nor a pretrained tag of {name} "
                            f"(known tags: {known})")


def _name_and_tag(spec: str, model_name: str) -> tuple[str, str]:
    name, _, tag = spec.rpartition(":")
    return (name or model_name), tag


def load_start(spec: str, finetuned: DualEncoder, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The starting weights as a state dict of `finetuned.clip`, checked against the fine-tuned model.

    A directory is loaded with `clipalign.load`, and its model config and tokenizer must match the fine-tuned
    model's. A weights file, or the file of a pretrained tag, is loaded into the fine-tuned architecture by
    `open_clip.load_checkpoint`, as training loads `model.pretrained` (so the same conversions apply: position
    embeddings resized, a missing logit bias set to 0).

    Raises:
        Refused: the configs, tokenizers or parameter names/shapes differ (the first difference named).
        ValueError: the file cannot be read as weights, or a tag's download failed.
    """
    import open_clip

    from clipalign.model import load

    kind = check_start(spec, finetuned.name)
    if kind == "directory":
        start = load(spec, device=device)
        difference = config_difference(start.open_clip_config(), finetuned.open_clip_config())
        if difference:
            raise Refused(f"the models' configs differ: {difference}")
        if not torch.equal(tokenize(start.tokenizer, _PROBE_TEXTS), tokenize(finetuned.tokenizer, _PROBE_TEXTS)):
            raise Refused(f"the models' tokenizers differ ({type(start.tokenizer).__name__} vs "
                          f"{type(finetuned.tokenizer).__name__}, or another vocabulary): their text towers read "
                          f"different ids")
        state = start.clip.state_dict()
    else:
        if kind == "tag":
            name, tag = _name_and_tag(spec, finetuned.name)
            difference = config_difference(open_clip.get_model_config(name) or {}, finetuned.open_clip_config())
            if name != finetuned.name and difference:
                raise Refused(f"the models' configs differ: {difference}")
            try:
                spec = open_clip.download_pretrained(open_clip.get_pretrained_cfg(name, tag))
            except Exception as e:  # noqa: BLE001 -- hub, network and disk errors alike: named, with the cause
                raise ValueError(f"--start {spec}: downloading the {tag} weights of {name} failed "
                                 f"({type(e).__name__}: {_first_line(e)})") from None
        state = _weights_file_state(spec, finetuned.clip)
    difference = state_difference(state, finetuned.clip.state_dict())
    if difference:
        raise Refused(difference)
    return state


def _weights_file_state(path: str | os.PathLike, architecture: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip weights file loaded into a copy of `architecture`, as open_clip.create_model(pretrained=) does."""
    import open_clip

    clip = copy.deepcopy(architecture)
    try:
        incompatible = open_clip.load_checkpoint(clip, str(path), strict=False)
    except Exception as e:  # noqa: BLE001 -- safetensors, pickle and torch errors alike: named, with the cause
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):  # torch: one line per tensor that
            raise Refused(f"{path}: {lines[1] if len(lines) > 1 else lines[0]}") from None  # does not fit
        raise ValueError(f"{path}: cannot be read as open_clip weights ({type(e).__name__}: {_first_line(e)})") \
            from None
    if incompatible.missing_keys:
        raise Refused(f"{path}: {incompatible.missing_keys[0]}: only in the fine-tuned model")
    if incompatible.unexpected_keys:
        raise Refused(f"{path}: {incompatible.unexpected_keys[0]}: only in the starting weights")
    return clip.state_dict()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


# ---- evaluation sets and the choice ------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """One evaluation set: its name in the table, "classification" or "retrieval", its source, and for
    classification its class names and templates (None: found beside the data, as clipalign-zeroshot does)."""

    name: str
    kind: str
    data: str
    classnames: list[str] | None = None
    templates: list[str] | None = None
    num_classes: int | None = field(default=None, repr=False)


def split_name(text: str) -> tuple[str | None, str]:
    """`NAME=VALUE` -> (NAME, VALUE); a plain value (or an existing path that contains "=") -> (None, VALUE)."""
    match = _NAME.match(text)
    if match and not Path(text).exists():
        return match.group(1), match.group(2)
    return None, text


def _default_name(source: str) -> str:
    """A set's name from its source: the folder's or file's name without extension (for a shard pattern, the
    folder holding the shards)."""
    path = Path(source.rstrip("/"))
    name = path.parent.name if any(c in path.name for c in "{*?[") or ".tar" in path.name else path.name
    return re.sub(r"[^A-Za-z0-9_-]", "_", name.split(".")[0]) or "data"


def build_sets(data: Sequence[str], retrieval: Sequence[str], dataset: Sequence[str] = (),
               classnames: Sequence[str] = (), templates: Sequence[str] = ()) -> list[EvalSet]:
    """The evaluation sets named by the command line (`[NAME=]SOURCE` each; `--dataset`, `--classnames` and
    `--templates` as `[NAME=]VALUE`, where a value without a name is for every classification set).

    Raises:
        ValueError, FileNotFoundError: a name used twice, an option naming no classification set, a file or
            built-in set that does not exist.
    """
    sets: list[EvalSet] = []
    for kind, sources, flag in (("classification", data, "--data"), ("retrieval", retrieval, "--retrieval")):
        for text in sources:
            name, source = split_name(text)
            name = name or _default_name(source)
            if name == DEFAULT_CHOICE:
                raise ValueError(f"{flag} {text}: {DEFAULT_CHOICE!r} names the mean of the sets; call it otherwise "
                                 f"({flag} NAME=SOURCE)")
            if any(s.name == name for s in sets):
                raise ValueError(f"{flag} {text}: a second set named {name!r}; name each set ({flag} NAME=SOURCE)")
            sets.append(EvalSet(name, kind, source))
    classification = {s.name: s for s in sets if s.kind == "classification"}
    for flag, values, attr, what in (("--dataset", dataset, None, None), ("--classnames", classnames, "classnames",
                                     "classnames"), ("--templates", templates, "templates", "templates")):
        for value, targets in _per_set(flag, values, classification):
            if attr is None:  # a built-in set: its class names and templates, unless given explicitly
                if value not in BUILTIN_SETS:
                    raise ValueError(f"{flag} {value!r}: expected one of {', '.join(BUILTIN_SETS)}")
                for target in targets:
                    target.classnames = resolve_lines(value, "classnames")
                    target.templates = resolve_lines(value, "templates")
            else:
                lines = resolve_lines(value, what)
                for target in targets:
                    setattr(target, attr, lines)
    return sets


def _per_set(flag: str, values: Sequence[str], sets: dict[str, EvalSet]):
    """(value, sets it applies to) for each `[NAME=]VALUE`; unnamed values first, so named ones win."""
    parsed = [(*split_name(v), v) for v in values]
    for name, value, text in sorted(parsed, key=lambda p: p[0] is not None):
        if name is not None and name not in sets:
            known = ", ".join(sets) or "none"
            raise ValueError(f"{flag} {text}: no classification set named {name!r} (--data sets: {known})")
        if name is None and not sets:
            raise ValueError(f"{flag} {text}: there is no classification set (--data) for it")
        yield value, [sets[name]] if name is not None else list(sets.values())


def check_sets(sets: Sequence[EvalSet], table_format: str | None = None) -> list[str]:
    """Open every set as the evaluation will read it, without a model; returns warnings. Raises as
    `check_classification_source` / `check_retrieval_source` do, naming the set."""
    warnings = []
    for s in sets:
        if s.kind == "classification":
            info, found = check_classification_source(
                s.data, s.classnames, s.templates, table_format=table_format,
                given_as=(f"--data {s.name}", f"--classnames {s.name}", f"--templates {s.name}"))
            s.num_classes = info["classes"]
            warnings += found
        else:
            check_retrieval_source(s.data, table_format=table_format, what=f"--retrieval {s.name}")
    return warnings


def check_choice(choose: str, sets: Sequence[EvalSet]) -> None:
    """`choose` is "mean", a set's name (its main score) or SET.KEY naming a score that set reports.

    Raises:
        ValueError: naming the sets or the keys that can be chosen.
    """
    if choose == DEFAULT_CHOICE:
        return
    name, _, key = choose.partition(".")
    chosen = next((s for s in sets if s.name == name), None)
    if chosen is None:
        raise ValueError(f"--choose {choose}: expected {DEFAULT_CHOICE}, a set's name or SET.KEY; the sets are "
                         f"{', '.join(s.name for s in sets)}")
    keys = SCORE_KEYS[chosen.kind]
    if chosen.kind == "classification" and (chosen.num_classes or 0) < 5:
        keys = tuple(k for k in keys if k != "top5")  # top-5 is reported from 5 classes on
    if key and key not in keys:
        raise ValueError(f"--choose {choose}: {name} ({chosen.kind}) reports {', '.join(keys)}")


def score(results: Mapping[str, Mapping[str, Any]], sets: Sequence[EvalSet], choose: str) -> float:
    """The number `choose` names in one row's results (set name -> result)."""
    if choose == DEFAULT_CHOICE:
        return sum(results[s.name][MAIN_SCORE[s.kind]] for s in sets) / len(sets)
    name, _, key = choose.partition(".")
    kind = next(s.kind for s in sets if s.name == name)
    return results[name][key or MAIN_SCORE[kind]]


def choose_alpha(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The row with the highest score; ties go to the α nearest 0.5 (the paper's default mix), then the smaller."""
    return max(rows, key=lambda row: (row["score"], -abs(row["alpha"] - 0.5), -row["alpha"]))


def evaluate_mixes(mix: WeightMix, alphas: Sequence[float], sets: Sequence[EvalSet], choose: str = DEFAULT_CHOICE,
                   batch_size: int = 128, workers: int = 0, precision: str = "fp32", progress: bool = True,
                   table_format: str | None = None) -> dict[str, Any]:
    """Score every mix on every set; the model is left at the chosen mix.

    Returns:
        {"choose", "sets": [{name, kind, data}], "rows": [{"alpha", "score", "results": {set: result}}],
        "chosen": {"alpha", "score"}}. A retrieval result also has `mean_recall@1`.
    """
    rows = []
    for alpha in alphas:
        model = mix.mix(alpha)
        results: dict[str, Any] = {}
        for s in sets:
            if s.kind == "classification":
                result = zero_shot_classification(model, s.data, s.classnames, s.templates, batch_size=batch_size,
                                                  workers=workers, progress=progress, precision=precision,
                                                  table_format=table_format)
            else:
                result = zero_shot_retrieval(model, s.data, batch_size=batch_size, workers=workers, progress=progress,
                                             precision=precision, table_format=table_format)
                result["mean_recall@1"] = (result["image_retrieval_recall@1"] + result["text_retrieval_recall@1"]) / 2
            results[s.name] = result
        row = {"alpha": alpha, "score": score(results, sets, choose), "results": results}
        rows.append(row)
        print(f"α = {alpha:g}: " + ", ".join(f"{s.name} {100 * results[s.name][MAIN_SCORE[s.kind]]:.1f}"
                                             for s in sets), file=sys.stderr, flush=True)
    chosen = choose_alpha(rows)
    mix.mix(chosen["alpha"])
    return {"choose": choose, "sets": [{"name": s.name, "kind": s.kind, "data": s.data} for s in sets],
            "rows": rows, "chosen": {"alpha": chosen["alpha"], "score": chosen["score"]}}


def markdown_table(table: Mapping[str, Any]) -> str:
    """The α x set table of `evaluate_mixes`, in percent, the chosen row marked with *."""
    sets = table["sets"]
    label = {"classification": "top-1", "retrieval": "R@1"}
    header = ["α", *(f"{s['name']} {label[s['kind']]}" for s in sets)]
    choose = table["choose"]
    extra = len(sets) > 1
    if extra:
        header.append("mean")
    shows_choice = choose == DEFAULT_CHOICE or choose.partition(".")[2] in ("", *MAIN_SCORE.values())
    if not shows_choice:
        header.append(choose)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" for _ in header) + " |"]
    for row in table["rows"]:
        mark = " *" if row["alpha"] == table["chosen"]["alpha"] else ""
        mains = [row["results"][s["name"]][MAIN_SCORE[s["kind"]]] for s in sets]
        cells = [f"{row['alpha']:g}{mark}", *(f"{100 * v:.1f}" for v in mains)]
        if extra:
            cells.append(f"{100 * sum(mains) / len(mains):.1f}")
        if not shows_choice:
            cells.append(f"{100 * row['score']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    chosen_set = next((s for s in sets if s["name"] == choose), None)
    what = ("mean of the sets' main scores" if choose == DEFAULT_CHOICE
            else f"{choose} {label[chosen_set['kind']]}" if chosen_set else choose)
    lines.append(f"\n* the chosen mix, α = {table['chosen']['alpha']:g}: the highest {what} "
                 f"({100 * table['chosen']['score']:.1f} %)")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-wiseft`: mix a fine-tuned model with its starting weights at several ratios (WiSE-FT), score each
    mix zero-shot, print and write the table, and export the chosen mix."""
    parser = wiseft_parser(default_device="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    def fail(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    evaluating = bool(args.data or args.retrieval)
    if args.alpha is not None:
        if args.alphas:
            parser.error("give --alphas (score several mixes) or --alpha (export one), not both")
        if evaluating or args.output:
            parser.error("--alpha exports one mix without evaluating: drop --data/--retrieval/--output, or score it "
                         "with --alphas A")
        if not args.export:
            parser.error("--alpha needs --export DIR")
    elif not evaluating:
        parser.error("give --data and/or --retrieval to score the mixes, or --alpha A --export DIR for one mix")
    alphas = args.alphas or list(DEFAULT_ALPHAS)
    if len(set(alphas)) != len(alphas):
        parser.error(f"--alphas {' '.join(f'{a:g}' for a in alphas)}: a ratio is given twice")

    # everything a mistake can be found in, checked before a model is loaded
    try:
        from clipalign.export import check_export_target

        if args.export:
            check_export_target(args.export, "--export")
        if not is_export(args.finetuned):
            resolve_checkpoint(args.finetuned)
        start = args.start or default_start(args.finetuned)
        check_start(start, finetuned_name(args.finetuned))
        sets = build_sets(args.data, args.retrieval, args.dataset, args.classnames, args.templates)
        for warning in check_sets(sets, args.table_format):
            print(f"warning: {warning}", file=sys.stderr)
        if evaluating:
            check_choice(args.choose, sets)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        fail(str(e))

    from clipalign.export import export_model
    from clipalign.model import load

    model = load(args.finetuned, device=args.device)
    try:
        mix = WeightMix(model, load_start(start, model, device=args.device))
    except Refused as e:
        fail(f"cannot mix {start} (start) with {args.finetuned} (fine-tuned): {e}")
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not mix.mixed_keys:
        print(f"warning: {start} and {args.finetuned} have the same weights: every mix is the same model",
              file=sys.stderr)

    out: dict[str, Any] = {"start": str(start), "finetuned": str(args.finetuned),
                           "mixed_tensors": len(mix.mixed_keys), "tensors": mix.tensors}
    if args.alpha is not None:
        mix.mix(args.alpha)
        alpha = args.alpha
    else:
        table = evaluate_mixes(mix, alphas, sets, args.choose, batch_size=args.batch_size, workers=args.workers,
                               precision=args.precision, progress=not args.no_progress,
                               table_format=args.table_format)
        print(markdown_table(table))
        out.update(table)
        alpha = table["chosen"]["alpha"]
        if args.output:
            write_atomic(args.output, json.dumps(out, indent=2) + "\n")
    if args.export:
        exported = export_model(mix.model, args.export, export_format="open_clip",
                                source=f"WiSE-FT mix α = {alpha:g} of {start} (α = 0) and {args.finetuned} (α = 1)")
        print(f"exported the mix at α = {alpha:g} -> {exported}")
        if args.output:
            out["export"] = str(exported)
            write_atomic(args.output, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
