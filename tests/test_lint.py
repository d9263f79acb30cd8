"""The workflow passes snakemake's linter and is formatted with snakefmt."""

from __future__ import annotations

import subprocess
import sys

import pytest

from snakemake_helpers import REPO, SOURCE_CONFIGS, apply_mode_config, child_env, run_snakemake

SNAKEMAKE_SOURCES = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]


@pytest.mark.parametrize("configs", SOURCE_CONFIGS, ids="+".join)
def test_snakemake_lint_finds_nothing(configs, tmp_path):
    # Linted once per data source, as some rules exist only for downloads; a workdir in tmp keeps
    # .snakemake/ out of the repo.
    configfiles = [REPO / "config" / name for name in configs]
    proc = run_snakemake(
        "--lint", "--snakefile", REPO / "Snakefile", "--directory", tmp_path,
        "--configfile", *configfiles, check=False, timeout=300,
    )
    assert proc.returncode == 0, f"snakemake --lint reported problems:\n{proc.stdout[-8000:]}"


def test_snakemake_lint_finds_nothing_in_apply_mode(tmp_path):
    proc = run_snakemake(
        "--lint", "--snakefile", REPO / "Snakefile", "--directory", tmp_path,
        "--configfile", REPO / "config" / "config.yaml", apply_mode_config(), check=False, timeout=300,
    )
    assert proc.returncode == 0, f"snakemake --lint reported problems in apply mode:\n{proc.stdout[-8000:]}"


def test_snakefmt_leaves_the_workflow_unchanged():
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "--diff", *map(str, SNAKEMAKE_SOURCES)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (
        f"snakefmt would reformat (run `snakefmt Snakefile rules/`):\n{proc.stdout[-8000:]}{proc.stderr[-2000:]}"
    )
