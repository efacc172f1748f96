"""Text rendering of ``lake.status.lake_status`` for ``imagelake status``."""

from __future__ import annotations

from typing import Any

__all__ = ["render_status"]


def render_status(status: dict[str, Any]) -> str:
    lines = [f"lake {status['lake']}", "", f"{'table':<14}{'version':>8}{'rows':>12}{'files':>7}{'MB':>10}"]
    for name, t in status["tables"].items():
        lines.append(f"{name:<14}{t['version']:>8}{t['rows']:>12}{t['files']:>7}{t['bytes'] / 1e6:>10.1f}")
    lines += ["", "last runs:"]
    if not status["runs"]:
        lines.append("  (none)")
    for r in status["runs"]:
        when = r["started_at"].strftime("%Y-%m-%d %H:%M:%S") if r["started_at"] else "?"
        extra = f"  {r['error']}" if r.get("error") else ""
        lines.append(f"  {when}  {r['job']:<8} {r['state']:<10} in={r['rows_in'] or 0} out={r['rows_out'] or 0}"
                     f"  {r['run_id']}{extra}")
    return "\n".join(lines)
