"""The report's generation section: each generation measure next to its real reference and its controls, the
prior's bits per code next to its baselines, the sample grid (each sample beside its nearest training code map,
decoded) and the copy check.

Figures follow the look of ``brainvq.reporting`` (its ``STYLE`` and helpers are passed in by the caller).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

CONTROL_COLUMNS = {
    "training_maps": "training maps (a copying prior)",
    "shuffled_maps": "shuffled code maps",
    "uniform_codes": "uniform random codes",
    "copies_mixed": "10 % copies mixed in",
}
# (measure, path under generation/ for samples and controls, path of the real reference, can detect, cannot detect)
GENERATION_ROWS = (
    ("Two-sample AUROC, samples vs reconstructions", ("c2st", "samples_vs_reconstructions"), None,
     "Any difference between samples and decoded real code maps that a small CNN learns: the prior's failures "
     "alone (same decoder). 0.5 = indistinguishable. Test subjects are held out whole, so the CNN cannot score "
     "who the few test subjects are.",
     "Differences too subtle for a small CNN on this many slices (see the interval); copies score near 0.5."),
    ("Two-sample AUROC, samples vs real", ("c2st", "samples_vs_real"), ("c2st", "reconstructions_vs_real"),
     "Samples against real test slices: the prior's and the decoder's failures together.",
     "Which of the two is at fault (the reference is the decoder's own gap)."),
    ("Position error (MAE)", ("position_error", "samples"), ("position_error", "real"),
     "Anatomy at the wrong axial level, or at none (a regressor trained on training slices reads the level).",
     "Wrong texture or copies at the right level. Chance (the median's error) is given in the note."),
    ("FD, independent features", ("features", "frechet_distance"), ("features", "train_vs_test", "frechet_distance"),
     "A shift of the sample distribution in the position regressor's features (not the judged VQ-VAE's).",
     "What those features ignore; noisy at this sample size (compare with the real-vs-real reference)."),
    ("Precision (k-NN)", ("features", "precision"), ("features", "train_vs_test", "precision"),
     "Samples outside the real manifold (unrealistic samples).", "Missing variety (see recall)."),
    ("Recall (k-NN)", ("features", "recall"), ("features", "train_vs_test", "recall"),
     "Real slices no sample resembles (mode collapse).", "Unrealistic samples (see precision)."),
    ("Copies flagged", ("copies", "share_flagged"), ("copies", "real_test", "share_flagged"),
     "Samples within the Hamming or decoded-SSIM threshold of a training code map (calibrated on known copies).",
     "Copies of training slices made of quite different codes that also decode differently."),
    ("Nearest training map, Hamming (median)", ("copies", "nearest_hamming", "median"),
     ("copies", "real_test", "nearest_hamming", "median"),
     "How far samples are, in changed codes, from the closest training map at their position.",
     "Whether near maps are copies (see the thresholds)."),
    ("FD, VQ-VAE encoder features (old)", ("frechet_distance_vqvae", "samples_vs_test"),
     ("frechet_distance_vqvae", "train_vs_test"),
     "Shifts the judged VQ-VAE's own encoder can see.",
     "Anything that encoder maps to typical features: it scored blob-like samples as near-real."),
    ("Diversity, MS-SSIM between samples", ("diversity", "samples_mean_pairwise_ms_ssim"),
     ("diversity", "real_mean_pairwise_ms_ssim"), "Samples that are all alike (higher = less diverse).",
     "Realism: noise is very diverse."),
)
PRIOR_ROWS = (
    ("PixelCNN", "bits_per_code", "bits_per_code_brain"),
    ("uniform (log2 K)", "uniform_bits_per_code", ("brain", "uniform_bits_per_code")),
    ("global unigram", "unigram_bits_per_code", ("brain", "unigram_bits_per_code")),
    ("per-location unigram", "per_location_unigram_bits_per_code", ("brain", "per_location_unigram_bits_per_code")),
    ("per-location and position-bin unigram", "per_location_position_bin_unigram_bits_per_code",
     ("brain", "per_location_position_bin_unigram_bits_per_code")),
)


def _value(metrics: dict, path) -> object:
    value = metrics
    for key in (path,) if isinstance(path, str) else path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _cell(value, percent: bool = False) -> str:
    """Return a number for a table cell (a share as a percentage); an AUROC result as ``value [low, high]``."""
    if isinstance(value, dict) and "auroc" in value:
        if value["auroc"] is None:
            return "n/a"
        low, high = value.get("ci95") or (math.nan, math.nan)
        return f"{value['auroc']:.3f} [{low:.2f}, {high:.2f}]"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if percent:
        return f"{100 * value:.1f} %"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def generation_table(metrics: dict) -> pd.DataFrame:
    """Return one row per generation measure: the samples' value, its real reference, each control's value and
    what the measure can and cannot detect."""
    generation = metrics.get("generation", {})
    controls = generation.get("controls", {})
    rows = []
    for label, path, reference, can, cannot in GENERATION_ROWS:
        percent = path[-1] == "share_flagged"
        row = {"Measure": label, "Samples": _cell(_value(generation, path), percent),
               "Real reference": _cell(_value(generation, reference), percent) if reference else "—"}
        for name, column in CONTROL_COLUMNS.items():
            row[column] = _cell(_value(controls.get(name, {}), path), percent) if name in controls else "—"
        row["Can detect"], row["Cannot detect"] = can, cannot
        rows.append(row)
    return pd.DataFrame(rows)


def prior_table(metrics: dict) -> pd.DataFrame:
    """Return the PixelCNN's test bits per code next to its baselines, over whole maps and inside the mask."""
    prior = metrics.get("prior", {})
    return pd.DataFrame([{"Model": label, "bits/code, whole map": _cell(_value(prior, whole)),
                          "bits/code, inside the mask": _cell(_value(prior, brain))}
                         for label, whole, brain in PRIOR_ROWS])


def sample_grid_figure(arrays: dict, new_figure, image_axis, pairs_per_row: int = 8,
                       rows_per_position: int = 2) -> Figure:
    """Return the first ``pairs_per_row * rows_per_position`` samples of each slice position, each beside its
    nearest training code map, decoded; flagged copies are framed in red (the copy figure shows every sample)."""
    samples, neighbours = arrays["generation_samples"], arrays["generation_neighbours"]
    positions = np.round(arrays["generation_positions"], 3)
    groups = [np.flatnonzero(positions == p)[:pairs_per_row * rows_per_position] for p in np.unique(positions)]
    rows = [(group[start:start + pairs_per_row]) for group in groups for start in range(0, len(group), pairs_per_row)]
    fig = new_figure(0.95 * 2 * pairs_per_row, 1.05 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), 2 * pairs_per_row, squeeze=False)
    for r, members in enumerate(rows):
        for c in range(pairs_per_row):
            left, right = axes[r, 2 * c], axes[r, 2 * c + 1]
            if c >= len(members):
                left.axis("off")
                right.axis("off")
                continue
            k = members[c]
            image_axis(left, samples[k], f"sample {positions[k]:.2f}")
            image_axis(right, neighbours[k], f"H {arrays['generation_hamming'][k]:.2f} "
                                             f"S {arrays['generation_ssim'][k]:.2f}")
            if arrays["generation_flagged"][k]:
                for ax in (left, right):
                    for spine in ax.spines.values():
                        spine.set(visible=True, color="#d62728", linewidth=2)
    fig.suptitle(f"The first {pairs_per_row * rows_per_position} samples of each position (left of a pair, titled "
                 "with its slice position), each beside its nearest training code map decoded (right: Hamming "
                 "distance H, decoded SSIM S); copies framed red")
    return fig


def copies_figure(arrays: dict, thresholds: dict, new_figure) -> Figure:
    """Return each sample's and each matched real test map's nearest Hamming distance against its highest decoded
    SSIM to training maps, with the copy thresholds."""
    fig = new_figure(5.5, 3.4)
    ax = fig.subplots()
    ax.scatter(arrays["copies_real_hamming"], arrays["copies_real_ssim"], s=12, color="#2ca02c",
               label="real test maps (not copies)")
    ax.scatter(arrays["generation_hamming"], arrays["generation_ssim"], s=12, color="#1f77b4", label="samples")
    if thresholds:
        ax.axvline(thresholds["hamming"], color="#d62728", linestyle="--", label="copy thresholds")
        ax.axhline(thresholds["ssim"], color="#d62728", linestyle="--")
    ax.set_xlabel("Hamming distance to the nearest training map (share of codes)")
    ax.set_ylabel("highest SSIM to decoded training maps")
    ax.set_title("Copy check: flagged left of or above the dashed lines")
    ax.legend(loc="lower left")
    return fig
