"""Zero-shot numbers computed the way clip_benchmark computes them: its own metric code on the same model and data.

The synthetic held-out split (30 classes, two captions per image) is scored by clipalign's evaluation and by
`clip_benchmark.metrics.zeroshot_classification.evaluate` / `zeroshot_retrieval.evaluate`, fed the same
images through the same preprocessing in plain DataLoaders. The numbers must be the same.
"""

from pathlib import Path

import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from clipalign.config import ModelConfig
from clipalign.data.eval_sets import ImagePaths
from clipalign.data.synthetic import make_synthetic_dataset
from clipalign.evaluate import (
    read_retrieval_csv,
    zero_shot_classification,
    zero_shot_classifier,
    zero_shot_retrieval,
)
from clipalign.model import create_model, eval_preprocess
from clipalign.tokenizer import tokenize

BATCH = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "ds", train_samples=8, heldout_per_class=3,
                                  samples_per_shard=8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(ModelConfig(name="tiny-vit-64")).eval()


def _tokenizer(model):
    return lambda texts: tokenize(model.tokenizer, texts)


class _Captioned(torch.utils.data.Dataset):
    """(image, [its captions]) pairs, the layout clip_benchmark's retrieval loaders yield."""

    def __init__(self, csv_path, transform):
        paths, captions, owners = read_retrieval_csv(csv_path)
        self.images = ImagePaths(paths, range(len(paths)), transform)
        self.captions = [[c for c, o in zip(captions, owners) if o == i] for i in range(len(paths))]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][0], self.captions[i]


def _collate(batch):
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def test_retrieval_equals_clip_benchmark(model, dataset):
    ours = zero_shot_retrieval(model, dataset.heldout_captions, batch_size=BATCH, progress=False)
    loader = DataLoader(_Captioned(dataset.heldout_captions, eval_preprocess(model)), batch_size=BATCH,
                        collate_fn=_collate)
    theirs = zeroshot_retrieval.evaluate(model, loader, _tokenizer(model), "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert ours["num_images"] == 90 and ours["num_texts"] == 180
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["image_retrieval_recall@10"] > ours["image_retrieval_recall@1"]  # not all zeros


def test_classification_equals_clip_benchmark(model, dataset):
    ours = zero_shot_classification(model, dataset.heldout_dir, batch_size=BATCH, progress=False)
    folder = ImageFolder(str(dataset.heldout_dir), transform=eval_preprocess(model))
    loader = DataLoader(folder, batch_size=BATCH)
    templates = [t.replace("{}", "{c}") for t in dataset.templates]  # clip_benchmark formats with {c}
    # clip_benchmark's own classifier and logits; its `evaluate` itself stops in `accuracy`, which converts a
    # 1-element array with float() (an error under NumPy 2), so its last step is repeated here as it is written
    classifier = zeroshot_classification.zero_shot_classifier(model, _tokenizer(model), dataset.classnames,
                                                              templates, "cpu", amp=False)
    torch.testing.assert_close(zero_shot_classifier(model, dataset.classnames, dataset.templates), classifier)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    ranked = logits.topk(5, dim=1).indices
    acc1 = (ranked[:, 0] == target).double().mean().item()
    acc5 = (ranked == target[:, None]).any(dim=1).double().mean().item()
    recall = balanced_accuracy_score(target, logits.argmax(dim=1))
    assert ours["num_images"] == 90 and ours["num_classes"] == 30
    assert ours["top1"] == pytest.approx(acc1, abs=1e-9)
    assert ours["top5"] == pytest.approx(acc5, abs=1e-9)
    assert ours["mean_per_class_recall"] == pytest.approx(recall, abs=1e-9)


@pytest.fixture(scope="module")
def heldout_shards(dataset, tmp_path_factory):
    """The held-out split again as clip_benchmark-style WebDataset shards (`cls` labels, JSON captions) and as a
    labelled CSV, so every evaluation source can be compared with the ImageFolder / retrieval-CSV numbers."""
    import csv
    import json

    import webdataset as wds

    root = tmp_path_factory.mktemp("heldout-wds")
    (root / "test").mkdir()
    paths, captions, owners = read_retrieval_csv(dataset.heldout_captions)
    folder = ImageFolder(str(dataset.heldout_dir))
    label_of = {Path(p).resolve(): label for p, label in folder.samples}
    rows = []
    for shard in range(3):  # 90 images over 3 shards, in an order unlike the folder's
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for i in range(shard, len(paths), 3):
                label = label_of[paths[i].resolve()]
                sink.write({"__key__": f"{i:04d}", "png": paths[i].read_bytes(), "cls": str(label),
                            "json": json.dumps({"captions": [c for c, o in zip(captions, owners) if o == i]})})
                rows.append({"filepath": str(paths[i]), "label": dataset.classnames[label] if i % 2 else label})
    (root / "classnames.txt").write_text("\n".join(dataset.classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(dataset.templates) + "\n")
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_every_classification_source_gives_the_same_numbers(model, dataset, heldout_shards):
    expected = zero_shot_classification(model, dataset.heldout_dir, batch_size=BATCH, progress=False)
    # shards: class names and templates found beside them (clip_benchmark's layout); labels from `cls`
    on_shards = zero_shot_classification(model, str(heldout_shards / "test" / "{0..2}.tar"), batch_size=BATCH,
                                         workers=2, progress=False)
    # CSV: labels given as indices and as class names; templates passed explicitly
    on_csv = zero_shot_classification(model, heldout_shards / "labels.csv", templates=dataset.templates,
                                      batch_size=BATCH, progress=False)
    assert on_shards.pop("skipped") == {}
    for result in (on_shards, on_csv):
        assert result.pop("per_class_top1") == pytest.approx(expected["per_class_top1"], abs=1e-9)
        assert result == pytest.approx({k: v for k, v in expected.items() if k != "per_class_top1"}, abs=1e-9)


def test_retrieval_on_shards_equals_the_csv(model, dataset, heldout_shards):
    expected = zero_shot_retrieval(model, dataset.heldout_captions, batch_size=BATCH, progress=False)
    on_shards = zero_shot_retrieval(model, str(heldout_shards / "test" / "{0..2}.tar"), batch_size=BATCH,
                                    workers=2, progress=False)
    assert on_shards.pop("skipped") == {}
    assert on_shards == pytest.approx(expected, abs=1e-6)
