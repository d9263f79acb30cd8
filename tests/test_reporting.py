"""The HTML report (brainvq/reporting.py), built from tiny artifacts made here, checked in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest

from brainvq import reporting
from brainvq.config import load_config
from brainvq.sources import get_source
from conftest import REPO, synthetic_brain_slices

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Injected into a copy of the report: after load, record every image's decoded size and every link's target.
PAGE_CHECK = """
<pre id="brainvq-check" style="display:none"></pre>
<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete,
      width: i.naturalWidth, height: i.naturalHeight}));
  const links = [...document.querySelectorAll("a[href]")].map(a => ({href: a.getAttribute("href"),
      target: a.getAttribute("href").startsWith("#") ? !!document.getElementById(a.getAttribute("href").slice(1)) : null}));
  const height = document.documentElement.scrollHeight;
  document.getElementById("brainvq-check").textContent = JSON.stringify({images, links, height});
});
</script>
"""


def detection(auroc: float) -> dict:
    return {"auroc": auroc, "auprc": auroc / 4, "dice": auroc / 3, "lesion_share": 0.02}


def tiny_anomaly() -> dict:
    types = ["bright_small", "bright_large", "dark_small", "dark_large"]
    methods = {"vqvae_residual": 0.8, "healed": 0.85, "healed_masked": 0.9, "mean_slice": 0.7, "zscore": 0.75}
    anomaly = {method: {**detection(value), "by_lesion": {t: detection(value - 0.01 * k) for k, t in enumerate(types)}}
               for method, value in methods.items()}
    anomaly["healing"] = {"replaced_code_share": 0.031, "threshold": 0.01, "passes": 2}
    anomaly["lesions"] = {"types": types, "n_slices": 8, "contrast": 0.3, "smoothing_sigma_px": 1.9}
    return anomaly


def tiny_probe(probe_auroc) -> dict:
    reason = None if probe_auroc else ("3 negative and 2 positive subjects; grouped cross-validation with an inner "
                                       "fold needs at least 3 of each")
    codes = {"auroc": probe_auroc, "auroc_ci": [0.61, 0.93] if probe_auroc else None,
             "p_value": 0.004 if probe_auroc else None, "n_permutations": 1000, "folds": 5, "reason": reason}
    return {"target": "atrophy>median", "meaning": "1 = atrophy > 0.75", "n_scans_without_label": 0,
            "n_subjects": 24, "n_scans": 24, "permuted_within": "site",
            "n_per_class": {"negative": {"subjects": 12, "scans": 12}, "positive": {"subjects": 12, "scans": 12}},
            "codes": codes, **{k: codes[k] for k in ("auroc", "auroc_ci", "p_value", "reason")},
            "raw_images": {"auroc": 0.6, "auroc_ci": [0.4, 0.8], "p_value": 0.2, "n_permutations": 1000, "folds": 5,
                           "reason": None},
            "site_only": {"auroc": 0.55, "auroc_ci": [0.5, 0.7], "p_value": 0.3, "n_permutations": 1000, "folds": 5,
                          "reason": None}}


def tiny_metrics(probe_auroc=None, mask_kind="brain") -> dict:
    stats = {"over_slices": {"mean": 0.81, "median": 0.82, "p5": 0.7, "n": 16, "mean_ci95": [0.79, 0.83]},
             "over_scans": {"mean": 0.805, "median": 0.805, "p5": 0.795, "n": 2, "mean_ci95": [0.79, 0.82]},
             "over_subjects": {"mean": 0.8, "median": 0.8, "p5": 0.79, "n": 2, "mean_ci95": [0.79, 0.81]}}
    return {
        "preprocess": {"pixel_mm": 1.875, "mask_kind": mask_kind, "size": 32},
        "n_test_scans": 2, "n_test_subjects": 2, "n_test_slices": 16, "ms_ssim_window_px": 7,
        "reconstruction": {key: stats for key in reporting.RECONSTRUCTION_MEANINGS},
        "codebook": {"codebook_size": 16, "codes_used": 9, "usage_fraction": 0.5625, "perplexity": 7.2},
        "prior": {"bits_per_code": 2.1, "bits_per_code_brain": 3.3, "uniform_bits_per_code": 4.0,
                  "unigram_bits_per_code": 3.2, "per_location_unigram_bits_per_code": 2.9,
                  "per_location_position_bin_unigram_bits_per_code": 2.8,
                  "brain": {"uniform_bits_per_code": 4.0, "unigram_bits_per_code": 3.9,
                            "per_location_unigram_bits_per_code": 3.8,
                            "per_location_position_bin_unigram_bits_per_code": 3.7}, "n_test_maps": 16},
        "generation": tiny_generation_metrics(),
        "probe": tiny_probe(probe_auroc),
        "anomaly": tiny_anomaly(),
        "software": {"python": "3.11.9", "torch": "2.13.0", "cuda_device": None},
    }


def judged(auroc: float, position_error: float, share_flagged: float) -> dict:
    """What judge_samples writes for one set of samples (or a control)."""
    return {"n": 8, "c2st": {"samples_vs_reconstructions": {"auroc": auroc, "ci95": [auroc - 0.1, auroc + 0.05],
                                                             "folds": 2}},
            "position_error": {"samples": position_error},
            "features": {"frechet_distance": 1.5, "precision": 0.6, "recall": 0.5, "k": 3},
            "copies": {"share_flagged": share_flagged, "nearest_hamming": {"median": 0.3},
                       "thresholds": {"hamming": 0.1, "ssim": 0.92}}}


def tiny_generation_metrics() -> dict:
    metrics = judged(0.62, 0.08, 0.0)
    metrics["c2st"]["samples_vs_real"] = {"auroc": 0.81, "ci95": [0.7, 0.9], "folds": 2}
    metrics["c2st"]["reconstructions_vs_real"] = {"auroc": 0.77, "ci95": [0.66, 0.88], "folds": 2}
    metrics["position_error"].update({"real": 0.06, "chance": 0.25})
    metrics["features"].update({"label": "position-regressor features", "train_vs_test": {
        "frechet_distance": 0.9, "precision": 0.8, "recall": 0.7}})
    metrics["copies"]["real_test"] = {"share_flagged": 0.0, "nearest_hamming": {"median": 0.35}}
    metrics["diversity"] = {"samples_mean_pairwise_ms_ssim": 0.31, "real_mean_pairwise_ms_ssim": 0.35}
    metrics["frechet_distance_vqvae"] = {"label": "FD (VQ-VAE encoder features; not comparable to FID)",
                                         "samples_vs_test": 0.4, "train_vs_test": 0.1, "n": 8}
    metrics["controls"] = {"training_maps": judged(0.52, 0.06, 1.0), "shuffled_maps": judged(0.999, 0.24, 0.0),
                           "uniform_codes": judged(1.0, 0.3, 0.0), "copies_mixed": judged(0.6, 0.08, 0.125)}
    return metrics


def png_of(image: np.ndarray, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.subplots().imshow(image, cmap="gray")
    fig.savefig(path)
    return path


def tiny_report_inputs(tmp_path: Path, probe_auroc=None, mask_kind="brain") -> reporting.ReportInputs:
    images, masks = synthetic_brain_slices(6, 32, seed=0)
    recon = np.clip(images + 0.05, 0, 1)
    rng = np.random.default_rng(0)
    arrays = {
        "examples_label": np.array(["best", "median", "worst"]), "examples_scan": np.array(["T00", "T01", "T02"]),
        "examples_ssim_brain": np.array([0.9, 0.8, 0.7]), "examples_position": np.array([0.5, 0.48, 0.52]),
        "examples_original": images[:3], "examples_reconstruction": recon[:3],
        "examples_error": np.abs(images[:3] - recon[:3]), "examples_mask": masks[:3],
        "codebook_counts": rng.integers(0, 50, 16),
        "samples_images": images[None, :2].repeat(2, 0), "samples_positions": np.array([[0.2, 0.21], [0.6, 0.6]]),
        "real_images": images[None, 2:4].repeat(2, 0), "real_positions": np.array([[0.2, 0.2], [0.61, 0.6]]),
        "requested_positions": np.array([0.2, 0.6]),
        "anomaly_image": images[:2], "anomaly_lesioned": recon[:2], "anomaly_reconstruction": images[:2],
        "anomaly_methods": np.array(["vqvae_residual", "mean_slice"]),
        "anomaly_method_scores": np.stack([np.abs(recon[:2] - images[:2]), recon[:2]]),
        "anomaly_lesion": masks[:2] & (images[:2] > 0.7),
        "anomaly_mask": masks[:2],
        "generation_samples": images, "generation_positions": np.array([0.2, 0.2, 0.2, 0.6, 0.6, 0.6]),
        "generation_neighbours": recon, "generation_hamming": np.array([0.3, 0.25, 0.0, 0.4, 0.35, 0.3]),
        "generation_ssim": np.array([0.7, 0.75, 1.0, 0.6, 0.65, 0.7]),
        "generation_flagged": np.array([False, False, True, False, False, False]),
        "copies_real_hamming": np.array([0.35, 0.4]), "copies_real_ssim": np.array([0.72, 0.68]),
    }
    (tmp_path / "eval").mkdir()
    np.savez_compressed(tmp_path / "eval" / "figures.npz", **arrays)
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(tiny_metrics(probe_auroc, mask_kind)))
    pd.DataFrame({"scan": ["T00", "T01", "T02"], "subject": ["T00", "T01", "T02"], "n_slices": [8, 8, 8],
                  "ssim_brain": [0.9, 0.8, 0.7], "psnr_brain_db": [30.0, 28.0, 25.0]}).to_csv(
        tmp_path / "eval" / "per_scan.csv", index=False)
    steps = np.arange(0, 50, 10)
    pd.DataFrame({"step": steps, "loss": 1 / (1 + steps), "recon_loss": 0.8 / (1 + steps),
                  "perplexity": 5 + steps / 10, "val_ssim": [None, None, 0.6, None, 0.7],
                  "val_psnr": [None, None, 20.0, None, 22.0], "lr": 1e-3}).to_csv(tmp_path / "vqvae_history.csv",
                                                                                 index=False)
    pd.DataFrame({"step": steps, "train_nll_bits": 4 - steps / 25, "val_nll_bits": 4.1 - steps / 30}).to_csv(
        tmp_path / "prior_history.csv", index=False)
    pd.DataFrame({"scan": ["S00", "S01", "T00", "T01", "T02"], "subject": ["S00", "S01", "T00", "T01", "T02"],
                  "session": "", "split": ["train", "train", "test", "test", "test"],
                  "validation": [True, False, False, False, False]}).to_csv(tmp_path / "split.csv", index=False)
    pd.DataFrame({"scan": ["X09"], "path": ["raw/X09.nii.gz"], "stage": ["reorient"],
                  "reason": ["non-finite voxels <script>"]}).to_csv(tmp_path / "excluded.csv", index=False)
    (tmp_path / "qc").mkdir()
    montages = [png_of(images[k], tmp_path / "qc" / f"{scan}.png") for k, scan in enumerate(["S00", "T00", "X09"])]
    return reporting.ReportInputs(
        metrics_json=tmp_path / "eval" / "metrics.json", per_scan_csv=tmp_path / "eval" / "per_scan.csv",
        figures_npz=tmp_path / "eval" / "figures.npz", vqvae_history=tmp_path / "vqvae_history.csv",
        prior_history=tmp_path / "prior_history.csv", split_csv=tmp_path / "split.csv",
        excluded_csv=tmp_path / "excluded.csv", montages=montages,
        samples_grid=png_of(images[5], tmp_path / "grid.png"))


def build(tmp_path: Path, source: str = "ixi", probe_auroc=None, mask_kind="brain") -> Path:
    config = load_config(overrides={"dataset": {"source": source}})
    return reporting.build_report(tiny_report_inputs(tmp_path, probe_auroc, mask_kind), config,
                                  tmp_path / "report" / "index.html", tmp_path / "report" / "figures",
                                  attribution_html=get_source(source).attribution_html)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """One report for the module (building takes a few CPU seconds): IXI, with an undefined probe AUROC."""
    return build(tmp_path_factory.mktemp("run"))


# ------------------------------------------------------------------------------------------- content


def test_report_embeds_every_figure_and_writes_png_copies(report):
    page = report.read_text()
    for name in reporting.FIGURE_NAMES:
        assert (report.parent / "figures" / f"{name}.png").stat().st_size > 1000
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(reporting.FIGURE_NAMES) + 3 + 1  # figures, montages, sampler grid
    assert all(src.startswith("data:image/png;base64,") for src in sources)


def test_report_explains_every_metric_and_says_why_one_is_missing(report):
    page = report.read_text()
    for label, meaning in reporting.RECONSTRUCTION_MEANINGS.values():
        assert html.escape(meaning, quote=False) in page
    for _, label, _, _, meaning in reporting.METRIC_ROWS:
        assert html.escape(meaning, quote=False) in page
    assert "n/a (3 negative and 2 positive subjects; grouped cross-validation" in page
    assert "FD (VQ-VAE encoder features; not comparable to FID)" in page


def test_generation_table_puts_every_measure_beside_its_reference_and_controls(report):
    table = reporting.generation_table(tiny_metrics())
    row = table.set_index("Measure").loc["Two-sample AUROC, samples vs reconstructions"]
    assert row["Samples"] == "0.620 [0.52, 0.67]"
    assert row["shuffled code maps"] == "0.999 [0.90, 1.05]"
    assert row["training maps (a copying prior)"].startswith("0.52")
    copies = table.set_index("Measure").loc["Copies flagged"]
    assert (copies["Samples"], copies["Real reference"], copies["training maps (a copying prior)"],
            copies["10 % copies mixed in"]) == ("0.0 %", "0.0 %", "100.0 %", "12.5 %")
    assert table.set_index("Measure").loc["Position error (MAE)", "Real reference"] == "0.06"
    assert all(table["Can detect"].str.len() > 20) and all(table["Cannot detect"].str.len() > 10)
    page = report.read_text()
    assert "Two-sample AUROC, samples vs reconstructions" in page and "10 % copies mixed in" in page
    assert "per-location unigram" in page and "inside the mask" in page


def test_reconstruction_table_reports_slices_scans_and_subjects_apart_with_intervals(report):
    table = reporting.reconstruction_table(tiny_metrics())
    means = ["slices: mean [95% CI]", "scans: mean [95% CI]", "subjects: mean [95% CI]"]
    assert [c for c in table.columns if ": mean" in c] == means
    assert table.loc[0, means].tolist() == ["0.81 [0.79, 0.83]", "0.805 [0.79, 0.82]", "0.8 [0.79, 0.81]"]
    page = report.read_text()
    assert "scans: mean [95% CI]" in page and "subjects: mean [95% CI]" in page
    assert "Per-scan metrics" in page and "per_subject" not in page


def test_report_shows_pixel_size_anomaly_table_and_probe_with_interval_and_p_value(tmp_path):
    page = build(tmp_path, probe_auroc=0.81).read_text()
    assert "1.88 mm pixels" in page and "128 px of 1.875 mm" in page
    table = reporting.anomaly_table(tiny_metrics())
    assert len(table) == 5 * 5  # every method on all lesions and on each of the four lesion types
    assert table.loc[(table["Lesions"] == "dark_small") & (table["Method"] == "zscore"), "AUPRC"].item() == "0.1825"
    for method in reporting.ANOMALY_METHODS:
        assert f"<td>{method}</td>" in page
    assert "0.81 [0.61, 0.93]" in page and "0.004" in page and "site alone" in page
    assert "12 negative" in page and "12 positive" in page


def test_head_masks_are_called_head_and_brain_masks_brain(tmp_path):
    (tmp_path / "head").mkdir()
    (tmp_path / "brain").mkdir()
    head = build(tmp_path / "head", mask_kind="head").read_text()
    assert "SSIM, head box" in head and "SSIM, brain box" not in head and "head masks" in head
    assert "Head-box SSIM" in head
    brain = build(tmp_path / "brain").read_text()
    assert "SSIM, brain box" in brain and "SSIM, head box" not in brain and "brain masks" in brain


def test_report_escapes_table_text_and_lists_excluded_scans(report):
    page = report.read_text()
    assert "non-finite voxels &lt;script&gt;" in page and "<script>" not in page
    assert "Excluded scans (1)" in page
    assert page.index("X09 (excluded)") < page.index("T00 (test)")  # excluded scans' montages come first


@pytest.mark.parametrize("source, expected", [
    ("ixi", "https://creativecommons.org/licenses/by-sa/3.0/"),
    ("oasis1", "https://doi.org/10.1162/jocn.2007.19.9.1498"),
    ("oasis2", "https://doi.org/10.1162/jocn.2009.21407"),
    ("demo", "nilearn.datasets.load_mni152_template"),
    ("local", "Add its source, licence and"),
])
def test_report_attributes_the_dataset_it_used(source, expected):
    assert expected in get_source(source).attribution_html


def test_report_page_carries_the_sources_attribution_as_markup(report):
    page = report.read_text()
    section = page[page.index('<section id="attribution">'):]
    assert '<a href="https://creativecommons.org/licenses/by-sa/3.0/">' in section  # IXI's, not escaped


def test_an_unreadable_or_outdated_input_leaves_no_report_behind(tmp_path):
    inputs = tiny_report_inputs(tmp_path)
    inputs.figures_npz.write_bytes(b"not an npz")
    with pytest.raises(reporting.ReportInputError, match="re-run the evaluate rule"):
        reporting.build_report(inputs, load_config(), tmp_path / "report" / "index.html", tmp_path / "report" / "fig",
                               attribution_html="")
    np.savez(inputs.figures_npz, codebook_counts=np.arange(3))
    with pytest.raises(reporting.ReportInputError, match="lacks arrays .*examples_label"):
        reporting.build_report(inputs, load_config(), tmp_path / "report" / "index.html", tmp_path / "report" / "fig",
                               attribution_html="")
    assert not (tmp_path / "report" / "index.html").exists()


# ------------------------------------------------------------------------------------------ Chromium


def chromium() -> str:
    """Return a runnable Chromium, or skip the test saying why."""
    binary = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                   if shutil.which(name)), None)
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the report was not opened")
    return binary


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=90)
    except subprocess.TimeoutExpired:
        pytest.skip(f"Chromium did not finish within 90 s: {' '.join(command)}")


def test_report_opens_in_headless_chromium_with_every_image_and_link_working(report, tmp_path):
    binary = chromium()
    probe = tmp_path / "probe.html"
    probe.write_text("<html><body><p id='ok'>ok</p></body></html>")
    started = run_chromium(binary, tmp_path / "profile-probe", "--dump-dom", probe.as_uri())
    if started.returncode != 0 or "id=\"ok\"" not in started.stdout:
        pytest.skip(f"Chromium cannot run here (exit {started.returncode}): {started.stderr[-500:]}")

    checked = report.with_name("checked.html")
    checked.write_text(report.read_text().replace("</body>", PAGE_CHECK + "</body>"))
    dumped = run_chromium(binary, tmp_path / "profile-dom", "--virtual-time-budget=10000", "--dump-dom",
                          checked.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    found = re.search(r'<pre id="brainvq-check"[^>]*>(.*?)</pre>', dumped.stdout, re.S)
    assert found and found.group(1), "the page's load handler never ran"
    state = json.loads(html.unescape(found.group(1)))

    assert len(state["images"]) == len(reporting.FIGURE_NAMES) + 3 + 1
    broken = [image["alt"] for image in state["images"]
              if not (image["complete"] and image["width"] > 0 and image["height"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert state["links"], "the report has no links (navigation, attribution)"
    for link in state["links"]:
        url = urlparse(link["href"])
        if link["href"].startswith("#"):
            assert link["target"], f"anchor {link['href']} has no element with that id"
        elif url.scheme in ("http", "https"):
            assert url.netloc, f"malformed link {link['href']}"
        else:
            assert (report.parent / url.path).exists(), f"relative link {link['href']} points nowhere"

    screenshot = REPO / "results" / "report-screenshot.png"
    screenshot.parent.mkdir(exist_ok=True)
    screenshot.unlink(missing_ok=True)
    # The command-line screenshot covers the window only: make the window as tall as the page.
    height = min(int(state["height"]), 16000)
    shot = run_chromium(binary, tmp_path / "profile-shot", "--hide-scrollbars", f"--window-size=1280,{height}",
                        f"--screenshot={screenshot}", report.as_uri())
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 50_000
