"""Zero-shot evaluation: classification with prompts built from class names, and image-text retrieval.

Classification reads an ImageFolder, WebDataset shards with a label per sample, or a CSV of labelled images;
retrieval reads a CSV of (image, caption) rows or captioned shards (see `clipalign.data.eval_sets`).

The classifier is CLIP's recipe: every class name is put into each prompt template, the prompts are embedded and
L2-normalised, averaged per class and normalised again; an image is assigned the class whose averaged prompt
embedding is most similar to its own.

    clipalign-zeroshot --model runs/quickstart --data ~/.cache/clipalign/synthetic/n12000-px64/heldout
    clipalign-zeroshot --model runs/quickstart --retrieval ~/.cache/clipalign/synthetic/n12000-px64/heldout/captions.csv
    clipalign-zeroshot --model runs/cc3m --data '/data/cifar10/test/{0..3}.tar' --classnames cifar10 --templates cifar10
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from clipalign.cli import zeroshot_parser
from clipalign.config import TABLE_SEPARATORS
from clipalign.data.eval_sets import (
    ImagePaths,
    ShardSamples,
    collate_samples,
    label_reader,
    read_labelled_csv,
    read_retrieval_csv,
    sidecar_lines,
    source_kind,
)
from clipalign.data.sample import (
    BUILTIN_SETS,
    CLASSNAMES_FILE,
    TEMPLATE_FILES,
    every_caption,
    folder_classnames,
    image_bytes,
    resolve_lines,
)
from clipalign.data.shards import expand_urls, shard_samples
from clipalign.data.transforms import DEFAULT_MAX_IMAGE_PIXELS
from clipalign.layout import write_atomic
from clipalign.tokenizer import tokenize

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


def zero_shot_classification(model, data: str | os.PathLike, classnames: Sequence[str] | None = None,
                             templates: Sequence[str] | None = None, batch_size: int = 128, workers: int = 0,
                             device: str | torch.device | None = None, progress: bool = True,
                             confusion: bool = False, label_key: str = "cls", csv_img_key: str = "filepath",
                             csv_label_key: str = "label", precision: str = "fp32",
                             max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                             table_format: str | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on an ImageFolder, WebDataset shards with labels, or a CSV of labelled images.

    `data` is read by its form (see `clipalign.data.eval_sets.source_kind`): a folder is an ImageFolder (one
    sub-folder of images per class); a tar pattern is shards whose samples carry a label (the member
    `KEY.<label_key>`, else the JSON field `label`); a `.csv`/`.tsv` has one row per image with an image path
    and a label column. A label is a class index or a class name.

    Class names default to `classnames.txt` beside the data (for an ImageFolder, else the folder names with "_" read
    as a space; shards and CSVs need one); templates default to `templates.txt` (or clip_benchmark's
    `zeroshot_classification_templates.txt`) beside the data, else `DEFAULT_TEMPLATES`.

    Args:
        model: a `DualEncoder`; it is put in eval mode for the evaluation and its mode restored afterwards.
        data: the ImageFolder root, shard pattern, or CSV/TSV.
        classnames: one name per class, in label order (for an ImageFolder: sorted folder-name order).
        templates: prompt templates with "{}" for the class name.
        batch_size: images (and prompts) per forward pass.
        workers: DataLoader worker processes.
        device: where to run; the model is moved there. None keeps the model where it is.
        progress: show a progress bar (only ever on a terminal).
        confusion: also return the confusion matrix.
        label_key, csv_img_key, csv_label_key: where shards and CSVs keep labels and image paths.
        precision: "fp32", or "bf16"/"fp16" autocast for both towers (features are compared in fp32).
        max_image_pixels: images with more pixels (header size) are skipped as `bad_image`, never decoded; 0: no
            limit.
        table_format: a CSV/TSV's separator, `csv` (comma) or `tsv` (tab); None: from its extension.

    Returns:
        `top1`, `top5` (with 5 classes or more), `mean_per_class_recall`, `num_images`, `num_classes`, `chance`,
        `per_class_top1` (class name -> top-1 accuracy of its images), `skipped` (reason -> count; for shards always,
        for folders and CSVs when an image was skipped) and,
        with `confusion`, `confusion_matrix` (rows: true class, columns: predicted class, counts; in class order)
        with `classnames`.
    """
    transform = _preprocess_of(model)
    kind = source_kind(data)
    if kind == "folder":
        folder = _image_folder(Path(data))
        classnames = folder_classnames(folder.root, folder.classes, classnames)
        paths, labels = zip(*folder.samples)
        dataset: Any = ImagePaths(paths, labels, transform, max_image_pixels)
    else:
        if classnames is None:
            classnames = sidecar_lines(data, [CLASSNAMES_FILE])
        if not classnames:
            raise ValueError(f"classification on {data} needs class names: give a file with one per line in label "
                             f"order, or a built-in set ({', '.join(BUILTIN_SETS)}), or put {CLASSNAMES_FILE} "
                             f"beside the data")
        classnames = list(classnames)
        if kind == "csv":
            paths, labels = read_labelled_csv(data, classnames, csv_img_key, csv_label_key,
                                              separator=TABLE_SEPARATORS.get(table_format or ""))
            dataset = ImagePaths(paths, labels, transform, max_image_pixels)
        else:
            dataset = ShardSamples(str(data), transform, label_reader(label_key, classnames), max_image_pixels)
    if templates is None:
        templates = sidecar_lines(data, TEMPLATE_FILES) or list(DEFAULT_TEMPLATES)
    with _evaluating(model, device) as device, _autocast(device, precision):
        classifier = zero_shot_classifier(model, classnames, templates, batch_size)  # (D, C)
        ranked, labels, skipped = [], [], Counter()
        for images, targets in _batches(dataset, batch_size, workers, device, progress, "zero-shot", skipped):
            features = model.encode_image(images, normalize=True).float()
            logits = features @ classifier  # (B, C)
            ranked.append(logits.topk(min(5, len(classnames)), dim=1).indices.cpu())  # (B, k)
            labels.append(torch.as_tensor(targets))
    if not labels:
        raise ValueError(f"no usable images in {data} (skipped: {dict(skipped) or 'none'})")
    ranked, labels = torch.cat(ranked), torch.cat(labels)
    result = _metrics(ranked, labels, len(classnames))
    matrix = confusion_matrix(ranked[:, 0], labels, len(classnames))  # (C, C)
    per_class = matrix.diagonal().double() / matrix.sum(dim=1).clamp_min(1)
    present = matrix.sum(dim=1) > 0
    result["per_class_top1"] = {name: acc for name, acc, seen in zip(classnames, per_class.tolist(), present.tolist())
                                if seen}
    if kind == "shards" or skipped:
        result["skipped"] = dict(skipped)
    if confusion:
        result.update(classnames=classnames, confusion_matrix=matrix.tolist())
    return result


def _batches(dataset, batch_size: int, workers: int, device: torch.device, progress: bool, desc: str,
             skipped: Counter) -> Iterator[tuple[torch.Tensor, list]]:
    """(images on `device`, targets) batches of an evaluation set; skipped samples are added to `skipped`."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_samples, pin_memory=device.type == "cuda")
    for images, targets, skips in tqdm(loader, desc=desc, unit="batch",
                                       disable=not progress or not sys.stderr.isatty()):
        skipped.update(skips)
        if images is not None:
            yield images.to(device, non_blocking=True), targets


def _autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on `device` for the towers, or nothing for fp32."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r}: expected fp32, bf16 or fp16")
    return torch.autocast(device.type, dtype=dtypes[precision])


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C): row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).view(
        num_classes, num_classes)


def plot_confusion(classnames: Sequence[str], matrix: Sequence[Sequence[int]], path: str | os.PathLike) -> Path:
    """Draw a confusion matrix (rows normalised to recall) into a PNG; needs matplotlib."""
    from clipalign.plot import pyplot, save_figure

    plt = pyplot("--confusion-png")
    counts = torch.tensor(matrix, dtype=torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = min(4 + 0.25 * len(classnames), 40)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(classnames) <= 100:
        ticks = range(len(classnames))
        ax.set_xticks(ticks, classnames, rotation=90, fontsize="small")
        ax.set_yticks(ticks, classnames, fontsize="small")
    ax.set(xlabel="predicted", ylabel="true", title="zero-shot confusion (row-normalised)")
    fig.tight_layout()
    return save_figure(fig, path)


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


def zero_shot_retrieval(model, data: str | os.PathLike, image_key: str = "filepath",
                        caption_key: str = "caption", batch_size: int = 128, workers: int = 0,
                        device: str | torch.device | None = None, progress: bool = True,
                        ks: Sequence[int] = (1, 5, 10), precision: str = "fp32",
                        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                        table_format: str | None = None) -> dict[str, Any]:
    """Image-to-text and text-to-image recall@k of `model` on a captioned image set, counted as clip_benchmark does.

    `data` is a CSV/TSV with one row per (image, caption) pair (an image with several captions has several rows),
    or WebDataset shards whose samples carry their captions (`.txt`, and/or JSON `caption` or `captions` list).
    Every image is ranked against every caption by cosine similarity. Text-to-image: a caption scores a hit at k when
    its own image is among the k most similar images. Image-to-text: an image scores a hit at k when any one of its
    captions is among the k most similar captions. Recall@k is the mean of the hits, over captions and over images.
    An image over `max_image_pixels` (0: no limit) is skipped unread, and its captions with it. `table_format`: a
    CSV/TSV's separator, `csv` (comma) or `tsv` (tab); None: from its extension.

    Returns:
        `image_retrieval_recall@k` (text to image), `text_retrieval_recall@k` (image to text) for each k,
        `num_images`, `num_texts`, the chance level of each recall@1, and `skipped` (reason -> count; for shards
        always, for CSVs when an image was skipped).
    """
    transform = _preprocess_of(model)
    shards = source_kind(data) == "shards"
    if shards:
        dataset: Any = ShardSamples(str(data), transform, every_caption, max_image_pixels)
        captions, owners = [], []
    else:
        paths, captions, owners = read_retrieval_csv(data, image_key, caption_key,
                                                     separator=TABLE_SEPARATORS.get(table_format or ""))
        dataset = ImagePaths(paths, range(len(paths)), transform, max_image_pixels)
    skipped: Counter = Counter()
    with _evaluating(model, device) as device, _autocast(device, precision):
        images, num_images, kept = [], 0, []
        for batch, targets in _batches(dataset, batch_size, workers, device, progress, "retrieval", skipped):
            images.append(model.encode_image(batch, normalize=True).float().cpu())
            if shards:  # each target is the list of that image's captions
                for image_captions in targets:
                    captions.extend(image_captions)
                    owners.extend([num_images] * len(image_captions))
                    num_images += 1
            else:  # each target is the image's row index in the CSV's image list
                kept.extend(targets)
        if not images:
            raise ValueError(f"no usable images in {data} (skipped: {dict(skipped) or 'none'})")
        if not shards and len(kept) < len(paths):  # skipped images take their captions with them
            index = {old: new for new, old in enumerate(kept)}
            pairs = [(caption, index[owner]) for caption, owner in zip(captions, owners) if owner in index]
            captions, owners = [caption for caption, _ in pairs], [owner for _, owner in pairs]
        texts = []
        for start in range(0, len(captions), batch_size):
            ids = tokenize(model.tokenizer, captions[start:start + batch_size]).to(device)
            texts.append(model.encode_text(ids, normalize=True).float().cpu())
    result = retrieval_metrics(torch.cat(texts) @ torch.cat(images).T, torch.tensor(owners), ks)
    if shards or skipped:
        result["skipped"] = dict(skipped)
    return result


def retrieval_metrics(scores: torch.Tensor, owners: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Recall@k both ways from text-image scores (N_texts, N_images) and each text's image index (N_texts,)."""
    num_texts, num_images = scores.shape
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(num_texts), owners] = True  # (N_texts, N_images)
    result: dict[str, Any] = {}
    for k in ks:
        # text -> image: the caption's own image among its k best images
        top_images = scores.topk(min(k, num_images), dim=1).indices  # (N_texts, k)
        result[f"image_retrieval_recall@{k}"] = positive.gather(1, top_images).any(dim=1).double().mean().item()
        # image -> text: any of the image's captions among its k best captions
        top_texts = scores.T.topk(min(k, num_texts), dim=1).indices  # (N_images, k)
        result[f"text_retrieval_recall@{k}"] = positive.T.gather(1, top_texts).any(dim=1).double().mean().item()
    captions_per_image = torch.bincount(owners, minlength=num_images).double()
    result.update(num_images=num_images, num_texts=num_texts, image_retrieval_chance=1.0 / num_images,
                  text_retrieval_chance=(captions_per_image / num_texts).mean().item())
    return result


# ---- checking a source before a model reads it ---------------------------------------------------------------

_PEEK_SAMPLES = 16  # samples of the first shard read to check that a shard source holds what the evaluation needs


def check_templates(templates: Sequence[str], given_as: str = "templates") -> None:
    """Every prompt template has the "{}" where the class name goes; ValueError naming the first that has not."""
    if not templates:
        raise ValueError(f"{given_as}: no prompt template; give one per line, each with '{{}}' for the class name")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ValueError(f"{given_as}: {len(missing)} of {len(templates)} prompt templates have no '{{}}' where the "
                         f"class name goes, e.g. {missing[0]!r}")


def numbered_folders_warning(classes: Sequence[str], named: bool, given_as: str = "classnames") -> str:
    """A warning for class folders named by numbers that sort differently as text, when the class names come from a
    list (`named`), not from the folders: ImageFolder numbers the classes in text order (0, 1, 10, 11, 2, ...), and a
    list written in numeric order then labels most images wrong. "" when that cannot happen."""
    if not named or not classes or not all(c.isdigit() for c in classes):
        return ""
    numeric = sorted(classes, key=int)
    if list(classes) == numeric:
        return ""
    shown, in_order = ", ".join(list(classes)[:5]), ", ".join(numeric[:5])
    return (f"{given_as}: the class folders are numbers, which ImageFolder orders as text ({shown}, ...): the i-th "
            f"name must be the class of the i-th folder in that order. A list in numeric order ({in_order}, ...) "
            f"labels most images wrong; name the folders with leading zeros ({len(numeric[-1])} digits) or write the "
            f"names in the folders' text order")


def check_classification_source(data: str | os.PathLike, classnames: Sequence[str] | None = None,
                                templates: Sequence[str] | None = None, label_key: str = "cls",
                                csv_img_key: str = "filepath", csv_label_key: str = "label",
                                table_format: str | None = None,
                                given_as: tuple[str, str, str] = ("data", "classnames", "templates")
                                ) -> tuple[dict[str, Any], list[str]]:
    """Open what `zero_shot_classification(model, data, ...)` would read and check its shape, without a model.

    An ImageFolder must hold class folders with images, and the class names one per folder (a warning for numbered
    folders, see `numbered_folders_warning`); a CSV/TSV its columns, labels and image files; shards must exist and the
    first one hold images with labels. Class names are required where the data cannot give them, templates must hold
    "{}". `given_as` names the data, class names and templates in the messages (flags or recipe keys).

    Returns:
        ({"kind", "classes", "images" (None for shards: not counted)}, warnings).

    Raises:
        FileNotFoundError, ValueError: naming the source, the file, row or template and what was expected.
    """
    what, names_as, templates_as = given_as
    if templates is not None:
        check_templates(templates, templates_as)
    kind = source_kind(data)
    if kind == "folder":
        folder = _image_folder(Path(data))
        names = folder_classnames(folder.root, folder.classes, classnames, names_as)
        named = classnames is not None or (Path(data) / CLASSNAMES_FILE).is_file()
        warning = numbered_folders_warning(folder.classes, named, names_as)
        return ({"kind": kind, "classes": len(names), "images": len(folder.samples)}, [warning] if warning else [])
    if classnames is None:
        classnames = sidecar_lines(data, [CLASSNAMES_FILE])
    if not classnames:
        raise ValueError(f"{what}: classification on {data} needs class names: set {names_as} (a file with one per "
                         f"line in label order, or {', '.join(BUILTIN_SETS)}), or put {CLASSNAMES_FILE} beside it")
    if kind == "csv":
        paths, _ = read_labelled_csv(data, classnames, csv_img_key, csv_label_key,
                                     separator=TABLE_SEPARATORS.get(table_format or ""))
        return {"kind": kind, "classes": len(classnames), "images": len(paths)}, []
    _peek_shards(data, what, "a label (the member ." + label_key + " or the JSON field 'label')",
                 label_reader(label_key, list(classnames)))
    return {"kind": kind, "classes": len(classnames), "images": None}, []


def check_retrieval_source(data: str | os.PathLike, image_key: str = "filepath", caption_key: str = "caption",
                           table_format: str | None = None, what: str = "retrieval") -> dict[str, Any]:
    """Open what `zero_shot_retrieval(model, data, ...)` would read and check its shape, without a model: a CSV/TSV's
    columns, captions and image files, or the first shard's images and captions. Returns {"kind", "images", "texts"}
    (None for shards: not counted); raises FileNotFoundError or ValueError naming what is wrong."""
    kind = source_kind(data)
    if kind == "folder":
        raise ValueError(f"{what}: {data} is a folder; retrieval reads a CSV/TSV of (image, caption) rows or "
                         f"captioned WebDataset shards")
    if kind == "csv":
        paths, captions, _ = read_retrieval_csv(data, image_key, caption_key,
                                                separator=TABLE_SEPARATORS.get(table_format or ""))
        return {"kind": kind, "images": len(paths), "texts": len(captions)}
    _peek_shards(data, what, "a caption (.txt, or JSON caption/captions)", every_caption)
    return {"kind": kind, "images": None, "texts": None}


def _peek_shards(spec: str | os.PathLike, what: str, needs: str, target) -> None:
    """The first shard of `spec` opens and one of its first samples has an image and a `target`."""
    urls = expand_urls(str(spec))
    first = urls[0]
    if first.startswith("pipe:") or "://" in first:
        return  # remote: read when the evaluation runs
    seen, reasons = 0, Counter()
    for sample in shard_samples([first], lambda url, message: reasons.update(["unreadable_tar"])):
        seen += 1
        try:
            usable = image_bytes(sample) is not None and target(sample) not in (None, [])
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{what}: {first}: sample {sample['__key__']!r}: {e}") from None
        if usable:
            return
        reasons["no_image" if image_bytes(sample) is None else "no_target"] += 1
        if seen >= _PEEK_SAMPLES:
            break
    raise ValueError(f"{what}: none of the first {seen} samples of {first} has an image and {needs} "
                     f"({', '.join(f'{k}={v}' for k, v in reasons.items()) or 'no sample'}); look at it with "
                     f"clipalign-inspect-shards {first}")


def _image_folder(folder: Path) -> ImageFolder:
    """The ImageFolder's classes and (path, label) samples; the images are read later, by `ImagePaths`."""
    if not folder.is_dir():
        raise FileNotFoundError(f"zero-shot data folder {folder} does not exist")
    try:
        return ImageFolder(str(folder))
    except FileNotFoundError as e:
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        empty = (f"its sub-folders hold no images ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}"
                 f"{f'; {len(classes)} in all' if len(classes) > 5 else ''})" if classes else "it has no sub-folders")
        raise FileNotFoundError(f"zero-shot data folder {folder} holds no images: {empty}; expected an ImageFolder "
                                f"(one sub-folder of images per class: .jpg, .jpeg, .png, .webp, ...)") from e


@contextlib.contextmanager
def _evaluating(model, device: str | torch.device | None):
    """Eval mode and no gradients for the block (moving the model to `device` first); yields the model's device.

    The model's own mode (train or eval) comes back afterwards, so the trainer can evaluate mid-run.
    """
    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield _device_of(model)
    finally:
        model.train(was_training)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _preprocess_of(model):
    if getattr(model, "preprocess", None) is not None:
        return model.preprocess
    from clipalign.model import eval_preprocess

    return eval_preprocess(model)


def _print_table(result: dict[str, Any], title: str) -> None:
    print(title)
    for key, value in result.items():
        print(f"  {key:<32}{value:.4f}" if isinstance(value, float) else f"  {key:<32}{value}")


def main(argv: Sequence[str] | None = None) -> None:
    """`clipalign-zeroshot`: zero-shot classification and/or retrieval of a checkpoint, run or export directory."""
    parser = zeroshot_parser(default_device="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.data and not args.retrieval:
        parser.error("give --data (classification), --retrieval (retrieval) or both")
    # what the evaluation reads, opened and checked before the model is loaded: a mistake costs seconds
    try:
        classnames = resolve_lines(names, "classnames") if (names := args.classnames or args.dataset) else None
        templates = resolve_lines(temps, "templates") if (temps := args.templates or args.dataset) else None
        if args.data:
            _, warnings = check_classification_source(
                args.data, classnames, templates, args.label_key, args.csv_img_key, args.csv_label_key,
                args.table_format, given_as=("--data", "--classnames", "--templates"))
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr)
        if args.retrieval:
            check_retrieval_source(args.retrieval, args.csv_img_key, args.csv_caption_key, args.table_format,
                                   what="--retrieval")
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")

    from clipalign.model import load

    try:
        model = load(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as e:  # not a checkpoint, run or export: one line, not a traceback
        parser.exit(2, f"{parser.prog}: error: --model: {e}\n")
    out: dict[str, Any] = {"model": str(args.model)}
    if args.data:
        result = zero_shot_classification(
            model, args.data, classnames=classnames, templates=templates,
            batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
            confusion=args.confusion or bool(args.confusion_png), label_key=args.label_key,
            csv_img_key=args.csv_img_key, csv_label_key=args.csv_label_key, precision=args.precision,
            max_image_pixels=args.max_image_pixels, table_format=args.table_format)
        if args.confusion_png:
            png = plot_confusion(result["classnames"], result["confusion_matrix"], args.confusion_png)
            print(f"confusion matrix: {png}")
            if not args.confusion:
                del result["classnames"], result["confusion_matrix"]
        _print_table({k: v for k, v in result.items() if not isinstance(v, (dict, list))},
                     f"zero-shot classification on {args.data}")
        out.update(data=str(args.data), **result)
    if args.retrieval:
        result = zero_shot_retrieval(model, args.retrieval, args.csv_img_key, args.csv_caption_key,
                                     batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
                                     precision=args.precision, max_image_pixels=args.max_image_pixels,
                                     table_format=args.table_format)
        _print_table(result, f"zero-shot retrieval on {args.retrieval}")
        out["retrieval"] = {"data": str(args.retrieval), **result}
    if args.output:
        write_atomic(args.output, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
