"""Snakemake adapter for rule `write_shards`: per-scan slices files -> train/test HDF5 shards."""

from pathlib import Path

from brainvq.config import config_hash
from brainvq.data import read_split
from brainvq.preprocessing import mask_kind, shard_geometry
from brainvq.shards import write_shards
from brainvq.workflow import logged

with logged(snakemake) as log:  # noqa: F821 (snakemake is injected by the script directive)
    preprocess = snakemake.params.preprocess
    manifest = write_shards(
        read_split(snakemake.input.split),
        {Path(path).stem: path for path in snakemake.input.slices},
        snakemake.output[0],
        shard_size=preprocess["shard_size"],
        dtype=preprocess["dtype"],
        compression=preprocess["shard_compression"],
        attrs={
            "spacing_mm": preprocess["spacing_mm"],
            **shard_geometry(preprocess),
            "mask_kind": mask_kind(preprocess),
            "skull_strip": preprocess["skull_strip"],
            "source": snakemake.params.source,
            "config_hash": config_hash(preprocess),
        },
    )
    log.info("shards: %s", {s: v["n_slices"] for s, v in manifest["splits"].items()})
