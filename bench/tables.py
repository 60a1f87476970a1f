"""Markdown tables of the bench scripts, written under ``bench/results/``."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def markdown_table(columns: tuple[str, ...], rows: list[dict[str, str]]) -> list[str]:
    """A header, its rule and one line per row (each row a dict of the columns' texts)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]


def write_result(name: str, lines: list[str]) -> Path:
    """``bench/results/<name>`` with ``lines``; its path (printed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / name
    out.write_text("\n".join(lines) + "\n")
    print(f"written {out}")
    return out
