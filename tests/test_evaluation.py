"""Evaluating on the user's own images: how mask files are read and refused."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from livemask.evaluation import folder_pairs, load_folder, write_card
from livemask.offline import read_stack


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


def _write(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


def _propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let caplog see the livemask logger even after setup_logging stopped propagation."""
    monkeypatch.setattr(logging.getLogger("livemask"), "propagate", True)


def _two_objects(dtype: type = np.uint16) -> np.ndarray:
    labels: np.ndarray = np.zeros((32, 32), dtype)
    labels[2:8, 2:8], labels[20:30, 20:30] = 1, 2
    return labels


def test_images_and_masks_in_one_folder_are_paired_not_each_with_itself(
    tmp_path: Path,
) -> None:
    # before: img0.tif -> img0.tif and img0_mask.tif -> img0_mask.tif (F1 0.28, no warning)
    folder = tmp_path / "data"
    img = _write(folder / "img0.tif", np.full((32, 32), 100, np.uint16))
    mask = _write(folder / "img0_mask.tif", _two_objects())
    _write(folder / "img1.tif", np.full((32, 32), 100, np.uint16))  # no mask: skipped
    assert folder_pairs(folder, folder) == [(img, mask)]


def test_one_folder_of_images_all_named_like_masks_says_why_nothing_pairs(
    tmp_path: Path,
) -> None:
    """brain_seg.tif is taken for a mask when images and masks share a folder (review):
    the error says so instead of only "no pairs"."""
    folder = tmp_path / "data"
    _write(folder / "brain_seg.tif", np.full((32, 32), 100, np.uint16))
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) named like masks are not taken"):
        folder_pairs(folder, folder)


def test_a_mask_of_the_same_name_in_another_folder_still_pairs(tmp_path: Path) -> None:
    img = _write(tmp_path / "i" / "a.tif", np.full((32, 32), 100, np.uint16))
    mask = _write(tmp_path / "m" / "a.tif", _two_objects())
    assert folder_pairs(img.parent, mask.parent) == [(img, mask)]


@pytest.mark.parametrize(("image", "mask"), [
    ("img0.TIF", "img0_mask.TIF"),  # before: "no mask ... skipped"
    ("IMG0.tif", "img0_Mask.tiff"),
    ("img0.ome.tif", "img0_mask.ome.tif"),  # before: stem "img0.ome" found no mask
    ("img0.ome.tif", "img0_mask.tif"),
    ("img0.jpg", "img0_mask.tif"),  # before: JPEG images were ignored
])
def test_mask_names_match_case_insensitively_with_ome_and_jpeg(
    tmp_path: Path, image: str, mask: str
) -> None:
    image_path = tmp_path / "i" / image
    image_path.parent.mkdir()
    if image.endswith(".jpg"):
        from skimage import io

        io.imsave(image_path, np.full((32, 32), 100, np.uint8), check_contrast=False)
    else:
        _write(image_path, np.full((32, 32), 100, np.uint16))
    mask_path = _write(tmp_path / "m" / mask, _two_objects())
    assert folder_pairs(image_path.parent, mask_path.parent) == [(image_path, mask_path)]
    ((_, labels),) = load_folder(image_path.parent, mask_path.parent)
    assert labels.max() == 2


def test_a_jpeg_mask_is_not_used_and_the_warning_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _propagate(monkeypatch)
    from skimage import io

    _write(tmp_path / "i" / "a.tif", np.full((32, 32), 100, np.uint16))
    (tmp_path / "m").mkdir()
    io.imsave(tmp_path / "m" / "a_mask.jpg", _two_objects(np.uint8), check_contrast=False)
    with pytest.raises(FileNotFoundError, match=r"no image/mask pairs"):
        folder_pairs(tmp_path / "i", tmp_path / "m")
    assert "a_mask.jpg is a JPEG" in caplog.text


def test_uint32_ids_beyond_int32_are_renumbered_not_wrapped(tmp_path: Path) -> None:
    # before: cast to int32 wrapped them negative ("labels must be >= 0", no file named)
    labels = _two_objects(np.uint32)
    labels[labels > 0] += 3_000_000_000
    ((_, mask),) = load_folder(*_pair(tmp_path, labels))
    assert mask.dtype == np.int32 and set(np.unique(mask)) == {0, 1, 2}
    assert np.array_equal(mask > 0, labels > 0)


def test_two_labels_without_background_are_two_objects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _propagate(monkeypatch)
    # before: {1, 2} counted as a binary mask and merged into one object
    labels = np.ones((32, 32), np.uint16)
    labels[:, 16:] = 2
    ((_, mask),) = load_folder(*_pair(tmp_path, labels))
    assert set(np.unique(mask)) == {1, 2} and (mask[:, 16:] == 2).all()
    assert "no background" in caplog.text


def test_write_card_leaves_the_old_card_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: written in place, so an interrupt left half a card
    card = tmp_path / "m.yaml"
    write_card(card, {"name": "m", "version": "1"})
    old = card.read_text()

    def half_then_interrupt(self: Path, text: str, *args: object, **kwargs: object) -> int:
        with open(self, "w", encoding="utf-8") as f:
            f.write(text[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_card(card, {"name": "m", "version": "2"})
    monkeypatch.undo()
    assert card.read_text() == old and [p.name for p in tmp_path.iterdir()] == ["m.yaml"]


@pytest.mark.parametrize("other", ["a.ome.tif", "A.png"])
def test_two_images_of_one_mask_are_refused_naming_both(tmp_path: Path, other: str) -> None:
    # before: both were paired with masks/a.tif, and the annotation was scored twice
    _write(tmp_path / "i" / "a.tif", np.full((32, 32), 100, np.uint16))
    if other.endswith(".png"):
        from skimage import io

        io.imsave(tmp_path / "i" / other, np.full((32, 32), 100, np.uint8), check_contrast=False)
    else:
        _write(tmp_path / "i" / other, np.full((32, 32), 100, np.uint16))
    _write(tmp_path / "m" / "a.tif", _two_objects())
    with pytest.raises(ValueError, match=rf"images {other} and a\.tif in .* both pair with "
                       r"the mask .*a\.tif, which would be scored twice"):
        folder_pairs(tmp_path / "i", tmp_path / "m")


@pytest.mark.parametrize(("image", "kwargs"), [
    (np.full((1, 32), 100, np.uint16), {"photometric": "minisblack"}),  # before: scored
    (np.full((32, 32, 3), 100, np.uint8), {"photometric": "rgb"}),  # before: averaged
    (np.full((32, 32), 1 + 1j, np.complex64), {}),
])
def test_images_get_the_checks_of_segment(
    tmp_path: Path, image: np.ndarray, kwargs: dict[str, Any]
) -> None:
    img = tmp_path / "i" / "a.tif"
    img.parent.mkdir()
    tifffile.imwrite(img, image, **kwargs)
    _write(tmp_path / "m" / "a.tif", np.zeros(image.shape[:2], np.uint16))
    with pytest.raises(ValueError) as segment_says:
        read_stack(img)
    with pytest.raises(ValueError) as evaluate_says:
        load_folder(img.parent, tmp_path / "m")
    assert str(evaluate_says.value) == str(segment_says.value)


def test_an_image_stack_is_refused_naming_the_file(tmp_path: Path) -> None:
    img = _write(tmp_path / "i" / "a.tif", np.full((2, 32, 32), 100, np.uint16))
    _write(tmp_path / "m" / "a.tif", _two_objects())
    with pytest.raises(ValueError, match=r"a\.tif has shape \(2, 32, 32\); evaluate takes one "
                       r"2-D image"):
        load_folder(img.parent, tmp_path / "m")


@pytest.mark.parametrize("one_folder", [False, True])
def test_hidden_files_are_neither_images_nor_masks(tmp_path: Path, one_folder: bool) -> None:
    # before: macOS's ._a.tif (AppleDouble, not a TIFF) paired with ._a.tif / ._a_masks.tif
    # and stopped the evaluation ("cannot be read as an image")
    images = tmp_path / "i"
    masks = images if one_folder else tmp_path / "m"
    mask_name = "a_masks.tif" if one_folder else "a.tif"
    _write(images / "a.tif", np.full((32, 32), 100, np.uint16))
    _write(masks / mask_name, _two_objects())
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)
    for folder, name in ((images, "a.tif"), (masks, mask_name)):
        (folder / f"._{name}").write_bytes(apple_double)
    (images / ".DS_Store").write_bytes(bytes(16))
    assert folder_pairs(images, masks) == [(images / "a.tif", masks / mask_name)]
    ((image, mask),) = load_folder(images, masks)
    assert image.shape == mask.shape == (32, 32) and mask.max() == 2


def test_a_mask_without_objects_is_not_called_binary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _propagate(monkeypatch)
    # before: "mask ... is binary; using its connected components" for an all-zero mask
    ((_, mask),) = load_folder(*_pair(tmp_path, np.zeros((32, 32), np.uint16)))
    assert mask.dtype == np.int32 and not mask.any()
    assert "binary" not in caplog.text
    assert "holds no objects (every pixel is 0)" in caplog.text


@pytest.mark.parametrize("lead", [(1,), (1, 1)])
def test_a_single_plane_with_leading_axes_of_one_is_one_plane(
    tmp_path: Path, lead: tuple[int, ...]
) -> None:
    # before: a (1, H, W) mask or image was refused as not 2-D although it is one plane
    labels = _two_objects()
    images, masks = _pair(tmp_path, labels.reshape(*lead, 32, 32))
    tifffile.imwrite(images / "a.tif", np.full((*lead, 32, 32), 100, np.uint16),
                     photometric="minisblack")
    assert tifffile.imread(masks / "a_masks.tif").shape == (*lead, 32, 32)
    ((image, mask),) = load_folder(images, masks)
    assert image.shape == (32, 32)
    np.testing.assert_array_equal(mask, labels)


def test_evaluate_scores_the_labels_segment_gives_on_nan_pixels(tmp_path: Path) -> None:
    """segment drops objects mostly on NaN pixels (docs/models.md); evaluate scored the
    model's labels without that: 45 objects against segment's 38, precision 0.84 for labels
    that score 1.00 (offline hunt)."""
    from livemask.acquisition.simulated.nuclei import NucleiSample
    from livemask.analysis.metrics import match_instances
    from livemask.evaluation import evaluate
    from livemask.offline import load_segmenter

    rendered = NucleiSample(seed=3).render((0.0, 0.0), (256, 256), exposure_ms=10.0)
    image = rendered.image.astype(np.float32)
    image[:, 100:140] = np.nan  # a registration border
    truth = rendered.labels.copy()
    truth[:, 100:140] = 0
    segmenter = load_segmenter("nuclei")
    got = evaluate(segmenter, [(image, truth)], "nan").score
    want = match_instances(truth, segmenter.segment(image), iou_threshold=0.5)
    assert (got.tp, got.fp, got.fn) == (want.tp, want.fp, want.fn)
    assert got.fp == 0  # the objects on the NaN column are not counted against it


def test_a_mask_of_another_size_names_both_files(tmp_path: Path) -> None:
    img, masks = tmp_path / "img", tmp_path / "masks"
    img.mkdir()
    masks.mkdir()
    tifffile.imwrite(img / "x.tif", np.zeros((64, 64), np.uint16))
    tifffile.imwrite(masks / "x.tif", np.zeros((50, 64), np.uint16))
    with pytest.raises(ValueError, match=rf"image {img / 'x.tif'} \(64, 64\) and its mask "
                       rf"{masks / 'x.tif'} \(50, 64\) differ in size"):
        load_folder(img, masks)
