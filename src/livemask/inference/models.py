"""Model cards: what a model file expects and produces, validated with pydantic.

A model is a card (``NAME.yaml``) next to its ONNX file. Shipped models live in the
``livemask.models`` package folder; a user's own model is any card path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from livemask.analysis.boundaries import MIN_EDGE_AREA_PX
from livemask.errors import ModelError
from livemask.protocol import plain_message

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class Normalization(BaseModel):
    """Input normalisation: percentile ``low`` → 0 and ``high`` → 1."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["percentile"] = "percentile"
    low: float = Field(default=1.0, ge=0, lt=100)
    high: float = Field(default=99.8, gt=0, le=100)
    min_span_noise: float | None = Field(
        default=None, gt=0, le=1000,
        description="The span mapped to 0..1 is at least this many times the frame's noise "
        "(robust spread of its pixels), so a nearly empty field is not stretched into "
        "phantom objects; None: percentiles only.")
    clip: list[float] | None = Field(
        default=None, min_length=2, max_length=2,
        description="[low, high]: normalised values are clipped to this range (low <= 0, "
        "high >= 1), so a hot pixel or saturated debris reaches the model at most `high`; "
        "None: no clipping.")
    exclude_saturated: bool = Field(
        default=False, strict=True,
        description="Take the percentiles over the pixels below a saturated plateau (at "
        "least 4 sampled pixels exactly at the frame's maximum), so saturated debris does "
        "not become the top of the range; and where the high percentile is more than 20 "
        "times the median object pixel (both from the low percentile; object pixels: more "
        "than 5 noise levels above the median pixel), take it over the pixels at or below "
        "that level, so bright debris that is not saturated does not either.")

    @model_validator(mode="after")
    def _low_below_high(self) -> Normalization:
        if not self.low < self.high:
            raise ValueError(
                f"low ({self.low:g}) must be below high ({self.high:g}): they are the "
                "percentiles of each frame mapped to 0 and 1; set normalization.low < "
                "normalization.high in the card (default 1.0 and 99.8)"
            )
        if self.clip is not None and not self.clip[0] <= 0.0 < 1.0 <= self.clip[1]:
            raise ValueError(
                f"normalization.clip {self.clip} must keep [0, 1], the range the percentiles "
                "map to: [low, high] with low <= 0 and high >= 1 (e.g. [-1, 3]), or null"
            )
        return self

    @property
    def clip_range(self) -> tuple[float, float] | None:
        """``clip`` as a (low, high) pair, None without clipping."""
        return None if self.clip is None else (self.clip[0], self.clip[1])


#: Output channels each post-processing method reads, and their names.
METHOD_CHANNELS: dict[str, tuple[int, str]] = {
    "seeded-watershed": (2, "foreground, seeds"), "boundary-label": (1, "boundary")}

#: How each method reads the model's channels, in order (for messages).
METHOD_MEANING: dict[str, str] = {
    "seeded-watershed": "channel 0 as the foreground probability (high on objects) and "
    "channel 1 as the seed probability (high only in each object's core)",
    "boundary-label": "its one channel as the boundary probability (high on the lines "
    "between objects, low inside them)",
}

#: Common channel names, by what they mean; ``outputs`` names are only labels, but one of
#: these in the wrong place says the model's channels are not what the method reads.
_CHANNEL_ROLES: dict[str, frozenset[str]] = {
    "foreground": frozenset({"foreground", "fg"}),
    "seeds": frozenset({"seeds", "seed", "cores", "core", "centers", "center", "centres",
                        "centre", "markers", "marker"}),
    "boundary": frozenset({"boundary", "boundaries", "edges", "edge", "contours", "contour"}),
    "background": frozenset({"background", "bg", "backgrounds"}),
}

#: The role each method reads from each channel, in order.
_METHOD_ROLES: dict[str, tuple[str, ...]] = {
    "seeded-watershed": ("foreground", "seeds"), "boundary-label": ("boundary",)}


def _role(name: str) -> str | None:
    """The meaning a channel name plainly states (``Background`` → background), else None."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return next((role for role, names in _CHANNEL_ROLES.items() if key in names), None)


def _misplaced_channels(method: str, outputs: list[str]) -> list[str]:
    """``outputs`` names that plainly mean another channel than ``method`` reads there."""
    wrong = []
    for i, (name, want) in enumerate(zip(outputs, _METHOD_ROLES[method], strict=True)):
        role = _role(name)
        if role is not None and role != want:
            wrong.append(f"channel {i} is {name!r} but {method} reads {want} there")
    return wrong


def _channel_count_advice(count: int) -> str:
    """What to change when ``outputs`` lists ``count`` channels and the method reads another
    number: name the method that reads that many, if one does."""
    fits = [m for m, (n, _) in METHOD_CHANNELS.items() if n == count]
    if not fits:
        return (f"no post-processing method reads {count} channels (seeded-watershed reads 2: "
                "foreground, seeds; boundary-label reads 1: boundary): re-export the model "
                "with the channels a method reads")
    method = fits[0]
    return (f"list one name per channel the model returns, and set postprocessing.method "
            f"{method} only if it fits them ({method} reads {METHOD_MEANING[method]}); "
            "otherwise re-export the model with the channels the method reads")


class PostProcessing(BaseModel):
    """Defaults for turning the model output into instance labels.

    ``seeded-watershed``: outputs (foreground, seeds) → seeded watershed (nuclei).
    ``boundary-label``: output (boundary,) → regions between boundaries (grains).
    """

    model_config = ConfigDict(extra="forbid")
    method: Literal["seeded-watershed", "boundary-label"] = "seeded-watershed"
    foreground_threshold: float = Field(default=0.5, gt=0, lt=1)
    seed_threshold: float = Field(default=0.5, gt=0, lt=1)
    min_area_px: int = Field(default=20, ge=0)
    min_edge_area_px: int = Field(
        default=MIN_EDGE_AREA_PX,
        ge=0,
        description="boundary-label: regions with a pixel on the image border are kept from "
        "this many px (the smaller of this and min_area_px applies): a grain cut by the field "
        "may show only a sliver, and dropping it loses its half count in N_A. Not used by "
        "seeded-watershed.",
    )
    flood_levels: int | None = Field(
        default=None,
        ge=2,
        le=256,
        description="seeded-watershed: flood 1 - seeds quantised to this many levels, so that "
        "each flat level grows outward from the seeds evenly (None: the continuous "
        "probability, which lets noise in the low seed values steer the cuts).",
    )


class ModelCard(BaseModel):
    """Everything needed to run a model and to judge it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str
    version: str = "0"
    task: Literal["nuclei", "grains"] = "nuclei"
    runtime: Literal["onnx", "classical", "random-forest"] = Field(
        default="onnx",
        description="onnx: a network run by the configured backend; classical: threshold + "
        "distance transform (no file); random-forest: pixel classifier on filter features "
        "(an ONNX file made with skl2onnx).",
    )
    file: str | None = Field(default=None, description="Model file, relative to the card.")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Runtime-specific settings (e.g. feature scales)."
    )
    architecture: str = ""
    input_name: str = "image"
    output_name: str = "probabilities"
    outputs: list[str] = Field(default_factory=lambda: ["foreground", "seeds"])
    size_multiple: int = Field(default=8, ge=1, description="H and W are padded to a multiple.")
    tile_px: int = Field(
        default=1024,
        ge=16,
        description="Largest tile side: frames whose padded height or width exceeds it are "
        "run as overlapping tiles and blended (livemask.inference.tiling); smaller frames run "
        "whole. Rounded down to a multiple of size_multiple. Not used for runtime: classical "
        "(its thresholds are per whole image).",
    )
    tile_overlap_px: int = Field(
        default=64,
        ge=0,
        description="Overlap of neighbouring tiles (at most a quarter of the tile); the outer "
        "quarter of each overlap is ignored and the rest blended smoothly.",
    )
    max_batch: int = Field(default=4, ge=1, description="Most tiles per backend call.")
    normalization: Normalization = Field(default_factory=Normalization)
    postprocessing: PostProcessing = Field(default_factory=PostProcessing)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    card_path: Path | None = Field(default=None, exclude=True)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        """A number (YAML ``version: 1.0`` or ``2``) as its text: ``"1.0"``, ``"2"``."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator(
        "normalization", "postprocessing", "training", "metrics", "parameters", mode="before"
    )
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        """An empty section (YAML ``metrics:`` with nothing under it is null): its defaults."""
        return {} if value is None else value

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        """Outputs that fit the post-processing, and a tile overlap the tiling can use
        (checked when the card loads, not on the first frame)."""
        method = self.postprocessing.method
        need, names = METHOD_CHANNELS[method]
        if len(self.outputs) != need:
            raise ValueError(
                f"outputs lists {len(self.outputs)} channel(s) ({', '.join(self.outputs)}), "
                f"but postprocessing.method {method} reads {need} ({names}): "
                + _channel_count_advice(len(self.outputs)))
        wrong = _misplaced_channels(method, self.outputs)
        if wrong:
            raise ValueError(
                f"outputs {self.outputs}: {'; '.join(wrong)}. {method} reads "
                f"{METHOD_MEANING[method]}: re-export the model with its channels in that "
                "order and meaning (outputs names are labels: they do not reorder channels)")
        if self.runtime != "classical":  # the others run large frames as tiles
            tile = self.tile_side
            if (tile >= self.size_multiple and 4 * self.tile_overlap_px > tile
                    and "tile_overlap_px" not in self.model_fields_set):
                # the default (64 px) for a small tile: what the tiling can use
                self.tile_overlap_px = min(tile // 4, max(0, tile - self.size_multiple))
            if tile < self.size_multiple:
                raise ValueError(f"tile_px {self.tile_px} is smaller than size_multiple "
                                 f"{self.size_multiple}: raise tile_px")
            if tile - self.tile_overlap_px < self.size_multiple:
                raise ValueError(
                    f"tile_px {tile} less tile_overlap_px {self.tile_overlap_px} is less than "
                    f"size_multiple {self.size_multiple}: raise tile_px or lower "
                    "tile_overlap_px")
            if 4 * self.tile_overlap_px > tile:
                raise ValueError(
                    f"tile_overlap_px {self.tile_overlap_px} is more than a quarter of the "
                    f"tile ({tile} px, tile_px rounded down to size_multiple "
                    f"{self.size_multiple}): lower tile_overlap_px to at most {tile // 4} "
                    "or raise tile_px")
        return self

    @property
    def tile_side(self) -> int:
        """The largest tile side the model runs: ``tile_px`` rounded down to a multiple of
        ``size_multiple``."""
        return self.tile_px // self.size_multiple * self.size_multiple

    @property
    def onnx_path(self) -> Path:
        """Absolute path of the model file (raises ModelError for file-less models)."""
        if self.file is None:
            raise ModelError(f"model {self.name!r} ({self.runtime}) has no model file")
        base = self.card_path.parent if self.card_path else MODELS_DIR
        return (base / self.file).resolve()


#: Where a model card's path is given (errors name both: the caller may be either).
_WHERE_CARD = "model.path in a config, --model on the command line"


def load_model_card(name_or_path: str | Path) -> ModelCard:
    """Load a shipped model by name (``nuclei``) or any card by path."""
    path = Path(name_or_path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        _refuse_non_card_path(str(name_or_path))
        path = MODELS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(c.name for c in list_models()) or "none"
            raise ModelError(f"unknown model {str(name_or_path)!r}; shipped models: {known} "
                             f"(or give your own model card .yaml: {_WHERE_CARD})")
    if not path.is_file():
        raise ModelError(f"model card {path} does not exist; check the path ({_WHERE_CARD})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelError(f"model card {path} is not readable YAML: {exc}") from None
    if not isinstance(data, dict) or "name" not in data:
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ModelError(
            f"{path} is not a model card (it has no 'name' field; found: {keys or 'nothing'}); "
            "give a shipped model name (see `livemask models`) or a model card .yaml like "
            f"{MODELS_DIR / 'nuclei.yaml'}"
        )
    try:
        card = ModelCard.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(card)'}: "
            + plain_message(e["msg"])  # a validator's own sentence
            for e in exc.errors()
        )
        raise ModelError(f"invalid model card {path}: {fields}") from None
    card.card_path = path.resolve()
    if card.runtime != "classical" and card.file is None:
        raise ModelError(f"model card {path} must name its model file (field 'file')")
    if card.file is not None and not _model_file_exists(card):
        raise ModelError(f"model card {path} names {card.file!r} (field 'file'), which is not "
                         "a file")
    return card


def _refuse_non_card_path(text: str) -> None:
    """ModelError for a path that is not a card (a model file, or no .yaml suffix): only
    bare names are shipped models."""
    path = Path(text)
    is_path = "/" in text or "\\" in text
    if path.suffix.lower() != ".onnx" and not is_path:
        return
    if path.suffix.lower() == ".onnx":
        card = path.with_suffix(".yaml")
        if card.is_file():
            raise ModelError(f"{text} is a model file, not a model card: give its card "
                             f"{card} as model.path or --model")
        raise ModelError(
            f"{text} is a model file, not a model card: write a card next to it, e.g. "
            f"{card} with `name: {path.stem}` and `file: {path.name}` (copy "
            f"{MODELS_DIR / 'nuclei.yaml'} and change name, file, outputs and "
            f"postprocessing, see docs/models.md), and give that card ({card}) as "
            "model.path or --model")
    raise ModelError(
        f"{text} is not a model card: a card is a .yaml or .yml file naming its model file "
        f"(like {MODELS_DIR / 'nuclei.yaml'}); give the card's path as model.path or "
        "--model, or a shipped model's name (see `livemask models`)")


def _model_file_exists(card: ModelCard) -> bool:
    try:
        return card.onnx_path.is_file()
    except (OSError, ValueError):  # a name no file can have (a NUL byte, too long)
        return False


def list_models() -> list[ModelCard]:
    """All shipped models whose cards load."""
    cards = []
    for path in sorted(MODELS_DIR.glob("*.yaml")):
        try:
            cards.append(load_model_card(path))
        except ModelError:
            continue
    return cards
