# Config validation (defaults come from config/schema.yaml) and paths shared by every rule.
import functools
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from brainvq.apply import require_apply_input
from brainvq.bundle import read_bundle, trained_preprocess
from brainvq.io import SCAN_KEY_PATTERN, pair_paths, read_scans_table
from brainvq.sources import get_source

validate(config, "../config/schema.yaml")

# Apply mode (apply.model set): a trained model runs on new scans instead of training. Its bundle is
# checked here (an unfinished run, another format or a changed file stop the run), and from here on the
# dataset is apply.input and preprocessing is the bundle's: the settings the model was trained with.
APPLY = config["apply"]["model"] is not None
if APPLY:
    BUNDLE_DIR, BUNDLE = read_bundle(config["apply"]["model"])
    config["dataset"] = config["apply"]["input"]
    config["preprocess"] = trained_preprocess(BUNDLE, config["apply"]["on_error"])
    BUNDLE_FILES = [
        f"{BUNDLE_DIR}/{name}" for name in ("bundle.json", "vqvae.pt", "prior.pt")
    ]
    RUN = BUNDLE["run"]
    RUN_DIR = f"{config['results_dir']}/{RUN}/apply/{config['apply']['name']}"
else:
    RUN = config["run"]
    RUN_DIR = f"{config['results_dir']}/{RUN}"
RESOURCES = config["resources_dir"]
# The data source (brainvq/sources/<dataset.source>.py): rules ask it, never test its name.
# Checked at parse time: an unknown name, missing settings or unaccepted terms stop the run here.
SOURCE = get_source(config["dataset"]["source"])
RAW_ROOT = SOURCE.raw_root(config)
SOURCE.require_terms(config)
if APPLY:
    require_apply_input(RAW_ROOT, SOURCE.name)
if SOURCE.terms:
    print(f"brainvq: {SOURCE.name} terms of use:\n{SOURCE.terms}", file=sys.stderr)


def out(path):
    """A path under this run's results folder."""
    return f"{RUN_DIR}/{path}"


def raw_root():
    """The folder that holds this run's raw volumes, whichever source made them."""
    return RAW_ROOT


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


def applied_files(folder, suffix):
    """Input function maker (apply mode): <folder>/<scan><suffix> of every discovered scan."""
    return lambda wildcards: [
        out(f"{folder}/{scan}{suffix}") for scan in discovered_scans()
    ]


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
