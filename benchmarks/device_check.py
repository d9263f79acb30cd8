"""One prepared check of a GPU machine (issue 15): is brainvq fast on it, and what limits it.

Every input is made here (synthetic brain-like slices and code maps at the ``config/ixi.yaml`` settings); nothing is
downloaded. The JSON is rewritten after every section, so a run cut off still reports what it measured, and a
section is skipped when too little of the deadline is left for it. Sections, in order:

- ``environment``: GPU, driver, torch and CUDA versions, commit.
- ``shards``: synthetic 256 px shards (the loader and end-to-end input), as the workflow writes them.
- ``vqvae_training``: the engine's own training step at IXI settings, eager and compiled: ms/step, slices/s,
  achieved TFLOP/s (torch's FLOP counter), peak memory, first-step (compile) time.
- ``host_syncs``: the lines of the VQ-VAE and prior steps that make the host wait (``torch.cuda.set_sync_debug_mode``).
- ``end_to_end``: loader slices/s at 0/8/14 workers, train -> kill -> resume, quantize, prior, sample on the shards.
- ``prior_training``: the PixelCNN step the same way, in maps/s.
- ``sampling``: maps/s at batch 64/256/1024 and a same-seed check.
- ``ddp``: a one-process NCCL DDP run of the VQ-VAE step with the quantizer's collectives switched on.
- ``oom``: the message a run gets when CUDA memory runs out (a subprocess with a capped memory fraction).

``--cpu-smoke`` runs every section at toy sizes on the CPU in well under 3 minutes (tests/test_device_check.py):
sections that need CUDA record ``"skipped": "no CUDA"`` and, where the code path exists on the CPU, its CPU result
under ``cpu_path``.

Usage (from the repository root): ``benchmarks/device_check.sh`` or ``benchmarks/device_check.sh --cpu-smoke``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.preprocess import git_state

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "shards", "vqvae_training", "host_syncs", "end_to_end", "prior_training", "sampling",
            "ddp", "oom")

# Reference: one H200, about 790 TFLOP/s dense bf16 (issue 15).
PEAK_BF16_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0}

PROFILES = {
    "gpu": {
        "deadline_s": 470, "out": "benchmarks/results/device_check-gpu.json", "vqvae": {}, "pixelcnn": {},
        "timed_steps": 20, "compile": True, "sample_batches": [64, 256, 1024], "loader_workers": [0, 8, 14],
        "loader_steps": 150, "scans": 16, "slices_per_scan": 128, "e2e_steps": 100, "e2e_checkpoint_every": 25,
        "e2e_prior_steps": 40, "e2e_sample_n": 256,
        # seconds a section needs at least; it is skipped when less of the deadline is left
        "needs_s": {"shards": 20, "vqvae_training": 60, "host_syncs": 10, "end_to_end": 60, "prior_training": 30,
                    "sampling": 20, "ddp": 15, "oom": 20},
    },
    "cpu-smoke": {
        "deadline_s": 150, "out": "results/bench/device_check-cpu.json",
        "vqvae": {"channels": [8, 16], "downsample": 4, "res_blocks": 1, "latent_dim": 8, "codebook_size": 32,
                  "batch_size": 8, "eval_batch_size": 16, "val_max_slices": 16},
        "pixelcnn": {"channels": 16, "layers": 2, "head_channels": 32, "cond_channels": 4, "batch_size": 16},
        "size": 32, "timed_steps": 3, "compile": False, "sample_batches": [2, 4], "loader_workers": [0, 2],
        "loader_steps": 20, "scans": 6, "slices_per_scan": 12, "e2e_steps": 40, "e2e_checkpoint_every": 10,
        "e2e_prior_steps": 4, "e2e_sample_n": 4,
        "needs_s": {"shards": 3, "vqvae_training": 5, "host_syncs": 3, "end_to_end": 30, "prior_training": 3,
                    "sampling": 3, "ddp": 3, "oom": 1},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (CI); under 3 minutes")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default: by mode)")
    parser.add_argument("--deadline-s", type=float, default=None, help="stop starting sections after this")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ helpers


class Check:
    """The run: its settings, device, deadline and results, written to ``out`` after every section."""

    def __init__(self, profile: dict, out: Path, cuda: bool, workdir: Path, command: str):
        self.profile, self.out, self.cuda, self.workdir = profile, out, cuda, workdir
        self.device = torch.device("cuda" if cuda else "cpu")
        self.started = time.perf_counter()
        self.results = {"benchmark": "device_check", "mode": "gpu" if cuda else "cpu-smoke", "command": command,
                        "git": git_state(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "deadline_s": profile["deadline_s"], "sections": {}}

    def left_s(self) -> float:
        return self.profile["deadline_s"] - (time.perf_counter() - self.started)

    def run(self, name: str, function) -> None:
        needs = self.profile["needs_s"].get(name, 0)
        started = time.perf_counter()
        if self.left_s() < needs:
            result = {"skipped": f"deadline: {self.left_s():.0f} s left, the section needs about {needs} s"}
        else:
            try:
                result = function(self)
            except Exception as error:  # a failed section is reported, and the next one still runs
                result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
        result["section_wall_s"] = round(time.perf_counter() - started, 2)
        self.results["sections"][name] = result
        self.write()
        print(f"[device_check] {name}: {time.perf_counter() - started:.1f} s "
              f"({'error' if 'error' in result else result.get('skipped', 'ok')})", file=sys.stderr, flush=True)

    def write(self) -> None:
        from brainvq.files import write_text_atomic

        self.results["total_wall_s"] = round(time.perf_counter() - self.started, 1)
        write_text_atomic(self.out, json.dumps(self.results, indent=2, default=str) + "\n")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def section_config(self, section: str, **overrides) -> dict:
        """Return the validated ``section`` of config/ixi.yaml with this mode's and ``overrides`` merged."""
        from brainvq.config import load_config

        settings = {**self.profile.get(section, {}), "device": self.device.type, **overrides}
        return load_config(REPO / "config" / "ixi.yaml", overrides={section: settings})[section]

    @property
    def image_size(self) -> int:
        return self.profile.get("size") or self.section_config_root()["preprocess"]["size"]

    def section_config_root(self) -> dict:
        from brainvq.config import load_config

        return load_config(REPO / "config" / "ixi.yaml")


def no_cuda(cpu_path: dict | None = None) -> dict:
    """The result of a CUDA-only section on the CPU, with what its code path gave on the CPU."""
    return {"skipped": "no CUDA", **({"cpu_path": cpu_path} if cpu_path is not None else {})}


def rounded(values: dict, digits: int = 3) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in values.items()}


# ------------------------------------------------------------------------------------------- environment


def environment(check: Check) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cudnn": None,
            "cuda_available": torch.cuda.is_available()}
    if check.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    return info


# ------------------------------------------------------------------------------------------------ shards


def write_synthetic_shards(check: Check) -> dict:
    """Write ``scans`` synthetic scans as slices files, split them by subject and write the workflow's shards."""
    from brainvq.demo import synthetic_brain_slices
    from brainvq.shards import write_shards, write_slices_h5

    p, size = check.profile, check.image_size
    slices_dir, shards_dir = check.workdir / "slices", check.workdir / "shards"
    slices_dir.mkdir()
    files, started = {}, time.perf_counter()
    for k in range(p["scans"]):
        images, masks = synthetic_brain_slices(p["slices_per_scan"], size, seed=k)
        scan = f"S{k:02d}"
        n = len(images)
        files[scan] = write_slices_h5(slices_dir / f"{scan}.h5", images.astype(np.float16), masks, [scan] * n,
                                      [scan] * n, range(n), np.linspace(0, 1, n),
                                      {"spacing_mm": 1.0, "size": size, "source": "synthetic", "config_hash": "dc",
                                       "split": ""})
    made = time.perf_counter() - started
    scans = sorted(files)
    split = pd.DataFrame({"scan": scans, "subject": scans, "session": "",
                          "split": ["test" if k < 2 else "train" for k in range(len(scans))],
                          "validation": [k == 2 for k in range(len(scans))]})
    split.to_csv(check.workdir / "split.csv", index=False)
    preprocess = check.section_config_root()["preprocess"]
    started = time.perf_counter()
    write_shards(split, files, shards_dir, preprocess["shard_size"], preprocess["dtype"],
                 {"spacing_mm": 1.0, "size": size, "source": "synthetic", "config_hash": "dc"},
                 preprocess["shard_compression"])
    return {"image_size": size, "slices": p["scans"] * p["slices_per_scan"], "scans": len(scans),
            "compression": preprocess["shard_compression"], "make_slices_s": round(made, 2),
            "write_shards_s": round(time.perf_counter() - started, 2)}


# -------------------------------------------------------------------------------------------- training steps


def vqvae_task(check: Check, **overrides):
    from brainvq.training import VQVAETask

    return VQVAETask(check.section_config("vqvae", **overrides), data=None)


def vqvae_batch(check: Check, task) -> torch.Tensor:
    from brainvq.demo import synthetic_brain_slices

    images, _ = synthetic_brain_slices(task.settings["batch_size"], check.image_size, seed=0)
    x = torch.from_numpy(images)[:, None].to(check.device)
    channels_last = task.settings["channels_last"] and check.cuda  # as the task itself decides
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def prior_task(check: Check):
    from brainvq.prior import CodeMaps, PriorTask

    vqvae = check.section_config("vqvae")
    k, side = vqvae["codebook_size"], check.image_size // vqvae["downsample"]
    rng = np.random.default_rng(0)
    n = 4 * check.section_config("pixelcnn")["batch_size"]
    maps = CodeMaps(rng.integers(0, k, (n, side, side)), rng.random(n).astype(np.float32), None,
                    np.array([f"S{i}" for i in range(n)]))
    return PriorTask(check.section_config("pixelcnn"), maps, maps, k, [])


def prior_batch(check: Check, task):
    from brainvq.prior import maps_on_device

    codes, positions, _ = maps_on_device(task.train, check.device)
    b = task.settings["batch_size"]
    return codes[:b], positions[:b], None


def optimizer_for(check: Check, task, model):
    from brainvq.engine import warmup_cosine

    s = task.settings
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"], fused=check.cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(s["warmup_steps"], s["steps"], s["final_lr_fraction"]))
    return optimizer, scheduler


def step_flops(check: Check, task, model, batch) -> int:
    """Return the FLOPs of one training step (forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from brainvq.engine import training_step

    optimizer, scheduler = optimizer_for(check, task, model)
    counter = FlopCounterMode(display=False)
    with counter:
        training_step(task, model, model, optimizer, scheduler, batch, 1, check.device)
    return int(counter.get_total_flops())


def timed_steps(check: Check, task, batch, compiled: bool, items: int) -> dict:
    """Build ``task``'s model, run one step (the first: compile, autotune), then ``timed_steps`` timed ones."""
    from brainvq.engine import training_step

    if check.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(task.settings["amp"])
    torch.manual_seed(0)
    model = task.build_model(check.device)
    flops = step_flops(check, task, model, batch)
    module = torch.compile(model) if compiled else model
    optimizer, scheduler = optimizer_for(check, task, model)
    check.sync()
    started = time.perf_counter()
    training_step(task, module, model, optimizer, scheduler, batch, 1, check.device)
    check.sync()
    first = time.perf_counter() - started
    steps, budget = check.profile["timed_steps"], max(5.0, check.left_s() / 6)
    started, done = time.perf_counter(), 0
    while done < steps and (done < 2 or time.perf_counter() - started < budget):
        numbers = training_step(task, module, model, optimizer, scheduler, batch, 2 + done, check.device)
        done += 1
    check.sync()
    per_step = (time.perf_counter() - started) / done
    result = {"compiled": compiled, "first_step_s": first, "timed_steps": done, "ms_per_step": 1000 * per_step,
              "items_per_s": items / per_step, "flops_per_step": flops, "achieved_tflops": flops / per_step / 1e12,
              "loss_finite": bool(torch.isfinite(numbers["loss"]).item())}
    if check.cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        if peak:
            result["fraction_of_dense_bf16_peak"] = result["achieved_tflops"] / peak
    return rounded(result, 4)


def vqvae_training(check: Check) -> dict:
    task = vqvae_task(check)
    batch = vqvae_batch(check, task)
    modes = [False, True] if check.profile["compile"] else [False]
    result = {"settings": {k: task.settings[k] for k in ("batch_size", "channels", "downsample", "codebook_size",
                                                          "amp", "channels_last")},
              "image_size": check.image_size}
    for compiled in modes:
        result["compiled" if compiled else "eager"] = timed_steps(check, task, batch, compiled,
                                                                   task.settings["batch_size"])
    if not check.profile["compile"]:
        result["compiled"] = {"skipped": "cpu-smoke: torch.compile is measured on the GPU only"}
    best = max((result[m] for m in ("eager", "compiled") if "ms_per_step" in result[m]),
               key=lambda r: r["items_per_s"])
    steps = task.settings["steps"]
    result["projected_training_budget_min"] = round(steps * best["ms_per_step"] / 60000, 1)
    return result


def prior_training(check: Check) -> dict:
    task = prior_task(check)
    batch = prior_batch(check, task)
    result = {"settings": {k: task.settings[k] for k in ("batch_size", "channels", "layers", "amp")},
              "map_size": list(task.train.map_size)}
    for compiled in ([False, True] if check.profile["compile"] else [False]):
        timing = timed_steps(check, task, batch, compiled, task.settings["batch_size"])
        timing["maps_per_s"] = timing.pop("items_per_s")
        result["compiled" if compiled else "eager"] = timing
    return result


# ------------------------------------------------------------------------------------------------ host syncs


@contextlib.contextmanager
def counted_host_reads():
    """Count, per brainvq file:line, the Tensor methods that read a value back to the host (CPU-visible syncs)."""
    package = str(REPO / "brainvq")
    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def counting(name, original):
        def method(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(package):
                site = f"{os.path.relpath(frame.f_code.co_filename, REPO)}:{frame.f_lineno} {name}"
                counts[site] = counts.get(site, 0) + 1
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def steps_with_syncs(check: Check, task, batch, steps: int = 3) -> dict:
    """Return the host waits of ``steps`` training steps after a first one: CUDA sync warnings on the GPU, counted
    host reads on the CPU."""
    from brainvq.engine import training_step

    model = task.build_model(check.device)
    optimizer, scheduler = optimizer_for(check, task, model)
    training_step(task, model, model, optimizer, scheduler, batch, 1, check.device)  # initialisation may read
    check.sync()
    if not check.cuda:
        with counted_host_reads() as counts:
            for step in range(steps):
                training_step(task, model, model, optimizer, scheduler, batch, 2 + step, check.device)
        return {"steps": steps, "host_reads": counts}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(steps):
                training_step(task, model, model, optimizer, scheduler, batch, 2 + step, check.device)
            check.sync()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for warning in caught:
        if "synchroniz" in str(warning.message):
            site = f"{os.path.relpath(warning.filename, REPO)}:{warning.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {"steps": steps, "sync_sites": sites}


def host_syncs(check: Check) -> dict:
    vqvae, prior = vqvae_task(check), prior_task(check)
    result = {"vqvae": steps_with_syncs(check, vqvae, vqvae_batch(check, vqvae)),
              "prior": steps_with_syncs(check, prior, prior_batch(check, prior))}
    return result if check.cuda else no_cuda(result)


# -------------------------------------------------------------------------------------------------- sampling


def sampling(check: Check) -> dict:
    from brainvq.prior import build_prior, start_from_unigram
    from brainvq.sampling import sample_codes

    task = prior_task(check)
    torch.manual_seed(0)
    prior = build_prior(task.kwargs, [], None, task.settings).to(check.device)
    start_from_unigram(prior, task.train.codes)
    result = {"map_size": list(task.train.map_size), "batches": {}}
    for batch in check.profile["sample_batches"]:
        if check.left_s() < 10:
            result["batches"][str(batch)] = {"skipped": "deadline"}
            continue
        positions = np.linspace(0.2, 0.8, batch)
        sample_codes(prior, positions[:2], seed=1, batch_size=2, device=check.device)  # warm-up
        check.sync()
        started = time.perf_counter()
        sample_codes(prior, positions, seed=0, batch_size=batch, device=check.device)
        seconds = time.perf_counter() - started
        result["batches"][str(batch)] = {"seconds": round(seconds, 3), "maps_per_s": round(batch / seconds, 2)}
    small = np.linspace(0.2, 0.8, 4)
    first, second = (sample_codes(prior, small, seed=7, batch_size=4, device=check.device) for _ in range(2))
    other = sample_codes(prior, small, seed=8, batch_size=4, device=check.device)
    result["same_seed_same_maps"] = bool(torch.equal(first, second))
    result["other_seed_other_maps"] = not bool(torch.equal(first, other))
    return result


# ------------------------------------------------------------------------------------------------------- DDP


def ddp(check: Check) -> dict:
    """One process joins a process group and trains the VQ-VAE through DDP, with the quantizer's collectives on
    (they are skipped in a one-process group otherwise; NCCL refuses two ranks on one GPU)."""
    import torch.distributed as dist

    import brainvq.models.quantizers as quantizers
    from brainvq.engine import _free_port, distributed_module, training_step

    backend = "nccl" if check.cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=check.device if check.cuda else None)
    was = quantizers._distributed
    real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast")}
    calls = dict.fromkeys(real, 0)

    def counted(name):
        def collective(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return collective

    try:
        # The quantizer skips its collectives in a one-process group; this makes it run them as with several.
        quantizers._distributed = lambda: True
        for name in real:
            setattr(dist, name, counted(name))
        task = vqvae_task(check)
        batch = vqvae_batch(check, task)
        model = task.build_model(check.device)
        module = distributed_module(model, check.device)
        optimizer, scheduler = optimizer_for(check, task, model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 4):
                numbers = training_step(task, module, model, optimizer, scheduler, batch, step, check.device)
            check.sync()
        messages = sorted({str(w.message)[:300] for w in caught})
        result = {"backend": backend, "steps": 3, "loss_finite": bool(torch.isfinite(numbers["loss"]).item()),
                  "collective_calls": calls, "warnings": messages,
                  "bucket_stride_warning": any("stride" in m for m in messages)}
    finally:
        quantizers._distributed = was
        for name, function in real.items():
            setattr(dist, name, function)
        dist.destroy_process_group()
    return result if check.cuda else no_cuda(result)


# -------------------------------------------------------------------------------------------------------- OOM

OOM_CHILD = """
import json, sys, torch
from brainvq.training import train_vqvae
torch.cuda.set_per_process_memory_fraction(0.02)
section, shards, split, out = json.loads(sys.argv[1])
try:
    train_vqvae(section, shards, split, out)
    print(json.dumps({"raised": None}))
except Exception as error:
    print(json.dumps({"raised": type(error).__name__, "message": str(error)}))
"""


def oom(check: Check) -> dict:
    if not check.cuda:
        return no_cuda()
    section = check.section_config("vqvae", batch_size=512, steps=2, workers=0)
    args = json.dumps([section, str(check.workdir / "shards"), str(check.workdir / "split.csv"),
                       str(check.workdir / "oom")])
    proc = subprocess.run([sys.executable, "-c", OOM_CHILD, args], capture_output=True, text=True, cwd=REPO,
                          timeout=max(10, min(90, check.left_s() - 5)), env=child_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"raised": None, "stderr": proc.stderr[-2000:]}
    result["names_the_setting"] = "vqvae.batch_size" in result.get("message", "")
    return result


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# ------------------------------------------------------------------------------------------------ end to end

TRAIN_CHILD = """
import json, sys
from brainvq.training import train_vqvae
section, shards, split, out = json.loads(sys.argv[1])
train_vqvae(section, shards, split, out)
"""


def loader_rates(check: Check) -> dict:
    """Slices/s of the training loader (shard batches into pinned memory, then the device) per worker count."""
    from brainvq.engine import StepBatchSampler
    from brainvq.shards import ShardDataset, shard_paths
    from brainvq.slice_reader import batch_loader

    dataset = ShardDataset(shard_paths(check.workdir / "shards", "train"))
    batch_size = check.section_config("vqvae")["batch_size"]
    rates = {}
    for workers in check.profile["loader_workers"]:
        if workers > (os.cpu_count() or 1):
            rates[str(workers)] = {"skipped": f"{os.cpu_count()} cores"}
            continue
        sampler = StepBatchSampler(len(dataset), batch_size, 0, 0, check.profile["loader_steps"])
        started, first, n = time.perf_counter(), None, 0
        for batch in batch_loader(dataset, sampler, workers, pin_memory=check.cuda):
            x = batch["image"].to(check.device, non_blocking=True)
            n += len(x)
            first = first or time.perf_counter() - started
            if time.perf_counter() - started > 20:
                break
        check.sync()
        rates[str(workers)] = {"slices_per_s": round(n / (time.perf_counter() - started), 1),
                               "first_batch_s": round(first, 3), "slices": n}
    dataset.close()
    return rates


def train_kill_resume(check: Check, section: dict, out: Path) -> dict:
    """Train in a child process, kill it (SIGKILL) once it has checkpointed, then resume here to the end."""
    from brainvq.engine import load_checkpoint
    from brainvq.training import train_vqvae

    shards, split = check.workdir / "shards", check.workdir / "split.csv"
    checkpoint = out / "checkpoints" / "last.pt"
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, json.dumps([section, str(shards), str(split),
                                                                              str(out)])],
                             cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not checkpoint.exists() and child.poll() is None and time.perf_counter() - started < check.left_s() / 2:
        time.sleep(0.005)
    killed = child.poll() is None
    if killed:
        child.send_signal(signal.SIGKILL)
    child.wait()
    if not checkpoint.exists():
        raise RuntimeError(f"the training child wrote no checkpoint (exit {child.returncode}): "
                           f"{child.stderr.read().decode()[-2000:]}")
    child.stderr.close()
    killed_at = int(load_checkpoint(checkpoint)["step"])
    first_run = time.perf_counter() - started
    started = time.perf_counter()
    train_vqvae(section, shards, split, out)
    history = pd.read_csv(out / "history.csv")
    return {"killed": killed, "checkpoint_step_at_kill": killed_at, "first_run_s": round(first_run, 2),
            "resumed_run_s": round(time.perf_counter() - started, 2), "steps": section["steps"],
            "finished": (out / "model.pt").exists(),
            "history_steps_unique": bool(history["step"].is_unique), "last_history_step": int(history["step"].max())}


def end_to_end(check: Check) -> dict:
    from brainvq.prior import load_prior, train_prior, training_maps
    from brainvq.quantize import write_codes
    from brainvq.sampling import decode_codes, sample_codes
    from brainvq.training import load_vqvae

    p, work = check.profile, check.workdir
    result = {"loader": loader_rates(check)}
    check.write()
    section = check.section_config("vqvae", steps=p["e2e_steps"], checkpoint_every=p["e2e_checkpoint_every"],
                                   val_every=p["e2e_checkpoint_every"], log_every=p["e2e_checkpoint_every"],
                                   warmup_steps=1, dead_code_steps=max(2, p["e2e_steps"] // 3),
                                   workers=min(8, os.cpu_count() or 1) if check.cuda else 0)
    result["train_kill_resume"] = train_kill_resume(check, section, work / "vqvae")
    started = time.perf_counter()
    index = write_codes(work / "vqvae" / "model.pt", work / "shards", work / "split.csv", work / "codes",
                        section["eval_batch_size"], check.device.type, section["workers"])
    seconds = time.perf_counter() - started
    result["quantize"] = {"slices": len(index), "seconds": round(seconds, 2), "slices_per_s": round(len(index) / seconds, 1)}
    train, val, classes = training_maps(work / "codes", work / "split.csv", None)
    prior_section = check.section_config("pixelcnn", steps=p["e2e_prior_steps"], warmup_steps=1,
                                         checkpoint_every=p["e2e_prior_steps"], val_every=p["e2e_prior_steps"],
                                         log_every=p["e2e_prior_steps"])
    started = time.perf_counter()
    summary = train_prior(train, val, prior_section, section["codebook_size"], classes, work / "prior", progress=False)
    result["prior"] = {"seconds": round(time.perf_counter() - started, 2), **rounded(summary, 4)}
    prior, vqvae = load_prior(work / "prior" / "model.pt", check.device), load_vqvae(work / "vqvae" / "model.pt",
                                                                                    check.device)
    sample = check.section_config("sample")
    started = time.perf_counter()
    codes = sample_codes(prior, np.linspace(0.2, 0.8, p["e2e_sample_n"]), seed=0, batch_size=p["e2e_sample_n"],
                         device=check.device, amp=sample["amp"])
    images = decode_codes(vqvae, codes, sample["batch_size"], check.device, sample["amp"])
    seconds = time.perf_counter() - started
    result["sample"] = {"maps": len(codes), "seconds": round(seconds, 2), "maps_per_s": round(len(codes) / seconds, 2),
                        "images_in_unit_range": bool(images.min() >= 0 and images.max() <= 1)}
    return result


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("[device_check] no CUDA device: run with --cpu-smoke for the CPU version", file=sys.stderr)
        raise SystemExit(2)
    profile = dict(PROFILES["gpu" if cuda else "cpu-smoke"])
    if args.deadline_s:
        profile["deadline_s"] = args.deadline_s
    out = args.out or REPO / profile["out"]
    command = " ".join(["benchmarks/device_check.sh", *(argv if argv is not None else sys.argv[1:])])
    if not cuda:
        # One thread: OpenMP threads that spin while the CI machine's cores are busy make toy steps 100x slower.
        torch.set_num_threads(1)
    functions = {"environment": environment, "shards": write_synthetic_shards, "vqvae_training": vqvae_training,
                 "host_syncs": host_syncs, "end_to_end": end_to_end, "prior_training": prior_training,
                 "sampling": sampling, "ddp": ddp, "oom": oom}
    with tempfile.TemporaryDirectory(prefix="brainvq-device-check-") as tmp:
        check = Check(profile, Path(out), cuda, Path(tmp), command)
        for name in SECTIONS:
            check.run(name, functions[name])
    return check.results


if __name__ == "__main__":
    main()
