# Config validation (defaults come from config/schema.yaml) and paths shared by every rule.
import functools
import os
import sys
from pathlib import Path

from snakemake.utils import validate

from brainvq.apply import require_apply_input
from brainvq.bundle import read_bundle, trained_preprocess
from brainvq.config import check_startup
from brainvq.shards import missing_shard_files
from brainvq.io import SCAN_KEY_PATTERN, pair_paths, read_scans_table
from brainvq.sources import get_source
from brainvq.workflow import rebuild_reason, request_rebuild

validate(config, "../config/schema.yaml")
# Everything the config alone decides (sizes vs downsampling, regexes, paths) stops the run here, before any job.
check_startup(config)

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


# The preprocess section as the rules use it: skull_strip 'auto' resolved to the source's default.
PREPROCESS = SOURCE.resolved_preprocess(config["preprocess"])
# preprocess.dims 3: whole volumes (volumes/{scan}.h5) instead of axial slices, and the 3D DAG
# (no prior or sampling; see the Snakefile and rules/volumes.smk). check_startup has checked the box.
VOLUMES = PREPROCESS["dims"] == 3
SCAN_ITEMS = "volumes" if VOLUMES else "slices"


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


def scan_items_file(wildcards):
    """Input function: the scan's slices/{scan}.h5 (volumes/{scan}.h5 with preprocess.dims 3)."""
    return out(f"{SCAN_ITEMS}/{wildcards.scan}.h5")


def discovered_slice_files(wildcards=None):
    """Input function: slices/{scan}.h5 (volumes/{scan}.h5 with preprocess.dims 3) of every discovered scan."""
    return [out(f"{SCAN_ITEMS}/{scan}.h5") for scan in discovered_scans()]


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


def skull_strip_files(wildcards):
    """Input function (unpack): 'ras', the scan's RAS volume, and with skull_strip 'precomputed' its mask file
    found beside the raw volume ('precomputed_mask', and 'precomputed_mask_pair' for an Analyze .img).
    """
    files = {"ras": out(f"ras/{wildcards.scan}.nii.gz")}
    mask = scan_info(wildcards.scan).get("mask", "")
    if PREPROCESS["skull_strip"] == "precomputed" and mask:
        files["precomputed_mask"] = mask
        if mask.lower().endswith(".hdr"):
            files["precomputed_mask_pair"] = str(pair_paths(Path(mask))[1])
    return files


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


# Stage rules whose job reruns when one of its outputs is missing (or a folder of them incomplete) while
# what was built from it exists: Snakemake alone would leave it missing (see request_rebuilds).
REBUILT_STAGES = set()


def rebuild_request(stage):
    """Input function for the stage's own rule: its rebuild request file, once request_rebuilds wrote one."""
    REBUILT_STAGES.add(stage)
    path = out(f".rebuild/{stage}")
    return lambda wildcards: [path] if os.path.exists(path) else []


def static_paths(files):
    """The plain paths among a rule's inputs or outputs (input functions left out)."""
    return [str(f) for f in files if isinstance(f, str)]


def request_rebuilds():
    """Write a rebuild request for each stage in REBUILT_STAGES whose outputs are missing while a rule that
    reads them has its outputs (e.g. split.csv deleted, shards present), or incomplete (a shard gone).

    Snakemake regenerates a missing file only for a job that has to run, and with --until it only looks at
    the until rule's own outputs, so such a file would stay missing. The request is an input of the stage
    rule, newer than its outputs: the stage and what depends on it run again. Call once every rule is defined.
    """
    if not workflow.is_main_process:
        return
    plain = [r for r in workflow.rules if not r.has_wildcards()]
    for stage in (r for r in plain if r.name in REBUILT_STAGES):
        outputs = static_paths(stage.output)
        consumers = [
            static_paths(r.output)
            for r in plain
            if set(static_paths(r.input)) & set(outputs)
        ]
        reason = rebuild_reason(outputs, consumers, missing_shard_files)
        if reason:
            print(
                f"brainvq: rebuilding {stage.name} and what depends on it: {reason}",
                file=sys.stderr,
            )
            request_rebuild(out(f".rebuild/{stage.name}"), reason)
