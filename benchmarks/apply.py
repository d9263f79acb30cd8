"""Apply benchmark: seconds per scan to apply a trained model to a new scan on the CPU.

Per scan, as the apply workflow and ``brainvq.load_model`` do it: preprocess (read, RAS at spacing_mm,
skull strip, slices), encode, decode, anomaly scores, and both volumes put back on the input's own grid.
The scans are demo-cohort volumes at real IXI/OASIS geometry (NIfTI and Analyze). One scan is applied once
untimed first (torch's first calls). Wall and CPU seconds are both recorded.

The model is a finished run (``--model results/demo``) or, without one, untrained models of the architecture of
``--config`` (default config/config.yaml: 128 px slices): the time per scan does not depend on the weights.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.apply                          # untrained default models, 3 scans
    .venv/bin/python -m benchmarks.apply --model results/demo     # a trained run
    .venv/bin/python -m benchmarks.apply --quick                  # coarse volumes, 2 scans: checks it runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.preprocess import recorded_run, summary, timed

STAGES = ("preprocess", "encode", "decode", "anomaly_scores", "to_native_grid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a finished run folder or model bundle (default: untrained models of --config)")
    parser.add_argument("--config", type=Path, default=None, help="config whose architecture and preprocessing to use")
    parser.add_argument("--scans", type=int, default=3, help="scans to time (after one untimed warm-up)")
    parser.add_argument("--quick", action="store_true", help="coarse demo volumes and 2 scans, to check it runs")
    parser.add_argument("--out", type=Path, default=Path("results/bench/apply.json"), help="JSON to write")
    parser.add_argument("--seed", type=int, default=0, help="demo cohort seed")
    return parser.parse_args(argv)


def apply_timings(model, rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Apply ``model`` to each scan row (path, orientation); return wall and CPU seconds per stage and scan."""
    from brainvq.api import prepare_volume
    from brainvq.inference import ScanOutputs
    from brainvq.measures.anomaly import anomaly_score_maps

    timings = {stage: {"wall_s": [], "cpu_s": []} for stage in (*STAGES, "total")}
    sigma_px = model.manifest["anomaly_smoothing_fraction"] * model.settings["size"]
    for row in rows:
        prepared, *preprocess = timed(prepare_volume, row["path"], model.settings, row["orientation"] or None)
        codes, *encode = timed(model.encode_slices, prepared)
        reconstructions, *decode = timed(model.decode, codes)
        anomaly, *scores = timed(lambda: anomaly_score_maps(prepared.images, reconstructions, sigma_px)
                                 * prepared.masks)
        outputs = ScanOutputs(codes, reconstructions, anomaly.astype(np.float32), metrics=None)
        _, *native = timed(model.native_images, prepared, outputs)
        for stage, (wall, cpu) in zip(STAGES, (preprocess, encode, decode, scores, native)):
            timings[stage]["wall_s"].append(wall)
            timings[stage]["cpu_s"].append(cpu)
        timings["total"]["wall_s"].append(sum(timings[stage]["wall_s"][-1] for stage in STAGES))
        timings["total"]["cpu_s"].append(sum(timings[stage]["cpu_s"][-1] for stage in STAGES))
    return timings


def run_benchmark(args: argparse.Namespace, workdir: Path, log) -> dict:
    """Run the benchmark in ``workdir`` and return the results dict."""
    from brainvq.api import load_model
    from brainvq.bundle import untrained_bundle
    from brainvq.config import load_config
    from brainvq.demo import build_demo_cohort
    from brainvq.sources import get_source

    n_scans = 2 if args.quick else args.scans
    config = load_config(args.config, overrides={"dataset": {"source": "demo"}})
    model_path = args.model or untrained_bundle(workdir / "model", config)
    model = load_model(model_path, "cpu")
    raw_root = workdir / "raw"
    _, cohort_wall, _ = timed(build_demo_cohort, raw_root, n_scans + 1, args.seed, 0.5,
                              downsample=2 if args.quick else 1)
    source = get_source("demo")
    rows = sorted(source.find_rows(raw_root, source.discovery_settings(config)), key=lambda row: row["scan"])
    log(f"demo cohort: {len(rows)} volumes in {cohort_wall:.1f} s; model {model}")
    apply_timings(model, rows[:1])  # warm-up: torch's first calls
    timings = apply_timings(model, rows[1:])
    log(f"{timings['total']['wall_s']} s per scan (wall)")
    return {
        "settings": {"model": str(args.model) if args.model else f"untrained models of {args.config or 'config.yaml'}",
                     "quick": args.quick, "seed": args.seed, "scans": [row["scan"] for row in rows[1:]],
                     "preprocess": model.settings, "image_size": model.manifest["image_size"],
                     "codebook_size": model.manifest["codebook_size"], "device": "cpu",
                     "torch_threads": torch.get_num_threads(),
                     "demo_cohort_wall_s": round(cohort_wall, 2)},
        "seconds_per_scan": {stage: {"wall_s": summary(v["wall_s"]), "cpu_s": summary(v["cpu_s"])}
                             for stage, v in timings.items()},
        "per_scan_raw": timings,
        "notes": ("total = preprocess (read, RAS at spacing_mm, skull strip, slices) + encode + decode + anomaly "
                  "scores + both volumes (reconstruction, anomaly map) resampled onto the input's grid. Writing the "
                  "outputs and the per-slice metrics are not included. One untimed warm-up scan first. Untrained "
                  "models time the same as trained ones of their architecture."),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and write its JSON; return the results."""
    args = parse_args(argv)
    return recorded_run("apply", argv, args.out, lambda workdir, log: run_benchmark(args, workdir, log))


if __name__ == "__main__":
    main()
