"""Run folders with real, untrained model files (the formats train_vqvae and train_pixelcnn write), for the tests
of model bundles and brainvq.load_model that do not need trained weights.

Used by tests/test_bundle.py, test_inference.py and snakemake_helpers.py (a bundle for loading the apply rules).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from brainvq.bundle import run_description, untrained_bundle, write_bundle
from brainvq.config import validated_config
from brainvq.sources import get_source

TINY_MODELS = {
    "vqvae": {"channels": [8, 16], "codebook_size": 16, "latent_dim": 8, "downsample": 4},
    "pixelcnn": {"channels": 8, "layers": 2, "head_channels": 8, "cond_channels": 4},
    "preprocess": {"size": 32, "spacing_mm": 4.0},
}


def write_untrained_run(run_dir: Path, preprocess: dict | None = None, seed: int = 0) -> dict:
    """Write vqvae/model.pt and prior/model.pt (random weights), eval/metrics.json and split.csv into ``run_dir``,
    as a finished training run leaves them; return the validated config they were made with."""
    config = validated_config({**TINY_MODELS, "preprocess": {**TINY_MODELS["preprocess"], **(preprocess or {})}})
    models = untrained_bundle(run_dir / "untrained-models", config, seed=seed)
    for name in ("vqvae", "prior"):
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(models / f"{name}.pt", run_dir / name / "model.pt")
    shutil.rmtree(models)
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({
        "reconstruction": {"ssim_brain": {"over_scans": {"mean": 0.8, "median": 0.8, "p5": 0.7, "n": 2}}},
        "codebook": {"codebook_size": 16, "codes_used": 12, "usage_fraction": 0.75, "perplexity": 9.0},
        "n_test_scans": 2, "n_test_subjects": 2, "n_test_slices": 40}))
    pd.DataFrame({"scan": ["a", "b", "c"], "subject": ["a", "b", "c"], "session": "", "split": ["train", "train", "test"],
                  "validation": False}).to_csv(run_dir / "split.csv", index=False)
    (run_dir / "subjects.tsv").write_text("scan\tsubject\tsession\tpath\tformat\torientation\n")
    return config


def write_untrained_bundle(run_dir: Path, run: str = "untrained", preprocess: dict | None = None) -> Path:
    """Write an untrained run (see :func:`write_untrained_run`) and its bundle ``run_dir/model``; return that folder."""
    config = write_untrained_run(run_dir, preprocess)
    preprocess = get_source("demo").resolved_preprocess(config["preprocess"])  # as the workflow's rule passes it
    description = run_description(run_dir / "vqvae" / "model.pt", run_dir / "eval" / "metrics.json",
                                  run_dir / "split.csv", run, "demo", "<p>untrained test models</p>",
                                  preprocess, config["evaluate"]["anomaly_smoothing_fraction"])
    write_bundle(run_dir / "model", run_dir / "vqvae" / "model.pt", run_dir / "prior" / "model.pt", description)
    return run_dir / "model"
