"""Small helpers the bench's figures and tables share: reading nested JSON,
ratios, number formatting, markdown tables."""

from __future__ import annotations

from typing import Any

Doc = dict[str, Any]


def get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def ratio(a: Any, b: Any) -> float | None:
    x, y = num(a), num(b)
    if x is None or y is None or y == 0:
        return None
    return round(x / y, 3)


def core_busy(row: Doc, cores: list[int]) -> float | None:
    busy = row.get("cores_busy_pct")
    if not isinstance(busy, list) or not cores or any(c >= len(busy) for c in cores):
        return None
    return round(sum(float(busy[c]) for c in cores) / len(cores), 1)


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    x = num(value)
    if x is None:
        return "-"
    return f"{x:,.{digits}f}{suffix}"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return [line, rule, *body]


def section(title: str, text: str, headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown section: its title, what it shows, and its table."""
    return [f"## {title}", "", text, "", *table(headers, rows), ""]


def at(fig: Doc | None, rate: int, key: str = "us_per_delivery", digits: int = 1) -> str:
    cell = get(fig, "at", str(rate))
    if not isinstance(cell, dict):
        return "-"
    text = fmt(cell.get(key), digits)
    return text if cell.get("ok") or text == "-" else text + "*"
