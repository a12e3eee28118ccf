"""pyproject.toml's lower bounds are the versions .ci/run tests them with (.ci/floors.txt)."""

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
BOUND = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)\s*(?:;.*)?$")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lower_bounds() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    bounds = {}
    for requirement in requirements:
        if m := BOUND.match(requirement.strip()):
            bounds.setdefault(_name(m[1]), set()).add(m[2])
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    return pins


def test_every_lower_bound_is_the_version_ci_tests():
    bounds, pins = _lower_bounds(), _pins()
    assert {"jax", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets"} <= bounds.keys()  # the parse found them
    for name, versions in bounds.items():
        if name == "tensorflow":  # the build for machines that are not x86-64: CI tests tensorflow-cpu
            assert versions == bounds["tensorflow-cpu"], name
            continue
        assert name in pins, f"pyproject.toml bounds {name} from below, but .ci/floors.txt does not pin it"
        assert versions == {pins[name]}, f"{name}: pyproject.toml says >= {versions}, .ci/floors.txt tests {pins[name]}"
    # jaxlib is jax's, at jax's version; everything else pinned there is bounded in pyproject.toml.
    assert pins["jaxlib"] == pins["jax"]
    assert set(pins) - {"jaxlib"} <= set(bounds), set(pins) - {"jaxlib"} - set(bounds)
