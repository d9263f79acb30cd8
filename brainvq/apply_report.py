"""The apply report (rule apply_report): what a trained model makes of new scans, as one self-contained HTML page.

It states both data sources (trained on X, applied to Y), sets the applied scans' reconstruction metrics and code
usage next to the trained run's own test metrics, shows each example scan's middle slice with its reconstruction
and anomaly map, and links every scan's output files. Figures are embedded PNGs, as in the run report.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from brainvq.files import write_bytes_atomic
from brainvq.reporting import (
    RECONSTRUCTION_MEANINGS,
    STYLE,
    TEMPLATES,
    ReportInputError,
    data_uri,
    figure_png,
    formatted,
    git_commit,
    read_metrics,
    read_table,
)

# Per-scan output files the report links, relative to report/index.html.
OUTPUT_LINKS = (("codes", "codes/{scan}.npy"), ("reconstruction", "recon/{scan}.nii.gz"),
                ("anomaly map", "anomaly/{scan}.nii.gz"), ("record", "scans/{scan}.json"))


def read_figure(path: Path) -> dict:
    """Return one figures/<scan>.npz (middle slice, reconstruction, anomaly map, mask, position)."""
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise ReportInputError(f"{path} cannot be read ({error}); delete it and re-run the workflow") from error


def examples_figure(per_scan: pd.DataFrame, figures: dict[str, dict], n: int) -> Figure | None:
    """Return a grid of the ``n`` worst scans by brain SSIM: slice, reconstruction, |error| and anomaly map."""
    ranked = [scan for scan in per_scan.sort_values("ssim_brain")["scan"] if scan in figures][:n]
    if not ranked:
        return None
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8.0, 2.1 * len(ranked)), layout="constrained")
        axes = fig.subplots(len(ranked), 4, squeeze=False)
        for row, scan in zip(axes, ranked):
            arrays = figures[scan]
            ssim_brain = per_scan.set_index("scan").loc[scan, "ssim_brain"]
            error = np.abs(arrays["original"] - arrays["reconstruction"])
            panels = ((arrays["original"], f"{scan} (position {float(arrays['position']):.2f})", {}),
                      (arrays["reconstruction"], f"reconstruction (SSIM {ssim_brain:.3f})", {}),
                      (error, "|error|", {"cmap": "magma", "vmax": max(float(error.max()), 1e-6)}),
                      (arrays["anomaly"], "anomaly map", {"cmap": "hot", "vmax": max(float(arrays["anomaly"].max()),
                                                                                   1e-6)}))
            for ax, (image, title, options) in zip(row, panels):
                ax.imshow(image, **({"cmap": "gray", "vmin": 0, "vmax": 1} | options))
                ax.set_title(title, fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
    return fig


def ssim_by_scan_figure(per_scan: pd.DataFrame, trained_mean: float | None) -> Figure:
    """Return the applied scans' brain SSIM, one bar each, with the trained run's test-scan mean as a line."""
    ordered = per_scan.sort_values("ssim_brain")
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(7.0, 0.8 + 0.25 * len(ordered)), layout="constrained")
        ax = fig.subplots()
        ax.barh(ordered["scan"], ordered["ssim_brain"], color="#1f77b4", label="applied scans")
        if trained_mean is not None:
            ax.axvline(trained_mean, color="#d62728", linestyle="--", label="trained run, test scans (mean)")
        ax.set_xlabel("brain-box SSIM (mean over the scan's slices)")
        ax.set_xlim(0, 1)
        ax.legend(loc="lower right")
    return fig


def summary_rows(metrics: dict) -> list[tuple[str, str]]:
    """Return the (label, value) pairs at the top of the report: both sources first."""
    trained, applied = metrics["trained_on"], metrics["applied_to"]
    settings = metrics.get("preprocess") or {}
    return [
        ("Trained on", f"{trained['source']} (run {trained['run']}: {trained.get('train_scans', 'n/a')} training "
                       f"scans, {trained.get('subjects', 'n/a')} subjects in all)"),
        ("Applied to", f"{applied['source']} at {applied['folder']}: {applied['n_scans']} scans of "
                       f"{applied['n_subjects']} subjects, {applied['n_slices']} slices"),
        ("Cross-dataset", "yes: the model never saw data from this source" if metrics["cross_dataset"]
         else "no: the applied scans come from the source the model was trained on"),
        ("Model", str(trained.get("model"))),
        ("Preprocessing (the model's)", f"{settings.get('size')} px slices at {settings.get('spacing_mm')} mm, "
                                        f"{settings.get('field_of_view_mm')} mm field of view, skull strip "
                                        f"{settings.get('skull_strip')}, N4 {settings.get('n4')}"),
        ("Excluded scans", str(len(applied["excluded"]))),
    ]


def comparison_table(metrics: dict) -> pd.DataFrame:
    """Return the reconstruction metrics of the trained run's test scans next to the applied scans'."""
    rows = []
    for row in metrics["comparison"]:
        label = RECONSTRUCTION_MEANINGS.get(row["metric"], (row["metric"], ""))[0]
        rows.append({"metric": label, "trained run, test scans": formatted(row["trained_run_test_scans"]),
                     "applied scans": formatted(row["applied_scans"]), "difference": formatted(row["difference"])})
    return pd.DataFrame(rows)


def codebook_table(metrics: dict) -> pd.DataFrame:
    """Return codes used, usage fraction and perplexity of the trained run's test codes and the applied codes."""
    trained, applied = metrics.get("trained_run_codebook") or {}, metrics.get("codebook") or {}
    return pd.DataFrame([
        {"": "trained run, test scans", **{k: formatted(trained.get(k)) for k in ("codes_used", "perplexity")},
         "usage fraction": formatted(trained.get("usage_fraction"), "percent")},
        {"": "applied scans", **{k: formatted(applied.get(k)) for k in ("codes_used", "perplexity")},
         "usage fraction": formatted(applied.get("usage_fraction"), "percent")},
    ]).rename(columns={"codes_used": "codes used"})


def scan_rows(per_scan: pd.DataFrame) -> list[dict]:
    """Return one row per applied scan (worst brain SSIM first) with its numbers and output links."""
    rows = []
    for record in per_scan.sort_values("ssim_brain").to_dict("records"):
        rows.append({
            "scan": record["scan"], "subject": record["subject"], "n_slices": record["n_slices"],
            "ssim_brain": formatted(record.get("ssim_brain")), "psnr_brain_db": formatted(record.get("psnr_brain_db")),
            "codes_used": formatted(record.get("codes_used"), "int"),
            "anomaly": formatted(record.get("anomaly_mean_brain")),
            "links": [(label, "../" + pattern.format(scan=record["scan"])) for label, pattern in OUTPUT_LINKS],
        })
    return rows


def build_apply_report(metrics_json: str | Path, per_scan_csv: str | Path, figure_files, excluded_csv: str | Path,
                       bundle_json: str | Path, html_path: str | Path, settings: dict, examples: int,
                       attribution_html: str) -> Path:
    """Write the self-contained apply report ``html_path`` (atomically, last); return it.

    Args:
        metrics_json, per_scan_csv: apply_metrics' outputs; figure_files: figures/<scan>.npz of every scan.
        excluded_csv: inputs rejected at discovery; bundle_json: the model bundle's manifest.
        settings: the ``report`` config section; examples: scans shown in the examples figure.
        attribution_html: the applied data source's attribution (the training source's is in the bundle).
    """
    metrics = read_metrics(metrics_json)
    per_scan = read_table(per_scan_csv, "per_scan.csv (apply_metrics)")
    rejected = read_table(excluded_csv, "qc/excluded_inputs.csv (discover_subjects)")
    manifest = json.loads(Path(bundle_json).read_text())
    figures = {Path(path).stem: read_figure(Path(path)) for path in figure_files}
    figures = {scan: arrays for scan, arrays in figures.items() if arrays["original"].size}
    trained_mean = (((metrics.get("trained_run_reconstruction") or {}).get("ssim_brain") or {})
                    .get("over_scans", {}).get("mean"))
    images = {"ssim_by_scan": data_uri(figure_png(ssim_by_scan_figure(per_scan, trained_mean), settings["figure_dpi"]))}
    example_fig = examples_figure(per_scan, figures, examples) if examples else None
    if example_fig is not None:
        images["examples"] = data_uri(figure_png(example_fig, settings["figure_dpi"]))
    excluded = [*metrics["applied_to"]["excluded"],
                *({"scan": row["scan"], "reason": row["reason"]} for row in rejected.to_dict("records"))]
    context = {
        "title": f"brainvq apply report: {metrics['name']}",
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "trained_source": metrics["trained_on"]["source"], "applied_source": metrics["applied_to"]["source"],
        "summary": summary_rows(metrics),
        "comparison_table": comparison_table(metrics).to_html(index=False, border=0, classes="table", escape=True),
        "codebook_table": codebook_table(metrics).to_html(index=False, border=0, classes="table", escape=True),
        "probe": metrics.get("probe"), "images": images, "scans": scan_rows(per_scan)[:settings["max_table_rows"]],
        "scans_left_out": max(0, len(per_scan) - settings["max_table_rows"]), "excluded": excluded,
        "trained_attribution_html": manifest.get("attribution_html", ""), "attribution_html": attribution_html,
        "preprocess_json": json.dumps(metrics.get("preprocess"), indent=2, sort_keys=True),
        "packages": manifest.get("packages", {}), "git_commit": git_commit(Path(__file__).resolve().parents[1]),
    }
    html_path = Path(html_path)
    write_bytes_atomic(html_path, TEMPLATES.get_template("apply_report.html.j2").render(**context).encode("utf-8"))
    return html_path
