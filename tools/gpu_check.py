"""Correctness of the GPU fast paths, on the GPU they target, before any figure is measured.

On the GPU machine (see the GPU notes beside the project; `tools/gpu_report.py` runs this first):

    source .gpu/preamble.sh && python3 tools/gpu_check.py --out $OUT            # about 3 minutes on an H100
    python3 tools/gpu_check.py --out /tmp/check --device cpu --smoke           # the plumbing, on CPU

Each check passes, fails, or is skipped with its reason (a CUDA-only check on CPU); the exit status is 1 if one
fails. In the order they run:

stream_order      nvJPEG's hardware decoder writes its output when the call is made, whatever the stream's queue
                  (see clipalign.data.device_decode). Per iteration: tensors filled with known values on the
                  training stream, a ~100 ms `torch.cuda._sleep` queued, then one reduction per tensor queued behind
                  it, the tensors freed while their reductions wait, a batch decoded, and the reductions compared with
                  their known values. First with torchvision's `decode_jpeg` called on the training stream (the
                  control: on a GPU with the hardware decoder it should corrupt, which shows the harness can see
                  it), then through `DeviceDecoder` (must never corrupt). If the control never corrupts either, the
                  check says it is inconclusive on this GPU.
decode_pixels     the device path's pixels against the workers' (PIL) for the same JPEGs and crops: PSNR bounds as
                  in the CPU tests (photo-like 512 px JPEGs, drafted by PIL: min > 40 dB; 256 px ones: min > 36 dB)
decode_training   the same training twice, same seed and shards, `data.decode=workers` and `data.decode=device`
                  (ViT-B/32, batch 128, 200 steps, bf16; `--smoke`: the tiny ViT, 6 steps): the first step's losses
                  within 1 %, the curves within 5 % on average, no non-finite step. The device run also runs with
                  `train.sync_debug=true`:
sync_free         ... whose warnings name every host-device synchronisation inside its steps (log steps excepted);
                  the only one allowed is the decoder's own wait for its stream, before each decode call.
nonfinite         the training step's parts in this process (model, loss, fused AdamW, `NonfiniteGuard`): a NaN
                  loss on one step, an infinite gradient under a finite loss on the next; weights, both AdamW
                  moments and its step count must be bit-identical across them, and the next good step must update.
triton_configs    every autotune configuration of the fused InfoNCE kernels launched once against a float64 torch
                  reference (`clipalign.fused_infonce.check_every_config`).

Files: OUT/gpu_check.json (every result and the commands run), OUT/gpu_check.md (the rows for
docs/benchmarks.md), OUT/logs/ (each training's output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path[:0] = [str(REPO), str(TOOLS)]  # the project without an install, and the sibling benchmark's drawing

from benchmark_data import image_agreement, synthetic_photo  # noqa: E402

from clipalign.data.device_decode import DeviceDecoder, pack_batch, prepare_image  # noqa: E402
from clipalign.data.transforms import decode_image, train_transform  # noqa: E402
from clipalign.data.writer import image_to_bytes  # noqa: E402

SYNC_WARNING = "called a synchronizing CUDA operation"
# the Triton kernels against float64 torch, bf16 features (the CPU tests hold the interpreter to 1e-5 and 1e-2; the
# GPU's exp2 is an approximation and its accumulation order another)
TRITON_LSE_TOLERANCE, TRITON_GRAD_TOLERANCE = 1e-4, 2e-2
# host waits that are there on purpose: the decoder's wait for its own stream before each decode call
ALLOWED_SYNCS = ("clipalign/data/device_decode.py",)


class Skip(Exception):
    """A check that cannot run here (the reason is its message)."""


def _jpegs(count: int, short: int, seed: int = 0, aspect: float = 4 / 3) -> list[bytes]:
    """Photo-like JPEGs (the data benchmark's drawing), all of one size: baseline, 4:2:0, quality 90."""
    width, height = round(short * aspect), short
    return [image_to_bytes(synthetic_photo(width, height, seed + i), "jpg", quality=90) for i in range(count)]


def _packed(jpegs: list[bytes], image_size: int, crop_scale: float = 0.9) -> dict:
    """A `data.decode=device` batch of these JPEGs as a worker packs it, each crop seeded by its index."""
    transform = train_transform(image_size, crop_scale)
    items = []
    for i, data in enumerate(jpegs):
        torch.default_generator.manual_seed(i)
        items.append(prepare_image(data, image_size, crop_scale, transform))
    return pack_batch(items, image_size)


# ---- checks ------------------------------------------------------------------------------------------------------


def _sleep_cycles_per_ms() -> float:
    """`torch.cuda._sleep` takes GPU clock cycles: how many make a millisecond, timed on this GPU."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    torch.cuda._sleep(cycles)  # warm-up
    begin.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / begin.elapsed_time(end)


def check_stream_order(args: argparse.Namespace) -> dict:
    if args.device != "cuda":
        raise Skip("needs CUDA: nvJPEG and the caching allocator's streams")
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device("cuda")
    images = 4 if args.smoke else 8
    jpegs = _jpegs(images, 384, seed=100)
    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in _packed(jpegs, 224).items()}
    decoded_bytes = 3 * 384 * 512  # each decoded image: the victims are made the same size, so their blocks fit
    numel = decoded_bytes // 4
    decoder = DeviceDecoder(device)
    cycles = int(args.stall_ms * _sleep_cycles_per_ms())

    def control() -> None:
        decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)  # on the training stream, as torchvision allows

    def ours() -> None:
        decoder(batch)

    result = {"iterations": args.stream_iterations, "victims": images, "stall_ms": args.stall_ms,
              "backend": decoder.backend}
    for name, decode in (("control_torchvision_on_caller_stream", control), ("device_decoder", ours)):
        decode()  # warm-up: handles, first allocations
        torch.cuda.synchronize()
        corrupted = 0
        for _ in range(args.stream_iterations):
            victims = [torch.full((numel,), float(i + 1), device=device) for i in range(images)]
            torch.cuda._sleep(cycles)  # the training stream is busy
            sums = torch.stack([v.sum(dtype=torch.float64) for v in victims])  # queued behind the sleep
            del victims  # freed while their reductions still wait: the allocator may hand the blocks out at once
            decode()
            expected = torch.arange(1, images + 1, dtype=torch.float64) * numel
            corrupted += not torch.equal(sums.cpu(), expected)
        torch.cuda.synchronize()
        result[name] = corrupted
    result["status"] = ("fail" if result["device_decoder"] else
                        "pass" if result["control_torchvision_on_caller_stream"] else
                        "pass (inconclusive: the control did not corrupt on this GPU either)")
    return result


def check_decode_pixels(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    count = 8 if args.smoke else 64
    out = {}
    for short, bound in ((512, 40.0), (256, 36.0)):  # drafted by PIL at 224 px; decoded at full scale
        jpegs = _jpegs(count, short, seed=short)
        transform = train_transform(224, 0.9)
        workers = []
        for i, data in enumerate(jpegs):
            torch.default_generator.manual_seed(i)
            workers.append(transform(decode_image(data, 224)))
        images, skipped = DeviceDecoder(device)(_packed(jpegs, 224))
        quality = image_agreement(zip(workers, images.cpu()))
        worst = quality["psnr_min_db"]
        out[f"short_{short}"] = {**quality, "bound_db": bound, "skipped": skipped,
                                 "ok": not skipped and (worst is None or worst > bound)}
    out["status"] = "pass" if all(v["ok"] for v in out.values() if isinstance(v, dict)) else "fail"
    return out


def _train(args: argparse.Namespace, name: str, overrides: list[str]) -> tuple[list[dict], str, list[str]]:
    """One training run in a subprocess: its metrics lines, its output and the command."""
    run = Path(args.work) / name
    log = Path(args.out) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "clipalign.train", str(REPO / "recipes" / "quickstart.yaml"), *overrides,
           f"train.output_dir={run}", "train.log_with=none", "export.dir=", "eval.zeroshot=none",
           "eval.retrieval=none", "train.log_every=1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               PYTHONWARNINGS="default")  # every synchronising line once, whatever the filters say
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.train_timeout)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m], proc.stderr, cmd


def _data(args: argparse.Namespace) -> str:
    """The training shards: `--data`, or a synthetic set drawn here (224 px; the tiny model's 64 px in smoke)."""
    if args.data:
        return args.data
    from gpu_report import draw_shards

    size = 64 if args.smoke else 224
    samples = min(args.train_batch * args.train_steps, 20_000)  # exact passes: a smaller set is read again
    return draw_shards(Path(args.work) / "shards", samples, size, max(1, (os.cpu_count() or 2) - 2))


def sync_sites(stderr: str) -> list[str]:
    """The distinct `file:line` of the synchronisation warnings in a run's output."""
    sites = []
    for match in re.finditer(r"^(\S+):(\d+): UserWarning: " + re.escape(SYNC_WARNING), stderr, re.M):
        site = f"{match.group(1)}:{match.group(2)}"
        if site not in sites:
            sites.append(site)
    return sites


def check_decode_training(args: argparse.Namespace, shared: dict) -> dict:
    model = "tiny-vit-64" if args.smoke else args.train_model
    common = [f"data.train={_data(args)}", "data.synthetic=false", "data.resampled=false", "data.shuffle_buffer=256",
              f"data.batch_size={args.train_batch}", f"data.workers={args.workers}", f"model.name={model}",
              f"train.steps={args.train_steps}", f"train.precision={args.precision}", "train.seed=7",
              f"optim.warmup_steps={max(1, args.train_steps // 10)}"]
    workers, _, cmd_w = _train(args, "decode-workers", [*common, "data.decode=workers"])
    device, stderr, cmd_d = _train(args, "decode-device", [*common, "data.decode=device", "train.sync_debug=true"])
    shared["sync_stderr"] = stderr
    a, b = [m["loss"] for m in workers], [m["loss"] for m in device]
    if len(a) != len(b) or not a:
        raise RuntimeError(f"the runs logged {len(a)} and {len(b)} losses")
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]
    result = {"model": model, "steps": len(a), "first_step_rel_diff": rel[0], "mean_rel_diff": sum(rel) / len(rel),
              "max_rel_diff": max(rel), "final_loss": {"workers": a[-1], "device": b[-1]},
              "nonfinite_steps": {"workers": workers[-1]["nonfinite_steps"], "device": device[-1]["nonfinite_steps"]},
              "skipped": {"workers": workers[-1]["skipped"], "device": device[-1]["skipped"]},
              "decode_share": {"host": device[-1].get("decode"), "gpu": device[-1].get("decode_gpu")},
              "commands": [cmd_w, cmd_d]}
    ok = (rel[0] <= 0.01 and result["mean_rel_diff"] <= 0.05 and not any(result["nonfinite_steps"].values()))
    result["status"] = "pass" if ok else "fail"
    return result


def check_sync_free(args: argparse.Namespace, shared: dict) -> dict:
    if args.device != "cuda":
        raise Skip("needs CUDA (torch.cuda.set_sync_debug_mode)")
    if "sync_stderr" not in shared:
        raise Skip("decode_training did not run")
    sites = sync_sites(shared["sync_stderr"])
    unexpected = [s for s in sites if not any(allowed in s for allowed in ALLOWED_SYNCS)]
    return {"sites": sites, "unexpected": unexpected, "status": "fail" if unexpected else "pass"}


def check_nonfinite(args: argparse.Namespace) -> dict:
    from clipalign.config import ModelConfig
    from clipalign.loss import ContrastiveLoss
    from clipalign.model import create_model
    from clipalign.monitor import NonfiniteGuard
    from clipalign.optim import param_groups

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="tiny-vit-64" if args.smoke else args.train_model)).to(device).train()
    loss_fn = ContrastiveLoss()
    optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-3, fused=True)
    guard = NonfiniteGuard(optimizer, world=1, limit=5, run_dir=Path(args.work))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, model.image_size, model.image_size), dtype=torch.uint8, generator=gen)
    texts = model.tokenizer([f"a photo of thing {i}" for i in range(8)])
    images, texts = images.to(device), texts.to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step(number: int, poison: str = "") -> bool:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        if poison == "loss":
            loss = loss * float("nan")
        loss.backward()
        if poison == "grad":  # a gradient that overflowed while the loss stayed finite
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        update = guard.arm(guard.local_verdict(loss, model), number)
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return update

    def snapshot() -> dict:
        state = {f"w.{k}": v.detach().clone() for k, v in model.state_dict().items()}
        for i, p in enumerate(model.parameters()):
            for k, v in optimizer.state.get(p, {}).items():
                state[f"s{i}.{k}"] = v.detach().clone()
        return state

    step(1)
    before = snapshot()
    step(2, "loss")
    step(3, "grad")
    guard.check(wait=True)
    after = snapshot()
    unchanged = [k for k in before if not torch.equal(before[k], after[k])]
    step(4)
    guard.check(wait=True)
    moved = sum(not torch.equal(after[k], v) for k, v in snapshot().items() if k.startswith("w."))
    steps = {int(v.item()) for k, v in snapshot().items() if k.endswith(".step")}
    result = {"changed_by_skipped_steps": unchanged, "skipped_steps_counted": guard.total,
              "weights_moved_by_next_good_step": moved, "optimizer_step_counts": sorted(steps)}
    ok = not unchanged and guard.total == 2 and moved > 0 and steps == {2}
    result["status"] = "pass" if ok else "fail"
    return result


def check_triton_configs(args: argparse.Namespace) -> dict:
    if args.device != "cuda":
        raise Skip("needs CUDA (the kernels run on CPU only under Triton's interpreter: tests/test_fused_infonce.py)")
    from clipalign import fused_infonce

    if not fused_infonce.available():
        raise Skip("triton does not import here")
    rows = fused_infonce.check_every_config(torch.device("cuda"), dims=(512,), dtype=torch.bfloat16)
    for row in rows:  # launched, and as close to float64 as the CPU tests hold the interpreter (a little looser)
        row["within_tolerance"] = row["ok"] and all(
            error <= (TRITON_LSE_TOLERANCE if name.startswith("lse") else TRITON_GRAD_TOLERANCE)
            * row["max_abs_reference"][name] for name, error in row["max_abs_error"].items())
    kept = [r for r in rows if r["kept"]]
    failed = [r for r in kept if not r["within_tolerance"]]
    dropped_but_fine = [r for r in rows if not r["kept"] and r["ok"]]
    return {"configs": rows, "failed": len(failed), "kept": len(kept), "dropped_yet_launched": len(dropped_but_fine),
            "status": "fail" if failed or not kept else "pass"}


CHECKS: dict[str, Callable] = {
    "stream_order": check_stream_order,
    "decode_pixels": check_decode_pixels,
    "decode_training": check_decode_training,
    "sync_free": check_sync_free,
    "nonfinite": check_nonfinite,
    "triton_configs": check_triton_configs,
}


# ---- the report --------------------------------------------------------------------------------------------------


def markdown(results: dict[str, dict], env: dict) -> str:
    lines = [f"GPU check (`python3 tools/gpu_check.py`) on {env['device_name']}, torch {env['torch']}, "
             f"{env['date']}:", "", "| check | status | what was seen |", "| --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('status', '?')} | {_summary(name, r)} |")
    return "\n".join(lines) + "\n"


def _summary(name: str, r: dict) -> str:
    if "error" in r:
        return r["error"].splitlines()[-1][:200]
    if name == "stream_order" and "device_decoder" in r:
        return (f"corrupted iterations: control {r['control_torchvision_on_caller_stream']}/{r['iterations']}, "
                f"DeviceDecoder ({r['backend']}) {r['device_decoder']}/{r['iterations']}")
    if name == "decode_pixels":
        return "; ".join(f"{k}: PSNR min {v['psnr_min_db'] or 'identical'} (> {v['bound_db']})"
                         for k, v in r.items() if isinstance(v, dict))
    if name == "decode_training" and "mean_rel_diff" in r:
        return (f"{r['model']}, {r['steps']} steps: loss first step {r['first_step_rel_diff']:.2%} apart, mean "
                f"{r['mean_rel_diff']:.2%}, final {r['final_loss']['workers']:.4f} vs {r['final_loss']['device']:.4f}")
    if name == "sync_free" and "sites" in r:
        return f"synchronising lines: {', '.join(r['sites']) or 'none'}"
    if name == "nonfinite" and "changed_by_skipped_steps" in r:
        return (f"changed by the skipped steps: {len(r['changed_by_skipped_steps'])} tensors; skipped steps counted "
                f"{r['skipped_steps_counted']}; AdamW step counts {r['optimizer_step_counts']}")
    if name == "triton_configs" and "configs" in r:
        return (f"{len(r['configs'])} configurations launched; of the {r['kept']} the autotuner keeps on this GPU, "
                f"{r['failed']} failed; {r['dropped_yet_launched']} it drops launched anyway")
    return r.get("reason", "")


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "device": device, "cpus": os.cpu_count()}
    env["device_name"] = (torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available()
                          else f"CPU ({platform.processor() or platform.machine()})")
    return env


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and logs/")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="toy sizes: checks the plumbing on any device")
    p.add_argument("--only", nargs="*", default=[], choices=list(CHECKS), metavar="CHECK",
                   help=f"run only these checks ({', '.join(CHECKS)})")
    p.add_argument("--data", default="", help="training shards for decode_training (default: drawn here)")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--train-model", default="ViT-B-32")
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-timeout", type=float, default=240.0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--stream-iterations", type=int, default=20)
    p.add_argument("--stall-ms", type=float, default=100.0)
    args = p.parse_args(argv)
    if args.smoke:
        args.train_batch, args.train_steps, args.workers = 8, 6, min(args.workers, 1)
        args.stream_iterations, args.stall_ms = min(args.stream_iterations, 4), min(args.stall_ms, 20.0)
    if args.device == "cpu" and args.precision == "bf16" and args.smoke:
        args.precision = "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = None
    if not args.work:
        scratch = tempfile.TemporaryDirectory(prefix="clipalign-gpu-check-")
        args.work = scratch.name
    env = environment(args.device)
    print(f"gpu check on {env['device_name']}", flush=True)
    results: dict[str, dict] = {}
    shared: dict = {}
    for name, check in CHECKS.items():
        if args.only and name not in args.only:
            continue
        start = time.monotonic()
        try:
            takes_shared = name in ("decode_training", "sync_free")
            results[name] = check(args, shared) if takes_shared else check(args)
        except Skip as why:
            results[name] = {"status": "skipped", "reason": str(why)}
        except Exception as e:  # a check that breaks is a failed check, and the next one runs
            results[name] = {"status": "fail", "error": "".join(traceback.format_exception(e))[-3000:]}
        results[name]["seconds"] = round(time.monotonic() - start, 1)
        print(f"{name:16s} {results[name]['status']:12s} {results[name]['seconds']:6.1f} s  "
              f"{_summary(name, results[name])}", flush=True)
    report = {"environment": env, "argv": sys.argv if argv is None else argv, "checks": results}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(results, env)
    (out / "gpu_check.md").write_text(md)
    print(md, flush=True)
    if scratch is not None:
        scratch.cleanup()
    return 1 if any(r["status"] == "fail" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
