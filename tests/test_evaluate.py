import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from torchvision.datasets import ImageFolder

from clipalign.checkpoint import save_checkpoint
from clipalign.config import Config, ModelConfig
from clipalign.evaluate import DEFAULT_TEMPLATES, main, zero_shot_classification, zero_shot_classifier
from clipalign.model import create_model

COLOURS = {"blue": (30, 60, 220), "green": (40, 190, 60), "light_red": (240, 110, 100),
           "yellow": (230, 220, 40), "purple": (130, 40, 160)}


def _image_folder(root: Path, classes: list[str], per_class: int) -> Path:
    """Solid-colour PNGs, a little shade and noise apart so no two images are the same."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 12, (48, 48, 3)) + 8 * i, 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(ModelConfig(name="tiny-vit-64")).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("colours"), ["blue", "green", "light_red"], per_class=4)


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    """A run directory whose checkpoint (step 5) holds `model`."""
    cfg = Config()
    cfg.model.name = "tiny-vit-64"
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True)
        accelerator.prepare(model)  # save_state only writes models that went through prepare
        save_checkpoint(accelerator, run_dir, 5, cfg, {"samples_seen": 40})
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return run_dir


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings(model):
    names, templates = ["red", "green", "blue"], ["a {}.", "a photo of a {} thing."]
    weights = zero_shot_classifier(model, names, templates, batch_size=4)  # 6 prompts over two batches
    assert weights.shape == (128, 3)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        per_prompt = torch.nn.functional.normalize(model.encode_text(model.tokenizer(["a green.",
                                                                                      "a photo of a green thing."]),
                                                                     normalize=False), dim=-1)
    torch.testing.assert_close(weights[:, 1], torch.nn.functional.normalize(per_prompt.mean(0), dim=0))
    with pytest.raises(ValueError, match="no placeholder"):
        zero_shot_classifier(model, names, ["no placeholder"])


def test_top1_and_recall_match_a_direct_computation(model, folder):
    model.train()
    result = zero_shot_classification(model, folder, batch_size=5, progress=False)  # 12 images in 3 batches
    assert model.training  # the caller's mode is restored
    model.eval()
    assert set(result) == {"top1", "mean_per_class_recall", "num_images", "num_classes", "chance",
                           "per_class_top1"}  # no top5 with < 5 classes
    assert result["num_images"] == 12 and result["num_classes"] == 3
    assert result["chance"] == pytest.approx(1 / 3)

    dataset = ImageFolder(str(folder), transform=model.preprocess)
    classifier = zero_shot_classifier(model, ["blue", "green", "light red"], DEFAULT_TEMPLATES)
    with torch.no_grad():
        images = torch.stack([image for image, _ in dataset])
        predicted = (model.encode_image(images) @ classifier).argmax(dim=1)
    labels = torch.tensor(dataset.targets)
    assert result["top1"] == pytest.approx((predicted == labels).float().mean().item())
    recall = [(predicted[labels == c] == c).float().mean().item() for c in range(3)]
    assert result["mean_per_class_recall"] == pytest.approx(sum(recall) / 3)
    assert list(result["per_class_top1"].values()) == pytest.approx(recall)


def test_top5_reported_from_five_classes(model, tmp_path):
    folder = _image_folder(tmp_path / "five", list(COLOURS), per_class=1)
    result = zero_shot_classification(model, folder, templates=["{}"], progress=False)
    assert result["num_classes"] == 5 and result["top5"] == 1.0
    assert result["chance"] == pytest.approx(0.2)


def test_classnames_and_templates_files_in_the_folder_are_used(model, tmp_path):
    folder = _image_folder(tmp_path / "data", ["blue", "green", "light_red"], per_class=1)
    (folder / "templates.txt").write_text("a photo of {}\nmissing the slot\n")
    with pytest.raises(ValueError, match="missing the slot"):
        zero_shot_classification(model, folder, progress=False)
    (folder / "templates.txt").write_text("a photo of {}\n")
    (folder / "classnames.txt").write_text("blue\ngreen\n")
    with pytest.raises(ValueError, match=r"classnames.txt: 2 class names for 3 class folders"):
        zero_shot_classification(model, folder, progress=False)
    with pytest.raises(ValueError, match="4 class names for 3 class folders"):
        zero_shot_classification(model, folder, classnames=["a", "b", "c", "d"], progress=False)
    (folder / "classnames.txt").write_text("navy\nlime\n\ncoral\n")  # blank lines are skipped
    assert zero_shot_classification(model, folder, progress=False)["num_classes"] == 3


def test_missing_or_empty_folder_is_a_clear_error(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        zero_shot_classification(model, tmp_path / "nowhere")
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        zero_shot_classification(model, tmp_path / "empty")


def test_a_source_is_checked_before_any_model_and_its_mistakes_named(folder, tmp_path, capsys):
    from clipalign.evaluate import check_classification_source, check_retrieval_source

    summary, warnings = check_classification_source(folder)
    assert summary == {"kind": "folder", "classes": 3, "images": 12} and warnings == []
    flat = tmp_path / "flat"  # images without class folders: not an ImageFolder
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(FileNotFoundError, match="holds no images: it has no sub-folders; expected an ImageFolder"):
        check_classification_source(flat)
    with pytest.raises(ValueError, match=r"classnames: 2 class names for 3 class folders"):
        check_classification_source(folder, classnames=["a", "b"])
    with pytest.raises(ValueError, match=r"templates: 1 of 2 prompt templates have no '\{\}' where the class name "
                                         r"goes, e.g. 'a photo'"):
        check_classification_source(folder, templates=["a photo of a {}.", "a photo"])
    # the digits case: folders 0..11 ordered as text by ImageFolder, names listed in numeric order
    digits = tmp_path / "digits"
    for d in range(12):
        (digits / str(d)).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(digits / str(d) / "x.png")
    _, warnings = check_classification_source(digits, classnames=[f"digit {d}" for d in range(12)])
    assert len(warnings) == 1 and "orders as text (0, 1, 10, 11, 2, ...)" in warnings[0]
    assert check_classification_source(digits)[1] == []  # names from the folders themselves: nothing to mislabel
    with pytest.raises(ValueError, match="retrieval: .* is a folder; retrieval reads a CSV/TSV"):
        check_retrieval_source(folder)
    (tmp_path / "r.csv").write_text("image,text\nblue/0.png,a blue square\n")
    with pytest.raises(ValueError, match=r"no column 'filepath'; columns are \['image', 'text'\]"):
        check_retrieval_source(tmp_path / "r.csv")
    # the command line checks the data before it loads a model (a model path that does not exist is never reached)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "no-model"), "--data", str(folder), "--classnames", str(tmp_path / "no.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"classnames '{tmp_path / 'no.txt'}' is neither a file nor a built-in set" in err
    # a model that is not there, or a folder that is not a model: one line each, not a traceback
    for model_arg, says in ((tmp_path / "no-model", "does not exist"), (folder, "is not a model: neither an export")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(model_arg), "--data", str(folder), "--no-progress"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"clipalign-zeroshot: error: --model: {model_arg} {says}" in err
        assert "Traceback" not in err and err.count("\n") == 1


def test_cli_scores_a_checkpoint_and_writes_json(model, run, folder, tmp_path, capsys):
    (tmp_path / "names.txt").write_text("blue\ngreen\nlight red\n")
    out = tmp_path / "eval" / "zeroshot.json"
    main(["--model", str(run), "--data", str(folder), "--classnames", str(tmp_path / "names.txt"),
          "--output", str(out), "--batch-size", "8", "--device", "cpu", "--no-progress"])
    written = json.loads(out.read_text())
    assert written["num_images"] == 12 and written["num_classes"] == 3
    expected = zero_shot_classification(model, folder, progress=False)
    assert written["top1"] == pytest.approx(expected["top1"])
    assert "top1" in capsys.readouterr().out


# ---- retrieval -------------------------------------------------------------------------------------------------------


def test_retrieval_metrics_count_hits_as_clip_papers_do():
    from clipalign.evaluate import retrieval_metrics

    # 3 images; image 0 has captions 0 and 1, image 1 caption 2, image 2 caption 3. Scores are (texts, images).
    owners = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor([[0.9, 0.1, 0.0],   # caption 0 -> image 0 first: hit@1
                           [0.1, 0.8, 0.0],   # caption 1 -> image 1 first, its image second: hit@2 only
                           [0.0, 0.2, 0.7],   # caption 2 -> image 2 first, image 1 second
                           [0.0, 0.1, 0.6]])  # caption 3 -> image 2: hit@1
    r = retrieval_metrics(scores, owners, ks=(1, 2))
    assert r["image_retrieval_recall@1"] == pytest.approx(2 / 4)
    assert r["image_retrieval_recall@2"] == pytest.approx(4 / 4)
    # image 0: best caption 0 (its own): hit. image 1: best caption 1 (0.8, not its own), then 2: hit@2.
    # image 2: best caption 2 (0.7, not its own), then caption 3: hit@2.
    assert r["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert r["text_retrieval_recall@2"] == pytest.approx(3 / 3)
    assert (r["num_images"], r["num_texts"]) == (3, 4)
    assert r["image_retrieval_chance"] == pytest.approx(1 / 3)
    assert r["text_retrieval_chance"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)


def test_retrieval_csv_errors_name_file_row_and_column(tmp_path):
    from clipalign.evaluate import read_retrieval_csv

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = tmp_path / "good.tsv"
    good.write_text("img\ttext\na.png\tfirst\na.png\tsecond\n")
    paths, captions, owners = read_retrieval_csv(good, image_key="img", caption_key="text")
    assert paths == [tmp_path / "a.png"] and captions == ["first", "second"] and owners == [0, 0]
    with pytest.raises(ValueError, match=r"no column 'filepath'; columns are \['img', 'text'\]"):
        read_retrieval_csv(good)
    (tmp_path / "missing.csv").write_text("filepath,caption\na.png,ok\nb.png,gone\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.csv:3: image .*b\.png does not exist"):
        read_retrieval_csv(tmp_path / "missing.csv")
    (tmp_path / "empty_caption.csv").write_text("filepath,caption\na.png,\n")
    with pytest.raises(ValueError, match=r"empty_caption\.csv:2: empty caption for a\.png"):
        read_retrieval_csv(tmp_path / "empty_caption.csv")
    with pytest.raises(FileNotFoundError, match="CSV .*nope.csv does not exist"):
        read_retrieval_csv(tmp_path / "nope.csv")
    tabs = tmp_path / "tabs.csv"  # a TSV under a .csv name: the separator named, with how to read it
    tabs.write_text("filepath\tcaption\na.png\tfirst\n")
    with pytest.raises(ValueError, match=r"The header looks tab-separated \(2 columns\): read it as one "
                                         r"\(clipalign-zeroshot --table-format tsv; eval.table_format=tsv"):
        read_retrieval_csv(tabs)
    assert read_retrieval_csv(tabs, separator="\t")[1] == ["first"]


def test_cli_retrieval_and_classification_in_one_json(run, folder, tmp_path, capsys):
    images = sorted(folder.rglob("*.png"))
    rows = ["filepath,caption"] + [f"{p},a {p.parent.name.replace('_', ' ')} square" for p in images]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval.json"
    main(["--model", str(run), "--data", str(folder), "--retrieval", str(tmp_path / "captions.csv"),
          "--output", str(out), "--batch-size", "5", "--device", "cpu", "--no-progress"])
    result = json.loads(out.read_text())
    assert result["num_images"] == 12 and "top1" in result
    assert result["retrieval"]["num_images"] == result["retrieval"]["num_texts"] == 12
    assert 0 <= result["retrieval"]["text_retrieval_recall@1"] <= result["retrieval"]["text_retrieval_recall@10"]
    printed = capsys.readouterr().out
    assert "zero-shot retrieval on" in printed and "image_retrieval_recall@5" in printed
    with pytest.raises(SystemExit):
        main(["--model", str(run)])  # neither --data nor --retrieval


def test_per_class_accuracy_and_confusion_matrix(model, folder, tmp_path, capsys):
    from clipalign.evaluate import confusion_matrix

    result = zero_shot_classification(model, folder, progress=False, confusion=True)
    matrix = torch.tensor(result["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum().item() == 12 and matrix.sum(dim=1).tolist() == [4, 4, 4]
    assert result["classnames"] == ["blue", "green", "light red"]
    assert result["top1"] == pytest.approx(matrix.diagonal().sum().item() / 12)
    expected = {name: pytest.approx(matrix[i, i].item() / 4) for i, name in enumerate(result["classnames"])}
    assert result["per_class_top1"] == expected
    assert result["mean_per_class_recall"] == pytest.approx(sum(result["per_class_top1"].values()) / 3)
    # rows are true classes, columns predictions
    assert confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]), 2).tolist() == [[1, 1], [0, 1]]
    assert "confusion_matrix" not in zero_shot_classification(model, folder, progress=False)


def test_cli_confusion_png(run, folder, tmp_path, capsys):
    png, out = tmp_path / "confusion.png", tmp_path / "zs.json"
    main(["--model", str(run), "--data", str(folder), "--confusion-png", str(png), "--output", str(out),
          "--device", "cpu", "--no-progress"])
    with Image.open(png) as img:
        assert img.format == "PNG"
    written = json.loads(out.read_text())
    assert "confusion_matrix" not in written and set(written["per_class_top1"]) == {"blue", "green", "light red"}
    assert f"confusion matrix: {png}" in capsys.readouterr().out


# ---- evaluation sources: built-in class names, labelled shards and CSVs, precision -------------------------------


def test_builtin_class_names_and_templates_are_the_published_ones():
    import os

    import clip_benchmark
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from clipalign.data.sample import builtin_lines, resolve_lines

    assert builtin_lines("imagenet1k", "classnames") == list(IMAGENET_CLASSNAMES)
    assert builtin_lines("imagenet1k", "templates") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    published = json.loads(Path(os.path.dirname(clip_benchmark.__file__), "datasets",
                                "en_zeroshot_classification_templates.json").read_text())
    for name in ("cifar10", "cifar100"):
        assert builtin_lines(name, "templates") == [t.replace("{c}", "{}") for t in published[name]]
    cifar100 = builtin_lines("cifar100", "classnames")
    assert len(cifar100) == len(set(cifar100)) == 100 and cifar100 == sorted(cifar100)  # the dataset's label order
    assert builtin_lines("cifar10", "classnames")[:3] == ["airplane", "automobile", "bird"]
    assert resolve_lines("cifar10", "templates")[0] == "a photo of a {}."
    with pytest.raises(FileNotFoundError, match=r"'cifar11' is neither a file nor a built-in set \(cifar10, "):
        resolve_lines("cifar11", "classnames")


def _write_labelled_shards(folder: Path, out: Path) -> Path:
    """The ImageFolder's images as one shard with `cls` labels, plus one sample of each bad kind."""
    import webdataset as wds

    dataset = ImageFolder(str(folder))
    with wds.TarWriter(str(out)) as sink:
        for i, (path, label) in enumerate(dataset.samples):
            sink.write({"__key__": f"{i:03d}", "png": Path(path).read_bytes(), "cls": str(label)})
        good = Path(dataset.samples[0][0]).read_bytes()
        sink.write({"__key__": "corrupt", "png": good[:40], "cls": "0"})
        sink.write({"__key__": "unlabelled", "png": good})
        sink.write({"__key__": "out_of_range", "png": good, "cls": "7"})
        sink.write({"__key__": "not_utf8", "png": good, "cls": b"\xff\xfe"})
        sink.write({"__key__": "by_name", "png": good, "json": json.dumps({"label": "blue"})})
    return out


def test_classification_on_labelled_shards_skips_and_counts_bad_samples(model, folder, tmp_path):
    shard = _write_labelled_shards(folder, tmp_path / "eval-000.tar")
    expected = zero_shot_classification(model, folder, progress=False)
    result = zero_shot_classification(model, str(shard), classnames=["blue", "green", "light red"], batch_size=5,
                                      progress=False)
    assert result["skipped"] == {"bad_image": 1, "no_target": 1, "bad_target": 2}
    assert result["num_images"] == 13  # the 12 folder images and the sample labelled by class name
    assert result["per_class_top1"]["green"] == expected["per_class_top1"]["green"]
    with pytest.raises(ValueError, match=r"classification on .*eval-000.tar needs class names"):
        zero_shot_classification(model, str(shard), progress=False)


def test_classification_csv_labels_and_their_errors(model, folder, tmp_path):
    from clipalign.data.eval_sets import read_labelled_csv

    images = sorted(folder.rglob("*.png"))
    rows = "".join(f"{p},{p.parent.name.replace('_', ' ')}\n" for p in images)
    (tmp_path / "labels.csv").write_text("filepath,label\n" + rows)
    names = ["blue", "green", "light red"]
    expected = zero_shot_classification(model, folder, progress=False)
    result = zero_shot_classification(model, tmp_path / "labels.csv", classnames=names, progress=False)
    assert result["top1"] == expected["top1"] and result["num_images"] == 12
    (tmp_path / "bad.csv").write_text(f"filepath,label\n{images[0]},2\n{images[1]},violet\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: label 'violet' is neither a class index nor one of the 3"):
        read_labelled_csv(tmp_path / "bad.csv", names)
    (tmp_path / "range.csv").write_text(f"filepath,label\n{images[0]},3\n")
    with pytest.raises(ValueError, match=r"range\.csv:2: label 3 is outside the 3 classes"):
        read_labelled_csv(tmp_path / "range.csv", names)
    with pytest.raises(ValueError, match=r"no column 'class'; columns are \['filepath', 'label'\].*--csv-label-key"):
        read_labelled_csv(tmp_path / "labels.csv", names, label_key="class")


def test_cli_builtin_dataset_on_a_csv_and_bf16(run, folder, tmp_path):
    images = sorted(folder.rglob("*.png"))
    (tmp_path / "cifar.csv").write_text("filepath,label\n" + "".join(f"{p},{i % 10}\n" for i, p in enumerate(images)))
    out = tmp_path / "cifar.json"
    main(["--model", str(run), "--data", str(tmp_path / "cifar.csv"), "--dataset", "cifar10", "--precision", "bf16",
          "--output", str(out), "--device", "cpu", "--no-progress"])
    written = json.loads(out.read_text())
    assert written["num_classes"] == 10 and written["num_images"] == 12
    assert set(written["per_class_top1"]) <= {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                              "horse", "ship", "truck"}


def test_bf16_evaluation_runs_the_towers_in_bf16(model):
    from clipalign.evaluate import _autocast

    names = ["red", "green", "blue", "yellow"]
    fp32 = zero_shot_classifier(model, names, DEFAULT_TEMPLATES)
    with _autocast(torch.device("cpu"), "bf16"):
        bf16 = zero_shot_classifier(model, names, DEFAULT_TEMPLATES)
    assert bf16.dtype == torch.float32  # features are compared in fp32
    assert not torch.equal(bf16, fp32)  # the towers did run in bf16 ...
    torch.testing.assert_close(bf16, fp32, atol=3e-2, rtol=0)  # ... and agree to bf16 precision
    with pytest.raises(ValueError, match="precision 'int8': expected fp32, bf16 or fp16"):
        _autocast(torch.device("cpu"), "int8")
