"""Where trained models are written: checked first, staged, moved into place at the end."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from livemask.errors import ConfigError
from livemask.inference import models

log = logging.getLogger("livemask")


def check_output_folder(out: Path, *, force: bool = False) -> Path:
    """``out``, made if missing; ConfigError (naming ``--out``) for the shipped models folder
    unless ``force``, or for a folder that cannot be made."""
    out = Path(out)
    if not force and _is_models_dir(out):
        raise ConfigError(
            f"--out {out} is the shipped models folder ({models.MODELS_DIR}); training there "
            "overwrites the shipped model: give another --out (e.g. runs/TASK) and copy "
            "the files over, or add --force"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot make the folder: {exc}") from None
    if not out.is_dir():
        raise ConfigError(f"--out {out} is not a folder; give a folder")
    try:  # found now, not after a training run of up to an hour
        probe, name = tempfile.mkstemp(prefix=".livemask-write-test-", dir=out)
        os.close(probe)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there: {exc}; give another --out") from None
    return out


def _is_models_dir(out: Path) -> bool:
    try:
        return out.resolve() == models.MODELS_DIR.resolve()
    except OSError:
        return False


STAGE_PREFIX = ".livemask-train-"


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out``'s files; its files replace those in ``out`` only
    when the block ends without an error (an interrupted run leaves ``out`` untouched).

    The folder's name holds the process id and the host; those a killed run of this host
    left (SIGKILL, a power cut) are removed when the next run starts.
    """
    remove_abandoned_stages(out)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}@{_host()}-", dir=out))
    try:
        yield stage
        for path in sorted(stage.iterdir(), key=lambda p: p.suffix in (".yaml", ".yml")):
            os.replace(path, out / path.name)  # the card last: it points at the rest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_abandoned_stages(out: Path) -> list[Path]:
    """Remove the stage folders in ``out`` whose training process, on this host, no longer
    runs (a shared folder's stages of other hosts are left alone)."""
    removed = []
    for stage in out.glob(f"{STAGE_PREFIX}*@{_host()}-*"):
        pid = stage.name.removeprefix(STAGE_PREFIX).split("@", 1)[0]
        if stage.is_dir() and pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
    if removed:
        log.info("removed %d folder(s) left by interrupted training runs in %s",
                 len(removed), out)
    return removed


def _host() -> str:
    """This machine's name, as a file name can hold it."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname())


def _process_exists(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send a Ctrl-C there: keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else (PermissionError)
        return True
    return True


def shipped_settings(name: str) -> dict[str, Any]:
    """``version``, ``normalization`` and ``postprocessing`` of the shipped card ``name``,
    so that a retrained model runs with the settings the shipped one was measured with."""
    card = models.load_model_card(name)
    return {
        "version": card.version,
        "normalization": card.normalization.model_dump(exclude_none=True),
        "postprocessing": card.postprocessing.model_dump(exclude_none=True),
    }
