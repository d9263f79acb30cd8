"""Cluster execution: profiles/slurm sends every job through sbatch on a real (single-node) SLURM.

The cluster comes from .ci/slurm.sh (Debian's slurm-wlm + munge, started as root). Where none is
running and none can be started (not root, no apt, not Linux) the tests skip with the reason,
unless BRAINVQ_REQUIRE_SLURM=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from snakemake_helpers import (
    REPO,
    executed_jobs,
    load_rules,
    missing_pipeline_rules,
    run_snakemake,
    shared_tiny_run,
    tiny_config,
)

SLURM_SH = REPO / ".ci" / "slurm.sh"
PROFILE = REPO / "profiles" / "slurm"
REQUIRED = os.environ.get("BRAINVQ_REQUIRE_SLURM") == "1"
# Per-job memory for the test cluster: small enough for two jobs on a CI runner.
TEST_MEM_MB = 1000
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")

pytestmark = pytest.mark.slow


def unavailable(reason: str):
    """Skip (or, where SLURM is required, fail) with ``reason``."""
    if REQUIRED:
        pytest.fail(f"BRAINVQ_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def idle_nodes() -> list[str]:
    """Nodes a job can start on now (sinfo), or [] when no cluster answers."""
    if not shutil.which("sinfo"):
        return []
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if re.search(r" (idle|mixed)", line)]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A SLURM cluster that answers sinfo: the running one, or one started here and stopped after."""
    if idle_nodes():
        yield "running"
        return
    if sys.platform != "linux":
        unavailable("SLURM tests need Linux")
    if os.geteuid() != 0:
        unavailable("no SLURM cluster answers sinfo, and starting one (.ci/slurm.sh start) needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        unavailable("no SLURM installed and no apt-get to install slurm-wlm")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "BRAINVQ_SLURM_STATE": str(state)}
    proc = subprocess.run([str(SLURM_SH), "start"], env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0 or not idle_nodes():
        subprocess.run([str(SLURM_SH), "stop"], env=env, capture_output=True, timeout=120)
        unavailable(f".ci/slurm.sh start failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        yield "started"
    finally:
        # Kills exactly the daemons this start recorded (their PIDs are in the state folder).
        subprocess.run([str(SLURM_SH), "stop"], env=env, capture_output=True, timeout=120)


def slurm_test_args(rule_resources: dict | None = None) -> list[str]:
    """Command-line overrides that make profiles/slurm fit the one-node, GPU-less test cluster.

    Every other profile entry (executor, jobs, runtimes, ...) stays in force. Command-line
    `--set-resources`/`--default-resources` replace the profile's whole entry, so the profile's
    values are repeated here with GPUs set to 0 and memory capped.
    """
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    set_resources: dict[str, dict] = {}
    for rule, resources in (profile.get("set-resources") or {}).items():
        set_resources[rule] = {k: v for k, v in resources.items() if k not in ("gpu_model", "slurm_partition")}
    for rule, resources in (rule_resources or {}).items():
        if "gpu" in resources:
            set_resources.setdefault(rule, {})
    for rule, resources in set_resources.items():
        resources["gpu"] = 0
        resources["mem_mb"] = min(int(resources.get("mem_mb", TEST_MEM_MB)), TEST_MEM_MB)
    defaults = dict(profile.get("default-resources") or {})
    for key in ("slurm_partition", "slurm_account"):
        defaults.pop(key, None)
    defaults["mem_mb"] = TEST_MEM_MB
    args = [
        "--slurm-no-account",
        "--slurm-status-command", "squeue",
        # The plugin's default first poll comes 40 s after a submission; a tiny job takes seconds.
        "--slurm-init-seconds-before-status-checks", "1",
        "--slurm-keep-successful-logs",
        "--max-threads", str(os.cpu_count() or 1),
        "--default-resources", *(f"{k}={v}" for k, v in defaults.items()),
    ]
    pairs = [f"{rule}:{k}={v}" for rule, resources in set_resources.items() for k, v in resources.items()]
    if pairs:
        args += ["--set-resources", *pairs]
    return args


def assert_every_job_went_through_sbatch(output: str, workdir: Path) -> Counter:
    """Check that each non-local job of a finished run was an sbatch job with its own SLURM log.

    Returns the executed jobs (rule -> count). Rules the workflow marks `localrules` run on the
    submitting host by design and are left out of the check.
    """
    counts, local = executed_jobs(output)
    submissions = SUBMITTED.findall(output)
    assert counts, f"the run did nothing:\n{output[-3000:]}"
    remote = counts - local
    assert len(submissions) == sum(remote.values()), (
        f"{len(submissions)} sbatch submissions for {sum(remote.values())} non-local jobs "
        f"(local: {dict(local)}):\n{output[-5000:]}"
    )
    assert len({slurm_id for _, slurm_id in submissions}) == len(submissions), "a SLURM job id was reused"
    logs = workdir / ".snakemake" / "slurm_logs"
    for rule, count in remote.items():
        rule_logs = list((logs / f"rule_{rule}").rglob("*.log"))
        assert len(rule_logs) == count, f"rule {rule}: {len(rule_logs)} SLURM logs for {count} jobs"
    return counts


# ---- the SLURM round trip, on a throwaway workflow ---------------------------------------------

ROUND_TRIP_SNAKEFILE = """
SCANS = ["s1", "s2", "s3"]


rule all:
    input:
        "merged.txt",


rule per_scan:
    output:
        "per_scan/{scan}.txt",
    log:
        "logs/per_scan/{scan}.log",
    resources:
        gpu=1,
    shell:
        "echo {wildcards.scan} ${{SLURM_JOB_ID:-none}} > {output} 2> {log}"


rule train_vqvae:
    input:
        expand("per_scan/{scan}.txt", scan=SCANS),
    output:
        "merged.txt",
    log:
        "logs/merged.log",
    shell:
        "cat {input} > {output}; echo merge ${{SLURM_JOB_ID:-none}} >> {output} 2> {log}"
"""


def test_a_workflow_runs_job_by_job_through_sbatch_with_the_slurm_profile(slurm_cluster, tmp_path):
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(ROUND_TRIP_SNAKEFILE)
    # The workflow profile is picked up as in the real workflow, next to the slurm profile.
    shutil.copytree(REPO / "profiles", workdir / "profiles")
    start = time.monotonic()
    proc = run_snakemake(
        "--profile", PROFILE, *slurm_test_args({"per_scan": {"gpu": 1}}),
        cwd=workdir, timeout=600,
    )
    wall_s = time.monotonic() - start
    counts = assert_every_job_went_through_sbatch(proc.stdout, workdir)
    assert counts == {"per_scan": 3, "train_vqvae": 1}
    lines = (workdir / "merged.txt").read_text().split()
    job_ids = lines[1::2]
    assert lines[0::2] == ["s1", "s2", "s3", "merge"]
    # Each job ran inside its own SLURM allocation.
    assert "none" not in job_ids and len(set(job_ids)) == 4, job_ids
    print(f"SLURM round trip: 4 jobs in {wall_s:.1f} s")


PROFILE_SNAKEFILE = """
rule all:
    input:
        [f"{name}.txt" for name in ("train_vqvae", "train_pixelcnn", "sample", "quantize", "report")],


rule train_vqvae:
    output:
        "train_vqvae.txt",
    threads: 8
    resources:
        gpu=2,
    shell:
        "touch {output}"


rule train_pixelcnn:
    output:
        "train_pixelcnn.txt",
    threads: 2
    resources:
        gpu=1,
    shell:
        "touch {output}"


rule sample:
    output:
        "sample.txt",
    resources:
        gpu=1,
    shell:
        "touch {output}"


rule quantize:
    output:
        "quantize.txt",
    shell:
        "touch {output}"


rule report:
    output:
        "report.txt",
    shell:
        "touch {output}"
"""


def submitted_resources(output: str) -> dict[str, dict[str, str]]:
    """rule -> {resource: value} as a (dry) run prints each job's resources."""
    resources = {}
    for block in re.split(r"^(?=(?:local)?(?:rule|checkpoint) \w+:)", output, flags=re.M):
        head = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        found = re.search(r"^\s+resources: ([^\n]+)", block, flags=re.M)
        if head and found and head.group(1) != "all":
            resources[head.group(1)] = dict(item.split("=", 1) for item in found.group(1).split(", "))
    return resources


def test_slurm_profile_adds_time_limits_and_keeps_the_rules_gpu_requests(tmp_path):
    # No cluster needed: a dry run prints the resources each job would be submitted with. The
    # rules here request GPUs the way rules/*.smk do (train_vqvae: vqvae.gpus, here 2).
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(PROFILE_SNAKEFILE)
    shutil.copytree(REPO / "profiles", workdir / "profiles")  # the workflow profile applies too
    # As the profile tells multi-GPU users: lift the workflow profile's GPU cap on the command line.
    # (A dry run caps threads at --cores, which a real cluster run leaves unset: give plenty.)
    dry_run = ("--profile", PROFILE, "--dry-run", "--cores", "64")
    got = submitted_resources(run_snakemake(*dry_run, "--resources", "gpu=2", cwd=workdir).stdout)
    assert set(got) == {"train_vqvae", "train_pixelcnn", "sample", "quantize", "report"}, got
    assert got["train_vqvae"]["gpu"] == "2" and got["train_vqvae"]["cpus_per_task"] == "8"
    assert got["train_pixelcnn"]["gpu"] == "1" and got["sample"]["gpu"] == "1"
    assert "gpu" not in got["quantize"] and "gpu" not in got["report"]
    for rule in ("train_vqvae", "train_pixelcnn"):
        assert int(got[rule]["runtime"]) >= 600, (rule, got[rule])  # minutes
    for rule, values in got.items():
        assert int(values["runtime"]) > 0 and int(values["mem_mb"]) >= 1000, (rule, values)
    assert got["report"]["cpus_per_task"] == "1"  # one CPU per declared thread
    # Without it the cap shrinks the request to one card, as the profile's comment warns.
    capped = submitted_resources(run_snakemake(*dry_run, cwd=workdir).stdout)
    assert capped["train_vqvae"]["gpu"] == "1"


# ---- the tiny pipeline on SLURM, compared with a local run -------------------------------------


def shard_contents(shards: Path) -> dict:
    """{file name: {dataset: array, "attrs": dict}} of every HDF5 shard in ``shards``."""
    contents = {}
    for path in sorted(shards.glob("*.h5")):
        with h5py.File(path, "r") as f:
            contents[path.name] = {name: f[name][()] for name in f} | {"attrs": dict(f.attrs)}
    return contents


def test_tiny_pipeline_on_slurm_matches_a_local_run(slurm_cluster, tmp_path, tmp_path_factory):
    missing = missing_pipeline_rules()
    if missing:
        pytest.skip(f"the pipeline is not complete yet (missing rules: {', '.join(missing)})")
    local = shared_tiny_run(tmp_path_factory)
    workdir = tmp_path / "slurm-run"
    config = tiny_config(workdir / "config.yaml")
    rules = load_rules(local.snakefile, configfiles=[config])
    start = time.monotonic()
    proc = run_snakemake(
        "--snakefile", local.snakefile, "--directory", workdir, "--configfile", config,
        "--profile", PROFILE,
        *slurm_test_args({r["name"]: r["resources"] for r in rules}),
        timeout=1500,
    )
    print(f"tiny pipeline on SLURM: {time.monotonic() - start:.0f} s")
    counts = assert_every_job_went_through_sbatch(proc.stdout, workdir)
    assert {"train_vqvae", "train_pixelcnn", "report"} <= set(counts), counts

    run_dir = f"results/{yaml.safe_load(config.read_text())['run']}"
    slurm, reference = workdir / run_dir, local.workdir / run_dir
    assert (slurm / "split.csv").read_text() == (reference / "split.csv").read_text()
    got, want = shard_contents(slurm / "shards"), shard_contents(reference / "shards")
    assert got.keys() == want.keys() and got, (sorted(got), sorted(want))
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for key, value in want[name].items():
            if key == "attrs":
                assert got[name]["attrs"].keys() == value.keys()
                for attr, expected in value.items():
                    assert np.array_equal(got[name]["attrs"][attr], expected), (name, attr)
            else:
                assert np.array_equal(got[name][key], value), (name, key)
    assert (slurm / "report" / "index.html").is_file()

