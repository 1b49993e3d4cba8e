"""Zero-shot classification: score a trained dual encoder on an ImageFolder with prompts built from class names.

The classifier is CLIP's recipe: every class name is put into each prompt template, the prompts are embedded and
L2-normalised, averaged per class and normalised again; an image is assigned the class whose averaged prompt
embedding is most similar to its own.

    clipalign-zeroshot --model runs/quickstart --data ~/.cache/clipalign/synthetic/n12000-px64/heldout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from clipalign.tokenizer import tokenize

CLASSNAMES_FILE = "classnames.txt"  # one class name per line, in ImageFolder's (sorted folder name) order
TEMPLATES_FILE = "templates.txt"  # one prompt template per line, "{}" standing for the class name
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "itap of a {}.",
    "a {}.",
)


@torch.no_grad()
def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[str],
                         batch_size: int = 128) -> torch.Tensor:
    """Class weights, (D, C): per class, the renormalised mean of its L2-normalised prompt embeddings.

    Args:
        model: a `DualEncoder` (anything with `encode_text(ids, normalize=True)` and `.tokenizer`).
        classnames: one name per class, in label order.
        templates: prompt templates, each with a "{}" where the class name goes.
        batch_size: prompts embedded per forward pass.
    """
    classnames, templates = list(classnames), list(templates)
    if not classnames or not templates:
        raise ValueError(f"need at least one class name and one template (got {len(classnames)} and {len(templates)})")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ValueError(f"prompt templates must contain '{{}}' for the class name; these do not: {missing}")
    device = _device_of(model)
    prompts = [t.replace("{}", name) for name in classnames for t in templates]  # class-major: (C * T)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenize(model.tokenizer, prompts[start:start + batch_size]).to(device)
        chunks.append(model.encode_text(ids, normalize=True).float())
    embeddings = torch.cat(chunks).view(len(classnames), len(templates), -1)  # (C, T, D)
    weights = torch.nn.functional.normalize(embeddings.mean(dim=1), dim=-1)  # (C, D)
    return weights.T.contiguous()  # (D, C)


def zero_shot_classification(model, folder: str | os.PathLike, classnames: Sequence[str] | None = None,
                             templates: Sequence[str] | None = None, batch_size: int = 128, workers: int = 0,
                             device: str | torch.device | None = None, progress: bool = True) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on an ImageFolder (one sub-folder of images per class).

    Class names default to `classnames.txt` in the folder root, else the folder names with "_" read as a space;
    templates default to `templates.txt` in the folder root, else `DEFAULT_TEMPLATES`.

    Args:
        model: a `DualEncoder`; it is put in eval mode for the evaluation and its mode restored afterwards.
        folder: the ImageFolder root.
        classnames: one name per class folder, in sorted folder-name order.
        templates: prompt templates with "{}" for the class name.
        batch_size: images (and prompts) per forward pass.
        workers: DataLoader worker processes.
        device: where to run; the model is moved there. None keeps the model where it is.
        progress: show a progress bar (only ever on a terminal).

    Returns:
        `top1`, `top5` (with 5 classes or more), `mean_per_class_recall`, `num_images`, `num_classes` and `chance`.
    """
    dataset = _image_folder(Path(folder), _preprocess_of(model))
    classnames = _classnames_for(dataset, classnames)
    templates = list(templates) if templates is not None else _templates_for(Path(folder))
    if device is not None:
        model.to(device)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            classifier = zero_shot_classifier(model, classnames, templates, batch_size)  # (D, C)
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                pin_memory=device.type == "cuda")
            ranked, labels = [], []
            bar = tqdm(loader, desc="zero-shot", unit="batch", disable=not progress or not sys.stderr.isatty())
            for images, targets in bar:
                features = model.encode_image(images.to(device, non_blocking=True), normalize=True).float()
                logits = features @ classifier  # (B, C)
                ranked.append(logits.topk(min(5, len(classnames)), dim=1).indices.cpu())  # (B, k)
                labels.append(targets)
    finally:
        model.train(was_training)
    return _metrics(torch.cat(ranked), torch.cat(labels), len(classnames))


def _metrics(ranked: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy numbers from the top-k predicted classes per image, (N, k), and the true labels, (N,)."""
    hits = ranked == labels[:, None]  # (N, k)
    top1 = hits[:, 0]
    per_class_total = torch.bincount(labels, minlength=num_classes)  # (C,)
    per_class_right = torch.bincount(labels[top1], minlength=num_classes)  # (C,)
    present = per_class_total > 0  # ImageFolder has no empty classes, but a subset might
    recall = (per_class_right[present].double() / per_class_total[present]).mean().item()
    result: dict[str, Any] = {"top1": top1.double().mean().item()}
    if num_classes >= 5:
        result["top5"] = hits[:, :5].any(dim=1).double().mean().item()
    result.update(mean_per_class_recall=recall, num_images=int(labels.numel()), num_classes=num_classes,
                  chance=1.0 / num_classes)
    return result


def _image_folder(folder: Path, transform) -> ImageFolder:
    if not folder.is_dir():
        raise FileNotFoundError(f"zero-shot data folder {folder} does not exist")
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"zero-shot data folder {folder} holds no images; expected an ImageFolder "
                                f"(one sub-folder of images per class): {e}") from e


def _classnames_for(dataset: ImageFolder, classnames: Sequence[str] | None) -> list[str]:
    source = "classnames"
    if classnames is None:
        path = Path(dataset.root) / CLASSNAMES_FILE
        if path.is_file():
            classnames, source = read_lines(path), str(path)
        else:
            classnames = [name.replace("_", " ") for name in dataset.classes]
    classnames = list(classnames)
    if len(classnames) != len(dataset.classes):
        raise ValueError(f"{source}: {len(classnames)} class names for {len(dataset.classes)} class folders "
                         f"in {dataset.root}; give one name per folder, in sorted folder-name order")
    return classnames


def _templates_for(folder: Path) -> list[str]:
    path = folder / TEMPLATES_FILE
    return read_lines(path) if path.is_file() else list(DEFAULT_TEMPLATES)


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a text file, stripped (class names, prompt templates)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _preprocess_of(model):
    if getattr(model, "preprocess", None) is not None:
        return model.preprocess
    from clipalign.model import eval_preprocess

    return eval_preprocess(model)


def _print_table(result: dict[str, Any], data: str) -> None:
    print(f"zero-shot on {data}")
    for key, value in result.items():
        print(f"  {key:<24}{value:.4f}" if isinstance(value, float) else f"  {key:<24}{value}")


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-zeroshot`: zero-shot classification of a checkpoint, run or export directory on an ImageFolder."""
    parser = argparse.ArgumentParser(prog="clipalign-zeroshot", description=main.__doc__)
    parser.add_argument("--model", required=True, help="checkpoint directory, run directory (latest checkpoint) "
                                                       "or export directory")
    parser.add_argument("--data", required=True, help="ImageFolder root (one sub-folder of images per class)")
    parser.add_argument("--classnames", help=f"file with one class name per line, in sorted folder order "
                                             f"(default: DATA/{CLASSNAMES_FILE}, else the folder names)")
    parser.add_argument("--templates", help=f"file with one prompt template per line, '{{}}' for the class name "
                                            f"(default: DATA/{TEMPLATES_FILE}, else a built-in set)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the results here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from clipalign.model import load

    model = load(args.model, device=args.device)
    result = zero_shot_classification(
        model, args.data,
        classnames=read_lines(args.classnames) if args.classnames else None,
        templates=read_lines(args.templates) if args.templates else None,
        batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress)
    _print_table(result, args.data)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(args.model), "data": str(args.data), **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
