"""Trials that ran older code of their method than the newest trial of it in the same records
(kept on resume with ``--keep-stale``): their Table 1 rows carry a mark and the caption says why."""

from typing import Any, Dict, List, Sequence, Set

from ..provenance import describe_code, same_code

OLDER_CODE_MARK = "†"


def older_code_trials(records: Sequence[Dict[str, Any]]) -> Set[str]:
    """Ids of the trials whose recorded code differs from that of their method's last finished trial.

    Records without a ``code`` field (older runs) are never marked: their code is unknown, not older.
    """
    newest: Dict[str, Dict[str, Any]] = {}
    for record in sorted((r for r in records if r.get("code")), key=lambda r: str(r.get("finished_at", ""))):
        newest[record["method"]] = record["code"]
    return {str(r.get("trial_id")) for r in records
            if r.get("code") and not same_code(r["code"], newest[r["method"]])}


def older_code_note(records: Sequence[Dict[str, Any]]) -> str:
    """The caption sentence for the marked rows, or "" when no trial ran older code."""
    older = older_code_trials(records)
    if not older:
        return ""
    labels: List[str] = []
    for record in records:
        if str(record.get("trial_id")) in older:
            text = f"{record.get('row_label')} seed {record.get('seed')} ({describe_code(record['code'])})"
            if text not in labels:
                labels.append(text)
    return (f" {OLDER_CODE_MARK} marks rows with trials that ran older code of their method than its newest "
            f"trial here (kept with --keep-stale, or merged from an older run): {'; '.join(labels)}.")
