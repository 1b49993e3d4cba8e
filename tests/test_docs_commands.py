"""The commands README.md and docs/quickstart.md show, run as a newcomer copies them.

Every shell command of their ```bash blocks and every command in their inline code is run as written, in a fresh
directory with the repository's recipes and a fresh home (so `~/.cache/clipalign` is the quickstart's own), in the
order the pages give them. Only where a command trains are overrides appended: a few steps and a tiny batch, and
for a command whose shards are a placeholder (`/data/...`), the tests' own shards and no end-of-run evaluation or
export. The README's Python snippet runs too. A command, flag or key that stops working fails here. The
quickstart's run directory is checked as docs/quickstart.md describes it (this is the suite's quickstart run).

Left out: `pip install` (CI's own install) and `pytest` (this suite).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipalign.data.synthetic import draw_sample
from clipalign.data.writer import image_to_bytes, write_shards

REPO = Path(__file__).resolve().parent.parent
PAGES = ("README.md", "docs/quickstart.md")
NOT_RUN = ("pip ", "pytest")
SERVERS = ("--serve",)  # a server runs until stopped: not a command to run to its end here
COMMAND = re.compile(r"^(accelerate launch|clipalign-[a-z-]+|python)( \S+)+$")  # a command with its arguments
TRAINING = ("clipalign.train", "clipalign-train")


def page_commands(page: str) -> list[str]:
    """The shell commands of one page in order: its bash blocks' lines (continuations joined, comments dropped)
    and its inline code that starts with a command and has arguments."""
    text = (REPO / page).read_text()
    commands = []
    for match in re.finditer(r"```(?:bash|sh)\n(.*?)```|`([^`\n]+)`", text, re.S):
        block, inline = match.groups()
        if block is not None:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].strip()
                if line and not line.startswith("#"):
                    commands.append(" ".join(line.split()))
        elif COMMAND.match(inline.strip()):
            commands.append(" ".join(inline.split()))
    return commands


def documented_commands() -> list[str]:
    seen, ordered = set(), []
    for page in PAGES:
        for command in page_commands(page):
            if command not in seen and not command.startswith(NOT_RUN) and not any(s in command for s in SERVERS):
                seen.add(command)
                ordered.append(command)
    return ordered


def _shards(root: Path) -> str:
    rng = random.Random(0)
    samples = []
    for i in range(32):
        image, caption, _ = draw_sample(rng, 64)
        samples.append({"__key__": f"{i:09d}", "jpg": image_to_bytes(image), "txt": caption})
    write_shards(samples, root, samples_per_shard=16)
    return str(root / "train-{000000..000001}.tar")


def _as_run(command: str, shards: str, trained: set[str]) -> str:
    """The command with the overrides a training command gets here (none for the others)."""
    if not any(t in command for t in TRAINING):
        return command
    out = re.search(r"train\.output_dir=(\S+)", command)
    out = out.group(1) if out else "runs/quickstart"
    # a run directory trained before is continued (the recipes resume), by two more steps
    steps = 4 if out in trained else 2
    trained.add(out)
    extra = [f"train.steps={steps}", "data.batch_size=4", "train.log_every=1"]
    if re.search(r"data\.train='?/data/", command):  # a placeholder for the reader's own shards
        extra += [f"data.train={shards}", "eval.zeroshot=none", "eval.retrieval=none", "export.dir="]
    return f"{command} {' '.join(extra)}"


def _check_quickstart_run(run: Path, cache: Path) -> None:
    """What the quickstart's run leaves, as docs/quickstart.md describes it (here 2 steps of 4 samples)."""
    from clipalign.checkpoint import list_checkpoints, read_trainer_state
    from clipalign.config import read_config

    assert list(cache.rglob("train-*.tar"))  # the synthetic set, drawn into ~/.cache/clipalign
    resolved = read_config(run / "config.yaml")
    assert resolved.data.train.startswith(str(cache)) and resolved.train.steps == 2
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [(m["step"], m["samples"], m["skipped"]) for m in steps] == [(1, 4, {}), (2, 8, {})]
    zeroshot = [m for m in metrics if "zeroshot" in m]
    assert len(zeroshot) == 1 and zeroshot[0]["zeroshot"]["num_classes"] == 30
    # retrieval on the synthetic held-out captions, in the same line: 600 images, two captions each
    assert (zeroshot[0]["retrieval"]["num_images"], zeroshot[0]["retrieval"]["num_texts"]) == (600, 1200)
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_00000002"] and read_trainer_state(ckpts[0])["step"] == 2
    assert list(run.rglob("events.out.tfevents.*"))
    assert (run / "export" / "open_clip_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and "top1" in summary["zeroshot"] and "text_retrieval_recall@5" in summary["retrieval"]


def test_the_pages_show_the_commands_this_test_runs():
    commands = documented_commands()
    assert commands[0] == "accelerate launch -m clipalign.train recipes/quickstart.yaml"
    assert any(c.startswith("clipalign-zeroshot --model runs/quickstart") for c in commands)
    assert any("--num_processes 2" in c for c in commands)


@pytest.mark.slow
def test_the_readme_and_quickstart_commands_run_as_written(tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    shutil.copytree(REPO / "recipes", work / "recipes")
    shards = _shards(tmp_path / "shards")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPALIGN_", "ACCELERATE_"))}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                                           env.get("PATH", "")]))
    trained: set[str] = set()
    for command in documented_commands():
        run = _as_run(command, shards, trained)
        proc = subprocess.run(["bash", "-c", run], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{run}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        if run.startswith("accelerate launch -m clipalign.train recipes/quickstart.yaml train.steps"):
            _check_quickstart_run(work / "runs" / "quickstart", home / ".cache" / "clipalign")
    assert (work / "runs" / "quickstart" / "curves.png").is_file()  # clipalign-plot's
    assert (work / "runs" / "cc3m" / "summary.json").is_file()  # "train on your data", on the test's shards
    # the README's Python snippet, on the quickstart's export
    snippet = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "tensor(" in proc.stdout, proc.stderr[-3000:]
