"""Acquisition: resumable verified downloads from a loopback HTTP server, safe extraction, terms,
and the real workflow from download to RAS volumes on fixture archives in each dataset's layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from brainvq import acquire
from brainvq.acquire import (
    ArchiveCorruptError,
    ChecksumMismatchError,
    DownloadConnectionError,
    DownloadNotFoundError,
    TermsNotAcceptedError,
    UnsafeArchiveError,
)
from brainvq.config import load_config
from brainvq.sources import get_source
from test_io import RELAXED_QC

REPO = Path(__file__).resolve().parents[1]
FAST = dict(retries=2, backoff_s=0.01, timeout_s=5, progress=False)


# ------------------------------------------------------------------------------ loopback server


class FixtureServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``files`` under /mirror/<name>, with switchable faults.

    ``cut_once``: names whose next response is cut after half the body; ``missing``: names answered
    404; ``errors_left``: name -> number of 500 answers before serving; ``ignore_range``: answer 200
    with the whole body even when a Range is asked. ``requests`` records (name, Range header, status).
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        self.missing: set[str] = set()
        self.errors_left: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output quiet
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                wanted = self.headers.get("Range")
                if name in server.missing or name not in server.files:
                    return self._status(name, wanted, 404)
                if server.errors_left.get(name, 0) > 0:
                    server.errors_left[name] -= 1
                    return self._status(name, wanted, 500)
                body, start = server.files[name], 0
                if wanted and not server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                status = 206 if start else 200
                server.requests.append((name, wanted, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def _status(self, name, wanted, code):
                server.requests.append((name, wanted, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FixtureServer()
    yield srv
    srv.close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mirror/IXI-T1.tar"


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ------------------------------------------------------------------------------------- downloads


def test_download_resumes_with_range_after_the_server_cuts_the_connection(server, tmp_path):
    payload = os.urandom(300_000)
    server.files["IXI-T1.tar"] = payload
    server.cut_once.add("IXI-T1.tar")
    dest = acquire.download_file(server.url("IXI-T1.tar"), tmp_path / "IXI-T1.tar", md5_of(payload), **FAST)
    assert dest.read_bytes() == payload
    ranges = [wanted for name, wanted, status in server.requests if status == 206]
    assert ranges == [f"bytes={len(payload) // 2}-"], server.requests
    assert not (tmp_path / "IXI-T1.tar.part").exists()


def test_download_restarts_from_zero_when_the_server_ignores_range(server, tmp_path):
    payload = os.urandom(200_000)
    server.files["IXI-T1.tar"] = payload
    server.cut_once.add("IXI-T1.tar")
    server.ignore_range = True
    dest = acquire.download_file(server.url("IXI-T1.tar"), tmp_path / "IXI-T1.tar", md5_of(payload), **FAST)
    assert dest.read_bytes() == payload
    assert [(wanted is not None, status) for _, wanted, status in server.requests] == [(False, 200), (True, 200)]


def test_download_retries_a_server_error_then_succeeds(server, tmp_path):
    server.files["IXI.xls"] = b"sheet" * 100
    server.errors_left["IXI.xls"] = 2
    dest = acquire.download_file(server.url("IXI.xls"), tmp_path / "IXI.xls", **FAST)
    assert dest.read_bytes() == b"sheet" * 100
    assert [status for _, _, status in server.requests] == [500, 500, 200]


def test_download_gives_up_after_retries_on_persistent_server_errors(server, tmp_path):
    server.files["IXI.xls"] = b"x"
    server.errors_left["IXI.xls"] = 100
    with pytest.raises(DownloadConnectionError, match="IXI.xls"):
        acquire.download_file(server.url("IXI.xls"), tmp_path / "IXI.xls", **FAST)
    assert len(server.requests) == FAST["retries"] + 1
    assert not (tmp_path / "IXI.xls").exists()


def test_404_fails_at_once_with_an_error_naming_the_url(server, tmp_path):
    url = server.url("IXI-T1.tar")
    with pytest.raises(DownloadNotFoundError, match=url.replace(".", r"\.")):
        acquire.download_file(url, tmp_path / "IXI-T1.tar", **FAST)
    assert len(server.requests) == 1
    assert not (tmp_path / "IXI-T1.tar").exists()


def test_server_down_gives_a_connection_error_naming_the_url(tmp_path):
    url = closed_port_url()
    with pytest.raises(DownloadConnectionError, match=r"127\.0\.0\.1.*IXI-T1\.tar.*local_archive_dir"):
        acquire.download_file(url, tmp_path / "IXI-T1.tar", **FAST)
    assert not (tmp_path / "IXI-T1.tar").exists()


def test_md5_mismatch_quarantines_the_file_and_never_reuses_it(server, tmp_path):
    payload = b"not the real archive" * 50
    server.files["IXI-T1.tar"] = payload
    manifest = tmp_path / "MANIFEST.tsv"
    dest = tmp_path / "IXI-T1.tar"
    with pytest.raises(ChecksumMismatchError, match="IXI-T1.tar") as error:
        acquire.download_file(server.url("IXI-T1.tar"), dest, "0" * 32, manifest=manifest, **FAST)
    assert "md5" in str(error.value).lower()
    assert not dest.exists()
    assert (tmp_path / f"IXI-T1.tar.bad-md5-{md5_of(payload)}").read_bytes() == payload
    assert "IXI-T1.tar" not in acquire.read_manifest(manifest)
    # A second run downloads again (and fails again) rather than accepting the quarantined file.
    with pytest.raises(ChecksumMismatchError):
        acquire.download_file(server.url("IXI-T1.tar"), dest, "0" * 32, manifest=manifest, **FAST)
    assert len(server.requests) == 2


def test_verified_file_is_recorded_and_not_downloaded_again(server, tmp_path):
    payload = os.urandom(5000)
    server.files["IXI-T1.tar"] = payload
    manifest = tmp_path / "MANIFEST.tsv"
    for _ in range(2):
        acquire.download_file(
            server.url("IXI-T1.tar"), tmp_path / "IXI-T1.tar", md5_of(payload), manifest=manifest, **FAST
        )
    assert len(server.requests) == 1
    row = acquire.read_manifest(manifest)["IXI-T1.tar"]
    assert row["sha256"] == hashlib.sha256(payload).hexdigest()
    assert row["md5"] == md5_of(payload) and row["bytes"] == str(len(payload))
    assert row["url"] == server.url("IXI-T1.tar") and row["date"]
    assert manifest.read_text().splitlines()[0].split("\t") == list(acquire.MANIFEST_COLUMNS)


def test_unrecorded_file_with_a_wrong_md5_is_quarantined_and_fetched_again(server, tmp_path):
    payload = os.urandom(4000)
    server.files["IXI-T1.tar"] = payload
    dest = tmp_path / "IXI-T1.tar"
    dest.write_bytes(b"stale")
    with pytest.raises(ChecksumMismatchError):
        acquire.download_file(server.url("IXI-T1.tar"), dest, md5_of(payload), **FAST)
    assert not dest.exists() and len(server.requests) == 0
    acquire.download_file(server.url("IXI-T1.tar"), dest, md5_of(payload), **FAST)
    assert dest.read_bytes() == payload


# ----------------------------------------------------------------------- dataset-level acquisition


def dataset_config(tmp_path: Path, source: str, **download) -> dict:
    overrides = {
        "resources_dir": str(tmp_path / "resources"),
        "dataset": {"source": source},
        "download": {"retries": 1, "backoff_s": 0.01, "timeout_s": 5, "progress": False, **download},
    }
    return load_config(REPO / "config" / "config.yaml", overrides)


def test_dataset_files_use_base_url_with_each_file_name_and_per_file_overrides_win(tmp_path):
    config = dataset_config(tmp_path, "oasis1", base_url="http://mirror.test/data/")
    config["datasets"]["oasis1"]["discs"] = [1, 3]
    config["datasets"]["oasis1"]["urls"] = {"oasis_cross-sectional_disc3.tar.gz": "http://other.test/d3.tgz"}
    files = {f.name: f for f in get_source("oasis1").download_plan(config)}
    assert list(files) == [
        "oasis_cross-sectional_disc1.tar.gz", "oasis_cross-sectional_disc3.tar.gz", "oasis_cross-sectional.xlsx"
    ]
    disc1 = files["oasis_cross-sectional_disc1.tar.gz"]
    assert disc1.url == "http://mirror.test/data/oasis_cross-sectional_disc1.tar.gz"
    assert files["oasis_cross-sectional_disc1.tar.gz"].md5 == "c83e216ef8654a7cc9e2a30a4cdbe0cc"
    assert files["oasis_cross-sectional_disc3.tar.gz"].url == "http://other.test/d3.tgz"
    # The sheet keeps the file name of its default URL on the mirror, and its local name in downloads/.
    assert files["oasis_cross-sectional.xlsx"].url.startswith("http://mirror.test/data/oasis_cross-sectional-")
    assert files["oasis_cross-sectional.xlsx"].kind == "demographics"


def test_local_archive_dir_is_used_without_network_and_still_verified(tmp_path):
    local = tmp_path / "mine"
    local.mkdir()
    payload = os.urandom(3000)
    (local / "IXI-T1.tar").write_bytes(payload)
    config = dataset_config(tmp_path, "ixi", base_url=closed_port_url().rsplit("/", 1)[0], local_archive_dir=str(local))
    config["datasets"]["ixi"]["md5"] = {"IXI-T1.tar": md5_of(payload)}
    path = acquire.acquire_file(get_source("ixi"), "IXI-T1.tar", config, progress=False)
    assert path == tmp_path / "resources/ixi/downloads/IXI-T1.tar"
    assert path.read_bytes() == payload
    assert acquire.read_manifest(tmp_path / "resources/ixi/MANIFEST.tsv")["IXI-T1.tar"]["url"].startswith("file://")
    # A wrong local copy is refused; the user's own file is left as it was.
    path.unlink()
    (tmp_path / "resources/ixi/verified/IXI-T1.tar").unlink()
    (tmp_path / "resources/ixi/MANIFEST.tsv").unlink()
    config["datasets"]["ixi"]["md5"] = {"IXI-T1.tar": "f" * 32}
    with pytest.raises(ChecksumMismatchError, match="IXI-T1.tar"):
        acquire.acquire_file(get_source("ixi"), "IXI-T1.tar", config, progress=False)
    assert (local / "IXI-T1.tar").read_bytes() == payload and not path.exists()


def test_deleted_download_comes_back_from_the_verified_store_without_a_request(server, tmp_path):
    payload = os.urandom(2000)
    server.files["IXI-T1.tar"] = payload
    config = dataset_config(tmp_path, "ixi", base_url=server.base_url)
    config["datasets"]["ixi"]["md5"] = {"IXI-T1.tar": md5_of(payload)}
    path = acquire.acquire_file(get_source("ixi"), "IXI-T1.tar", config, progress=False)
    path.unlink()  # what Snakemake does before re-running the rule
    assert acquire.acquire_file(get_source("ixi"), "IXI-T1.tar", config, progress=False).read_bytes() == payload
    assert len(server.requests) == 1


# ------------------------------------------------------------------------------------ extraction


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_member(name: str, data: bytes = b"voxels") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "bad",
    [
        file_member("../escaped.txt"),
        file_member("disc1/../../escaped.txt"),
        file_member("/tmp/brainvq-absolute.txt"),
        link_member("disc1/link", "../../../etc"),
        link_member("disc1/abs", "/etc/passwd"),
        link_member("disc1/hard", "../../outside", tarfile.LNKTYPE),
        (lambda info: (setattr(info, "type", tarfile.CHRTYPE), (info, None))[1])(tarfile.TarInfo("disc1/dev")),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-escape", "symlink-absolute", "hardlink-escape", "device"],
)
def test_malicious_archive_is_refused_naming_the_member_and_nothing_lands(tmp_path, bad):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(tar_bytes([file_member("disc1/ok.txt"), bad]))
    target = tmp_path / "extracted"
    with pytest.raises(UnsafeArchiveError, match="evil.tar.gz") as error:
        acquire.safe_extract(archive, target)
    assert bad[0].name.lstrip("/") in str(error.value)
    assert not (target / "disc1" / "ok.txt").exists()
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/brainvq-absolute.txt").exists()
    assert not list(tmp_path.glob(".evil*"))  # no temporary folder left behind


def test_truncated_gzip_names_the_archive_and_says_to_download_again(tmp_path):
    data = tar_bytes([file_member(f"disc1/f{i}.img", os.urandom(20_000)) for i in range(3)])
    archive = tmp_path / "oasis_cross-sectional_disc1.tar.gz"
    archive.write_bytes(data[: len(data) // 2])
    target = tmp_path / "extracted"
    with pytest.raises(ArchiveCorruptError, match=r"oasis_cross-sectional_disc1\.tar\.gz.*(?i:delete)"):
        acquire.safe_extract(archive, target)
    assert not target.exists() or not any(target.iterdir())


def test_extraction_is_idempotent_and_merges_archives_into_one_target(tmp_path, monkeypatch):
    first = tmp_path / "OAS2_RAW_PART1.tar.gz"
    second = tmp_path / "OAS2_RAW_PART2.tar.gz"
    first.write_bytes(tar_bytes([file_member("OAS2_RAW_PART1/OAS2_0001_MR1/RAW/mpr-1.nifti.hdr", b"a")]))
    second.write_bytes(tar_bytes([file_member("OAS2_RAW_PART2/OAS2_0002_MR1/RAW/mpr-1.nifti.hdr", b"b")]))
    target = tmp_path / "extracted"
    paths = acquire.safe_extract(first, target) + acquire.safe_extract(second, target)
    assert sorted(p.relative_to(target).as_posix() for p in paths) == [
        "OAS2_RAW_PART1/OAS2_0001_MR1/RAW/mpr-1.nifti.hdr",
        "OAS2_RAW_PART2/OAS2_0002_MR1/RAW/mpr-1.nifti.hdr",
    ]

    def no_reopen(*args, **kwargs):
        raise AssertionError("the archive was opened again")

    monkeypatch.setattr(tarfile, "open", no_reopen)
    assert acquire.safe_extract(first, target) == paths[:1]
    assert (target / paths[0].relative_to(target)).read_bytes() == b"a"


# ------------------------------------------------------------------------------------------ terms


def test_oasis_requires_accepted_terms_and_ixi_does_not():
    config = {"datasets": {"oasis": {"accept_terms": False}}}
    for dataset in ("oasis1", "oasis2"):
        with pytest.raises(TermsNotAcceptedError, match="accept_terms: true") as error:
            get_source(dataset).require_terms(config)
        assert "Marcus" in str(error.value)
    get_source("ixi").require_terms(config)
    get_source("oasis1").require_terms({"datasets": {"oasis": {"accept_terms": True}}})
    assert "CC BY-SA 3.0" in get_source("ixi").terms
    assert "2007" in get_source("oasis1").terms and "2010" in get_source("oasis2").terms


def run_snakemake(workdir: Path, config: dict, *targets: str, dry_run: bool = False) -> subprocess.CompletedProcess:
    """Run the real workflow in ``workdir`` with ``config`` (a --configfile), on one core."""
    configfile = workdir / "test-config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    command = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--configfile", str(configfile), "--cores", "1", *(["-n"] if dry_run else []), *targets,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_workflow_refuses_oasis_at_parse_time_until_terms_are_accepted(tmp_path):
    result = run_snakemake(tmp_path, {"dataset": {"source": "oasis1"}}, dry_run=True)
    assert result.returncode != 0
    output = result.stdout + result.stderr  # snakemake prints parse errors on stdout
    assert "TermsNotAcceptedError" in output and "accept_terms: true" in output and "Marcus" in output


# ------------------------------------------------------------- fixture archives in real layouts


def analyze_pair_bytes(data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> tuple[bytes, bytes]:
    """(hdr, img) bytes of a 16-bit big-endian Analyze 7.5 image, as OASIS ships them."""
    header = nib.AnalyzeHeader(endianness=">")
    header.set_data_dtype(np.int16)
    header.set_data_shape(data.shape)
    header.set_zooms(zooms)
    image = nib.AnalyzeImage(data.astype(np.int16), None, header)
    hdr, img = io.BytesIO(), io.BytesIO()
    image.to_file_map({"header": nib.FileHolder(fileobj=hdr), "image": nib.FileHolder(fileobj=img)})
    assert hdr.getvalue()[:4] == (348).to_bytes(4, "big")  # big-endian sizeof_hdr
    return hdr.getvalue(), img.getvalue()


def nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(data.astype(np.int16), affine)
    raw = io.BytesIO()
    image.to_file_map({"image": nib.FileHolder(fileobj=raw), "header": nib.FileHolder(fileobj=raw)})
    return gzip.compress(raw.getvalue(), mtime=0)


SHAPE = (12, 14, 16)


def asl_marker_volume() -> np.ndarray:
    """A head-like block in voxel axes (A, S, L) with a bright marker near the right-anterior-superior corner."""
    data = np.full(SHAPE, 100, np.int16)
    # Axis 0 increases towards anterior, 1 towards superior, 2 towards the subject's left:
    # right-anterior-superior is high axis 0, high axis 1, low axis 2.
    data[-3:, -3:, :3] = 1000
    return data


def ixi_archive() -> tuple[bytes, list[str]]:
    names = ["IXI002-Guys-0828-T1.nii.gz", "IXI012-HH-1211-T1.nii.gz", "IXI035-IOP-0873-T1.nii.gz"]
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS voxels with a proper header orientation
    members = [
        file_member(name, nifti_gz_bytes(np.full(SHAPE, 50 + i, np.int16), affine)) for i, name in enumerate(names)
    ]
    return tar_bytes(members, gz=False), names


def ixi_sheet(path: Path) -> None:
    import xlwt

    book = xlwt.Workbook()
    sheet = book.add_sheet("Table")
    header = ["IXI_ID", "SEX_ID (1=m, 2=f)", "HEIGHT", "AGE"]
    rows = [[2, 2, 164, 35.8], [12, 1, 175, 38.8], [35, 2, 163, 37.0]]
    for c, value in enumerate(header):
        sheet.write(0, c, value)
    for r, row in enumerate(rows, start=1):
        for c, value in enumerate(row):
            sheet.write(r, c, value)
    book.save(str(path))


def oasis1_disc(disc: int, sessions: list[str]) -> bytes:
    members = []
    hdr, img = analyze_pair_bytes(asl_marker_volume(), zooms=(1.0, 1.0, 1.25))
    for session in sessions:
        top = f"disc{disc}/{session}"
        members += [file_member(f"{top}/{session}.txt", b"SESSION ID: " + session.encode())]
        for k in (1, 2):
            members += [file_member(f"{top}/RAW/{session}_mpr-{k}_anon.hdr", hdr),
                        file_member(f"{top}/RAW/{session}_mpr-{k}_anon.img", img)]
        for folder, stem in (("SUBJ_111", "mpr_n4_anon_sbj_111"), ("T88_111", "mpr_n4_anon_111_t88_masked_gfc")):
            members += [file_member(f"{top}/PROCESSED/MPRAGE/{folder}/{session}_{stem}.hdr", hdr),
                        file_member(f"{top}/PROCESSED/MPRAGE/{folder}/{session}_{stem}.img", img)]
    return tar_bytes(members)


def oasis1_sheet(path: Path) -> None:
    pd.DataFrame(
        {
            "ID": ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0042_MR1"],
            "M/F": ["F", "F", "M"], "Hand": ["R"] * 3, "Age": [74, 55, 73], "Educ": [2, 4, None],
            "SES": [3, 1, None], "MMSE": [29, 29, 27], "CDR": [0, 0, 0.5], "eTIV": [1344, 1147, 1454],
            "nWBV": [0.743, 0.81, 0.708], "ASF": [1.306, 1.531, 1.207], "Delay": [None] * 3,
        }
    ).to_excel(path, index=False)


def e2e_config(server: FixtureServer, source: str, md5s: dict, **datasets) -> dict:
    return {
        "run": "e2e",
        "dataset": {"source": source},
        "download": {"base_url": server.base_url, "retries": 2, "backoff_s": 0.05, "timeout_s": 10, "progress": False},
        "datasets": {source: {"md5": md5s, "sha256": {}, **datasets}, "oasis": {"accept_terms": True}},
        "preprocess": {"size": 16},
        "qc": RELAXED_QC,  # the archives hold small marker volumes: these tests are about fetching and orientation
    }


def ras_marker_position(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    return np.argwhere(data > 500).mean(axis=0) / (np.array(data.shape) - 1), nib.aff2axcodes(image.affine)


@pytest.mark.slow
def test_workflow_downloads_extracts_and_reorients_ixi_from_a_mirror(server, tmp_path):
    tar, names = ixi_archive()
    server.files["IXI-T1.tar"] = tar
    ixi_sheet(tmp_path / "sheet.xls")
    server.files["IXI.xls"] = (tmp_path / "sheet.xls").read_bytes()
    server.cut_once.add("IXI-T1.tar")  # the real workflow resumes too
    config = e2e_config(server, "ixi", {"IXI-T1.tar": md5_of(tar), "IXI.xls": md5_of(server.files["IXI.xls"])})
    targets = ["results/e2e/participants.tsv"] + [f"results/e2e/ras/{name[:6]}.nii.gz" for name in names]
    result = run_snakemake(tmp_path, config, *targets)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "CC BY-SA 3.0" in result.stdout + result.stderr
    assert any(status == 206 for _, _, status in server.requests)
    subjects = pd.read_csv(tmp_path / "results/e2e/subjects.tsv", sep="\t")
    assert sorted(subjects["scan"]) == ["IXI002", "IXI012", "IXI035"]
    participants = pd.read_csv(tmp_path / "results/e2e/participants.tsv", sep="\t")
    assert participants.set_index("subject").loc["IXI012", ["site", "sex", "age"]].tolist() == ["HH", "M", 38.8]
    for name in names:
        assert nib.aff2axcodes(nib.load(tmp_path / f"results/e2e/ras/{name[:6]}.nii.gz").affine) == ("R", "A", "S")
    manifest = acquire.read_manifest(tmp_path / "resources/ixi/MANIFEST.tsv")
    assert manifest["IXI-T1.tar"]["sha256"] == hashlib.sha256(tar).hexdigest()
    # Asking again downloads nothing and re-runs nothing.
    before = len(server.requests)
    again = run_snakemake(tmp_path, config, *targets, dry_run=True)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    assert len(server.requests) == before


@pytest.mark.slow
def test_workflow_puts_oasis1_big_endian_analyze_into_ras_with_the_marker_right_anterior_superior(server, tmp_path):
    discs = {1: ["OAS1_0001_MR1", "OAS1_0002_MR1"], 2: ["OAS1_0042_MR1"]}
    md5s = {}
    for disc, sessions in discs.items():
        name = f"oasis_cross-sectional_disc{disc}.tar.gz"
        server.files[name] = oasis1_disc(disc, sessions)
        md5s[name] = md5_of(server.files[name])
    oasis1_sheet(tmp_path / "sheet.xlsx")
    sheet_url = load_config(REPO / "config/config.yaml")["datasets"]["oasis1"]["demographics_url"]
    sheet_url_name = sheet_url.rsplit("/", 1)[1]
    server.files[sheet_url_name] = (tmp_path / "sheet.xlsx").read_bytes()
    config = e2e_config(server, "oasis1", md5s, discs=[1, 2], image="raw_mpr1")
    scans = [s for sessions in discs.values() for s in sessions]
    targets = ["results/e2e/participants.tsv"] + [f"results/e2e/ras/{scan}.nii.gz" for scan in scans]
    result = run_snakemake(tmp_path, config, *targets)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for scan in scans:
        position, axcodes = ras_marker_position(tmp_path / f"results/e2e/ras/{scan}.nii.gz")
        assert axcodes == ("R", "A", "S")
        # In RAS voxel order, right-anterior-superior is the high end of every axis.
        assert (position > 0.75).all(), (scan, position)
    participants = pd.read_csv(tmp_path / "results/e2e/participants.tsv", sep="\t")
    row = participants.set_index("subject").loc["OAS1_0042"]
    assert (row["session"], row["sex"], row["age"], row["cdr"]) == ("MR1", "M", 73, 0.5)
    assert (tmp_path / "resources/oasis1/extracted/disc2/OAS1_0042_MR1/RAW/OAS1_0042_MR1_mpr-1_anon.img").exists()


def nifti_pair_bytes_without_orientation(data: np.ndarray) -> tuple[bytes, bytes]:
    """(hdr, img) of a NIfTI-1 pair whose qform/sform codes are 0, like OASIS-2's mpr-#.nifti.hdr."""
    image = nib.Nifti1Pair(data.astype(np.int16), None)
    hdr, img = io.BytesIO(), io.BytesIO()
    image.to_file_map({"header": nib.FileHolder(fileobj=hdr), "image": nib.FileHolder(fileobj=img)})
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(hdr.getvalue()))
    assert header["sform_code"] == header["qform_code"] == 0
    return hdr.getvalue(), img.getvalue()


def test_oasis2_parts_are_fetched_extracted_and_discovered_with_their_visits(server, tmp_path):
    from brainvq.io import discover_scans

    hdr, img = nifti_pair_bytes_without_orientation(asl_marker_volume())
    parts = {1: ["OAS2_0001_MR1", "OAS2_0001_MR2"], 2: ["OAS2_0002_MR1"]}
    for part, sessions in parts.items():
        members = []
        for session in sessions:
            for k in (1, 2, 3):
                members += [file_member(f"OAS2_RAW_PART{part}/{session}/RAW/mpr-{k}.nifti.hdr", hdr),
                            file_member(f"OAS2_RAW_PART{part}/{session}/RAW/mpr-{k}.nifti.img", img)]
        server.files[f"OAS2_RAW_PART{part}.tar.gz"] = tar_bytes(members)
    sheet = pd.DataFrame(
        {"Subject ID": ["OAS2_0001", "OAS2_0001", "OAS2_0002"], "MRI ID": parts[1] + parts[2],
         "Group": ["Converted"] * 2 + ["Demented"], "Visit": [1, 2, 1], "MR Delay": [0, 457, 0],
         "M/F": ["F", "F", "M"], "Hand": ["R"] * 3, "Age": [87, 88, 75], "EDUC": [14, 14, 12], "SES": [2, 2, None],
         "MMSE": [27, 30, 23], "CDR": [0, 0.5, 0.5], "eTIV": [1987, 2004, 1678], "nWBV": [0.7, 0.68, 0.74],
         "ASF": [0.88, 0.87, 1.05]}
    )
    sheet.to_excel(tmp_path / "sheet.xlsx", index=False)
    config = dataset_config(tmp_path, "oasis2", base_url=server.base_url)
    config["datasets"]["oasis2"]["sha256"] = {}
    url_name = config["datasets"]["oasis2"]["demographics_url"].rsplit("/", 1)[1]
    server.files[url_name] = (tmp_path / "sheet.xlsx").read_bytes()

    oasis2 = get_source("oasis2")
    files = oasis2.download_plan(config)
    downloads = [acquire.acquire_file(oasis2, f.name, config, progress=False) for f in files]
    raw_root = tmp_path / "resources/oasis2/extracted"
    acquire.extract_dataset(downloads[:2], downloads[2], raw_root)
    config["qc"].update(RELAXED_QC)  # the marker volumes are far smaller than a head; this test is about the archives
    scans = discover_scans(oasis2, raw_root, config)
    assert scans["scan"].tolist() == ["OAS2_0001_MR1", "OAS2_0001_MR2", "OAS2_0002_MR1"]
    assert set(scans["orientation"]) == {config["datasets"]["oasis2"]["orientation"]}
    participants = oasis2.participants(raw_root, oasis2.discovery_settings(config), scans)
    assert participants[["session", "age", "group"]].values.tolist() == [
        ["MR1", 87, "Converted"], ["MR2", 88, "Converted"], ["MR1", 75, "Demented"]
    ]
    assert set(acquire.read_manifest(tmp_path / "resources/oasis2/MANIFEST.tsv")) == {f.name for f in files}
