"""Where datasets live on disk, and a cache for arrays that are slow to decode.

The data root is ``--data-root`` when given, else ``$NOPROP_BENCH_DATA``, else a per-user cache
directory (``$XDG_CACHE_HOME/noprop-bench`` or ``~/.cache/noprop-bench``).
"""

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

ENV_VAR = "NOPROP_BENCH_DATA"
CACHE_DIR = "decoded"


def data_root(given: Optional[str] = None) -> Path:
    """The directory datasets are read from and downloaded into."""
    if given:
        return Path(given).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "noprop-bench"


def tree_key(source: Path, entries: Iterable[Tuple[str, int, int]]) -> Tuple[str, str]:
    """``(path_key, content_key)`` for a source directory and its ``(relative path, size, mtime_ns)`` files.

    ``path_key`` names the source; ``content_key`` changes whenever a file is added, removed, resized
    or touched, so a cache made from older files is never mistaken for a current one.
    """
    path_key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for relative, size, mtime_ns in entries:
        digest.update(f"{relative}\0{size}\0{mtime_ns}\n".encode())
    return path_key, digest.hexdigest()[:16]


def publish(temporary: Path, target: Path) -> None:
    """Move a finished temporary file into place atomically, with the permissions of a normal new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes files private to their owner
    os.replace(temporary, target)


class ArrayCache:
    """Decoded arrays stored as ``<root>/decoded/<kind>-<path_key>-<content_key>.npz``.

    Writing a new version removes the older ones for the same source, so stale caches do not pile up.
    """

    def __init__(self, root: Path, kind: str):
        self.directory = Path(root) / CACHE_DIR
        self.kind = kind

    def path(self, path_key: str, content_key: str) -> Path:
        return self.directory / f"{self.kind}-{path_key}-{content_key}.npz"

    def load(self, path_key: str, content_key: str) -> Optional[Dict[str, np.ndarray]]:
        """The cached arrays, or ``None`` when there is no readable cache for exactly these files."""
        path = self.path(path_key, content_key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None  # a damaged cache is rebuilt, like a stale one

    def save(self, path_key: str, content_key: str, arrays: Dict[str, np.ndarray]) -> Optional[Path]:
        """Store the arrays atomically; returns the path, or ``None`` if the directory is not writable."""
        path = self.path(path_key, content_key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        except OSError:
            return None  # caching is an optimisation; a read-only data root still works, only slower
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays)
            publish(Path(temporary), path)
        except BaseException as error:  # no half-written file left behind, whatever stopped the write (Ctrl-C)
            Path(temporary).unlink(missing_ok=True)
            if isinstance(error, OSError):
                return None
            raise
        for old in self.directory.glob(f"{self.kind}-{path_key}-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
        return path
