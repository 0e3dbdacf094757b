"""Backends: engine cache keys, selection and fallbacks, and torch ≡ ONNX Runtime on CPU.

TensorRT and CUDA cannot run here; what is tested is everything that does not need them
(see docs/backends.md for what was run where).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from livemask.config import ModelConfig
from livemask.errors import BackendUnavailable, ModelError
from livemask.inference import select
from livemask.inference.backend import create_backend
from livemask.inference.models import ModelCard, PostProcessing, load_model_card
from livemask.inference.tensorrt_backend import (
    ENGINE_RECIPE,
    EngineCache,
    EngineProfile,
    TensorRTBackend,
    default_cache_dir,
    engine_cache_key,
    file_sha256,
    onnx_to_fp16,
)
from livemask.inference.torch_backend import GraphPolicy

KEY_ARGS: dict[str, Any] = {
    "model_sha256": "a" * 64,
    "trt_version": "10.13.0.35",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "compute_capability": (9, 0),
    "profile": EngineProfile(),
    "precision": "fp16",
    "output_name": "probabilities",
}


def _ort(onnx: str | Path | bytes, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = onnx if isinstance(onnx, bytes) else str(onnx)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


# --------------------------------------------------------------------------- cache key


def test_engine_cache_key_is_stable() -> None:
    key = engine_cache_key(**KEY_ARGS)
    assert key == engine_cache_key(**dict(KEY_ARGS))
    assert len(key) == 64 and int(key, 16) >= 0
    # equal values of another type (list vs tuple) give the same key
    assert key == engine_cache_key(**{**KEY_ARGS, "compute_capability": [9, 0]})


@pytest.mark.parametrize(
    "change",
    [
        {"model_sha256": "b" * 64},
        {"trt_version": "11.4.0.106"},
        {"gpu_name": "NVIDIA GeForce RTX 4090"},
        {"compute_capability": (8, 9)},
        {"profile": EngineProfile(max_shape=(8, 2048, 2048))},
        {"profile": EngineProfile(opt_shape=(1, 1024, 1024))},
        {"profile": EngineProfile(min_shape=(1, 64, 64))},
        {"precision": "fp32"},
        {"output_name": "logits"},  # before: missing, so another output reused the engine
        {"workspace_mb": 4096},
        {"recipe": ENGINE_RECIPE + 1},
    ],
)
def test_engine_cache_key_changes_with_each_input(change: dict[str, Any]) -> None:
    assert engine_cache_key(**{**KEY_ARGS, **change}) != engine_cache_key(**KEY_ARGS)


def test_file_sha256(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --------------------------------------------------------------------------- profile


def test_profile_validation_and_fit() -> None:
    EngineProfile().validate(8)
    with pytest.raises(ValueError, match="min ≤ opt ≤ max"):
        EngineProfile(opt_shape=(1, 4096, 4096)).validate()
    with pytest.raises(ValueError, match="multiples of 8"):
        EngineProfile(min_shape=(1, 30, 32)).validate(8)
    with pytest.raises(ValueError, match="positive"):
        EngineProfile(min_shape=(0, 32, 32)).validate()
    p = EngineProfile.for_tile((256, 256), max_batch=8)
    assert p.input_shapes() == ((1, 1, 256, 256), (8, 1, 256, 256), (8, 1, 256, 256))
    assert p.fits(256, 256) and not p.fits(512, 256)
    assert EngineProfile().fits(2048, 32) and not EngineProfile().fits(16, 512)


# --------------------------------------------------------------------------- engine cache


def test_engine_cache_roundtrip(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    key = engine_cache_key(**KEY_ARGS)
    assert cache.load(key) is None  # nothing cached yet: first start builds
    path = cache.store(key, b"\x00engine", {"model": "nuclei"})
    assert path == tmp_path / "engines" / f"{key}.engine"
    assert cache.load(key) == b"\x00engine"  # second start loads
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta == {"key": key, "model": "nuclei"}
    assert not list((tmp_path / "engines").glob("*.tmp"))
    cache.discard(key)
    assert cache.load(key) is None and not path.with_suffix(".json").exists()
    path.write_bytes(b"")  # an empty (truncated) file counts as missing
    assert cache.load(key) is None


def test_timing_cache_per_trt_version_and_gpu(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    a = cache.timing_cache_path("10.13", "H100", (9, 0))
    assert a == cache.timing_cache_path("10.13", "H100", (9, 0))
    assert a != cache.timing_cache_path("11.4", "H100", (9, 0))
    assert a != cache.timing_cache_path("10.13", "L4", (8, 9))
    assert cache.load_timing(a) == b""
    cache.store_timing(a, b"timing")
    assert cache.load_timing(a) == b"timing"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIVEMASK_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "engines"
    monkeypatch.delenv("LIVEMASK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "livemask" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "livemask" / "engines"


# --------------------------------------------------------------------------- fp16 ONNX


def test_onnx_to_fp16_keeps_fp32_io_and_output() -> None:
    card = load_model_card("nuclei")
    data = card.onnx_path.read_bytes()
    half = onnx_to_fp16(data)
    assert len(half) < 0.6 * len(data)  # weights stored in fp16
    x = np.random.default_rng(0).random((1, 1, 64, 96), dtype=np.float32)
    got = _ort(half, x)
    assert got.dtype == np.float32
    diff = np.abs(got - _ort(data, x))
    assert diff.max() < 3e-2 and diff.mean() < 1e-3  # fp16 rounding, not a different model


def test_onnx_to_fp16_refuses_unknown_operators() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("Softmax", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="Softmax"):
        onnx_to_fp16(model.SerializeToString())
    assert onnx is not None


# --------------------------------------------------------------------------- selection


def _probes(monkeypatch: pytest.MonkeyPatch, **available: bool) -> None:
    for name in select.BACKEND_NAMES:
        ok = available.get(name, False)
        status = select.BackendStatus(name, ok, "test device" if ok else f"no {name} here")

        def probe(s: select.BackendStatus = status) -> select.BackendStatus:
            return s

        monkeypatch.setitem(select.PROBES, name, probe)


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        ({"tensorrt": True, "torch": True, "onnxruntime": True}, "tensorrt"),
        ({"torch": True, "onnxruntime": True}, "torch"),
        ({"onnxruntime": True}, "onnxruntime"),
    ],
)
def test_auto_picks_the_fastest_available(
    monkeypatch: pytest.MonkeyPatch, available: dict[str, bool], expected: str
) -> None:
    _probes(monkeypatch, **available)
    assert select.choose_backend("auto") == expected


def test_auto_prefers_torch_when_frames_are_labelled_on_the_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: auto took TensorRT, whose host outputs turned device_analysis off silently
    (CPU labelling, 217 ms a 2048² frame against 15 ms on the GPU; GPU review)."""
    _probes(monkeypatch, tensorrt=True, torch=True, onnxruntime=True)
    with caplog.at_level(logging.INFO, logger="livemask"):
        assert select.candidates("auto", device_analysis=True) == [
            "torch", "tensorrt", "onnxruntime"]
    assert "torch before tensorrt" in caplog.text
    assert select.candidates("auto") == ["tensorrt", "torch", "onnxruntime"]
    assert select.candidates("tensorrt", device_analysis=True) == ["tensorrt"]
    _probes(monkeypatch, tensorrt=True, onnxruntime=True)
    assert select.candidates("auto", device_analysis=True) == ["tensorrt", "onnxruntime"]


def test_auto_logs_each_unavailable_backend(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _probes(monkeypatch, onnxruntime=True)
    with caplog.at_level(logging.INFO, logger="livemask"):
        assert select.choose_backend("auto") == "onnxruntime"
    text = caplog.text
    assert "tensorrt unavailable (no tensorrt here)" in text
    assert "torch unavailable (no torch here)" in text
    assert "using onnxruntime" in text


@pytest.mark.parametrize(("name", "hint"), [("tensorrt", ".[gpu]"), ("torch", ".[torch]")])
def test_explicit_unavailable_backend_is_an_error(
    monkeypatch: pytest.MonkeyPatch, name: str, hint: str
) -> None:
    _probes(monkeypatch, onnxruntime=True)
    with pytest.raises(BackendUnavailable) as info:
        create_backend(name)
    message = str(info.value)
    assert f"no {name} here" in message and hint in message
    assert "model.backend: auto" in message


def test_unknown_backend_is_an_error() -> None:
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'cuda'.*auto, tensorrt"):
        create_backend("cuda")


def test_runtime_specific_cards_keep_their_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> select.BackendStatus:
        raise AssertionError("no probe should run for a classical card")

    for name in select.BACKEND_NAMES:
        monkeypatch.setitem(select.PROBES, name, fail)
    card = load_model_card("nuclei_classical")
    backend = create_backend("tensorrt", card=card)
    assert backend.name == "classical"
    rf = load_model_card("nuclei_rf")
    assert create_backend("torch", card=rf, threads=1).name == "random-forest"


def test_auto_on_this_machine_builds_a_backend() -> None:
    """Real probes; on a machine without an NVIDIA driver auto is onnxruntime."""
    statuses = select.available_backends()
    assert list(statuses) == list(select.BACKEND_NAMES)
    assert statuses["onnxruntime"].available
    backend = create_backend("auto", threads=1)
    assert backend.name in select.BACKEND_NAMES
    if not select.nvidia_driver()[0]:
        assert backend.name == "onnxruntime"
        assert not statuses["tensorrt"].available and not statuses["torch"].available
        assert "NVIDIA driver" in statuses["torch"].detail or "not installed" in (
            statuses["tensorrt"].detail
        )


class _FakeBackend:
    def __init__(self, name: str, fail: Exception | None = None) -> None:
        self.name = name
        self.device = "test"
        self.fail = fail
        self.loaded = False
        self.closed = False

    def load(self, card: ModelCard) -> None:
        if self.fail is not None:
            raise self.fail
        self.loaded = True

    def warmup(self, shape: tuple[int, int]) -> None:
        pass

    def run(self, batch: np.ndarray) -> np.ndarray:
        return batch

    def close(self) -> None:
        self.closed = True


def _fake_instantiate(
    monkeypatch: pytest.MonkeyPatch, failures: dict[str, Exception]
) -> list[_FakeBackend]:
    made: list[_FakeBackend] = []

    def instantiate(name: str, *, threads: int = 2, **_: object) -> _FakeBackend:
        made.append(_FakeBackend(name, failures.get(name)))
        return made[-1]

    monkeypatch.setattr(select, "instantiate", instantiate)
    return made


def test_load_backend_auto_falls_back_when_a_gpu_backend_fails_to_load(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _probes(monkeypatch, tensorrt=True, torch=True, onnxruntime=True)
    made = _fake_instantiate(monkeypatch, {
        "tensorrt": BackendUnavailable("engine build failed"),
        "torch": ModelError("not a U-Net"),
    })
    card = load_model_card("nuclei")
    with caplog.at_level(logging.INFO, logger="livemask"):
        backend = select.load_backend("auto", card, threads=1)
    assert backend.name == "onnxruntime"
    assert [b.name for b in made] == ["tensorrt", "torch", "onnxruntime"]
    assert made[0].closed and made[1].closed and made[2].loaded
    assert ("tensorrt failed to load nuclei (BackendUnavailable: engine build failed); "
            "trying torch") in caplog.text


def test_load_backend_explicit_failure_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    _probes(monkeypatch, tensorrt=True, onnxruntime=True)
    _fake_instantiate(monkeypatch, {"tensorrt": BackendUnavailable("engine build failed")})
    with pytest.raises(BackendUnavailable, match="engine build failed"):
        select.load_backend("tensorrt", load_model_card("nuclei"))


def test_model_config_backend_choices() -> None:
    for name in select.BACKEND_CHOICES:
        assert ModelConfig(backend=name).backend == name  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ModelConfig(backend="cuda")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- constructors


def test_tensorrt_backend_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(BackendUnavailable) as info:
        TensorRTBackend()
    message = str(info.value)
    assert "TensorRT" in message and ".[gpu]" in message and "model.backend: auto" in message


def test_torch_backend_without_cuda() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    from livemask.inference.torch_backend import TorchBackend

    with pytest.raises(BackendUnavailable, match=r"needs a CUDA GPU.*model\.backend: auto"):
        TorchBackend(device="cuda")


def test_torch_backend_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from livemask.inference.torch_backend import TorchBackend

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailable, match=r"\.\[torch\]"):
        TorchBackend(device="cpu")


# --------------------------------------------------------------------------- CUDA graph policy


def test_graph_policy_captures_repeated_shapes_and_evicts_lru() -> None:
    p = GraphPolicy(max_graphs=2)
    a, b, c = (1, 1, 64, 64), (1, 1, 128, 128), (2, 1, 64, 64)
    assert p.decide(a) == "eager"  # first sight: no capture for one-off shapes
    assert p.decide(a) == "capture"
    assert p.captured(a) is None
    assert p.decide(a) == "replay"
    assert p.decide(b) == "eager"
    assert p.decide(b) == "capture"
    assert p.captured(b) is None
    assert p.decide(a) == "replay"  # a is now the most recently used
    assert p.decide(c) == "eager"
    assert p.decide(c) == "capture"
    assert p.captured(c) == b  # b is evicted, not a
    assert p.decide(b) == "capture"
    assert p.captured(b) == a
    with pytest.raises(ValueError):
        GraphPolicy(0)


def test_a_failed_capture_runs_eagerly_and_keeps_the_other_graphs() -> None:
    """Before: a failed shape was captured again on every frame (three warm-up passes and a
    warning each time), and each try first evicted a good graph (GPU review)."""
    p = GraphPolicy(max_graphs=1)
    a, b = (1, 1, 64, 64), (1, 1, 128, 128)
    for shape in (a, a):
        p.decide(shape)
    p.captured(a)
    assert [p.decide(b), p.decide(b)] == ["eager", "capture"]
    p.forget(b)  # its capture failed
    assert [p.decide(b) for _ in range(3)] == ["eager"] * 3
    assert p.decide(a) == "replay"  # a's graph was not dropped for b's failed try
    p.clear()
    assert [p.decide(b), p.decide(b)] == ["eager", "capture"]  # a new model tries again


# --------------------------------------------------------------------------- torch on CPU


@pytest.fixture(scope="module")
def torch_cpu() -> Any:
    torch = pytest.importorskip("torch")
    return torch


def test_torch_backend_tries_a_failed_capture_once(
    torch_cpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemask.inference.torch_backend import TorchBackend

    backend = TorchBackend(device="cpu")
    tried: list[tuple[int, ...]] = []

    def capture_fails(shape: tuple[int, ...]) -> Any:
        tried.append(shape)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(backend, "_capture", capture_fails)
    shape = (1, 1, 64, 64)
    assert [backend._graph_for(shape) for _ in range(5)] == [None] * 5
    assert tried == [shape]


def test_torch_cpu_equals_onnxruntime_on_the_shipped_model(torch_cpu: Any) -> None:
    from livemask.inference.torch_backend import TorchBackend

    card = load_model_card("nuclei")
    backend = TorchBackend(threads=torch_cpu.get_num_threads(), device="cpu", fp16=False)
    backend.load(card)
    assert backend.device == "cpu" and backend.max_difference is not None
    assert backend.max_difference < 1e-4
    rng = np.random.default_rng(5)
    for shape in [(1, 1, 128, 128), (2, 1, 64, 200)]:
        x = rng.random(shape, dtype=np.float32)
        got = backend.run(x)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        expected = _ort(card.onnx_path, x)
        assert got.shape == expected.shape == (shape[0], 2, shape[2], shape[3])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    backend.warmup((64, 64))
    backend.close()
    with pytest.raises(ModelError, match="before load"):
        backend.run(np.zeros((1, 1, 64, 64), np.float32))


def _export_unet(torch: Any, path: Path, *, fold: bool, out_channels: int) -> None:
    from livemask.training.unet import ProbabilityModel, UNet

    torch.manual_seed(1)
    net = UNet((4, 8, 16), out_channels=out_channels)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ProbabilityModel(net).eval(), (torch.zeros(1, 1, 32, 32),), buf,
            input_names=["image"], output_names=["probabilities"],
            dynamic_axes={"image": {0: "b", 2: "h", 3: "w"},
                          "probabilities": {0: "b", 2: "h", 3: "w"}},
            opset_version=17, dynamo=False, do_constant_folding=fold,
        )
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("fold", [True, False], ids=["bn-folded", "bn-nodes"])
def test_torch_converts_other_unets(torch_cpu: Any, tmp_path: Path, fold: bool) -> None:
    from livemask.inference.torch_backend import unet_from_onnx, verify_against_onnxruntime

    path = tmp_path / "g.onnx"
    _export_unet(torch_cpu, path, fold=fold, out_channels=1)
    card = ModelCard(name="g", file="g.onnx", task="grains", outputs=["boundary"],
                     postprocessing=PostProcessing(method="boundary-label"),
                     architecture="U-Net, 3 levels (4/8/16 channels)",
                     card_path=tmp_path / "g.yaml")
    module = unet_from_onnx(path, card)
    from livemask.training.unet import UNet

    assert isinstance(module.net, UNet) and module.net.channels == (4, 8, 16)
    assert verify_against_onnxruntime(module, path, size=32) < 1e-4
    x = np.random.default_rng(2).random((1, 1, 48, 40), dtype=np.float32)
    with torch_cpu.no_grad():
        got = module(torch_cpu.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _ort(path, x), atol=1e-4, rtol=0)


def test_torch_refuses_what_it_cannot_convert(torch_cpu: Any, tmp_path: Path) -> None:
    from livemask.inference.torch_backend import unet_from_onnx

    rf = load_model_card("nuclei_rf")
    with pytest.raises(ModelError, match="onnxruntime"):
        unet_from_onnx(rf.onnx_path, replace_card(rf, architecture=""))
    nuclei = load_model_card("nuclei")
    wrong = replace_card(nuclei, architecture="U-Net, 4 levels (16/32/64/128 channels)")
    with pytest.raises(ModelError, match=r"16/32/64/128 channels.*8/16/32/64"):
        unet_from_onnx(nuclei.onnx_path, wrong)
    with pytest.raises(ModelError, match="U-Nets only"):
        unet_from_onnx(nuclei.onnx_path, replace_card(nuclei, architecture="ResNet-18"))
    with pytest.raises(ModelError, match="outputs"):
        unet_from_onnx(nuclei.onnx_path, replace_card(nuclei, outputs=["boundary"]))


def replace_card(card: ModelCard, **changes: Any) -> ModelCard:
    new = card.model_copy(update=changes)
    new.card_path = card.card_path
    return new


def test_probe_functions_return_statuses() -> None:
    funcs: list[Callable[[], select.BackendStatus]] = [
        select.probe_tensorrt, select.probe_torch, select.probe_onnxruntime
    ]
    for f in funcs:
        status = f()
        assert isinstance(status, select.BackendStatus) and status.detail
    assert replace(select.probe_onnxruntime(), detail="x").detail == "x"


# --------------------------------------------------------------------------- engine reuse


class _FakeILogger:
    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self) -> None:
        pass


class _FakeRuntime:
    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes) -> Any:
        return None if data == b"corrupt" else ("engine", data)


def test_tensorrt_load_builds_once_then_reuses_the_cached_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The load() cache logic with TensorRT and CUDA replaced by fakes (build/setup stubbed)."""
    import contextlib
    from types import SimpleNamespace

    from livemask.inference import tensorrt_backend as tb

    fake_trt = SimpleNamespace(__version__="10.99.0", ILogger=_FakeILogger,
                               BuilderFlag=SimpleNamespace(FP16=1), Runtime=_FakeRuntime)
    props = SimpleNamespace(name="Fake GPU", major=8, minor=9)
    fake_torch = SimpleNamespace(version=SimpleNamespace(cuda="12.8"), cuda=SimpleNamespace(
        get_device_properties=lambda i: props, device=lambda i: contextlib.nullcontext()))
    monkeypatch.setattr(tb, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(tb, "import_torch_cuda", lambda: fake_torch)
    builds: list[str] = []

    def build(self: TensorRTBackend, card: ModelCard) -> bytes:
        builds.append(card.name)
        return b"plan"

    monkeypatch.setattr(TensorRTBackend, "_build", build)
    monkeypatch.setattr(TensorRTBackend, "_setup", lambda self, card: None)
    card = load_model_card("nuclei")

    first = TensorRTBackend(cache_dir=tmp_path, max_batch=2)
    first.load(card)
    assert first.built and builds == ["nuclei"]
    assert first.profile == EngineProfile((1, 8, 8), (1, 1024, 1024), (2, 1024, 1024))
    expected = engine_cache_key(
        model_sha256=file_sha256(card.onnx_path), trt_version="10.99.0", gpu_name="Fake GPU",
        compute_capability=(8, 9), profile=first.profile, precision="fp16",
        output_name="probabilities",
    )
    assert first.engine_key == expected
    engine_file = tmp_path / f"{expected}.engine"
    assert engine_file.read_bytes() == b"plan"
    meta = json.loads(engine_file.with_suffix(".json").read_text())
    assert meta["gpu_name"] == "Fake GPU" and meta["model"] == "nuclei"
    assert meta["output_name"] == "probabilities"

    second = TensorRTBackend(cache_dir=tmp_path, max_batch=2)
    second.load(card)
    assert not second.built and builds == ["nuclei"]  # second start: no build

    engine_file.write_bytes(b"corrupt")  # e.g. a driver update made it unloadable
    third = TensorRTBackend(cache_dir=tmp_path, max_batch=2)
    third.load(card)
    assert third.built and builds == ["nuclei", "nuclei"]
    assert engine_file.read_bytes() == b"plan"

    fp32 = TensorRTBackend(cache_dir=tmp_path, max_batch=2, fp16=False)
    fp32.load(card)
    assert fp32.built and fp32.engine_key != expected
    with pytest.raises(ModelError, match="before load"):
        fp32.run(np.zeros((1, 1, 64, 64), np.float32))


def test_torch_verification_compares_the_output_the_card_names(
    torch_cpu: Any, tmp_path: Path
) -> None:
    """A [logits, probabilities] model: the check compared against the first output, so a
    right conversion was refused as "differs from ONNX Runtime" (review)."""
    from livemask.inference.torch_backend import verify_against_onnxruntime
    from tests.test_model_checks import build_model

    path = build_model(tmp_path / "two.onnx", logits_out=True)

    class Probabilities(torch_cpu.nn.Module):  # type: ignore[misc,name-defined]
        def forward(self, x: Any) -> Any:
            bias = torch_cpu.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
            return torch_cpu.sigmoid(2.0 * x.repeat(1, 2, 1, 1) + bias)

    module = Probabilities()
    assert verify_against_onnxruntime(module, path, size=16, output="probabilities") < 1e-5
    with pytest.raises(ModelError, match=r"differs from ONNX Runtime"):
        verify_against_onnxruntime(module, path, size=16)  # the first output: the logits


# ------------------------------------------------------ ONNX Runtime run-failure advice
def test_onnxruntime_failure_gives_size_multiple_advice_only_for_height_and_width(
    tmp_path: Path,
) -> None:
    """A model failing on its input channels was told to set size_multiple (bug hunt:
    make_dync.py); the advice now comes only when the padded batch runs, with the number."""
    import shutil

    import yaml

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from livemask.inference.models import MODELS_DIR
    from livemask.inference.onnxruntime_backend import OnnxRuntimeBackend

    weights = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(  # a 3-channel convolution under a symbolic channel axis
        [helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["y"], ["probabilities"])], "rgb",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                       ["n", 2, "h", "w"])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "rgb.onnx"))
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    (tmp_path / "rgb.yaml").write_text(yaml.safe_dump({**card, "file": "rgb.onnx"}))
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(load_model_card(tmp_path / "rgb.yaml"))
    with pytest.raises(ModelError) as info:
        backend.run(np.zeros((1, 1, 36, 44), np.float32))
    assert "ONNX Runtime failed to run" in str(info.value)
    assert "size_multiple" not in str(info.value)

    shutil.copy(MODELS_DIR / "nuclei.onnx", tmp_path / "unet.onnx")  # pools three times
    (tmp_path / "unet.yaml").write_text(yaml.safe_dump(
        {**card, "file": "unet.onnx", "size_multiple": 4}))
    backend.load(load_model_card(tmp_path / "unet.yaml"))
    with pytest.raises(ModelError, match=r"multiples of 8 .*set size_multiple in its card to 8"):
        backend.run(np.zeros((1, 1, 36, 44), np.float32))

