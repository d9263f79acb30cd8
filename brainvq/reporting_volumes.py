"""The run report of a whole-volume run (``preprocess.dims: 3``): 3D reconstruction metrics (both SSIM windows),
codebook use, the SOM grid and the QC montages, rendered like the 2D report (``brainvq.reporting``'s figure style,
tables and provenance) into ``templates/report_volumes.html.j2``.

A 3D run has no prior, samples, probe or anomaly maps (those are 2D); the report says so, and shows the OASIS-1
3D study's table (``STUDY_RESULTS``) as the reference its numbers can be set against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from brainvq.files import write_bytes_atomic
from brainvq.reporting import (
    STYLE,
    TEMPLATES,
    RECONSTRUCTION_MEANINGS,
    ReportInputError,
    _image_axis,
    _new_figure,
    _no_data,
    codebook_usage_figure,
    formatted,
    git_commit,
    html_table,
    metric_value,
    montage_entries,
    page_basics,
    read_metrics,
    read_table,
    report_software_versions,
    software_rows,
    training_curves_figure,
    written_figures,
)

FIGURE_NAMES = ("training_curves", "reconstructions", "ssim_distribution", "codebook_usage", "som_grid")
VOLUME_METRIC_MEANINGS = {
    "ssim_gaussian": ("SSIM, Gaussian window", "3D SSIM, Gaussian window σ=1.5 voxels (11 per axis), data range 1 "
                                               "(skimage; the settings of brainvq's 2D SSIM); 1 = identical."),
    "ssim_uniform7": ("SSIM, uniform 7-voxel window", "3D SSIM, uniform 7×7×7 window with sample covariances "
                                                      "(skimage's defaults): the OASIS-1 3D study's SSIM."),
    # PSNR and MSE read as in the 2D report, over the volume and the mask's voxels.
    **{name: (label.replace("brain", "mask"),
              meaning.replace("whole slice", "whole volume").replace("brain-mask pixels", "the mask's voxels"))
       for name, (label, meaning) in RECONSTRUCTION_MEANINGS.items() if name.startswith(("psnr", "mse"))},
}
# The OASIS-1 3D study (validation figures; 256 codes of dimension 32; 128/23/28 subjects, 144x176x144 voxels).
STUDY_RESULTS = (
    ("VQ-VAE, AE weights + k-means init, encoder-output term (γe 0.8, γq 0.2)", 0.73, 22.3, "56/256"),
    ("SOM-VAE, rectangular grid, k-means init", 0.82, 24.1, "113/256"),
    ("SOM-VAE, toroidal grid", 0.82, 24.2, "90/256"),
    ("probabilistic SOM-VAE (Manduchi et al.), toroidal", 0.91, 27.0, "all (soft)"),
    ("plain autoencoder", 0.87, 25.5, "—"),
    ("VAE", 0.58, 20.1, "—"),
)
REGION_COLOURS = ("#d9d9d9", "#1f77b4", "#d62728", "#f2c744")  # background, dark, mid, bright
UNUSED_COLOUR = "#ffffff"


@dataclass
class VolumeReportInputs:
    """The files the report of a whole-volume run reads (see docs/architecture.md)."""

    metrics_json: Path
    per_scan_csv: Path
    figures_npz: Path
    vqvae_history: Path
    split_csv: Path
    excluded_csv: Path
    montages: list[Path] = field(default_factory=list)


def read_volume_figure_arrays(path: str | Path) -> dict:
    """Return eval/figures.npz of a whole-volume run as a dict of arrays.

    Raises:
        ReportInputError: when it cannot be read or holds no volume examples (a 2D run's file).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise ReportInputError(f"cannot read {path}: {error}; re-run the evaluate rule") from error
    if "examples_axial_original" not in arrays or "codebook_counts" not in arrays:
        raise ReportInputError(f"{path} holds no whole-volume examples; re-run the evaluate rule with preprocess.dims 3")
    return arrays


def volume_reconstruction_table(metrics: dict) -> pd.DataFrame:
    """Return the 3D reconstruction metrics: one row each, mean/median/5th percentile over scans and subjects."""
    rows = []
    for key, (label, meaning) in VOLUME_METRIC_MEANINGS.items():
        stats = metric_value(metrics, ("reconstruction", key)) or {}
        row = {"Metric": label, "metrics.json key": key}
        for unit, name in (("over_scans", "scans"), ("over_subjects", "subjects")):
            for stat, stat_name in (("mean", "mean"), ("median", "median"), ("p5", "5th pct")):
                row[f"{name}: {stat_name}"] = formatted((stats.get(unit) or {}).get(stat))
        row["Meaning"] = meaning
        rows.append(row)
    return pd.DataFrame(rows)


def codebook_table(metrics: dict) -> pd.DataFrame:
    """Return codebook use and, for a SOM, its grid measures, each with its value and meaning."""
    rows = [
        ("Codes used", ("codebook", "codes_used"), "int", "Distinct codes in the test code volumes."),
        ("Usage fraction", ("codebook", "usage_fraction"), "percent", "Codes used / codebook size."),
        ("Perplexity", ("codebook", "perplexity"), "float", "exp(entropy) of test code usage."),
        ("Embedding correlation, grid neighbours", ("som", "embedding_correlation", "neighbours"), "float",
         "Mean Pearson correlation of the embeddings of neighbouring SOM nodes."),
        ("Embedding correlation, non-neighbours", ("som", "embedding_correlation", "non_neighbours"), "float",
         "The same over every pair of nodes that are not neighbours: the control."),
        ("Region agreement, grid neighbours", ("som", "region_agreement", "neighbours"), "percent",
         "Neighbouring used codes whose majority tissue regions agree."),
        ("Region agreement, non-neighbours", ("som", "region_agreement", "non_neighbours"), "percent",
         "The same over pairs of used codes that are not neighbours: the control."),
        ("Region purity (mean)", ("som", "region_purity_mean"), "percent",
         "Share of a code's voxels in its majority region, averaged over used codes."),
    ]
    reason = metric_value(metrics, ("som", "reason"))
    table = []
    for label, path, kind, meaning in rows:
        value = formatted(metric_value(metrics, path), kind)
        if path[0] == "som" and reason:
            value += f" ({reason})"
        table.append({"Metric": label, "Value": value, "Meaning": meaning})
    return pd.DataFrame(table)


def study_table(metrics: dict, bottleneck: str) -> pd.DataFrame:
    """Return the OASIS-1 3D study's rows with this run's as the last row (its test-scan means)."""
    rows = [{"Model": model, "SSIM (uniform 7-voxel window)": ssim, "PSNR (dB)": psnr, "Codes used": codes}
            for model, ssim, psnr, codes in STUDY_RESULTS]
    usage = metrics.get("codebook", {})
    rows.append({
        "Model": f"this run: {bottleneck}",
        "SSIM (uniform 7-voxel window)": formatted(metric_value(metrics, ("reconstruction", "ssim_uniform7",
                                                                         "over_scans", "mean"))),
        "PSNR (dB)": formatted(metric_value(metrics, ("reconstruction", "psnr_db", "over_scans", "mean"))),
        "Codes used": f"{usage.get('codes_used', 'n/a')}/{usage.get('codebook_size', 'n/a')}",
    })
    return pd.DataFrame(rows)


def volume_examples_figure(arrays: dict):
    """Return the middle axial, coronal and sagittal planes of the original, the reconstruction and their absolute
    difference for the best, median and worst test volumes."""
    labels = arrays["examples_label"]
    planes = ("axial", "coronal", "sagittal")
    fig = _new_figure(13, 1.9 * len(labels) + 0.4)
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(len(labels), 9, squeeze=False)
        for row, label in enumerate(labels):
            scan = arrays["examples_scan"][row]
            for k, plane in enumerate(planes):
                original = arrays[f"examples_{plane}_original"][row]
                reconstruction = arrays[f"examples_{plane}_reconstruction"][row]
                title = f"{label}: {scan}\n{plane}" if k == 0 else plane
                _image_axis(axes[row, k], original, f"{title}, original")
                _image_axis(axes[row, 3 + k], reconstruction, f"{plane}, reconstruction")
                _image_axis(axes[row, 6 + k], np.abs(original - reconstruction), f"{plane}, |error|",
                            cmap="magma", vmin=0, vmax=0.5)
            axes[row, 3].set_ylabel(f"SSIM {arrays['examples_ssim_gaussian'][row]:.3f} (Gaussian), "
                                    f"{arrays['examples_ssim_uniform7'][row]:.3f} (uniform 7)", fontsize=7)
        fig.suptitle("Middle planes of the best, median and worst test volumes by Gaussian-window SSIM "
                     "(error shown on 0-0.5)")
    return fig


def volume_ssim_figure(per_scan: pd.DataFrame):
    """Return the distribution over test scans of both 3D SSIMs."""
    fig = _new_figure(5.5, 3)
    with matplotlib.rc_context(STYLE):
        ax = fig.subplots()
        if per_scan.empty or "ssim_gaussian" not in per_scan.columns:
            _no_data(ax, "no per-scan metrics")
            return fig
        for column, label in (("ssim_gaussian", "Gaussian window"), ("ssim_uniform7", "uniform 7-voxel window")):
            values = pd.to_numeric(per_scan[column], errors="coerce").dropna()
            ax.hist(values, bins=min(30, max(5, len(values) // 2)), alpha=0.6, label=f"{label} (mean {values.mean():.3f})")
        ax.set_xlabel("3D SSIM of a test volume (unitless)")
        ax.set_ylabel("test scans (count)")
        ax.set_title(f"Per-scan reconstruction quality (n = {len(per_scan)})")
        ax.legend(loc="upper left")
    return fig


def som_grid_figure(arrays: dict, metrics: dict):
    """Return the SOM grid with each node coloured by the tissue region it mostly covers (paler = less pure; white =
    unused), or a note when the bottleneck is not a SOM."""
    fig = _new_figure(6.5, 5)
    with matplotlib.rc_context(STYLE):
        ax = fig.subplots()
        if "som_region" not in arrays:
            _no_data(ax, f"no SOM grid: {metric_value(metrics, ('som', 'reason')) or 'the bottleneck is not som'}")
            return fig
        rows, columns = (int(n) for n in arrays["som_grid"])
        names = [str(name) for name in arrays["som_region_names"]]
        region = arrays["som_region"].reshape(rows, columns)
        purity = np.nan_to_num(arrays["som_purity"], nan=1.0).reshape(rows, columns)
        colours = ListedColormap([UNUSED_COLOUR, *REGION_COLOURS[:len(names)]])
        ax.imshow(region + 1, cmap=colours, vmin=0, vmax=len(names), alpha=np.clip(purity, 0.25, 1.0))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        handles = [Patch(color=colour, label=name) for colour, name in zip(REGION_COLOURS, names)]
        handles.append(Patch(facecolor=UNUSED_COLOUR, edgecolor="0.6", label="unused"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
        correlation = metric_value(metrics, ("som", "embedding_correlation")) or {}
        ax.set_title(f"SOM {rows}x{columns} ({metric_value(metrics, ('som', 'topology'))}): majority tissue region\n"
                     f"embedding correlation: neighbours {formatted(correlation.get('neighbours'))}, "
                     f"non-neighbours {formatted(correlation.get('non_neighbours'))}", fontsize=8)
    return fig


def volume_report_figures(metrics: dict, arrays: dict, per_scan: pd.DataFrame, history: pd.DataFrame) -> dict:
    """Return every figure of the whole-volume report by name (``FIGURE_NAMES``)."""
    return {
        "training_curves": training_curves_figure({"vqvae": history}),
        "reconstructions": volume_examples_figure(arrays),
        "ssim_distribution": volume_ssim_figure(per_scan),
        "codebook_usage": codebook_usage_figure(arrays["codebook_counts"], metrics.get("codebook", {})),
        "som_grid": som_grid_figure(arrays, metrics),
    }


def run_summary(config: dict, split_df: pd.DataFrame, excluded: pd.DataFrame, metrics: dict) -> list[tuple[str, str]]:
    """Return the (label, value) pairs at the top of the report."""
    def count(split: str, column: str) -> int:
        if split_df.empty or column not in split_df.columns:
            return 0
        return int(split_df.loc[split_df["split"] == split, column].nunique())

    preprocess, vqvae = config.get("preprocess", {}), config.get("vqvae", {})
    shape = metrics.get("volume_shape") or []
    return [
        ("Run", str(config.get("run"))),
        ("Dataset", str(config.get("dataset", {}).get("source"))),
        ("Training subjects (scans)", f"{count('train', 'subject')} ({count('train', 'scan')})"),
        ("Test subjects (scans)", f"{metrics.get('n_test_subjects', 'n/a')} ({metrics.get('n_test_scans', 'n/a')})"),
        ("Excluded scans", str(len(excluded))),
        ("Volumes", f"{' x '.join(map(str, shape))} voxels (z, y, x) of {preprocess.get('spacing_mm')} mm, box "
                    f"{preprocess.get('box_mm')} mm (x, y, z)"),
        ("Bottleneck", f"{vqvae.get('bottleneck')}, {metric_value(metrics, ('codebook', 'codebook_size'))} codes, "
                       f"downsampling {vqvae.get('downsample')} per axis"),
        ("SSIM, Gaussian / uniform 7-voxel window (mean over test scans)",
         " / ".join(formatted(metric_value(metrics, ("reconstruction", key, "over_scans", "mean")))
                    for key in ("ssim_gaussian", "ssim_uniform7"))),
    ]


def build_volume_report(inputs: VolumeReportInputs, config: dict, html_path: str | Path, figures_dir: str | Path,
                        repo_dir: str | Path | None = None, *, attribution_html: str) -> Path:
    """Write ``figures_dir/<name>.png`` for each of ``FIGURE_NAMES`` and the self-contained ``html_path``.

    Args:
        inputs: the files to report on.
        config: the run's validated config (shown in the report; ``report`` section sets the look).
        html_path: the HTML file, written last and atomically.
        figures_dir: folder for the PNG copies of the figures.
        repo_dir: the checkout whose git commit is reported (default: this package's parent folder).
        attribution_html: the data source's attribution, shown as given.
    """
    settings = config["report"]
    metrics = read_metrics(inputs.metrics_json)
    per_scan = read_table(inputs.per_scan_csv, "eval/per_scan.csv (evaluate)")
    split_df = read_table(inputs.split_csv, "split.csv (split)")
    excluded = read_table(inputs.excluded_csv, "qc/excluded.csv (split)")
    history = read_table(inputs.vqvae_history, "vqvae/history.csv (train_vqvae)")
    arrays = read_volume_figure_arrays(inputs.figures_npz)

    figures = written_figures(volume_report_figures(metrics, arrays, per_scan, history), figures_dir,
                              settings["figure_dpi"])
    excluded_html, excluded_left_out = html_table(excluded, settings["max_table_rows"])
    per_scan_html, per_scan_left_out = html_table(
        per_scan.sort_values("ssim_gaussian") if "ssim_gaussian" in per_scan.columns else per_scan,
        settings["max_table_rows"])
    context = {
        **page_basics(settings, attribution_html, run_summary(config, split_df, excluded, metrics)),
        "reconstruction_table": html_table(volume_reconstruction_table(metrics))[0],
        "codebook_table": html_table(codebook_table(metrics))[0],
        "study_table": html_table(study_table(metrics, config.get("vqvae", {}).get("bottleneck", "")))[0],
        "som": metrics.get("som", {}),
        "not_measured": metrics.get("not_measured", ""),
        "figures": figures,
        "per_scan_table": per_scan_html, "per_scan_left_out": per_scan_left_out,
        "excluded_table": excluded_html, "excluded_left_out": excluded_left_out, "n_excluded": len(excluded),
        "montages": montage_entries(inputs.montages, excluded, split_df, settings["max_montages"]),
        "config_json": json.dumps(config, indent=2, sort_keys=True, default=str),
        "software_rows": software_rows(metrics.get("software", {}), report_software_versions()),
        "git_commit": git_commit(repo_dir or Path(__file__).resolve().parents[1]),
    }
    html_path = Path(html_path)
    write_bytes_atomic(html_path, TEMPLATES.get_template("report_volumes.html.j2").render(**context).encode("utf-8"))
    return html_path
