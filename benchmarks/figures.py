"""Check that every figure in BENCHMARKS.md's tables comes from a benchmark's JSON.

The convention (stated at the top of BENCHMARKS.md): each table is preceded, in its section, by
the `benchmarks/results/*.json` file(s) it was read from (`results/NAME.json` also counts). Every number in a table cell, except
the first column (the row's label), a `target` column and anything in backticks (commands,
shapes), must equal a number in one of those files, as displayed: rounded to the digits shown,
optionally as a percentage (0.946 -> 94.6%), a time or size stored in seconds or bytes and shown
in ms, MiB, GiB, MB or GB (the unit after the figure, or in its column's header as "(ms)"), and
with thousands separators. A figure typed by
hand, or left over from an older run, fails this check.

    python benchmarks/figures.py            # lists every figure with no source; exit 1 if any
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_REFERENCE = re.compile(r"(?:benchmarks/)?results/([\w.\-]+\.json)")
NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?")
EXEMPT_HEADERS = ("target",)


@dataclass(frozen=True)
class Unsourced:
    line: int        # 1-based line of BENCHMARKS.md
    figure: str      # the number as displayed
    sources: tuple[str, ...]

    def __str__(self) -> str:
        where = ", ".join(self.sources) or "no benchmarks/results/*.json named before the table"
        return f"BENCHMARKS.md:{self.line}: {self.figure} is not in {where}"


def json_numbers(value) -> list[float]:
    """Every number in a JSON document (numeric strings included)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str):
        try:
            return [float(value)]
        except ValueError:
            return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [n for item in value for n in json_numbers(item)]
    return []


def _displays(value: float, decimals: int) -> set[str]:
    """How `value` may be displayed with `decimals` digits (either rounding of a tie)."""
    quantum = Decimal(1).scaleb(-decimals)
    exact = Decimal(repr(value))
    return {str(exact.quantize(quantum, rounding=mode)) for mode in (ROUND_HALF_UP, ROUND_HALF_EVEN)}


# A unit after the figure (or in its column's header) -> how a stored value is scaled for display:
# times are stored in seconds and sizes in bytes.
UNITS = {"ms": 1e3, "GiB": 2.0 ** -30, "MiB": 2.0 ** -20, "GB": 1e-9, "MB": 1e-6}


def matches(figure: str, numbers: list[float], percent: bool, scales: tuple[float, ...] = ()) -> bool:
    """`figure` as displayed equals one of `numbers` (a percentage may be stored as a fraction,
    a time or size in another unit)."""
    plain = figure.replace(",", "")
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    target = str(Decimal(plain))
    for n in numbers:
        candidates = [n] + ([n * 100] if percent else []) + [n * scale for scale in scales]
        if any(target in _displays(c, decimals) for c in candidates):
            return True
    return False


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def unsourced_figures(text: str, results_dir: Path) -> list[Unsourced]:
    problems: list[Unsourced] = []
    sources: list[str] = []
    header: list[str] | None = None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("#"):
            sources, header = [], None  # a new section names its own files
            continue
        if not line.lstrip().startswith("|"):
            header = None
            sources += RESULTS_REFERENCE.findall(line)
            continue
        cells = _cells(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set(line.replace("|", "").strip()) <= set("-: "):
            continue  # the separator row
        numbers = [n for name in dict.fromkeys(sources) for n in _load(results_dir / name)]
        for column, cell in enumerate(cells[1:], 1):
            if column < len(header) and any(h in header[column] for h in EXEMPT_HEADERS):
                continue
            visible = re.sub(r"`[^`]*`", "", cell)
            for match in NUMBER.finditer(visible):
                figure = match.group(0)
                after = visible[match.end():].lstrip()
                percent = after.startswith("%")
                heading = header[min(column, len(header) - 1)]
                scales = tuple(scale for unit, scale in UNITS.items()
                               if re.match(rf"{unit}\b", after) or re.search(rf"\({unit}\b|\b{unit}\)", heading, re.I))
                if not matches(figure, numbers, percent, scales):
                    problems.append(Unsourced(number, figure, tuple(dict.fromkeys(sources))))
    return problems


def _load(path: Path) -> list[float]:
    if not path.is_file():
        return []
    return json_numbers(json.loads(path.read_text(encoding="utf-8")))


def main() -> int:
    problems = unsourced_figures((REPO / "BENCHMARKS.md").read_text(encoding="utf-8"), REPO / "benchmarks" / "results")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
