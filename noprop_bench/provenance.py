"""Which code a plugin class comes from: its distribution and version, the git commit of a checkout, and a
digest of the source files where no released version names them.

Stored with every trial (``record["code"]``) so a rerun can tell results of other code from its own.
"""

import hashlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, entry_points, packages_distributions, version
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

# what decides whether two trials ran the same code (see same_code); ``git_commit`` decides only between records
# that both lack a digest (written before checkouts were digested), as a commit changes with every edit to docs
# or tests and stays the same under uncommitted edits
CODE_FIELDS = ("distribution", "version", "source_sha256")
INSTALLED_PARTS = {"site-packages", "dist-packages"}  # where installed releases live, not source trees


ENTRY_POINT_GROUP = "noprop_bench"


@lru_cache(maxsize=1)
def _plugin_distributions() -> Dict[str, str]:
    """``{top-level package: distribution}`` for the plugins registered as entry points (a quick scan)."""
    found: Dict[str, str] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry_point, "dist", None)  # Python >= 3.10
        if dist is not None:
            found.setdefault(entry_point.value.partition(".")[0].partition(":")[0], dist.metadata["Name"])
    return found


@lru_cache(maxsize=None)
def _distributions_of(top_level: str) -> tuple:
    known = _plugin_distributions().get(top_level)
    if known:
        return (known,)
    return tuple(packages_distributions().get(top_level, ()))  # a full scan of the installed distributions


def distribution_of(cls: type) -> Optional[str]:
    """The installed distribution providing ``cls``, or None (a module loaded with ``--plugin``)."""
    found = _distributions_of(cls.__module__.partition(".")[0])
    return found[0] if found else None


def plugin_of(cls: type) -> str:
    """The distribution that provides ``cls``, or its module when no distribution does."""
    return distribution_of(cls) or cls.__module__


def is_source_tree(folder) -> bool:
    """Whether ``folder`` holds source (a checkout, an editable install, a plain folder), not an installed release."""
    return not INSTALLED_PARTS & set(Path(folder).resolve().parts)


@lru_cache(maxsize=None)
def git_commit(folder: str) -> Optional[str]:
    """The checked-out commit of the git work tree holding ``folder``, or None.

    Only for source checkouts (editable installs, ``--plugin`` modules): code installed into
    site-packages is identified by its version alone.
    """
    path = Path(folder).resolve()
    if not is_source_tree(path):
        return None
    if not any((parent / ".git").exists() for parent in (path, *path.parents)):
        return None
    try:
        done = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


@lru_cache(maxsize=None)
def git_modified(folder: str) -> Optional[bool]:
    """Whether tracked files of the checkout holding ``folder`` differ from its commit (None outside one)."""
    if git_commit(folder) is None:
        return None
    try:
        done = subprocess.run(["git", "-C", str(Path(folder).resolve()), "status", "--porcelain",
                               "--untracked-files=no"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def package_folders(module_name: str, spec=None) -> List[str]:
    """The folders of the top-level package ``module_name`` belongs to (``spec``: its import spec, for a package
    not imported); empty for a module alone."""
    if spec is not None:
        return [str(folder) for folder in spec.submodule_search_locations or []]
    top = sys.modules.get(module_name.partition(".")[0])
    return [str(folder) for folder in getattr(top, "__path__", None) or []]


SKIPPED_PARTS = ("__pycache__", *sorted(INSTALLED_PARTS))


def source_files(module_name: str, spec=None) -> List[Tuple[str, Path]]:
    """The Python files of the code a module belongs to, each with its name inside that code: every ``.py``
    under its top-level package's folders (hidden folders and caches left out), or, for a module alone,
    every ``.py`` beside it (what it may import from its folder). ``spec`` as for :func:`package_folders`."""
    folders = package_folders(module_name, spec)
    if folders:
        return sorted((path.relative_to(folder).as_posix(), path) for folder in map(Path, folders)
                      for path in folder.rglob("*.py")
                      if not any(part.startswith(".") or part in SKIPPED_PARTS
                                 for part in path.relative_to(folder).parts[:-1]))
    module_file = getattr(sys.modules.get(module_name), "__file__", None)
    if not module_file:
        return []
    return sorted((path.name, path) for path in Path(module_file).parent.glob("*.py"))


def _digest(files: List[Tuple[str, Path]]) -> Optional[str]:
    """A digest of ``files`` (names and contents), or None when there are none or they cannot all be read."""
    digest = hashlib.sha256()
    for name, path in files:
        try:
            content = path.read_bytes()
        except OSError:
            return None
        digest.update(name.encode() + b"\0" + len(content).to_bytes(8, "little") + content)
    return digest.hexdigest() if files else None


@lru_cache(maxsize=None)
def source_sha256(module_name: str) -> Optional[str]:
    """A digest of :func:`source_files` (names and contents), or None when they cannot all be read."""
    return _digest(source_files(module_name))


def distribution_packages(distribution: str) -> List[str]:
    """The top-level packages ``distribution`` installs, sorted (noprop-bench: the harness and its plugins)."""
    try:  # what setuptools writes: instant, where the scan of every installed distribution takes a good part of a second
        listed = importlib.metadata.distribution(distribution).read_text("top_level.txt")
    except importlib.metadata.PackageNotFoundError:
        listed = None
    if listed and listed.split():
        return sorted(set(listed.split()))
    return sorted(top for top, names in packages_distributions().items() if distribution in names)


@lru_cache(maxsize=None)
def distribution_sha256(distribution: str, module_name: str) -> Optional[str]:
    """A digest of the Python files of every package ``distribution`` installs (each file named with its
    package), or of ``module_name``'s own code when none can be found: for a source checkout, where a change to
    any of them (the harness's included, for the built-in methods) changes what a trial computes."""
    files = []
    for top in distribution_packages(distribution):
        spec = importlib.util.find_spec(top) if top not in sys.modules else None
        if top in sys.modules or (spec is not None and spec.submodule_search_locations):
            files += [(f"{top}/{name}", path) for name, path in source_files(top, spec)]
    return _digest(files) if files else source_sha256(module_name)


def code_identity(cls: type) -> Dict[str, Any]:
    """``{"distribution", "version", "git_commit", "source_sha256", "git_modified"}`` of the code that defines
    ``cls`` (None where unknown). ``source_sha256`` is a digest of its source files, taken wherever no released
    version alone names the code: in a source tree, git checkout or not (of every package of its distribution,
    :func:`distribution_sha256`), or for a module loaded with ``--plugin`` from a plain folder (its package's or
    its folder's files, :func:`source_files`). An edit to those files, committed or not, makes its trials
    stale; a commit that changes no Python file of the code (docs, tests elsewhere) does not. ``git_commit``
    and ``git_modified`` (uncommitted changes in the checkout) are informational, not part of
    :data:`CODE_FIELDS` (see :func:`same_code`)."""
    distribution = distribution_of(cls)
    try:
        installed = version(distribution) if distribution else None
    except PackageNotFoundError:
        installed = None
    module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    folder = str(Path(module_file).parent) if module_file else None
    commit = git_commit(folder) if folder else None
    # a source tree (a checkout, an editable install, a --plugin folder), git or not: its version stays the same
    # through every edit, so its files name it; an installed release is named by its version alone
    source_tree = folder is not None and is_source_tree(folder)
    if source_tree and distribution:
        digest = distribution_sha256(distribution, cls.__module__)
    else:
        digest = source_sha256(cls.__module__) if source_tree or installed is None else None
    return {"distribution": distribution, "version": installed, "git_commit": commit, "source_sha256": digest,
            "git_modified": git_modified(folder) if folder else None}


def same_code(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two code identities name the same code: the same :data:`CODE_FIELDS`; between two records of a
    checkout written before its digest was stored, the same commit as well."""
    if not all(recorded.get(key) == current.get(key) for key in CODE_FIELDS):
        return False
    return bool(recorded.get("source_sha256")) or recorded.get("git_commit") == current.get("git_commit")


def describe_code(code: Optional[Mapping[str, Any]]) -> str:
    """``noprop-bench 0.1.0, git 1a2b3c4d5e6f`` (what is known of it)."""
    if not code:
        return "unrecorded code"
    parts = [" ".join(str(code[key]) for key in ("distribution", "version") if code.get(key))]
    if code.get("git_commit"):
        modified = " with uncommitted changes" if code.get("git_modified") else ""
        parts.append(f"git {str(code['git_commit'])[:12]}{modified}")
    if code.get("source_sha256"):
        parts.append(f"source {str(code['source_sha256'])[:12]}")
    return ", ".join(part for part in parts if part) or "unknown code"
