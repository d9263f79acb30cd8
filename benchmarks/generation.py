"""Benchmark generation: every generation measure for a run's prior, for ablations of it and for controls that must
score badly, on a finished run (by default the demo: ``snakemake --cores 2`` first).

Usage:
    python -m benchmarks.generation --results results/demo --out results/bench/generation.json
    python -m benchmarks.generation --results results/demo --ablations undilated,dropout --steps 300

Each ablation retrains the prior on the run's code maps with the run's ``pixelcnn`` settings changed as named in
``ABLATIONS`` (``--steps`` overrides the step count of every retrained prior, for a quicker look), draws samples
with the run's ``sample`` settings (changed where the ablation says so) and is judged like the run's own samples
(``brainvq.evaluation.judge``). The controls are ``brainvq.evaluation.judge.CONTROLS``: shuffled code maps, uniform
random codes and 10 % exact copies of training maps mixed into the samples must score badly; training maps
(a prior that copies) must be flagged as copies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.prior import provenance
from brainvq.config import load_config
from brainvq.data import read_split
from brainvq.evaluation import EvaluationInputs, prior_scorer, vqvae_codebook_size
from brainvq.evaluation.generation import prior_section, run_judge
from brainvq.evaluation.inputs import evaluation_run
from brainvq.evaluation.judge import CONTROLS, control_code_maps, judge_samples, real_references
from brainvq.files import write_text_atomic
from brainvq.prior import load_prior, train_prior, training_maps
from brainvq.sampling import sample_codes
from brainvq.shards import shard_chunks
from brainvq.sources import get_source
from brainvq.training import load_vqvae

REPO = Path(__file__).resolve().parents[1]
# name -> (pixelcnn overrides, sample overrides, what it tests)
# Each must change something the default config sets otherwise (ablation_config refuses one that does not).
ABLATIONS = {
    "undilated": ({"dilations": [1]}, {}, "the old receptive field: each layer reaches kernel_size // 2"),
    "one_anchor": ({"position_anchors": 1}, {}, "one location-bias map for every axial level"),
    "dropout": ({"dropout": 0.1}, {}, "dropout 0.1 on the gated activations"),
    "top_p": ({}, {"top_p": 0.9}, "nucleus sampling, top_p 0.9"),
    "temperature": ({}, {"temperature": 0.8}, "sampling at temperature 0.8"),
    "temperature_one": ({}, {"temperature": 1.0}, "sampling at temperature 1 (the default until 0.9 did better)"),
    "half_steps": ({"steps": "half"}, {}, "half the training steps"),
    "third_steps": ({"steps": "third"}, {}, "a third of the training steps (500, the default until 1500 did better)"),
    "prior_seed": ({"seed": 1}, {}, "the default prior from another seed: how far the measures move by chance"),
    "sample_seed": ({}, {"seed": 1}, "the run's prior sampled from another seed: how far the measures move by chance"),
}
STEP_FACTORS = {"half": 1 / 2, "third": 1 / 3}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO / "results" / "demo", help="a finished run folder")
    parser.add_argument("--config", type=Path, help="the run's config file (default config/config.yaml)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "generation.json")
    parser.add_argument("--ablations", default=",".join(ABLATIONS),
                        help=f"comma-separated, among {', '.join(ABLATIONS)} (empty: none)")
    parser.add_argument("--steps", type=int, help="override pixelcnn.steps of every retrained prior")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def judged(judge, images, codes, positions) -> dict:
    metrics, _ = judge_samples(judge, images, np.asarray(codes, np.int64), np.asarray(positions))
    return metrics


class AblationError(ValueError):
    """An ablation changes nothing in the run's config: it would be the run's own prior under another name."""


def unchanged_settings(base: dict, overrides: dict) -> list[str]:
    """Return the keys of ``overrides`` whose value ``base`` already has (step factors always change)."""
    return [key for key, value in overrides.items() if base.get(key) == value]


def ablation_config(base: dict, overrides: dict, steps: int | None) -> dict:
    """Return the ``pixelcnn`` section of an ablation: ``base`` with ``overrides``, trained for ``steps`` (default
    the run's own), times a factor where the ablation names one (``"half"``, ``"third"``)."""
    config = {**base, **overrides, "device": "cpu"}
    factor = STEP_FACTORS.get(overrides.get("steps"), 1)
    config["steps"] = max(1, round((steps or base["steps"]) * factor))
    config["warmup_steps"] = min(config["warmup_steps"], config["steps"])
    return config


def ablation(run, judge, inputs: EvaluationInputs, config: dict, prior_overrides: dict, sample_overrides: dict,
             steps: int | None, run_prior=None) -> dict:
    """Retrain the prior with ``prior_overrides``, sample with ``sample_overrides``; return its measures.

    An ablation of sampling alone, at the run's own step count, samples ``run_prior`` (the run's prior) when given:
    retraining would only reproduce it.
    """
    unchanged = (unchanged_settings(config["pixelcnn"], prior_overrides)
                 + unchanged_settings(config["sample"], sample_overrides))
    if unchanged:
        raise AblationError(f"the run's config already sets {unchanged} as this ablation does; pick another ablation")
    pixelcnn = ablation_config(config["pixelcnn"], prior_overrides, steps)
    sample = {**config["sample"], **sample_overrides}
    if run_prior is not None and not prior_overrides and pixelcnn["steps"] == config["pixelcnn"]["steps"]:
        prior, classes = run_prior, list(getattr(run_prior, "label_classes", []))
        summary, train_seconds = {"reused": "the run's own prior (this ablation changes sampling only)"}, None
    else:
        prior, classes, summary, train_seconds = retrained_prior(run, inputs, pixelcnn)
    positions = run.samples["slice_position"]
    labels = [str(label) for label in run.samples["label"]] if classes else None
    start = time.perf_counter()
    codes = sample_codes(prior, positions, labels, sample["temperature"], sample["seed"], sample["batch_size"], "cpu",
                         sample["top_p"])
    sample_seconds = time.perf_counter() - start
    retrained = dataclasses.replace(run, prior=prior_scorer(prior, run.split))
    return {"pixelcnn_overrides": prior_overrides, "sample_overrides": sample_overrides, "steps": pixelcnn["steps"],
            "train_seconds": train_seconds, "sample_seconds": sample_seconds, "training": summary,
            "prior": prior_section(retrained)[0], **judged(judge, judge.decode(codes.numpy()), codes.numpy(), positions)}


def retrained_prior(run, inputs: EvaluationInputs, pixelcnn: dict):
    """Return (prior, label classes, training summary, training seconds) of a prior trained with ``pixelcnn``."""
    train, val, classes = training_maps(inputs.codes_dir, inputs.split_csv, pixelcnn["condition_label"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = train_prior(train, val, pixelcnn, run.codebook_size, classes, tmp, progress=False)
        train_seconds = time.perf_counter() - start
        return load_prior(Path(tmp) / "model.pt"), classes, summary, train_seconds


def table_row(name: str, entry: dict) -> dict:
    """Return the ablation table's row of one entry (prior, ablation or control)."""
    def get(*path):
        value = entry
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return {"name": name, "auroc_samples_vs_reconstructions": get("c2st", "samples_vs_reconstructions", "auroc"),
            "auroc_samples_vs_real": get("c2st", "samples_vs_real", "auroc"),
            "position_error": get("position_error", "samples"), "fd": get("features", "frechet_distance"),
            "precision": get("features", "precision"), "recall": get("features", "recall"),
            "copies_flagged": get("copies", "share_flagged"), "bits_per_code": get("prior", "bits_per_code"),
            "bits_over_per_location_unigram": get("prior", "bits_over_per_location_unigram")}


def main(argv=None) -> dict:
    args = parse_args(argv)
    opening = provenance("generation")  # the commit the measures ran from, not the one at the end
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    settings = config["evaluate"]
    results = args.results
    vqvae = load_vqvae(results / "vqvae" / "model.pt", "cpu")
    inputs = EvaluationInputs(results / "split.csv", results / "shards", results / "codes",
                              results / "samples" / "samples.h5")
    run_prior = load_prior(results / "prior" / "model.pt")
    scorer = prior_scorer(run_prior, read_split(inputs.split_csv))
    run = evaluation_run(inputs, vqvae, scorer, vqvae_codebook_size(vqvae, results, config["vqvae"]["bottleneck"]),
                         settings, get_source(config["dataset"]["source"]).defaults, torch.device("cpu"))
    start = time.perf_counter()
    judge = run_judge(run)
    samples = run.samples
    positions = samples["slice_position"]
    chunks = ((c["images"], c["slice_position"]) for c in shard_chunks(run.test_paths, with_masks=False))
    references, _ = real_references(judge, positions, chunks)
    entries = {"prior": {"prior": prior_section(run)[0],
                         **judged(judge, samples["images"], samples["codes"], positions)}}
    controls = {name: judged(judge, judge.decode(codes), codes, positions)
                for name, codes in control_code_maps(judge, samples["codes"], positions, CONTROLS).items()}
    judge_seconds = time.perf_counter() - start
    ablations = {}
    for name in [a for a in args.ablations.split(",") if a]:
        prior_overrides, sample_overrides, meaning = ABLATIONS[name]
        ablations[name] = {"meaning": meaning,
                           **ablation(run, judge, inputs, config, prior_overrides, sample_overrides, args.steps,
                                     run_prior)}
    report = {
        **opening,
        "run": str(results), "n_samples": int(len(positions)),
        "config": {"pixelcnn": config["pixelcnn"], "sample": config["sample"], "evaluate": settings},
        "references": references,
        "copy_thresholds": judge.copy_thresholds, "copy_calibration": judge.copy_calibration,
        "judge_seconds": judge_seconds,
        "prior": entries["prior"],
        "ablations": ablations,
        "controls": controls,
        "table": [table_row(name, entry) for name, entry in
                  [("prior", entries["prior"]), *ablations.items(),
                   *((f"control: {k}", v) for k, v in controls.items())]],
    }
    write_text_atomic(args.out, json.dumps(report, indent=2, default=float) + "\n")
    for row in report["table"]:
        print(json.dumps(row))
    return report


if __name__ == "__main__":
    main()
