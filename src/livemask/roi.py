"""A rectangle of an image to analyse (``livemask segment --roi``): e.g. a micrograph
without its SEM data bar."""

from __future__ import annotations

from dataclasses import dataclass

#: How a region is written: Fiji's ``makeRectangle`` and Micro-Manager's ``setROI`` order.
ROI_FORMAT = "X,Y,WIDTH,HEIGHT"


@dataclass(frozen=True)
class Roi:
    """A rectangle in pixels: ``x``, ``y`` of its top-left pixel (column, row) and its
    ``width`` and ``height``."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Roi:
        """``"X,Y,WIDTH,HEIGHT"`` (whole pixels); ValueError saying what is wrong."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4:
            raise ValueError(f"{text!r} is not {ROI_FORMAT} (four whole numbers of pixels, "
                             "e.g. 0,0,1024,880 for the top 880 rows of a 1024-wide image)")
        try:
            x, y, width, height = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"{text!r}: {ROI_FORMAT} must be whole numbers of pixels") from None
        if x < 0 or y < 0:
            raise ValueError(f"{text!r}: X and Y (the top-left pixel) must be >= 0")
        if width < 2 or height < 2:
            raise ValueError(f"{text!r}: WIDTH and HEIGHT must be at least 2 px")
        return cls(x, y, width, height)

    def check(self, shape: tuple[int, int]) -> None:
        """ValueError if the rectangle reaches outside an image of ``shape`` (rows, columns)."""
        rows, cols = shape
        if self.x + self.width > cols or self.y + self.height > rows:
            raise ValueError(
                f"--roi {self}: reaches outside the image of {cols} x {rows} px (width x "
                f"height): X + WIDTH must be <= {cols} and Y + HEIGHT <= {rows}")

    @property
    def slices(self) -> tuple[slice, slice]:
        """The rows and columns of the rectangle, to index an image's last two axes."""
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)

    def as_dict(self) -> dict[str, int]:
        """JSON-friendly: ``x``, ``y``, ``width``, ``height``."""
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height}

    def __str__(self) -> str:
        return f"{self.x},{self.y},{self.width},{self.height}"
