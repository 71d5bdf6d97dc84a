"""ruff finds nothing in the package, the tests, the notebooks or the benchmarks."""

from conftest import REPO, run_python


def test_ruff_is_clean():
    result = run_python("-m", "ruff", "check", "nanopali", "tests", "notebooks", "benchmarks", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
