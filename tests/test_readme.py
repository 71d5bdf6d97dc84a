"""The README's two quick-start commands: CI runs the test one verbatim, and the demo one works."""

import re

from conftest import REPO


def quick_start_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_has_a_demo_and_a_test_command():
    commands = quick_start_commands()
    assert commands[0].endswith('python -m nanopali --image images/scene.png --prompt "what color is the star?" '
                                '--attention-map attention.png')
    assert commands[1].endswith("python -m pytest")
    assert all(c.startswith("python3 -m venv .venv && ") for c in commands[:2])


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci


def test_demo_image_exists():
    assert (REPO / "images" / "scene.png").is_file()


def test_the_quick_start_transcript_is_what_the_demo_prints():
    "The demo's output shown in the README, up to the times, is what the command prints (tests/test_cli.py runs it)."
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    transcript = re.findall(r"```text\n(.*?)```", section, flags=re.S)[0].splitlines()
    assert transcript[3] == "green"
    assert transcript[5] == "  attention map (4 layers x 4 heads, averaged): attention.png"
