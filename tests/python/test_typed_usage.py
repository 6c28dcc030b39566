"""Runs typed_usage.py, which mypy --strict checks against _core.pyi."""

from __future__ import annotations

from typed_usage import T0, exercise


def test_code_typed_against_the_stubs_runs() -> None:
    assert exercise() == [
        True,
        True,
        5,
        2,
        60.0,
        0.0,
        1,
        1,
        True,
        ["1 per 1 second", "1 per 1 hour"],
        True,
        [True, False],
        1,
    ]
    assert T0 > 0
