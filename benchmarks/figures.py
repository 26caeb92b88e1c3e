"""Check that every figure in BENCHMARKS.md's tables, and every ratio README.md quotes, is read
from one key of a benchmark's JSON in benchmarks/results/.

The convention (stated at the top of BENCHMARKS.md):

* Right after each table (blank lines allowed in between) comes one HTML comment that maps it:

      <!-- figures: tiny_job.json other.json
      wall_s, steps, loss.first, other.json:loss.last
      -
      -->

  The first line names the table's file(s) (`results/` or `benchmarks/results/` may prefix them).
  Then one line per data row, in the table's order; each line lists, left to right, the key path
  of every figure in that row (a `-` line: the row has none; a `-` path: a figure that is part of
  the row's label, such as a batch size no JSON key holds). A figure is a number in a cell other
  than the first (the row's label) or a `target` column, outside backticks. A key path is
  dotted, with list indices as numbers and a key that holds dots, commas or spaces in double
  quotes (`decode."llama.cpp f16, 2 threads".tokens_per_s`); `FILE.json:` before it picks a file
  other than the first.
* In README.md, every ratio (a number directly followed by `x`, as in `2.78x`) outside code must
  be tagged by a comment on the same line, `<!-- fig: committee.json: speedup.vs_100ms, ... -->`,
  listing one key path per ratio on that line, in order (the first `FILE.json:` of the comment is
  the default file of the paths after it). A ratio that no benchmark JSON holds (a target, or a
  figure worked out by hand) is listed as `-` and so stays visible as untracked. Any other figure
  on the line may be checked too by naming it: `13.58 GiB = lora.json: key.path`, `0.062% = ...`.

The figure must display the value at its path: rounded to the digits shown (either rounding of a
tie), optionally as a percentage (0.946 -> 94.6%), a time or size stored in seconds or bytes and
shown in ms, MiB, GiB, MB or GB (the unit after the figure, or in its column's header as "(ms)"),
with thousands separators. An unmapped figure, a path that is not in the JSON, or a value that
does not display as the figure is reported as FILE:line.

    python benchmarks/figures.py            # lists every problem; exit 1 if any
    python benchmarks/figures.py --suggest  # per table row, the key paths each figure could be
                                            # (to help write a mapping: pick the one the row and
                                            # column mean, never just any match)
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?")
RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)x\b")
# A tag entry that names its figure: `13.58 GiB = lora.json: key.path` (any figure, not only a ratio).
NAMED = re.compile(r"^\s*(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)\s*(%|ms|GiB|MiB|GB|MB)?\s*=\s*(.+)$")
EXEMPT_HEADERS = ("target",)
MAPPING_START = re.compile(r"^\s*<!--\s*figures:(.*)$")
PROSE_TAG = re.compile(r"<!--\s*fig:(.*?)-->")
FILE_PREFIX = re.compile(r"^\s*(?:benchmarks/)?(?:results/)?([\w.\-]+\.json)\s*:\s*")
MISSING = object()

# A unit after the figure (or in its column's header) -> how a stored value is scaled for display:
# times are stored in seconds and sizes in bytes.
UNITS = {"ms": 1e3, "GiB": 2.0 ** -30, "MiB": 2.0 ** -20, "GB": 1e-9, "MB": 1e-6}


@dataclass(frozen=True)
class Problem:
    file: str
    line: int        # 1-based
    figure: str      # the number as displayed ("" for a problem with the mapping itself)
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.figure + ' ' if self.figure else ''}{self.why}"


@dataclass(frozen=True)
class Figure:
    line: int
    text: str
    percent: bool
    scales: tuple[float, ...]


# ---- displaying a value -------------------------------------------------------------------------

def _displays(value: float, decimals: int) -> set[str]:
    """How `value` may be displayed with `decimals` digits (either rounding of a tie)."""
    quantum = Decimal(1).scaleb(-decimals)
    exact = Decimal(repr(value))
    return {str(exact.quantize(quantum, rounding=mode)) for mode in (ROUND_HALF_UP, ROUND_HALF_EVEN)}


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace(",", ""))
        except ValueError:
            return None
    return None


def displays(figure: Figure | str, value) -> bool:
    """`figure` as displayed shows `value` (a percentage may be stored as a fraction, a time or
    size in another unit)."""
    if isinstance(figure, str):
        figure = Figure(0, figure, False, ())
    n = _number(value)
    if n is None:
        return False
    plain = figure.text.replace(",", "")
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    target = str(Decimal(plain))
    candidates = [n] + ([n * 100] if figure.percent else []) + [n * scale for scale in figure.scales]
    return any(target in _displays(c, decimals) for c in candidates)


# ---- key paths ----------------------------------------------------------------------------------

def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes (a comma between digits is a thousands separator)."""
    parts, current, quoted = [], "", False
    for index, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted and not (sep == "," and text[index + 1:index + 2].isdigit()):
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def lookup(document, path: str):
    """The value at a dotted key path, or MISSING."""
    value = document
    for part in _split(path.strip(), "."):
        part = part.strip()
        if part.startswith('"') and part.endswith('"') and len(part) >= 2:
            part = part[1:-1]
        if isinstance(value, list) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return MISSING
    return value


def key_path(parts) -> str:
    return ".".join(str(p) if isinstance(p, int) or re.fullmatch(r"[\w\-]+", p) else f'"{p}"' for p in parts)


def leaves(value, parts=()):
    """(key path, value) of every number in a JSON document (numeric strings included)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, parts + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, parts + (index,))
    elif _number(value) is not None:
        yield key_path(parts), value


class Results:
    """The JSON files under benchmarks/results/, loaded once each."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._loaded: dict[str, object] = {}

    def load(self, name: str):
        if name not in self._loaded:
            path = self.directory / name
            self._loaded[name] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else MISSING
        return self._loaded[name]

    def resolve(self, reference: str, default: str | None) -> tuple[str, object, str | None]:
        """(file, value, error) for `[FILE.json:]key.path`."""
        prefix = FILE_PREFIX.match(reference)
        name = prefix.group(1) if prefix else default
        path = reference[prefix.end():] if prefix else reference
        if name is None:
            return "", MISSING, f"key path {reference.strip()!r} names no JSON file"
        document = self.load(name)
        if document is MISSING:
            return name, MISSING, f"benchmarks/results/{name} does not exist"
        value = lookup(document, path)
        if value is MISSING:
            return name, MISSING, f"{path.strip()!r} is not a key path in {name}"
        return name, value, None


def check_figure(figure: Figure, reference: str, default: str | None, results: Results, file: str) -> Problem | None:
    if reference.strip() == "-":
        return None  # explicitly not a measurement (see the module's docstring)
    name, value, error = results.resolve(reference, default)
    if error:
        return Problem(file, figure.line, figure.text, error)
    if not displays(figure, value):
        path = FILE_PREFIX.sub("", reference).strip()
        return Problem(file, figure.line, figure.text, f"does not display {name}: {path} = {value!r}")
    return None


# ---- BENCHMARKS.md tables -----------------------------------------------------------------------

def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def row_figures(number: int, cells: list[str], header: list[str]) -> list[Figure]:
    figures = []
    for column, cell in enumerate(cells[1:], 1):
        if column < len(header) and any(h in header[column] for h in EXEMPT_HEADERS):
            continue
        visible = re.sub(r"`[^`]*`", "", cell)
        heading = header[min(column, len(header) - 1)]
        for match in NUMBER.finditer(visible):
            after = visible[match.end():].lstrip()
            scales = tuple(scale for unit, scale in UNITS.items()
                           if re.match(rf"{unit}\b", after) or re.search(rf"\({unit}\b|\b{unit}\)", heading, re.I))
            figures.append(Figure(number, match.group(0), after.startswith("%"), scales))
    return figures


@dataclass(frozen=True)
class Table:
    start: int                           # line of the header row
    rows: list[list[Figure]]             # per data row (in order), its figures
    row_lines: list[int]
    files: tuple[str, ...] = ()          # from the mapping comment
    mapping: list[tuple[int, str]] | None = None   # (line, text) per row line of the comment
    unclosed: int = 0                    # line of a <!-- figures: comment with no -->


def tables(text: str) -> list[Table]:
    lines = text.splitlines()
    found: list[Table] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("|"):
            i += 1
            continue
        start, header = i + 1, [c.lower() for c in _cells(lines[i])]
        rows, row_lines = [], []
        i += 1
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            if not set(lines[i].replace("|", "").strip()) <= set("-: "):
                rows.append(row_figures(i + 1, _cells(lines[i]), header))
                row_lines.append(i + 1)
            i += 1
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        start_match = MAPPING_START.match(lines[j]) if j < len(lines) else None
        if not start_match:
            found.append(Table(start, rows, row_lines))
            continue
        files = tuple(FILE_PREFIX.match(f + ":").group(1) for f in start_match.group(1).replace("-->", "").replace(",", " ").split()
                      if FILE_PREFIX.match(f + ":"))
        mapping = []
        k = j + 1
        while k < len(lines) and "-->" not in lines[k]:
            if lines[k].strip():
                mapping.append((k + 1, lines[k].strip()))
            k += 1
        if k == len(lines):  # unclosed: would swallow every later table, so map nothing
            found.append(Table(start, rows, row_lines, files, [], unclosed=j + 1))
            i = j + 1
            continue
        found.append(Table(start, rows, row_lines, files, mapping))
        i = k + 1
    return found


def table_problems(text: str, results_dir: Path, file: str = "BENCHMARKS.md") -> list[Problem]:
    results = Results(results_dir)
    problems: list[Problem] = []
    for table in tables(text):
        if table.mapping is None:
            problems += [Problem(file, f.line, f.text, "has no key path: no <!-- figures: ... --> comment after its table")
                         for row in table.rows for f in row]
            continue
        if table.unclosed:
            problems.append(Problem(file, table.unclosed, "", "this <!-- figures: comment has no closing -->"))
        if not table.files:
            problems.append(Problem(file, table.start, "", "the table's <!-- figures: --> comment names no JSON file"))
        if len(table.mapping) != len(table.rows):
            problems.append(Problem(file, table.start, "", f"the table has {len(table.rows)} rows but its "
                                    f"<!-- figures: --> comment maps {len(table.mapping)}"))
        for index, (row, row_line) in enumerate(zip(table.rows, table.row_lines)):
            mapped = table.mapping[index][1] if index < len(table.mapping) else "-"  # a row with no line
            references = [] if mapped == "-" else [r for r in _split(mapped, ",") if r.strip()]
            for position, figure in enumerate(row):
                if position >= len(references):
                    problems.append(Problem(file, figure.line, figure.text, "has no key path in the table's <!-- figures: --> comment"))
                    continue
                problem = check_figure(figure, references[position], table.files[0] if table.files else None, results, file)
                if problem:
                    problems.append(problem)
            if len(references) > len(row):
                problems.append(Problem(file, row_line, "", f"the row has {len(row)} figures but its mapping lists {len(references)} key paths"))
    return problems


# ---- README.md prose ----------------------------------------------------------------------------

def prose_problems(text: str, results_dir: Path, file: str = "README.md") -> list[Problem]:
    """Every ratio (`2.78x`) outside code in README.md is tagged by `<!-- fig: ... -->` on its line
    and displays the value at its key path; so does every figure a tag names (`6.98 GiB = ...`)."""
    results = Results(results_dir)
    problems: list[Problem] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.lstrip().startswith("|"):
            continue  # code, and tables (README's tables hold no benchmark figures)
        line = re.sub(r"`[^`]*`", "", line)  # code spans: commands, shapes, and tags quoted as examples
        visible = PROSE_TAG.sub("", line)
        ratios = [Figure(number, m.group(1), False, ()) for m in RATIO.finditer(visible)]
        entries = [r for tag in PROSE_TAG.findall(line) for r in _split(tag, ",") if r.strip()]
        references, default = [], None
        for entry in entries:
            named = NAMED.match(entry)
            prefix = FILE_PREFIX.match(named.group(3) if named else entry)
            default = prefix.group(1) if prefix else default
            if not named:
                references.append((entry, default))
                continue
            text_, unit, reference = named.groups()
            figure = Figure(number, text_, unit == "%", (UNITS[unit],) if unit in UNITS else ())
            shown = re.search(rf"(?<![\w.,]){re.escape(text_)}(?![\d,]*\d)\s*{re.escape(unit or '')}", visible)
            problem = (Problem(file, number, text_, "is named by a tag but is not on the line") if not shown
                       else check_figure(figure, reference, default, results, file))
            if problem:
                problems.append(problem)
        for index, figure in enumerate(ratios):
            if index >= len(references):
                problems.append(Problem(file, number, figure.text + "x", "is not tagged <!-- fig: FILE.json: key.path -->"))
                continue
            problem = check_figure(figure, references[index][0], references[index][1], results, file)
            if problem:
                problems.append(Problem(file, number, figure.text + "x", problem.why))
        if len(references) > len(ratios):
            problems.append(Problem(file, number, "", f"the line has {len(ratios)} ratios but its tags list {len(references)} key paths"))
    return problems


# ---- the helper for writing mappings ------------------------------------------------------------

def suggest(text: str, results_dir: Path) -> str:
    """Per table row, the key paths (in the files of its comment, or all files) each figure could be."""
    results = Results(results_dir)
    out = []
    names = sorted(p.name for p in results_dir.glob("*.json"))
    for table in tables(text):
        files = table.files or tuple(names)
        out.append(f"table at line {table.start} ({', '.join(files)})")
        for row in table.rows:
            for figure in row:
                hits = [(f if len(files) > 1 else "") + (":" if len(files) > 1 else "") + path
                        for f in files if results.load(f) is not MISSING
                        for path, value in leaves(results.load(f)) if displays(figure, value)]
                out.append(f"  {figure.line}: {figure.text}: {' | '.join(hits) or 'NO MATCH'}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    results_dir = REPO / "benchmarks" / "results"
    benchmarks = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    if "--suggest" in argv:
        print(suggest(benchmarks, results_dir))
        return 0
    problems = table_problems(benchmarks, results_dir) + prose_problems((REPO / "README.md").read_text(encoding="utf-8"), results_dir)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
