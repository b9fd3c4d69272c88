"""The pins every make venv is installed with (constraints/, written by ``make constraints``).

A pin that falls outside a range of pyproject.toml would make ``uv pip install`` refuse to
resolve on a fresh clone, with an error that does not say which file to regenerate; these tests
say it before CI does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "constraints").glob("*.txt"))
NAME = re.compile(r"(?P<kind>airflow|system)-(?P<airflow>\d+\.\d+\.\d+)-py(?P<python>\d+\.\d+)\.txt")
#: the installers are not pinned: uv would apply the pins to the project's own build environment
TOOLING = {"pip", "setuptools", "uv", "wheel"}


def pins(path: Path) -> dict[str, str]:
    pinned = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, separator, version = line.partition("==")
        assert separator and name and version and " " not in line, f"{path.name}: not a name==version pin: {line!r}"
        pinned[canonicalize_name(name)] = version
    return pinned


def requirements(kind: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = ["test"] + (["system"] if kind == "system" else [])
    texts = project["dependencies"] + [text for extra in extras for text in project["optional-dependencies"][extra]]
    return [Requirement(text) for text in texts]


def test_there_are_pins_for_the_releases_ci_runs():
    names = {path.name for path in FILES}
    for version in ("3.0.0", "3.1.8", "3.2.2", "3.3.2"):
        assert f"airflow-{version}-py3.11.txt" in names
    assert "system-3.3.2-py3.11.txt" in names


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_each_file_pins_its_airflow_release_within_the_project_ranges(path):
    match = NAME.fullmatch(path.name)
    assert match, f"{path.name}: name it (airflow|system)-<airflow version>-py<python version>.txt"
    pinned = pins(path)
    assert pinned.get("apache-airflow") == match["airflow"]
    assert "airflow-provider-fal" not in pinned  # the project itself is installed from the clone
    assert not TOOLING & pinned.keys()
    for requirement in requirements(match["kind"]):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{path.name} does not pin {name}, which pyproject.toml asks for: make constraints"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{path.name} pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}: make constraints"
        )
