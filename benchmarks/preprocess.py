"""Preprocessing benchmark: seconds per volume for each stage, and shard vs PNG-folder read throughput.

Runs the package's own stage functions on a few demo volumes (brainvq.demo), then reads the same
slices from HDF5 shards (ShardDataset) and from a folder of 8-bit PNG files (one per slice, as the
earlier Keras projects stored them). Wall and CPU seconds are both recorded: on a shared machine
the CPU seconds of a single-threaded stage are the steadier number.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.preprocess            # about 2 minutes on 2 idle cores
    .venv/bin/python -m benchmarks.preprocess --quick    # a tiny version, to check it runs
    .venv/bin/python -m benchmarks.preprocess --out results/bench/preprocess.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]

# Full run: real IXI/OASIS voxel geometry. Quick run: coarser raw volumes (the RAS grid after
# reorientation is the same 1 mm grid, so later stages cost about the same), BET on one volume.
PROFILES = {
    "full": {"n_subjects": 2, "downsample": 1, "n_bet": 2, "n_read_slices": 4096, "batch_size": 32},
    "quick": {"n_subjects": 2, "downsample": 2, "n_bet": 1, "n_read_slices": 512, "batch_size": 32},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: coarse volumes, BET on one, 512 read slices")
    parser.add_argument("--out", type=Path, default=Path("results/bench/preprocess.json"), help="JSON to write")
    parser.add_argument("--workdir", type=Path, default=None, help="keep intermediate files here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="demo cohort and read-order seed")
    parser.add_argument("--no-bet", action="store_true", help="skip the BET skull-strip timing (the slowest stage)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------- provenance


def machine_info() -> dict:
    """Return platform, CPU and library versions of this machine."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def git_state() -> dict:
    """Return the commit of the checkout and whether it has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def timed(function, *args, **kwargs) -> tuple[object, float, float]:
    """Return ``(result, wall seconds, CPU seconds of this process)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def summary(values: list[float]) -> dict:
    """Return mean/min/max of per-volume seconds (rounded), with the count."""
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(float(np.mean(values)), 4), "min": round(float(np.min(values)), 4),
            "max": round(float(np.max(values)), 4)}


# ------------------------------------------------------------------------------------------- stages


def stage_timings(raw_root: Path, slices_dir: Path, config: dict, n_bet: int, log) -> tuple[dict, pd.DataFrame]:
    """Run every preprocessing stage on each demo volume; return (per-stage timings, scans table).

    The slices files are written to ``slices_dir`` from the ``skull_strip: none`` brain (the default
    configuration); BET is timed on the first ``n_bet`` volumes only.
    """
    from brainvq.config import config_hash
    from brainvq.io import find_scans, load_volume
    from brainvq.preprocessing import reorient_to_ras, resample_isotropic, scan_slices, skull_strip
    from brainvq.shards import write_slices_h5
    from brainvq.sources import get_source

    settings = config["preprocess"]
    scans = find_scans(get_source("demo"), raw_root, config)
    stages = {name: {"wall_s": [], "cpu_s": []} for name in
              ("reorient", "skull_strip_none", "skull_strip_bet", "slice_normalise_downsample", "slice_file_write")}

    def record(name: str, wall: float, cpu: float) -> None:
        stages[name]["wall_s"].append(wall)
        stages[name]["cpu_s"].append(cpu)

    for k, row in enumerate(scans.to_dict("records")):
        def reorient():
            raw = load_volume(row["path"], row["orientation"] or None)
            return resample_isotropic(reorient_to_ras(raw), settings["spacing_mm"])

        ras, wall, cpu = timed(reorient)
        record("reorient", wall, cpu)
        (brain, mask), wall, cpu = timed(skull_strip, ras, "none")
        record("skull_strip_none", wall, cpu)
        if k < n_bet:
            _, wall, cpu = timed(skull_strip, ras, "bet", settings["bet_fractional_threshold"],
                                 settings["bet_iterations"])
            record("skull_strip_bet", wall, cpu)
        volume, mask_voxels = brain.get_fdata(dtype=np.float32), np.asarray(mask.dataobj) > 0
        result, wall, cpu = timed(scan_slices, volume, mask_voxels, settings)
        record("slice_normalise_downsample", wall, cpu)
        n = len(result["slice_index"])
        attrs = {"spacing_mm": settings["spacing_mm"], "size": settings["size"], "source": "demo",
                 "config_hash": config_hash(settings), "split": "", "excluded_reason": result["excluded_reason"],
                 "excluded_stage": result["excluded_stage"]}
        _, wall, cpu = timed(write_slices_h5, slices_dir / f"{row['scan']}.h5", result["images"], result["masks"],
                             [row["scan"]] * n, [row["subject"]] * n, result["slice_index"], result["slice_position"],
                             attrs)
        record("slice_file_write", wall, cpu)
        log(f"{row['scan']}: RAS {ras.shape}, {n} slices, reorient {stages['reorient']['wall_s'][-1]:.1f} s")
    return stages, scans


def slice_count(path: Path) -> int:
    """Return the number of slices in a slices/shard file."""
    with h5py.File(path, "r") as f:
        return int(f["scan"].shape[0])


def replicated_slice_files(slices_dir: Path, out_dir: Path, n_slices: int) -> dict[str, Path]:
    """Return scan -> slices file for copies of the benchmark scans (new scan and subject keys) holding
    at least ``n_slices`` slices in all, so read throughput is measured on a realistic number of slices."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(slices_dir.glob("*.h5"))
    files, total, copy = {}, 0, 0
    if not any(slice_count(source) for source in sources):
        raise RuntimeError(f"no slices in {slices_dir} to replicate; every benchmark volume was excluded")
    while total < n_slices:
        for source in sources:
            scan = f"{source.stem}R{copy:03d}"
            target = out_dir / f"{scan}.h5"
            shutil.copyfile(source, target)
            with h5py.File(target, "a") as f:
                n = f["scan"].shape[0]
                f["scan"][...] = np.array([scan] * n, dtype=object)
                f["subject"][...] = np.array([scan] * n, dtype=object)
            files[scan] = target
            total += n
        copy += 1
    return files


def shard_write_timing(slice_files: dict[str, Path], shards_dir: Path, config: dict) -> dict:
    """Split the scans by subject and time ``write_shards``; return seconds per volume and per 1000 slices."""
    from brainvq.config import config_hash
    from brainvq.data import subject_split
    from brainvq.shards import write_shards

    scans = pd.DataFrame({"scan": sorted(slice_files), "subject": sorted(slice_files), "session": ""})
    table = subject_split(scans, pd.DataFrame({"subject": scans["subject"], "session": ""}),
                          config["split"]["test_fraction"], config["split"]["val_fraction"], config["split"]["seed"])
    settings = config["preprocess"]
    attrs = {"spacing_mm": settings["spacing_mm"], "size": settings["size"], "source": "demo",
             "config_hash": config_hash(settings)}
    manifest, wall, cpu = timed(write_shards, table, slice_files, shards_dir, settings["shard_size"],
                                settings["dtype"], attrs, settings["shard_compression"])
    n_slices = sum(s["n_slices"] for s in manifest["splits"].values())
    return {"n_volumes": len(slice_files), "n_slices": n_slices, "n_shards": len(manifest["shards"]),
            "wall_s_per_volume": round(wall / len(slice_files), 4),
            "cpu_s_per_volume": round(cpu / len(slice_files), 4),
            "wall_s_per_1000_slices": round(1000 * wall / n_slices, 4)}


# --------------------------------------------------------------------------------------- read speed


def write_png_folder(shard_files: list[Path], png_dir: Path) -> list[Path]:
    """Write every slice of the shards as an 8-bit grayscale PNG; return the files in shard order."""
    from PIL import Image

    png_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in shard_files:
        with h5py.File(shard, "r") as f:
            images, scans, index = f["images"][()], f["scan"].asstr()[()], f["slice_index"][()]
        for image, scan, k in zip(images, scans, index):
            path = png_dir / f"{scan}_{int(k):03d}.png"
            Image.fromarray(np.round(np.asarray(image, np.float32) * 255).astype(np.uint8)).save(path)
            paths.append(path)
    return paths


class PngDataset:
    """Slices from a folder of PNG files, as ``{"image": (1, H, W) float32}`` (the Keras-era layout)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        import torch
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            array = np.asarray(image, dtype=np.float32) / 255.0
        return {"image": torch.from_numpy(array)[None]}


def getitem_rate(dataset, order: np.ndarray) -> float:
    """Return slices per second reading ``dataset[i]`` for ``i`` in ``order`` in this process."""
    start = time.perf_counter()
    for i in order:
        dataset[int(i)]
    return len(order) / (time.perf_counter() - start)


def loader_rates(dataset, batch_size: int, num_workers: int, seed: int) -> dict:
    """Return one shuffled DataLoader epoch's slices/s overall, its first-batch latency (worker start-up)
    and slices/s after the first batch."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return epoch_rates(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                                   num_workers=num_workers, generator=generator))


def epoch_rates(loader) -> dict:
    """Return slices/s over one pass of ``loader``, its first-batch latency and slices/s after the first batch."""
    start, first, n, n_first = time.perf_counter(), None, 0, 0
    for batch in loader:
        n += batch["image"].shape[0]
        if first is None:
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    return {"slices_per_s": round(n / (end - start), 1), "first_batch_s": round(first - start, 3),
            "after_first_batch_slices_per_s": round((n - n_first) / max(end - first, 1e-9), 1)}


def folder_bytes(paths) -> int:
    """Return the total size of ``paths`` in bytes."""
    return int(sum(Path(p).stat().st_size for p in paths))


def batch_loader_rates(dataset, batch_size: int, num_workers: int, seed: int) -> dict:
    """Return one shuffled epoch's slices/s through the training loader (whole batches read by the dataset)."""
    import torch

    from brainvq.slice_reader import batch_loader

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).numpy()
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return epoch_rates(batch_loader(dataset, batches, num_workers, pin_memory=False, seed=seed))


def resized_shards(shards: list[Path], out_dir: Path, size: int, compression: str, config: dict) -> list[Path]:
    """Return shards of the same slices at ``size`` px (bilinear), written by ``write_shards`` with ``compression``."""
    import torch.nn.functional as F

    from brainvq.shards import read_slice_metadata, write_shards, write_slices_h5

    slices_dir = out_dir / f"slices-{size}"
    slices_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, shard in enumerate(shards):
        meta = read_slice_metadata(shard)
        with h5py.File(shard, "r") as f:
            images, masks = f["images"][()].astype(np.float32), f["masks"][()]
        if images.shape[-1] != size:
            import torch

            images = F.interpolate(torch.from_numpy(images)[:, None], size=(size, size), mode="bilinear",
                                   align_corners=False)[:, 0].clamp(0, 1).numpy()
            masks = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=(size, size),
                                  mode="nearest")[:, 0].numpy() > 0.5
        name = f"part{k:03d}"
        files[name] = write_slices_h5(slices_dir / f"{name}.h5", images.astype(np.float16), masks, meta["scan"],
                                      meta["subject"], meta["slice_index"], meta["slice_position"],
                                      {"spacing_mm": 1.0, "size": size, "source": "demo", "config_hash": "bench",
                                       "split": ""})
    split = pd.DataFrame({"scan": list(files), "subject": list(files), "session": "", "split": "train",
                          "validation": False})
    split.loc[split.index[-1], "split"] = "test"
    out = out_dir / f"shards-{size}-{compression}"
    write_shards(split, files, out, config["preprocess"]["shard_size"], "float16",
                 {"spacing_mm": 1.0, "size": size, "source": "demo", "config_hash": "bench"}, compression)
    return sorted(out.glob("*.h5"))


def read_throughput(shards_dir: Path, workdir: Path, batch_size: int, seed: int, config: dict,
                    sizes: tuple[int, ...] = (128, 256)) -> dict:
    """Return slices/s reading the same slices from shards (uncompressed and gzip) and from 8-bit PNG files, at
    each of ``sizes`` px: per item in this process, and per shuffled epoch through a DataLoader with 0 and 2
    workers (shards: the training loader, whole batches; PNG: items collated)."""
    from brainvq.shards import ShardDataset, shard_paths

    source = shard_paths(shards_dir, "train") + shard_paths(shards_dir, "test")
    results = {"batch_size": batch_size}
    for size in sizes:
        shards = {c: resized_shards(source, workdir / "sized", size, c, config) for c in ("none", "gzip")}
        pngs = write_png_folder(shards["none"], workdir / f"png-{size}")
        datasets = {"hdf5_shards_uncompressed": ShardDataset(shards["none"]),
                    "hdf5_shards_gzip": ShardDataset(shards["gzip"]), "png_folder": PngDataset(pngs)}
        rng = np.random.default_rng(seed)
        n = len(pngs)
        at_size = {"n_slices": n, "image_shape": list(datasets["png_folder"][0]["image"].shape),
                   "bytes": {"hdf5_shards_uncompressed": folder_bytes(shards["none"]),
                             "hdf5_shards_gzip": folder_bytes(shards["gzip"]), "png_folder": folder_bytes(pngs)}}
        for name, dataset in datasets.items():
            getitem_rate(dataset, np.arange(n))  # untimed pass: same warm page cache and imports for every mode
            rates = {"random_getitem_slices_per_s": round(getitem_rate(dataset, rng.permutation(n)), 1)}
            for workers in (0, 2):
                rates[f"dataloader_workers{workers}"] = (
                    loader_rates(dataset, batch_size, workers, seed) if name == "png_folder"
                    else batch_loader_rates(dataset, batch_size, workers, seed))
            at_size[name] = rates
        for dataset in datasets.values():
            getattr(dataset, "close", lambda: None)()
        results[f"{size}px"] = at_size
    return results


# --------------------------------------------------------------------------------------------- main


def run_benchmark(args: argparse.Namespace, workdir: Path, log) -> dict:
    """Run the benchmark in ``workdir`` and return the results dict."""
    from brainvq.config import load_config
    from brainvq.demo import build_demo_cohort

    profile = PROFILES["quick" if args.quick else "full"]
    config = load_config(overrides={"dataset": {"source": "demo"}})
    n_bet = 0 if args.no_bet else profile["n_bet"]
    raw_root = workdir / "raw"
    _, cohort_wall, _ = timed(build_demo_cohort, raw_root, profile["n_subjects"], args.seed, 0.5,
                              downsample=profile["downsample"])
    log(f"demo cohort: {profile['n_subjects']} volumes in {cohort_wall:.1f} s")
    slices_dir = workdir / "slices"
    slices_dir.mkdir()
    stages, scans = stage_timings(raw_root, slices_dir, config, n_bet, log)
    shard_write = shard_write_timing({p.stem: p for p in sorted(slices_dir.glob("*.h5"))}, workdir / "shards",
                                     config)
    log(f"shard write: {shard_write['wall_s_per_volume']:.2f} s per volume")
    read_files = replicated_slice_files(slices_dir, workdir / "read_slices", profile["n_read_slices"])
    shard_write_timing(read_files, workdir / "read_shards", config)
    reads = read_throughput(workdir / "read_shards", workdir, profile["batch_size"], args.seed, config)
    for size in ("128px", "256px"):
        log(f"read {size}, 2 workers: " + ", ".join(
            f"{name} {reads[size][name]['dataloader_workers2']['slices_per_s']}"
            for name in ("hdf5_shards_uncompressed", "hdf5_shards_gzip", "png_folder")) + " slices/s")
    seconds_per_volume = {name: {"wall_s": summary(v["wall_s"]), "cpu_s": summary(v["cpu_s"])}
                          for name, v in stages.items()}
    seconds_per_volume["shard_write"] = {"wall_s": {"n": shard_write["n_volumes"],
                                                    "mean": shard_write["wall_s_per_volume"]},
                                         "cpu_s": {"n": shard_write["n_volumes"],
                                                   "mean": shard_write["cpu_s_per_volume"]}}
    return {
        "settings": {**profile, "quick": args.quick, "n_bet": n_bet, "seed": args.seed,
                     "volumes": list(scans["scan"]), "preprocess": config["preprocess"],
                     "demo_cohort_wall_s": round(cohort_wall, 2)},
        "seconds_per_volume": seconds_per_volume,
        "per_volume_raw": {name: v for name, v in stages.items()},
        "shard_write": shard_write,
        "read_throughput": reads,
        "notes": ("Files are read right after being written, after one untimed pass (warm page cache). "
                  "DataLoader slices_per_s includes worker start-up (first_batch_s); shards go through the "
                  "training loader (brainvq.slice_reader.batch_loader: whole batches), PNG files through a "
                  "DataLoader of items. PNG files are 8-bit (as the earlier Keras projects stored them); shards "
                  "hold float16, uncompressed (preprocess.shard_compression: none) or gzip (1, H, W) chunks; the "
                  "256 px slices are the 128 px ones resized (bilinear). "
                  "reorient includes reading the raw file; skull_strip_bet's first call includes numba compilation; "
                  "shard_write is write_shards over all volumes divided by their number."),
    }


def recorded_run(name: str, argv: list[str] | None, out: Path, run, workdir: Path | None = None) -> dict:
    """Run ``run(workdir, log)`` (in ``workdir``, else a temporary folder) and write its results to ``out`` with the
    benchmark's name, command, commit, machine, load and times; return them."""
    def log(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    started, started_utc = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = os.getloadavg()
    if workdir:
        workdir.mkdir(parents=True, exist_ok=False)
        results = run(workdir, log)
    else:
        with tempfile.TemporaryDirectory(prefix=f"brainvq-bench-{name}-") as tmp:
            results = run(Path(tmp), log)
    results = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{name}", *(argv or sys.argv[1:])]),
        "git": git_state(),
        "machine": machine_info(),
        "load_average_1min": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
        "started_utc": started_utc,
        "total_wall_s": round(time.perf_counter() - started, 1),
        **results,
    }
    from brainvq.files import write_text_atomic

    write_text_atomic(out, json.dumps(results, indent=2) + "\n")
    log(f"wrote {out} in {results['total_wall_s']} s")
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and write its JSON; return the results."""
    args = parse_args(argv)
    return recorded_run("preprocess", argv, args.out, lambda workdir, log: run_benchmark(args, workdir, log),
                        args.workdir)


if __name__ == "__main__":
    main()
