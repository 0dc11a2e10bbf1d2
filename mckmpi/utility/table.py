"""Plain-text tables for terminal output (the CLI prints, the library computes)."""

from __future__ import annotations

from collections.abc import Sequence


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 run', '2 runs', '0 runs': a count with its noun in agreement (`plural` for nouns
    that do not just take an s: counted(n, "index", "indices"))."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def render(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """Left-aligned text, right-aligned numbers, one space-padded column per header."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        out = []
        for i, text in enumerate(values):
            out.append(text.rjust(widths[i]) if numeric[i] else text.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [title] if title else []
    lines.append(line(list(headers)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(line(row) for row in cells)
    return "\n".join(lines)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    return str(value)
