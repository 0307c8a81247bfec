"""Trials that ran other code of their method than the reference: the code of the run that wrote the
tables (trials kept on resume with ``--keep-stale``), or else the newest trial of the method in the same
records. Their Table 1 rows carry a mark and the caption says why."""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

from ..provenance import describe_code, same_code
from ..run.jobs import trial_label
from .records import newest_per_method

OLDER_CODE_MARK = "†"

CodeByMethod = Mapping[str, Mapping[str, Any]]


def reference_code(records: Sequence[Dict[str, Any]], current: Optional[CodeByMethod] = None) -> Dict[str, Any]:
    """The code each method's trials are compared with: ``current[method]`` where given (the code of the
    run writing the tables), else the code of the method's last finished trial in ``records``."""
    newest: Dict[str, Any] = newest_per_method(records, "code")
    newest.update(current or {})
    return newest


def older_code_trials(records: Sequence[Dict[str, Any]], current: Optional[CodeByMethod] = None,
                      among: Optional[Sequence[Dict[str, Any]]] = None) -> Set[str]:
    """Ids of the trials whose recorded code differs from their method's :func:`reference_code` in ``among``
    (by default ``records``; Table 2 passes the trials of the Table 1 table that holds its own, so both
    tables mark the same trials).

    Records without a ``code`` field (older runs) are never marked: their code is unknown, not older.
    """
    reference = reference_code(records if among is None else among, current)
    return {str(r.get("trial_id")) for r in records
            if r.get("code") and not same_code(r["code"], reference[r["method"]])}


def older_code_note(records: Sequence[Dict[str, Any]], current: Optional[CodeByMethod] = None,
                    among: Optional[Sequence[Dict[str, Any]]] = None) -> str:
    """The caption sentence for the marked rows, or "" when no trial ran other code."""
    older = older_code_trials(records, current, among)
    if not older:
        return ""
    labels: List[str] = []
    methods = set()
    for record in records:
        if str(record.get("trial_id")) in older:
            methods.add(record["method"])
            text = f"{trial_label(record)} seed {record.get('seed')} ({describe_code(record['code'])})"
            if text not in labels:
                labels.append(text)
    against = ("the code of this run" if current and methods <= set(current)
               else "this run's code or its newest trial here" if current else "its newest trial here")
    return (f" {OLDER_CODE_MARK} marks rows with trials that ran older code of their method than {against} "
            f"(kept with --keep-stale, left in this folder by an earlier run with other parameters, or merged "
            f"from an older run): {'; '.join(labels)}.")
