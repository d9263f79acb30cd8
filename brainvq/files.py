"""Atomic file writing: every output is written under a hidden temporary sibling, then renamed into place.

A killed job therefore never leaves a complete-looking half file. The temporary name carries the writer's
process id (``.<name>.tmp-<pid><suffix>``); the next write of the same path removes temporaries whose process
is gone, so a kill leaves nothing behind for long (issue: hidden ``.tmp-`` files piling up after kills).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

_TMP_PID = re.compile(r"\.tmp-(\d+)")


def temporary_sibling(path: str | Path, suffix: str = "") -> Path:
    """Return the hidden temporary path next to ``path`` for this process (``suffix`` keeps an extension)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that no longer run; return what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    prefix = f".{path.name}.tmp-"
    for sibling in path.parent.iterdir():
        if not sibling.name.startswith(prefix):
            continue
        match = _TMP_PID.match(sibling.name[len(path.name) + 1:])
        if match and not _process_alive(int(match.group(1))):
            _remove(sibling)
            removed.append(sibling)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; rename it into place when the body succeeds.

    Args:
        path: the final file (or folder) path; its parent folder is created.
        suffix: extension the temporary name must end with (writers that choose a format by it, e.g. ``.nii.gz``).

    On an exception the temporary is removed and ``path`` is left as it was. A folder written to the
    temporary path replaces an existing folder at ``path`` only once complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path, suffix)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            replace_directory(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def scratch_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder next to ``path`` for this process's scratch work; remove it afterwards.

    It is named like ``atomic_path``'s temporaries (``.<name>.tmp-<pid>``), so one left by a killed
    process is removed when the next scratch folder or atomic write of ``path`` starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        _remove(tmp)


def replace_directory(tmp: Path, target: Path) -> None:
    """Move the complete folder ``tmp`` to ``target``, removing an existing ``target`` only then."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _remove(old)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_table_atomic(table, path: str | Path, sep: str = ",") -> Path:
    """Write a DataFrame as CSV (or TSV with ``sep="\\t"``), without its index, atomically; return ``path``."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep=sep, index=False)
    return Path(path)


def save_figure_atomic(fig, path: str | Path, **savefig) -> Path:
    """Save a matplotlib figure as PNG atomically; return ``path``."""
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", **savefig)
    return Path(path)
