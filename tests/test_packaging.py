"""pyproject.toml's lower bounds are the versions .ci/run tests them with (.ci/floors.txt)."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _lower_bounds() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    bounds = {}
    for requirement in map(Requirement, requirements):
        for spec in requirement.specifier:
            # Only ">=" bounds from below: another operator would be a floor this test cannot read.
            assert spec.operator in (">=", "<", "<=", "!="), f"{requirement}: use >= for a lower bound"
            if spec.operator == ">=":
                bounds.setdefault(canonicalize_name(requirement.name), set()).add(spec.version)
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        if line := line.split("#")[0].strip():
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
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
