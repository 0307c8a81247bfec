"""Resuming a run: which trials of the plan are already finished, and which finished with other code."""

from typing import Any, Callable, Dict, List

from ..provenance import code_identity, describe_code, same_code
from .store import FINISHED_STATUSES


def finished_records(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The last finished record of each trial id."""
    return {r["trial_id"]: r for r in records if r.get("status") in FINISHED_STATUSES and "trial_id" in r}


def pending_specs(specs: List[Any], records: List[Dict[str, Any]], keep_stale: bool,
                  say: Callable[[str], None], where: str) -> List[Any]:
    """The specs to run: those not finished, and (unless ``keep_stale``) those finished by other code.

    A finished record with no ``code`` field (written before code identity was recorded) cannot be
    judged and is kept.
    """
    finished = finished_records(records)
    last = {r["trial_id"]: r for r in records if "trial_id" in r}
    pending, unjudged = [], 0
    for spec in specs:
        record = finished.get(spec.trial_id)
        if record is None:
            if spec.trial_id in last:  # it ran before and did not finish
                say(f"retry {spec.describe()}: {last[spec.trial_id].get('status')} last time in {where}")
            pending.append(spec)
            continue
        if "code" not in record:
            unjudged += 1
        elif not same_code(record["code"], code_identity(spec.method)):
            then, now = describe_code(record["code"]), describe_code(code_identity(spec.method))
            if keep_stale:
                say(f"keep {spec.describe()}: finished with {then}, the code is now {now} (--keep-stale; marked "
                    f"in table1.md and table2.md)")
                continue
            say(f"stale {spec.describe()}: finished with {then}, the code is now {now}; training it again "
                f"(--keep-stale keeps it)")
            pending.append(spec)
            continue
        say(f"skip {spec.describe()}: already finished in {where}")
    if unjudged:
        say(f"{unjudged} finished trial(s) in {where} predate code identity; kept, as their code cannot be "
            f"compared (use a new --out to train them again)")
    return pending
