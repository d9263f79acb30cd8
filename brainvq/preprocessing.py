"""Per-scan preprocessing: RAS + isotropic resampling, skull stripping, N4, axial slice selection and normalisation."""

from __future__ import annotations

import contextlib
import logging
from io import StringIO

import nibabel as nib
import numpy as np
from nibabel.orientations import aff2axcodes
from nibabel.processing import resample_from_to, resample_to_output
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.transform import resize

log = logging.getLogger(__name__)

RAS = ("R", "A", "S")
# The N4 fit runs on a 4x shrunk volume (the bias field is smooth); the field is then evaluated at full resolution.
N4_SHRINK_FACTOR = 4
SKULL_STRIP_METHODS = ("none", "bet", "precomputed")


class EmptyMaskError(ValueError):
    """Skull stripping (or a given mask) left no foreground voxel."""


class PreprocessingError(ValueError):
    """A preprocessing setting is invalid (unknown method or slice selection mode)."""


def float32_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Return a float32 NIfTI image with sform and qform set to ``affine`` (code 1, mm)."""
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def reorient_to_ras(img) -> nib.Nifti1Image:
    """Return ``img`` with its voxel axes permuted/flipped to the closest RAS+ orientation (no resampling)."""
    canonical = nib.as_closest_canonical(img)
    assert aff2axcodes(canonical.affine) == RAS, aff2axcodes(canonical.affine)
    return canonical


def resample_isotropic(img, spacing_mm: float) -> nib.Nifti1Image:
    """Return ``img`` resampled onto a RAS-aligned grid of ``spacing_mm`` isotropic voxels.

    Oblique affines (e.g. IXI) are resampled onto axis-aligned voxels covering the whole
    input. Trilinear interpolation: it never overshoots, so intensities stay non-negative.

    Returns:
        float32 image with a diagonal RAS+ affine and zooms ``(spacing_mm,) * 3``.
    """
    resampled = resample_to_output(img, voxel_sizes=(spacing_mm,) * 3, order=1, mode="constant", cval=0.0)
    assert aff2axcodes(resampled.affine) == RAS, aff2axcodes(resampled.affine)
    return float32_image(resampled.get_fdata(dtype=np.float32), resampled.affine)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Return the largest 26-connected component of a boolean mask (empty stays empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def head_foreground_mask(data: np.ndarray) -> np.ndarray:
    """Return the head foreground: Otsu threshold, holes filled, largest component.

    Axial slices are filled first, so dark skull and CSF inside the scalp ring count as head even
    where the head is open at the neck (where a 3D fill cannot reach).
    """
    foreground = data > threshold_otsu(data)
    for k in range(foreground.shape[2]):
        foreground[:, :, k] = ndimage.binary_fill_holes(foreground[:, :, k])
    return ndimage.binary_fill_holes(largest_component(foreground))


def mask_from_surface(surface, shape) -> np.ndarray:
    """Return the voxels inside a closed trimesh surface given in voxel coordinates."""
    filled = surface.voxelized(pitch=1.0).fill()
    points = np.rint(filled.points).astype(np.int64)
    inside = np.all((points >= 0) & (points < np.asarray(shape)), axis=1)
    mask = np.zeros(shape, bool)
    mask[tuple(points[inside].T)] = True
    return mask


def bet_brain_mask(img, fractional_threshold: float | None = None, iterations: int | None = None) -> np.ndarray:
    """Return a BET brain mask from the ``brainextractor`` package (a Python port of FSL BET).

    Args:
        img: isotropic volume (BET's distances are in voxels of the first axis).
        fractional_threshold: BET's ``bt``; None keeps brainextractor's own default.
        iterations: surface deformation steps; None keeps brainextractor's own default.
    """
    from brainextractor import BrainExtractor  # numba compile on first import: only pay it when asked

    options = {} if fractional_threshold is None else {"bt": float(fractional_threshold)}
    steps = {} if iterations is None else {"iterations": int(iterations)}
    chatter = StringIO()
    # brainextractor prints progress (one line per iteration) to stdout; keep only the summary lines.
    with contextlib.redirect_stdout(chatter):
        extractor = BrainExtractor(img, **options)
        extractor.run(**steps)
    for line in chatter.getvalue().splitlines():
        if line.strip() and not line.startswith("Iteration"):
            log.info("bet: %s", line.strip())
    return mask_from_surface(extractor.surface, img.shape[:3])


def mask_on_grid(mask_img, target) -> np.ndarray:
    """Return a mask image of any orientation and grid (e.g. a precomputed brain mask read beside its volume)
    resampled onto ``target``'s grid through both affines: bool, inside where linear interpolation gives > 0.5."""
    moved = resample_from_to(mask_img, (target.shape[:3], target.affine), order=1, mode="constant", cval=0.0)
    return moved.get_fdata(dtype=np.float32) > 0.5


def skull_strip(
    img,
    method: str,
    bet_fractional_threshold: float | None = None,
    bet_iterations: int | None = None,
    precomputed_mask: np.ndarray | None = None,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Return (brain, mask) images of an isotropic RAS volume.

    Args:
        img: isotropic RAS volume (the output of ``resample_isotropic``).
        method: 'bet' (brainextractor), 'none' (the head, with a head-foreground mask), or
            'precomputed' (the mask found beside the volume, ``precomputed_mask``; without one, an already
            skull-stripped volume: mask = voxels > 0).
        bet_fractional_threshold, bet_iterations: for 'bet'; None keeps brainextractor's defaults.
        precomputed_mask: for 'precomputed', a bool array on ``img``'s grid (``mask_on_grid``), or None.

    Returns:
        brain: float32, zero outside the mask; mask: uint8 (1 inside), same grid as ``img``.

    Raises:
        EmptyMaskError: the mask has no voxel.
        PreprocessingError: unknown method.
    """
    data = img.get_fdata(dtype=np.float32)
    if method == "none":
        mask = head_foreground_mask(data)
    elif method == "precomputed":
        mask = np.asarray(precomputed_mask, bool) if precomputed_mask is not None else data > 0
    elif method == "bet":
        mask = bet_brain_mask(img, bet_fractional_threshold, bet_iterations)
    else:
        raise PreprocessingError(f"unknown skull_strip method {method!r}; use one of {', '.join(SKULL_STRIP_METHODS)}")
    if not mask.any():
        raise EmptyMaskError(
            f"skull_strip={method} found no foreground voxel; check the volume, or try preprocess.skull_strip: none"
        )
    brain = np.where(mask, data, 0).astype(np.float32)
    return float32_image(brain, img.affine), mask_image(mask, img.affine)


def mask_image(mask: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Return a uint8 NIfTI mask image."""
    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def n4_bias_correct(img, mask) -> nib.Nifti1Image:
    """Return ``img`` divided by the N4 bias field fitted inside ``mask`` (SimpleITK).

    The fit runs on the volume shrunk by N4_SHRINK_FACTOR; the log bias field is then evaluated on
    the full-resolution grid, so the correction itself is not blurred.

    Args:
        img: 3D volume (non-negative intensities).
        mask: mask image or boolean array on the same grid.

    Returns:
        float32 image on the same grid and affine.

    Raises:
        EmptyMaskError: the mask has no voxel.
    """
    import SimpleITK as sitk

    mask_data = np.asarray(mask.dataobj if hasattr(mask, "dataobj") else mask) > 0
    if not mask_data.any():
        raise EmptyMaskError("n4_bias_correct got an empty mask; skull stripping found no foreground")
    data = img.get_fdata(dtype=np.float32)
    # SimpleITK indexes (x, y, z) in reverse numpy order; only spacing matters for the fit.
    image = sitk.GetImageFromArray(np.maximum(data, 0).T.copy())
    image.SetSpacing([float(z) for z in img.header.get_zooms()[:3]])
    sitk_mask = sitk.GetImageFromArray(mask_data.T.astype(np.uint8).copy())
    sitk_mask.CopyInformation(image)
    factors = [N4_SHRINK_FACTOR] * 3
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.Execute(sitk.Shrink(image, factors), sitk.Shrink(sitk_mask, factors))
    log_bias = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image)).T
    return float32_image(data / np.exp(log_bias), img.affine)


def axial_areas(mask: np.ndarray) -> np.ndarray:
    """Return the mask's voxel count in each axial slice (third axis of a RAS volume)."""
    return np.asarray(mask, bool).sum(axis=(0, 1))


def axial_extent(mask: np.ndarray) -> tuple[int, int]:
    """Return (k_min, k_max): the first and last axial slices holding any mask voxel.

    Raises:
        EmptyMaskError: the mask is empty.
    """
    occupied = np.flatnonzero(axial_areas(mask))
    if occupied.size == 0:
        raise EmptyMaskError("the mask is empty: no axial slice holds brain (or head)")
    return int(occupied[0]), int(occupied[-1])


def select_axial_slices(mask: np.ndarray, mode: str, min_brain_fraction: float, slice_range) -> np.ndarray:
    """Return the axial indices to keep.

    Args:
        mask: 3D boolean mask of a RAS volume; axial = third axis.
        mode: 'brain_fraction' keeps slices whose mask area is at least ``min_brain_fraction`` of
            the largest slice's; 'range' keeps ``slice_range = [first, last)`` within the mask's
            axial extent (so every kept slice has a position in [0, 1]).
        min_brain_fraction: see ``mode``.
        slice_range: see ``mode``.

    Returns:
        Sorted int array (possibly empty).

    Raises:
        EmptyMaskError, PreprocessingError.
    """
    areas = axial_areas(mask)
    k_min, k_max = axial_extent(mask)
    if mode == "brain_fraction":
        return np.flatnonzero(areas >= min_brain_fraction * areas.max()).astype(np.int64)
    if mode == "range":
        first, last = int(slice_range[0]), int(slice_range[1])
        return np.arange(max(first, k_min), min(last, k_max + 1), dtype=np.int64)
    raise PreprocessingError(f"unknown slice_selection {mode!r}; use brain_fraction or range")


def slice_positions(mask: np.ndarray, indices) -> np.ndarray:
    """Return ``(k - k_min) / (k_max - k_min)`` over the mask's axial extent (0 when it is one slice)."""
    k_min, k_max = axial_extent(mask)
    span = max(k_max - k_min, 1)
    return ((np.asarray(indices, float) - k_min) / span).astype(np.float32)


def intensity_window(volume: np.ndarray, mask: np.ndarray, clip_percentiles) -> tuple[float, float]:
    """Return the (low, high) intensities at ``clip_percentiles`` of the foreground voxels."""
    low, high = np.percentile(volume[np.asarray(mask, bool)], list(clip_percentiles))
    return float(low), float(high)


def scaled_intensities(volume: np.ndarray, mask: np.ndarray, clip_percentiles) -> np.ndarray:
    """Return ``volume`` clipped at its foreground's ``clip_percentiles``, scaled to [0, 1] and 0 outside ``mask``
    (float32; one intensity window per scan)."""
    low, high = intensity_window(volume, mask, clip_percentiles)
    # A flat foreground would divide by zero; it maps to 0 instead.
    scaled = (np.clip(volume, low, high) - low) / max(high - low, np.finfo(np.float32).eps)
    return np.where(mask, scaled, 0.0).astype(np.float32)


def window_voxels(settings: dict) -> int:
    """Return the side, in voxels at ``spacing_mm``, of the square in-plane window every slice is cut to."""
    return max(1, round(settings["field_of_view_mm"] / settings["spacing_mm"]))


def pixel_mm(settings: dict) -> float:
    """Return the in-plane pixel size of every slice of a run: the window's physical side over ``size``."""
    return window_voxels(settings) * settings["spacing_mm"] / settings["size"]


def mask_kind(settings: dict) -> str:
    """Return what a run's masks cover: ``head`` with ``skull_strip: none`` (head foreground), else ``brain``."""
    return "head" if settings["skull_strip"] == "none" else "brain"


def in_plane_window(mask: np.ndarray, side_vox: int | None = None) -> tuple[int, int, int]:
    """Return ``(top row, left column, side)`` of the square window of axial-image pixels that slices are cut to.

    The window is centred on the bounding box of the whole 3D ``mask`` seen from above (one window for every
    slice of a scan, so slices stay aligned). ``side_vox`` None takes the larger in-plane side of the volume.
    Coordinates are those of :func:`axial_stack` images (rows anterior to posterior, columns left to right);
    the window may reach outside the image, where it is zero-padded.
    """
    image_rows, image_cols = mask.shape[1], mask.shape[0]  # axial images are (A, R): rot90 of (R, A)
    side = max(image_rows, image_cols) if side_vox is None else int(side_vox)
    footprint = np.rot90(np.asarray(mask, bool).any(axis=2))
    rows, cols = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    if rows.size == 0:
        raise EmptyMaskError("the mask is empty: no window can be centred on it")
    centre_row, centre_col = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    return int(round(centre_row - side / 2)), int(round(centre_col - side / 2)), side


def windowed(stack: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """Return the ``side`` x ``side`` window at (``top``, ``left``) of every image in (N, H, W), zero outside."""
    n, h, w = stack.shape
    out = np.zeros((n, side, side), stack.dtype)
    r0, r1 = max(top, 0), min(top + side, h)
    c0, c1 = max(left, 0), min(left + side, w)
    if r1 > r0 and c1 > c0:
        out[:, r0 - top:r1 - top, c0 - left:c1 - left] = stack[:, r0:r1, c0:c1]
    return out


def axial_stack(volume: np.ndarray, indices) -> np.ndarray:
    """Return axial slices as (N, A, R) images: rows run anterior to posterior, columns left to right."""
    if len(indices) == 0:
        return np.zeros((0, volume.shape[1], volume.shape[0]), volume.dtype)
    # volume[:, :, k] is (x=R, y=A); rot90 puts anterior at the top and the subject's left on the left.
    return np.stack([np.rot90(volume[:, :, k]) for k in indices])


def normalised_slices(
    volume: np.ndarray, mask: np.ndarray, indices, clip_percentiles, size: int, window_vox: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (images, masks, positions) of the selected axial slices, ready for the shards.

    Intensities are clipped at the foreground's ``clip_percentiles`` over the whole volume
    (one window per subject), scaled to [0, 1] and set to 0 outside the mask; slices are cut (cropped
    or zero-padded) to the square :func:`in_plane_window` centred on the mask, then resized to ``size``
    with anti-aliasing. With a fixed ``window_vox`` every scan of a run gets one pixel size in mm.

    Args:
        volume: 3D RAS volume; mask: 3D boolean mask on the same grid.
        indices: axial indices (from ``select_axial_slices``).
        clip_percentiles: (low, high) percentiles of the mask's voxels.
        size: output side in pixels.
        window_vox: side of the in-plane window in voxels (``window_voxels(settings)``); None = the
            larger in-plane side of the volume.

    Returns:
        images (N, size, size) float32 in [0, 1]; masks (N, size, size) bool;
        positions (N,) float32 in [0, 1] over the mask's axial extent.

    Raises:
        EmptyMaskError: the mask is empty.
    """
    mask = np.asarray(mask, bool)
    positions = slice_positions(mask, indices)
    scaled = scaled_intensities(volume, mask, clip_percentiles)
    top, left, side = in_plane_window(mask, window_vox)
    images = windowed(axial_stack(scaled, indices), top, left, side)
    masks = windowed(axial_stack(mask.astype(np.float32), indices), top, left, side)
    n = images.shape[0]
    if n == 0:
        return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), bool), positions
    # Axis 0 keeps its length, so resize's anti-aliasing sigma is 0 there: slices stay independent.
    images = resize(images, (n, size, size), order=1, anti_aliasing=True, preserve_range=True)
    masks = resize(masks, (n, size, size), order=1, anti_aliasing=True, preserve_range=True) >= 0.5
    return np.clip(images, 0, 1).astype(np.float32), masks, positions


def scan_slices(volume: np.ndarray, mask: np.ndarray, settings: dict, skull_strip_reason: str = "") -> dict:
    """Return one scan's slices, or none with the reason it is excluded.

    Args:
        volume: 3D RAS brain (or head) volume; mask: its 3D mask (an empty mask marks a scan whose
            skull stripping failed under ``on_error: skip``).
        settings: the ``preprocess`` config section.
        skull_strip_reason: why the QC gate after skull stripping leaves the scan out ('' when it passed;
            ``brainvq.qc.skull_strip_problem``).

    Returns:
        dict with ``images`` (N, size, size) in ``settings['dtype']``, ``masks``, ``slice_index`` (int32),
        ``slice_position`` (float32), ``excluded_stage`` and ``excluded_reason`` ('' when kept), and the
        slices' geometry: ``pixel_mm`` and ``window`` (top row, left column, side in voxels of the axial
        images of the RAS volume; all -1 when excluded), which maps slice pixels back to RAS voxels.
    """
    size = settings["size"]
    mask = np.asarray(mask, bool)
    stage, reason = "", ""
    indices = np.zeros(0, np.int64)
    window = (-1, -1, -1)
    if not mask.any():
        stage, reason = "skull_strip", f"empty mask after skull_strip={settings['skull_strip']}"
    elif skull_strip_reason:
        stage, reason = "skull_strip", skull_strip_reason
    else:
        indices = select_axial_slices(
            mask, settings["slice_selection"], settings["min_brain_fraction"], settings["slice_range"]
        )
        if len(indices) == 0:
            stage, reason = "slice_volume", f"no axial slice passed slice_selection={settings['slice_selection']}"
    if reason:
        images, masks, positions = np.zeros((0, size, size)), np.zeros((0, size, size), bool), np.zeros(0)
    else:
        window = in_plane_window(mask, window_voxels(settings))
        images, masks, positions = normalised_slices(volume, mask, indices, settings["clip_percentiles"], size,
                                                     window_voxels(settings))
    return {
        "images": images.astype(settings["dtype"]),
        "masks": masks,
        "slice_index": indices.astype(np.int32),
        "slice_position": positions.astype(np.float32),
        "excluded_stage": stage,
        "excluded_reason": reason,
        "pixel_mm": pixel_mm(settings),
        "window": np.asarray(window, np.int64),
    }


def shard_geometry(settings: dict) -> dict:
    """Return the geometry attributes of a run's per-scan files and shards: ``size`` and ``pixel_mm`` for slices;
    ``dims`` (3), ``box_mm`` and ``voxel_mm`` for whole volumes (``preprocess.dims: 3``)."""
    if settings["dims"] == 3:
        return {"dims": 3, "box_mm": [float(side) for side in settings["box_mm"]],
                "voxel_mm": float(settings["spacing_mm"])}
    return {"size": settings["size"], "pixel_mm": pixel_mm(settings)}


# ---------------------------------------------------------------------------------------- back to native space


def slices_to_volume(slices: np.ndarray, slice_index, window, volume_shape) -> np.ndarray:
    """Return a RAS volume of ``volume_shape`` holding ``slices`` where :func:`scan_slices` cut them from.

    The inverse of the slice geometry: each ``(size, size)`` slice is resized to the window's ``side``, put at
    (``top``, ``left``) of its axial image (rows anterior to posterior, columns left to right; parts outside
    the image are dropped) and turned back into the volume's axial plane at ``slice_index``. Voxels of other
    slices are 0.

    Args:
        slices: ``(N, size, size)`` images (any values: reconstructions, anomaly scores).
        slice_index: ``(N,)`` axial indices in the RAS volume.
        window: ``(top, left, side)``, the ``window`` of :func:`scan_slices` (``window_vox`` of a slices file).
        volume_shape: shape of the RAS volume the slices were cut from.
    """
    top, left, side = (int(v) for v in window)
    volume = np.zeros(tuple(volume_shape[:3]), np.float32)
    slices = np.asarray(slices, np.float32)
    if len(slices) == 0:
        return volume
    stack = resize(slices, (len(slices), side, side), order=1, anti_aliasing=side < slices.shape[1],
                   preserve_range=True)
    rows, cols = volume.shape[1], volume.shape[0]  # axial images are (A, R): rot90 of (R, A)
    r0, r1 = max(top, 0), min(top + side, rows)
    c0, c1 = max(left, 0), min(left + side, cols)
    for image, k in zip(stack, np.asarray(slice_index, int)):
        canvas = np.zeros((rows, cols), np.float32)
        if r1 > r0 and c1 > c0:
            canvas[r0:r1, c0:c1] = image[r0 - top:r1 - top, c0 - left:c1 - left]
        volume[:, :, k] = np.rot90(canvas, k=-1)
    return volume


def resample_to_grid(img, shape, affine, order: int = 1) -> nib.Nifti1Image:
    """Return ``img`` resampled onto the voxel grid ``(shape, affine)`` (e.g. an input file's native space), float32.

    Trilinear by default; voxels the image does not cover are 0. The result has exactly ``shape`` and ``affine``.
    """
    from nibabel.processing import resample_from_to

    resampled = resample_from_to(img, (tuple(int(n) for n in shape[:3]), np.asarray(affine, float)), order=order,
                                 mode="constant", cval=0.0)
    return float32_image(resampled.get_fdata(dtype=np.float32), np.asarray(affine, float))
