"""Mistakes a newcomer makes, each planted in real files, found by the checks a run makes before it builds a model
(`clipalign.preflight.check_run`): one ConfigError of one line naming the key, the file and what was expected.

The trainer runs these checks first (tests/test_setup_checks.py runs it on some of them, and on the run directory's
rules and the end of a run); here they run in-process, so that every mistake costs milliseconds, not a launch.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from clipalign.config import ConfigError, load_config
from clipalign.data.synthetic import draw_sample
from clipalign.data.writer import image_to_bytes, write_shards
from clipalign.preflight import check_run, export_dir, run_outputs, start_over

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Real inputs: 40 captioned samples in 2 shards, an ImageFolder of 3 classes, a retrieval CSV, and the rest."""
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    samples = []
    for i in range(40):
        img, caption, _ = draw_sample(rng, 32)
        samples.append({"__key__": f"{i:04d}", "jpg": image_to_bytes(img, "jpg"), "txt": caption})
    write_shards(samples, root / "shards", samples_per_shard=20)
    for cls in ("cat", "dog", "bird"):
        (root / "folder" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(root / "folder" / cls / f"{i}.png")
    (root / "flat").mkdir()
    Image.new("RGB", (16, 16)).save(root / "flat" / "a.png")  # images, no class folders
    (root / "names.txt").write_text("cat\ndog\n")
    (root / "templates.txt").write_text("a photo of a {}.\na blurry photo\n")
    (root / "pairs.csv").write_text("filepath,caption\nfolder/cat/0.png,a cat\n")
    (root / "tabs.csv").write_text("filepath\tcaption\nfolder/cat/0.png\ta cat\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("keep")
    return root


def _cfg(files: Path, tmp_path: Path, *overrides: str):
    return load_config(QUICKSTART, [f"data.train={files}/shards/train-{{000000..000001}}.tar", "data.synthetic=false",
                                    "data.batch_size=8", "eval.zeroshot=none", "eval.retrieval=none",
                                    f"train.output_dir={tmp_path / 'run'}", *overrides])


MISTAKES = {
    "not an ImageFolder": (["eval.zeroshot={files}/flat"],
                           "eval.zeroshot: zero-shot data folder {files}/flat holds no images: it has no "
                           "sub-folders; expected an ImageFolder"),
    "names against folders": (["eval.zeroshot={files}/folder", "eval.classnames={files}/names.txt"],
                              "eval.classnames: 2 class names for 3 class folders"),
    "templates without {}": (["eval.templates={files}/templates.txt"],
                             "eval.templates: 1 of 2 prompt templates have no '{{}}' where the class name goes, e.g. "
                             "'a blurry photo'"),
    "retrieval columns": (["eval.retrieval={files}/tabs.csv"],
                          "eval.retrieval: {files}/tabs.csv: no column 'filepath'"),
    "export into notes": (["export.dir={files}/notes"],
                          "export.dir {files}/notes exists and is not an export (it holds todo.txt)"),
    "val under a batch": (["data.val={files}/shards/train-000000.tar", "data.batch_size=32"],
                          "data.val holds 20 usable samples, fewer than one global batch of validation"),
    "train as a directory": (["data.train={files}/shards"],
                             "data.train source '{files}/shards' is a directory: give its shards as a pattern: "
                             "{files}/shards/train-{{000000..000001}}.tar (2 shards)"),
    "classnames missing": (["eval.zeroshot={files}/folder", "eval.classnames={files}/nope.txt"],
                           "eval.classnames: '{files}/nope.txt' is neither a file nor a built-in set"),
    "teacher unknown": (["distill.teacher={files}/no-teacher"],
                        "distill.teacher: '{files}/no-teacher' is neither a directory (a clipalign export"),
    "teacher weights missing": (["distill.teacher=ViT-B-32"], "distill.teacher='ViT-B-32' is a model name without "
                                                                "weights"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_planted_mistake_is_one_config_error_before_anything_is_built(files, tmp_path, mistake):
    overrides, expected = MISTAKES[mistake]
    cfg = _cfg(files, tmp_path, *(o.format(files=files) for o in overrides))
    with pytest.raises(ConfigError) as info:
        check_run(cfg, world=1)
    message = str(info.value)
    assert expected.format(files=files) in message and "\n" not in message, message
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_right_inputs_pass_and_a_retrieval_tsv_reads_with_its_key(files, tmp_path):
    cfg = _cfg(files, tmp_path, f"eval.zeroshot={files}/folder", f"eval.retrieval={files}/pairs.csv",
               f"data.val={files}/shards/train-{{000000..000001}}.tar", "eval.val_samples=16")
    assert check_run(cfg, world=2) == (None, [])  # 16 of the 40 samples: a global batch of 8 x 2 processes
    tsv = _cfg(files, tmp_path, f"eval.retrieval={files}/tabs.csv", "eval.table_format=tsv")
    assert check_run(tsv, world=1) == (None, [])


def test_a_warmup_longer_than_the_run_warns_with_the_lr_it_reaches(files, tmp_path):
    # a user's recipe kept warmup_steps=2000 from a larger one and trained 150 steps at a few percent of its lr
    _, warnings = check_run(_cfg(files, tmp_path, "optim.warmup_steps=2000", "train.steps=150", "optim.lr=1e-3"),
                            world=1)
    assert len(warnings) == 1 and warnings[0].startswith("optim.warmup_steps=2000 is more than train.steps=150")
    assert "ending at 0.075 x optim.lr=0.001" in warnings[0] and "optim.warmup_steps=4" in warnings[0]
    assert check_run(_cfg(files, tmp_path, "optim.warmup_steps=150", "train.steps=150"), world=1)[1] == []


def test_an_export_whose_packages_are_missing_is_refused_before_the_run(files, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # not importable, as without the onnx extra
    with pytest.raises(ConfigError, match=r"export.onnx=true: ONNX export needs onnxscript \(not installed\): pip "
                                          r"install 'clipalign\[onnx\]'"):
        check_run(_cfg(files, tmp_path, "export.dir=export", "export.onnx=true"), world=1)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"export.format=transformers needs the transformers package"):
        check_run(_cfg(files, tmp_path, "export.dir=export", "export.format=transformers"), world=1)
    assert check_run(_cfg(files, tmp_path, "export.dir=export"), world=1) == (None, [])


def test_numbered_class_folders_with_a_names_list_warn(tmp_path, files):
    digits = tmp_path / "digits"
    for d in range(12):
        (digits / str(d)).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(digits / str(d) / "x.png")
    (tmp_path / "digits.txt").write_text("\n".join(f"digit {d}" for d in range(12)))
    cfg = _cfg(files, tmp_path, f"eval.zeroshot={digits}", f"eval.classnames={tmp_path / 'digits.txt'}")
    _, warnings = check_run(cfg, world=1)
    assert len(warnings) == 1 and warnings[0].startswith("eval.classnames: the class folders are numbers")


def test_a_run_directory_of_another_run_is_continued_or_started_over_never_mixed(files, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "trainer_state.json").write_text('{"step": 2}')
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    (run / "export").mkdir()
    (run / "export" / "open_clip_config.json").write_text("{}")
    (run / "mine.txt").write_text("the user's own file")
    fresh = _cfg(files, tmp_path, "train.resume=", "export.dir=export")
    with pytest.raises(ConfigError, match=r"train.output_dir .*run holds another run \(metrics.jsonl, checkpoints/; "
                                          r"checkpoints up to step_00000002\): continue it with train.resume=auto"):
        check_run(fresh, world=1)
    assert run_outputs(run) == ["metrics.jsonl", "checkpoints/"]
    overwrite = _cfg(files, tmp_path, "train.resume=", "train.overwrite=true", "export.dir=export")
    assert export_dir(overwrite) == run / "export"  # relative: inside the run
    assert check_run(overwrite, world=1)[0] is None
    assert start_over(overwrite, run) == ["metrics.jsonl", "checkpoints/", "export/"]
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]  # nothing but the run's own files went
