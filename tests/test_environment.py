"""pyproject.toml and environment.yml must name the same packages, with the same versions."""

import re
import sys

import yaml
from packaging.requirements import Requirement

from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def normalise(requirements):
    reqs = [Requirement(r) for r in requirements]
    return {(r.name.lower().replace("_", "-"), str(r.specifier), str(r.marker or "")) for r in reqs}


def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def environment_pip_packages():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return [line for line in pip if not line.startswith("-")]  # "-e ." installs nanopali itself


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = pyproject()
    ours = normalise(project["dependencies"]) | normalise(
        [r for extra in project["optional-dependencies"].values() for r in extra])
    assert normalise(environment_pip_packages()) == ours


def test_environment_yml_python_matches_requires_python():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python == ["python" + pyproject()["requires-python"]]


def test_environment_yml_installs_nanopali_itself():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip


def test_runtime_dependencies_are_the_promised_ones():
    names = {Requirement(r).name for r in pyproject()["dependencies"]}
    assert names == {"torch", "numpy", "pillow", "safetensors", "tokenizers", "matplotlib", "tqdm"}


def test_transformers_is_a_test_dependency_only():
    "The model code never imports transformers: it is the reference for the parity tests."
    assert all(Requirement(r).name != "transformers" for r in pyproject()["dependencies"])
    imports = re.compile(r"^\s*(import transformers|from transformers\b)", re.M)
    for module in (REPO / "nanopali").glob("*.py"):
        assert not imports.search(module.read_text()), module.name
