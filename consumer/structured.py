"""Descriptions as data: the first markdown table in a model's description, as columns, rows and steps.

The model is asked for a table `| № | Step | Role |`, one row per step of a business-process diagram
(the old fine-tune wrote the header `| № | Наименование действия | Роль |`). `parse_description` reads
that table back from whatever the model wrote around it; it depends on nothing but the standard library.
A caller filling a result's `structured` and `structured_error` fields does::

    try:
        structured, structured_error = parse_description(description).as_dict(), None
    except StructuredError as error:
        structured, structured_error = None, str(error)  # "reason: message"

How the text is read (GitHub-flavoured markdown tables, read leniently):

- Lines end at `\\n`, `\\r\\n` or `\\r`. A *table line* has at least one unescaped `|`; its leading and
  trailing pipes are optional. Its cells are the text between unescaped pipes, trimmed with `str.strip`,
  with `\\|` turned into `|`. Other backslashes and inline markdown (bold, code spans) stay as written;
  as in GFM, a pipe inside a code span splits cells unless it is escaped.
- A *delimiter row* is a table line whose cells are all like `---`, `:--`, `--:` or `:-:`. Its cell
  count is not checked against the header's: it carries only alignment, which is dropped.
- The table is the first table line directly followed by a delimiter row: that line is the header.
  Prose, code fences and other table lines before it are skipped. Only when the whole text has no such
  pair is the table the first run of at least two consecutive table lines (delimiter rows break runs)
  that all have the same number of cells, the first of them being the header.
- The body is the table lines that follow, up to the first line with no unescaped pipe: a blank line,
  prose or a closing code fence. (GFM would also take a prose line right under the table as a row.)
  Delimiter rows inside the body are skipped, so a row whose cells are all dashes is read as one.
- Ragged rows: a row may differ from the header in length only by blank cells at its end. A shorter row
  is padded with empty cells, as a markdown renderer displays it; a longer row loses its extra cells when
  they are all blank (`| 1 | Start | System | |`). Extra cells with text would be lost, so that row is
  refused as `ragged_rows` instead.
- Steps: when the header has exactly three cells naming a number, a step and a role column (English or
  Russian synonyms such as `№`/`#`/`No.`/`Номер`, `Step`/`Action`/`Наименование действия`,
  `Role`/`Swimlane`/`Исполнитель`; any order; a blank header is the number), each row is also a `Step`.
  Its number is the cell read as a whole number (`1`, `01`, `1.`, `1)`, `#1`), else None.
- Bounds: at most `MAX_DESCRIPTION_CHARS` characters of text, `MAX_COLUMNS` header cells and `MAX_ROWS`
  data rows, else `too_large`. Parsing is linear in the length of the text.

Any `str` either parses or raises `StructuredError`; nothing else escapes (lone surrogates, NUL and
bidirectional marks are text like any other and are kept in the cells as written).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, TypedDict

__all__ = [
    "MAX_COLUMNS",
    "MAX_DESCRIPTION_CHARS",
    "MAX_ROWS",
    "Reason",
    "Step",
    "StepDict",
    "StructuredError",
    "StructuredTable",
    "TableDict",
    "parse_description",
]

MAX_DESCRIPTION_CHARS = 1 << 18
"""Longer text is refused: 32 characters for each of the 8192 tokens MAX_NEW_TOKENS allows at most."""
MAX_ROWS = 1000
"""Data rows in one table; a diagram with more steps than this is not a diagram a person reads."""
MAX_COLUMNS = 32
"""Header cells in one table."""

Reason = Literal["no_table", "no_rows", "ragged_rows", "too_large"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
_DELIMITER_ROW = re.compile(r"\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?")
# re.ASCII: str.isdigit and int() also take other scripts' digits, and int() takes "1_000".
_STEP_NUMBER = re.compile(r"[#№]?\s*(\d{1,18})\s*[.)]?", re.ASCII)
_EMPHASIS = "*_`"

# Header synonyms, compared after _header_key: case-folded, emphasis and a trailing "." or ":" removed. A blank
# header counts as the number column: models sometimes leave the narrow first header cell empty.
_NUMBER_HEADERS = frozenset(
    {
        "",
        "№",
        "#",
        "n",
        "no",
        "nr",
        "nº",
        "n°",
        "num",
        "number",
        "step no",
        "step number",
        "step #",
        "номер",
        "№ п/п",
        "п/п",
        "п/н",
        "№ шага",
        "номер шага",
        "порядковый номер",
    }
)
_STEP_HEADERS = frozenset(
    {
        "step",
        "steps",
        "step name",
        "step description",
        "action",
        "actions",
        "action name",
        "activity",
        "task",
        "description",
        "name",
        "process step",
        "operation",
        "наименование действия",
        "наименование",
        "действие",
        "действия",
        "название действия",
        "название",
        "шаг",
        "наименование шага",
        "описание",
        "описание действия",
        "этап",
        "операция",
    }
)
_ROLE_HEADERS = frozenset(
    {
        "role",
        "roles",
        "swimlane",
        "swim lane",
        "lane",
        "actor",
        "performer",
        "executor",
        "responsible",
        "owner",
        "participant",
        "department",
        "роль",
        "роли",
        "исполнитель",
        "ответственный",
        "дорожка",
        "участник",
        "подразделение",
    }
)


class StructuredError(ValueError):
    """A description that holds no usable table. `str(error)` is `"reason: message"`.

    `reason` is short and machine-readable (see `Reason`); `message` says what a person would fix.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: Reason = reason
        self.message = message


class StepDict(TypedDict):
    """One step in JSON: `{"number": 1 | null, "step": "...", "role": "..."}`."""

    number: int | None
    step: str
    role: str


class TableDict(TypedDict):
    """A table in JSON: `{"columns": [...], "rows": [[...], ...], "steps": [StepDict, ...] | null}`."""

    columns: list[str]
    rows: list[list[str]]
    steps: list[StepDict] | None


@dataclass(frozen=True)
class Step:
    """One row of a number/step/role table. `number` is None when its cell is not a whole number."""

    number: int | None
    step: str
    role: str

    def as_dict(self) -> StepDict:
        """This step as JSON-ready data."""
        return {"number": self.number, "step": self.step, "role": self.role}


@dataclass(frozen=True)
class StructuredTable:
    """The first table of a description: header cells, data rows as written, and steps when recognised.

    Every row has exactly `len(columns)` cells. `steps` is set only when the header is the known
    number, step and role columns (in any order, see the module's header synonyms); one per row.
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    steps: tuple[Step, ...] | None

    def as_dict(self) -> TableDict:
        """This table as JSON-ready data (lists, str, int and None only)."""
        return {
            "columns": list(self.columns),
            "rows": [list(row) for row in self.rows],
            "steps": None if self.steps is None else [step.as_dict() for step in self.steps],
        }


def parse_description(text: str) -> StructuredTable:
    """The first markdown table in `text`, read as the module docstring describes.

    Raises `StructuredError` (and nothing else) with reason `no_table`, `no_rows`, `ragged_rows` or
    `too_large`.
    """
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise StructuredError(
            "too_large", f"the description has {len(text)} characters, more than {MAX_DESCRIPTION_CHARS}"
        )
    # A byte-order mark would hide the first line's leading pipe.
    lines = _LINE_BREAK.split(text.removeprefix("\ufeff"))
    header_at = _find_header(lines)
    if header_at is not None:
        columns = _cells(lines[header_at])
        _check_width(columns)
        rows = _body(lines, header_at + 2, len(columns))
    else:
        columns, rows = _table_without_delimiter(lines)
    if not rows:
        raise StructuredError("no_rows", f"the table with header {_shown(columns)} has no data rows")
    return StructuredTable(columns=columns, rows=rows, steps=_steps(columns, rows))


def _cells(line: str) -> tuple[str, ...]:
    """The cells of a table line: split at unescaped pipes, outer pipes optional, trimmed, `\\|` → `|`."""
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return tuple(cell.strip().replace("\\|", "|") for cell in _UNESCAPED_PIPE.split(line))


def _is_table_line(line: str) -> bool:
    return _UNESCAPED_PIPE.search(line) is not None


def _is_delimiter(line: str) -> bool:
    """Whether `line` is a table line whose cells are all `---`, `:--`, `--:` or `:-:`."""
    line = line.strip()
    return "|" in line and _DELIMITER_ROW.fullmatch(line) is not None


def _find_header(lines: list[str]) -> int | None:
    """Index of the first table line directly followed by a delimiter row, if any."""
    previous_can_head = False
    for index, line in enumerate(lines):
        is_delimiter = _is_delimiter(line)
        if is_delimiter and previous_can_head:
            return index - 1
        previous_can_head = not is_delimiter and _is_table_line(line)
    return None


def _check_width(columns: tuple[str, ...]) -> None:
    if len(columns) > MAX_COLUMNS:
        raise StructuredError("too_large", f"the table has {len(columns)} columns, more than {MAX_COLUMNS}")


def _body(lines: list[str], start: int, width: int) -> tuple[tuple[str, ...], ...]:
    """The data rows from `lines[start]` to the first line without an unescaped pipe, fitted to `width`."""
    rows: list[tuple[str, ...]] = []
    for index in range(start, len(lines)):
        line = lines[index]
        if not _is_table_line(line):
            break
        if _is_delimiter(line):
            continue
        if len(rows) == MAX_ROWS:
            raise StructuredError("too_large", f"the table has more than {MAX_ROWS} rows")
        rows.append(_fitted(_cells(line), width, len(rows) + 1, index + 1))
    return tuple(rows)


def _fitted(cells: tuple[str, ...], width: int, row_number: int, line_number: int) -> tuple[str, ...]:
    """`cells` padded or cut to `width`, cutting only blank cells (the module's ragged-rows rule)."""
    if len(cells) <= width:
        return cells + ("",) * (width - len(cells))
    if any(cells[width:]):
        raise StructuredError(
            "ragged_rows",
            f"row {row_number} (line {line_number}) has {len(cells)} cells, "
            f"the header has {width}, and the extra cells are not blank",
        )
    return cells[:width]


def _table_without_delimiter(lines: list[str]) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """Header and rows of the first run of ≥ 2 consecutive table lines with equal cell counts."""
    run: list[tuple[str, ...]] = []
    widths_agree = True
    # The sentinel "" ends a run that reaches the last line.
    for line in [*lines, ""]:
        if _is_table_line(line) and not _is_delimiter(line):
            cells = _cells(line)
            widths_agree = widths_agree and (not run or len(cells) == len(run[0]))
            run.append(cells)
            continue
        if len(run) >= 2 and widths_agree:
            _check_width(run[0])
            if len(run) - 1 > MAX_ROWS:
                raise StructuredError("too_large", f"the table has more than {MAX_ROWS} rows")
            return run[0], tuple(run[1:])
        run, widths_agree = [], True
    raise StructuredError(
        "no_table",
        "the description has no markdown table: no header line followed by a "
        "delimiter row (|---|---|), nor two or more lines with the same number "
        "of |-separated cells",
    )


def _header_key(header: str) -> str:
    """A header cell as compared with the synonyms: emphasis, case, inner spacing, trailing '.' or ':' ignored."""
    key = " ".join(header.strip(_EMPHASIS).split()).casefold()
    return key.rstrip(".:").rstrip()


def _steps(columns: tuple[str, ...], rows: tuple[tuple[str, ...], ...]) -> tuple[Step, ...] | None:
    """The rows as steps when the columns are number, step and role in some order, else None."""
    if len(columns) != 3:
        return None
    keys = [_header_key(column) for column in columns]
    number_at, step_at, role_at = (
        _column_of(keys, synonyms) for synonyms in (_NUMBER_HEADERS, _STEP_HEADERS, _ROLE_HEADERS)
    )
    if number_at is None or step_at is None or role_at is None or len({number_at, step_at, role_at}) != 3:
        return None
    return tuple(Step(number=_step_number(row[number_at]), step=row[step_at], role=row[role_at]) for row in rows)


def _column_of(keys: list[str], synonyms: frozenset[str]) -> int | None:
    return next((index for index, key in enumerate(keys) if key in synonyms), None)


def _step_number(cell: str) -> int | None:
    """`1`, `01`, `1.`, `1)`, `#1`, `**1**` → 1; anything else (`1.2`, `—`, `first`, blank) → None."""
    match = _STEP_NUMBER.fullmatch(cell.strip(_EMPHASIS + " "))
    return int(match.group(1)) if match else None


def _shown(columns: tuple[str, ...]) -> str:
    """The header as a person would recognise it in an error message, shortened."""
    shown = "| " + " | ".join(columns) + " |"
    return shown if len(shown) <= 80 else shown[:77] + "..."
