"""Offline demo cohort: synthetic heads from the MNI152 template, written the way IXI and OASIS-1 arrive.

Each subject is the nilearn MNI152 (2009a symmetric, 1 mm) brain with a per-subject atrophy (grown
ventricles and sulci), a synthetic CSF rim / skull / scalp shell around it, a bright fiducial sphere
up on the right side of the scalp (the template is left-right symmetric: the fiducial makes flips
visible), a global size change, a head pose, a smooth random deformation, a smooth multiplicative
bias field, an intensity scale and Rician noise. Ages (20-90) follow atrophy; sex is random.

Two on-disk layouts, mimicking the real datasets (grids, resampling and writers: ``brainvq.demo_layouts``):

* **IXI-like** ``<root>/IXI/IXI###-<site>-####-T1.nii.gz``: gzipped NIfTI-1, int16, voxel axes
  P, S, R (``nib.aff2axcodes(img.affine) == ('P', 'S', 'R')``), 0.9375 x 0.9375 x 1.2 mm, and an
  oblique affine (a few degrees) that is *correct*: qform = sform = voxel -> world.
* **OASIS-like** ``<root>/OAS1_####_MR1/RAW/OAS1_####_MR1_mpr-1_anon.hdr`` (+ ``.img``): Analyze 7.5,
  big-endian int16 (``'>i2'``), shape ``(256, 256, 128, 1)``, zooms 1 x 1 x 1.25 mm. The voxels are
  stored in **ASL** order: increasing index along axis 0 goes Anterior, along axis 1 Superior, along
  axis 2 Left. Analyze headers carry no orientation, so ``nib.load(...).affine`` (LAS) is wrong on
  purpose; the true voxel -> world map is :func:`oasis_like_affine` (axis codes ASL, the header's
  zooms, origin at the volume centre), which is what ``datasets.oasis1.orientation.raw_mpr1: ASL``
  tells the reorient stage to impose.

Beside each volume lies its true brain mask (the template's brain mask moved by the same pose, size and
deformation), in the same format and voxel grid, named ``<name>_brainmask.<ext>`` (``brainvq.io.brain_mask_path``):
``preprocess.skull_strip: precomputed`` uses it.

World coordinates are RAS+ millimetres throughout.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from brainvq.demo_layouts import (
    IXI_LAYOUT,
    OASIS_LAYOUT,
    Layout,
    SmoothField,
    ixi_like_affine,
    oasis_like_affine,
    resample_to_grid,
    rotation_matrix,
    save_ixi_nifti,
    save_oasis_analyze,
    slab_rows,
)
# Re-exported: tests and callers import the layout writers and their error from brainvq.demo.
from brainvq.demo_layouts import LayoutPathError, axcodes_affine, write_ixi_like, write_oasis_like  # noqa: F401
from brainvq.files import atomic_path
from brainvq.io import brain_mask_path

log = logging.getLogger(__name__)

PARTICIPANT_COLUMNS = ["subject", "session", "site", "age", "sex", "atrophy"]
IXI_SITES = ("Guys", "HH", "IOP")
OASIS_SITE = "WashU"
OASIS_SESSION = "MR1"

# Tissue intensities relative to template white matter (= 1). Fat is brighter than WM on T1.
CSF_INTENSITY = 0.25
SKULL_INTENSITY = 0.05
DIPLOE_INTENSITY = 0.35
SCALP_INTENSITY = 1.15
# The MNI152 2009a template is left-right symmetric: a bright capsule on the right side of the
# scalp (like the vitamin-E marker some sites tape on) makes a left-right flip visible.
FIDUCIAL_INTENSITY = 1.6
FIDUCIAL_RADIUS_MM = 5.0
# Right and up at 45 degrees from the brain centre: inside the narrow left-right field of view of OASIS.
FIDUCIAL_DIRECTION = np.array([1.0, 0.0, 1.0]) / np.sqrt(2.0)

# CSF deeper than this below the brain surface counts as ventricular (lateral/third ventricles).
VENTRICLE_DEPTH_MM = 15.0
# How far CSF grows into tissue at atrophy = 1: ventricles a lot, sulci (and the outer surface) a little.
VENTRICLE_GROWTH_MM = 4.0
SULCAL_GROWTH_MM = 0.6
# Room around the brain mask for the head shell, size change, pose and deformation.
TEMPLATE_PAD_MM = 26
DEFORMATION_CONTROL_SPACING_MM = 40.0
BIAS_CONTROL_SPACING_MM = 80.0
# Centre of the head's bounding box relative to the brain centroid (MNI152: the frontal lobe reaches
# further forward, the cerebellum further down); scanner grids are centred here.
HEAD_CENTRE_MM = (0.0, 5.0, -5.0)


class DemoCohortError(RuntimeError):
    """The demo cohort cannot be written where asked (e.g. the folder already holds a cohort)."""


class TemplateUnavailableError(RuntimeError):
    """The MNI152 template files that ship inside the nilearn wheel cannot be read."""


@dataclass(frozen=True)
class SubjectParams:
    """Everything that makes one demo subject; drawn by :func:`draw_subject_params`.

    Args:
        subject, session, site, age, sex, atrophy: the participants.tsv row (atrophy in [0, 1]).
        layout: ``ixi`` or ``oasis``.
        file_stem: file name without extension (``IXI012-HH-1234-T1`` or ``OAS1_0007_MR1_mpr-1_anon``).
        size_factor: global scale of the head about the brain centre.
        pose_deg: head rotation about the R, A, S axes (degrees).
        translation_mm: head position in the scanner.
        oblique_deg: rotation of the IXI slice prescription (the voxel grid) about R, A, S.
        csf_rim_mm, skull_mm, scalp_mm: shell layer thicknesses.
        deformation_mm: standard deviation of the control-point displacements.
        bias_strength: standard deviation of the log bias field at the control points.
        intensity_scale: multiplies the layout's white-matter intensity.
        noise_fraction: Rician noise sigma relative to white matter.
        field_seed: seeds the deformation, bias field and noise.
    """

    subject: str
    session: str
    site: str
    age: float
    sex: str
    atrophy: float
    layout: str
    file_stem: str
    size_factor: float
    pose_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    oblique_deg: tuple[float, float, float]
    csf_rim_mm: float
    skull_mm: float
    scalp_mm: float
    deformation_mm: float
    bias_strength: float
    intensity_scale: float
    noise_fraction: float
    field_seed: tuple[int, ...]


@dataclass(frozen=True)
class HeadModel:
    """Template-space maps (float32, RAS voxel order) that every subject is built from.

    Args:
        affine: voxel -> world (RAS mm) of the maps.
        t1: template T1, white matter = 1, zero outside the brain mask.
        csf: CSF probability inside the brain mask.
        brain: brain mask (bool).
        outside_mm: distance outside the brain mask (0 inside).
        to_ventricle_mm: distance to ventricular CSF (0 inside it).
        to_sulcus_mm: distance to sulcal CSF or the brain surface (0 there).
        centre_mm: world position of the brain-mask centroid.
    """

    affine: np.ndarray
    t1: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    outside_mm: np.ndarray
    to_ventricle_mm: np.ndarray
    to_sulcus_mm: np.ndarray
    centre_mm: np.ndarray


# ----------------------------------------------------------------------------- template


def load_mni152_maps() -> dict[str, nib.Nifti1Image]:
    """Return the 1 mm MNI152 T1, GM, WM and brain-mask images shipped inside the nilearn wheel."""
    try:
        from nilearn import datasets

        return {
            "t1": datasets.load_mni152_template(resolution=1),
            "gm": datasets.load_mni152_gm_template(resolution=1),
            "wm": datasets.load_mni152_wm_template(resolution=1),
            "brain": datasets.load_mni152_brain_mask(resolution=1),
        }
    except Exception as error:
        raise TemplateUnavailableError(
            f"cannot read the MNI152 template from nilearn ({error}); reinstall nilearn==0.13.1 in the environment"
        ) from error


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Return ``volume`` averaged over ``factor``^3 blocks (edges trimmed to a multiple of ``factor``)."""
    if factor == 1:
        return volume
    n = [s // factor for s in volume.shape]
    trimmed = volume[: n[0] * factor, : n[1] * factor, : n[2] * factor]
    return trimmed.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5))


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Return the slices of ``mask``'s bounding box grown by ``margin`` voxels (clipped to the array)."""
    where = np.argwhere(mask)
    low = np.maximum(where.min(axis=0) - margin, 0)
    high = np.minimum(where.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def distance_mm(targets: np.ndarray, spacing: float, box: tuple[slice, ...], fill: float) -> np.ndarray:
    """Return the distance (mm) to the nearest target voxel, computed inside ``box`` only, ``fill`` outside.

    The Euclidean transform is the slow part of the head model; restricting it to ``box`` is exact
    when every target lies inside ``box``, or when the box's outer layer is all targets.
    """
    distance = np.full(targets.shape, fill, np.float32)
    distance[box] = ndimage.distance_transform_edt(~targets[box]) * spacing
    return distance


@functools.lru_cache(maxsize=2)
def head_model(downsample: int = 1) -> HeadModel:
    """Return the template maps at ``downsample`` mm, cropped to the brain and padded for the head shell.

    Cached per process: the distance transforms take a few CPU seconds at 1 mm.
    """
    images = load_mni152_maps()
    affine = images["t1"].affine
    if not np.allclose(np.abs(np.diag(affine)[:3]), 1) or nib.aff2axcodes(affine) != ("R", "A", "S"):
        raise TemplateUnavailableError(
            f"expected a 1 mm RAS MNI152 template from nilearn, got affine {affine.tolist()}"
        )
    maps = {name: image.get_fdata(dtype=np.float32) for name, image in images.items()}
    brain_box = bounding_box(maps["brain"] > 0.5, 0)
    # Zero padding: beyond the brain there is only air until the shell is drawn into it.
    maps = {name: block_mean(np.pad(volume[brain_box], TEMPLATE_PAD_MM), downsample) for name, volume in maps.items()}
    crop = np.eye(4)
    crop[:3, 3] = [s.start - TEMPLATE_PAD_MM for s in brain_box]
    scale = np.diag([downsample, downsample, downsample, 1.0])
    scale[:3, 3] = (downsample - 1) / 2  # a block's centre is the mean of its voxel centres
    affine = affine @ crop @ scale
    spacing = float(downsample)

    brain = maps["brain"] > 0.5
    wm_level = float(np.median(maps["t1"][maps["wm"] > 0.9]))
    csf = np.clip(1 - maps["gm"] - maps["wm"], 0, 1) * brain
    interior = bounding_box(brain, 1)  # its outer layer is all non-brain
    depth_mm = distance_mm(~brain, spacing, interior, 0.0)
    ventricle = (csf > 0.5) & (depth_mm > VENTRICLE_DEPTH_MM)
    sulcus = ((csf > 0.5) & ~ventricle) | ~brain
    reach = VENTRICLE_GROWTH_MM + 2  # farther than ventricles ever grow
    return HeadModel(
        affine=affine,
        t1=(maps["t1"] / wm_level * brain).astype(np.float32),
        csf=csf.astype(np.float32),
        brain=brain,
        outside_mm=distance_mm(brain, spacing, (slice(None),) * 3, 0.0),
        to_ventricle_mm=distance_mm(ventricle, spacing, bounding_box(ventricle, math.ceil(reach / spacing)), reach),
        to_sulcus_mm=distance_mm(sulcus, spacing, interior, 0.0),
        centre_mm=(affine @ np.append(np.argwhere(brain).mean(axis=0), 1))[:3],
    )


def ramp(x: np.ndarray) -> np.ndarray:
    """Return ``x`` clipped to [0, 1]: a 1 mm soft edge when ``x`` is a distance difference in mm."""
    return np.clip(x, 0.0, 1.0)


def shell_intensities(outside_mm: np.ndarray, params: SubjectParams) -> np.ndarray:
    """Return T1 intensities outside the brain: CSF rim, skull (dark, with a faint diploe), scalp fat, air."""
    rim_end = params.csf_rim_mm
    skull_end = rim_end + params.skull_mm
    scalp_end = skull_end + params.scalp_mm
    diploe_start = rim_end + 0.3 * params.skull_mm
    diploe_end = rim_end + 0.7 * params.skull_mm
    d = outside_mm
    # Sum of soft steps: each boundary changes the intensity by the jump between adjacent layers.
    value = CSF_INTENSITY * ramp(d + 0.5)
    value += (SKULL_INTENSITY - CSF_INTENSITY) * ramp(d - rim_end + 0.5)
    value += (DIPLOE_INTENSITY - SKULL_INTENSITY) * ramp(d - diploe_start + 0.5)
    value += (SKULL_INTENSITY - DIPLOE_INTENSITY) * ramp(d - diploe_end + 0.5)
    value += (SCALP_INTENSITY - SKULL_INTENSITY) * ramp(d - skull_end + 0.5)
    value += (0.0 - SCALP_INTENSITY) * ramp(d - scalp_end + 0.5)
    return value


def atrophied_csf_weight(model: HeadModel, atrophy: float) -> np.ndarray:
    """Return the CSF share of each brain voxel after growing ventricles and sulci by ``atrophy``."""
    ventricles = ramp(atrophy * VENTRICLE_GROWTH_MM + 1 - model.to_ventricle_mm)
    sulci = ramp(atrophy * SULCAL_GROWTH_MM + 1 - model.to_sulcus_mm)
    return np.maximum(model.csf, np.maximum(ventricles, sulci))


def fiducial_centre_mm(model: HeadModel, params: SubjectParams) -> np.ndarray:
    """Return the template-world centre of the fiducial: on the scalp, up and to the right of the brain centre."""
    spacing = model.affine[0, 0]
    distances_mm = np.arange(0.0, 150.0, spacing / 2)
    ray_mm = model.centre_mm + distances_mm[:, None] * FIDUCIAL_DIRECTION
    ray_index = np.rint(nib.affines.apply_affine(np.linalg.inv(model.affine), ray_mm)).astype(int)
    in_volume = np.all((ray_index >= 0) & (ray_index < model.brain.shape), axis=1)
    on_brain = np.zeros(len(ray_mm), bool)
    on_brain[in_volume] = model.brain[tuple(ray_index[in_volume].T)]
    brain_edge_mm = distances_mm[np.flatnonzero(on_brain)[-1]]
    shell_mm = params.csf_rim_mm + params.skull_mm + params.scalp_mm
    return model.centre_mm + (brain_edge_mm + shell_mm + FIDUCIAL_RADIUS_MM) * FIDUCIAL_DIRECTION


def draw_fiducial(head: np.ndarray, model: HeadModel, params: SubjectParams) -> None:
    """Draw the bright right-side fiducial sphere into ``head`` (template space), in place."""
    spacing = model.affine[0, 0]
    centre = np.linalg.solve(model.affine, np.append(fiducial_centre_mm(model, params), 1))[:3]
    low = np.maximum(np.floor(centre - FIDUCIAL_RADIUS_MM / spacing - 1).astype(int), 0)
    high = np.minimum(np.ceil(centre + FIDUCIAL_RADIUS_MM / spacing + 2).astype(int), head.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"), axis=-1)
    inside = ramp(FIDUCIAL_RADIUS_MM + 0.5 - np.linalg.norm(grid - centre, axis=-1) * spacing)
    head[box] = np.maximum(head[box], FIDUCIAL_INTENSITY * inside)


def head_intensities(model: HeadModel, params: SubjectParams) -> np.ndarray:
    """Return the subject's noise-free head in template space (white matter = 1), fiducial included."""
    csf = atrophied_csf_weight(model, params.atrophy)
    brain = model.t1 * (1 - csf) + CSF_INTENSITY * csf
    head = np.where(model.brain, brain, shell_intensities(model.outside_mm, params)).astype(np.float32)
    draw_fiducial(head, model, params)
    return head


def subject_to_template(model: HeadModel, params: SubjectParams) -> np.ndarray:
    """Return the 4x4 map from the subject's scanner world to template world (undoes pose and size)."""
    rotation = rotation_matrix(params.pose_deg)
    to_template = np.eye(4)
    to_template[:3, :3] = rotation.T / params.size_factor
    to_template[:3, 3] = model.centre_mm - to_template[:3, :3] @ np.asarray(params.translation_mm)
    return to_template


def subject_grid(params: SubjectParams, downsample: int = 1) -> tuple[Layout, np.ndarray]:
    """Return the subject's layout (voxel grid) and its voxel -> scanner-world affine."""
    if params.layout == "ixi":
        layout = IXI_LAYOUT.downsampled(downsample)
        affine = ixi_like_affine(layout.shape, layout.zooms_mm, params.oblique_deg, HEAD_CENTRE_MM)
    else:
        layout = OASIS_LAYOUT.downsampled(downsample)
        affine = oasis_like_affine(layout.shape, layout.zooms_mm, HEAD_CENTRE_MM)
    return layout, affine


def grid_extent_mm(grid_affine: np.ndarray, grid_shape) -> np.ndarray:
    """Return the physical extent (mm) of a voxel grid along its three axes."""
    return np.asarray(grid_shape[:3]) * np.linalg.norm(grid_affine[:3, :3], axis=0)


def subject_deformation(params: SubjectParams, grid_affine: np.ndarray, grid_shape, rng) -> SmoothField:
    """Return the subject's smooth deformation on a grid: the first draw from ``rng`` (seeded by
    ``params.field_seed``), so the volume and its brain mask get the same one."""
    grid_shape = tuple(int(n) for n in grid_shape[:3])
    return SmoothField(grid_shape, grid_extent_mm(grid_affine, grid_shape), DEFORMATION_CONTROL_SPACING_MM,
                       params.deformation_mm, 3, rng)


def subject_volume(
    params: SubjectParams,
    grid_affine: np.ndarray,
    grid_shape,
    downsample: int = 1,
    wm_intensity: float = 1.0,
) -> np.ndarray:
    """Return the subject's T1 sampled on a voxel grid of its scanner world (float32).

    Args:
        params: the subject.
        grid_affine: voxel -> scanner-world affine of the grid (any orientation).
        grid_shape: grid shape.
        downsample: template resolution in mm (1 for real data, larger for fast tests).
        wm_intensity: value of white matter at intensity scale 1.

    Returns:
        Intensities with bias field, intensity scale and Rician noise applied.
    """
    model = head_model(downsample)
    head = head_intensities(model, params)
    grid_shape = tuple(int(n) for n in grid_shape[:3])
    rng = np.random.default_rng(list(params.field_seed))
    deformation = subject_deformation(params, grid_affine, grid_shape, rng)
    bias = SmoothField(grid_shape, grid_extent_mm(grid_affine, grid_shape), BIAS_CONTROL_SPACING_MM,
                       params.bias_strength, 1, rng)
    template_affine = np.linalg.inv(subject_to_template(model, params)) @ model.affine
    volume = resample_to_grid(head, template_affine, grid_affine, grid_shape, order=1, displacement=deformation)
    sigma = params.noise_fraction
    scale = wm_intensity * params.intensity_scale
    for rows in slab_rows(grid_shape):
        signal = volume[rows] * np.exp(bias.slab(rows)[0])
        real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        volume[rows] = np.sqrt(real**2 + imaginary**2) * scale  # Rician: magnitude of complex Gaussian
    return volume


def subject_brain_mask(params: SubjectParams, grid_affine: np.ndarray, grid_shape, downsample: int = 1) -> np.ndarray:
    """Return the subject's true brain mask (bool) on a grid: the template's brain mask moved by the same pose,
    size and deformation as :func:`subject_volume`'s head, so it lies exactly on the written brain."""
    model = head_model(downsample)
    grid_shape = tuple(int(n) for n in grid_shape[:3])
    deformation = subject_deformation(params, grid_affine, grid_shape, np.random.default_rng(list(params.field_seed)))
    template_affine = np.linalg.inv(subject_to_template(model, params)) @ model.affine
    return resample_to_grid(model.brain.astype(np.float32), template_affine, grid_affine, grid_shape, order=1,
                            displacement=deformation) > 0.5


# ----------------------------------------------------------------------------- cohort


def uniform_triplet(rng, low: float, high: float) -> tuple[float, float, float]:
    """Return three independent uniform draws, as plain floats."""
    return tuple(float(v) for v in rng.uniform(low, high, 3))


def draw_subject_params(seed: int, index: int, layout: str, number: int) -> SubjectParams:
    """Return subject ``index`` of the cohort for ``seed``, deterministic and independent of the cohort size.

    Args:
        seed: the cohort seed.
        index: the subject's position in the cohort.
        layout: ``ixi`` or ``oasis``.
        number: the dataset's subject number (IXI012 -> 12, OAS1_0007 -> 7).
    """
    rng = np.random.default_rng([seed, index])
    age = float(np.round(rng.uniform(20, 90), 1))
    # Atrophy follows age with scatter, so analyses of the latent space have something to find.
    atrophy = float(np.round(np.clip((age - 20) / 70 + rng.normal(0, 0.12), 0, 1), 3))
    sex = str(rng.choice(["F", "M"]))
    if layout == "ixi":
        site = str(rng.choice(IXI_SITES))
        subject, session = f"IXI{number:03d}", ""
        file_stem = f"{subject}-{site}-{int(rng.integers(0, 10000)):04d}-T1"
    else:
        site, subject, session = OASIS_SITE, f"OAS1_{number:04d}", OASIS_SESSION
        file_stem = f"{subject}_{session}_mpr-1_anon"
    return SubjectParams(
        subject=subject,
        session=session,
        site=site,
        age=age,
        sex=sex,
        atrophy=atrophy,
        layout=layout,
        file_stem=file_stem,
        size_factor=float(0.95 * rng.uniform(0.92, 1.08)),  # the MNI152 brain is larger than most
        pose_deg=uniform_triplet(rng, -5, 5),
        translation_mm=uniform_triplet(rng, -4, 4),
        oblique_deg=uniform_triplet(rng, -6, 6) if layout == "ixi" else (0.0, 0.0, 0.0),
        csf_rim_mm=float(rng.uniform(1.5, 3.5)),
        skull_mm=float(rng.uniform(4.0, 7.0)),
        scalp_mm=float(rng.uniform(3.0, 6.0)),
        deformation_mm=float(rng.uniform(1.0, 2.5)),
        bias_strength=float(rng.uniform(0.05, 0.2)),
        intensity_scale=float(rng.uniform(0.7, 1.4)),
        noise_fraction=float(rng.uniform(0.01, 0.03)),
        field_seed=(seed, index, 1),
    )


def cohort_params(n_subjects: int, seed: int, oasis_fraction: float) -> list[SubjectParams]:
    """Return the parameters of every demo subject, in subject order.

    ``round(n_subjects * oasis_fraction)`` subjects are OASIS-like, the rest IXI-like; which ones,
    and their dataset numbers, are drawn from ``seed``.
    """
    if not 1 <= n_subjects <= 999 or not 0 <= oasis_fraction <= 1:
        raise ValueError(
            f"need 1 <= n_subjects <= 999 and 0 <= oasis_fraction <= 1, got {n_subjects} and {oasis_fraction}; "
            "fix demo.n_subjects / demo.oasis_fraction"
        )
    rng = np.random.default_rng([seed, 2**31])
    n_oasis = int(round(n_subjects * oasis_fraction))
    is_oasis = np.zeros(n_subjects, bool)
    is_oasis[rng.permutation(n_subjects)[:n_oasis]] = True
    # Three-digit numbers, as in the datasets' names (IXI### and OAS1_0###): up to 999 of each.
    ixi_numbers = iter(sorted(rng.choice(np.arange(1, 1000), n_subjects - n_oasis, replace=False)))
    oasis_numbers = iter(sorted(rng.choice(np.arange(1, 1000), n_oasis, replace=False)))
    params = [
        draw_subject_params(
            seed, index, "oasis" if oasis else "ixi", int(next(oasis_numbers if oasis else ixi_numbers))
        )
        for index, oasis in enumerate(is_oasis)
    ]
    return sorted(params, key=lambda p: p.subject)


def subject_path(root: Path, params: SubjectParams) -> Path:
    """Return where a subject's volume lives in the cohort folder (``.nii.gz`` or ``.hdr``)."""
    if params.layout == "ixi":
        return Path(root) / "IXI" / f"{params.file_stem}.nii.gz"
    scan = f"{params.subject}_{params.session}"
    return Path(root) / scan / "RAW" / f"{params.file_stem}.hdr"


def write_subject(params: SubjectParams, root: Path, downsample: int = 1) -> tuple[Path, float]:
    """Synthesise one subject and write it in its layout under ``root``, with its true brain mask (0/1, same
    format and grid) beside it as ``brainvq.io.brain_mask_path`` names it.

    Returns:
        ``(path, seconds)``: the written volume and the time it took.
    """
    start = time.perf_counter()
    layout, affine = subject_grid(params, downsample)
    volume = subject_volume(params, affine, layout.shape, downsample, layout.wm_intensity)
    brain = subject_brain_mask(params, affine, layout.shape, downsample).astype(np.float32)
    path = subject_path(root, params)
    # The volume last: a cohort folder whose volume exists also has its mask.
    for data, target in ((brain, brain_mask_path(path)), (volume, path)):
        if params.layout == "ixi":
            save_ixi_nifti(data, affine, target)
        else:
            save_oasis_analyze(data, layout.zooms_mm, target)
    return path, time.perf_counter() - start


def participants_frame(params: list[SubjectParams]) -> pd.DataFrame:
    """Return the participants table (PARTICIPANT_COLUMNS) of the given subjects."""
    return pd.DataFrame([{column: getattr(p, column) for column in PARTICIPANT_COLUMNS} for p in params])


def build_demo_cohort(
    root, n_subjects: int, seed: int, oasis_fraction: float, workers: int = 1, downsample: int = 1
) -> pd.DataFrame:
    """Write the demo cohort into ``root`` (absent or empty) and return its participants table.

    The cohort is built in a hidden sibling folder and renamed into place at the end, so an
    interrupted run never leaves a folder that looks complete.

    Args:
        root: the cohort folder to create.
        n_subjects: how many subjects.
        seed: everything (IDs, layouts, anatomy, noise) follows from it; same seed, same bytes.
        oasis_fraction: share written as OASIS-like Analyze (the rest IXI-like NIfTI).
        workers: processes used to synthesise subjects.
        downsample: voxel-size multiplier of both layouts (1 = real IXI/OASIS geometry).

    Returns:
        The participants table, also written to ``root/participants.tsv``.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DemoCohortError(f"{root} already exists and is not empty; delete it to rebuild the demo cohort")
    params = cohort_params(n_subjects, seed, oasis_fraction)
    head_model(downsample)  # build once here, so forked workers inherit it instead of each rebuilding it
    if root.exists():
        root.rmdir()  # empty (checked above): the finished folder takes its name
    with atomic_path(root) as staging:
        staging.mkdir()
        for p, (path, seconds) in zip(params, map_subjects(params, staging, downsample, workers)):
            log.info("demo subject %s (%s) -> %s in %.1f s", p.subject, p.layout, path.relative_to(staging), seconds)
        table = participants_frame(params)
        table.to_csv(staging / "participants.tsv", sep="\t", index=False)
    return table


def map_subjects(params: list[SubjectParams], root: Path, downsample: int, workers: int):
    """Yield ``write_subject`` results in order, in ``workers`` forked processes when more than one."""
    if workers <= 1 or len(params) <= 1:
        for p in params:
            yield write_subject(p, root, downsample)
        return
    # fork: workers inherit the cached head model instead of recomputing the distance transforms.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(params)), mp_context=context) as pool:
        yield from pool.map(write_subject, params, [root] * len(params), [downsample] * len(params))


def synthetic_brain_slices(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (images, masks): n ellipse 'brains' with textured tissue and a dark 'ventricle', in [0, 1].

    Slice-level stand-ins for tests and benchmarks that need brain-like 2D data in seconds.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    images = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        a, b = rng.uniform(0.55, 0.8), rng.uniform(0.65, 0.9)
        brain = (xx / a) ** 2 + (yy / b) ** 2 <= 1
        ventricle = ((xx / (0.12 + 0.1 * rng.random())) ** 2 + (yy / 0.3) ** 2) <= 1
        texture = 0.6 + 0.25 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(5 * yy)
        image = np.where(brain, texture, 0.0)
        image = np.where(ventricle, 0.2, image)
        images[i] = np.clip(image + rng.normal(0, 0.02, image.shape) * brain, 0, 1)
        masks[i] = brain
    return images, masks
