"""Rerun semantics on a tiny real run: snakemake redoes exactly the jobs a change affects.

One tiny end-to-end run (.test/config, on a copy of the workflow) is shared by the tests; each
test then asks snakemake, with a dry run, which jobs a change would rerun.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from snakemake_helpers import (
    downstream,
    executed_jobs,
    job_counts,
    missing_pipeline_rules,
    rule_graph,
    shared_tiny_run,
    tiny_config,
)

pytestmark = pytest.mark.slow

# Stages that only produce or fetch raw volumes: no preprocessing or model setting may rerun them.
SOURCE_RULES = {"demo_cohort", "download", "extract"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    missing = missing_pipeline_rules()
    if missing:
        pytest.skip(f"the pipeline is not complete yet (missing rules: {', '.join(missing)})")
    return shared_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def graph(tiny_run):
    """Rule -> rules consuming its outputs, from snakemake --rulegraph of the finished run."""
    edges = rule_graph(tiny_run.snakemake("--rulegraph", "dot", timeout=600).stdout)
    assert "report" in edges, edges
    return edges


@pytest.fixture(scope="module")
def all_jobs(tiny_run):
    """Every job of the tiny pipeline (rule -> count), as the first run executed them.

    (Read from the run's log: a dry run cannot list the jobs behind the discovery checkpoint.)
    """
    jobs, _ = executed_jobs(tiny_run.output)
    assert jobs, tiny_run.output[-3000:]
    return jobs


def changed_config(tiny_run, tmp_path: Path, section: str, key: str, new_value) -> Path:
    """Write the tiny config with ``section.key = new_value``; skip when the schema has no such key."""
    schema = yaml.safe_load((tiny_run.workflow / "config" / "schema.yaml").read_text())
    if key not in schema["properties"][section].get("properties", {}):
        pytest.skip(f"config/schema.yaml defines no {section}.{key}")
    return tiny_config(tmp_path / "config.yaml", {section: {key: new_value}})


def test_second_run_has_nothing_to_do(tiny_run):
    assert tiny_run.dry_run() == {}, "a second run of an unchanged workflow would rerun jobs"


def test_changing_a_pixelcnn_parameter_reruns_only_prior_sampling_evaluation_report_and_bundle(
    tiny_run, graph, tmp_path
):
    seed = yaml.safe_load(tiny_run.config.read_text()).get("pixelcnn", {}).get("seed", 0)
    config = changed_config(tiny_run, tmp_path, "pixelcnn", "seed", seed + 1)
    rerun = tiny_run.dry_run(configfile=config)
    assert set(rerun) == {"train_pixelcnn", "sample", "evaluate", "report", "bundle_model"}, rerun
    assert set(rerun) == downstream(graph, "train_pixelcnn")
    assert all(count == 1 for count in rerun.values()), rerun


def test_changing_a_preprocessing_parameter_reruns_what_follows_but_no_download(
    tiny_run, graph, all_jobs, tmp_path
):
    spacing = yaml.safe_load(tiny_run.config.read_text())["preprocess"]["spacing_mm"]
    config = changed_config(tiny_run, tmp_path, "preprocess", "spacing_mm", spacing * 1.25)
    rerun = tiny_run.dry_run(configfile=config)
    affected = downstream(graph, "reorient")
    assert {"reorient", "slice_volume", "write_shards", "train_vqvae", "train_pixelcnn", "report"} <= affected
    # Every job from reorientation on reruns, for every scan ...
    assert {rule: rerun[rule] for rule in affected} == {rule: all_jobs[rule] for rule in affected}, rerun
    # ... and no source stage does.
    assert not SOURCE_RULES & set(rerun), rerun


def test_editing_a_workflow_script_reruns_its_rule_and_what_follows(tiny_run, graph, all_jobs):
    script = tiny_run.workflow / "workflow_scripts" / "split.py"
    original, stat = script.read_text(), script.stat()
    try:
        script.write_text(original + "\n# an edit\n")
        rerun = tiny_run.dry_run()
    finally:
        script.write_text(original)
        os.utime(script, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    affected = downstream(graph, "split")
    assert set(rerun) == affected, rerun
    assert {rule: rerun[rule] for rule in affected} == {rule: all_jobs[rule] for rule in affected}
    assert tiny_run.dry_run() == {}, "restoring the script did not restore the up-to-date state"


def test_a_missing_split_csv_is_rebuilt_by_a_plain_run_with_what_follows(tiny_run, graph, all_jobs):
    # Snakemake alone reports "Nothing to be done" here: nothing that reads split.csv has to run.
    results = tiny_run.workdir / "results" / tiny_run_name(tiny_run)
    split_csv = results / "split.csv"
    aside = split_csv.with_name(".split.csv.aside")
    os.replace(split_csv, aside)
    try:
        rerun = tiny_run.dry_run()
    finally:
        os.replace(aside, split_csv)
        (results / ".rebuild" / "split").unlink(missing_ok=True)
    affected = downstream(graph, "split")
    assert set(rerun) == affected, rerun
    assert {rule: rerun[rule] for rule in affected} == {rule: all_jobs[rule] for rule in affected}
    assert tiny_run.dry_run() == {}, "restoring split.csv did not restore the up-to-date state"


def tiny_run_name(tiny_run) -> str:
    return yaml.safe_load(tiny_run.config.read_text())["run"]


# ---- the output parsers the tests above rely on ------------------------------------------------

DRY_RUN = """\
Building DAG of jobs...
Job stats:
job               count
--------------  -------
report                1
slice_volume          6
all                   1
total                 8

Reasons:
"""

RUN_LOG = """\
[Sat Nov 21 06:58:27 2026]
checkpoint discover_subjects:
    input: x
rule reorient:
rule reorient:
localrule split:
localrule all:
"""

RULE_GRAPH = """\
digraph snakemake_dag {
    0[label = "all", color = "0.1 0.6 0.85", style="rounded"];
    1[label = "report", color = "0.2 0.6 0.85", style="rounded"];
    2[label = "evaluate", color = "0.3 0.6 0.85", style="rounded"];
    3[label = "sample", color = "0.4 0.6 0.85", style="rounded"];
    1 -> 0
    2 -> 1
    3 -> 2
    3 -> 1
}
"""


def test_job_counts_reads_the_job_stats_table_without_all_and_total():
    assert job_counts(DRY_RUN) == {"report": 1, "slice_volume": 6}
    assert job_counts("Building DAG of jobs...\nNothing to be done (all requested files are present).") == {}
    with pytest.raises(AssertionError):
        job_counts("no table here")


def test_executed_jobs_counts_checkpoints_and_local_jobs():
    jobs, local = executed_jobs(RUN_LOG)
    assert jobs == {"discover_subjects": 1, "reorient": 2, "split": 1}
    assert local == {"split": 1}


def test_downstream_follows_the_rule_graph_and_drops_all():
    graph = rule_graph(RULE_GRAPH)
    assert graph["sample"] == {"evaluate", "report"}
    assert downstream(graph, "sample") == {"sample", "evaluate", "report"}
    assert downstream(graph, "report") == {"report"}
