"""Issue 25's CI note: `nox -s tests` runs hypothesis derandomized (the same examples on every fresh clone)."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]


def _session_env(name: str) -> dict[str, str]:
    """The ``env`` a nox session passes to pytest, read from noxfile.py."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    (session,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    for node in ast.walk(session):
        if isinstance(node, ast.keyword) and node.arg == "env":
            return ast.literal_eval(node.value)
    raise AssertionError(f"nox session {name} passes no env")


def test_the_tests_session_runs_hypothesis_derandomized() -> None:
    ci = settings.get_profile(_session_env("tests")["HYPOTHESIS_PROFILE"])
    assert ci.derandomize
    assert ci.database is None


def test_the_fuzz_session_explores_with_random_seeds_and_more_examples() -> None:
    fuzz = settings.get_profile(_session_env("fuzz")["HYPOTHESIS_PROFILE"])
    ci = settings.get_profile(_session_env("tests")["HYPOTHESIS_PROFILE"])
    assert not fuzz.derandomize
    assert fuzz.max_examples > ci.max_examples
