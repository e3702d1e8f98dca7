"""Running the command line in-process and checking its one-line user errors (shared by the
CLI error tests and the re-ranking tests)."""

import pytest

from fastalign.cli import main


def run_main(capsys, *argv: str) -> tuple[int, list[str]]:
    """main(argv): its exit code and the lines it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def one_error_line(lines: list[str], command: str, *names: str) -> None:
    """``lines`` hold one ``fastalign COMMAND: error: ...`` line naming every one of
    ``names``, and no traceback."""
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines
    assert errors[0].startswith(f"fastalign {command}: error: "), errors[0]
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert not any("Traceback" in line for line in lines), lines
