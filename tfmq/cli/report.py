"""The human summary the console scripts end with: one row per target, and the notes under it."""
from __future__ import annotations

COLUMNS = ("target", "built", "executed", "verdict", "numbers")


def table(rows: list[dict]) -> str:
    """A plain-text table of ``rows`` (dicts with COLUMNS; a row's "note" goes under the table)."""
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS}
    line = "  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()
    out = [line, "  ".join("-" * widths[c] for c in COLUMNS)]
    out += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    out += [f"note ({r['target']}): {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out)


def fp32_row(entry: dict, executed: str = "here") -> dict:
    m = entry.get("metrics", {})
    numbers = ", ".join(f"{k} {m[k]:.2f}" for k in ("fid_mnist", "inception_score", "cond_accuracy") if k in m)
    return {"target": "fp32", "built": "reference/ (sample grid, metrics, golden images)", "executed": executed,
            "verdict": "reference", "numbers": numbers}
