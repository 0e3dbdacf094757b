"""Service configuration: pydantic models loaded from YAML.

Every field has a default, so an empty file (or section) is a valid configuration. A
leading ``~`` in a path is the home folder (a ``~`` alone is YAML's null: refused there);
relative paths (``hardware.config_file``, ``model.path``, ``record.path``) are resolved
against the YAML file's folder. The YAML loader reads ``5e-2`` as a number (YAML 1.2), as
people write it, and :func:`dump_yaml` quotes text that looks like one.
Errors name the field to change, e.g. ``acquisition.mode: Input should be 'free-run' ...``.
"""

from __future__ import annotations

import ipaddress
import operator
import os
import re
from collections.abc import Collection, Iterable, Iterator
from itertools import chain, compress
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import useq
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from livemask.acquisition.mode import Mode
from livemask.acquisition.plan_input import unknown_field_text, validate_model
from livemask.acquisition.sequence import check_sequence
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.errors import ConfigError
from livemask.feedback.spec import FeedbackConfig, RuleSpec
from livemask.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_NESTING,
    fits_64_bits,
    nesting_depth,
    plain_message,
)

StageThreads = Literal["one", "two"]
SensorSide = Annotated[int, Field(ge=16, le=16384)]
#: Most intra-op threads a CPU backend may be given (100,000 hung the start).
MAX_THREADS = 256
#: Largest value of fields handed to C ``int`` parameters (libzmq options, gc thresholds).
C_INT_MAX = 2**31 - 1
#: Bytes per pixel of each frame-sized array touched at start (livemask.service.prefault).
PREFAULT_BYTES_PER_PX = 4
#: Bytes per world pixel the simulated grain sample holds (measured with tracemalloc: 12.6
#: kept, 28 at the peak while it is built); its world is at least twice the sensor a side.
GRAIN_WORLD_BYTES_PER_PX = 28
#: Longest time-lapse interval (s): what a time plan's interval can hold (999,999,999 days).
MAX_INTERVAL_S = 999_999_999 * 86_400.0

DEFAULT_SEQUENCE: dict[str, Any] = {
    "time_plan": {"interval": 0.1, "loops": 170},
    "channels": [{"config": "DAPI", "exposure": 10.0}],
}


#: tcp://HOST:PORT (port * picks a free one; HOST may be [IPv6]); other transports
#: (ipc://, inproc://, ...) are left to ZeroMQ to judge.
_ADDRESS = re.compile(
    r"tcp://(\[[^\]]+\]|[^:/\[\]\s]+):(?P<port>\d+|\*)|(?!tcp://)[a-z][a-z0-9+.-]*://.+"
)


def _blank(value: Any) -> bool:
    """Whether a path given in a config is an empty or all-blank string (``Path("")`` is
    the current folder: a path the user did not mean)."""
    return isinstance(value, str) and not value.strip()


def _not_blank(value: Any, what_to_do: str) -> Any:
    """``value``; ValueError "an empty path; ``what_to_do``" for a blank one."""
    if _blank(value):
        raise ValueError(f"an empty path; {what_to_do}")
    return value


def _ipv6(host: str) -> bool:
    """Whether ``host`` is an IPv6 address (which has colons of its own)."""
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def check_host(value: str) -> str:
    """An HTTP interface to bind (``metrics.address``, ``dashboard.address``): a host name
    or IP address; an IPv6 one may be written in brackets (``[::1]``), as in ZeroMQ
    addresses. ValueError for a URL or an empty value."""
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host and not _ipv6(host):  # a port (127.0.0.1:80) or a scheme
        host = ""
    if not host or "/" in host or any(c.isspace() for c in host):
        raise ValueError(f"{value!r} is not an interface: give a host name or IP address "
                         "(e.g. 127.0.0.1, ::1 or 0.0.0.0), without a scheme or port")
    return host


def check_address(value: str) -> str:
    """``value`` if it is a ZeroMQ endpoint livemask can bind, else ``ValueError``.

    libzmq wraps a TCP port above 65535 silently (473430 binds 14678): refuse it here."""
    m = _ADDRESS.fullmatch(value)
    if m is None or (m["port"] not in (None, "*") and int(m["port"]) > 65535):
        raise ValueError(
            f"{value!r} is not a valid address; expected tcp://HOST:PORT, e.g. "
            "tcp://127.0.0.1:5555 (port * picks a free one), or ipc://PATH"
        )
    return value


def same_endpoint(first: str, second: str) -> bool:
    """Whether two endpoints are one as libzmq binds them: tcp ports equal as numbers on
    hosts that overlap (:func:`_same_tcp_host`), ipc paths naming one file (relative ones
    from the working directory), else the same text. A port or ipc path picked at bind
    (``*`` or 0) is each socket's own."""
    a, b = _ADDRESS.fullmatch(first), _ADDRESS.fullmatch(second)
    if a is not None and b is not None and a["port"] and b["port"]:  # both tcp
        if "*" in (a["port"], b["port"]) or int(a["port"]) == 0:
            return False
        return int(a["port"]) == int(b["port"]) and _same_tcp_host(a[1], b[1])
    if first.startswith("ipc://") and second.startswith("ipc://"):
        return _same_ipc_path(first.removeprefix("ipc://"), second.removeprefix("ipc://"))
    return first == second


def one_endpoint_message(first_key: str, first: str, second_key: str, second: str) -> str:
    """The error for two sockets given one endpoint (:func:`same_endpoint`), naming the
    keys or flags (and both spellings where they differ)."""
    what = f"both {first!r}" if first == second else f"one endpoint ({first!r}, {second!r})"
    return (f"{first_key} and {second_key} are {what}; give each socket its own endpoint "
            "(e.g. ports 5555 and 5556)")


#: The ZeroMQ endpoints' keys (checked against each other by ``PublishConfig``).
_ZMQ_KEYS = frozenset({"publish.pub_address", "publish.control_address"})


def check_own_ports(cfg: ServiceConfig, given: dict[str, str] | None = None) -> None:
    """``ConfigError`` when the metrics or dashboard server would bind a TCP port that
    another of the service's endpoints binds (one port on the same host, or a wildcard
    covering it): its bind would fail with a bare "Address already in use". ``given`` names
    the flag that set a key, e.g. ``{"dashboard.port": "--dashboard"}``."""
    given = given or {}
    listeners = _tcp_listeners(cfg)
    for i, (key, host, port, shown) in enumerate(listeners):
        for other, other_host, other_port, other_shown in listeners[i + 1 :]:
            if {key, other} <= _ZMQ_KEYS or port != other_port:
                continue
            if _same_tcp_host(host, other_host) and not _v6_only_apart(
                    (key, host), (other, other_host)):
                raise ConfigError(
                    f"{given.get(key, key)} and {given.get(other, other)} are one TCP port "
                    f"({shown}, {other_shown}); give each its own port (0 picks a free one "
                    "for metrics.port and dashboard.port)"
                )


def _tcp_listeners(cfg: ServiceConfig) -> list[tuple[str, str, int, str]]:
    """(key, host, port, as given) of each TCP port the service binds that is known
    beforehand (not ``*`` or 0): its ZeroMQ sockets, and the metrics and dashboard servers
    when they are enabled."""
    out = []
    for name, section in (("metrics", cfg.metrics), ("dashboard", cfg.dashboard)):
        if section.enabled and section.port:
            host = section.address or "*"  # "": every IPv4 interface
            shown = f"[{host}]" if ":" in host else host
            out.append((f"{name}.port", host, section.port, f"{shown}:{section.port}"))
    for key in ("pub_address", "control_address"):
        address = getattr(cfg.publish, key)
        m = _ADDRESS.fullmatch(address)
        if m is not None and m["port"] not in (None, "*") and int(m["port"]):
            out.append((f"publish.{key}", m[1], int(m["port"]), address))
    return out


def _same_ipc_path(first: str, second: str) -> bool:
    """Whether two ipc endpoint paths are one socket file (``*``: a new file each)."""
    if "*" in (first, second):
        return False
    if first.startswith("@") or second.startswith("@"):  # Linux abstract names: no file
        return first == second
    return os.path.realpath(first) == os.path.realpath(second)


def _same_tcp_host(first: str, second: str) -> bool:
    """Whether binding one port on both hosts clashes: the same host (``localhost`` is
    127.0.0.1, as libzmq resolves it without IPv6), or a wildcard covering the other
    (``*`` and 0.0.0.0 all IPv4 hosts, ``[::]`` every host)."""
    one, two = _tcp_host(first), _tcp_host(second)
    if one == two or "::" in (one, two):
        return True
    ipv4_any = {"*", "0.0.0.0"}
    return (one in ipv4_any and ":" not in two) or (two in ipv4_any and ":" not in one)


def _v6_only_apart(first: tuple[str, str], second: tuple[str, str]) -> bool:
    """Whether one of two (key, host) listeners is the dashboard on ``::``, which binds IPv6
    only (``socket.create_server`` sets IPV6_V6ONLY), and the other is on an IPv4 host:
    they do not clash (metrics and ZeroMQ on ``::`` take IPv4 too)."""
    for (key, host), (_, other) in ((first, second), (second, first)):
        if key == "dashboard.port" and _tcp_host(host) == "::":
            return ":" not in _tcp_host(other)
    return False


def _tcp_host(host: str) -> str:
    """A bind host in one spelling: lower case, IP literals in their short form (without
    IPv6 brackets), ``localhost`` as 127.0.0.1."""
    import ipaddress

    host = host.lower().removeprefix("[").removesuffix("]")
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:  # a host or interface name
        return host


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class HardwareConfig(_Section):
    """Which Micro-Manager configuration to load, and into which core."""

    config_file: Path = Field(
        default=SIMULATED_CFG,
        description="Micro-Manager .cfg file (default: the packaged simulated rig); relative "
        "paths are resolved against the YAML file, else the working directory.",
    )
    core: Literal["auto", "unicore", "cmmcore"] = Field(
        default="auto",
        description="auto: UniMMCore when the .cfg has '#py' Python-device lines, "
        "else CMMCorePlus.",
    )
    pixel_size_um: float | None = Field(
        default=None, gt=0, description="Overrides the core's pixel size calibration (µm/px)."
    )

    @field_validator("config_file", mode="before")
    @classmethod
    def _file_given(cls, value: Any) -> Any:
        if value is None or _blank(value):
            raise ValueError(
                "no file given (an empty value, or ~ alone: YAML's null, not your home "
                "folder); give the Micro-Manager .cfg file's path, or leave the line out to "
                "run the packaged simulated rig"
            )
        return value

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without ``config_file`` when it is the packaged simulated rig: a dump (a
        recording's config.yaml) runs on the rig of whichever install loads it, not on a
        path into this one's site-packages."""
        data: dict[str, Any] = handler(self)
        if os.path.realpath(self.config_file) == str(SIMULATED_CFG):
            data.pop("config_file", None)
        return data


class SimulationConfig(_Section):
    """The simulated microscope (used when the .cfg loads livemask's Python devices)."""

    sample: Literal["nuclei", "grains"] = "nuclei"
    seed: int = Field(
        default=0,
        ge=0,
        lt=2**63,
        description="Random seed of the sample: a whole number, 0 <= seed < 2**63.",
    )
    sensor_shape_px: tuple[SensorSide, SensorSide] = Field(
        default=(512, 512), description="Camera (rows, columns), 16 to 16384 each."
    )
    pixel_size_um: float = Field(default=0.65, gt=0)
    steps_per_frame: int = Field(
        default=1, ge=0, le=1000,
        description="Sample time steps per snap, 0 to 1000 (a nuclei step takes about 1.5 ms "
        "on 2 cores: 1000 steps make each snap take 1.5 s).",
    )
    truth: bool = Field(default=False, description="Publish ground-truth labels on 'truth'.")
    division_rate_per_step: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="nuclei: chance per nucleus and sample step to start mitosis "
        "(default: the simulator's 0.004; the smart-mitosis demo uses 0.00015).",
    )
    turnover_per_step: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="nuclei: chance per interphase nucleus and sample step to leave the "
        "sample (default 0: the population grows to its cap and divisions then stop, after "
        "about 2,000 steps at the default division rate; e.g. 0.0015 keeps it dividing at "
        "its starting density).",
    )

    def sample_overrides(self) -> dict[str, Any]:
        """Sample parameters this config changes from the simulator's defaults."""
        if self.sample != "nuclei":
            return {}
        given = {"division_rate_per_step": self.division_rate_per_step,
                 "turnover_per_step": self.turnover_per_step}
        return {name: value for name, value in given.items() if value is not None}


class AcquisitionConfig(_Section):
    """What to acquire and how analysis is coupled to the camera."""

    mode: Mode = Field(
        default="free-run",
        description="free-run: the camera never waits, frames analysis cannot keep up with "
        "skip analysis; pipelined: every frame is analysed, the camera waits while a frame "
        "waits for the model; synchronized: each frame is analysed before the next event runs.",
    )
    autostart: bool = Field(default=True, description="Start `sequence` when the service starts.")
    sequence: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_SEQUENCE),
        description="A useq.MDASequence (as YAML/JSON) run by `start` and on autostart.",
    )
    frame_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="pipelined/synchronized mode: longest wait for the model to take a frame "
        "(pipelined) or for its analysis (synchronized) before the next "
        "event is released anyway (never hang on a lost frame).",
    )

    @field_validator("sequence")
    @classmethod
    def _valid_sequence(cls, value: dict[str, Any]) -> dict[str, Any]:
        if nesting_depth(value, MAX_NESTING + 1) > MAX_NESTING:  # (as a request's arguments)
            raise ValueError(
                f"nests objects and arrays more than {MAX_NESTING} levels deep (e.g. in its "
                f"metadata); give it at most {MAX_NESTING} levels: `start` echoes the "
                "sequence in its acquisition_started event, which cannot encode it")
        seq = validate_model(useq.MDASequence, value)
        check_sequence(seq, value, events=False)  # (checked where it runs: see app.py)
        return value

    def mda_sequence(self) -> useq.MDASequence:
        """The configured sequence as a useq object."""
        return useq.MDASequence.model_validate(self.sequence)


class ModelConfig(_Section):
    """The segmentation model and the backend that runs it."""

    name: str = Field(default="nuclei", description="A shipped model name (see `livemask models`).")
    path: Path | None = Field(
        default=None,
        description="A model card (.yaml) of your own, instead of `name` (set one, not both).",
    )
    backend: Literal["auto", "onnxruntime", "tensorrt", "torch"] = Field(
        default="auto",
        description="Inference backend. auto: the fastest that can run here (tensorrt, then "
        "torch on CUDA, then onnxruntime; torch first while device_analysis is true), logging "
        "why each other one cannot; a named backend that cannot run is an error. See "
        "docs/backends.md.",
    )
    threads: int = Field(
        default=2, ge=1, le=MAX_THREADS, description="Intra-op threads of the CPU backend."
    )
    device_analysis: bool = Field(
        default=True,
        description="With the torch backend on a CUDA GPU, keep each frame on the GPU and label "
        "and measure it there (livemask.inference.torch_analysis); false: copy the model "
        "output to the host and use the CPU post-processing.",
    )

    @field_validator("name")
    @classmethod
    def _shipped_name(cls, value: str) -> str:
        """A card (``.yaml``) in ``name`` would be looked up from the working directory, not
        the YAML file's folder: it belongs in ``path``. (Other paths are refused where the
        model is loaded, with what to do for a model file.)"""
        if Path(value).suffix.lower() in (".yaml", ".yml"):
            raise ValueError(
                f"{value!r} is a model card file; model.name takes a shipped model's name "
                "(see `livemask models`): put the card's path in model.path instead "
                "(relative to the YAML file)"
            )
        return value

    @field_validator("path", mode="before")
    @classmethod
    def _card_given(cls, value: Any) -> Any:
        return _not_blank(value, "give your model card's (.yaml) path, or leave the line out "
                                 "for model.name's shipped model")

    @model_validator(mode="after")
    def _name_or_path(self) -> ModelConfig:
        if self.path is not None and "name" in self.model_fields_set:
            raise ValueError(
                f"model.name ({self.name!r}) and model.path ({str(self.path)!r}) are both set; "
                "set model.name (a shipped model) or model.path (your own card), not both"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without ``name`` when ``path`` is set (the default name is not the model): a
        dump (a recording's config.yaml) loads again."""
        data: dict[str, Any] = handler(self)
        if self.path is not None:
            data.pop("name", None)
        return data


class AnalysisConfig(_Section):
    """Post-processing from model output to instances; None means the model card's value."""

    foreground_threshold: float | None = Field(default=None, gt=0, lt=1)
    seed_threshold: float | None = Field(default=None, gt=0, lt=1)
    min_area_px: int | None = Field(default=None, ge=0)


class PublishConfig(_Section):
    """ZeroMQ endpoints and what is published."""

    pub_address: str = "tcp://127.0.0.1:5555"
    control_address: str = "tcp://127.0.0.1:5556"
    frame_every: int = Field(
        default=1, ge=0,
        description="Publish every Nth frame of each stream (the same index but t: "
        "position, grid tile, channel, plane) on 'frame' (0 = never).",
    )
    sndhwm: int = Field(
        default=200, ge=1, le=C_INT_MAX, description="PUB high-water mark (messages)."
    )
    max_queued_mb: float = Field(
        default=512.0, ge=0,
        description="At most this many MB of messages queued for one subscriber that does "
        "not read (e.g. a stalled viewer): the high-water mark is lowered to fit the "
        "camera's frame size (at least 4 messages); 0: sndhwm alone.",
    )
    heartbeat_s: float = Field(
        default=1.0, ge=0.05, description="Status interval (at least 0.05 s)."
    )

    @field_validator("pub_address", "control_address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return check_address(value)

    @model_validator(mode="after")
    def _distinct_endpoints(self) -> PublishConfig:
        if same_endpoint(self.pub_address, self.control_address):
            raise ValueError(one_endpoint_message(
                "publish.pub_address", self.pub_address,
                "publish.control_address", self.control_address))
        return self


class PipelineConfig(_Section):
    """Queues between the stages."""

    queue_size: int = Field(default=2, ge=1, description="Frames waiting for inference.")
    stage_threads: StageThreads = Field(
        default="two",
        description="two: inference and analysis on their own threads, overlapping (most "
        "frames per second); one: one thread infers, then analyses, each frame (lower "
        "latency, a few per cent fewer frames per second on a 2-core CPU).",
    )
    gc_freeze: bool = Field(
        default=True,
        description="Freeze the heap once the model is loaded (gc.freeze), so that Python's "
        "full garbage collections, which hold the GIL, skip the startup objects.",
    )
    gc_threshold: int | None = Field(
        default=10_000,
        ge=100,
        le=C_INT_MAX,
        description="Young-generation threshold of Python's garbage collector while the "
        "service runs (Python's default is 700; null leaves it as it is).",
    )
    prefault_frames: int = Field(
        default=8,
        ge=0,
        le=64,
        description="Frame-sized int32 arrays filled and freed once at start, so that the "
        "first frames do not pay for the first touch of fresh memory (costly on virtual "
        "machines); 0 = off.",
    )


class MetricsConfig(_Section):
    """The Prometheus endpoint (``/metrics``), off by default."""

    enabled: bool = Field(default=False, description="Serve Prometheus metrics over HTTP.")
    address: str = Field(
        default="127.0.0.1", description="Interface to bind; anything but loopback is public."
    )
    port: int = Field(default=9108, ge=0, le=65535, description="TCP port; 0 picks a free one.")

    @field_validator("address")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)


class DashboardConfig(_Section):
    """The web dashboard (``docs/dashboard.md``), off by default."""

    enabled: bool = Field(default=False, description="Serve the web dashboard over HTTP.")
    address: str = Field(
        default="127.0.0.1", description="Interface to bind; anything but loopback is public."
    )
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    update_hz: float = Field(
        default=5.0, gt=0, le=30, description="Most image and plot updates per second."
    )
    max_image_px: int = Field(
        default=512, ge=64, le=4096, description="Longest side of the image sent to browsers."
    )

    @field_validator("address")
    @classmethod
    def _host(cls, value: str) -> str:
        return check_host(value)


class TrackingConfig(_Section):
    """Online tracking of objects (nuclei) across frames, per stage position. See tracking.md."""

    enabled: bool = Field(default=False, description="Add track_id / parent_track_id.")
    max_distance_px: float = Field(
        default=20.0, gt=0, description="Longest link between frames (px, grows with sqrt(gap))."
    )
    max_gap_frames: int = Field(
        default=3, ge=0, description="Analysed frames a track may miss and still be re-linked "
        "(gap_penalty * max_gap_frames < 1)."
    )
    gap_penalty: float = Field(
        default=0.25, ge=0,
        description="Link cost per missed frame (shrinks the reach by sqrt(1 - it * missed)).",
    )
    area_weight: float = Field(default=0.0, ge=0, description="Link cost per |ln(area ratio)|.")
    division: bool = Field(default=True, description="Detect divisions (parent/daughters).")
    division_distance_px: float | None = Field(
        default=None, gt=0, description="Daughter-to-parent distance limit; None: max_distance_px."
    )
    division_area_ratio: tuple[float, float] = Field(
        default=(0.3, 1.6), description="(low, high) of each daughter's area / parent's area."
    )
    daughter_area_similarity: float = Field(
        default=0.4, ge=0, le=1, description="Smaller daughter's area / larger's, at least."
    )
    division_intensity_ratio: float | None = Field(
        default=0.9,
        gt=0,
        description="Daughters' mean intensity / the parent's brightest of its last 3 frames, "
        "at most (condensed mitotic chromatin is bright); None: not used.",
    )
    max_positions: int = Field(
        default=4096, ge=1, le=1_000_000,
        description="Streams (positions x grid tiles x channels x planes) tracked at once; "
        "the least recently used is dropped beyond.",
    )

    @field_validator("division_area_ratio")
    @classmethod
    def _valid_ratio(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] < value[1]:
            raise ValueError("give [low, high] with 0 < low < high, e.g. [0.3, 1.6]")
        return value

    @model_validator(mode="after")
    def _gap_can_link(self) -> TrackingConfig:
        """A track that missed ``1 / gap_penalty`` frames could never link again."""
        penalty, frames = self.gap_penalty, self.max_gap_frames
        if penalty * frames >= 1:
            from livemask.analysis.tracking import largest_gap_frames

            raise ValueError(
                f"tracking.gap_penalty ({penalty}) * tracking.max_gap_frames ({frames}) must "
                "be < 1: the link cost grows by gap_penalty per missed frame, so a track that "
                "missed 1/gap_penalty frames can never be re-linked; set "
                f"tracking.max_gap_frames to at most {largest_gap_frames(penalty)} or "
                f"tracking.gap_penalty below {1 / frames:.4g}"
            )
        return self


class RecordConfig(_Section):
    """Recording frames, labels, measurements and events to disk (see docs/recording.md)."""

    enabled: bool = Field(default=False, description="Record the run (`serve --record DIR`).")
    path: Path | None = Field(
        default=None,
        description="Folder that receives one run-YYYYmmdd-HHMMSS folder per service run; "
        "relative paths are resolved against the YAML file; None: ./recordings.",
    )
    labels: bool = Field(default=True, description="Record the instance labels.")
    measurements: bool = Field(default=True, description="Write measurements.csv.")
    max_queue_mb: float = Field(
        default=2048.0, gt=0,
        description="Warn when more than this waits to be written (nothing is dropped).",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _folder_given(cls, value: Any) -> Any:
        return _not_blank(value, "it would record beside the YAML file: give the folder, or "
                                 "leave the line out for ./recordings")


class ServiceConfig(_Section):
    """The whole service configuration."""

    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    feedback: FeedbackConfig = Field(
        default_factory=FeedbackConfig, description="Rules that change the acquisition."
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """A section given with no fields (``model:``, all its lines commented out: YAML's
        null) is an empty one: every field keeps its default; so do the nested sections and
        lists of :data:`_NULL_IS_DEFAULT` (``feedback.rules:`` with every rule commented
        out)."""
        if not isinstance(data, dict):
            return data
        data = {k: {} if v is None and k in cls.model_fields else v for k, v in data.items()}
        for section, keys in _NULL_IS_DEFAULT.items():
            given = data.get(section)
            if isinstance(given, dict):
                data[section] = {k: v for k, v in given.items() if v is not None or k not in keys}
        return data


#: Fields inside a section whose null means their default, as for a section (a null
#: where a value is needed is an error otherwise).
_NULL_IS_DEFAULT = {"acquisition": ("sequence",), "feedback": ("rules", "limits")}


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last silently). Keys brought in by a merge (``<<: *anchor``) may still be overridden.
    Also reads ``5e-2`` and ``1e1`` as floats (YAML 1.2), not as strings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:  # (also within one line: {seed: 1, seed: 2})
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
        return super().construct_mapping(node, deep=deep)


#: Floats with an exponent as YAML 1.2 writes them (``5e-2``, ``1e1``, ``1.5E3``), which
#: PyYAML (YAML 1.1: a dot and a signed exponent) reads as strings.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")
# add_implicit_resolver gives the class its own copy of SafeLoader's resolvers first
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789")
)


class _ConfigDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes strings :class:`_UniqueKeyLoader` would read as
    numbers (``'1e3'``): PyYAML alone writes them plain, as YAML 1.1 text."""


_ConfigDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789")
)


def dump_yaml(data: Any) -> str:
    """``data`` (a dumped config) as YAML text that :func:`load_config` reads back as it
    is: a text value such as a rule named ``'1e1'`` stays text."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(
            f"duplicate key {key!r} on line {line} (first on line {first}); keep one of them "
            "(YAML would silently use the last)"
        )


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not tell."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None
    return total if total > 0 else None


def _check_prefault_memory(cfg: ServiceConfig) -> str | None:
    """Why the memory taken at start would not fit, or None when it does: the frame buffers
    touched then (pipeline.prefault_frames arrays of simulation.sensor_shape_px, 4 bytes a
    pixel) and, for the simulated grain sample, its pre-rendered world. The message names
    only the settings that take the memory."""
    frames = cfg.pipeline.prefault_frames
    rows, cols = cfg.simulation.sensor_shape_px
    need = 0
    parts: list[str] = []  # what takes the memory
    fixes: list[str] = []
    if frames:
        need += frames * rows * cols * PREFAULT_BYTES_PER_PX
        parts.append(f"{frames} frame-sized arrays of {rows} x {cols} px (4 bytes a pixel)")
        fixes.append("lower pipeline.prefault_frames (0 turns it off)")
    if cfg.simulation.sample == "grains":
        world = max(2048, 2 * rows) * max(2048, 2 * cols)
        need += world * GRAIN_WORLD_BYTES_PER_PX
        parts.append(f"the simulated grain world of {world / 1e6:.0f} Mpx "
                     f"(up to {GRAIN_WORLD_BYTES_PER_PX} bytes a pixel, at least twice "
                     "the sensor a side)")
    memory = physical_memory_bytes()
    if memory is None or need <= memory // 2:
        return None
    fixes.append("give a smaller simulation.sensor_shape_px")
    keys = ("pipeline.prefault_frames, " if frames else "") + "simulation.sensor_shape_px"
    verb = "are" if frames else "is"  # (without frames: the grain world alone)
    return (
        f"{keys}: {' and '.join(parts)} {verb} allocated at start: {need / 2**30:.1f} GiB, "
        f"more than half of this machine's {memory / 2**30:.1f} GiB of memory; "
        f"{' or '.join(fixes)}"
    )


def int_out_of_range(value: Any, where: str) -> str | None:
    """The first integer in ``value`` (a dumped config, a request's arguments) that does not
    fit 64 bits, as an error line naming its field, or None (iterative: any nesting depth).
    The config is sent as JSON (orjson refuses integers beyond 64 bits) and handed to
    numpy; a request's arguments are echoed in replies and events.

    Cheap for large input (the control server runs it on every request): a pass at C speed
    over each nesting level finds whether there is such an integer at all; only then is
    ``value`` walked, keeping the keys of the open containers, to name it."""
    if not _may_hold_big_int(value):
        return None
    keys: list[Any] = []  # the key of each container being walked, from value down
    walks: list[Iterator[tuple[Any, Any]]] = [iter([(None, value)])]
    while walks:
        for key, item in walks[-1]:
            if isinstance(item, dict | list | tuple):
                keys.append(key)
                walks.append(_entries_to_walk(item))
                break
            if isinstance(item, int) and not isinstance(item, bool) and not fits_64_bits(item):
                at = _field_path(where, [*keys[1:], key] if keys else [])
                return (f"{at}: {item} does not fit 64 bits; use a whole number from -2**63 to "
                        f"2**63 - 1 ({INT64_MAX})")
        else:
            walks.pop()
            if keys:
                keys.pop()
    return None


def _field_path(where: str, keys: list[Any]) -> str:
    """``where.key1.key2...`` (``key1.key2...`` when ``where`` is empty)."""
    at = where
    for key in keys:
        at = f"{at}.{key}" if at else str(key)
    return at


#: Types whose values :func:`int_out_of_range` checks without a Python-level walk.
_PLAIN = frozenset({int, bool, float, str, type(None)})
_CONTAINERS = frozenset({dict, list, tuple})
#: Containers shorter than this are walked entry by entry (cheaper than the C-speed check).
_WALK_BELOW = 16


def _ints_fit(values: Collection[Any], types: set[type]) -> bool:
    """Whether the plain ``int`` values among ``values`` (of ``types``) fit 64 bits."""
    if int not in types:
        return True
    ints = values if types <= {int, bool} else [v for v in values if type(v) is int]
    return min(ints) >= INT64_MIN and max(ints) <= INT64_MAX


def _may_hold_big_int(value: Any) -> bool:
    """False when nothing in ``value`` is an integer beyond 64 bits, checked one nesting
    level at a time at C speed; True also for subclasses of int, dict, list or tuple."""
    level: Collection[Any] = (value,)
    while level:
        types = set(map(type, level))
        odd = types - _PLAIN - _CONTAINERS
        if any(issubclass(t, int | dict | list | tuple) for t in odd):
            return True  # let the walk judge them, as it always did
        if not _ints_fit(level, types):
            return True
        level = _next_level(level, types & _CONTAINERS)
    return False


def _next_level(level: Collection[Any], containers: set[type]) -> Collection[Any]:
    """The entries of the dicts, lists and tuples in ``level``, in one collection."""
    if not containers:
        return ()
    if len(level) == 1:
        (item,) = level
        return item.values() if isinstance(item, dict) else item
    parts: list[Iterable[Any]] = []
    for kind in containers:
        items: list[Any] = [v for v in level if type(v) is kind]
        parts.append(chain.from_iterable(map(dict.values, items)) if kind is dict
                     else chain.from_iterable(items))
    return list(chain.from_iterable(parts))


def _entries_to_walk(item: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> Iterator[
        tuple[Any, Any]]:
    """The (key, value) entries of ``item`` that :func:`int_out_of_range`'s walk must look
    at: all of them, or, where ``item`` is long and holds only plain values, its integers
    beyond 64 bits."""
    values = item.values() if isinstance(item, dict) else item
    entries = item.items() if isinstance(item, dict) else enumerate(item)
    if len(item) < _WALK_BELOW:
        return iter(entries)
    types = set(map(type, values))
    if not types <= _PLAIN:
        return iter(entries)
    if _ints_fit(values, types):
        return iter(())
    if types <= {int, bool}:  # (comparisons at C speed)
        return compress(entries, map(operator.or_, map(INT64_MAX.__lt__, values),
                                     map(INT64_MIN.__gt__, values)))
    return ((k, v) for k, v in entries if type(v) is int and not fits_64_bits(v))


#: Error types where a YAML boolean word (``on``, ``yes``) was read for text or a number.
_TEXT_OR_NUMBER = frozenset({"string_type", "int_type", "float_type"})


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = plain_message(err["msg"])
        if err["type"] == "extra_forbidden":
            msg = _unknown_field(err["loc"])
        elif err["type"] in _TEXT_OR_NUMBER and isinstance(err.get("input"), bool):
            read = str(err["input"]).lower()
            if err["loc"][-1:] == ("[key]",):  # (pydantic names a key True by its hash, 1)
                where = ".".join(str(p) for p in err["loc"][:-2]) + f".{read} (a key)"
            msg += (f": YAML reads an unquoted on, off, yes, no, true or false as the boolean "
                    f"{read}; quote text (e.g. 'on'), or give a number")
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def _unknown_field(loc: tuple[Any, ...]) -> str:
    """``unknown field (did you mean 'x'? known: ...)`` for the key at ``loc``, as a key no
    plan knows is named inside ``acquisition.sequence``."""
    known = _fields_at(loc[:-1])
    return unknown_field_text(loc[-1], known) if known else "unknown field"


def _fields_at(loc: tuple[Any, ...]) -> set[str]:
    """The field names of the model the config holds at ``loc`` (union members as pydantic
    names them in a location, e.g. ``Compare``), or none where that is not one model."""
    kinds: list[Any] = [ServiceConfig]
    for part in loc:
        kinds = [inner for kind in kinds for inner in _inside(kind, part)]
    models = {m for kind in kinds for m in _models_of(kind)}
    if len(models) != 1:
        return set()
    (model,) = models
    return set(model.model_fields) | _OTHER_KEYS.get(model, set())


#: Keys a model takes besides its fields (a rule's ``action``: one of ``actions``).
_OTHER_KEYS: dict[type[BaseModel], set[str]] = {RuleSpec: {"action"}}


def _inside(kind: Any, part: Any) -> list[Any]:
    """The types that location ``part`` leads to from a value of type ``kind``."""
    found: list[Any] = []
    for member in _members(kind):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if isinstance(part, str) and part in member.model_fields:
                found.append(member.model_fields[part].annotation)
            elif isinstance(part, str) and _union_tag(part) == member.__name__:
                found.append(member)
        elif get_origin(member) in (list, tuple) and isinstance(part, int):
            args = [a for a in get_args(member) if a is not Ellipsis]
            found += args[part:part + 1] if len(args) > 1 else args
        elif get_origin(member) is dict and isinstance(part, str):
            found.append(get_args(member)[1])
    return found


def _union_tag(part: str) -> str | None:
    """The model a location part names as a union's member (``Compare``,
    ``function-after[_some(), Compare]``), or None."""
    name = re.search(r"(\w+)\]*$", part)
    return name[1] if name else None


def _members(kind: Any) -> list[Any]:
    """``kind`` itself, or the members of a union (``X | None``) or ``Annotated``."""
    if get_origin(kind) in (Union, UnionType, Annotated):
        args = get_args(kind)[:1] if get_origin(kind) is Annotated else get_args(kind)
        return [m for arg in args for m in _members(arg)]
    return [kind]


def _models_of(kind: Any) -> list[type[BaseModel]]:
    """The pydantic models among ``kind``'s union members."""
    return [m for m in _members(kind) if isinstance(m, type) and issubclass(m, BaseModel)]


def _expand(path: Path) -> Path:
    """``path`` with a leading ``~`` (or ``~user``) replaced by the home folder."""
    try:
        return path.expanduser()
    except RuntimeError:  # no home folder known: the path is taken literally
        return path


def _resolve(path: Path | None, base: Path | None) -> Path | None:
    """``path`` with ``~`` expanded; a relative one beside the YAML file (``base``) when it
    is there or not in the working directory either, made absolute (a recording's
    ``config.yaml`` then works from any folder)."""
    if path is None:
        return None
    path = _expand(path)
    if base is None or path.is_absolute():
        return path
    candidate = base / path
    return (candidate if candidate.exists() or not path.exists() else path).absolute()


def _resolve_paths(cfg: ServiceConfig, base: Path | None) -> None:
    """Expand ``~`` in the config's paths and resolve relative ones against ``base``."""
    hw = cfg.hardware
    hw.config_file = _resolve(hw.config_file, base) or hw.config_file
    cfg.model.path = _resolve(cfg.model.path, base)
    record = None if cfg.record.path is None else _expand(cfg.record.path)
    if record is not None and base is not None and not record.is_absolute():
        record = (base / record).absolute()  # an output: always beside the YAML
    cfg.record.path = record


def parse_config(
    data: dict[str, Any] | None, *, base_dir: Path | None = None, source: str = "config"
) -> ServiceConfig:
    """Validate a config mapping; ``~`` in paths is expanded and relative paths are
    resolved against ``base_dir``."""
    try:
        cfg = ServiceConfig.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}:\n{_format_errors(exc)}") from None
    # (own ports are checked where the service starts: serve's flags may move them apart)
    problem = int_out_of_range(cfg.model_dump(), "") or _check_prefault_memory(cfg)
    if problem is not None:
        raise ConfigError(f"invalid {source}:\n  {problem}")
    _resolve_paths(cfg, base_dir)
    return cfg


def load_config(path: str | Path | None) -> ServiceConfig:
    """Load a YAML config file (None = all defaults)."""
    if path is None:
        return parse_config({})
    p = Path(path)
    data = _read_config_file(p)
    return parse_config(data, base_dir=_base_dir(p), source=str(p))


def _base_dir(p: Path) -> Path:
    """Where relative paths in the config file ``p`` are from: its folder (a link's own, not
    its target's); for /dev/stdin or /dev/fd/N, the folder of the file they read, else (a
    pipe: ``-c <(envsubst < t.yaml)``, a FIFO) the working folder."""
    if p.is_file() and not str(p.absolute()).startswith(("/dev/", "/proc/")):
        return p.parent
    real = Path(os.path.realpath(p))
    return real.parent if real.is_file() else Path.cwd()


#: What a replay without ``--config`` takes from a recording's ``config.yaml``: how its
#: frames were analysed (section: its keys, None for all of them).
ANALYSIS_SECTIONS: dict[str, tuple[str, ...] | None] = {
    "model": ("name", "path"),  # not its backend or threads: those are the rig's
    "analysis": None, "tracking": None,
    "acquisition": ("mode", "frame_timeout_s"),
}


def load_analysis_config(path: Path) -> ServiceConfig:
    """The :data:`ANALYSIS_SECTIONS` of the config file at ``path`` (a recording's
    ``config.yaml``), everything else the defaults: its hardware, addresses, recording and
    feedback are of the rig it ran on. ConfigError as :func:`load_config`'s."""
    data = _read_config_file(path) or {}
    kept: dict[str, Any] = {}
    for section, keys in ANALYSIS_SECTIONS.items():
        value = data.get(section)
        if isinstance(value, dict) and keys is not None:
            value = {k: v for k, v in value.items() if k in keys}
        if value is not None:
            kept[section] = value
    return parse_config(kept, base_dir=path.parent, source=str(path))


def _read_config_file(p: Path) -> dict[str, Any] | None:
    """The mapping of sections in the YAML config file ``p`` (None: empty); ConfigError
    saying what to change when it cannot be read."""
    if p.is_dir():
        raise ConfigError(
            f"config path {p} is a directory; pass a YAML file to --config "
            "(e.g. configs/simulated-nuclei.yaml in a livemask checkout)"
        )
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p} ({exc}); pass a UTF-8 YAML file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(f"invalid {p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p} must contain a mapping of sections (hardware:, acquisition:, ...)")
    if "~" in text and (key := _bare_tilde_path(text)) is not None:
        raise ConfigError(
            f"invalid {p}:\n  {key}: ~ alone is YAML's null (no path), not your home folder; "
            "quote it ('~/...'), write the path, or leave the line out for the default"
        )
    return data


#: Path fields whose null is their default (a dump writes ``path: null``), so a ``~``
#: written there would silently be no path at all.
_NULLABLE_PATHS = (("model", "path"), ("record", "path"))


def _bare_tilde_path(text: str) -> str | None:
    """The first of :data:`_NULLABLE_PATHS` written as a plain ``~`` in the YAML ``text``
    (read without error before), as ``section.key``, or None."""
    root = yaml.compose(text, Loader=_UniqueKeyLoader)
    for section, key in _NULLABLE_PATHS:
        node = _child(_child(root, section), key)
        if isinstance(node, yaml.ScalarNode) and node.value == "~" and node.style is None:
            return f"{section}.{key}"
    return None


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value node of ``key`` in a YAML mapping node, or None."""
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node
    return None
