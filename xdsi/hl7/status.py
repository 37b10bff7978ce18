"""The HIS/RIS interface as ``xdsi status`` shows it: read from the configuration and the index only."""

from __future__ import annotations

from xdsi.config import Settings

__all__ = ["status_lines"]


def status_lines(settings: Settings) -> list[str]:
    """``hl7:`` the listener as configured; ``prefetch:`` the rules, jobs per state, and the last failed jobs with their reason."""
    h = settings.hl7
    if not h.port:
        return ["hl7:        off ([hl7] port = 0)"]
    lines = [f"hl7:        MLLP on {settings.host}:{h.port}{' (TLS)' if h.tls else ''}; "
             f"patient updates {'republish manifests' if h.republish else 'do not republish'}"]
    if not h.prefetch:
        lines.append("prefetch:   no [[prefetch]] rules")
        return lines
    from xdsi.hl7.prefetch import prefetch_status
    from xdsi.index.db import open_index

    index = open_index(settings.effective_index_url)
    try:
        counts, failed = prefetch_status(index)
    finally:
        index.dispose()
    jobs = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none yet"
    lines.append(f"prefetch:   rules {', '.join(r.name for r in h.prefetch)}; jobs: {jobs}")
    for j in failed:
        when = f"{j.finished_at:%Y-%m-%d %H:%M:%S}" if j.finished_at else "?"
        lines.append(f"  failed {when} {j.rule} for patient {j.patient_id!r} ({j.message_type} {j.message_control_id}): {j.error[:300]}")
    return lines
