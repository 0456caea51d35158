"""The one Markdown-table writer of the project: benchmark reports, launch counts, the kernel
compile report and the model facts all format their tables here."""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A Markdown table (no trailing newline).

    Args:
        header: the column titles.
        rows: one sequence of cells per row, as many as ``header``; cells are written with ``str``,
            a ``|`` inside a cell is escaped.
        align: one letter per column, ``l`` (left) or ``r`` (right); all left when None.

    Raises:
        ValueError: ``align`` or a row does not match the header.
    """
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align must be one 'l' or 'r' per column ({len(header)}), got {align!r}")
    ragged = [row for row in rows if len(row) != len(header)]
    if ragged:
        raise ValueError(f"every row needs {len(header)} cells; got a row of {len(ragged[0])}: {list(ragged[0])}")

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    separator = "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])
