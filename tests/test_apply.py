"""Applying a trained model to new scans, end to end: the tiny pipeline trained once (shared with test_rerun.py),
then `snakemake --configfile <apply config>` on scans of another size, orientation and format."""

from __future__ import annotations

import glob
import html
import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from nibabel.processing import resample_from_to

from brainvq import load_model
from brainvq.apply import ApplyInputError, applied_metrics
from brainvq.io import brain_mask_path, is_brain_mask_path, load_volume
from brainvq.qc import ForegroundVolumeError
from snakemake_helpers import (
    REPO,
    apply_mode_config,
    missing_pipeline_rules,
    run_snakemake,
    shared_tiny_run,
    tiny_config,
)
from test_reporting import PAGE_CHECK, chromium, run_chromium
from volume_trees import nifti, write_dicom_series

NAME = "newscans"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    missing = missing_pipeline_rules()
    if missing:
        pytest.skip(f"the pipeline is not complete yet (missing rules: {', '.join(missing)})")
    return shared_tiny_run(tmp_path_factory)


def demo_head_paths(trained) -> list[Path]:
    """Two of the demo cohort's IXI-like heads (each has its brain mask beside it)."""
    paths = sorted(Path(p) for p in glob.glob(str(trained.workdir / "resources/demo/*/IXI/*.nii.gz")))
    return [path for path in paths if not is_brain_mask_path(path)][:2]


def demo_heads(trained) -> list[nib.Nifti1Image]:
    """Two of the demo cohort's IXI-like heads, as brainvq reads them."""
    return [load_volume(path) for path in demo_head_paths(trained)]


def demo_brains(trained) -> list[nib.Nifti1Image]:
    """The same two heads skull-stripped with their own brain masks (what the tiny model, trained with
    skull_strip precomputed, was trained on)."""
    return [nib.Nifti1Image(head.get_fdata() * (load_volume(brain_mask_path(path)).get_fdata() > 0), head.affine)
            for path, head in zip(demo_head_paths(trained), demo_heads(trained))]


def scanner_units(data: np.ndarray) -> np.ndarray:
    """Return a [0, 1] demo volume as int16 in 0..1000, as a scanner stores it (a plain cast would keep 2 levels)."""
    return np.round(np.clip(data, 0, None) / max(float(data.max()), 1e-6) * 1000).astype(np.int16)


PIL_GRID = ((52, 50, 60), np.array([[0, 0, -3.0, 90], [-3.0, 0, 0, 110], [0, -3.0, 0, 80], [0, 0, 0, 1]]))


@pytest.fixture(scope="module")
def new_scans(trained, tmp_path_factory) -> Path:
    """Scans on other grids than the training scans', prepared as the model (skull_strip precomputed) needs: a
    head of 3 mm voxels stored P-I-L (a NIfTI file) with its brain mask beside it, and a skull-stripped brain of
    2.5 mm RAS voxels of another field of view (a DICOM series, which cannot carry a mask file)."""
    folder = tmp_path_factory.mktemp("new-scans")
    first, second = demo_heads(trained)
    pil = PIL_GRID[1]
    nib.save(nifti(scanner_units(resample_from_to(first, PIL_GRID, order=1).get_fdata()), pil),
             folder / "pat01.nii.gz")
    mask = resample_from_to(load_volume(brain_mask_path(demo_head_paths(trained)[0])), PIL_GRID, order=1)
    nib.save(nifti((mask.get_fdata() > 0.5).astype(np.uint8), pil), folder / "pat01_brainmask.nii.gz")
    ras = np.diag([2.5, 2.5, 2.5, 1.0])
    ras[:3, 3] = [-80, -100, -70]
    data = resample_from_to(demo_brains(trained)[1], ((64, 80, 60), ras), order=1).get_fdata()
    write_dicom_series(nifti(scanner_units(data), ras), folder / "pat02")
    return folder


def apply_config(trained, path: Path, input_dir: Path, model: str = "results/tiny", **apply) -> Path:
    """The tiny config with an apply section: apply.model, apply.name and a local input folder."""
    changes = {"apply": {"model": model, "name": NAME, "input": {"source": "local", "local_dir": str(input_dir)},
                         **apply}}
    return tiny_config(path, changes)


@pytest.fixture(scope="module")
def applied(trained, new_scans, tmp_path_factory) -> Path:
    config = apply_config(trained, tmp_path_factory.mktemp("apply") / "apply.yaml", new_scans)
    trained.snakemake(configfile=config)
    return trained.workdir / "results" / "tiny" / "apply" / NAME


@pytest.mark.slow
def test_reconstructions_and_anomaly_maps_lie_on_each_input_files_own_grid(applied, new_scans):
    scans = pd.read_csv(applied / "subjects.tsv", sep="\t")
    assert scans["scan"].tolist() == ["pat01", "pat02"] and scans["format"].tolist() == ["nifti", "dicom"]
    for scan, path in zip(scans["scan"], scans["path"]):
        source = load_volume(path)
        for kind in ("recon", "anomaly"):
            output = nib.load(applied / kind / f"{scan}.nii.gz")
            assert output.shape == source.shape, (scan, kind)
            np.testing.assert_allclose(output.affine, source.affine, atol=1e-4)
            assert nib.aff2axcodes(output.affine) == nib.aff2axcodes(source.affine)
        recon = nib.load(applied / "recon" / f"{scan}.nii.gz").get_fdata()
        brain = recon > 0
        assert brain.mean() > 0.05 and np.corrcoef(source.get_fdata()[brain], recon[brain])[0, 1] > 0.2


@pytest.mark.slow
def test_codes_are_readable_maps_of_every_kept_slice_listed_in_the_index(applied):
    index = pd.read_csv(applied / "codes" / "index.csv")
    for scan, rows in index.groupby("scan"):
        codes = np.load(applied / "codes" / f"{scan}.npy")
        assert codes.dtype == np.int16 and codes.shape == (len(rows), 8, 8)
        assert codes.min() >= 0 and codes.max() < 64
        assert rows["row"].tolist() == list(range(len(rows))) and rows["slice_position"].between(0, 1).all()
    assert sorted(index["scan"].unique()) == ["pat01", "pat02"]


@pytest.mark.slow
def test_metrics_name_both_sources_and_set_the_applied_scans_next_to_the_trained_run(applied):
    metrics = json.loads((applied / "metrics.json").read_text())
    assert metrics["trained_on"]["source"] == "demo" and metrics["trained_on"]["run"] == "tiny"
    assert metrics["applied_to"]["source"] == "local" and metrics["applied_to"]["n_scans"] == 2
    assert metrics["cross_dataset"] is True
    ssim = next(row for row in metrics["comparison"] if row["metric"] == "ssim_brain")
    assert 0 < ssim["applied_scans"] < 1 and 0 < ssim["trained_run_test_scans"] < 1
    assert [row["scan"] for row in metrics["per_scan"]] == ["pat01", "pat02"]
    assert all(row["codes_used"] > 0 for row in metrics["per_scan"])
    assert metrics["codebook"]["codebook_size"] == 64 and metrics["preprocess"]["size"] == 32


@pytest.mark.slow
def test_the_report_states_both_sources_and_opens_with_every_image_and_link_working(applied, tmp_path):
    report = applied / "report" / "index.html"
    page = report.read_text(encoding="utf-8")
    assert "Trained on <strong>demo</strong>, applied to <strong>local</strong>" in page
    assert "yes: the model never saw data from this source" in page
    binary = chromium()
    checked = report.with_name("checked.html")
    checked.write_text(page.replace("</body>", PAGE_CHECK + "</body>"), encoding="utf-8")
    dumped = run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    checked.unlink()
    if dumped.returncode != 0:
        pytest.skip(f"Chromium cannot run here (exit {dumped.returncode}): {dumped.stderr[-500:]}")
    found = re.search(r'<pre id="brainvq-check"[^>]*>(.*?)</pre>', dumped.stdout, re.S)
    state = json.loads(html.unescape(found.group(1)))
    assert len(state["images"]) == 2 and all(i["complete"] and i["width"] > 0 for i in state["images"])
    files = [link["href"] for link in state["links"] if not urlparse(link["href"]).scheme and link["target"] is None]
    assert len(files) == 8 and all((report.parent / href).resolve().is_file() for href in files)


@pytest.mark.slow
def test_a_dark_lesion_stands_out_in_the_anomaly_map_and_the_clean_scan_does_not(trained):
    model = load_model(trained.workdir / "results" / "tiny")
    head = demo_brains(trained)[1]  # the model was trained on skull-stripped brains
    data = head.get_fdata()
    zooms = np.sqrt((head.affine[:3, :3] ** 2).sum(0))
    centre = np.argwhere(data > np.percentile(data[data > 0], 50)).mean(0)
    distance = np.sqrt((((np.indices(data.shape).transpose(1, 2, 3, 0) - centre) * zooms) ** 2).sum(-1))
    lesion = distance < 12
    lesioned = data.copy()
    lesioned[lesion] = 0.25 * np.median(data[data > 0])
    clean = model.anomaly_map(head).get_fdata()
    sick = model.anomaly_map(nib.Nifti1Image(lesioned.astype(np.float32), head.affine)).get_fdata()
    far = (clean > 0) & (distance > 30)
    assert sick[lesion].mean() > 1.5 * clean[lesion].mean()
    # The tiny model reconstructs every brain voxel roughly, so the lesion is judged against the spread far from it:
    # above most of it with the lesion, not without; and the lesion changes the map only where it is.
    assert sick[lesion].mean() > np.percentile(sick[far], 90) > clean[lesion].mean()
    assert (sick - clean)[lesion].mean() > 50 * np.abs(sick - clean)[far].mean()


@pytest.mark.slow
def test_a_bad_input_stops_naming_the_file_and_keeps_everything_already_written(trained, applied, new_scans, tmp_path):
    folder = shutil.copytree(new_scans, tmp_path / "scans")
    blob = (folder / "pat01.nii.gz").read_bytes()
    (folder / "pat03.nii.gz").write_bytes(blob[: len(blob) // 3])
    kept = {path: path.stat().st_mtime_ns for path in [*applied.glob("*/*.nii.gz"), *applied.glob("codes/*"),
                                                         applied / "report" / "index.html", applied / "metrics.json"]}
    bundle = trained.workdir / "results" / "tiny" / "model" / "bundle.json"
    bundle_time = bundle.stat().st_mtime_ns
    proc = trained.snakemake(configfile=apply_config(trained, tmp_path / "apply.yaml", folder), check=False)
    assert proc.returncode != 0
    assert "CorruptVolumeError" in proc.stdout and "pat03.nii.gz" in proc.stdout
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert bundle.stat().st_mtime_ns == bundle_time


@pytest.mark.slow
def test_a_head_given_to_a_model_of_skull_stripped_brains_is_refused_naming_the_mask_it_lacks(trained, tmp_path):
    model = load_model(trained.workdir / "results" / "tiny")
    path = demo_head_paths(trained)[0]
    assert model.encode(path).shape[0] > 0  # its brain mask lies beside it
    alone = Path(shutil.copy(path, tmp_path / "head.nii.gz"))
    for volume in (alone, load_volume(alone)):
        with pytest.raises(ForegroundVolumeError, match=r"above 3000 cm³.*a head, not a brain") as error:
            model.encode(volume)
        assert "skull-strip it first" in str(error.value) and "qc.max_brain_cm3" in str(error.value)
    with pytest.raises(ForegroundVolumeError, match="no head_brainmask.nii.gz beside it"):
        model.encode(alone)


@pytest.mark.slow
def test_a_head_without_its_mask_is_left_out_with_the_reason_in_skip_mode(trained, new_scans, tmp_path):
    folder = shutil.copytree(new_scans, tmp_path / "scans")
    shutil.copy(folder / "pat01.nii.gz", folder / "pat05.nii.gz")  # the head, without pat05_brainmask.nii.gz
    config = apply_config(trained, tmp_path / "apply.yaml", folder, name="heads", on_error="skip")
    trained.snakemake(configfile=config)
    metrics = json.loads((trained.workdir / "results" / "tiny" / "apply" / "heads" / "metrics.json").read_text())
    [excluded] = metrics["applied_to"]["excluded"]
    assert excluded["scan"] == "pat05" and "ForegroundVolumeError" in excluded["reason"]
    assert "brain mask size" in excluded["reason"] and "pat05_brainmask.nii.gz" in excluded["reason"]
    assert [row["scan"] for row in metrics["per_scan"]] == ["pat01", "pat02"]


@pytest.mark.slow
def test_an_unfinished_model_stops_the_run_at_start_naming_what_it_lacks(trained, new_scans, tmp_path):
    unfinished = trained.workdir / "results" / "half-trained"
    (unfinished / "vqvae").mkdir(parents=True, exist_ok=True)
    shutil.copy(trained.workdir / "results" / "tiny" / "vqvae" / "model.pt", unfinished / "vqvae" / "model.pt")
    config = apply_config(trained, tmp_path / "apply.yaml", new_scans, model="results/half-trained")
    proc = trained.snakemake("--dry-run", configfile=config, check=False)
    assert proc.returncode != 0
    assert "ModelNotReadyError" in proc.stdout and "lacks prior/model.pt" in proc.stdout
    assert not (unfinished / "apply").exists()


# ------------------------------------------------------------------------------ metrics of an applied folder


def scan_record(scan: str, subject: str, n_slices: int, ssim_brain: float) -> dict:
    """A scans/<scan>.json record as apply_scan writes it."""
    metrics = {"ssim": [0.5] * n_slices, "ssim_brain": [ssim_brain] * n_slices, "psnr_db": [20.0] * n_slices,
               "psnr_brain_db": [18.0] * n_slices, "mse": [0.01] * n_slices, "mse_brain": [0.02] * n_slices,
               "ms_ssim": [float("nan")] * n_slices, "ms_ssim_brain": [float("nan")] * n_slices}
    return {"scan": scan, "subject": subject, "session": "", "n_slices": n_slices, "slice_index": list(range(n_slices)),
            "slice_position": list(np.linspace(0, 1, n_slices)), "metrics": metrics if n_slices else {},
            "excluded_reason": "" if n_slices else "empty mask after skull_strip=none", "codes_used": 3,
            "perplexity": 2.5, "anomaly_mean_brain": 0.1, "anomaly_p99_brain": 0.3}


MANIFEST = {"run": "ixi", "source": "ixi", "codebook_size": 8, "preprocess": {"size": 32},
            "training_data": {"train_scans": 500, "test_scans": 58, "subjects": 558},
            "evaluation": {"reconstruction": {"ssim_brain": {"over_scans": {"mean": 0.9}}},
                           "codebook": {"codes_used": 8}}}
ABOUT = {"name": "oasis", "model": "results/ixi", "input_source": "oasis1", "input_folder": "/data/oasis"}
PROBE_SETTINGS = {"probe_cv_folds": 3, "probe_n_penalties": 4, "probe_permutations": 50, "bootstrap_resamples": 50,
                  "seed": 0}


def test_applied_metrics_compare_with_the_trained_run_and_list_excluded_scans():
    records = [scan_record("s1", "s1", 4, 0.7), scan_record("s2", "s2", 6, 0.6), scan_record("s3", "s3", 0, 0)]
    codes = {"s1": np.zeros((4, 2, 2), np.int16), "s2": np.ones((6, 2, 2), np.int16), "s3": np.zeros((0, 2, 2))}
    metrics, per_scan, index = applied_metrics(records, codes, MANIFEST, pd.DataFrame(columns=["subject", "session"]),
                                               ABOUT, None, PROBE_SETTINGS)
    assert metrics["trained_on"]["source"] == "ixi" and metrics["applied_to"]["source"] == "oasis1"
    assert metrics["cross_dataset"] is True and metrics["probe"] is None
    assert metrics["applied_to"]["excluded"] == [{"scan": "s3", "reason": "empty mask after skull_strip=none"}]
    ssim = next(row for row in metrics["comparison"] if row["metric"] == "ssim_brain")
    assert ssim["trained_run_test_scans"] == 0.9 and ssim["applied_scans"] == pytest.approx(0.65)
    assert ssim["difference"] == pytest.approx(-0.25)
    assert metrics["reconstruction"]["ssim_brain"]["over_slices"]["mean"] == pytest.approx((4 * 0.7 + 6 * 0.6) / 10)
    assert metrics["codebook"]["codes_used"] == 2 and per_scan["scan"].tolist() == ["s1", "s2"]
    assert len(index) == 10 and index.loc[index["scan"] == "s2", "row"].tolist() == list(range(6))
    with pytest.raises(ApplyInputError, match="every scan was excluded"):
        applied_metrics(records[2:], codes, MANIFEST, pd.DataFrame(), ABOUT, None, PROBE_SETTINGS)


def test_a_probe_on_applied_codes_finds_a_label_the_codes_carry_and_not_an_unrelated_one():
    rng = np.random.default_rng(0)
    subjects = [f"p{i:02d}" for i in range(24)]
    group = ["patient" if i % 2 else "control" for i in range(24)]
    records = [scan_record(s, s, 5, 0.5) for s in subjects]
    # Patients' scans use codes 4-7 more often than controls': the codes carry the group.
    codes = {s: rng.choice(8, size=(5, 2, 2), p=[0.2] * 4 + [0.05] * 4 if g == "control" else [0.05] * 4 + [0.2] * 4)
             for s, g in zip(subjects, group)}
    # 'half' splits the subjects into halves of six patients and six controls each: the codes say nothing of it.
    participants = pd.DataFrame({"subject": subjects, "session": "", "group": group, "half": ["a"] * 12 + ["b"] * 12})
    good, _, _ = applied_metrics(records, codes, MANIFEST, participants, ABOUT, "group", PROBE_SETTINGS)
    assert good["probe"]["target"] == "group" and good["probe"]["codes"]["auroc"] > 0.9
    assert good["probe"]["codes"]["p_value"] < 0.05
    bad, _, _ = applied_metrics(records, codes, MANIFEST, participants, ABOUT, "half", PROBE_SETTINGS)
    assert bad["probe"]["codes"]["auroc"] < 0.75


def test_apply_mode_names_the_key_and_the_fix_when_its_folder_of_scans_is_missing(tmp_path):
    # The real workflow, parsing an apply config whose folder of scans does not exist: it stops before any job.
    config = yaml.safe_load(apply_mode_config().read_text())
    missing = tmp_path / "no-such-scans"
    config["apply"]["input"]["local_dir"] = str(missing)
    configfile = tmp_path / "apply.yaml"
    configfile.write_text(yaml.safe_dump(config))
    proc = run_snakemake("-s", REPO / "Snakefile", "-d", tmp_path / "work", "--configfile", REPO / "config" /
                         "config.yaml", configfile, "-n", "--cores", "1", check=False, timeout=300)
    assert proc.returncode != 0
    assert str(missing) in proc.stdout and "apply.input.local_dir" in proc.stdout, proc.stdout[-3000:]
    assert not (tmp_path / "work" / "results").exists()
