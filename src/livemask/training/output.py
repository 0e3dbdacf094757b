"""Where trained models are written: checked first, staged, moved into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from livemask.errors import ConfigError
from livemask.inference import models


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


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out``'s files; its files replace those in ``out`` only
    when the block ends without an error (an interrupted run leaves ``out`` untouched)."""
    stage = Path(tempfile.mkdtemp(prefix=".livemask-train-", dir=out))
    try:
        yield stage
        for path in sorted(stage.iterdir(), key=lambda p: p.suffix in (".yaml", ".yml")):
            os.replace(path, out / path.name)  # the card last: it points at the rest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def shipped_settings(name: str) -> dict[str, Any]:
    """``version``, ``normalization`` and ``postprocessing`` of the shipped card ``name``,
    so that a retrained model runs with the settings the shipped one was measured with."""
    card = models.load_model_card(name)
    return {
        "version": card.version,
        "normalization": card.normalization.model_dump(exclude_none=True),
        "postprocessing": card.postprocessing.model_dump(exclude_none=True),
    }
