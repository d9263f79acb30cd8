"""Glue for workflow_scripts/: send a script's log output to its Snakemake log file."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback


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
