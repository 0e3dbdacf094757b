"""Touching frame-sized memory at service start (livemask.service.prefault)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livemask.acquisition.replay import ReplaySource, ReplayStack
from livemask.config import parse_config
from livemask.errors import ConfigError
from livemask.service.app import Service
from livemask.service.prefault import prefault_frame_memory
from tests.conftest import make_config
from tests.test_pipeline import RecordingSource


def test_prefault_allocates_the_frames_asked_for() -> None:
    done = prefault_frame_memory((64, 48), 3)
    assert (done.frames, done.bytes) == (3, 3 * 64 * 48 * 4)
    assert done.seconds >= 0
    assert prefault_frame_memory((64, 48), 0).bytes == 0


@pytest.mark.parametrize(("shape", "frames"), [((64, 48), -1), ((0, 48), 2)])
def test_prefault_rejects_bad_arguments(shape: tuple[int, int], frames: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        prefault_frame_memory(shape, frames)


def test_prefault_frames_is_validated() -> None:
    assert parse_config({}).pipeline.prefault_frames == 8
    assert parse_config({"pipeline": {"prefault_frames": 0}}).pipeline.prefault_frames == 0
    for bad in (-1, 65):
        with pytest.raises(ConfigError, match=r"pipeline\.prefault_frames"):
            parse_config({"pipeline": {"prefault_frames": bad}})


async def test_service_prefaults_frames_of_the_cameras_shape() -> None:
    cfg = make_config(simulation={"sensor_shape_px": [96, 128]}, pipeline={"prefault_frames": 3})
    async with Service(cfg) as svc:
        assert svc.prefault is not None
        assert svc.prefault.frames == 3
        assert svc.prefault.bytes == 3 * 96 * 128 * 4
        assert svc.source is not None
        assert svc.source.frame_shape == (96, 128)  # type: ignore[attr-defined]


async def test_service_prefaults_frames_of_a_replayed_stacks_shape() -> None:
    """The source's frame size wins over the configured sensor size."""
    stack = ReplayStack(path=Path("stack.tif"), kind="tiff", frames=1, shape=(30, 20),
                        dtype=np.dtype(np.uint16), plane=lambda i: np.zeros((30, 20), np.uint16))
    cfg = make_config(simulation={"sensor_shape_px": [96, 128]}, pipeline={"prefault_frames": 2})
    async with Service(cfg, source=ReplaySource(stack)) as svc:
        assert svc.prefault is not None and svc.prefault.bytes == 2 * 30 * 20 * 4


async def test_service_can_leave_memory_alone() -> None:
    async with Service(make_config(pipeline={"prefault_frames": 0})) as svc:
        assert svc.prefault is not None and svc.prefault.bytes == 0


class _NoCameraSource(RecordingSource):
    """A source whose camera cannot tell its image size (no camera, or it raises)."""

    def __init__(self, shape: tuple[int, int] | None) -> None:
        super().__init__()
        self._shape = shape

    @property
    def frame_shape(self) -> tuple[int, int]:
        if self._shape is None:
            raise RuntimeError("no camera device loaded")
        return self._shape


@pytest.mark.parametrize("shape", [None, (0, 0)])
async def test_service_falls_back_to_the_configured_sensor_size(
    shape: tuple[int, int] | None,
) -> None:
    cfg = make_config(simulation={"sensor_shape_px": [40, 56]}, pipeline={"prefault_frames": 2})
    async with Service(cfg, source=_NoCameraSource(shape)) as svc:
        assert svc.prefault is not None and svc.prefault.bytes == 2 * 40 * 56 * 4


def test_prefault_touches_fewer_frames_where_they_would_not_fit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A camera (or replayed image) larger than the configured sensor: the frames touched
    at start stay within the limit the service gives (half the machine's memory)."""
    frame = 64 * 48 * 4
    with caplog.at_level("WARNING", logger="livemask"):
        done = prefault_frame_memory((64, 48), 8, limit_bytes=3 * frame + 10)
    assert (done.frames, done.bytes) == (3, 3 * frame)
    assert "touching 3 at start" in caplog.text
    assert prefault_frame_memory((64, 48), 8, limit_bytes=8 * frame).frames == 8
    assert prefault_frame_memory((64, 48), 2, limit_bytes=frame - 1).frames == 0
