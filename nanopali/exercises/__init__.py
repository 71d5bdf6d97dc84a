"""Checks for the lessons' exercises. Hand-written, not exported from a notebook.

Each lesson ends with `## Exercises`. An exercise gives you a stub to fill in (it raises
`NotImplementedError` until you do) and a check cell that calls one of the functions in
`nanopali.exercises.lessonNN` with your code, for example:

    from nanopali.exercises.lesson01 import check_unpatchify
    check_unpatchify(unpatchify)

The check prints one line: "not done yet", "not right yet: <what was wrong>", or "correct:
<what was checked>", and returns a Verdict that is true only when your answer is right. The worked solutions are
in `notebooks/solutions/`; the test suite runs them, so every check is known to accept a
right answer (and `tests/test_exercises.py` shows that it refuses wrong ones).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["Verdict", "exercise"]


class Verdict:
    """What a check returns: true when the answer is right. The check has already printed its one line, so in a
    notebook a Verdict shows nothing more (no bare `True` or `False` under the line)."""

    def __init__(self, correct: bool):
        self.correct = correct

    def __bool__(self) -> bool:
        return self.correct

    def __repr__(self) -> str:
        return f"Verdict(correct={self.correct})"

    def _ipython_display_(self) -> None:  # Jupyter calls this instead of showing the value: nothing to add
        pass


def exercise(number: str) -> Callable:
    """Turn `check(answer, ...)` into a check that prints one plain line and returns a Verdict (true when right).

    Inside `check`, an `assert condition, "what was wrong"` that fails means "not right yet", and
    the string it returns (if any) says what was checked. A stub that still raises
    NotImplementedError means "not done yet"; any other exception your code raises is reported in
    one line (call your function yourself to see the whole traceback)."""

    def wrap(check: Callable) -> Callable:
        @functools.wraps(check)
        def run(*args, **kwargs) -> Verdict:
            try:
                what = check(*args, **kwargs)
            except NotImplementedError:
                print(f"Exercise {number}: not done yet. "
                      "Fill in the stub above, run its cell, then run this one again.")
                return Verdict(False)
            except AssertionError as e:
                print(f"Exercise {number}: not right yet: {str(e).splitlines()[0] if str(e) else 'a check failed'}")
                return Verdict(False)
            except Exception as e:  # the learner's code failed: say how, in one line
                print(f"Exercise {number}: not right yet: your code raised {type(e).__name__}: {e}")
                return Verdict(False)
            print(f"Exercise {number}: correct" + (f": {what}" if what else "."))
            return Verdict(True)

        run.exercise = number
        return run

    return wrap
