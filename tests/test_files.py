"""Atomic writes: complete files or none, and temporaries of killed writers cleaned by the next write."""

import os
import subprocess
import sys

import pytest

from brainvq.files import atomic_path, remove_stale_temporaries, scratch_folder, temporary_sibling, write_text_atomic


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_folder_replaces_the_old_folder_only_when_complete(tmp_path):
    target = tmp_path / "codes"
    (target / "a").mkdir(parents=True)
    with atomic_path(target) as tmp:
        (tmp / "b").mkdir(parents=True)
        assert (target / "a").exists()
    assert [p.name for p in target.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes"]


def test_the_next_write_removes_temporaries_of_dead_writers_and_keeps_live_ones(tmp_path):
    target = tmp_path / "SUBJ001.nii.gz"
    dead = tmp_path / f".SUBJ001.nii.gz.tmp-{dead_pid()}.nii.gz"
    live = temporary_sibling(target, ".nii.gz").with_name(f".SUBJ001.nii.gz.tmp-{os.getppid()}.nii.gz")
    other = tmp_path / f".SUBJ0011.nii.gz.tmp-{dead_pid()}"
    for path in (dead, live, other):
        path.write_text("x")
    write_text_atomic(target, "volume")
    assert target.read_text() == "volume"
    assert not dead.exists()
    assert live.exists() and other.exists()  # a running writer's file, and another path's, are left alone
    assert remove_stale_temporaries(target) == []


def test_a_scratch_folder_is_removed_afterwards_and_a_dead_processs_one_by_the_next(tmp_path):
    target = tmp_path / "extracted-disc1.tar.gz"
    leftover = tmp_path / f".{target.name}.tmp-{dead_pid()}"
    (leftover / "half").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with scratch_folder(target) as tmp:
            assert tmp.is_dir() and not any(tmp.iterdir()) and not leftover.exists()
            (tmp / "member").write_text("x")
            raise RuntimeError("corrupt archive")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- every writer

# Calls that write a file: methods of any object, and functions by module (os.replace, not str.replace).
WRITE_METHODS = {"write_text", "write_bytes", "to_csv", "to_excel", "savefig"}
WRITE_FUNCTIONS = {"os": {"replace", "rename"}, "shutil": {"copyfile", "copy", "copy2", "move", "copytree"},
                   "tempfile": {"mkdtemp", "mkstemp"}, "json": {"dump"}, "nib": {"save"}, "torch": {"save"},
                   "np": {"save", "savez", "savez_compressed"}}
ATOMIC_CONTEXTS = {"atomic_path", "scratch_folder"}
# Writers that do not go through brainvq/files.py on purpose, each with its reason.
EXEMPT = {
    ("workflow.py", "logged"): "the rule's log file, which Snakemake owns",
    ("acquire.py", "_locked"): "a lock file",
    ("acquire.py", "_fetch_once"): "the .part download, kept on purpose so the next run resumes it",
    ("acquire.py", "download_file"): "renames the verified .part download into place",
    ("acquire.py", "_quarantine"): "moves a file that failed its checksum aside",
    ("acquire.py", "_merge_move"): "moves extracted members out of safe_extract's scratch folder",
    ("engine.py", "HistoryWriter.write"): "appends one row to a history the constructor wrote atomically",
    ("engine.py", "resumable_checkpoint"): "moves a stale checkpoint folder aside (a rename, never a half write)",
    ("engine.py", "_local_process"): "the rule's log file, which Snakemake owns (rank 0 of a multi-process run)",
    ("shards.py", "_write_shard"): "writes one shard inside write_shards' atomic shards folder",
    ("bundle.py", "untrained_bundle"): "model files in a TemporaryDirectory, copied by write_bundle's atomic folder",
    ("acquire.py", "_link_or_copy_to"): "fills the temporary its callers' atomic_path gives it",
    ("reporting.py", "figure_png"): "saves a figure into an in-memory buffer",
}


def unguarded_writes(path) -> list[tuple[str, int, str]]:
    """(function, line, call) of each file-writing call in ``path`` that no ``with atomic_path(...)`` or
    ``with scratch_folder(...)`` encloses."""
    import ast

    tree = ast.parse(path.read_text())
    found = []

    def is_write(call: ast.Call) -> str | None:
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        module = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if name in ("open", "File"):  # open(path, "w"), h5py.File(path, "w")
            modes = call.args[1:2] + [k.value for k in call.keywords if k.arg == "mode"]
            # A mode computed at run time counts as a write.
            written = [not isinstance(m, ast.Constant) or set(str(m.value)) & set("wax") for m in modes]
            return name if any(written) else None
        targets = call.args + [k.value for k in call.keywords if k.arg in ("path_or_buf", "excel_writer")]
        if name in ("to_csv", "to_excel") and not targets:
            return None  # no file given: the table comes back as a string
        if name in WRITE_METHODS or name in WRITE_FUNCTIONS.get(module, ()):
            return f"{module}.{name}" if module else name
        return None

    def visit(node, scope: str, guarded: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = f"{scope}.{node.name}" if scope else node.name
        if isinstance(node, ast.With):
            contexts = {item.context_expr.func.id for item in node.items if isinstance(item.context_expr, ast.Call)
                        and isinstance(item.context_expr.func, ast.Name)}
            guarded = guarded or bool(contexts & ATOMIC_CONTEXTS)
        if isinstance(node, ast.Call) and not guarded and (name := is_write(node)):
            found.append((scope, node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, guarded)

    visit(tree, "", False)
    return found


def test_every_writer_in_the_package_goes_through_brainvq_files():
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "brainvq"
    offenders, used = [], set()
    for path in sorted(package.rglob("*.py")):
        if path.name == "files.py":
            continue
        for scope, line, call in unguarded_writes(path):
            if (path.name, scope) in EXEMPT:
                used.add((path.name, scope))
            else:
                offenders.append(f"{path.relative_to(package.parent)}:{line} {scope}: {call}")
    assert not offenders, "writes outside brainvq/files.py (use atomic_path / write_*_atomic):\n" + "\n".join(offenders)
    assert used == set(EXEMPT), f"exemptions for writers that are gone: {sorted(set(EXEMPT) - used)}"


def test_the_writer_audit_finds_a_plain_write(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("def save(table, path):\n    table.to_csv(path)\n\n"
                      "def save_atomic(table, path):\n    with atomic_path(path) as tmp:\n        table.to_csv(tmp)\n")
    assert unguarded_writes(module) == [("save", 2, "table.to_csv")]
    module.write_text("import os\n\ndef move(a, b, t):\n    os.replace(a, b)\n    return 'x'.replace('x', 'y'), t.to_csv()\n")
    assert unguarded_writes(module) == [("move", 4, "os.replace")]
