"""The ``--json`` files of evaluate, evaluate-tracking and bench: checked before the run,
written whole (a temporary file renamed), and a failed write is one line, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from livemask.cli import _write_json, app

runner = CliRunner()

#: A folder that exists but where no file can be made, for root too (chmod does not stop
#: root): procfs.
UNWRITABLE = Path("/proc/self")


def _flat(output: str) -> str:
    """CLI output with rich's box drawing and line wrapping undone."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="needs Linux procfs")
@pytest.mark.parametrize("args", [
    ["evaluate-tracking", "--frames", "3", "--truth-labels"],
    ["evaluate", "--model", "nuclei_classical", "-n", "1"],
    ["bench", "--size", "64", "--frames", "2", "--exposure-ms", "1"],
])
def test_unwritable_json_is_refused_before_the_run(args: list[str]) -> None:
    # before: the whole run, then a PermissionError traceback (exit 1)
    target = UNWRITABLE / "livemask-result.json"
    result = runner.invoke(app, [*args, "--json", str(target)])
    assert result.exit_code == 2, result.output
    out = _flat(result.output)
    assert "Invalid value for '--json'" in out
    assert f"cannot write in its folder {UNWRITABLE}" in out and "choose a writable file" in out
    assert isinstance(result.exception, SystemExit)  # (not an OSError out of the command)


def test_json_is_written_whole_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "new" / "t.json"
    result = runner.invoke(app, ["evaluate-tracking", "--frames", "3", "--truth-labels",
                                 "--json", str(target)])
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text())["segmentation"] == "truth labels"
    assert [p.name for p in target.parent.iterdir()] == ["t.json"]  # no .check/.tmp left


def test_a_failed_write_is_one_line_and_keeps_no_half_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the folder checked at the start, then the path taken by a folder during the run
    target = tmp_path / "r.json"
    target.mkdir()
    (target / "inside").write_text("x")
    with pytest.raises(typer.Exit) as info:
        _write_json(target, {"f1": 1.0})
    assert info.value.exit_code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: cannot write --json {target}: " in err
    assert err.endswith("choose a writable file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # the temporary removed


def test_a_symlink_or_fifo_is_written_through_not_replaced(tmp_path: Path) -> None:
    """Review: the atomic write replaced a symlink (its target kept the old results) and a
    FIFO or device node such as /dev/null with a regular file."""
    import os
    import threading

    real = tmp_path / "real"
    real.mkdir()
    (real / "results.json").write_text('{"old": 1}')
    link = tmp_path / "link.json"
    link.symlink_to(real / "results.json")
    _write_json(link, {"new": 2})
    assert link.is_symlink() and json.loads((real / "results.json").read_text()) == {"new": 2}
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    _write_json(fifo, {"piped": 3})
    reader.join(10)
    assert json.loads(got[0]) == {"piped": 3} and not fifo.is_file()
