"""Trial records: the append-only ``trials.jsonl`` store, trial identity for resume, environment capture."""

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .interrupts import ctrl_c_held

import torch

from ..errors import UsageError

try:
    import fcntl
except ImportError:  # not a POSIX system: runs go unlocked
    fcntl = None

TRIALS_FILE = "trials.jsonl"
PLAN_FILE = "plan.json"  # the trials the last command into the folder planned, so a report can name those never run
RECORD_FILES_DIR = "unmerged-records"  # records written by remote workers, waiting to be merged by the host
FINISHED_STATUSES = ("ok", "diverged")  # a failed trial is tried again when the command is rerun


def trial_id(config: Dict[str, Any]) -> str:
    """A stable identifier of what a trial computes: the same config always gives the same id."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> Dict[str, Any]:
    """Library versions and the machine, stored with every trial."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        # read without importing them: importing torchvision or timm would take seconds
        "torchvision": _installed_version("torchvision"),
        "timm": _installed_version("timm"),
        "pluggy": _installed_version("pluggy"),
        "platform": platform.platform(),
        "host": platform.node(),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        # the instruction set torch picked its CPU kernels for: their float rounding, hence CPU results, follow it
        "cpu_capability": cpu_capability(),
    }


def _installed_version(package: str) -> Optional[str]:
    """``package.__version__`` as its ``version.py`` writes it (torchvision's names its build, e.g. ``+cu130``),
    else its distribution's version, read without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    if spec.origin:
        try:
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]",
                              (Path(spec.origin).parent / "version.py").read_text(), re.M)
        except OSError:
            found = None
        if found:
            return found.group(1)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_capability() -> Optional[str]:
    """The CPU instruction set torch dispatches its kernels for (e.g. ``AVX512``), None where torch cannot say."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get else None


SLOW_APPEND_VARIABLE = "NOPROP_BENCH_TEST_SLOW_APPEND"  # tests only: seconds to pause in the middle of a line


def _ends_without_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _ends_with(fd: int, line: bytes) -> bool:
    """Whether the file's last line is exactly ``line`` (which ends with a newline)."""
    size = os.fstat(fd).st_size
    if size < len(line):
        return False
    start = size - len(line)
    return os.pread(fd, len(line), start) == line and (start == 0 or os.pread(fd, 1, start - 1) == b"\n")


def write_fully(fd: int, data: bytes) -> None:
    """Write all of ``data``: ``os.write`` may write less than asked (a full disk, a signal)."""
    pause = float(os.environ.get(SLOW_APPEND_VARIABLE) or 0)
    view = memoryview(data)
    while view:
        chunk = view[:len(view) // 2] if pause and len(view) == len(data) else view
        written = os.write(fd, chunk)
        if written == 0:
            raise OSError(f"could not write to the results store (0 of {len(view)} bytes written)")
        view = view[written:]
        if pause and view:
            time.sleep(pause)  # the chaos test kills the process here, leaving a torn line


def check_output_directory(path, flag: str) -> None:
    """Refuse, before any work, an output directory that cannot be made or written to (a file in the way,
    no permission), with a :class:`UsageError` naming ``flag``."""
    wanted = Path(path)
    existing = wanted
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise UsageError(f"{flag} {wanted}: {existing} is a symbolic link to {os.readlink(existing)}, which does "
                         f"not exist")
    if not existing.is_dir():
        raise UsageError(f"{flag} {wanted}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {wanted}: {existing} cannot be written to")
    try:  # permissions are not the whole story (a read-only or pseudo file system): write there, leaving nothing
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UsageError(f"{flag} {wanted}: {existing} cannot be written to ({error.strerror or error})") from None


@contextlib.contextmanager
def writing_alone(directory, flag: str = "--out") -> Iterator[None]:
    """Hold ``directory`` (which must exist) for one run: a second run writing there at the same time is
    refused with a :class:`UsageError`, as both would train the same trials and store each twice. The lock
    (``flock`` on the directory) ends with the run, or with its process, however that ends; where the file
    system cannot lock (some network ones), runs go unlocked."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        descriptor = None
    try:
        if descriptor is not None and fcntl is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"{flag} {directory}: another noprop-bench run is writing there; let it finish "
                                 f"(then rerun this command to add what it lacks) or give another {flag}") from None
            except OSError:
                pass
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


def _write_whole(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file of this process and a rename: a reader sees all of it or none."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class TrialStore:
    """``DIR/trials.jsonl``: one JSON object per finished trial, each appended in one write."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / TRIALS_FILE

    def append(self, record: Dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        # O_APPEND keeps lines whole even with concurrent writers; the host is the only one
        with ctrl_c_held():  # a Ctrl-C meanwhile is raised once the record is whole on disk
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if _ends_with(fd, line):  # delivered again after an interrupt: it is stored already
                    return
                if _ends_without_newline(fd):  # a write killed mid-line: end that fragment, keep this record whole
                    line = b"\n" + line
                write_fully(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    @property
    def record_files_dir(self) -> Path:
        return self.directory / RECORD_FILES_DIR

    def write_record_file(self, record: Dict[str, Any]) -> None:
        """A worker's copy of its record, so the trial is kept even if the host is gone when it finishes."""
        self.record_files_dir.mkdir(parents=True, exist_ok=True)
        _write_whole(self.record_files_dir / f"{record['trial_id']}.json",
                     json.dumps(record, sort_keys=True, default=str))

    def forget_record_file(self, record: Dict[str, Any]) -> None:
        """The host appended ``record``: its worker's copy is no longer needed."""
        (self.record_files_dir / f"{record.get('trial_id')}.json").unlink(missing_ok=True)

    def remove_empty_record_files_dir(self) -> None:
        """Once no worker can still write a copy (the run is over): the copies' folder, if it is empty."""
        try:
            self.record_files_dir.rmdir()
        except OSError:  # copies are still there (or there was no folder)
            pass

    def merge_record_files(self) -> List[Dict[str, Any]]:
        """Append the finished records that workers left while no host was listening; returns them."""
        merged = []
        for path in sorted(self.record_files_dir.glob("*.json")) if self.record_files_dir.is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a torn copy cannot exist (copies are renamed into place): a foreign file, left alone
            if isinstance(record, dict) and record.get("status") in FINISHED_STATUSES and "trial_id" in record:
                self.append(record)
                merged.append(record)
            path.unlink(missing_ok=True)
        return merged

    def read(self) -> Tuple[List[Dict[str, Any]], List[str]]:
        """All valid records, and a note for each line that could not be read (e.g. a killed write)."""
        records, skipped = [], []
        if self.path.is_dir():
            raise UsageError(f"{self.path} is a directory; it must be the file of trial records noprop-bench "
                             f"writes: move the directory away")
        if not self.path.exists():
            return records, skipped
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    # an editor may have saved the file with a byte-order mark: it is not part of the record
                    record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
                except UnicodeDecodeError:
                    skipped.append(f"{self.path}:{number}: not UTF-8 text (a damaged or foreign line)")
                    continue
                except json.JSONDecodeError:
                    skipped.append(f"{self.path}:{number}: not valid JSON (truncated write?)")
                    continue
                if isinstance(record, dict):
                    records.append(record)
                else:
                    skipped.append(f"{self.path}:{number}: a JSON {type(record).__name__}, not a record (an object)")
        return records, skipped

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self.read()[0])

    @property
    def plan_path(self) -> Path:
        return self.directory / PLAN_FILE

    def write_plan(self, command: str, planned: List[Dict[str, str]], targets: Optional[str] = None) -> None:
        """Replace the plan with this command's: ``planned`` holds each trial's ``trial_id``, ``trial`` (its
        label and seed) and ``dataset`` (its column label); ``targets``, the command's ``--targets``, are what
        a later ``report`` of the folder uses when given none."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_whole(self.plan_path, json.dumps({"command": command, "trials": planned, "targets": targets},
                                                indent=1))

    def read_plan(self) -> Optional[Dict[str, Any]]:
        """The last command's plan, or None when there is none (or it cannot be read)."""
        try:
            plan = json.loads(self.plan_path.read_text())
        except (OSError, ValueError):
            return None
        valid = (isinstance(plan, dict) and isinstance(plan.get("trials"), list)
                 and all(isinstance(t, dict) and {"trial_id", "trial", "dataset"} <= set(t) for t in plan["trials"]))
        return plan if valid else None

    def finished_ids(self) -> set:
        return {r["trial_id"] for r in self if r.get("status") in FINISHED_STATUSES and "trial_id" in r}


def supersedes(later: Dict[str, Any], earlier: Dict[str, Any]) -> bool:
    """Whether a later record of a trial stands for it instead of an earlier one: always, unless the earlier
    one finished (``ok`` or ``diverged``) and the later one did not."""
    return earlier.get("status") not in FINISHED_STATUSES or later.get("status") in FINISHED_STATUSES


def latest_per_trial(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The record that stands for each trial id, in the order they were written: its last finished record
    (``ok`` or ``diverged``), else its last record. A retried failure is superseded by its rerun, but a
    later attempt that failed or was interrupted (a stale trial's retraining stopped by Ctrl-C, a duplicate
    job that failed) does not hide a finished result, which a rerun also keeps as finished."""
    chosen: Dict[Any, int] = {}
    for index, record in enumerate(records):
        key = record.get("trial_id", id(record))
        kept = chosen.get(key)
        if kept is not None and not supersedes(record, records[kept]):
            continue
        chosen[key] = index
    return [records[index] for index in sorted(chosen.values())]
