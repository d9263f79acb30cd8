# Stage 'preprocess' (see docs/architecture.md): discover the raw volumes, then per scan
# reorient to RAS at spacing_mm, skull strip (+ optional N4), and cut normalised axial slices.
import functools
import os
from pathlib import Path

from brainvq.io import SCAN_KEY_PATTERN, pair_paths, read_scans_table


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
        "oasis1": config["datasets"]["oasis1"],
        "oasis2": config["datasets"]["oasis2"],
    }


checkpoint discover_subjects:
    input:
        raw=raw_root(),
    output:
        subjects=out("subjects.tsv"),
        participants=out("participants.tsv"),
        excluded=out("qc/excluded_inputs.csv"),
    log:
        out("logs/discover_subjects.log"),
    benchmark:
        out("benchmarks/discover_subjects.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 2
    params:
        source=SOURCE,
        settings=discovery_settings(),
    script:
        "../workflow_scripts/discover_subjects.py"


rule reorient:
    input:
        unpack(raw_volume_files),
    output:
        out("ras/{scan}.nii.gz"),
    log:
        out("logs/reorient/{scan}.log"),
    benchmark:
        out("benchmarks/reorient/{scan}.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        orientation=lambda wildcards: scan_info(wildcards.scan)["orientation"],
        spacing_mm=PREPROCESS["spacing_mm"],
    script:
        "../workflow_scripts/reorient.py"


rule skull_strip:
    input:
        out("ras/{scan}.nii.gz"),
    output:
        brain=out("brain/{scan}.nii.gz"),
        mask=out("brain/{scan}_mask.nii.gz"),
    log:
        out("logs/skull_strip/{scan}.log"),
    benchmark:
        out("benchmarks/skull_strip/{scan}.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        method=PREPROCESS["skull_strip"],
        n4=PREPROCESS["n4"],
        bet_fractional_threshold=PREPROCESS["bet_fractional_threshold"],
        bet_iterations=PREPROCESS["bet_iterations"],
        on_error=PREPROCESS["on_error"],
    script:
        "../workflow_scripts/skull_strip.py"


rule slice_volume:
    input:
        unpack(brain_files),
    output:
        out("slices/{scan}.h5"),
    log:
        out("logs/slice_volume/{scan}.log"),
    benchmark:
        out("benchmarks/slice_volume/{scan}.tsv")
    conda:
        "../envs/preprocess.yaml"
    threads: 1
    params:
        participant=lambda wildcards: scan_info(wildcards.scan)["subject"],
        source=SOURCE,
        # The whole section: its hash is stored in the file (config_hash), so any change reruns.
        preprocess=PREPROCESS,
    script:
        "../workflow_scripts/slice_volume.py"
