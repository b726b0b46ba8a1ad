"""The project's own files agree with each other: conda and pip list the same dependencies, CI runs the README's
test command, the README holds exactly two set-up commands."""
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].strip().lower()


def test_environment_yml_lists_every_runtime_dependency_with_the_same_bounds():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = {}
    for entry in env["dependencies"]:
        if isinstance(entry, str):
            conda[_name(entry)] = entry.replace(" ", "")
    assert any(isinstance(e, dict) and "-e .[dev,ray]" in e.get("pip", []) for e in env["dependencies"])
    assert conda.get("python", "").startswith("python=3.11")
    for requirement in project["dependencies"]:
        name = _name(requirement)
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in conda, f"{name} is in pyproject.toml but not in environment.yml"
        bound = requirement[len(name):].replace(" ", "")
        assert conda[conda_name] == conda_name + bound, f"{name}: pyproject says {bound}, conda {conda[conda_name]}"
    extra = set(conda) - {CONDA_NAMES.get(_name(r), _name(r)) for r in project["dependencies"]} - {"python", "pip"}
    assert not extra, f"environment.yml has dependencies pyproject.toml lacks: {extra}"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^```(?:bash|sh)?\n(.*?)```", setup, flags=re.S | re.M)
    lines = [line.strip() for block in commands for line in block.strip().splitlines() if line.strip()]
    assert lines == ["make demo", "make test"], lines
    ci = [l.strip() for l in (REPO / ".ci/run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ci[-1] == "make test"


def test_console_script_points_at_the_cli():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["workbench"] == "workbench.cli:main"
    from workbench.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"meta-train", "transfer"} <= set(commands)
