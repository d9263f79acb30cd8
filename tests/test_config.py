"""Start-up validation: what the config alone decides is refused before any job runs, naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from snakemake_helpers import copy_workflow, run_snakemake, tiny_config

from brainvq.config import ConfigError, check_startup, load_config, validated_config


def problems_of(**sections) -> str:
    """The start-up error's message for the schema-valid config ``sections`` ('' when it passes)."""
    try:
        check_startup(validated_config(sections))
    except ConfigError as error:
        return str(error)
    return ""


def test_the_default_and_shipped_configs_pass():
    assert problems_of() == ""
    load_config()


def test_an_image_size_not_divisible_by_the_downsampling_names_both_keys_and_a_size_that_works():
    message = problems_of(preprocess={"size": 24}, vqvae={"downsample": 16, "channels": [8, 8, 8, 8]})
    assert "preprocess.size: 24 px is not divisible by vqvae.downsample=16" in message
    assert "e.g. 32" in message


def test_a_whole_volume_box_the_model_cannot_downsample_names_the_keys_and_the_image_size_is_not_checked():
    volumes = {"dims": 3, "spacing_mm": 2.0, "size": 40}  # size (not a multiple of 16) applies to slices only
    model = {"downsample": 16, "channels": [8, 8, 8, 8]}
    assert problems_of(preprocess={**volumes, "box_mm": [160, 192, 160]}, vqvae=model) == ""  # 80 x 96 x 80
    message = problems_of(preprocess={**volumes, "box_mm": [162, 192, 160]}, vqvae=model)  # 81 voxels
    assert "preprocess.box_mm: [162, 192, 160] at spacing_mm=2 gives [81, 96, 80] voxels" in message
    assert "vqvae.downsample=16" in message and "multiples of 32 mm" in message
    message = problems_of(preprocess={**volumes, "box_mm": [161, 192, 160]}, vqvae=model)
    assert "whole number of 2 mm voxels" in message


def test_the_shipped_3d_configs_pass():
    for name in ("demo3d.yaml", "oasis1-3d.yaml"):
        config = load_config(Path(__file__).resolve().parents[1] / "config" / name)
        assert config["preprocess"]["dims"] == 3


def test_a_channels_list_that_does_not_fit_the_downsampling_names_the_key():
    message = problems_of(vqvae={"downsample": 8, "channels": [32, 64]})
    assert "vqvae.channels: [32, 64] has 2 levels but vqvae.downsample=8 needs 3" in message


@pytest.mark.parametrize(
    "regex, expected",
    [
        ("^(?P<subject>[A-Za-z0-9+", "is not a valid regular expression"),
        ("^(?P<id>[A-Za-z0-9]+)", "has no named group 'subject'"),
    ],
)
def test_a_subject_regex_that_cannot_work_names_the_key(regex, expected):
    message = problems_of(dataset={"subject_regex": regex})
    assert f"dataset.subject_regex: {regex!r} {expected}" in message


def test_paths_the_source_needs_must_exist_and_are_named_by_key(tmp_path):
    message = problems_of(dataset={"source": "local", "local_dir": str(tmp_path / "nowhere"),
                                   "participants": str(tmp_path / "p.tsv")})
    assert f"dataset.local_dir: {tmp_path / 'nowhere'} does not exist" in message
    assert f"dataset.participants: {tmp_path / 'p.tsv'} does not exist" in message
    # Another source does not read them: nothing to check.
    assert problems_of(dataset={"local_dir": str(tmp_path / "nowhere")}) == ""
    assert problems_of(dataset={"source": "local", "local_dir": str(tmp_path)}) == ""


def test_every_problem_is_reported_at_once():
    message = problems_of(preprocess={"size": 24, "clip_percentiles": [99, 1]},
                          vqvae={"downsample": 16, "channels": [8], "batch_size": 3, "gpus": 2},
                          dataset={"subject_regex": "("})
    keys = [line.split(":")[0].strip(" -") for line in message.splitlines()[1:]]
    assert keys == ["dataset.subject_regex", "preprocess.size", "vqvae.channels", "vqvae.batch_size",
                    "preprocess.clip_percentiles"]


def test_load_config_runs_the_start_up_checks(tmp_path):
    with pytest.raises(ConfigError, match="vqvae.channels"):
        load_config(overrides={"vqvae": {"downsample": 8, "channels": [32, 64]}})


@pytest.mark.slow
def test_the_workflow_refuses_a_bad_config_before_any_job_runs(tmp_path):
    workflow = copy_workflow(tmp_path / "wf")
    config = tiny_config(tmp_path / "config.yaml", {"preprocess": {"size": 40}, "vqvae": {"downsample": 16,
                                                                                          "channels": [8, 8]}})
    result = run_snakemake("--snakefile", workflow / "Snakefile", "--directory", tmp_path / "work", "--configfile",
                           config, "--cores", "1", check=False, timeout=300)
    assert result.returncode != 0
    assert "preprocess.size: 40 px is not divisible by vqvae.downsample=16" in result.stdout
    assert "vqvae.channels: [8, 8] has 2 levels but vqvae.downsample=16 needs 4" in result.stdout
    assert not (tmp_path / "work" / "results").exists() and not (tmp_path / "work" / "resources").exists()
