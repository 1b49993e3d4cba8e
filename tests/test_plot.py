"""clipalign-plot: a run's metrics.jsonl to a PNG, with clear errors for missing or damaged files."""

import json
import math

import pytest
from PIL import Image

from clipalign.plot import main, plot_runs, read_metrics


def _write_run(run, steps=30, bias=False, partial_tail=False):
    run.mkdir(parents=True)
    lines = []
    for step in range(10, steps + 1, 10):
        line = {"step": step, "samples": step * 64, "loss": 4 * math.exp(-step / 20), "logit_scale": 14 + step / 10,
                "lr": 1e-3, "samples_per_s": 100.0, "data_wait": 0.01, "skipped": {}}
        if bias:
            line["logit_bias"] = -10 + step / 100
        lines.append(json.dumps(line))
        lines.append(json.dumps({"step": step, "zeroshot": {"top1": step / 100, "top5": step / 50,
                                                           "num_images": 60, "chance": 0.1}}))
    text = "\n".join(lines) + "\n"
    if partial_tail:
        text += '{"step": 40, "loss": 1.'  # a run killed while appending
    (run / "metrics.jsonl").write_text(text)
    return run


def test_one_run_writes_a_png_next_to_its_metrics(tmp_path, capsys):
    run = _write_run(tmp_path / "run", bias=True, partial_tail=True)
    main([str(run)])
    out = run / "curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as img:
        # 6 panels (loss, scale, bias, lr, samples/s, zero-shot) in two columns: three rows
        assert img.format == "PNG" and img.width == 1200 and img.height == 3 * 320


def test_several_runs_on_one_figure_and_samples_axis(tmp_path):
    runs = [_write_run(tmp_path / "a"), _write_run(tmp_path / "b", steps=50)]
    out = plot_runs(runs, tmp_path / "plots" / "both.png", x="samples")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.height == 3 * 320  # loss, scale, lr, samples/s, zero-shot


def test_partial_last_line_is_ignored_but_damage_elsewhere_is_named(tmp_path):
    run = _write_run(tmp_path / "run", partial_tail=True)
    train, zeroshot = read_metrics(run)
    assert [r["step"] for r in train] == [10, 20, 30] and len(zeroshot) == 3
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "not json", *lines[1:]]))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON line"):
        read_metrics(run)


def test_a_resumed_runs_steps_logged_again_keep_their_last_record(tmp_path):
    run = _write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:  # killed after step 30, resumed from a checkpoint at step 20
        f.write(json.dumps({"step": 30, "samples": 1920, "loss": 0.5, "logit_scale": 17.0, "lr": 1e-3}) + "\n")
    train, _ = read_metrics(run)
    assert [r["step"] for r in train] == [10, 20, 30] and train[-1]["loss"] == 0.5


def test_errors_name_the_missing_file_or_empty_run(tmp_path):
    with pytest.raises(SystemExit, match=r"nowhere/metrics\.jsonl: no such metrics file"):
        main([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no metrics to plot"):
        main([str(tmp_path / "empty")])
