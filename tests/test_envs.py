"""Software environments: every rule runs in a pinned conda env that agrees with pyproject.toml.

Conda itself cannot run here (no network for its channels), so these tests check what can be checked
without building the environments: the rule -> env wiring, exact pins, agreement with the versions
the test suite runs against, that each env holds every package its rules' code imports, and that the
rule scripts find brainvq when it is not installed in the env (as inside a conda env).
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from snakemake_helpers import REPO, child_env, copy_workflow, load_workflow, repo_rules, repo_workflow

ENV_DIR = REPO / "envs"
ENV_FILES = sorted(ENV_DIR.glob("*.yaml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# conda-forge names that differ from the PyPI name of the same project.
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib", "py-opencv": "opencv-python"}
# Installer/interpreter entries: pinned like the rest but not Python packages of the project.
TOOLING = {"python", "pip"}
# Packages whose modules are imported by name at run time (brainvq.sources.get_source imports
# brainvq.sources.<dataset.source>): a rule that reaches the package may use any of them, whole.
PLUGIN_PACKAGES = ("brainvq.sources",)


def normalize(name: str) -> str:
    """PEP 503 name normalisation (SimpleITK == simpleitk, scikit_image == scikit-image)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_pins() -> dict[str, str]:
    """Normalised package name -> exact version, from [project] dependencies and every extra."""
    requirements = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        requirements += extra
    pins = {}
    for text in requirements:
        req = Requirement(text)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"pyproject.toml: {text!r} is not an exact pin"
        pins[normalize(req.name)] = specs[0].version
    return pins


def env_entries(path: Path) -> tuple[list[str], list[str]]:
    """(conda dependency strings, pip requirement strings) of one env file."""
    spec = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for dep in spec.get("dependencies") or []:
        if isinstance(dep, dict):
            assert set(dep) == {"pip"}, f"{path.name}: unexpected mapping in dependencies: {dep}"
            pip += [str(item) for item in dep["pip"]]
        else:
            conda.append(str(dep))
    return conda, pip


def pinned_packages(path: Path) -> dict[str, str]:
    """Normalised PyPI name -> version of every package in an env file (conda names mapped to PyPI)."""
    conda, pip = env_entries(path)
    packages = {}
    for dep in conda:
        name, _, version = re.match(r"^([A-Za-z0-9_.\-]+)(==?)?(.*)$", dep.split("::")[-1]).groups()
        packages[normalize(CONDA_TO_PYPI.get(name, name))] = version
    for dep in pip:
        if dep.startswith("-"):  # index options such as --extra-index-url
            continue
        req = Requirement(dep)
        packages[normalize(req.name)] = next(iter(req.specifier)).version if req.specifier else ""
    return packages


def rule_env_path(rule: dict) -> Path:
    """The env file a rule names, resolved like snakemake does (relative to the rule's file)."""
    return (Path(rule["basedir"]) / rule["conda"]).resolve()


def rules_that_run() -> list[dict]:
    """Rules that execute something (not pure targets such as `all`)."""
    return [rule for rule in repo_rules() if rule["has_action"]]


def test_the_three_env_families_exist():
    assert {p.stem for p in ENV_FILES} >= {"preprocess", "torch", "report"}, ENV_FILES


def test_every_rule_that_runs_names_a_conda_env_and_has_a_log():
    problems = []
    for rule in rules_that_run():
        if not rule["conda"]:
            problems.append(f"rule {rule['name']} ({rule['snakefile']}) has no conda: directive")
        if not rule["log"]:
            problems.append(f"rule {rule['name']} ({rule['snakefile']}) has no log: directive")
    assert not problems, "\n".join(problems)


def test_every_rule_env_is_one_of_the_env_files():
    env_files = {p.resolve() for p in ENV_FILES}
    problems = [
        f"rule {rule['name']}: conda env {rule['conda']} -> {rule_env_path(rule)} is not a file in envs/"
        for rule in rules_that_run()
        if rule["conda"] and rule_env_path(rule) not in env_files
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_file_parses_with_channels_and_dependencies(env_file):
    spec = yaml.safe_load(env_file.read_text())
    assert isinstance(spec, dict), f"{env_file}: not a YAML mapping"
    assert spec.get("channels"), f"{env_file}: no channels (conda would fall back to its own defaults)"
    assert "defaults" not in spec["channels"], f"{env_file}: the Anaconda 'defaults' channel has licence terms"
    conda, pip = env_entries(env_file)
    assert conda, f"{env_file}: no conda dependencies"
    if pip:
        assert any(re.match(r"^pip(==?|$)", dep) for dep in conda), f"{env_file}: pip: section without pip itself"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_every_env_dependency_is_pinned(env_file):
    conda, pip = env_entries(env_file)
    loose = [dep for dep in conda if not re.match(r"^[A-Za-z0-9_.:\-]+==?[0-9][^*<>|,]*$", dep)]
    for dep in pip:
        if dep.startswith("-"):
            continue
        specs = list(Requirement(dep).specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            loose.append(dep)
    assert not loose, f"{env_file.name}: not pinned to one version: {loose}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_versions_agree_with_pyproject(env_file):
    pins = pyproject_pins()
    packages = pinned_packages(env_file)
    problems = []
    for name, version in packages.items():
        if name in TOOLING:
            continue
        if name not in pins:
            problems.append(f"{name}=={version} is not in pyproject.toml (the tests never run against it)")
        elif version != pins[name]:
            problems.append(f"{name}: env has {version}, pyproject.toml pins {pins[name]}")
    python = packages.get("python")
    assert python, f"{env_file.name}: no python pin"
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert f"{python}.0" in requires or python in requires, (
        f"{env_file.name}: python={python} does not satisfy requires-python {requires}"
    )
    assert not problems, f"{env_file.name}:\n" + "\n".join(problems)


# ---- imports: each env must hold what its rules' code imports ------------------------------------


def _module_file(module: str, root: Path = REPO) -> Path | None:
    """The source file of a brainvq module (package __init__ for packages), or None if absent."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _is_optional(node: ast.AST, parents: dict) -> bool:
    """True for imports guarded by `if TYPE_CHECKING:` or `try: ... except ImportError`."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
        if isinstance(node, ast.Try) and any(
            h.type is not None and re.search(r"ImportError|ModuleNotFoundError", ast.unparse(h.type))
            for h in node.handlers
        ):
            return True
    return False


class _Module:
    """One parsed module: what its top level imports and binds, and what each top-level def needs.

    Imports inside a function count only when that function can be reached from the rule script
    (by name, through brainvq modules): a deliberate lazy import (torch in a Dataset the split
    rule never touches) does not force a package into an env, while one the rule does reach does.
    """

    def __init__(self, path: Path, name: str, root: Path = REPO):
        self.name, self.root = name, root
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        self.parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        self.defs = {
            node.name: node
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        }
        top_level = [node for node in tree.body if node not in self.defs.values()]
        # Decorators and base classes run at import time too.
        for node in self.defs.values():
            top_level += node.decorator_list + list(getattr(node, "bases", []))
        self.top_imports, self.bindings = self._imports(top_level)
        self.top_names = self._names(top_level)

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        return f"{base}.{node.module}" if node.module else base

    def _imports(self, nodes) -> tuple[set[str], dict[str, tuple[str, str | None]]]:
        """(imported module names, local name -> (brainvq module, attribute or None for the module))."""
        modules, bindings = set(), {}
        for root in nodes:
            for node in ast.walk(root):
                if _is_optional(node, self.parents):
                    continue
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        modules.add(alias.name)
                        if alias.name.split(".")[0] == "brainvq":
                            local = alias.asname or alias.name.split(".")[0]
                            bindings[local] = (alias.name if alias.asname else "brainvq", None)
                elif isinstance(node, ast.ImportFrom):
                    module = self._absolute(node)
                    modules.add(module)
                    if module.split(".")[0] != "brainvq":
                        continue
                    for alias in node.names:
                        local = alias.asname or alias.name
                        if _module_file(f"{module}.{alias.name}", self.root):  # `from brainvq import io`
                            modules.add(f"{module}.{alias.name}")
                            bindings[local] = (f"{module}.{alias.name}", None)
                        else:
                            bindings[local] = (module, alias.name)
        return modules, bindings

    @staticmethod
    def _names(nodes) -> set[tuple[str, str | None]]:
        """(name, attribute) pairs read in ``nodes``: `f` -> (f, None), `io.load` -> (io, load)."""
        used = set()
        for root in nodes:
            for node in ast.walk(root):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    used.add((node.value.id, node.attr))
                elif isinstance(node, ast.Name):
                    used.add((node.id, None))
        return used


def _submodules(folder: Path) -> list[str]:
    """The names of the modules in a package folder."""
    return sorted(path.stem for path in folder.glob("*.py") if path.name != "__init__.py")


def third_party_imports(script: Path, root: Path = REPO) -> set[str]:
    """Top-level third-party modules a rule script imports, directly or through the brainvq code it reaches."""
    modules: dict[str, _Module] = {}
    external: set[str] = set()
    todo: list[tuple[str, str | None]] = []  # (module, top-level def) or (module, None): its import
    done: set[tuple[str, str | None]] = set()

    def need_imports(mod: _Module, imported: set[str]) -> None:
        for name in imported:
            top = name.split(".")[0]
            if top == "brainvq":
                parts = name.split(".")
                # Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c.
                todo.extend((".".join(parts[:i]), None) for i in range(1, len(parts) + 1))
            elif top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)

    def need_names(mod: _Module, used, bindings) -> None:
        for name, attr in used:
            if name in bindings:
                module, bound = bindings[name]
                if bound is not None:
                    todo.append((module, bound))
                elif attr is not None:
                    todo.append((module, attr))
                else:  # the module object itself is passed around: assume all of it is used
                    todo.append((module, "*"))
            elif name in mod.defs:
                todo.append((mod.name, name))

    script_mod = _Module(script, "__rule_script__", root)
    modules[script_mod.name] = script_mod
    need_imports(script_mod, script_mod.top_imports)
    need_names(script_mod, script_mod.top_names, script_mod.bindings)
    while todo:
        key = todo.pop()
        if key in done:
            continue
        done.add(key)
        module, name = key
        if module not in modules:
            path = _module_file(module, root)
            if path is None:
                continue
            modules[module] = _Module(path, module, root)
            todo.append((module, None))
            if module in PLUGIN_PACKAGES:
                todo.extend((f"{module}.{plugin}", "*") for plugin in _submodules(path.parent))
        mod = modules[module]
        if name is None:
            need_imports(mod, mod.top_imports)
            need_names(mod, mod.top_names, mod.bindings)
        elif name == "*":
            todo.extend((module, d) for d in mod.defs)
            todo.extend((m, b) for m, b in mod.bindings.values())
        elif name in mod.defs:
            local_imports, local_bindings = mod._imports([mod.defs[name]])
            need_imports(mod, local_imports)
            need_names(mod, mod._names([mod.defs[name]]), {**mod.bindings, **local_bindings})
        elif name in mod.bindings:  # a re-export, e.g. brainvq.models.VQVAE
            todo.append(mod.bindings[name] if mod.bindings[name][1] else (mod.bindings[name][0], None))
    return external


def snakemake_provided_distributions() -> set[str]:
    """snakemake and everything it requires: rule scripts get these from the snakemake running them.

    (Snakemake's script preamble appends its own sys.path, so e.g. yaml and snakemake.* resolve there.)
    """
    todo, seen = ["snakemake"], set()
    while todo:
        name = normalize(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requirements:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_each_env_holds_every_package_its_rules_import():
    module_to_dists = metadata.packages_distributions()
    provided = snakemake_provided_distributions()
    problems = []
    for rule in rules_that_run():
        if not rule["script"] or not rule["conda"] or not rule["script"].endswith(".py"):
            continue
        script = (Path(rule["basedir"]) / rule["script"]).resolve()
        env = rule_env_path(rule)
        if not script.exists() or not env.exists():
            continue  # reported by the wiring tests
        in_env = set(pinned_packages(env))
        for module in sorted(third_party_imports(script)):
            dists = {normalize(d) for d in module_to_dists.get(module, [])}
            if not dists:
                problems.append(f"rule {rule['name']}: imports {module!r}, which no installed package provides")
            elif not dists & (in_env | provided):
                problems.append(
                    f"rule {rule['name']} ({script.name}) imports {module!r} "
                    f"(package {'/'.join(sorted(dists))}) but {env.name} does not list it"
                )
    assert not problems, "\n".join(problems)


def test_import_walker_counts_reached_lazy_imports_and_skips_the_rest(tmp_path):
    pkg = tmp_path / "brainvq"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "lib.py").write_text(
        "import json\nimport numpy as np\n"
        "def used():\n    import h5py\n    return helper()\n"
        "def helper():\n    import scipy\n"
        "def unused():\n    import sklearn\n"
        "class Data:\n    def get(self):\n        import torch\n"
    )
    (pkg / "models.py").write_text("from .lib import Data\n")
    script = tmp_path / "adapter.py"
    script.write_text("import os\nimport pandas\nfrom brainvq.lib import used\nused()\n")
    assert third_party_imports(script, tmp_path) == {"pandas", "numpy", "h5py", "scipy"}
    # A class reached through a re-export brings its methods' imports.
    script.write_text("from brainvq.models import Data\n")
    assert third_party_imports(script, tmp_path) == {"numpy"}  # imported, never used
    script.write_text("from brainvq.models import Data\nData().get()\n")
    assert third_party_imports(script, tmp_path) == {"numpy", "torch"}
    # A module passed around whole counts as used whole.
    script.write_text("from brainvq import lib\nprint(lib)\n")
    assert third_party_imports(script, tmp_path) == {"numpy", "h5py", "scipy", "sklearn", "torch"}
    # A source module, imported by name at run time, counts whole for a rule that reaches brainvq.sources.
    (pkg / "sources").mkdir()
    (pkg / "sources" / "__init__.py").write_text("import importlib\ndef get_source(name):\n    return name\n")
    (pkg / "sources" / "toy.py").write_text("def participants():\n    import openpyxl\n")
    script.write_text("from brainvq.sources import get_source\nget_source('toy')\n")
    assert third_party_imports(script, tmp_path) == {"openpyxl"}


# ---- brainvq must import inside a conda env that does not have it installed ---------------------

_IMPORT_PROBE = """
import json, sys
searchpaths, scriptdir = json.loads(sys.argv[1]), sys.argv[2]
# A rule script in a conda env sees the env's packages plus what snakemake's preamble appends: the
# running snakemake's sys.path (which holds the Snakefile's folder) and the script's folder. Run
# with -S, so .pth hooks (the editable brainvq install) stay off, as they do for appended paths.
sys.path[:] = [p for p in sys.path if p] + searchpaths + [scriptdir]
import brainvq
print("BRAINVQ_FILE", brainvq.__file__)
"""


def brainvq_import_failures(workflow: dict, checkout: Path, tmp_path: Path) -> list[str]:
    """Rules whose script, run as in a conda env without brainvq, would not import ``checkout``'s brainvq."""
    by_folder: dict[Path, list[str]] = {}
    for rule in workflow["rules"]:
        if rule["has_action"] and rule["conda"] and (rule["script"] or "").endswith(".py"):
            folder = (Path(rule["basedir"]) / rule["script"]).resolve().parent
            by_folder.setdefault(folder, []).append(rule["name"])
    problems = []
    for folder, names in by_folder.items():
        proc = subprocess.run(
            [sys.executable, "-S", "-c", _IMPORT_PROBE, json.dumps(workflow["searchpaths"]), str(folder)],
            cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120,
        )
        found = re.search(r"BRAINVQ_FILE (.+)", proc.stdout)
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
            problems += [f"rule {name}: {last}" for name in names]
        elif not Path(found.group(1)).resolve().is_relative_to(checkout.resolve()):
            problems += [
                f"rule {name} would import brainvq from {found.group(1)}, not from the checkout "
                f"{checkout}: a non-editable install shadows the code; use `pip install -e .`"
                for name in names
            ]
    return problems


def test_rule_scripts_import_the_checkouts_brainvq_inside_a_conda_env(tmp_path):
    # Snakemake puts the Snakefile's folder on its sys.path and hands that path to rule scripts, so
    # brainvq/ next to the Snakefile is found in any env, and edits to it need no env rebuild.
    problems = brainvq_import_failures(repo_workflow(), REPO, tmp_path)
    assert not problems, "\n".join(problems)


def test_import_probe_fails_when_brainvq_is_not_beside_the_snakefile(tmp_path):
    # The probe must be able to fail: a workflow copy without brainvq/ cannot import it in an env.
    copy = copy_workflow(tmp_path / "wf", with_package=False)
    workflow = load_workflow(copy / "Snakefile", configfiles=[copy / "config" / "config.yaml"])
    (tmp_path / "probe").mkdir()
    problems = brainvq_import_failures(workflow, copy, tmp_path / "probe")
    scripted = [r for r in workflow["rules"] if r["has_action"] and r["script"] and r["conda"]]
    assert scripted and len(problems) == len(scripted), problems
    assert all("No module named 'brainvq'" in p for p in problems), problems
