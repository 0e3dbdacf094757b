"""Evaluating on the user's own images: how mask files are read and refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from livemask.evaluation import load_folder


def _pair(tmp_path: Path, mask: np.ndarray) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    tifffile.imwrite(images / "a.tif", np.full(mask.shape[-2:], 100, np.uint16))
    tifffile.imwrite(masks / "a_masks.tif", mask, photometric="minisblack")
    return images, masks


def test_integer_labels_and_binary_masks_are_read(tmp_path: Path) -> None:
    labels = np.zeros((32, 32), np.uint16)
    labels[2:8, 2:8], labels[20:30, 20:30] = 1, 7
    ((_, mask),) = load_folder(*_pair(tmp_path, labels))
    assert mask.dtype == np.int32 and set(np.unique(mask)) == {0, 1, 7}
    binary = (labels > 0).astype(np.float32)  # two blobs, one value: its components
    ((_, mask),) = load_folder(*_pair(tmp_path / "b", binary))
    assert mask.max() == 2


@pytest.mark.parametrize(("mask", "needle"), [
    # before: truncated to 0 by astype(int32): F1 0.000 without a word
    (np.array([[0, 0.5], [0.9, 0.25]] * 8, np.float32).repeat(8, 1), "fractional values"),
    (np.array([[0, -1], [2, 3]] * 8, np.int16).repeat(8, 1), "negative labels"),
    (np.zeros((3, 16, 16), np.uint16), "has shape (3, 16, 16)"),
])
def test_masks_that_are_no_instance_labels_are_refused(
    tmp_path: Path, mask: np.ndarray, needle: str
) -> None:
    with pytest.raises(ValueError) as info:
        load_folder(*_pair(tmp_path, mask))
    assert "a_masks.tif" in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("name", ["a_masks.tif", "a_masks.png"])
def test_a_corrupt_mask_file_is_named(tmp_path: Path, name: str) -> None:
    images, masks = _pair(tmp_path, np.zeros((16, 16), np.uint16))
    (masks / "a_masks.tif").unlink()
    (masks / name).write_bytes(b"neither a TIFF nor a PNG" + bytes(64))
    with pytest.raises(ValueError, match=rf"{name} cannot be read as an image"):
        load_folder(images, masks)
