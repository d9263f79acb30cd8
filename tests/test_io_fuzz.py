"""Fuzzing discovery: whatever a raw file holds, it is accepted as a finite RAS volume or refused naming the file.

Hypothesis writes one small file (NIfTI, gzipped NIfTI, NIfTI pair or Analyze pair) per example with raw
header fields (bypassing nibabel's own checks), any data type, shape, NaN/inf pattern, affine, scaling and
qform/sform codes, then flips header bytes and truncates the file. Discovery of a local folder holding it must
either accept it, and then reading and resampling it to RAS gives finite voxels, or raise a
``brainvq.io.VolumeError`` whose message names the file. Any other exception fails the test. Seeded
(derandomize) and bounded, so it runs the same examples everywhere, in well under a minute.
"""

from __future__ import annotations

import gzip
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_io import RELAXED_QC

from brainvq.config import deep_merge, validated_config
from brainvq.io import VolumeError, discover_scans, load_volume
from brainvq.preprocessing import reorient_to_ras, resample_isotropic
from brainvq.sources import get_source

DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "float32", "float64", "complex64"]
ANALYZE_DTYPES = ["uint8", "int16", "int32", "float32", "float64", "complex64"]  # what Analyze 7.5 can store
PATTERNS = ["head", "noise", "constant", "zeros", "saturated", "nan_one", "inf_one", "nan_all"]
SPECIAL = [0.0, -1.0, 1e-12, 1e30, float("nan"), float("inf"), -float("inf")]
HEADER_BYTES = 348
# Discovery is run with the default gate and with the gate relaxed (so small volumes get through and the
# reading and resampling of accepted volumes is exercised too), with and without an imposed orientation.
CONFIGS = {
    (relaxed, orientation): validated_config(deep_merge(
        {"qc": RELAXED_QC} if relaxed else {},
        {"dataset": {"source": "local", "analyze_orientation": orientation}, "preprocess": {"on_error": "fail"}},
    ))
    for relaxed in (False, True) for orientation in (None, "LAS", "PSR")
}
# nibabel logs each header field it repairs on load (pixdim 0 -> 1, unknown codes -> 0): thousands of lines here.
logging.getLogger("nibabel.global").setLevel(logging.ERROR)


@dataclass
class Spec:
    """One generated raw file: what goes into its header and voxels, and what is done to its bytes after."""

    kind: str
    dtype: str
    shape: tuple[int, ...]
    pattern: str
    affine: np.ndarray
    zooms: tuple[float, ...]
    sform_code: int
    qform_code: int
    quatern: tuple[float, ...]
    qfac: float
    scl: tuple[float, float]
    flips: list[tuple[int, int]] = field(default_factory=list)
    cut: float | None = None


def finite_or_special(low: float, high: float):
    return st.one_of(st.floats(low, high), st.sampled_from(SPECIAL))


@st.composite
def affines(draw) -> np.ndarray:
    """A voxel-to-world affine: scaled and rotated, zero, singular, or with a non-finite entry."""
    kind = draw(st.sampled_from(["scaled", "scaled", "rotated", "rotated", "zero", "singular", "nonfinite", "any"]))
    zooms = np.asarray(draw(st.lists(st.floats(0.3, 8.0), min_size=3, max_size=3)))
    affine = np.eye(4)
    affine[:3, :3] = np.diag(zooms * np.asarray(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))))
    if kind == "rotated":
        angles = draw(st.lists(st.floats(-np.pi, np.pi), min_size=3, max_size=3))
        for axis, angle in enumerate(angles):
            rotation = np.eye(3)
            i, j = [k for k in range(3) if k != axis]
            rotation[[i, i, j, j], [i, j, i, j]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
            affine[:3, :3] = rotation @ affine[:3, :3]
    elif kind == "zero":
        affine[:3, :3] = 0
    elif kind == "singular":
        affine[:3, 2] = affine[:3, 0] * draw(st.floats(-2, 2))
    elif kind == "nonfinite":
        affine[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = draw(st.sampled_from(SPECIAL[4:]))
    elif kind == "any":
        affine[:3, :] = np.reshape(draw(st.lists(finite_or_special(-20, 20), min_size=12, max_size=12)), (3, 4))
    affine[:3, 3] += draw(st.floats(-200, 200))
    return affine


@st.composite
def shapes(draw) -> tuple[int, ...]:
    """Mostly 3D shapes (sometimes with a trailing singleton axis), else any rank from 1 to 5."""
    if draw(st.integers(0, 9)) < 7:
        shape = tuple(draw(st.lists(st.integers(2, 12), min_size=3, max_size=3)))
        return shape + (1,) if draw(st.booleans()) and draw(st.booleans()) else shape
    ndim = draw(st.integers(1, 5))
    return tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))


def mostly(usual, *unusual):
    """A strategy giving ``usual`` three times in four, else one of ``unusual``."""
    return st.one_of(st.just(usual), st.just(usual), st.just(usual), st.sampled_from(unusual))


@st.composite
def specs(draw) -> Spec:
    kind = draw(st.sampled_from(["nii", "nii.gz", "pair", "analyze"]))
    zooms = draw(st.lists(st.floats(0.5, 8.0), min_size=3, max_size=3))
    return Spec(
        kind=kind,
        dtype=draw(st.sampled_from(ANALYZE_DTYPES if kind == "analyze" else DTYPES)),
        shape=draw(shapes()),
        pattern=draw(st.sampled_from(PATTERNS)),
        affine=draw(affines()),
        zooms=tuple(draw(mostly(zooms, *[[value] * 3 for value in SPECIAL], [1.0, 0.0, 1.0]))),
        sform_code=draw(mostly(1, 0, 2, 4, 255)),
        qform_code=draw(mostly(0, 1, 3, 255)),
        quatern=tuple(draw(mostly([0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.5, 0.0, 0.0], [float("nan")] * 3))),
        qfac=draw(mostly(1.0, -1.0, 0.0, 3.0, float("nan"))),
        scl=draw(mostly((1.0, 0.0), (0.0, 0.0), (2.5, 10.0), (-1.0, 0.0), (1e-30, 0.0), (1e30, 0.0),
                        (float("nan"), 0.0), (float("inf"), 0.0), (1.0, float("nan")), (1.0, -1e30))),
        flips=draw(mostly([], *[[(offset, value)] for offset in (0, 40, 42, 70, 72, 76, 80, 108, 112, 252, 254, 280, 344)
                                for value in (0, 7, 255)])),
        cut=draw(mostly(None, 0.0, 0.3, 0.6, 0.9, 0.999)),
    )


def voxels(spec: Spec) -> np.ndarray:
    """The voxels of ``spec``'s pattern in its data type."""
    rng = np.random.default_rng(len(spec.shape) * 1000 + sum(spec.shape))
    dtype = np.dtype(spec.dtype)
    top = float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1000.0
    grid = np.indices(spec.shape, dtype=float)
    centre = (np.asarray(spec.shape, float) - 1).reshape((-1,) + (1,) * len(spec.shape)) / 2
    inside = (((grid - centre) / np.maximum(centre, 1)) ** 2).sum(0) < 1
    noise = rng.uniform(0, min(top, 1000.0), spec.shape)
    data = {
        "head": np.where(inside, 0.6 * min(top, 1000.0) + 0.1 * noise, 0.02 * noise),
        "noise": noise, "constant": np.full(spec.shape, min(top, 700.0)), "zeros": np.zeros(spec.shape),
        "saturated": np.where(inside, top, noise),
    }.get(spec.pattern, noise)
    data = data.astype(dtype)
    if spec.pattern in ("nan_one", "inf_one", "nan_all") and dtype.kind in "fc":
        bad = np.nan if spec.pattern.startswith("nan") else np.inf
        if spec.pattern == "nan_all":
            data[...] = bad
        else:
            data.flat[rng.integers(data.size)] = bad
    return data


def header_of(spec: Spec, data: np.ndarray):
    """A raw header for ``spec``: fields written as they are, without nibabel's checks."""
    header = nib.AnalyzeHeader() if spec.kind == "analyze" else nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header["pixdim"][1:4] = spec.zooms
    if spec.kind != "analyze":
        header["magic"] = b"n+1" if spec.kind.startswith("nii") else b"ni1"
        header["vox_offset"] = 352 if spec.kind.startswith("nii") else 0
        header["sform_code"], header["qform_code"] = spec.sform_code, spec.qform_code
        for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
            header[name] = spec.affine[row]
        header["quatern_b"], header["quatern_c"], header["quatern_d"] = spec.quatern
        header["qoffset_x"], header["qoffset_y"], header["qoffset_z"] = spec.affine[:3, 3]
        header["pixdim"][0] = spec.qfac
        header["scl_slope"], header["scl_inter"] = spec.scl
    return header


def write_spec(spec: Spec, folder: Path) -> Path:
    """Write ``spec`` into ``folder`` as ``sub01.<ext>``; return the path discovery should name."""
    data = voxels(spec)
    block = bytearray(header_of(spec, data).binaryblock)
    for offset, value in spec.flips:
        block[offset] = value
    payload = data.tobytes(order="F")
    if spec.kind.startswith("nii"):
        path = folder / f"sub01.{spec.kind}"
        blob = bytes(block) + b"\0" * 4 + payload
        blob = gzip.compress(blob, mtime=0) if spec.kind == "nii.gz" else blob
        if spec.cut is not None:
            blob = blob[: int(len(blob) * spec.cut)]
        path.write_bytes(blob)
        return path
    path = folder / "sub01.hdr"
    header, image = bytes(block), payload
    if spec.cut is not None:  # cut the header or the image, whichever the fraction falls in
        total = len(header) + len(image)
        at = int(total * spec.cut)
        header, image = (header[:at], b"") if at < len(header) else (header, image[: at - len(header)])
    path.write_bytes(header)
    path.with_suffix(".img").write_bytes(image)
    return path


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs(), relaxed=st.sampled_from([True, True, False]), orientation=st.sampled_from([None, "LAS", "PSR"]))
def test_discovery_accepts_a_finite_ras_volume_or_refuses_it_naming_the_file(spec, relaxed, orientation):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel and numpy warn about much of what is generated here
        folder = Path(tmp)
        path = write_spec(spec, folder)
        try:
            scans = discover_scans(get_source("local"), folder, CONFIGS[relaxed, orientation])
        except VolumeError as error:
            event(f"refused: {type(error).__name__}")
            assert str(folder / "sub01") in str(error), f"{type(error).__name__} does not name the file: {error}"
            return
        event("accepted")
        assert scans["path"].tolist() == [str(path)]
        img = reorient_to_ras(load_volume(path, scans.loc[0, "orientation"] or None))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and np.isfinite(img.affine).all()
        assert img.ndim == 3 and np.isfinite(img.get_fdata()).all()
        resampled = resample_isotropic(img, 4.0)
        assert np.isfinite(resampled.get_fdata()).all()


@pytest.mark.parametrize("kind", ["nii", "nii.gz", "pair", "analyze"])
def test_the_fuzzer_writes_files_nibabel_reads_back(tmp_path, kind):
    # The generator's raw headers are real files: an unremarkable spec reads back exactly.
    spec = Spec(kind=kind, dtype="int16", shape=(6, 7, 5), pattern="noise", affine=np.diag([2.0, 2.0, 2.0, 1.0]),
                zooms=(2.0, 2.0, 2.0), sform_code=1, qform_code=0, quatern=(0.0, 0.0, 0.0), qfac=1.0, scl=(0.0, 0.0))
    img = nib.load(write_spec(spec, tmp_path))
    assert np.array_equal(np.asarray(img.dataobj), voxels(spec))
    if kind != "analyze":
        assert np.allclose(img.affine, spec.affine)
