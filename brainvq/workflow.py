"""Glue for the workflow: send a script's log output to its Snakemake log file; ask for the rebuild of a
stage output that Snakemake would leave missing."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from brainvq.files import write_text_atomic


@contextlib.contextmanager
def logged(snakemake_obj):
    """Run the body with stderr and ``logging`` going to the rule's log file.

    Exceptions are written to the log with their traceback and re-raised, so Snakemake
    marks the job failed and deletes its incomplete outputs.
    """
    log_path = snakemake_obj.log[0] if len(snakemake_obj.log) else None
    if log_path is None:
        yield logging.getLogger("brainvq")
        return
    with open(log_path, "w") as handle:
        saved = sys.stderr
        sys.stderr = handle
        logging.basicConfig(
            stream=handle, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
        )
        try:
            yield logging.getLogger("brainvq")
        except BaseException as error:
            traceback.print_exc(file=handle)
            handle.flush()
            # The user reads the terminal first: give them the message, the log has the traceback.
            saved.write(f"{type(error).__name__}: {error}\n(traceback in {log_path})\n")
            raise
        finally:
            sys.stderr = saved


def package_versions(packages) -> dict:
    """Return the Python version and the installed version of each package (None when absent), for provenance."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def rebuild_reason(outputs: Sequence[str], consumer_outputs: Sequence[Sequence[str]],
                   missing_parts: Callable[[Path], list[str]] = lambda folder: []) -> str:
    """Return why a stage's job must run again although Snakemake would skip it, or '' when it need not.

    Snakemake regenerates a missing file only when a job that reads it has to run, so a deleted (or
    failed) ``split.csv`` stays missing while the shards built from it exist, in plain runs and with
    ``--until``. A stage output is due for a rebuild when it is missing while a rule that reads it has
    all its outputs, or when it is a folder lacking files it should hold.

    Args:
        outputs: the stage rule's outputs (files or folders).
        consumer_outputs: the outputs of each rule that reads one of ``outputs``.
        missing_parts: for a folder output, the files it should hold but lacks (``shards.missing_shard_files``).
    """
    for path in outputs:
        lacking = missing_parts(Path(path)) if Path(path).is_dir() else []
        if lacking:
            return f"{path} lacks {', '.join(lacking[:5])}"
    missing = [path for path in outputs if not Path(path).exists()]
    built = [outs for outs in consumer_outputs if outs and all(Path(path).exists() for path in outs)]
    if missing and built:
        return f"{missing[0]} is missing while {built[0][0]}, built from it, exists"
    return ""


def request_rebuild(request: str | Path, reason: str) -> Path:
    """Write the rebuild request file ``request`` (an input of the stage's rule), newer than every output.

    The stage's job then has an input newer than its outputs, with content that differs from the last
    run's (the time is in it), and Snakemake runs it, and what depends on it, in plain and ``--until`` runs.
    """
    return write_text_atomic(request, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {time.time_ns()} {reason}\n")
