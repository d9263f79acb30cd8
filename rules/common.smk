# Config validation (defaults come from config/schema.yaml) and paths shared by every rule.
import functools
import os
from pathlib import Path

from snakemake.utils import validate

from brainvq.io import SCAN_KEY_PATTERN, pair_paths, read_scans_table

validate(config, "../config/schema.yaml")

RUN = config["run"]
RUN_DIR = f"{config['results_dir']}/{RUN}"
RESOURCES = config["resources_dir"]
SOURCE = config["dataset"]["source"]

if SOURCE == "local" and not config["dataset"]["local_dir"]:
    raise ValueError(
        "dataset.source is 'local' but dataset.local_dir is not set: add "
        "'dataset: {local_dir: /path/to/volumes}' to your config file"
    )


def out(path):
    """A path under this run's results folder."""
    return f"{RUN_DIR}/{path}"


def raw_root():
    """The folder that holds this run's raw volumes, whichever source made them."""
    if SOURCE == "demo":
        demo = config["demo"]
        return (
            f"{RESOURCES}/demo/n{demo['n_subjects']}-seed{demo['seed']}"
            f"-oasis{demo['oasis_fraction']}"
            + (f"-ds{demo['downsample']}" if demo["downsample"] != 1 else "")
        )
    if SOURCE == "local":
        return config["dataset"]["local_dir"]
    return f"{RESOURCES}/{SOURCE}/extracted"


wildcard_constraints:
    scan=SCAN_KEY_PATTERN,


PREPROCESS = config["preprocess"]


@functools.lru_cache(maxsize=4)
def _scans_table(path, mtime):
    """subjects.tsv indexed by scan (cached per file version: input functions run once per job)."""
    return read_scans_table(path).set_index("scan", drop=False)


def discovered_table():
    """The checkpoint's subjects.tsv (scan, subject, session, path, format, orientation)."""
    path = checkpoints.discover_subjects.get().output.subjects
    return _scans_table(path, os.path.getmtime(path))


def discovered_scans(wildcards=None):
    """Input function: the scan keys discovered (and validated) by the checkpoint."""
    return discovered_table()["scan"].tolist()


def discovered_slice_files(wildcards=None):
    """Input function: slices/{scan}.h5 of every discovered scan."""
    return [out(f"slices/{scan}.h5") for scan in discovered_scans()]


def scan_info(scan):
    """The subjects.tsv row of one scan, as a dict (path, orientation, subject, ...)."""
    table = discovered_table()
    if scan not in table.index:
        raise ValueError(
            f"scan {scan!r} is not in {out('subjects.tsv')}; ask only for discovered scans "
            "(use discovered_scans() in input functions)"
        )
    return table.loc[scan].to_dict()


def raw_volume_files(wildcards):
    """Input function (unpack): 'volume', the raw file of a scan, and 'pair', its .img for .hdr files.

    It reads the checkpoint's table, so the job exists only after discovery; the raw file (not
    subjects.tsv) is the input, and a re-discovery that leaves a scan unchanged does not redo it.
    """
    path = scan_info(wildcards.scan)["path"]
    if path.lower().endswith(".hdr"):
        return {"volume": path, "pair": str(pair_paths(Path(path))[1])}
    return {"volume": path}


def brain_files(wildcards):
    """Input function (unpack): 'brain' and 'mask' of a scan, once the scan is known to be discovered.

    Going through the checkpoint here (rather than listing subjects.tsv as an input) lets params
    read the table while a re-discovery that leaves a scan unchanged does not redo it.
    """
    scan = scan_info(wildcards.scan)["scan"]
    return {
        "brain": out(f"brain/{scan}.nii.gz"),
        "mask": out(f"brain/{scan}_mask.nii.gz"),
    }


def discovery_settings():
    """The config keys that change which scans are discovered (params: rerun on change)."""
    return {
        "on_error": PREPROCESS["on_error"],
        "dataset": config["dataset"],
        # Only the selection keys: editing a mirror URL or checksum must not redo discovery.
        "oasis1": {
            key: config["datasets"]["oasis1"][key]
            for key in ("image", "include_mr2", "orientation")
        },
        "oasis2": {
            key: config["datasets"]["oasis2"][key]
            for key in ("sessions", "orientation")
        },
    }
