"""Model bundles (brainvq/bundle.py): what a finished run writes for using its models, and every check on loading."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from brainvq import load_model
from brainvq.bundle import (
    BUNDLE_FORMAT,
    BundleChecksumError,
    BundleVersionError,
    ModelNotReadyError,
    bundle_package_versions,
    read_bundle,
    write_bundle,
)
from model_files import write_untrained_bundle, write_untrained_run


@pytest.fixture
def bundle(tmp_path):
    return write_untrained_bundle(tmp_path / "results" / "demo", run="demo", preprocess={"field_of_view_mm": 200})


def test_a_bundle_records_settings_source_metrics_versions_and_checksums(bundle):
    folder, manifest = read_bundle(bundle)
    assert folder == bundle and manifest["bundle_format"] == BUNDLE_FORMAT
    assert manifest["run"] == "demo" and manifest["source"] == "demo"
    assert manifest["preprocess"]["field_of_view_mm"] == 200 and manifest["preprocess"]["size"] == 32
    assert manifest["image_size"] == [32, 32] and manifest["code_map_size"] == [8, 8]
    assert manifest["codebook_size"] == 16 and manifest["pixel_mm"] == pytest.approx(50 * 4.0 / 32)
    assert manifest["evaluation"]["reconstruction"]["ssim_brain"]["over_scans"]["mean"] == 0.8
    assert manifest["training_data"] == {"train_scans": 2, "test_scans": 1, "subjects": 3}
    assert manifest["packages"] == bundle_package_versions() and manifest["packages"]["torch"]
    assert set(manifest["files"]) == {"vqvae.pt", "prior.pt"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


def test_load_model_takes_the_run_folder_the_bundle_or_a_copy_of_it(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "elsewhere" / "my-model")
    for path in (bundle.parent, bundle, copy):
        model = load_model(path)
        assert model.folder == path if path != bundle.parent else model.folder == bundle
        assert model.settings["field_of_view_mm"] == 200 and model.settings["on_error"] == "fail"
        assert model.vqvae.image_size == (32, 32) and not model.vqvae.training


def test_a_changed_or_missing_model_file_is_refused_naming_it_and_the_fix(bundle):
    with open(bundle / "prior.pt", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleChecksumError, match=r"prior.pt does not match the checksum in .*bundle.json.*"
                                                  r"forcerun bundle_model"):
        load_model(bundle)
    (bundle / "prior.pt").unlink()
    with pytest.raises(BundleChecksumError, match="prior.pt is missing from the model bundle"):
        read_bundle(bundle.parent)


def test_another_bundle_format_is_refused_naming_the_file_and_the_fix(bundle):
    manifest = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**manifest, "bundle_format": BUNDLE_FORMAT + 1}))
    with pytest.raises(BundleVersionError, match=rf"bundle.json is bundle format {BUNDLE_FORMAT + 1}.*rewrite the "
                                                 r"bundle from its run"):
        load_model(bundle)
    (bundle / "bundle.json").write_text("{not json")
    with pytest.raises(BundleVersionError, match="bundle.json cannot be read"):
        read_bundle(bundle)


def test_other_package_versions_warn_or_with_strict_versions_stop(bundle, caplog):
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["packages"]["torch"] = "1.0.0"
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        read_bundle(bundle)
    assert "torch 1.0.0 -> " in caplog.text
    with pytest.raises(BundleVersionError, match=r"other package versions \(torch 1.0.0 -> .*install the recorded"):
        read_bundle(bundle, strict_versions=True)


def test_an_unfinished_run_names_what_it_lacks_and_how_to_finish_it(tmp_path):
    run = tmp_path / "results" / "demo"
    write_untrained_run(run)
    (run / "prior" / "model.pt").unlink()
    with pytest.raises(ModelNotReadyError, match=r"results/demo is a run that has not finished \(it lacks "
                                                 r"prior/model.pt;.*snakemake --cores all"):
        read_bundle(run)
    with pytest.raises(ModelNotReadyError, match="run that has not finished"):
        load_model(run / "model")
    with pytest.raises(ModelNotReadyError, match="is neither a run folder .* nor a model bundle"):
        read_bundle(tmp_path / "nothing-here")


def test_a_failed_bundle_write_keeps_the_bundle_already_there(bundle, tmp_path):
    before = (bundle / "bundle.json").read_text()
    with pytest.raises(FileNotFoundError):
        write_bundle(bundle, bundle.parent / "vqvae" / "model.pt", tmp_path / "no-prior.pt", {"run": "demo"})
    assert (bundle / "bundle.json").read_text() == before
    assert sorted(p.name for p in bundle.parent.iterdir() if p.name.startswith(".")) == []
