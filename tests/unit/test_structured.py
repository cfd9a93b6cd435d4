"""A description's markdown table, read back as data: what models really write, and what is refused.

The property tests render random tables to markdown and read them back unchanged, and feed arbitrary
text: the only exception allowed out of `parse_description` is `StructuredError`.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from consumer.engine.echo import ECHO_DESCRIPTION
from consumer.structured import (
    MAX_COLUMNS,
    MAX_DESCRIPTION_CHARS,
    MAX_ROWS,
    Step,
    StructuredError,
    StructuredTable,
    parse_description,
)

PROPERTY = hypothesis_settings(max_examples=200, deadline=None)

PROMPTED = """\
Here is the description of the diagram:

```markdown
| № | Step | Role |
|---|------|------|
| 1 | Receive the order | Sales |
| 2 | Check stock | Warehouse |
| 3 | Ship the goods | Logistics |
```

The process ends once the goods are shipped.
"""

FINE_TUNE = """\
| № | Наименование действия | Роль |
| :-: | :--- | ---: |
| 1 | Регистрация заявки | Оператор |
| 2 | Согласование заявки | Руководитель отдела |
| 3 | Исполнение заявки | Исполнитель |"""


def refusal(text: str) -> StructuredError:
    with pytest.raises(StructuredError) as caught:
        parse_description(text)
    return caught.value


def test_the_prompted_table_is_found_between_prose_and_code_fences():
    table = parse_description(PROMPTED)
    assert table.columns == ("№", "Step", "Role")
    assert table.rows == (
        ("1", "Receive the order", "Sales"),
        ("2", "Check stock", "Warehouse"),
        ("3", "Ship the goods", "Logistics"),
    )
    assert table.steps == (
        Step(1, "Receive the order", "Sales"),
        Step(2, "Check stock", "Warehouse"),
        Step(3, "Ship the goods", "Logistics"),
    )


def test_the_fine_tunes_russian_header_gives_steps():
    table = parse_description(FINE_TUNE)
    assert table.columns == ("№", "Наименование действия", "Роль")
    assert table.steps is not None
    assert [step.step for step in table.steps] == ["Регистрация заявки", "Согласование заявки", "Исполнение заявки"]
    assert table.steps[1] == Step(number=2, step="Согласование заявки", role="Руководитель отдела")


def test_the_json_shape_downstream_services_read():
    table = parse_description("| # | Step | Role |\n|---|---|---|\n| 1 | Start | System |\n| x | End | |")
    assert json.loads(json.dumps(table.as_dict())) == {
        "columns": ["#", "Step", "Role"],
        "rows": [["1", "Start", "System"], ["x", "End", ""]],
        "steps": [{"number": 1, "step": "Start", "role": "System"}, {"number": None, "step": "End", "role": ""}],
    }
    other = parse_description("| Phase | Owner | Notes | Due |\n|---|---|---|---|\n| a | b | c | d |")
    assert other.as_dict() == {
        "columns": ["Phase", "Owner", "Notes", "Due"],
        "rows": [["a", "b", "c", "d"]],
        "steps": None,
    }


def test_the_echo_engines_description_parses():
    table = parse_description(ECHO_DESCRIPTION)
    assert table.steps == (Step(1, "echo engine: no model was run", "-"),)


def test_escaped_pipes_stay_inside_their_cell():
    table = parse_description("| № | Step | Role |\n|---|---|---|\n| 1 | Choose A \\| B | Clerk \\| Bot |\n")
    assert table.rows == (("1", "Choose A | B", "Clerk | Bot"),)


def test_other_backslashes_and_inline_markdown_are_kept_as_written():
    table = parse_description("| № | Step | Role |\n|---|---|---|\n| 1 | Save to C:\\temp\\ | **Admin** |")
    assert table.rows == (("1", "Save to C:\\temp\\", "**Admin**"),)


def test_an_unescaped_pipe_in_a_code_span_splits_the_cell_as_in_github_markdown():
    table = parse_description("| a | b |\n|---|---|\n| `x | y` |")
    assert table.rows == (("`x", "y`"),)


def test_outer_pipes_are_optional():
    table = parse_description("№ | Step | Role\n--- | --- | ---\n1 | Start | System\n| 2 | End | User")
    assert table.columns == ("№", "Step", "Role")
    assert table.rows == (("1", "Start", "System"), ("2", "End", "User"))


def test_alignment_rows_and_extra_whitespace_are_ignored():
    table = parse_description("  |  No.  |Action|   Swimlane |  \n|:---|:---:|---:|\n|1|  Start  |\tSystem\t|\n")
    assert table.columns == ("No.", "Action", "Swimlane")
    assert table.rows == (("1", "Start", "System"),)
    assert table.steps == (Step(1, "Start", "System"),)


def test_a_delimiter_row_repeated_inside_the_body_is_skipped():
    table = parse_description("| № | Step | Role |\n|---|---|---|\n| 1 | a | r |\n|---|---|---|\n| 2 | b | r |")
    assert [row[0] for row in table.rows] == ["1", "2"]


def test_blank_cells_are_kept_as_empty_strings():
    table = parse_description("| № | Step | Role |\n|---|---|---|\n|  | Start |  |\n| 2 |  | Manager |")
    assert table.rows == (("", "Start", ""), ("2", "", "Manager"))
    assert table.steps == (Step(None, "Start", ""), Step(2, "", "Manager"))


@pytest.mark.parametrize(
    "cell, number",
    [
        ("1", 1),
        ("01", 1),
        ("1.", 1),
        ("2)", 2),
        ("#3", 3),
        ("№ 4", 4),
        ("**5**", 5),
        (" 6 ", 6),
        ("1.2", None),
        ("4a", None),
        ("—", None),
        ("first", None),
        ("", None),
        ("-1", None),
        ("1_000", None),
        ("٣", None),
        ("1" * 19, None),
        ("9" * 5000, None),
    ],
)
def test_step_numbers_are_whole_numbers_or_none(cell, number):
    table = parse_description(f"| № | Step | Role |\n|---|---|---|\n| {cell} | s | r |")
    assert table.steps is not None and table.steps[0].number == number
    assert table.rows[0][0] == cell.strip()


def test_skipped_numbering_is_reported_as_written():
    table = parse_description(
        "| № | Step | Role |\n|---|---|---|\n| 1 | a | r |\n| 3 | b | r |\n| 3 | c | r |\n| 10 | d | r |"
    )
    assert table.steps is not None and [step.number for step in table.steps] == [1, 3, 3, 10]


@pytest.mark.parametrize(
    "header, row",
    [
        ("| № | Step | Role |", "| 7 | Approve | Director |"),
        ("| # | Action | Swimlane |", "| 7 | Approve | Director |"),
        ("| No | Activity | Actor |", "| 7 | Approve | Director |"),
        ("| N | Task | Lane |", "| 7 | Approve | Director |"),
        ("| Number | STEP | ROLE |", "| 7 | Approve | Director |"),
        ("| **№** | **Step** | **Role** |", "| 7 | Approve | Director |"),
        ("| Номер | Действие | Исполнитель |", "| 7 | Approve | Director |"),
        ("| № п/п | Наименование шага | Ответственный |", "| 7 | Approve | Director |"),
        ("|   | Step | Role |", "| 7 | Approve | Director |"),
        ("| Nº: | Step Description | Swim  lane |", "| 7 | Approve | Director |"),
        ("| Step | Role | # |", "| Approve | Director | 7 |"),
        ("| Роль | № | Наименование действия |", "| Director | 7 | Approve |"),
    ],
)
def test_known_headers_give_steps_in_either_language_and_any_order(header, row):
    assert parse_description(f"{header}\n|---|---|---|\n{row}").steps == (Step(7, "Approve", "Director"),)


@pytest.mark.parametrize(
    "header",
    [
        "| № | Step | Role | Note |",
        "| Step | Role |",
        "| Date | Event | Place |",
        "| № | № | Role |",
        "| Step | Step | Role |",
        "|  | Step |  |",
    ],
)
def test_other_headers_give_rows_but_no_steps(header):
    width = header.count("|") - 1
    table = parse_description(f"{header}\n" + "|---" * width + "|\n" + "| x " * width + "|")
    assert table.steps is None and table.rows == (("x",) * width,)


def test_the_first_table_is_taken():
    text = (
        "Steps:\n\n| № | Step | Role |\n|---|---|---|\n| 1 | a | r |\n\nRoles:\n\n| Role | Team |\n|---|---|\n| r | t |"
    )
    assert parse_description(text).columns == ("№", "Step", "Role")


def test_a_prose_line_with_a_pipe_is_not_a_header():
    text = "Choose A | B below.\n| № | Step | Role |\n|---|---|---|\n| 1 | a | r |"
    assert parse_description(text).columns == ("№", "Step", "Role")


def test_the_table_ends_at_the_first_line_without_a_pipe():
    text = "| № | Step | Role |\n|---|---|---|\n| 1 | a | r |\nThat is all.\n| 2 | b | r |"
    assert parse_description(text).rows == (("1", "a", "r"),)


def test_windows_and_old_mac_line_endings_are_read():
    assert parse_description("| a | b |\r\n|---|---|\r\n| 1 | 2 |\r\n").rows == (("1", "2"),)
    assert parse_description("| a | b |\r|---|---|\r| 1 | 2 |").rows == (("1", "2"),)


def test_a_table_without_a_delimiter_row_is_read_when_every_line_has_the_same_cell_count():
    table = parse_description("The steps:\n| № | Step | Role |\n| 1 | Start | System |\n| 2 | End | User |\nDone.")
    assert table.columns == ("№", "Step", "Role") and len(table.rows) == 2 and table.steps is not None
    assert refusal("| № | Step | Role |\n| 1 | Start |\n| 2 | End | User |").reason == "no_table"


def test_a_short_row_is_padded_with_blank_cells():
    table = parse_description("| № | Step | Role |\n|---|---|---|\n| 1 | Start |\n| 2 |\n| 3 | End | User |")
    assert table.rows == (("1", "Start", ""), ("2", "", ""), ("3", "End", "User"))


def test_a_long_row_loses_its_extra_cells_only_when_they_are_blank():
    table = parse_description("| № | Step | Role |\n|---|---|---|\n| 1 | Start | System | |\n| 2 | End | User ||  |")
    assert table.rows == (("1", "Start", "System"), ("2", "End", "User"))
    error = refusal("| № | Step | Role |\n|---|---|---|\n| 1 | Start | System |\n| 2 | End | User | again |")
    assert error.reason == "ragged_rows"
    assert "row 2 (line 4)" in error.message and "4 cells" in error.message


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "no_table"),
        ("The diagram shows an order being received, checked and shipped.", "no_table"),
        ("I cannot read this image.\n\n```\nno table here\n```", "no_table"),
        ("---\n---", "no_table"),
        ("| № | Step | Role |\n|---|---|---|", "no_rows"),
        ("| № | Step | Role |\n|---|---|---|\n\n| 1 | a | r |", "no_rows"),
        ("| № | Step | Role |\n|---|---|---|\n|---|---|---|", "no_rows"),
    ],
)
def test_descriptions_without_a_usable_table_are_refused_with_a_reason(text, reason):
    error = refusal(text)
    assert error.reason == reason and str(error) == f"{reason}: {error.message}" and isinstance(error, ValueError)


def test_size_limits_are_refused_as_too_large():
    rows = "".join(f"| {n} | step {n} | role |\n" for n in range(1, MAX_ROWS + 1))
    assert len(parse_description("| № | Step | Role |\n|---|---|---|\n" + rows).rows) == MAX_ROWS
    assert refusal("| № | Step | Role |\n|---|---|---|\n" + rows + "| x | y | z |").reason == "too_large"
    assert refusal("| № | Step | Role |\n" + rows + "| x | y | z |").reason == "too_large"
    wide = "|" + " c |" * (MAX_COLUMNS + 1) + "\n" + "|---" * (MAX_COLUMNS + 1) + "|\n" + "| x " * (MAX_COLUMNS + 1)
    assert refusal(wide).reason == "too_large"
    assert refusal("| a | b |\n|---|---|\n| 1 | 2 |\n" + "x" * MAX_DESCRIPTION_CHARS).reason == "too_large"


def test_lone_surrogates_nul_and_bidirectional_marks_are_kept_as_written():
    table = parse_description("| a\u200f | b |\n|---|---|\n| \udfff | \x00\u202e |")
    assert table.columns == ("a\u200f", "b") and table.rows == (("\udfff", "\x00\u202e"),)


def test_a_byte_order_mark_before_the_table_is_ignored():
    assert parse_description("\ufeff| a | b |\n|---|---|\n| 1 | 2 |").columns == ("a", "b")


@pytest.mark.parametrize(
    "text",
    [
        "\ud800| a | b |\n|---|---|\n| \udfff | \x00 |",
        "\u200f| № | Step | Role |\u200f\n|---|---|---|\n| 1 | \u202e | r |",
        "\\" * 10_000 + "|",
        "|" * 100_000,
        "|\n" * 100_000,
        "| a |\n|-|\n" + "|\n" * 100_000,
        "-|" * 50_000,
        "|---|\n" * 50_000,
        ("a | b\n" * 3 + "c\n") * 10_000,
    ],
)
def test_hostile_text_is_refused_or_gives_a_table_that_serialises(text):
    try:
        table = parse_description(text)
    except StructuredError:
        return
    json.dumps(table.as_dict())


# Cells are text without line breaks, trimmed as the parser trims them; a row of only dashes reads as a
# delimiter row, so tables with one are not generated. Pipes and backslashes are escaped by the renderer.
TRICKY = st.sampled_from(
    [
        "|",
        "\\",
        "-",
        ":",
        " ",
        "\t",
        "\x00",
        "\ud800",
        "\udfff",
        "\u200f",
        "\u202e",
        "\ufeff",
        "№",
        "`",
        "*",
        "\u2028",
        "\x85",
        "\x0b",
    ]
)
CELL = st.text(st.one_of(st.characters(exclude_characters="\r\n"), TRICKY), max_size=12).map(str.strip)


def is_delimiter_like(cells: list[str]) -> bool:
    return all(re.fullmatch(r":?-+:?", cell) for cell in cells)


@st.composite
def tables(draw: st.DrawFn, filled_edges: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one width; with `filled_edges`, at least two columns and no blank first or last cell."""
    width = draw(st.integers(2 if filled_edges else 1, 6))
    edge = CELL.filter(bool) if filled_edges else CELL
    inner = max(width - 2, 0)
    line = st.builds(
        lambda first, middle, last: [first, *middle, last][-width:],
        edge,
        st.lists(CELL, min_size=inner, max_size=inner),
        edge,
    )
    line = line.filter(lambda cells: not is_delimiter_like(cells))
    return draw(line), draw(st.lists(line, min_size=1, max_size=8))


def render(cells: list[str], outer_pipes: bool = True) -> str:
    inner = " | ".join(cell.replace("|", "\\|") for cell in cells)
    return f"| {inner} |" if outer_pipes else inner


def render_table(columns: list[str], rows: list[list[str]], outer_pipes: bool = True) -> str:
    delimiter = render([":---"] * len(columns), outer_pipes)
    return "\n".join([render(columns, outer_pipes), delimiter, *(render(row, outer_pipes) for row in rows)])


def assert_read_back(table: StructuredTable, columns: list[str], rows: list[list[str]]) -> None:
    assert table.columns == tuple(columns)
    assert table.rows == tuple(tuple(row) for row in rows)


@PROPERTY
@given(
    tables(),
    st.text(st.characters(exclude_characters="|\r\n"), max_size=40),
    st.text(st.characters(exclude_characters="|\r\n"), max_size=40),
)
def test_a_rendered_table_reads_back_unchanged_with_prose_around_it(table, before, after):
    columns, rows = table
    text = f"{before}\n\n```markdown\n{render_table(columns, rows)}\n```\n\n{after}"
    assert_read_back(parse_description(text), columns, rows)


@PROPERTY
@given(tables(filled_edges=True))
def test_a_rendered_table_reads_back_unchanged_without_outer_pipes(table):
    columns, rows = table
    assume(not columns[0].startswith("\ufeff"))  # at the very start of the text it is a byte-order mark
    assert_read_back(parse_description(render_table(columns, rows, outer_pipes=False)), columns, rows)


@PROPERTY
@given(tables())
def test_a_rendered_table_reads_back_unchanged_without_a_delimiter_row(table):
    columns, rows = table
    text = "\n".join(render(line) for line in [columns, *rows])
    assert_read_back(parse_description(text), columns, rows)


NUMBER_HEADERS = ["№", "#", "No.", "N", "Number", "Номер", "№ п/п"]
STEP_HEADERS = ["Step", "Action", "Наименование действия", "Действие", "Шаг"]
ROLE_HEADERS = ["Role", "Swimlane", "Роль", "Исполнитель", "Actor"]


@PROPERTY
@given(
    st.sampled_from(NUMBER_HEADERS),
    st.sampled_from(STEP_HEADERS),
    st.sampled_from(ROLE_HEADERS),
    st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 10**6)), CELL, CELL), min_size=1, max_size=8),
)
def test_numbered_steps_read_back_as_steps(number_header, step_header, role_header, steps):
    rows = [["" if number is None else f"{number}.", step, role] for number, step, role in steps]
    columns = [number_header.upper(), f" {step_header.lower()} ", role_header]
    table = parse_description(render_table(columns, rows))
    assert table.steps == tuple(Step(number, row[1], row[2]) for (number, _, _), row in zip(steps, rows, strict=True))


@PROPERTY
@given(st.one_of(st.text(), st.text(st.sampled_from("|-: \\\n\r\tab1№#\ud800"), max_size=300)))
def test_any_text_parses_into_a_consistent_table_or_raises_structured_error(text):
    try:
        table = parse_description(text)
    except StructuredError as error:
        assert error.reason in {"no_table", "no_rows", "ragged_rows", "too_large"}
        assert str(error) == f"{error.reason}: {error.message}"
        return
    assert table.rows and all(len(row) == len(table.columns) for row in table.rows)
    assert table.steps is None or len(table.steps) == len(table.rows)
    json.dumps(table.as_dict())
