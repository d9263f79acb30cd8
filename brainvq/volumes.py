"""Whole volumes (``preprocess.dims: 3``, rule cut_volume): a brain volume normalised as slices are and cut to a
fixed physical box (``preprocess.box_mm``) at ``spacing_mm``, written as ``volumes/{scan}.h5``, the per-scan file that
``brainvq.shards.write_shards`` packs into shards of one volume per item."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainvq.config import box_problems
from brainvq.shards import write_slices_h5
from brainvq.preprocessing import EmptyMaskError, PreprocessingError, scaled_intensities


def volume_box_voxels(settings: dict, downsample: int | None = None) -> tuple[int, int, int]:
    """Return the volume shape ``(z, y, x)`` in voxels at ``spacing_mm`` of ``preprocess.box_mm`` ``[x, y, z]``.

    The array axes are those of a stack of axial images (:func:`volume_stack`): axial slices inferior to
    superior, rows anterior to posterior, columns left to right.

    Raises:
        PreprocessingError: a side is not a whole number of voxels, or (with ``downsample``, the
            ``vqvae.downsample``) not a multiple of it.
    """
    problems = box_problems(settings, downsample)
    if problems:
        raise PreprocessingError(problems[0])
    x, y, z = (round(float(side) / settings["spacing_mm"]) for side in settings["box_mm"])
    return z, y, x


def volume_stack(volume: np.ndarray) -> np.ndarray:
    """Return a RAS volume as its stack of axial images ``(S, A, R)``: every axial index, each image as
    :func:`axial_stack` draws it (rows anterior to posterior, columns left to right)."""
    return np.moveaxis(np.rot90(volume, k=1, axes=(0, 1)), 2, 0)


def centred_box(mask: np.ndarray, shape) -> tuple[int, ...]:
    """Return the first index per axis of a box of ``shape`` centred on the bounding box of ``mask``
    (it may start below 0 or end beyond the array, where :func:`cut_box` pads with zeros).

    Raises:
        EmptyMaskError: the mask is empty.
    """
    mask = np.asarray(mask, bool)
    starts = []
    for axis, side in enumerate(shape):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if occupied.size == 0:
            raise EmptyMaskError("the mask is empty: no box can be centred on it")
        starts.append(int(round((occupied[0] + occupied[-1] + 1) / 2 - side / 2)))
    return tuple(starts)


def cut_box(array: np.ndarray, starts, shape) -> np.ndarray:
    """Return the box of ``shape`` at ``starts`` (one per axis) of ``array``, zero where it lies outside."""
    out = np.zeros(tuple(shape), array.dtype)
    source, target = [], []
    for start, side, n in zip(starts, shape, array.shape):
        lo, hi = max(start, 0), min(start + side, n)
        if hi <= lo:
            return out
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    out[tuple(target)] = array[tuple(source)]
    return out


def scan_volume(volume: np.ndarray, mask: np.ndarray, settings: dict, skull_strip_reason: str = "") -> dict:
    """Return one scan as a whole volume cut to ``preprocess.box_mm``, or none with the reason it is excluded.

    Intensities are normalised as slices are (:func:`scaled_intensities`: clipped at the foreground's
    ``clip_percentiles``, scaled to [0, 1], 0 outside the mask); the volume keeps its ``spacing_mm`` voxels and
    is cropped or zero-padded to the box, centred on the mask's bounding box.

    Args:
        volume: 3D RAS brain (or head) volume at ``spacing_mm``; mask: its 3D mask (an empty mask marks a
            scan whose skull stripping failed under ``on_error: skip``).
        settings: the ``preprocess`` config section (``dims: 3``).
        skull_strip_reason: why the QC gate after skull stripping leaves the scan out ('' when it passed), as
            for ``brainvq.preprocessing.scan_slices``.

    Returns:
        dict in the shape of ``brainvq.preprocessing.scan_slices``' with one item, the volume: ``images`` ``(1, z, y, x)`` in
        ``settings['dtype']`` (:func:`volume_box_voxels`; axes as :func:`volume_stack`), ``masks`` (bool),
        ``slice_index`` ``[-1]`` (the whole volume) and ``slice_position`` ``[nan]``, ``excluded_stage``,
        ``excluded_reason``, ``voxel_mm`` and ``box`` (first axial index, top row, left column in the stack
        of axial images of the RAS volume, then the shape; all -1 when excluded), which maps voxels back.
    """
    shape = volume_box_voxels(settings)
    mask = np.asarray(mask, bool)
    stage, reason = "", ""
    images, masks = np.zeros((0, *shape), np.float32), np.zeros((0, *shape), bool)
    box = (-1,) * 6
    if not mask.any():
        stage, reason = "skull_strip", f"empty mask after skull_strip={settings['skull_strip']}"
    elif skull_strip_reason:
        stage, reason = "skull_strip", skull_strip_reason
    else:
        stack_mask = volume_stack(mask)
        starts = centred_box(stack_mask, shape)
        scaled = scaled_intensities(volume, mask, settings["clip_percentiles"])
        images = cut_box(volume_stack(scaled), starts, shape)[None]
        masks = cut_box(stack_mask, starts, shape)[None]
        box = (*starts, *shape)
    n = len(images)
    return {
        "images": images.astype(settings["dtype"]),
        "masks": masks,
        "slice_index": np.full(n, -1, np.int32),
        "slice_position": np.full(n, np.nan, np.float32),
        "excluded_stage": stage,
        "excluded_reason": reason,
        "voxel_mm": float(settings["spacing_mm"]),
        "box": np.asarray(box, np.int64),
    }


def write_volume_file(path: str | Path, items: dict, scan: str, subject: str, attrs: dict) -> Path:
    """Write one scan's :func:`scan_volume` result as ``volumes/{scan}.h5`` in the layout of a slices file
    (``brainvq.shards.write_slices_h5``: one item, the volume), with ``attrs`` and the exclusion attributes; return
    ``path``."""
    n = len(items["slice_index"])
    exclusion = {"split": "", "excluded_reason": items["excluded_reason"], "excluded_stage": items["excluded_stage"]}
    return write_slices_h5(path, items["images"], items["masks"], [scan] * n, [subject] * n, items["slice_index"],
                           items["slice_position"], {**attrs, **exclusion})
