"""The run report: matplotlib figures and pandas tables rendered into one self-contained HTML page.

Every figure is embedded as a base64 PNG data URI, so ``report/index.html`` opens from disk (or from a
Snakemake report archive) without its neighbours; the same PNGs are also written to ``report/figures/``.
Figures share one style (``STYLE``), tables come from pandas, markup lives in ``brainvq/templates``.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from brainvq.files import write_bytes_atomic
from brainvq.generation_report import copies_figure, generation_table, prior_table, sample_grid_figure
from brainvq.workflow import package_versions

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "legend.fontsize": 8,
    "image.cmap": "gray",
    "image.interpolation": "nearest",
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.prop_cycle": matplotlib.cycler(color=["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]),
}
FIGURE_NAMES = ("training_curves", "reconstructions", "ssim_distribution", "codebook_usage", "samples_vs_real",
                "sample_grid", "copies", "anomaly_maps")
# The arrays of eval/figures.npz (written by brainvq.evaluation.evaluate_run) that the figures draw.
FIGURE_ARRAYS = (
    "examples_label", "examples_scan", "examples_ssim_brain", "examples_position", "examples_original",
    "examples_reconstruction", "examples_error", "codebook_counts", "samples_images", "samples_positions",
    "real_images", "real_positions", "anomaly_lesioned", "anomaly_reconstruction", "anomaly_lesion",
    "anomaly_methods", "anomaly_method_scores",
    "generation_samples", "generation_positions", "generation_neighbours", "generation_hamming", "generation_ssim",
    "generation_flagged", "copies_real_hamming", "copies_real_ssim",
)
REPORT_PACKAGES = ("numpy", "pandas", "matplotlib", "jinja2", "h5py", "snakemake")
# (column family, title, y label): one training-curve panel each, drawn when history.csv has the columns.
CURVE_PANELS = (
    ("vqvae", ("loss", "recon_loss", "commitment", "ssim_loss", "kl"), "VQ-VAE training loss", "loss (a.u.)"),
    ("vqvae", ("val_ssim",), "VQ-VAE validation", "SSIM (validation slices)"),
    ("vqvae", ("perplexity", "val_perplexity", "codes_used", "val_codes_used"), "VQ-VAE codebook use",
     "codes (perplexity or count)"),
    ("prior", ("train_nll_bits", "val_nll_bits"), "PixelCNN prior", "NLL (bits/code)"),
)
RECONSTRUCTION_MEANINGS = {
    "ssim": ("SSIM", "Structural similarity of the whole slice (skimage, Gaussian window σ=1.5, data range 1); "
                     "1 = identical."),
    "ssim_brain": ("SSIM, brain box", "SSIM on the crop to the brain mask's bounding box (at least 11 px per side), "
                                      "so the empty background cannot inflate it."),
    "ms_ssim": ("MS-SSIM", "Multi-scale SSIM (5 scales, Wang et al. 2003) of the whole slice; 1 = identical."),
    "ms_ssim_brain": ("MS-SSIM, brain box", "MS-SSIM on the brain bounding box grown to 16 windows per side."),
    "psnr_db": ("PSNR (dB)", "Peak signal-to-noise ratio, peak 1, whole slice; higher is better (∞ = identical)."),
    "psnr_brain_db": ("PSNR, brain (dB)", "PSNR over brain-mask pixels only."),
    "mse": ("MSE", "Mean squared error of intensities in [0, 1], whole slice; lower is better."),
    "mse_brain": ("MSE, brain", "MSE over brain-mask pixels only."),
}
# (section, label, path into metrics.json, format, meaning) for the summary table.
METRIC_ROWS = (
    ("Codebook", "Codes used", ("codebook", "codes_used"), "int",
     "Distinct codes that occur in the test set's code maps."),
    ("Codebook", "Usage fraction", ("codebook", "usage_fraction"), "percent", "Codes used / codebook size."),
    ("Codebook", "Perplexity", ("codebook", "perplexity"), "float",
     "exp(entropy) of test code usage: the effective number of equally used codes."),
    ("Prior", "NLL, PixelCNN (bits/code)", ("prior", "bits_per_code"), "float",
     "Test code maps' negative log-likelihood under the prior; lower is better."),
    ("Prior", "NLL, uniform (bits/code)", ("prior", "uniform_bits_per_code"), "float",
     "log2 K: a prior that knows nothing. The PixelCNN should be far below it."),
    ("Prior", "NLL, unigram (bits/code)", ("prior", "unigram_bits_per_code"), "float",
     "Training code frequencies only (add-one smoothed): the baseline that ignores context."),
    ("Prior", "NLL, per-location unigram (bits/code)", ("prior", "per_location_unigram_bits_per_code"), "float",
     "Training code frequencies at each map location: knows where background is without any context."),
    ("Prior", "NLL, PixelCNN inside the mask (bits/code)", ("prior", "bits_per_code_brain"), "float",
     "The PixelCNN's NLL over code positions inside the brain (head) mask only, where the anatomy is."),
    ("Generation", "Two-sample AUROC, samples vs reconstructions",
     ("generation", "c2st", "samples_vs_reconstructions", "auroc"), "float",
     "A small CNN telling samples from decoded real code maps, scored on test subjects it did not train on; "
     "0.5 = indistinguishable."),
    ("Generation", "Position error, samples (MAE)", ("generation", "position_error", "samples"), "float",
     "Error of a regressor trained on training slices at reading the axial level the samples were drawn for."),
    ("Generation", "Position error, real test slices (MAE)", ("generation", "position_error", "real"), "float",
     "The same regressor's error on real test slices: what samples should approach."),
    ("Generation", "Copies flagged", ("generation", "copies", "share_flagged"), "percent",
     "Samples within a threshold, calibrated on known copies, of a training code map (Hamming or decoded SSIM)."),
    ("Probe", "AUROC from codes", ("probe", "auroc"), "float",
     "Linear probe on each scan's code-usage histogram, cross-validated over every subject (see the probe table)."),
    ("Probe", "p-value, codes", ("probe", "p_value"), "float",
     "Share of label permutations (within site) whose probe does at least as well; small = a real signal."),
)
# metrics.json anomaly methods, in table order, with what each scores.
ANOMALY_METHODS = {
    "vqvae_residual": "VQ-VAE residual |x − reconstruction|",
    "healed": "prior healing |x − healed| (Pinaya et al. 2022)",
    "healed_masked": "prior healing, kept where codes were replaced",
    "mean_slice": "no model: |x − mean training slice at the position|",
    "zscore": "no model: per-pixel z-score against training slices at the position",
}
PROBE_FEATURES = {"codes": "code histogram", "raw_images": "mean downsampled slice (raw images)",
                  "site_only": "site alone"}
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("brainvq", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class ReportInputError(ValueError):
    """A file the report reads is missing or malformed."""


@dataclass
class ReportInputs:
    """The files the report reads (see docs/architecture.md)."""

    metrics_json: Path
    per_scan_csv: Path
    figures_npz: Path
    vqvae_history: Path
    prior_history: Path
    split_csv: Path
    excluded_csv: Path
    montages: list[Path] = field(default_factory=list)
    samples_grid: Path | None = None


# ---------------------------------------------------------------------------------------------- reading


def read_metrics(path: str | Path) -> dict:
    """Return metrics.json as a dict.

    Raises:
        ReportInputError: when it is missing or not JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReportInputError(f"cannot read {path}: {error}; re-run the evaluate rule") from error


def read_table(path: str | Path, what: str) -> pd.DataFrame:
    """Return a CSV as a DataFrame; an empty file gives an empty table.

    Raises:
        ReportInputError: when the file is missing.
    """
    path = Path(path)
    if not path.exists():
        raise ReportInputError(f"{path} does not exist; re-run the rule that writes {what}")
    if path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path)


def read_figure_arrays(path: str | Path) -> dict:
    """Return figures.npz as a dict of arrays (no pickled objects).

    Raises:
        ReportInputError: when it cannot be read or lacks an array of ``FIGURE_ARRAYS``.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise ReportInputError(f"cannot read {path}: {error}; re-run the evaluate rule") from error
    missing = sorted(set(FIGURE_ARRAYS) - set(arrays))
    if missing:
        raise ReportInputError(f"{path} lacks arrays {missing}; it predates this report: re-run the evaluate rule")
    return arrays


def metric_value(metrics: dict, path: tuple[str, ...]):
    """Return the value at ``path`` in nested ``metrics``, or None where a key is absent."""
    value = metrics
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def formatted(value, kind: str = "float") -> str:
    """Return a value for a table cell: ``n/a`` for None, 3 significant digits, percentages, integers."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if kind == "int":
        return f"{int(value):d}"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


# ----------------------------------------------------------------------------------------------- tables


def mask_kind(metrics: dict) -> str:
    """Return what the run's masks cover, ``brain`` or ``head`` (``skull_strip: none``), for labels and captions."""
    return metric_value(metrics, ("preprocess", "mask_kind")) or "brain"


def with_interval(value, interval) -> str:
    """Return ``value`` formatted, followed by its 95 % interval ``[low, high]`` when there is one."""
    text = formatted(value)
    if value is not None and interval and None not in interval:
        text += f" [{formatted(interval[0])}, {formatted(interval[1])}]"
    return text


def reconstruction_table(metrics: dict) -> pd.DataFrame:
    """Return the reconstruction metrics: one row each, mean (with its subject-bootstrap 95 % interval), median and
    5th percentile over slices, scans and subjects; "brain" reads "head" when the run's masks are head masks."""
    kind = mask_kind(metrics)
    rows = []
    for key, (label, meaning) in RECONSTRUCTION_MEANINGS.items():
        stats = metric_value(metrics, ("reconstruction", key)) or {}
        row = {"Metric": label.replace("brain", kind)}
        for unit, name in (("over_slices", "slices"), ("over_scans", "scans"), ("over_subjects", "subjects")):
            summary = stats.get(unit) or {}
            row[f"{name}: mean [95% CI]"] = with_interval(summary.get("mean"), summary.get("mean_ci95"))
            for stat, stat_name in (("median", "median"), ("p5", "5th pct")):
                row[f"{name}: {stat_name}"] = formatted(summary.get(stat))
        row["Meaning"] = meaning.replace("brain", kind)
        rows.append(row)
    return pd.DataFrame(rows)


def anomaly_table(metrics: dict) -> pd.DataFrame:
    """Return AUROC, AUPRC and best Dice of every anomaly method on all lesions and on each lesion type."""
    anomaly = metrics.get("anomaly") or {}
    types = ["all"] + list(metric_value(anomaly, ("lesions", "types")) or [])
    rows = []
    for lesion in types:
        for method, meaning in ANOMALY_METHODS.items():
            if method not in anomaly:
                continue
            scores = anomaly[method] if lesion == "all" else (anomaly[method].get("by_lesion") or {}).get(lesion, {})
            rows.append({"Lesions": lesion, "Method": method, "AUROC": formatted(scores.get("auroc")),
                         "AUPRC": formatted(scores.get("auprc")), "Best Dice": formatted(scores.get("dice")),
                         "AUPRC of chance": formatted(scores.get("lesion_share")), "Scores": meaning})
    return pd.DataFrame(rows)


def probe_table(metrics: dict) -> pd.DataFrame:
    """Return the probe from each feature set: AUROC with its 95 % interval, permutation p-value, and why a value
    is missing."""
    probe = metrics.get("probe") or {}
    rows = []
    for key, label in PROBE_FEATURES.items():
        result = probe.get(key)
        if not isinstance(result, dict):
            continue
        rows.append({"Features": label, "AUROC [95% CI]": with_interval(result.get("auroc"), result.get("auroc_ci")),
                     "p-value": formatted(result.get("p_value")), "Permutations": formatted(
                         result.get("n_permutations"), "int"), "Folds": formatted(result.get("folds"), "int"),
                     "Note": result.get("reason") or ""})
    return pd.DataFrame(rows)


def metrics_table(metrics: dict) -> pd.DataFrame:
    """Return the non-reconstruction metrics with a one-line meaning each (and why a value is missing)."""
    rows = []
    for section, label, path, kind, meaning in METRIC_ROWS:
        value = metric_value(metrics, path)
        reason = metric_value(metrics, path[:-1] + ("reason",)) if value is None else None
        rows.append({"Section": section, "Metric": label,
                     "Value": formatted(value, kind) + (f" ({reason})" if reason else ""), "Meaning": meaning})
    return pd.DataFrame(rows)


def html_table(table: pd.DataFrame, max_rows: int | None = None) -> tuple[str, int]:
    """Return (pandas HTML of at most ``max_rows`` rows, number of rows left out)."""
    left_out = max(0, len(table) - max_rows) if max_rows is not None else 0
    shown = table.head(max_rows) if max_rows is not None else table
    return shown.to_html(index=False, border=0, classes="table", na_rep="n/a", escape=True,
                         float_format=lambda v: f"{v:.4g}"), left_out


# ---------------------------------------------------------------------------------------------- figures


def figure_png(fig: Figure, dpi: int) -> bytes:
    """Return ``fig`` rendered as PNG bytes (in the report style)."""
    buffer = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """Return PNG bytes as a ``data:image/png;base64,`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _new_figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(STYLE):
        return Figure(figsize=(width, height), layout="constrained")


def _image_axis(ax, image, title: str, **imshow):
    with matplotlib.rc_context(STYLE):
        handle = ax.imshow(np.asarray(image, np.float32), **({"cmap": "gray", "vmin": 0, "vmax": 1} | imshow))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return handle


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def training_curves_figure(histories: dict[str, pd.DataFrame]) -> Figure:
    """Return the training curves of both models (``{"vqvae": history, "prior": history}``) against step; only
    the panels of the models given (a whole-volume run has no prior)."""
    panels = [panel for panel in CURVE_PANELS if panel[0] in histories]
    fig = _new_figure(11 * len(panels) / len(CURVE_PANELS), 2.8)
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (model, columns, title, ylabel) in zip(axes, panels):
            history = histories.get(model, pd.DataFrame())
            present = [c for c in columns if c in history.columns and pd.to_numeric(history[c], "coerce").notna().any()]
            ax.set_title(title)
            if "step" not in history.columns or not present:
                _no_data(ax, "no rows in history.csv")
                continue
            for column in present:
                values = history[["step", column]].apply(pd.to_numeric, errors="coerce").dropna()
                sparse = len(values) < 0.5 * len(history)  # validation rows: mark the points
                ax.plot(values["step"], values[column], marker="o" if sparse else None, markersize=3, label=column)
            if model == "vqvae" and "val_psnr" in history.columns and columns == ("val_ssim",):
                psnr = history[["step", "val_psnr"]].apply(pd.to_numeric, errors="coerce").dropna()
                twin = ax.twinx()
                twin.plot(psnr["step"], psnr["val_psnr"], color="#ff7f0e", marker="s", markersize=3, label="val_psnr")
                twin.set_ylabel("PSNR (dB, validation)")
                twin.grid(False)
                twin.legend(loc="lower right")
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
            ax.legend(loc="best")
    return fig


def reconstruction_grid_figure(arrays: dict, kind: str = "brain") -> Figure:
    """Return original / reconstruction / |error| for the best, median and worst test scans (``kind``: what the
    mask covers, brain or head)."""
    labels = arrays["examples_label"]
    fig = _new_figure(7.5, 2.5 * len(labels))
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(len(labels), 3, squeeze=False)
        error_max = max(float(arrays["examples_error"].max()), 1e-6)
        for row, label in enumerate(labels):
            scan, score = arrays["examples_scan"][row], arrays["examples_ssim_brain"][row]
            position = arrays["examples_position"][row]
            _image_axis(axes[row, 0], arrays["examples_original"][row],
                        f"{label}: {scan}\noriginal (position {position:.2f})")
            _image_axis(axes[row, 1], arrays["examples_reconstruction"][row],
                        f"reconstruction\nscan mean {kind} SSIM {score:.3f}")
            handle = _image_axis(axes[row, 2], arrays["examples_error"][row], "|original − reconstruction|",
                                 cmap="magma", vmin=0, vmax=error_max)
            fig.colorbar(handle, ax=axes[row, 2], label="absolute error (intensity, 0–1)", shrink=0.85)
    return fig


def ssim_distribution_figure(per_scan: pd.DataFrame, kind: str = "brain") -> Figure:
    """Return the distribution over test scans of the mean brain-box SSIM (histogram with each scan); ``kind``
    names what the mask covers (brain or head)."""
    fig = _new_figure(5.5, 3)
    with matplotlib.rc_context(STYLE):
        ax = fig.subplots()
        values = pd.to_numeric(per_scan.get("ssim_brain", pd.Series(dtype=float)), errors="coerce").dropna()
        if values.empty:
            _no_data(ax, "no per-scan metrics")
            return fig
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#1f77b4", alpha=0.6, label="scans")
        ax.plot(values, np.zeros(len(values)), "|", color="k", markersize=14, label="one scan")
        ax.axvline(values.mean(), color="#d62728", label=f"mean {values.mean():.3f}")
        ax.axvline(values.median(), color="#2ca02c", linestyle="--", label=f"median {values.median():.3f}")
        ax.set_xlabel(f"{kind}-box SSIM, mean over a scan's slices (unitless)")
        ax.set_ylabel("test scans (count)")
        ax.set_title(f"Per-scan reconstruction quality (n = {len(values)})")
        ax.legend(loc="upper left")
    return fig


def codebook_usage_figure(counts: np.ndarray, usage: dict) -> Figure:
    """Return the share of test code positions taken by each code, most used first."""
    fig = _new_figure(6, 3)
    with matplotlib.rc_context(STYLE):
        ax = fig.subplots()
        counts = np.asarray(counts, np.float64)
        if counts.sum() == 0:
            _no_data(ax, "no codes")
            return fig
        share = np.sort(counts)[::-1] / counts.sum()
        ax.bar(np.arange(1, len(share) + 1), share, width=1.0, color="#1f77b4")
        ax.set_yscale("log")
        ax.set_xlabel("code rank (most used first)")
        ax.set_ylabel("share of test code positions")
        ax.set_title(f"Codebook usage: {usage.get('codes_used')} of {usage.get('codebook_size')} codes used, "
                     f"perplexity {formatted(usage.get('perplexity'))}")
    return fig


def samples_vs_real_figure(arrays: dict) -> Figure:
    """Return, per slice position, generated samples (left) next to real test slices at matched positions."""
    samples, real = arrays["samples_images"], arrays["real_images"]
    n_positions, per = samples.shape[:2]
    fig = _new_figure(1.5 * 2 * per, 1.6 * n_positions + 0.3)
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(n_positions, 2 * per, squeeze=False)
        for row in range(n_positions):
            for k in range(per):
                _image_axis(axes[row, k], samples[row, k], f"sample, pos {arrays['samples_positions'][row, k]:.2f}")
                _image_axis(axes[row, per + k], real[row, k], f"real, pos {arrays['real_positions'][row, k]:.2f}")
        fig.suptitle("Generated samples (left) and real test slices at matched positions (right)")
    return fig


def generation_figure(draw, *args) -> Figure:
    """Return a figure of ``brainvq.generation_report`` drawn in the report style."""
    with matplotlib.rc_context(STYLE):
        return draw(*args)


def anomaly_figure(arrays: dict) -> Figure:
    """Return, per example, the lesioned input, its reconstruction and every method's score map, with the true
    lesion outlined."""
    n = len(arrays["anomaly_lesioned"])
    methods = [str(m) for m in arrays["anomaly_methods"]]
    columns = 2 + len(methods)
    fig = _new_figure(1.9 * columns, 2.1 * max(n, 1))
    with matplotlib.rc_context(STYLE):
        axes = fig.subplots(max(n, 1), columns, squeeze=False)
        if n == 0:
            _no_data(axes[0, 0], "no anomaly examples")
            return fig
        for row in range(n):
            _image_axis(axes[row, 0], arrays["anomaly_lesioned"][row], "input with lesion")
            _image_axis(axes[row, 1], arrays["anomaly_reconstruction"][row], "reconstruction")
            for k, method in enumerate(methods):
                score = arrays["anomaly_method_scores"][k, row]
                _image_axis(axes[row, 2 + k], score, method, cmap="inferno", vmin=0,
                            vmax=max(float(arrays["anomaly_method_scores"][k].max()), 1e-6))
            lesion = np.asarray(arrays["anomaly_lesion"][row], np.float32)
            if lesion.any():
                for ax in axes[row]:
                    ax.contour(lesion, levels=[0.5], colors="#2ca02c", linewidths=0.8)
    return fig


def report_figures(metrics: dict, arrays: dict, per_scan: pd.DataFrame,
                   histories: dict[str, pd.DataFrame]) -> dict[str, Figure]:
    """Return every report figure by name (``FIGURE_NAMES``)."""
    return {
        "training_curves": training_curves_figure(histories),
        "reconstructions": reconstruction_grid_figure(arrays, mask_kind(metrics)),
        "ssim_distribution": ssim_distribution_figure(per_scan, mask_kind(metrics)),
        "codebook_usage": codebook_usage_figure(arrays["codebook_counts"], metrics.get("codebook", {})),
        "samples_vs_real": samples_vs_real_figure(arrays),
        "sample_grid": generation_figure(sample_grid_figure, arrays, _new_figure, _image_axis),
        "copies": generation_figure(copies_figure, arrays,
                                    metric_value(metrics, ("generation", "copies", "thresholds")) or {}, _new_figure),
        "anomaly_maps": anomaly_figure(arrays),
    }


# ------------------------------------------------------------------------------------------- provenance


def git_commit(repo_dir: str | Path) -> str | None:
    """Return the checkout's commit (``<sha>`` plus ``+ local changes`` when dirty), or None without git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + (" + local changes" if dirty else "") if sha else None


def report_software_versions(packages=REPORT_PACKAGES) -> dict:
    """Return the Python version and installed versions of ``packages`` in the environment rendering the report."""
    return package_versions(packages)


def software_rows(evaluation: dict, report: dict) -> list[tuple[str, str, str]]:
    """Return (package, version in the evaluation environment, version in the report environment) rows."""
    names = list(dict.fromkeys(list(evaluation) + list(report)))
    return [(name, evaluation.get(name) or "—", report.get(name) or "—") for name in names]


def run_summary(config: dict, split_df: pd.DataFrame, excluded: pd.DataFrame, metrics: dict) -> list[tuple[str, str]]:
    """Return the (label, value) pairs at the top of the report."""
    def count(split: str, column: str) -> int:
        if split_df.empty or column not in split_df.columns:
            return 0
        return int(split_df.loc[split_df["split"] == split, column].nunique())

    validation = 0
    if not split_df.empty and "validation" in split_df.columns:
        validation = int(split_df.loc[split_df["validation"].astype(str).str.lower() == "true", "subject"].nunique())
    prior = metrics.get("prior", {})
    return [
        ("Run", str(config.get("run"))),
        ("Dataset", str(config.get("dataset", {}).get("source"))),
        ("Training subjects (scans)", f"{count('train', 'subject')} ({count('train', 'scan')}), "
                                      f"{validation} held out for validation"),
        ("Test subjects (scans, slices)", f"{count('test', 'subject')} ({count('test', 'scan')}, "
                                          f"{metrics.get('n_test_slices', 'n/a')})"),
        ("Excluded scans", str(len(excluded))),
        ("Image size", f"{config.get('preprocess', {}).get('size')} px of "
                       f"{formatted(metric_value(metrics, ('preprocess', 'pixel_mm')))} mm (resampled to "
                       f"{config.get('preprocess', {}).get('spacing_mm')} mm voxels, "
                       f"{config.get('preprocess', {}).get('field_of_view_mm')} mm field of view)"),
        ("Masks", "head masks (skull_strip: none): every 'head' metric covers scalp and skull"
         if mask_kind(metrics) == "head" else "brain masks (skull_strip: "
         f"{metric_value(metrics, ('preprocess', 'skull_strip')) or config.get('preprocess', {}).get('skull_strip')})"),
        ("Bottleneck", f"{config.get('vqvae', {}).get('bottleneck')}, "
                       f"{metric_value(metrics, ('codebook', 'codebook_size'))} codes"),
        (f"{mask_kind(metrics).capitalize()}-box SSIM (mean over test subjects, 95% CI)",
         with_interval(metric_value(metrics, ("reconstruction", "ssim_brain", "over_subjects", "mean")),
                       metric_value(metrics, ("reconstruction", "ssim_brain", "over_subjects", "mean_ci95")))),
        ("Prior NLL (bits/code): PixelCNN / unigram / uniform",
         " / ".join(formatted(prior.get(k)) for k in ("bits_per_code", "unigram_bits_per_code",
                                                       "uniform_bits_per_code"))),
    ]


# ----------------------------------------------------------------------------------------------- render


def montage_entries(montages: list[Path], excluded: pd.DataFrame, split_df: pd.DataFrame,
                    max_montages: int) -> list[dict]:
    """Return up to ``max_montages`` QC montages (excluded scans first, then test scans, then the rest)."""
    by_scan = {Path(p).stem: Path(p) for p in montages}
    excluded_scans = list(excluded["scan"].astype(str)) if "scan" in excluded.columns else []
    test_scans = (sorted(split_df.loc[split_df["split"] == "test", "scan"].astype(str))
                  if {"scan", "split"} <= set(split_df.columns) else [])
    order = list(dict.fromkeys(excluded_scans + test_scans + sorted(by_scan)))
    entries = []
    for scan in order:
        if scan in by_scan and len(entries) < max_montages:
            note = "excluded" if scan in excluded_scans else ("test" if scan in test_scans else "training")
            entries.append({"scan": scan, "note": note, "uri": data_uri(by_scan[scan].read_bytes())})
    return entries


def render_report(context: dict) -> str:
    """Return the report HTML rendered from ``templates/report.html.j2`` with ``context``."""
    return TEMPLATES.get_template("report.html.j2").render(**context)


def page_basics(settings: dict, attribution_html: str, summary: list) -> dict:
    """Return the template entries every report page has: title, generation time, attribution, run summary."""
    return {"title": settings["title"], "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "attribution_html": attribution_html, "summary": summary}


def written_figures(figures: dict, figures_dir: str | Path, dpi: int) -> dict[str, str]:
    """Write each figure as ``figures_dir/<name>.png``; return ``{name: data URI}`` for the HTML page."""
    uris = {}
    for name, fig in figures.items():
        png = figure_png(fig, dpi)
        write_bytes_atomic(Path(figures_dir) / f"{name}.png", png)
        uris[name] = data_uri(png)
    return uris


def build_report(inputs: ReportInputs, config: dict, html_path: str | Path, figures_dir: str | Path,
                 repo_dir: str | Path | None = None, *, attribution_html: str) -> Path:
    """Write ``figures_dir/<name>.png`` for each of ``FIGURE_NAMES`` and the self-contained ``html_path``.

    Args:
        inputs: the files to report on.
        config: the run's validated config (shown in the report; ``report`` section sets the look).
        html_path: the HTML file, written last and atomically so a failure never leaves a page that looks done.
        figures_dir: folder for the PNG copies of the figures.
        repo_dir: the checkout whose git commit is reported (default: this package's parent folder).
        attribution_html: the data source's attribution (``Source.attribution_html``), shown as given.

    Returns:
        ``html_path``.
    """
    settings = config["report"]
    metrics = read_metrics(inputs.metrics_json)
    per_scan = read_table(inputs.per_scan_csv, "eval/per_scan.csv (evaluate)")
    split_df = read_table(inputs.split_csv, "split.csv (split)")
    excluded = read_table(inputs.excluded_csv, "qc/excluded.csv (split)")
    histories = {"vqvae": read_table(inputs.vqvae_history, "vqvae/history.csv (train_vqvae)"),
                 "prior": read_table(inputs.prior_history, "prior/history.csv (train_pixelcnn)")}
    arrays = read_figure_arrays(inputs.figures_npz)

    figures = written_figures(report_figures(metrics, arrays, per_scan, histories), figures_dir,
                              settings["figure_dpi"])

    excluded_html, excluded_left_out = html_table(excluded, settings["max_table_rows"])
    scan_columns = [c for c in ("scan", "subject", "n_slices", "ssim_brain", "psnr_brain_db", "ms_ssim_brain")
                    if c in per_scan.columns]
    per_scan_html, per_scan_left_out = html_table(
        per_scan[scan_columns].sort_values("ssim_brain") if "ssim_brain" in scan_columns else per_scan,
        settings["max_table_rows"])
    context = {
        **page_basics(settings, attribution_html, run_summary(config, split_df, excluded, metrics)),
        "reconstruction_table": html_table(reconstruction_table(metrics))[0],
        "metrics_table": html_table(metrics_table(metrics))[0],
        "anomaly_table": html_table(anomaly_table(metrics))[0],
        "probe_table": html_table(probe_table(metrics))[0],
        "mask_kind": mask_kind(metrics),
        "pixel_mm": metric_value(metrics, ("preprocess", "pixel_mm")),
        "generation_table": html_table(generation_table(metrics))[0],
        "prior_table": html_table(prior_table(metrics))[0],
        "generation": metrics.get("generation", {}),
        "probe": metrics.get("probe", {}),
        "anomaly": metrics.get("anomaly", {}),
        "fd_label": metric_value(metrics, ("generation", "frechet_distance_vqvae", "label")) or "FD",
        "ms_ssim_window_px": metrics.get("ms_ssim_window_px"),
        "figures": figures,
        "per_scan_table": per_scan_html, "per_scan_left_out": per_scan_left_out,
        "excluded_table": excluded_html, "excluded_left_out": excluded_left_out, "n_excluded": len(excluded),
        "montages": montage_entries(inputs.montages, excluded, split_df, settings["max_montages"]),
        "samples_grid": data_uri(Path(inputs.samples_grid).read_bytes()) if inputs.samples_grid else None,
        "config_json": json.dumps(config, indent=2, sort_keys=True, default=str),
        "software_rows": software_rows(metrics.get("software", {}), report_software_versions()),
        "git_commit": git_commit(repo_dir or Path(__file__).resolve().parents[1]),
    }
    html_path = Path(html_path)
    write_bytes_atomic(html_path, render_report(context).encode("utf-8"))
    return html_path
