"""The one training loop of every model (VQ-VAE, PixelCNN prior, and those to come), read top to bottom.

A *task* says what is trained (:class:`Task`: the model, the loss terms of a batch, the validation, the data
and its fingerprint, what goes into the model file); :func:`train` does the rest the same way for all of them:
the processes (DDP from torchrun's or srun's environment), the identity check of the checkpoint, seeding,
AdamW with a warmup + cosine schedule, bf16 autocast and ``torch.compile`` on CUDA, the step-seeded batch order,
the NaN/inf and CUDA-memory guards, ``history.csv`` and atomic checkpoints.

Files under ``out_dir``: ``checkpoints/last.pt`` (every ``checkpoint_every`` steps: model, optimizer, scheduler,
RNG state, step and the run's identity), ``checkpoints/history.csv`` (one row per ``log_every`` steps, copied to
``history.csv`` at each checkpoint) and, at the end, ``model.pt``. A run killed and rerun ends with the same
weights as one never interrupted (on the CPU, bit for bit): the batch of a step depends on the seed and the step
alone, and the RNG state travels in the checkpoint.

The loop never waits for the device between two reading steps: losses, gradient norms and the task's numbers
stay on the device and are read every ``log_every`` steps, at validations and before each checkpoint.
"""

from __future__ import annotations

import atexit
import csv
import gc
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from brainvq.config import ConfigError
from brainvq.files import atomic_path
from brainvq.runtime import autocast_context, seed_everything, select_device

log = logging.getLogger(__name__)

# Settings that change speed or bookkeeping but not the trained weights: a checkpoint written under other values
# of these is resumed. (`amp` is not among them: bf16 changes the numbers on CUDA.)
RUNTIME_ONLY_KEYS = (
    "workers", "compile", "channels_last", "device", "gpus", "log_every", "val_every", "val_max_slices",
    "checkpoint_every", "eval_batch_size",
)
CHECKPOINT_FORMAT = 2
MODEL_FILE_FORMAT = 2
STALE_POLICIES = ("refuse", "archive")


class CheckpointError(RuntimeError):
    """A checkpoint or model file cannot be used: unreadable, of another format, or written under other settings."""


class EmptyTrainingSetError(RuntimeError):
    """No training items: no training subjects, or the data holds none of them."""


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN or infinite."""


class GpuMemoryError(RuntimeError):
    """CUDA ran out of memory."""


class Task(Protocol):
    """What :func:`train` needs to know about a model. ``settings`` is its validated config section, which must
    hold ``seed, lr, weight_decay, warmup_steps, steps, final_lr_fraction, batch_size, grad_clip, amp, compile,
    device, log_every, val_every, checkpoint_every``."""

    section: str  # the config section ("vqvae"): names the settings in the identity and in messages
    settings: dict
    history_fields: list[str]

    def fingerprint(self) -> dict:
        """What identifies the training data: a checkpoint of other data is never resumed."""

    def train_size(self) -> int:
        """Number of training items (the batch order walks seeded permutations of them)."""

    def build_model(self, device: torch.device) -> torch.nn.Module:
        """Return a fresh model on ``device`` (the global RNG is seeded just before)."""

    def batches(self, sampler: StepBatchSampler, device: torch.device) -> Iterable:
        """Yield this process's batch of each step of ``sampler``, on ``device``."""

    def forward(self, module: torch.nn.Module, batch):
        """Return the model's output for ``batch`` (called under bf16 autocast on CUDA when ``amp`` is on)."""

    def loss_terms(self, output, batch, step: int) -> tuple[dict, dict]:
        """Return (weighted loss terms summed into the loss, other numbers to log) from ``forward``'s output, in
        float32 outside autocast: tensors on the device (or Python numbers), never read on the host here."""

    def history_values(self, totals: dict, steps: int, slices_per_s: float) -> dict:
        """Return history entries from ``totals``: the sums over ``steps`` steps (host tensors) of ``loss``,
        ``grad_norm`` and the names :meth:`loss_terms` returns."""

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict:
        """Return validation entries for the history ({} without validation data)."""

    def model_file(self, model: torch.nn.Module, last_row: dict) -> dict:
        """Return what ``model.pt`` holds beside format, section, config, model and step."""

    def memory_hint(self) -> str:
        """Return the settings to lower when CUDA runs out of memory."""


# ------------------------------------------------------------------------------------------ batch order


class StepBatchSampler(Sampler):
    """Yields the batch indices of steps ``start_step + 1 .. stop_step`` (this process's share).

    The dataset is walked in epochs, each a permutation seeded by ``(seed, epoch)``; step ``s`` takes the
    global positions ``[(s-1)*B, s*B)`` of that endless sequence. The batch of a step therefore depends on
    the seed and the step only, so a resumed run sees exactly the batches an uninterrupted one would.

    Args:
        n: dataset size.
        batch_size: global batch size (all processes together).
        seed: seeds the epoch permutations.
        start_step: steps already done (0 for a fresh run).
        stop_step: last step.
        rank: this process; it takes the contiguous ``rank``-th share of each global batch.
        world_size: number of processes; must divide ``batch_size``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, stop_step: int,
                 rank: int = 0, world_size: int = 1):
        if n < 1:
            raise EmptyTrainingSetError("StepBatchSampler got an empty dataset")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world_size = rank, world_size
        self._epoch, self._order = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        """Return the order of the dataset in epoch ``epoch``."""
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._order

    def steps(self) -> range:
        return range(self.start_step + 1, self.stop_step + 1)

    def pieces(self, step: int) -> list[tuple[int, int, int]]:
        """Return this process's share of step ``step`` (1-based) as ``(epoch, start, stop)`` slices of the
        epoch permutations (two when the share crosses an epoch's end)."""
        share = self.batch_size // self.world_size
        first = (step - 1) * self.batch_size + self.rank * share
        last, out = first + share, []
        while first < last:
            epoch, offset = divmod(first, self.n)
            take = min(last - first, self.n - offset)
            out.append((epoch, offset, offset + take))
            first += take
        return out

    def batch(self, step: int) -> np.ndarray:
        """Return the dataset indices of this process's share of step ``step``."""
        return np.concatenate([self.permutation(epoch)[a:b] for epoch, a, b in self.pieces(step)])

    def __iter__(self):
        for step in self.steps():
            yield self.batch(step).tolist()

    def __len__(self) -> int:
        return max(self.stop_step - self.start_step, 0)


def device_batches(tensors: Sequence[torch.Tensor | None], sampler: StepBatchSampler, device: torch.device
                   ) -> Iterator[list[torch.Tensor | None]]:
    """Yield each step's rows of ``tensors`` (data already on ``device``; None passes through), in the order of
    ``sampler``. The indices are taken on the device from epoch permutations uploaded once per epoch, so no
    step copies from the host."""
    uploaded: dict[int, torch.Tensor] = {}
    for step in sampler.steps():
        pieces = sampler.pieces(step)
        uploaded = {epoch: order for epoch, order in uploaded.items() if epoch >= pieces[0][0]}
        for epoch, _, _ in pieces:
            if epoch not in uploaded:
                uploaded[epoch] = torch.from_numpy(sampler.permutation(epoch)).to(device)
        parts = [uploaded[epoch][a:b] for epoch, a, b in pieces]
        index = parts[0] if len(parts) == 1 else torch.cat(parts)
        yield [None if t is None else t[index] for t in tensors]


# ---------------------------------------------------------------------------------------------- schedule


def warmup_cosine(warmup_steps: int, total_steps: int, final_fraction: float = 0.0) -> Callable[[int], float]:
    """Return the LambdaLR factor: linear warmup from ~0 to 1, then cosine decay to ``final_fraction`` at
    ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ------------------------------------------------------------------------------ identity and checkpoints


def run_identity(section: str, settings: dict, fingerprint: dict) -> dict:
    """Return what a checkpoint must match to be resumed: the ``section`` settings less :data:`RUNTIME_ONLY_KEYS`,
    and the data's ``fingerprint``."""
    return {section: {k: v for k, v in settings.items() if k not in RUNTIME_ONLY_KEYS}, "data": fingerprint}


def differing_keys(saved: dict, expected: dict, prefix: str = "") -> list[str]:
    """Return the dotted keys whose values differ between two nested dicts, with both values."""
    keys = []
    for key in sorted(set(saved) | set(expected)):
        a, b = saved.get(key, "<missing>"), expected.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} (checkpoint: {a!r}, config: {b!r})")
    return keys


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Return a checkpoint or model file loaded with ``weights_only=True``.

    Raises:
        CheckpointError: when it cannot be read.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}. Delete it to start over.") from error


def resumable_checkpoint(checkpoint_dir: Path, identity: dict, stale: str = "refuse", move: bool = True
                         ) -> dict | None:
    """Return the checkpoint ``checkpoint_dir/last.pt`` when it was written under ``identity``, else None.

    This is the one staleness check. A checkpoint of another identity (other settings or data, another format,
    unreadable) is refused (``stale="refuse"``: CheckpointError naming the differing keys) or moved aside with its
    folder to ``<folder>-stale-N`` (``stale="archive"``, what the workflow does: a rerun after a kill resumes, one
    after a change of settings or inputs trains anew and keeps the old checkpoints). ``move=False`` decides
    without moving (the processes other than the first of a DDP run).
    """
    if stale not in STALE_POLICIES:
        raise ValueError(f"stale must be one of {STALE_POLICIES}, got {stale!r}")
    path = checkpoint_dir / "last.pt"
    if not path.exists():
        return None
    try:
        state = load_checkpoint(path)
        diff = [] if state.get("format") == CHECKPOINT_FORMAT else [
            f"format (checkpoint: {state.get('format')!r}, config: {CHECKPOINT_FORMAT})"]
        diff += differing_keys(state.get("config", {}), identity)
    except CheckpointError:
        if stale == "refuse":
            raise
        diff = ["unreadable"]
    if not diff:
        return state
    if stale == "refuse":
        raise CheckpointError(
            f"checkpoint {path} was written with another configuration; differing keys: " + "; ".join(diff)
            + ". Restore those settings, or delete the checkpoint to train from scratch."
        )
    n = 1
    while (archive := checkpoint_dir.with_name(f"{checkpoint_dir.name}-stale-{n}")).exists():
        n += 1
    if move:
        os.replace(checkpoint_dir, archive)
        log.warning("settings or inputs changed since the last checkpoint (%s): kept it as %s, training anew",
                    "; ".join(diff[:5]), archive)
    return None


def save_checkpoint_atomic(state: dict, path: str | Path) -> None:
    """Write ``state`` with torch.save to a temporary name, then rename, so a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_model_file(path: str | Path, section: str, rule: str) -> dict:
    """Return the ``model.pt`` of a ``section`` model (written by :func:`train`), loaded with ``weights_only``.

    Raises:
        CheckpointError: unreadable, of another format, or of another model; the message names ``rule`` to rerun.
    """
    state = load_checkpoint(path)
    if state.get("format") != MODEL_FILE_FORMAT or state.get("section") != section:
        raise CheckpointError(
            f"{path} is not a {section} model file of this brainvq (format {state.get('format')!r}, model "
            f"{state.get('section')!r}; expected format {MODEL_FILE_FORMAT}, {section!r}); re-run the {rule} rule"
        )
    return state


def rng_state() -> dict:
    """Return the torch RNG states (CPU and every CUDA device) as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


class HistoryWriter:
    """Append-only ``history.csv`` that stays consistent across resume (rows after the resume step are dropped).
    ``last`` is the last row (numbers as floats, empty fields as None)."""

    def __init__(self, path: str | Path, fieldnames: list[str], resume_step: int = 0):
        self.path = Path(path)
        self.fieldnames = fieldnames
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        # Rewritten atomically: a kill here must not lose the rows a resume keeps; rows are then appended.
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self.last = {k: float(v) if v != "" else None for k, v in kept[-1].items()} if kept else {}

    def write(self, row: dict) -> None:
        """Append one row (missing fields are left empty)."""
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fieldnames, extrasaction="ignore").writerow(row)
        self.last = {k: row.get(k) for k in self.fieldnames}

    def copy_to(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            shutil.copyfile(self.path, tmp)


# --------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world`` processes, on ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def process_layout(env=os.environ) -> tuple[int, int, int]:
    """Return (rank, world size, local rank) from the launcher's environment: ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` (torchrun, and the processes ``vqvae.gpus`` starts), else ``SLURM_PROCID``, ``SLURM_NTASKS``,
    ``SLURM_LOCALID`` of an srun task, else one process. (A batch script also carries ``SLURM_NTASKS`` but is one
    process; srun marks its tasks with ``SLURM_STEP_NUM_TASKS``, the tasks of that step.)"""
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _slurm_rendezvous() -> None:
    """Default MASTER_ADDR (the step's first node) and MASTER_PORT (from the job id) for srun-started ranks."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True).stdout.split()
        except (OSError, subprocess.CalledProcessError) as error:
            raise ConfigError(f"cannot find the first node of {nodes!r} ({error}); export MASTER_ADDR (a host "
                              "name of the first node) and MASTER_PORT before srun") from error
        os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000))


def joined_processes(device_preference: str) -> Processes:
    """Return this process's :class:`Processes`; with several processes, join their process group (once per
    process, left at exit, so one process may train several models): NCCL on CUDA (one device per local rank),
    gloo on the CPU."""
    rank, world, local_rank = process_layout()
    device = select_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            _slurm_rendezvous()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
        atexit.register(leave_process_group)
    return Processes(rank, world, device)


def leave_process_group() -> None:
    """Destroy the default process group once no DistributedDataParallel wrapper holds it any more.

    A wrapper left for the garbage collector (a reference cycle) keeps the group alive past
    ``destroy_process_group``; when it is freed later, its reducer destroys the Gloo group while holding the GIL,
    and the group's worker thread, waiting for that same GIL, never ends: the process hangs on exit (seen in a
    test's two-process run). Collecting first leaves the group's last reference to ``destroy_process_group``.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_file_of_stderr() -> str | None:
    """The file sys.stderr writes to when it is a real file (the rule's log), so spawned ranks can append."""
    name = getattr(sys.stderr, "name", None)
    return name if isinstance(name, str) and os.path.isfile(name) else None


def run_local_processes(n: int, setting: str, device_preference: str, target: Callable, args: tuple) -> None:
    """Run ``target(*args)`` in ``n`` local processes that set torchrun's variables (RANK, WORLD_SIZE, ...), so
    :func:`train` joins them into one DDP run; ``n == 1`` runs it here. ``setting`` names the config key (for
    messages)."""
    if n == 1:
        target(*args)
        return
    if process_layout()[1] > 1:
        raise ConfigError(f"{setting}={n} starts {n} processes, but this one is already one of a "
                          f"{process_layout()[1]}-process run (torchrun or srun); set {setting} to 1 there")
    if select_device(device_preference).type == "cuda" and torch.cuda.device_count() < n:
        raise ConfigError(f"{setting}={n} but {torch.cuda.device_count()} CUDA device(s) are visible; lower {setting}")
    spawn_args = (n, _free_port(), target, args, torch.get_num_threads(), _log_file_of_stderr())
    torch.multiprocessing.spawn(_local_process, args=spawn_args, nprocs=n, join=True)


def _local_process(rank: int, n: int, port: int, target: Callable, args: tuple, threads: int,
                   log_file: str | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, threads // n))
    handle = None
    if log_file and rank == 0:
        handle = open(log_file, "a")
        sys.stderr = handle
        logging.basicConfig(stream=handle, level=logging.INFO, force=True,
                            format=f"%(asctime)s %(levelname)s [rank {rank}] %(message)s")
    try:
        target(*args)
    finally:
        leave_process_group()
        if handle is not None:
            handle.close()


# ------------------------------------------------------------------------------------ device-side numbers


class RunningSums:
    """Sums of the per-step numbers since the last history row, kept on the device (no host sync per step)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.steps, self.slices = 0, 0
        self.clock, self.paused = time.perf_counter(), 0.0

    def add(self, values: dict, slices: int) -> None:
        for name, value in values.items():
            # A Python number (not a tensor) is added as it is: nothing to read back.
            value = value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1
        self.slices += slices

    def totals(self, processes: Processes) -> dict[str, torch.Tensor]:
        """Return the sums averaged over processes, on the host: the one read of the device between log steps."""
        device = processes.device
        parts = {k: torch.as_tensor(v, dtype=torch.float64, device=device) for k, v in self.sums.items()}
        flat = torch.cat([v.reshape(-1) for v in parts.values()]) if parts else torch.zeros(0, device=device)
        if processes.world > 1:
            dist.all_reduce(flat)
            flat /= processes.world
        values = flat.cpu().split([v.numel() for v in parts.values()])
        return {k: value.reshape(v.shape) for (k, v), value in zip(parts.items(), values)}

    def slices_per_s(self) -> float:
        return self.slices / max(time.perf_counter() - self.clock - self.paused, 1e-9)


def _grad_in_param_strides(param: torch.Tensor) -> Callable:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == param.stride():
            return grad
        return torch.empty_strided(param.shape, param.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)
    return hook


def distributed_module(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Return ``model`` wrapped for DDP (the process group must be joined)."""
    # A parameter with a size-1 dimension (a 1x1 convolution) has two valid stride patterns, and its gradient may
    # come back in the other one (channels_last or not); DDP then copies it into its bucket on every step and
    # warns "grad strides do not match bucket view strides". Laying the gradient out as the parameter avoids that.
    for param in model.parameters():
        if param.requires_grad and param.dim() > 1 and 1 in param.shape:
            param.register_hook(_grad_in_param_strides(param))
    # Gradients as views into the all-reduce buckets: no extra copy. A static graph lets a model have
    # parameters no loss reaches (the PixelCNN's last horizontal output) without a search every step.
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
        static_graph=True)


def training_step(task: Task, module: torch.nn.Module, model: torch.nn.Module, optimizer, scheduler, batch,
                  step: int, device: torch.device) -> dict:
    """Run one step of ``task`` (its loss terms, backward, clipped update) and return its numbers, left on the
    device: ``loss``, the terms, ``grad_norm`` and the task's numbers. Nothing here waits for the device.

    ``module`` is what runs forward (``model``, or it wrapped for DDP or compiled)."""
    s = task.settings
    with autocast_context(device, s["amp"]):
        output = task.forward(module, batch)
    terms, numbers = task.loss_terms(output, batch, step)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"] or math.inf)
    optimizer.step()
    scheduler.step()
    return {"loss": loss, **terms, "grad_norm": grad_norm, **numbers}


def _nonfinite_message(task: Task, totals: dict, step: int, last_read: int, checkpoint: Path) -> str:
    what = "loss" if not math.isfinite(float(totals["loss"])) else "gradient norm"
    when = f"at step {step}" if step == last_read + 1 else f"between steps {last_read + 1} and {step}"
    kept = (f"the last good checkpoint {checkpoint} is kept and a rerun resumes from it"
            if checkpoint.exists() else "no checkpoint was written yet")
    s = task.section
    return (f"training {what} became NaN/inf {when} (losses are read from the device every {s}.log_every steps "
            f"and before each checkpoint, so this is where it was noticed); {kept}. Lower {s}.lr, keep "
            f"{s}.grad_clip set, or set {s}.amp false (new settings start a new run: the workflow moves the old "
            "checkpoint aside; elsewhere delete it)")


# -------------------------------------------------------------------------------------------------- loop


def train(task: Task, out_dir: str | Path, stale: str = "refuse", stop_at_step: int | None = None,
          progress: bool = False) -> dict:
    """Train ``task``'s model from its last checkpoint under ``out_dir`` (or from scratch) to ``settings["steps"]``;
    write ``out_dir/model.pt`` and ``out_dir/history.csv`` (the first process).

    Args:
        task: what to train (:class:`Task`).
        out_dir: the model's output folder (``checkpoints/`` inside).
        stale: a checkpoint written under other settings or data is refused (``"refuse"``) or moved aside
            (``"archive"``); see :func:`resumable_checkpoint`.
        stop_at_step: stop after this step (checkpointed), without writing the model (time-boxed jobs).
        progress: show a tqdm bar on stderr.

    Returns:
        ``{"step": last step, "finished": bool, "history": the last history row}``.

    Raises:
        CheckpointError: the checkpoint is unreadable or of another identity (``stale="refuse"``).
        NonFiniteLossError: the loss diverged; the last good checkpoint is kept.
        GpuMemoryError: CUDA ran out of memory.
    """
    from tqdm import tqdm

    s, out_dir = task.settings, Path(out_dir)
    checkpoint = out_dir / "checkpoints" / "last.pt"
    procs = joined_processes(s["device"])
    device = procs.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
        # TF32 only where bf16 autocast already trades precision for speed; amp false keeps float32 exact.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(s["amp"])
    if s["batch_size"] % procs.world:
        raise ConfigError(f"{task.section}.batch_size={s['batch_size']} is not divisible by the {procs.world} "
                          "training processes (torchrun --nproc-per-node, srun --ntasks or vqvae.gpus)")

    # The identity of this run decides whether the checkpoint is resumed.
    identity = run_identity(task.section, s, task.fingerprint())
    state = resumable_checkpoint(checkpoint.parent, identity, stale, move=procs.main)
    procs.barrier()

    # Model, optimizer and schedule; the seed fixes the initial weights.
    seed_everything(s["seed"])
    model = task.build_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"],
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(s["warmup_steps"], s["steps"], s["final_lr_fraction"]))
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start = int(state["step"])
        log.info("resuming from %s at step %d", checkpoint, start)
    total = s["steps"]
    stop = total if stop_at_step is None else max(start, min(stop_at_step, total))
    history = HistoryWriter(checkpoint.parent / "history.csv", task.history_fields, start) if procs.main else None
    running = RunningSums()
    if state is not None:  # the steps since the last history row, so resumed rows equal uninterrupted ones
        running.sums = {k: v.to(device) for k, v in state["running"]["sums"].items()}
        running.steps = state["running"]["steps"]

    module = distributed_module(model, device) if procs.world > 1 else model
    if s["compile"]:
        module = torch.compile(module)
    sampler = StepBatchSampler(task.train_size(), s["batch_size"], s["seed"], start, stop, procs.rank, procs.world)
    log.info("training %s (%d parameters) on %s x%d: %d training items, steps %d..%d of %d", task.section,
             sum(p.numel() for p in model.parameters()), device, procs.world, task.train_size(), start, stop,
             total)
    bar = tqdm(total=total, initial=start, disable=not (progress and procs.main), file=sys.stderr,
               mininterval=5, ascii=True, desc=f"train {task.section}")
    last_read = step = start
    module.train()
    try:
        for step, batch in zip(sampler.steps(), task.batches(sampler, device)):
            running.add(training_step(task, module, model, optimizer, scheduler, batch, step, device),
                        s["batch_size"])
            bar.update(1)

            log_now = step % s["log_every"] == 0 or step == total
            validate_now = step % s["val_every"] == 0 or step == total
            checkpoint_now = step % s["checkpoint_every"] == 0 or step == stop
            if not (log_now or validate_now or checkpoint_now):
                continue
            # Read the device's numbers; stop on NaN/inf before anything is written.
            totals = running.totals(procs)
            if not (math.isfinite(float(totals["loss"])) and math.isfinite(float(totals["grad_norm"]))):
                raise NonFiniteLossError(_nonfinite_message(task, totals, step, last_read, checkpoint))
            last_read, busy_from, row = step, time.perf_counter(), {}
            if log_now:
                slices_per_s = running.slices_per_s()
                row.update(task.history_values(totals, running.steps, slices_per_s),
                           lr=scheduler.get_last_lr()[0], slices_per_s=slices_per_s)
                bar.set_postfix(loss=f"{float(totals['loss']) / running.steps:.4f}", refresh=False)
                running.restart()
            if validate_now and procs.main:
                validation = task.validate(model, device)
                row.update(validation)
                if validation:
                    log.info("step %d: %s", step, {k: round(v, 4) for k, v in validation.items()})
            if row and procs.main:
                history.write({"step": step, **row})
            if checkpoint_now:
                if procs.main:
                    save_checkpoint_atomic({
                        "format": CHECKPOINT_FORMAT, "config": identity, "step": step,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": rng_state(),
                        "running": {"sums": {} if log_now else totals, "steps": running.steps},
                    }, checkpoint)
                    history.copy_to(out_dir / "history.csv")
                procs.barrier()
            # Validation and checkpoints do not count against the training speed.
            running.paused += time.perf_counter() - max(busy_from, running.clock)
    except torch.OutOfMemoryError as error:
        raise GpuMemoryError(f"CUDA ran out of memory on {device}; {task.memory_hint()}") from error
    finally:
        bar.close()

    finished = stop == total
    if procs.main and finished:
        if start < total:
            log.info("finished step %d", step)
        history.copy_to(out_dir / "history.csv")
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_checkpoint_atomic({"format": MODEL_FILE_FORMAT, "section": task.section, "config": s,
                                "model": weights, "step": total, **task.model_file(model, history.last)},
                               out_dir / "model.pt")
    return {"step": stop, "finished": finished, "history": history.last if history else {}}
