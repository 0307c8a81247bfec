"""Which code a plugin class comes from: its distribution and version, and the git commit of a checkout.

Stored with every trial (``record["code"]``) so a rerun can tell results of other code from its own.
"""

import hashlib
import subprocess
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, entry_points, packages_distributions, version
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

CODE_FIELDS = ("distribution", "version", "git_commit", "source_sha256")


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


@lru_cache(maxsize=None)
def git_commit(folder: str) -> Optional[str]:
    """The checked-out commit of the git work tree holding ``folder``, or None.

    Only for source checkouts (editable installs, ``--plugin`` modules): code installed into
    site-packages is identified by its version alone.
    """
    path = Path(folder).resolve()
    if "site-packages" in path.parts or "dist-packages" in path.parts:
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


def package_folders(module_name: str) -> List[str]:
    """The folders of the top-level package ``module_name`` belongs to; empty for a module alone."""
    top = sys.modules.get(module_name.partition(".")[0])
    return [str(folder) for folder in getattr(top, "__path__", None) or []]


SKIPPED_PARTS = ("__pycache__", "site-packages", "dist-packages")


def source_files(module_name: str) -> List[Tuple[str, Path]]:
    """The Python files of the code a module belongs to, each with its name inside that code: every ``.py``
    under its top-level package's folders (hidden folders and caches left out), or, for a module alone,
    every ``.py`` beside it (what it may import from its folder)."""
    folders = package_folders(module_name)
    if folders:
        return sorted((path.relative_to(folder).as_posix(), path) for folder in map(Path, folders)
                      for path in folder.rglob("*.py")
                      if not any(part.startswith(".") or part in SKIPPED_PARTS
                                 for part in path.relative_to(folder).parts[:-1]))
    module_file = getattr(sys.modules.get(module_name), "__file__", None)
    if not module_file:
        return []
    return sorted((path.name, path) for path in Path(module_file).parent.glob("*.py"))


@lru_cache(maxsize=None)
def source_sha256(module_name: str) -> Optional[str]:
    """A digest of :func:`source_files` (names and contents), or None when they cannot all be read."""
    files = source_files(module_name)
    digest = hashlib.sha256()
    for name, path in files:
        try:
            content = path.read_bytes()
        except OSError:
            return None
        digest.update(name.encode() + b"\0" + len(content).to_bytes(8, "little") + content)
    return digest.hexdigest() if files else None


def code_identity(cls: type) -> Dict[str, Any]:
    """``{"distribution", "version", "git_commit", "source_sha256", "git_modified"}`` of the code that defines
    ``cls`` (None where unknown). ``source_sha256`` is a digest of its source files (:func:`source_files`), taken
    only when neither a version nor a commit names the code (a module loaded with ``--plugin`` from a plain
    folder), so an edit to it, or to a module beside it, makes its trials stale. ``git_modified`` says the
    checkout had uncommitted changes, so the commit alone does not name the code; it is informational and not
    part of :data:`CODE_FIELDS`."""
    distribution = distribution_of(cls)
    try:
        installed = version(distribution) if distribution else None
    except PackageNotFoundError:
        installed = None
    module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    folder = str(Path(module_file).parent) if module_file else None
    commit = git_commit(folder) if folder else None
    return {"distribution": distribution, "version": installed, "git_commit": commit,
            "source_sha256": source_sha256(cls.__module__) if installed is None and commit is None else None,
            "git_modified": git_modified(folder) if folder else None}


def same_code(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    return all(recorded.get(key) == current.get(key) for key in CODE_FIELDS)


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
