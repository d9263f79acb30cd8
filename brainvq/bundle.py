"""The model bundle (rule bundle_model): everything needed to use a trained run on new scans, in one folder.

``results/<run>/model/`` holds ``vqvae.pt`` and ``prior.pt`` (copies of the run's model files) and ``bundle.json``:
the bundle format, the preprocessing settings the models were trained with, the training source and run, the
run's own test metrics (for cross-dataset comparisons), the versions of the packages that wrote it and the
SHA-256 of each model file. :func:`read_bundle` checks all of that before anything is loaded.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shutil
from pathlib import Path

from brainvq import __version__
from brainvq.files import atomic_path
from brainvq.workflow import package_versions

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"
MODEL_FILES = {"vqvae": "vqvae.pt", "prior": "prior.pt"}
# Packages whose versions shape what a bundle computes: recorded, and compared when it is loaded.
BUNDLE_PACKAGES = ("torch", "numpy", "scipy", "nibabel", "scikit-image", "SimpleITK")
# What a finished run holds before its bundle is written (the bundle_model rule's inputs).
RUN_FILES = ("vqvae/model.pt", "prior/model.pt", "eval/metrics.json", "split.csv")


class BundleError(RuntimeError):
    """Base class: a model bundle cannot be used."""


class ModelNotReadyError(BundleError):
    """``apply.model`` names a run that has not finished (no bundle yet), or no run or bundle at all."""


class BundleVersionError(BundleError):
    """The bundle was written in another bundle format (or, when asked to be strict, other package versions)."""


class BundleChecksumError(BundleError):
    """A model file of the bundle is missing or differs from the checksum recorded in bundle.json."""


def sha256_of(path: str | Path) -> str:
    """Return the SHA-256 of a file, read in 1 MiB blocks (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_package_versions() -> dict:
    """Return the versions of Python, brainvq and BUNDLE_PACKAGES now installed."""
    return {**package_versions(BUNDLE_PACKAGES), "brainvq": __version__}


def model_description(vqvae_path: str | Path) -> dict:
    """Return what a bundle records about a VQ-VAE file: slice size, code map size, codebook size, bottleneck."""
    import torch

    from brainvq.training import load_vqvae

    model = load_vqvae(vqvae_path).eval()
    with torch.no_grad():
        code_map = model.encode_indices(torch.zeros(1, 1, *model.image_size))
    return {"image_size": list(model.image_size), "code_map_size": list(code_map.shape[1:]),
            "codebook_size": model.codebook_size, "bottleneck": type(model.bottleneck).__name__}


def run_description(vqvae_path: str | Path, metrics_json: str | Path, split_csv: str | Path, run: str,
                    source: str, attribution_html: str, preprocess: dict, anomaly_smoothing_fraction: float) -> dict:
    """Return what a run's bundle says about its models (see :func:`write_bundle`), read from the run's files.

    Args:
        vqvae_path, metrics_json, split_csv: the run's ``vqvae/model.pt``, ``eval/metrics.json`` and ``split.csv``.
        run, source, attribution_html: the run's name and its data source's name and attribution.
        preprocess: the ``preprocess`` section the models were trained with.
        anomaly_smoothing_fraction: ``evaluate.anomaly_smoothing_fraction``, how anomaly maps are smoothed.
    """
    from brainvq.data import read_split
    from brainvq.preprocessing import pixel_mm

    if preprocess["skull_strip"] == "auto":
        raise ValueError("preprocess.skull_strip 'auto' must be resolved by the run's source before bundling "
                         "(brainvq.sources.Source.resolved_preprocess): a bundle records the method used")
    metrics = json.loads(Path(metrics_json).read_text())
    split = read_split(split_csv)
    return {
        "run": run, "source": source, "attribution_html": attribution_html,
        "preprocess": preprocess, "pixel_mm": pixel_mm(preprocess), **model_description(vqvae_path),
        "anomaly_smoothing_fraction": anomaly_smoothing_fraction,
        "training_data": {f"{name}_scans": int((split["split"] == name).sum()) for name in ("train", "test")}
        | {"subjects": int(split["subject"].nunique())},
        "evaluation": {key: metrics.get(key) for key in ("reconstruction", "codebook", "n_test_scans",
                                                           "n_test_subjects", "n_test_slices")},
    }


def untrained_bundle(out_dir: str | Path, config: dict, run: str = "untrained", seed: int = 0) -> Path:
    """Write a bundle of untrained models built from a validated config's ``vqvae`` and ``pixelcnn`` sections
    (random weights, in the files' real formats); return its folder.

    For timing the apply workflow, whose speed does not depend on the weights, and for tests. Its bundle.json
    says ``untrained: true`` and has no training data or evaluation.
    """
    import tempfile

    import torch

    from brainvq.engine import MODEL_FILE_FORMAT
    from brainvq.models import build_vqvae
    from brainvq.preprocessing import pixel_mm
    from brainvq.prior import build_prior, model_kwargs
    from brainvq.sources import get_source

    torch.manual_seed(seed)
    # A bundle records the method used, never 'auto' (which depends on the source the models were trained on).
    preprocess = get_source(config["dataset"]["source"]).resolved_preprocess(config["preprocess"])
    size = config["preprocess"]["size"]
    with tempfile.TemporaryDirectory() as tmp:
        vqvae_path, prior_path = Path(tmp) / "vqvae.pt", Path(tmp) / "prior.pt"
        # The model files brainvq.engine.train writes, at step 0.
        vqvae = build_vqvae(config["vqvae"])
        torch.save({"format": MODEL_FILE_FORMAT, "section": "vqvae", "config": config["vqvae"],
                    "model": vqvae.state_dict(), "step": 0, "image_size": [size, size]}, vqvae_path)
        described = model_description(vqvae_path)
        kwargs = model_kwargs(config["pixelcnn"], described["codebook_size"], described["code_map_size"], 0)
        prior = build_prior(kwargs, config=config["pixelcnn"])
        torch.save({"format": MODEL_FILE_FORMAT, "section": "pixelcnn", "config": config["pixelcnn"],
                    "model": prior.state_dict(), "step": 0, "model_kwargs": kwargs,
                    "codebook_size": described["codebook_size"], "label_classes": [], "condition_label": None,
                    "map_size": described["code_map_size"]}, prior_path)
        description = {
            "run": run, "source": config["dataset"]["source"], "attribution_html": "", "untrained": True,
            "preprocess": preprocess, "pixel_mm": pixel_mm(preprocess), **described,
            "anomaly_smoothing_fraction": config["evaluate"]["anomaly_smoothing_fraction"],
            "training_data": None, "evaluation": None,
        }
        write_bundle(out_dir, vqvae_path, prior_path, description)
    return Path(out_dir)


def write_bundle(out_dir: str | Path, vqvae_path: str | Path, prior_path: str | Path, description: dict) -> Path:
    """Write the bundle folder ``out_dir`` (atomically: complete or not at all); return its bundle.json.

    Args:
        out_dir: the bundle folder, ``results/<run>/model``.
        vqvae_path, prior_path: the run's ``vqvae/model.pt`` and ``prior/model.pt``.
        description: what the bundle says about its models: ``run``, ``source``, ``preprocess`` (the section
            they were trained with), ``image_size``, ``codebook_size``, ``evaluation`` (the run's test metrics)
            and any other plain values; format, packages, checksums and time are added here.
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        files = {}
        for source, name in ((vqvae_path, MODEL_FILES["vqvae"]), (prior_path, MODEL_FILES["prior"])):
            shutil.copyfile(source, tmp / name)
            files[name] = {"sha256": sha256_of(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest = {
            "bundle_format": BUNDLE_FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **description,
            "packages": bundle_package_versions(),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return out_dir / MANIFEST


def not_ready_message(run_dir: Path) -> str:
    missing = [name for name in RUN_FILES if not (run_dir / name).exists()]
    stage = f"it lacks {', '.join(missing)}" if missing else f"it has trained models but no {MANIFEST} yet"
    return (
        f"{run_dir} is a run that has not finished ({stage}; {run_dir / 'model' / MANIFEST} is written at its end). "
        f"Finish it first: snakemake --cores all --configfile <that run's config file> (it resumes where it stopped; "
        f"the target {run_dir / 'model'} alone writes just the bundle once the models exist)"
    )


def bundle_folder(path: str | Path) -> Path:
    """Return the bundle folder of ``path``: ``path`` itself when it holds bundle.json, else ``path/model``.

    Raises:
        ModelNotReadyError: ``path`` is a run folder without a finished bundle, or neither a run nor a bundle.
    """
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / MANIFEST).is_file():
            return candidate
    if path.is_dir() and any((path / marker).exists() for marker in ("subjects.tsv", "vqvae", "split.csv")):
        raise ModelNotReadyError(not_ready_message(path))
    if path.name == "model" and path.parent.is_dir():
        raise ModelNotReadyError(not_ready_message(path.parent))
    raise ModelNotReadyError(
        f"{path} is neither a run folder (results/<run>, from a finished training run) nor a model bundle "
        f"(a folder holding {MANIFEST}); set apply.model (or the path given to brainvq.load_model) to one"
    )


def check_files(folder: Path, manifest: dict) -> None:
    """Raise BundleChecksumError unless every model file matches its recorded SHA-256."""
    for name in MODEL_FILES.values():
        path = folder / name
        expected = manifest.get("files", {}).get(name, {}).get("sha256")
        if not path.is_file():
            raise BundleChecksumError(
                f"{path} is missing from the model bundle; copy the whole {folder} folder again, or rewrite the "
                "bundle from its run (snakemake --cores 1 --forcerun bundle_model <run folder>/model)"
            )
        actual = sha256_of(path)
        if actual != expected:
            raise BundleChecksumError(
                f"{path} does not match the checksum in {folder / MANIFEST} (sha256 {actual[:12]}... instead of "
                f"{str(expected)[:12]}...): it was changed, truncated or swapped after the bundle was written. Copy "
                "the bundle again, or rewrite it from its run (snakemake --cores 1 --forcerun bundle_model "
                "<run folder>/model)"
            )


def version_differences(recorded: dict, current: dict) -> list[str]:
    """Return 'package recorded -> current' for each package whose version differs."""
    return [f"{name} {recorded[name]} -> {current.get(name)}" for name in sorted(recorded)
            if recorded[name] != current.get(name)]


def trained_preprocess(manifest: dict, on_error: str | None = None) -> dict:
    """Return the ``preprocess`` section a bundle's models were trained with (schema defaults filled for keys
    added since), with ``on_error`` of the run that applies them when given."""
    from brainvq.config import validated_config

    section = {**manifest["preprocess"], **({"on_error": on_error} if on_error else {})}
    return validated_config({"preprocess": section})["preprocess"]


def read_bundle(path: str | Path, strict_versions: bool = False) -> tuple[Path, dict]:
    """Return (bundle folder, its manifest) after checking format, checksums and package versions.

    Args:
        path: a run folder (``results/<run>``) or a bundle folder (holding bundle.json).
        strict_versions: treat other package versions than the recorded ones as an error (default: a warning;
            the models load, but results may differ in the last digits).

    Raises:
        ModelNotReadyError: see :func:`bundle_folder`.
        BundleVersionError: another bundle format (or, with ``strict_versions``, other package versions).
        BundleChecksumError: a model file missing or changed.
    """
    folder = bundle_folder(path)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise BundleVersionError(f"{manifest_path} cannot be read ({error}); rewrite the bundle from its run "
                                 "(snakemake --cores 1 --forcerun bundle_model <run folder>/model)") from error
    written = manifest.get("bundle_format")
    if written != BUNDLE_FORMAT:
        raise BundleVersionError(
            f"{manifest_path} is bundle format {written}, this brainvq ({__version__}) reads format {BUNDLE_FORMAT}; "
            "rewrite the bundle from its run with this version (snakemake --cores 1 --forcerun bundle_model "
            f"<run folder>/model), or use brainvq {manifest.get('packages', {}).get('brainvq')} to apply it"
        )
    check_files(folder, manifest)
    differences = version_differences(manifest.get("packages", {}), bundle_package_versions())
    if differences and strict_versions:
        raise BundleVersionError(
            f"{manifest_path} was written with other package versions ({'; '.join(differences)}); install the "
            "recorded versions (pyproject.toml pins them), or load without strict_versions"
        )
    if differences:
        log.warning("%s was written with other package versions (%s); results may differ in the last digits",
                    manifest_path, "; ".join(differences))
    return folder, manifest
