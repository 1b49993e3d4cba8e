"""Does a larger teacher help a tiny student? Distillation against plain training on the quickstart's synthetic set.

    python tools/distill_demo.py --out runs/distill-demo                       # about 26 minutes on 2 CPU cores
    python tools/distill_demo.py --out runs/distill-demo --seeds 0 1 2 --student-steps 300

1. The teacher: the quickstart's recipe with wider and deeper towers (`--teacher-*`), trained by clipalign for
   `--teacher-steps` steps on the synthetic set (skipped when its run already finished).
2. For each seed, the tiny student (`tiny-vit-64`, the quickstart's model) twice for `--student-steps` steps, on the
   same data, batches and schedule: without a teacher, and with `distill.teacher` = the teacher's run and
   `distill.weight` = `--weight`.
3. Every run's zero-shot top-1 on the held-out split (30 classes) and its retrieval recall@1/@5 (600 images, 1200
   captions), as the run's `summary.json` reports them; per arm the mean over seeds, and the per-seed differences.

No figure is chosen in advance: the table is what the runs measure, either way. Runs are resumed where they stopped
(each is a clipalign run directory under `--out`), so the script can be interrupted and run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.yaml"


def _run(name: str, out: Path, overrides: list[str], env: dict) -> dict:
    run = out / name
    summary = run / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    cmd = [sys.executable, "-m", "clipalign.train", str(RECIPE), f"train.output_dir={run}", "train.log_with=none",
           "export.dir=", *overrides]
    print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {out / f'{name}.log'}:\n{proc.stderr[-2000:]}")
    print(f"   {time.monotonic() - start:.0f} s", flush=True)
    return json.loads(summary.read_text())


def _scores(summary: dict) -> dict[str, float]:
    retrieval = summary["retrieval"]
    return {"top1": summary["zeroshot"]["top1"],
            "image_r@1": retrieval["image_retrieval_recall@1"], "text_r@1": retrieval["text_retrieval_recall@1"],
            "image_r@5": retrieval["image_retrieval_recall@5"], "text_r@5": retrieval["text_retrieval_recall@5"],
            "loss": summary["loss"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the runs, demo.json and demo.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--student-steps", type=int, default=150)
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--teacher-vision", default="{layers: 6, width: 256, head_width: 64}")
    p.add_argument("--teacher-text", default="{layers: 6, width: 256, heads: 4}")
    p.add_argument("--teacher-embed-dim", type=int, default=192)
    p.add_argument("--weight", type=float, default=1.0, help="distill.weight")
    p.add_argument("--threads", type=int, default=0, help="train.cpu_threads (0: the available cores)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x))
    common = [f"train.cpu_threads={args.threads}"]
    teacher = _run("teacher", out, [*common, f"train.steps={args.teacher_steps}",
                                    f"model.vision_cfg={args.teacher_vision}", f"model.text_cfg={args.teacher_text}",
                                    f"model.embed_dim={args.teacher_embed_dim}"], env)
    rows = {"teacher": {"steps": args.teacher_steps, **_scores(teacher)}, "plain": {}, "distilled": {}}
    for seed in args.seeds:
        student = [*common, f"train.steps={args.student_steps}", f"train.seed={seed}",
                   f"optim.warmup_steps={min(30, args.student_steps // 5)}"]
        rows["plain"][seed] = _scores(_run(f"plain-s{seed}", out, student, env))
        rows["distilled"][seed] = _scores(_run(f"distilled-s{seed}", out, [
            *student, f"distill.teacher={out / 'teacher'}", f"distill.weight={args.weight}"], env))
    result = {"config": vars(args), "rows": rows}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / "demo.md").write_text(md)
    print(md)
    return result


def markdown(result: dict) -> str:
    cfg, rows = result["config"], result["rows"]
    keys = ["top1", "image_r@1", "text_r@1", "image_r@5", "text_r@5"]
    lines = [f"Student tiny-vit-64, {cfg['student_steps']} steps; teacher (vision {cfg['teacher_vision']}, text "
             f"{cfg['teacher_text']}, embed {cfg['teacher_embed_dim']}) {cfg['teacher_steps']} steps; "
             f"distill.weight {cfg['weight']}; seeds {cfg['seeds']}", "",
             "| run | zero-shot top-1 | image R@1 | text R@1 | image R@5 | text R@5 |",
             "| --- | --- | --- | --- | --- | --- |",
             "| teacher | " + " | ".join(f"{rows['teacher'][k]:.1%}" for k in keys) + " |"]
    for arm in ("plain", "distilled"):
        for seed, scores in rows[arm].items():
            lines.append(f"| {arm}, seed {seed} | " + " | ".join(f"{scores[k]:.1%}" for k in keys) + " |")
        means = {k: statistics.mean(s[k] for s in rows[arm].values()) for k in keys}
        lines.append(f"| **{arm}, mean** | " + " | ".join(f"{means[k]:.1%}" for k in keys) + " |")
    deltas = {k: [rows["distilled"][s][k] - rows["plain"][s][k] for s in rows["plain"]] for k in keys}
    lines.append("| distilled - plain, per seed | " + " | ".join(
        ", ".join(f"{d * 100:+.1f}" for d in deltas[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
