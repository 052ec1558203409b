"""Helpers shared by the command-line tests (imported as a plain module: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from xraypose.cli import app


def invoke(*args: object) -> Result:
    """Run ``xraypose ARGS…`` in-process and return typer's result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result: Result, *needles: str) -> None:
    """Exit status 2, one ``error:`` line naming the problem (every needle), nothing else, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
