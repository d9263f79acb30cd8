"""Voxel grids and file writers of the demo's two on-disk layouts, and resampling between grids.

* IXI-like: gzipped NIfTI-1, int16, voxel axes P, S, R, a slightly oblique and *correct* affine
  (qform = sform = voxel -> world).
* OASIS-like: Analyze 7.5 ``.hdr``/``.img``, big-endian int16, voxel axes A, S, L, no orientation stored.

``brainvq.demo`` draws its subjects onto these grids; tests use :func:`write_ixi_like` and
:func:`write_oasis_like` to write any volume the way IXI and OASIS-1 arrive. World coordinates are
RAS+ millimetres throughout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from brainvq.files import atomic_path

# Output voxels are synthesised in slabs along axis 0 to keep memory bounded (~20 MB per slab).
SLAB_VOXELS = 1_000_000


class LayoutPathError(ValueError):
    """A writer was given a file name that does not fit its layout (e.g. ``.nii`` for Analyze)."""


@dataclass(frozen=True)
class Layout:
    """Voxel grid of one on-disk layout.

    Args:
        name: ``ixi`` or ``oasis``.
        axcodes: nibabel axis codes of the stored voxel axes (where increasing index points).
        zooms_mm: voxel size along the stored axes.
        shape: stored 3D shape.
        wm_intensity: stored value of white matter at intensity scale 1 (scanners differ).
    """

    name: str
    axcodes: tuple[str, str, str]
    zooms_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    wm_intensity: float

    def downsampled(self, factor: int) -> "Layout":
        """Return this layout with voxels ``factor`` times larger and the same field of view."""
        shape = tuple(math.ceil(n / factor) for n in self.shape)
        zooms = tuple(z * factor for z in self.zooms_mm)
        return replace(self, shape=shape, zooms_mm=zooms)


IXI_LAYOUT = Layout("ixi", ("P", "S", "R"), (0.9375, 0.9375, 1.2), (256, 256, 150), 900.0)
OASIS_LAYOUT = Layout("oasis", ("A", "S", "L"), (1.0, 1.0, 1.25), (256, 256, 128), 1800.0)


# ----------------------------------------------------------------------------- geometry


def rotation_matrix(angles_deg) -> np.ndarray:
    """Return the 3x3 rotation that turns about the R, then A, then S axis by ``angles_deg``."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def axcodes_affine(axcodes, zooms_mm, shape, centre_mm=(0.0, 0.0, 0.0), rotation_deg=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Return the voxel -> world (RAS mm) affine of a grid whose voxel axes point along ``axcodes``.

    Args:
        axcodes: three nibabel axis codes, e.g. ``('P', 'S', 'R')``: increasing index along axis 0
            goes towards P, and so on.
        zooms_mm: voxel size along each voxel axis.
        shape: grid shape (3D); the grid's centre voxel lands on ``centre_mm``.
        centre_mm: world position of the grid centre.
        rotation_deg: extra rotation of the whole grid about R, A, S (an oblique prescription).

    Returns:
        4x4 float64 affine.
    """
    ornt = nib.orientations.axcodes2ornt(tuple(axcodes))
    directions = np.zeros((3, 3))
    for voxel_axis, (world_axis, flip) in enumerate(ornt):
        directions[int(world_axis), voxel_axis] = flip * zooms_mm[voxel_axis]
    linear = rotation_matrix(rotation_deg) @ directions
    centre_index = (np.asarray(shape[:3], float) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(centre_mm, float) - linear @ centre_index
    return affine


def ixi_like_affine(
    shape=IXI_LAYOUT.shape, zooms_mm=IXI_LAYOUT.zooms_mm, oblique_deg=(3.0, -2.0, 2.5), centre_mm=(0.0, 0.0, 0.0)
) -> np.ndarray:
    """Return an IXI-like voxel -> world affine: voxel axes P, S, R, slightly oblique.

    Args:
        shape: grid shape; its centre voxel maps to ``centre_mm``.
        zooms_mm: voxel size along (P, S, R).
        oblique_deg: rotation of the grid about R, A, S; a few degrees keeps ``aff2axcodes`` at PSR.
        centre_mm: world position of the grid centre.

    Returns:
        4x4 affine with ``nib.aff2axcodes(affine) == ('P', 'S', 'R')``.
    """
    return axcodes_affine(IXI_LAYOUT.axcodes, zooms_mm, shape, centre_mm, oblique_deg)


def oasis_like_affine(
    shape=OASIS_LAYOUT.shape, zooms_mm=OASIS_LAYOUT.zooms_mm, centre_mm=(0.0, 0.0, 0.0)
) -> np.ndarray:
    """Return the true voxel -> world affine of an OASIS-like volume (what the reorient stage imposes).

    Voxel axes are A, S, L (axis codes ``ASL``), not oblique; Analyze stores no origin, so the
    volume centre is put at ``centre_mm`` (the world origin unless given).

    Args:
        shape: stored shape (a trailing singleton 4th axis is ignored).
        zooms_mm: voxel size along (A, S, L).
        centre_mm: world position of the volume centre.

    Returns:
        4x4 affine with ``nib.aff2axcodes(affine) == ('A', 'S', 'L')``.
    """
    return axcodes_affine(OASIS_LAYOUT.axcodes, zooms_mm, shape, centre_mm)


def covering_grid(data_shape, data_affine, axcodes, zooms_mm, oblique_deg=(0.0, 0.0, 0.0)):
    """Return (shape, affine) of the smallest ``axcodes`` grid that covers a volume's field of view.

    Args:
        data_shape: the covered volume's shape.
        data_affine: its voxel -> world affine.
        axcodes, zooms_mm, oblique_deg: the new grid's orientation, voxel size and obliquity.

    Returns:
        ``(shape, affine)`` of the new grid, centred on the covered volume.
    """
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in data_shape[:3]], indexing="ij")).reshape(3, -1)
    world = data_affine[:3, :3] @ corners + data_affine[:3, 3:4]
    unit = axcodes_affine(axcodes, (1.0, 1.0, 1.0), (1, 1, 1), (0, 0, 0), oblique_deg)[:3, :3]
    along_axes = unit.T @ world  # unit is orthonormal: its transpose projects onto the grid axes
    extent = along_axes.max(axis=1) - along_axes.min(axis=1)
    shape = tuple(int(math.ceil(e / z - 1e-6)) for e, z in zip(extent, zooms_mm))
    centre = unit @ ((along_axes.max(axis=1) + along_axes.min(axis=1)) / 2)
    return shape, axcodes_affine(axcodes, zooms_mm, shape, centre, oblique_deg)


# ----------------------------------------------------------------------------- sampling


def bspline_upsampling_matrix(n_out: int, n_control: int) -> np.ndarray:
    """Return the (n_out, n_control) cubic B-spline weights that spread control values over n_out points."""
    positions = np.linspace(0, n_control - 1, n_out)[:, None] - np.arange(n_control)[None, :]
    t = np.abs(positions)
    weights = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


class SmoothField:
    """A smooth random field on a voxel grid: random control points, cubic B-spline upsampled.

    Args:
        shape: the grid it is evaluated on.
        extent_mm: the grid's physical size along each axis (sets the number of control points).
        spacing_mm: control-point spacing.
        sigma: standard deviation of the control values.
        n_components: 3 for a displacement, 1 for a scalar field.
        rng: the random generator.
    """

    def __init__(self, shape, extent_mm, spacing_mm: float, sigma: float, n_components: int, rng):
        n_control = [max(4, int(math.ceil(e / spacing_mm)) + 1) for e in extent_mm]
        self.control = (rng.standard_normal((n_components, *n_control)) * sigma).astype(np.float32)
        self.matrices = [bspline_upsampling_matrix(n, c) for n, c in zip(shape, n_control)]

    def slab(self, rows: slice) -> np.ndarray:
        """Return the field at ``rows`` of axis 0, shape ``(n_components, r, n1, n2)``."""
        w0, w1, w2 = self.matrices
        values = np.tensordot(self.control, w0[rows], axes=([1], [1]))  # (c, k1, k2, r)
        values = np.tensordot(values, w1, axes=([1], [1]))  # (c, k2, r, n1)
        values = np.tensordot(values, w2, axes=([1], [1]))  # (c, r, n1, n2)
        return values


def slab_rows(shape) -> list[slice]:
    """Return the axis-0 slices that cut a grid into slabs of about SLAB_VOXELS voxels."""
    step = max(1, SLAB_VOXELS // max(1, shape[1] * shape[2]))
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def slab_source_coordinates(grid_to_source: np.ndarray, rows: slice, shape) -> np.ndarray:
    """Return source voxel coordinates ``(3, r, n1, n2)`` of the grid voxels in ``rows``."""
    i = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None, None]
    j = np.arange(shape[1], dtype=np.float64)[None, :, None]
    k = np.arange(shape[2], dtype=np.float64)[None, None, :]
    m = grid_to_source
    return np.stack([m[c, 0] * i + m[c, 1] * j + m[c, 2] * k + m[c, 3] for c in range(3)])


def resample_to_grid(
    volume: np.ndarray,
    volume_affine: np.ndarray,
    grid_affine: np.ndarray,
    grid_shape,
    order: int = 1,
    displacement: SmoothField | None = None,
) -> np.ndarray:
    """Return ``volume`` sampled at the voxel centres of another grid (zero outside it).

    Args:
        volume: 3D array.
        volume_affine: its voxel -> world affine.
        grid_affine: voxel -> world affine of the target grid (same world).
        grid_shape: target shape (3D).
        order: interpolation order (0 nearest, 1 linear).
        displacement: optional smooth field in world mm on the target grid, added to each
            target point's world position before sampling (a pull-back deformation).

    Returns:
        float32 array of ``grid_shape``.
    """
    grid_shape = tuple(int(n) for n in grid_shape[:3])
    grid_to_source = np.linalg.inv(volume_affine) @ grid_affine
    world_to_source_linear = np.linalg.inv(volume_affine)[:3, :3]
    source = np.ascontiguousarray(volume, dtype=np.float32)
    result = np.empty(grid_shape, np.float32)
    for rows in slab_rows(grid_shape):
        coords = slab_source_coordinates(grid_to_source, rows, grid_shape)
        if displacement is not None:
            coords += np.tensordot(world_to_source_linear, displacement.slab(rows), axes=([1], [0]))
        result[rows] = ndimage.map_coordinates(source, coords, order=order, mode="constant", cval=0.0)
    return result


# ----------------------------------------------------------------------------- writers


def to_int16(values: np.ndarray) -> np.ndarray:
    """Return ``values`` rounded and clipped into int16."""
    return np.clip(np.rint(values), -32768, 32767).astype(np.int16)


def save_ixi_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write int16 ``data`` (already in PSR voxel order) as gzipped NIfTI with qform = sform = ``affine``."""
    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise LayoutPathError(f"{path}: IXI-like files are gzipped NIfTI; give a name ending in '.nii.gz'")
    image = nib.Nifti1Image(to_int16(data), affine)
    image.set_qform(affine, code=1)  # 1 = scanner coordinates, as the IXI files carry
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, ".nii.gz") as tmp:
        nib.save(image, tmp)
    return path


def save_oasis_analyze(data: np.ndarray, zooms_mm, path: Path) -> Path:
    """Write ``data`` (already in ASL voxel order) as big-endian int16 Analyze 7.5 ``.hdr``/``.img``.

    The array gets a trailing singleton 4th axis, as real OASIS RAW volumes have. Analyze cannot
    hold an orientation, so none is written: readers must impose ASL.
    """
    path = Path(path)
    if path.suffix != ".hdr":
        raise LayoutPathError(
            f"{path}: OASIS-like files are Analyze pairs; give the name of the '.hdr' (the .img is written beside it)"
        )
    stored = to_int16(data)[..., None].astype(">i2")
    header = nib.AnalyzeHeader(endianness=">")
    header.set_data_dtype(">i2")
    header.set_data_shape(stored.shape)
    header.set_zooms((*[float(z) for z in zooms_mm], 1.0))
    # The .img goes first: a .hdr without its .img is what a reader would notice as broken.
    with atomic_path(path, ".hdr") as tmp:
        nib.save(nib.AnalyzeImage(stored, None, header), tmp)
        os.replace(tmp.with_suffix(".img"), path.with_suffix(".img"))
    return path


def write_ixi_like(
    data_ras: np.ndarray,
    affine_ras: np.ndarray,
    path,
    zooms_mm=IXI_LAYOUT.zooms_mm,
    oblique_deg=(3.0, -2.0, 2.5),
    order: int = 1,
) -> Path:
    """Write any volume as an IXI-like file: resampled onto an oblique PSR grid covering its field of view.

    Loading the file with nibabel and resampling through ``img.affine`` recovers the input (up to
    interpolation): the affine is correct, only the voxel order and obliquity differ.

    Args:
        data_ras: 3D volume (any orientation; "ras" because that is what the pipeline has).
        affine_ras: its voxel -> world affine.
        path: destination ending in ``.nii.gz``.
        zooms_mm: voxel size along (P, S, R).
        oblique_deg: grid rotation about R, A, S (a few degrees).
        order: interpolation order (0 keeps label values).

    Returns:
        ``path``. Values are rounded to int16, so pass intensities on an integer scale (e.g. 0-1000).
    """
    shape, affine = covering_grid(data_ras.shape, affine_ras, IXI_LAYOUT.axcodes, zooms_mm, oblique_deg)
    return save_ixi_nifti(resample_to_grid(data_ras, affine_ras, affine, shape, order), affine, Path(path))


def write_oasis_like(
    data_ras: np.ndarray, affine_ras: np.ndarray, path, zooms_mm=OASIS_LAYOUT.zooms_mm, order: int = 1
) -> Path:
    """Write any volume as an OASIS-like Analyze pair: resampled onto an ASL grid covering its field of view.

    Imposing :func:`oasis_like_affine` (axis codes ASL, the header zooms, origin at the centre) on the
    stored array recovers the input up to interpolation and a translation: the written grid is
    centred on the input's field-of-view centre, and Analyze keeps no origin.

    Args:
        data_ras: 3D volume.
        affine_ras: its voxel -> world affine.
        path: destination ``.hdr`` (the ``.img`` is written beside it).
        zooms_mm: voxel size along (A, S, L).
        order: interpolation order.

    Returns:
        ``path``. Values are rounded to int16.
    """
    shape, affine = covering_grid(data_ras.shape, affine_ras, OASIS_LAYOUT.axcodes, zooms_mm)
    return save_oasis_analyze(resample_to_grid(data_ras, affine_ras, affine, shape, order), zooms_mm, Path(path))
