"""Acquire the public datasets: resumable, verified downloads, a manifest, and safe extraction.

A downloadable source (``brainvq.sources``, kind 'download') plans a list of remote files (archives
and one demographics sheet), usually from its ``datasets.<name>`` section of the config (see
:func:`section_files`); ``download.*`` says how to get them (mirror, local copies, retries). Every
file that lands in ``resources/<dataset>/downloads/`` is recorded with its SHA-256 in
``resources/<dataset>/MANIFEST.tsv``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import gzip
import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from brainvq.files import atomic_path, scratch_folder, write_text_atomic

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("file", "bytes", "sha256", "md5", "url", "date")
CHUNK_BYTES = 1 << 20
MAX_BACKOFF_S = 120.0
# Marker folder inside an extraction target: one JSON per completed archive.
EXTRACTED_MARKERS = ".brainvq-extracted"


class AcquireError(RuntimeError):
    """Base class of the acquisition errors."""


class DownloadNotFoundError(AcquireError):
    """The server answered 404/410: the URL is wrong or the file moved."""


class DownloadHTTPError(AcquireError):
    """The server refused the request with a client error other than 404 (e.g. 401/403)."""


class DownloadConnectionError(AcquireError):
    """The file could not be fetched after every retry (server down, connection cut, 5xx)."""


class ChecksumMismatchError(AcquireError):
    """A file's MD5 or SHA-256 differs from the expected value; the file was quarantined."""


class UnsafeArchiveError(AcquireError):
    """An archive member would land outside the target or is a link/device file; nothing is extracted."""


class ArchiveCorruptError(AcquireError):
    """An archive is truncated or not a valid tar/tar.gz."""


class TermsNotAcceptedError(AcquireError):
    """A dataset's data use agreement has not been accepted in the config."""


# ------------------------------------------------------------------------------------ remote files


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its local name, where to fetch it, and its known checksums."""

    name: str
    url: str
    kind: str  # "archive" or "demographics"
    md5: str | None = None
    sha256: str | None = None


def _mirrored(url: str, base_url: str | None) -> str:
    if not base_url:
        return url
    return base_url.rstrip("/") + "/" + PurePosixPath(urllib.parse.urlparse(url).path).name


def section_files(section: dict, archive_urls: list[str], base_url: str | None) -> list[RemoteFile]:
    """Return the archives then the demographics sheet of a ``datasets.<name>`` config section.

    Args:
        section: the source's section: ``demographics_url``, ``demographics_file``, and the ``urls``,
            ``md5`` and ``sha256`` maps keyed by local file name.
        archive_urls: the default URLs of the archives; an archive's local name is its URL's file name.
        base_url: ``download.base_url`` (a mirror), or None.

    A URL is, in order of precedence: ``section["urls"][<file>]``, ``base_url`` with the default URL's
    file name appended, the default URL.
    """
    overrides, md5s, sha256s = section["urls"], section["md5"], section["sha256"]
    files = []
    for kind, name, url in [
        *(("archive", PurePosixPath(urllib.parse.urlparse(u).path).name, u) for u in archive_urls),
        ("demographics", section["demographics_file"], section["demographics_url"]),
    ]:
        files.append(
            RemoteFile(
                name=name,
                url=overrides.get(name) or _mirrored(url, base_url),
                kind=kind,
                md5=md5s.get(name),
                sha256=sha256s.get(name),
            )
        )
    return files


def planned_file(source, name: str, config: dict) -> RemoteFile:
    """Return the RemoteFile called ``name`` in the ``download_plan`` of ``source`` (a brainvq.sources.Source)."""
    for remote in source.download_plan(config):
        if remote.name == name:
            return remote
    raise KeyError(f"{name!r} is not a file of dataset {source.name}")


# --------------------------------------------------------------------------------------- manifest


def file_digests(path: Path) -> tuple[str, str]:
    """Return (md5, sha256) hex digests of ``path``, read in chunks."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock next to ``path`` (parallel download jobs share one manifest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(path: str | Path) -> dict[str, dict[str, str]]:
    """Return the rows of a MANIFEST.tsv keyed by file name (empty when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    rows = {}
    lines = path.read_text().splitlines()
    for line in lines[1:]:
        values = line.split("\t")
        if len(values) == len(MANIFEST_COLUMNS):
            row = dict(zip(MANIFEST_COLUMNS, values))
            rows[row["file"]] = row
    return rows


def record_in_manifest(path: str | Path, file: Path, md5: str, sha256: str, url: str) -> None:
    """Add or replace the row of ``file`` in the manifest at ``path`` (atomic, lock-protected)."""
    path = Path(path)
    with _locked(path):
        rows = read_manifest(path)
        rows[file.name] = {
            "file": file.name,
            "bytes": str(file.stat().st_size),
            "sha256": sha256,
            "md5": md5,
            "url": url,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        text = "\t".join(MANIFEST_COLUMNS) + "\n"
        text += "".join("\t".join(rows[k][c] for c in MANIFEST_COLUMNS) + "\n" for k in sorted(rows))
        write_text_atomic(path, text)


# -------------------------------------------------------------------------------------- download


def _quarantine(path: Path, name: str, actual_md5: str) -> Path:
    bad = path.with_name(f"{name}.bad-md5-{actual_md5}")
    os.replace(path, bad)
    return bad


def _verify_or_quarantine(path: Path, name: str, url: str, md5: str | None, sha256: str | None) -> tuple[str, str]:
    """Return the digests of ``path``; on a mismatch move it aside and raise ChecksumMismatchError."""
    actual_md5, actual_sha256 = file_digests(path)
    problems = []
    if md5 and actual_md5 != md5.lower():
        problems.append(f"MD5 {actual_md5} (expected {md5})")
    if sha256 and actual_sha256 != sha256.lower():
        problems.append(f"SHA-256 {actual_sha256} (expected {sha256})")
    if problems:
        bad = _quarantine(path, name, actual_md5)
        raise ChecksumMismatchError(
            f"{name} from {url} has {' and '.join(problems)}; it was moved to {bad} and will not be used. "
            "Re-run to download it again; if the publisher changed the file on purpose, update the "
            "checksum in datasets.<dataset>.md5/sha256 of your config."
        )
    return actual_md5, actual_sha256


def _already_verified(dest: Path, manifest: Path | None, md5: str | None, sha256: str | None) -> bool:
    """True when ``dest`` is recorded in the manifest with its size and the expected checksums."""
    if manifest is None or not dest.exists():
        return False
    row = read_manifest(manifest).get(dest.name)
    if row is None or row["bytes"] != str(dest.stat().st_size):
        return False
    return (not md5 or row["md5"] == md5.lower()) and (not sha256 or row["sha256"] == sha256.lower())


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/1000" or "bytes */1000"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _start_from_content_range(value: str | None) -> int | None:
    if not value or not value.startswith("bytes ") or "-" not in value:
        return None
    start = value[len("bytes ") :].split("-", 1)[0].strip()
    return int(start) if start.isdigit() else None


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""


def _fetch_once(url: str, part: Path, timeout_s: float, progress: bool, name: str) -> bool:
    """One HTTP attempt appending to ``part``; return True when the file is complete.

    Raises _Retry for retryable failures, DownloadNotFoundError / DownloadHTTPError for final ones.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "brainvq-acquire/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code in (404, 410):
            raise DownloadNotFoundError(
                f"{url} answered HTTP {error.code} (not found). Check the URL in datasets.<dataset>.urls / "
                "download.base_url, or put the file into download.local_archive_dir."
            ) from None
        if error.code == 416 and offset:
            total = _total_from_content_range(error.headers.get("Content-Range"))
            if total == offset:
                return True
            log.warning("%s: server refused to resume at byte %d; starting again from 0", name, offset)
            part.unlink()
            raise _Retry(f"HTTP 416 for range {offset}-") from None
        if error.code in (408, 429) or error.code >= 500:
            raise _Retry(f"HTTP {error.code}") from None
        raise DownloadHTTPError(
            f"{url} answered HTTP {error.code} ({error.reason}). If the host needs a login or moved the "
            "file, download it yourself into download.local_archive_dir."
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Retry(f"{type(error).__name__}: {error}") from None

    with response:
        status = response.status
        if status == 206:
            start = _start_from_content_range(response.headers.get("Content-Range"))
            if start != offset:
                log.warning("%s: server resumed at byte %s instead of %d; starting again", name, start, offset)
                part.unlink(missing_ok=True)
                raise _Retry("Content-Range does not match the request")
            total = _total_from_content_range(response.headers.get("Content-Range"))
            mode = "ab"
        else:
            if offset:
                log.info("%s: server ignored the Range request; downloading from byte 0", name)
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        received = offset
        try:
            with (
                open(part, mode) as handle,
                tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=name, disable=not progress, mininterval=1.0,
                ) as bar,
            ):
                while chunk := response.read(CHUNK_BYTES):
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as error:
            raise _Retry(f"connection lost at byte {received}: {type(error).__name__}: {error}") from None
    if total is not None and received < total:
        raise _Retry(f"connection closed at byte {received} of {total}")
    return True


def download_file(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    *,
    sha256: str | None = None,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    progress: bool = True,
    manifest: str | Path | None = None,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    Bytes go to ``<dest>.part`` first; an interrupted transfer resumes from it with an HTTP Range
    request (or restarts from 0 where the server ignores Range). Connection errors, timeouts and 5xx
    answers are retried ``retries`` times with exponential backoff (``backoff_s``, doubling); an
    attempt that made progress does not use up a retry. 404 fails at once. A known ``md5``/``sha256``
    is verified: a mismatch moves the file to ``<dest>.bad-md5-<actual>`` and raises. Only a complete,
    verified file is renamed to ``dest``. With ``manifest`` (a MANIFEST.tsv) the file is recorded
    there, and a ``dest`` already recorded with matching size and checksums is not fetched again.

    Raises:
        DownloadNotFoundError, DownloadHTTPError, DownloadConnectionError, ChecksumMismatchError.
    """
    dest = Path(dest)
    manifest = Path(manifest) if manifest else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _already_verified(dest, manifest, md5, sha256):
        log.info("%s: already downloaded and verified, skipping", dest)
        return dest
    if dest.exists():
        # Present but not recorded (copied in by hand, or the manifest was lost): check it, never trust it blindly.
        actual_md5, actual_sha256 = _verify_or_quarantine(dest, dest.name, url, md5, sha256)
        if manifest:
            record_in_manifest(manifest, dest, actual_md5, actual_sha256, url)
        log.info("%s: present%s, recorded", dest, " and verified" if md5 or sha256 else "")
        return dest

    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _fetch_once(url, part, timeout_s, progress, dest.name):
                break
        except _Retry as reason:
            progressed = part.exists() and part.stat().st_size > before
            failures = 0 if progressed else failures + 1
            if failures > retries:
                raise DownloadConnectionError(
                    f"could not download {url} after {retries} retries ({reason}). The partial file "
                    f"{part} is kept and the next run resumes from it. Check your network, or set "
                    "download.base_url to a mirror, or put the file into download.local_archive_dir."
                ) from None
            wait_s = 0.0 if progressed else min(backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)
            log.warning("%s: %s; retrying in %.1f s", dest.name, reason, wait_s)
            time.sleep(wait_s)
    if not part.exists():  # an empty body never opened the file
        part.touch()
    actual_md5, actual_sha256 = _verify_or_quarantine(part, dest.name, url, md5, sha256)
    os.replace(part, dest)
    if manifest:
        record_in_manifest(manifest, dest, actual_md5, actual_sha256, url)
    log.info("%s: downloaded (%d bytes, sha256 %s)", dest, dest.stat().st_size, actual_sha256)
    return dest


def copy_local_file(
    source: str | Path,
    dest: str | Path,
    md5: str | None = None,
    *,
    sha256: str | None = None,
    manifest: str | Path | None = None,
) -> Path:
    """Hard-link (or copy, across file systems) a file the user already has to ``dest``, verified.

    The user's file is never moved or changed; a copy that fails verification is quarantined.
    """
    source, dest = Path(source), Path(dest)
    manifest = Path(manifest) if manifest else None
    if _already_verified(dest, manifest, md5, sha256):
        return dest
    with atomic_path(dest) as tmp:
        _link_or_copy_to(source, tmp)
        actual_md5, actual_sha256 = _verify_or_quarantine(tmp, dest.name, source.as_uri(), md5, sha256)
    if manifest:
        record_in_manifest(manifest, dest, actual_md5, actual_sha256, source.resolve().as_uri())
    log.info("%s: taken from %s (sha256 %s)", dest, source, actual_sha256)
    return dest


def _local_candidate(remote: RemoteFile, local_dir: str | None) -> Path | None:
    if not local_dir:
        return None
    url_name = PurePosixPath(urllib.parse.urlparse(remote.url).path).name
    for name in dict.fromkeys([remote.name, url_name]):
        candidate = Path(local_dir) / name
        if candidate.is_file():
            return candidate
    return None


def dataset_dir(dataset: str, resources_dir: str | Path) -> Path:
    """Return ``<resources_dir>/<dataset>``."""
    return Path(resources_dir) / dataset


def _link_or_copy_to(source: Path, tmp: Path) -> None:
    """Hard-link ``source`` at ``tmp``, or copy it there across file systems."""
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)


def _link_or_copy(source: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        _link_or_copy_to(source, tmp)


def acquire_file(source, name: str, config: dict, *, progress: bool = True) -> Path:
    """Put file ``name`` of ``source`` into ``<resources_dir>/<dataset>/downloads/`` and return its path.

    ``source`` is the dataset's ``brainvq.sources.Source``; ``name`` one file of its ``download_plan``.

    Uses ``download.local_archive_dir`` when the file is there, else downloads it; records it in
    ``<resources_dir>/<dataset>/MANIFEST.tsv``. A verified file is also hard-linked into
    ``<resources_dir>/<dataset>/verified/`` (no extra space): when Snakemake deletes the download to
    re-run the rule (its script changed, say), the file comes back from there instead of the network.
    """
    remote = planned_file(source, name, config)
    root = dataset_dir(source.name, config["resources_dir"])
    dest, manifest, kept = root / "downloads" / name, root / "MANIFEST.tsv", root / "verified" / name
    if not dest.exists() and _already_verified(kept, manifest, remote.md5, remote.sha256):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(kept, dest)
        log.info("%s: restored from %s (verified earlier), not downloaded again", dest, kept)
        return dest
    settings = config["download"]
    local = _local_candidate(remote, settings["local_archive_dir"])
    if local is not None:
        log.info("%s: using the local copy %s", name, local)
        copy_local_file(local, dest, remote.md5, sha256=remote.sha256, manifest=manifest)
    else:
        if settings["local_archive_dir"]:
            log.info("%s: not in %s, downloading from %s", name, settings["local_archive_dir"], remote.url)
        download_file(
            remote.url,
            dest,
            remote.md5,
            sha256=remote.sha256,
            retries=settings["retries"],
            backoff_s=settings["backoff_s"],
            timeout_s=settings["timeout_s"],
            progress=progress,
            manifest=manifest,
        )
    kept.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # a file system without hard links: no safety copy, no extra space
        kept.unlink(missing_ok=True)
        os.link(dest, kept)
    return dest


# --------------------------------------------------------------------------------------- extract


def _strict_data_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo:
    # The 'data' filter silently strips a leading '/'; an archive that carries one is refused instead.
    parts = PurePosixPath(member.name).parts
    if member.name.startswith("/") or ".." in parts:
        raise UnsafeArchiveError(f"member {member.name!r} has an absolute path or '..'")
    return tarfile.data_filter(member, dest_path)


def _merge_move(source: Path, dest: Path) -> None:
    """Move ``source`` to ``dest``, merging folders that already exist there."""
    if dest.is_dir() and source.is_dir() and not dest.is_symlink():
        for child in source.iterdir():
            _merge_move(child, dest / child.name)
        source.rmdir()
    else:
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(source, dest)


def _marker_path(archive: Path, target: Path) -> Path:
    return target / EXTRACTED_MARKERS / f"{archive.name}.json"


def safe_extract(archive: str | Path, target: str | Path) -> list[Path]:
    """Extract a tar / tar.gz ``archive`` into ``target`` and return the extracted file paths.

    Members with absolute paths or ``..``, links leaving the target, and device files are refused
    (Python's tarfile ``data`` filter plus a stricter path check); nothing of such an archive reaches
    ``target``. The archive is unpacked into a temporary folder beside ``target`` and moved in when
    complete, then a marker ``<target>/.brainvq-extracted/<archive>.json`` is written: calling again
    with the same archive (same size) does nothing and returns the same paths.

    Raises:
        UnsafeArchiveError: naming the member.
        ArchiveCorruptError: truncated or unreadable archive, naming it.
    """
    archive, target = Path(archive), Path(target)
    marker = _marker_path(archive, target)
    size = archive.stat().st_size
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("bytes") == size:
            log.info("%s: already extracted into %s", archive.name, target)
            return [target / member for member in record["files"]]
    # Named like atomic_path's temporaries: what a killed extraction leaves is removed by the next one.
    with scratch_folder(target.parent / f"{target.name}-{archive.name}") as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter=_strict_data_filter)
        except UnsafeArchiveError as error:
            raise UnsafeArchiveError(
                f"refusing to extract {archive}: {error}. The archive is unsafe; delete it."
            ) from None
        except tarfile.FilterError as error:
            raise UnsafeArchiveError(
                f"refusing to extract {archive}: member {error.tarinfo.name!r}: {error}. "
                "The archive is unsafe; delete it."
            ) from None
        except (EOFError, zlib.error, gzip.BadGzipFile, tarfile.ReadError) as error:
            raise ArchiveCorruptError(
                f"{archive} is truncated or corrupt ({type(error).__name__}: {error}). Delete it (and its line "
                f"in MANIFEST.tsv) and re-run to download it again."
            ) from None
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        target.mkdir(parents=True, exist_ok=True)
        for child in sorted(tmp.iterdir()):
            _merge_move(child, target / child.name)
    write_text_atomic(marker, json.dumps({"archive": archive.name, "bytes": size, "files": files}, indent=0))
    log.info("%s: extracted %d files into %s", archive.name, len(files), target)
    return [target / member for member in files]


def _atomic_copy(source: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)


def extract_dataset(archives: list[str | Path], demographics: str | Path, target: str | Path) -> list[Path]:
    """Extract every archive into ``target`` (see :func:`safe_extract`) and copy ``demographics`` alongside.

    Returns the extracted files and the copied demographics path.
    """
    target = Path(target)
    extracted = []
    for archive in archives:
        extracted += safe_extract(archive, target)
    target.mkdir(parents=True, exist_ok=True)
    copied = target / Path(demographics).name
    _atomic_copy(Path(demographics), copied)
    return extracted + [copied]
