"""Every lesson ends with exercises; each has a check, and a worked solution that passes it.

The lessons (stub unfilled) and the solution notebooks (`notebooks/solutions/`) both run under nbval
with the rest of the course, so their stored "not done yet" and "correct" lines are re-checked on every
run. Here: the structure around them, and the shared check wrapper. Each lesson's test file shows that
its checks refuse wrong answers."""

import json
import re

import pytest

from nanopali.exercises import exercise
from nanopali.export import lesson_notebooks

from conftest import NOTEBOOKS

LESSONS = lesson_notebooks(NOTEBOOKS)
SOLUTIONS = NOTEBOOKS / "solutions"
HEADING = re.compile(r"^### Exercise (\d+)\.(\d+)\b", re.M)


def cells(notebook):
    return json.loads(notebook.read_text())["cells"]


def exercise_numbers(notebook):
    return [f"{int(a)}.{b}" for c in cells(notebook) if c["cell_type"] == "markdown"
            for a, b in HEADING.findall("".join(c["source"]))]


def printed(cell):
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.parametrize("notebook", LESSONS, ids=[n.name for n in LESSONS])
def test_each_lesson_ends_with_at_least_two_exercises(notebook):
    numbers = exercise_numbers(notebook)
    lesson = int(notebook.name[:2])
    assert len(numbers) >= 2, f"{notebook.name}: {numbers}"
    assert numbers == [f"{lesson}.{k}" for k in range(1, len(numbers) + 1)], numbers
    headings = ["".join(c["source"]).splitlines()[0] for c in cells(notebook) if c["cell_type"] == "markdown"]
    assert "## Exercises" in headings, "exercises go under a '## Exercises' heading"


@pytest.mark.parametrize("notebook", LESSONS, ids=[n.name for n in LESSONS])
def test_unfilled_stubs_report_not_done_yet_in_the_lesson(notebook):
    "The lesson is stored with every stub unfilled: each exercise's check says 'not done yet', none says 'correct'."
    out = "".join(printed(c) for c in cells(notebook) if c["cell_type"] == "code")
    for number in exercise_numbers(notebook):
        assert f"Exercise {number}: not done yet" in out, number
        assert f"Exercise {number}: correct" not in out, number


@pytest.mark.parametrize("notebook", LESSONS, ids=[n.name for n in LESSONS])
def test_every_exercise_has_a_solution_that_passes_its_check(notebook):
    solution = SOLUTIONS / notebook.name
    assert solution.exists(), f"no solutions notebook {solution.relative_to(NOTEBOOKS.parent)}"
    assert exercise_numbers(solution) == exercise_numbers(notebook)
    out = "".join(printed(c) for c in cells(solution) if c["cell_type"] == "code")
    for number in exercise_numbers(notebook):
        assert f"Exercise {number}: correct" in out, number
        assert f"Exercise {number}: not" not in out, number


def test_solution_notebooks_come_from_one_clean_run():
    for solution in sorted(SOLUTIONS.glob("*.ipynb")):
        counts = [c["execution_count"] for c in cells(solution) if c["cell_type"] == "code"]
        assert counts == list(range(1, len(counts) + 1)), solution.name


@exercise("0.1")
def _check_square(square):
    for x in (0, 3, -2):
        assert square(x) == x * x, f"square({x}) gave {square(x)}, expected {x * x}"
    return "square(x) == x * x for 0, 3 and -2"


def _stub(x):
    raise NotImplementedError("fill in square")


@pytest.mark.parametrize(("answer", "line", "result"), [
    (_stub, "Exercise 0.1: not done yet. Fill in the stub above", False),
    (lambda x: x + x, "Exercise 0.1: not right yet: square(3) gave 6, expected 9", False),
    (lambda x: x / 0, "Exercise 0.1: not right yet: your code raised ZeroDivisionError: division by zero", False),
    (lambda x: x * x, "Exercise 0.1: correct: square(x) == x * x for 0, 3 and -2", True),
])
def test_the_check_wrapper_prints_one_plain_line(capsys, answer, line, result):
    assert bool(_check_square(answer)) is result
    out = capsys.readouterr().out
    assert out.startswith(line) and out.count("\n") == 1, out
