#!/usr/bin/env python
"""The whole job on one GPU at SD v1.5 shape: ``realfake run`` (encode → finetune → generate → train → evaluate)
through Ray, on a random-weight SD v1.5 pipeline and a small generated dataset, with each stage measured.

* The model: SD v1.5's UNet, VAE and CLIP text/vision towers built from their configs with random weights
  (``bench_sampler.build_sd15_pipeline``; nothing is downloaded), saved in fp16 as a diffusers directory that
  ``model.pretrained`` names. Speed and memory do not depend on the weights.
* The data: ``--images`` train images (+ ``--val-per-class`` per class) of ``--size`` in ``--classes`` classes,
  generated (seeded shapes and colours per class), as an ImageFolder with a classes file.
* The run: a Ray cluster on this machine (started here, or ``--ray-address`` to join one), and ``python -m
  realfake_ray run`` as a separate driver attached to it, as a job on a cluster is; fp16 fine-tuning at the
  reference's batch of 8, generation at 2x with the stage's defaults, ResNet-50 for one epoch with AMP.
* Measured per stage: wall time (the stage's own), its throughput figures, the device's peak GPU memory while it
  ran (``nvidia-smi``, every 0.25 s; per process too where the driver reports processes), and for every Ray
  actor it started: when it was ready (constructor done) and when its first batch was done, from Ray's task
  events. Ray Train workers run their loop as one task: their first batch is not visible there.

Results: ``<out>/pipeline.json``, ``<out>/pipeline.md`` (a Markdown table for BENCHMARKS.md) and
``<out>/pipeline.log`` (the run's console). ``--dry-run``: the same code path on the CPU at tiny shapes (the
tiny architecture, 48x36 images, 2 fine-tuning steps): what the test suite runs so that this script cannot rot.

    python benchmarks/gpu_pipeline.py --out runs/gpu_pipeline            # on a GPU box (see gpu_pipeline.sh)
    python benchmarks/gpu_pipeline.py --dry-run --out /tmp/gp --work /tmp/gp-work
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("encode", "finetune", "generate", "train", "evaluate")
_STAGE_LINE = re.compile(r"\[realfake\] stage (\w+): (starting|done|skipped)")
_LAST_EPOCH_LINE = re.compile(r"\[train\] epoch (\d+)/\1\b")  # the classifier's last epoch: evaluation follows


# ------------------------------------------------------------------------------------------ inputs


def scale(dry_run: bool) -> dict:
    """Sizes of the run: the GPU check at SD v1.5 shape, or the dry run's tiny ones."""
    if dry_run:  # the classifier too: ResNet-50's CPU steps and evaluation cost minutes on 2 cores
        return {"resolution": 32, "size": (48, 36), "train_per_class": 6, "val_per_class": 2, "finetune_steps": 2,
                "finetune_batch": 4, "generate_batch": 8, "generate_steps": 4, "train_arch": "resnet_tiny",
                "train_image_size": 32, "train_batch": 16}
    return {"resolution": 512, "size": (512, 384), "train_per_class": 16, "val_per_class": 4, "finetune_steps": 30,
            "finetune_batch": 8, "generate_batch": 24, "generate_steps": 30, "train_arch": "resnet50",
            "train_image_size": 224, "train_batch": 32}


def make_dataset(root: Path, classes: int, train_per_class: int, val_per_class: int, size: tuple[int, int],
                 seed: int = 0) -> dict[str, str]:
    """An ImageFolder ``root/{train,val}/class_<k>/<i>.jpg`` of generated pictures (per class: one background hue
    and one shape kind, each image its own position, size and noise) and ``root/classes.json``; returns the paths.

    Example:
        >>> paths = make_dataset(Path("/tmp/ds"), 2, 3, 1, (48, 36))  # doctest: +SKIP
    """
    rng = np.random.default_rng(seed)
    width, height = size
    names = {}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            names[f"class_{k}"] = f"shape {k}"
            for i in range(count):
                path = folder / f"{i:04d}.jpg"
                if not path.exists():
                    _picture(rng, k, classes, width, height).save(path, quality=90)
    (root / "classes.json").write_text(json.dumps(names))
    return {"train": str(root / "train"), "val": str(root / "val"), "classes_file": str(root / "classes.json")}


def _picture(rng: np.random.Generator, k: int, classes: int, width: int, height: int) -> Image.Image:
    hue = np.array([255 * (k + 1) / (classes + 1), 160, 120 + 60 * (k % 2)])
    background = np.clip(hue + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        r = rng.uniform(0.08, 0.25) * min(width, height)
        box = [cx - r, cy - r, cx + r, cy + r]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse, draw.rectangle, draw.polygon)[k % 3](box if k % 3 < 2 else [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def make_model(directory: Path, dry_run: bool, device: str) -> str:
    """The random-weight pipeline as a diffusers directory (SD v1.5 architecture in fp16; tiny in fp32). The SD
    v1.5 one is built on the GPU in a child process, so that this process holds no CUDA memory during the run."""
    if (directory / "model_index.json").exists():
        return str(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if dry_run:
        from realfake_ray.models.tiny import save_random_tiny_pipeline

        save_random_tiny_pipeline(str(tmp))
    else:
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(target=_save_sd15, args=(str(tmp), device))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"[gpu_pipeline] building the SD v1.5 pipeline failed (exit code {child.exitcode})")
    os.replace(tmp, directory)
    return str(directory)


def _save_sd15(directory: str, device: str) -> None:
    import torch
    from bench_sampler import build_sd15_pipeline

    pipe = build_sd15_pipeline(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
        module.to(torch.float16)
    pipe.save_pretrained(directory, safe_serialization=True)


def run_config(model_dir: str, data: dict, s: dict, mult: int) -> dict:
    """The run's config: the reference settings where the stages have them (fp16 fine-tuning at batch 8 per GPU,
    UniPC 30 steps at 0.75 with CFG 2, ResNet-50 with AMP), sized to a short run."""
    return {
        "seed": 0,
        "model": {"pretrained": model_dir},
        "data": data,
        "caption": {"enabled": False},
        "encode": {"resolution": s["resolution"], "batch_size": 16, "dtype": "fp16"},
        "finetune": {"num_workers": 1, "batch_size": s["finetune_batch"], "max_steps": s["finetune_steps"],
                     "mixed_precision": "fp16", "checkpoint_every": s["finetune_steps"], "log_every": 10},
        "generate": {"mult": mult, "batch_size": s["generate_batch"], "steps": s["generate_steps"], "dtype": "fp16"},
        "train": {"arch": s["train_arch"], "image_size": s["train_image_size"], "epochs": 1, "batch_size": s["train_batch"],
                  "amp": True, "amp_dtype": "fp16", "num_workers": 1, "real_baseline": False},
        "evaluate": {"batch_size": 64, "max_samples": 100, "distribution_max_images": 256},
    }  # fmt: skip


# ----------------------------------------------------------------------------------- measurements


class GpuMemory:
    """``nvidia-smi`` sampled every ``interval_ms`` in the background: the device's used memory, and each
    compute process's (where the driver lists processes). Nothing (``available`` False) without nvidia-smi."""

    def __init__(self, interval_ms: int = 250):
        self.device: list[tuple[float, float]] = []  # (time, MiB used)
        self.process: list[tuple[float, int, float]] = []  # (time, pid, MiB)
        self.available = shutil.which("nvidia-smi") is not None
        self._procs: list[subprocess.Popen] = []
        if not self.available:
            return
        queries = (("--query-gpu=memory.used", self._on_device), ("--query-compute-apps=pid,used_memory", self._on_process))
        for query, handler in queries:
            proc = subprocess.Popen(["nvidia-smi", query, "--format=csv,noheader,nounits", f"-lms={interval_ms}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._procs.append(proc)
            threading.Thread(target=self._read, args=(proc, handler), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen, handler) -> None:
        for line in proc.stdout:
            try:
                handler(time.time(), [part.strip() for part in line.split(",")])
            except ValueError:  # a header or a "[N/A]" value
                continue

    def _on_device(self, now: float, parts: list[str]) -> None:
        self.device.append((now, float(parts[0])))

    def _on_process(self, now: float, parts: list[str]) -> None:
        self.process.append((now, int(parts[0]), float(parts[1])))

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
            proc.wait(5)

    def peak(self, start: float, end: float) -> dict:
        """Peak device GiB and per-process GiB in [start, end] (None: not measured)."""
        if not self.available:
            return {"device_gib": None, "per_process_gib": {}}
        window = [mib for t, mib in self.device if start <= t <= end]
        per: dict[int, float] = {}
        for t, pid, mib in self.process:
            if start <= t <= end:
                per[pid] = max(per.get(pid, 0.0), mib)
        return {"device_gib": round(max(window) / 1024, 2) if window else None,
                "per_process_gib": {str(pid): round(mib / 1024, 2) for pid, mib in sorted(per.items())}}


def actor_timings(tasks: list[dict], start_s: float, end_s: float) -> list[dict]:
    """Per Ray actor created in [start_s, end_s] (epoch seconds): its class, worker pid, and the seconds from the
    window's start at which it was created, ready (constructor done) and its first batch was done (its first
    method call ended). ``tasks``: Ray State API task records (``list_tasks(detail=True)``, as dicts).

    Example:
        >>> tasks = [{"type": "ACTOR_CREATION_TASK", "actor_id": "a", "func_or_class_name": "MapWorker(X)",
        ...           "worker_pid": 7, "start_time_ms": 11_000, "end_time_ms": 14_000},
        ...          {"type": "ACTOR_TASK", "actor_id": "a", "func_or_class_name": "MapWorker(X).submit",
        ...           "start_time_ms": 14_100, "end_time_ms": 16_500}]
        >>> actor_timings(tasks, 10.0, 20.0)
        [{'class': 'MapWorker(X)', 'pid': 7, 'created_s': 1.0, 'ready_s': 4.0, 'first_batch_done_s': 6.5}]
    """
    created = [t for t in tasks if t.get("type") == "ACTOR_CREATION_TASK" and t.get("start_time_ms")
               and start_s <= t["start_time_ms"] / 1e3 <= end_s]
    rows = []
    for creation in sorted(created, key=lambda t: t["start_time_ms"]):
        calls = [t["end_time_ms"] for t in tasks if t.get("type") == "ACTOR_TASK" and t.get("actor_id") == creation["actor_id"]
                 and t.get("end_time_ms")]
        at = lambda ms: round(ms / 1e3 - start_s, 2) if ms else None  # noqa: E731
        rows.append({"class": creation.get("func_or_class_name"), "pid": creation.get("worker_pid"),
                     "created_s": at(creation["start_time_ms"]), "ready_s": at(creation.get("end_time_ms")),
                     "first_batch_done_s": at(min(calls)) if calls else None})
    return rows


def stage_rates(report: dict, stage: str) -> list[dict]:
    """The throughput rows the run's report has for ``stage`` (``report.json``'s ``throughput``)."""
    return [{"rate": r["rate"], "unit": r["unit"]} for r in report.get("throughput", []) if r["stage"].split(" ")[0] == stage]


def stage_rows(report: dict, windows: dict, memory: GpuMemory, tasks: list[dict]) -> list[dict]:
    """One row per stage: wall (the stage's own timing), throughput, peak GPU memory, actors, and what the stage's
    own records say about its start: fine-tuning's time before its first step, generate's first images. When the
    train stage ran the evaluation (``evaluate_in_train`` window, see :meth:`Job.stage_windows`), the evaluate row
    is that part of it and the train row the rest."""
    rows = {}
    for stage in STAGES:
        timing = report.get("stages", {}).get(stage, {})
        rows[stage] = {"stage": stage, "wall_s": timing.get("seconds"), "skipped": timing.get("skipped"),
                       "rates": stage_rates(report, stage)}
    if "evaluate_in_train" in windows and rows["evaluate"]["skipped"] and rows["train"]["skipped"] is False:
        start, end = windows["evaluate_in_train"]
        windows = {**windows, "evaluate": (start, end)}
        rows["evaluate"] |= {"wall_s": round(end - start, 1), "skipped": False, "run_by": "train"}
        rows["train"]["wall_s"] = round(windows["train"][1] - windows["train"][0], 1)
    for stage, row in rows.items():
        if stage in windows:
            start, end = windows[stage]
            row |= {"peak_gpu": memory.peak(start, end), "actors": actor_timings(tasks, start, end)}
    finetune = report.get("finetune") or {}
    if finetune.get("wall_seconds") is not None:  # workers started, models loaded (and compiled, if so)
        rows["finetune"]["before_training_s"] = round(finetune["wall_seconds"] - finetune.get("train_seconds", 0.0), 2)
    timeline = (report.get("synthesis") or {}).get("timeline") or []
    rows["generate"]["first_images_written_s"] = next((p["t"] for p in timeline if p.get("images")), None)
    return list(rows.values())


# ------------------------------------------------------------------------------------------- the run


def start_ray(address: str | None):
    """Join ``address``, or start a cluster on this machine (all its CPUs and GPUs; the dashboard serves the
    State API); returns ``(GCS address, State API address)``."""
    import ray

    from realfake_ray._internal.cluster import init_ray, state_api_address
    from realfake_ray.config import RayConfig

    init_ray(RayConfig(address=address))
    return ray.get_runtime_context().gcs_address, state_api_address()


def ray_tasks(state_address: str, driver_pid: int) -> list[dict]:
    """Every task record of the job whose driver was process ``driver_pid`` (the ``realfake run`` subprocess)."""
    from ray.util.state import list_jobs, list_tasks

    jobs = [j.job_id for j in list_jobs(address=state_address) if j.driver_info and str(j.driver_info.pid) == str(driver_pid)]
    tasks = []
    for job in jobs:
        found = list_tasks(address=state_address, filters=[("job_id", "=", job)], detail=True, limit=10_000,
                           raise_on_missing_output=False)  # the State API's largest page
        tasks += [t if isinstance(t, dict) else t.__dict__ for t in found]
    return tasks


class Stopped(Exception):
    """A time limit's SIGTERM: the run is stopped, and what it measured so far is still written."""


class Job:
    """``python -m realfake_ray run`` attached to the cluster, its console teed to ``log_path``, with the epoch-second
    window of each stage from its ``[realfake] stage ...`` lines (a stage still running ends where it stopped)."""

    def __init__(self, config_path: Path, run_dir: Path, gcs: str, log_path: Path, extra: list[str]):
        self.cmd = [sys.executable, "-m", "realfake_ray", "run", "--config", str(config_path), "--out", str(run_dir),
                    "--set", f"ray.address={gcs}", *(a for item in extra for a in ("--set", item))]
        self.log_path = log_path
        self.windows: dict[str, list[float]] = {}
        self.last_epoch_at: float | None = None
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)

    def follow(self) -> int:
        """Stream the run's console until it ends; its exit code."""
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(self.cmd) + "\n")
            for line in self.proc.stdout:
                now = time.time()
                sys.stdout.write(line)
                log.write(f"{time.strftime('%H:%M:%S')} {line}")
                log.flush()
                match = _STAGE_LINE.search(line)
                if match:
                    stage, what = match.groups()
                    self.windows.setdefault(stage, [now, now])[0 if what == "starting" else 1] = now
                elif _LAST_EPOCH_LINE.search(line) and "train" in self.windows:
                    self.last_epoch_at = now
        return self.proc.wait()

    def stop(self) -> None:
        """End the run's driver if it still runs (stopped from outside); close the open stage's window."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        for window in self.windows.values():
            if window[1] == window[0]:
                window[1] = time.time()

    def stage_windows(self) -> dict[str, tuple[float, float]]:
        """Each stage's window. The train stage ends by evaluating its classifier (the evaluate stage then skips):
        its window is split at the last epoch's line into train and evaluate."""
        windows = {stage: tuple(w) for stage, w in self.windows.items()}
        if self.last_epoch_at is not None and "train" in windows:
            start, end = windows["train"]
            windows["train"], windows["evaluate_in_train"] = (start, self.last_epoch_at), (self.last_epoch_at, end)
        return windows


def _stopped(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process
    raise Stopped()


def machine() -> dict:
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("ray", "diffusers", "transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return info


def markdown(result: dict) -> str:
    """The results as a BENCHMARKS.md-ready section: machine, command, one row per stage, the actors."""
    m = result["machine"]
    lines = [f"Machine: {m.get('nvidia_smi') or m.get('gpu') or 'CPU only'}; {m['cpus']} CPUs; torch {m['torch']} "
             f"(CUDA {m['cuda']}), Ray {m['ray']}, diffusers {m['diffusers']}, transformers {m['transformers']}.",
             f"Run: {result['dataset']}; {'dry run (tiny shapes, CPU)' if result['dry_run'] else 'SD v1.5 architecture, random weights'}; "
             f"exit code {result['exit_code']}, {result['wall_s']:.0f} s in all.", "",
             "| stage | wall s | throughput | peak GPU GiB (device) | actors: ready / first batch done (s after the stage began) |",
             "| --- | ---: | --- | ---: | --- |"]
    for row in result["stages"]:
        rates = "; ".join(f"{r['rate']:g} {r['unit']}" for r in row["rates"]) or "-"
        peak = (row.get("peak_gpu") or {}).get("device_gib")
        actors = "; ".join(f"{a['class']}: {a['ready_s']} / {a['first_batch_done_s'] if a['first_batch_done_s'] is not None else '-'}"
                           for a in row.get("actors", [])) or "-"
        wall = f"{row['wall_s']:.1f}" if row.get("wall_s") is not None else "-"
        stage = f"{row['stage']} (run by {row['run_by']})" if row.get("run_by") else row["stage"]
        lines.append(f"| {stage} | {wall} | {rates} | {peak if peak is not None else '-'} | {actors} |")
    notes = [f"fine-tuning: {r['before_training_s']} s of the stage before its first step (workers, models)"
             for r in result["stages"] if r.get("before_training_s") is not None]
    notes += [f"generate: first images written {r['first_images_written_s']} s after its Ray work began"
              for r in result["stages"] if r.get("first_images_written_s") is not None]
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/gpu_pipeline", help="results folder (pipeline.json/.md/.log)")
    parser.add_argument("--work", default=None, help="model, data and run folder (default: /tmp/realfake-gpu-pipeline[-dry])")
    parser.add_argument("--dry-run", action="store_true", help="the same code path on the CPU at tiny shapes")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--mult", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra overrides of the run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    # A time limit's SIGTERM stops the run but still writes what it measured; then the cluster started here ends
    # with this process (Ray's exit handler) instead of holding the GPU for the next check.
    signal.signal(signal.SIGTERM, _stopped)
    out = Path(args.out)
    work = Path(args.work or f"/tmp/realfake-gpu-pipeline{'-dry' if args.dry_run else ''}")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    s = scale(args.dry_run)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    print(f"[gpu_pipeline] building the model and the dataset in {work}", flush=True)
    model_dir = make_model(work / "model", args.dry_run, device)
    data = make_dataset(work / "data", args.classes, s["train_per_class"], s["val_per_class"], s["size"])
    config = run_config(model_dir, data, s, args.mult)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # every check measures a run from scratch
    gcs, state_address = start_ray(args.ray_address)
    memory = GpuMemory()
    job = Job(config_path, run_dir, gcs, out / "pipeline.log", args.set)
    try:
        code = job.follow()
    except Stopped:
        code = "stopped by its time limit"
    finally:
        job.stop()
        memory.stop()
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    try:
        tasks = ray_tasks(state_address, job.proc.pid) if state_address else []
    except Exception as exc:  # the cluster went down with a time limit: the stages' own figures still count
        print(f"[gpu_pipeline] no Ray task events ({type(exc).__name__}: {exc}); actors not timed", flush=True)
        tasks = []
    result = {
        "machine": machine(), "dry_run": args.dry_run, "exit_code": code, "wall_s": round(time.time() - started, 1),
        "dataset": f"{args.classes} classes x {s['train_per_class']} train + {s['val_per_class']} val images of "
                   f"{s['size'][0]}x{s['size'][1]}, generated; mult {args.mult}",
        "config": config, "overrides": args.set, "stages": stage_rows(report, job.stage_windows(), memory, tasks),
        "generate_throughput_settings": (report.get("synthesis") or {}).get("throughput_settings"),
        "accuracy": report.get("accuracy"), "gpu_memory_samples": len(memory.device),
    }  # fmt: skip
    (out / "pipeline.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "pipeline.md").write_text(markdown(result))
    print("\n" + markdown(result), flush=True)
    if code != 0:
        raise SystemExit(f"[gpu_pipeline] realfake run: {code} (exit code); see {out / 'pipeline.log'}")
    return result


if __name__ == "__main__":
    main()
