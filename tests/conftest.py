"Shared paths and helpers for the tests."

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
NOTEBOOKS = REPO / "notebooks"


def run_python(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    "Run `python <args>` with this interpreter; capture its output."
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def photos() -> list[Path]:
    "Every photo shipped in images/."
    return sorted(p for p in IMAGES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
