"""Helpers for the tests that drive the workflow itself: load its rules, run snakemake, read dry runs.

Used by tests/test_envs.py, test_lint.py, test_rerun.py, test_slurm.py and test_apply.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
TINY_CONFIG = REPO / ".test" / "config" / "config.yaml"
VENV_BIN = Path(sys.executable).parent

# The rules the pipeline's final target (report/index.html) is made from, in data-flow order.
PIPELINE_RULES = (
    "demo_cohort",
    "discover_subjects",
    "reorient",
    "skull_strip",
    "slice_volume",
    "split",
    "write_shards",
    "train_vqvae",
    "quantize",
    "train_pixelcnn",
    "sample",
    "evaluate",
    "report",
    "bundle_model",
)
# What a workflow copy needs to run on its own: a checkout without docs and tests.
WORKFLOW_PARTS = ("Snakefile", "rules", "workflow_scripts", "config", "envs", "profiles", ".test", "brainvq")

_DUMP_RULES = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

snakefile, workdir, out, *configfiles = sys.argv[1:]
with SnakemakeApi(OutputSettings()) as api:
    workflow_api = api.workflow(
        resource_settings=ResourceSettings(),
        config_settings=ConfigSettings(configfiles=[Path(f) for f in configfiles]),
        snakefile=Path(snakefile),
        workdir=Path(workdir),
    )
    rules = []
    for rule in workflow_api._workflow.rules:
        resources = {}
        for name, resource in (rule.resources or {}).items():
            # Callables (e.g. tmpdir) are only known per job; keep the values the rule states.
            if not name.startswith("_") and not resource.is_evaluable():
                resources[name] = resource.value
        rules.append(
            {
                "name": rule.name,
                "snakefile": str(rule.snakefile),
                "basedir": rule.basedir.get_path_or_uri(secret_free=True),
                "conda": None if rule.conda_env is None else str(rule.conda_env),
                "log": [str(item) for item in rule.log],
                "script": rule.script,
                "has_action": not rule.norun,
                "resources": resources,
            }
        )
    # What snakemake's script preamble appends to a rule script's sys.path (the running process's
    # own path, as the workflow left it, plus the script's folder).
    from snakemake.common import get_snakemake_searchpaths

    Path(out).write_text(json.dumps({"rules": rules, "searchpaths": get_snakemake_searchpaths()}))
"""


def snakemake_command(*args: str | os.PathLike) -> list[str]:
    """The argv for running this interpreter's snakemake with ``args``."""
    return [sys.executable, "-m", "snakemake", *map(str, args)]


def child_env() -> dict:
    """os.environ for child snakemake runs: this venv first on PATH, one thread per numeric library."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    # Keep matplotlib from writing a font cache into $HOME on every fresh job.
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_snakemake(*args, cwd: Path | None = None, timeout: float = 1200, check: bool = True):
    """Run snakemake with ``args``; return the CompletedProcess (stdout and stderr merged in .stdout).

    With ``check``, a non-zero exit raises AssertionError showing the output's tail.
    """
    command = snakemake_command(*args)
    proc = subprocess.run(
        command,
        cwd=cwd or REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake exited {proc.returncode}: {' '.join(command)}\n--- output (tail) ---\n{proc.stdout[-6000:]}"
        )
    return proc


def load_workflow(snakefile: Path = SNAKEFILE, workdir: Path | None = None, configfiles=()) -> dict:
    """Load the workflow with snakemake's own API in a child process; return a dict with

    ``rules``: one dict per rule (name, snakefile, basedir, conda as written, log, script,
    has_action, resources), and ``searchpaths``: the sys.path entries snakemake's script preamble
    hands to rule scripts. Every ``include:`` and Python-level construct is resolved as in a real run.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rules.json"
        workdir = workdir or Path(tmp)
        configs = [str(c) for c in configfiles] or [str(REPO / "config" / "config.yaml")]
        proc = subprocess.run(
            [sys.executable, "-c", _DUMP_RULES, str(snakefile), str(workdir), str(out), *configs],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0 or not out.exists():
            raise AssertionError(f"cannot load the workflow {snakefile}:\n{proc.stdout[-6000:]}")
        return json.loads(out.read_text())


def load_rules(snakefile: Path = SNAKEFILE, workdir: Path | None = None, configfiles=()) -> list[dict]:
    """The rules of a workflow (see load_workflow)."""
    return load_workflow(snakefile, workdir, configfiles)["rules"]


@functools.lru_cache(maxsize=1)
def repo_workflow() -> dict:
    """The repository's workflow as load_workflow returns it (loaded once per test session)."""
    return load_workflow()


# Rules can depend on the data source (download/extract exist only for public datasets) and on
# preprocess.dims (cut_volume and the 3D evaluate/report): the demo config, a download config and the
# 3D demo config together define every rule.
SOURCE_CONFIGS = (("config.yaml",), ("config.yaml", "ixi.yaml"), ("config.yaml", "demo3d.yaml"))


@functools.lru_cache(maxsize=1)
def apply_mode_config() -> Path:
    """A config file that puts the workflow in apply mode: a bundle of untrained models (real files) and an
    empty folder of scans, in a temporary folder kept for the test session."""
    import tempfile

    from model_files import write_untrained_bundle

    root = Path(tempfile.mkdtemp(prefix="brainvq-apply-mode-"))
    bundle = write_untrained_bundle(root / "results" / "untrained", run="untrained")
    (root / "scans").mkdir()
    path = root / "apply.yaml"
    path.write_text(yaml.safe_dump({"apply": {"model": str(bundle), "name": "check",
                                              "input": {"source": "local", "local_dir": str(root / "scans")}}}))
    return path


@functools.lru_cache(maxsize=1)
def repo_rules() -> tuple[dict, ...]:
    """Every rule of the repository's workflow, over the demo and a download configuration and apply mode."""
    rules = {rule["name"]: rule for rule in repo_workflow()["rules"]}
    configs = [[REPO / "config" / name for name in names] for names in SOURCE_CONFIGS[1:]]
    for files in [*configs, [REPO / "config" / "config.yaml", apply_mode_config()]]:
        for rule in load_rules(configfiles=files):
            rules.setdefault(rule["name"], rule)
    return tuple(rules.values())


def missing_pipeline_rules(rules=None) -> list[str]:
    """Names in PIPELINE_RULES that the workflow does not define (yet)."""
    names = {rule["name"] for rule in (rules if rules is not None else repo_rules())}
    return [name for name in PIPELINE_RULES if name not in names]


def copy_workflow(dst: Path, with_package: bool = True) -> Path:
    """Copy the workflow (Snakefile, rules, scripts, config, envs, profiles, .test, brainvq) into ``dst``.

    Rule scripts import the brainvq beside the Snakefile (snakemake puts that folder on sys.path);
    ``with_package=False`` leaves it out.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS if with_package else [p for p in WORKFLOW_PARTS if p != "brainvq"]:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dst / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / part)
    return dst


def tiny_config(dst: Path, changes: dict | None = None) -> Path:
    """Write the tiny end-to-end config (.test/config/config.yaml) with ``changes`` merged in; return its path.

    The tiny config is the one place that says what "a tiny run" is (few subjects, 32 px, a few
    training steps); tests only change what they test.
    """
    from brainvq.config import deep_merge

    base = yaml.safe_load(TINY_CONFIG.read_text()) or {}
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(deep_merge(base, changes or {}), sort_keys=False))
    return dst


_JOB_ROW = re.compile(r"^(\S+)\s+(\d+)$")


def job_counts(output: str) -> Counter:
    """Parse the "Job stats" table of a snakemake (dry) run: rule name -> number of jobs.

    Returns an empty Counter when snakemake reports nothing to be done. The target rule ``all``
    (which runs nothing) and the ``total`` row are left out.
    """
    if "Nothing to be done" in output:
        return Counter()
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Job stats:")
    except StopIteration:
        raise AssertionError(f"no 'Job stats' table in snakemake output:\n{output[-4000:]}") from None
    counts = Counter()
    for line in lines[start + 1 :]:
        row = _JOB_ROW.match(line.strip())
        if line.strip().startswith(("job", "---")) or not line.strip():
            if counts:
                break
            continue
        if not row:
            break
        name, count = row.group(1), int(row.group(2))
        if name == "total":
            break
        if name != "all":
            counts[name] = count
    return counts


def executed_jobs(output: str) -> tuple[Counter, Counter]:
    """(jobs, local jobs): rule -> number of jobs a finished run's log shows it executing.

    Unlike the "Job stats" table printed at the start, this includes the jobs a checkpoint
    revealed during the run. The target rule ``all`` is left out.
    """
    jobs, local = Counter(), Counter()
    for kind, name in re.findall(r"^(local)?(?:rule|checkpoint) (\w+):$", output, flags=re.M):
        if name != "all":
            jobs[name] += 1
            if kind:
                local[name] += 1
    return jobs, local


def rule_graph(output: str) -> dict[str, set[str]]:
    """Parse ``snakemake --rulegraph`` (dot) output into rule -> the rules that consume its outputs."""
    labels = dict(re.findall(r'^\s*(\d+)\[label = "([^"]+)"', output, flags=re.M))
    edges: dict[str, set[str]] = {name: set() for name in labels.values()}
    for src, dst in re.findall(r"^\s*(\d+) -> (\d+)", output, flags=re.M):
        edges[labels[src]].add(labels[dst])
    return edges


def downstream(graph: dict[str, set[str]], rule: str) -> set[str]:
    """``rule`` and every rule that (transitively) consumes its outputs, without the target ``all``."""
    seen, todo = set(), [rule]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph.get(name, ()))
    return seen - {"all"}


@dataclass
class TinyRun:
    """A finished tiny end-to-end run: a workflow copy, its workdir and its config."""

    workflow: Path
    workdir: Path
    config: Path
    seconds: float = 0.0
    output: str = field(default="", repr=False)

    @property
    def snakefile(self) -> Path:
        return self.workflow / "Snakefile"

    def snakemake(self, *args, configfile: Path | None = None, check: bool = True, timeout: float = 1800):
        """Run snakemake on this workflow copy and workdir (2 cores) with ``args``."""
        return run_snakemake(
            "--snakefile", self.snakefile, "--directory", self.workdir,
            "--configfile", configfile or self.config, "--cores", "2", *args,
            check=check, timeout=timeout,
        )

    def dry_run(self, *args, configfile: Path | None = None) -> Counter:
        """The jobs (rule -> count) a run would execute now."""
        return job_counts(self.snakemake("--dry-run", *args, configfile=configfile, timeout=600).stdout)


_TINY_RUN: TinyRun | BaseException | None = None


def shared_tiny_run(tmp_path_factory) -> TinyRun:
    """Run the tiny pipeline (.test/config) once per test session on a workflow copy; return it.

    Shared by test_rerun.py and test_slurm.py. A failed run is remembered and re-raised, not repeated.
    """
    global _TINY_RUN
    if _TINY_RUN is None:
        root = tmp_path_factory.mktemp("tiny-run")
        run = TinyRun(copy_workflow(root / "workflow"), root / "work", tiny_config(root / "config.yaml"))
        start = time.monotonic()
        try:
            run.output = run.snakemake().stdout
        except BaseException as error:  # noqa: BLE001 - remembered for the other callers
            _TINY_RUN = error
            raise
        run.seconds = time.monotonic() - start
        _TINY_RUN = run
    if isinstance(_TINY_RUN, BaseException):
        raise AssertionError(f"the shared tiny run failed earlier in this session: {_TINY_RUN}")
    return _TINY_RUN
