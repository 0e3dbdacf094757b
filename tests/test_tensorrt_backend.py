"""TensorRT backend parts that run without TensorRT: the fp16 ONNX conversion (checked by the
ONNX checker and ONNX Runtime), the profile derived from the model card, cache-write failures,
the build and run logic against fakes of the TensorRT API, and ``auto``'s fallback.

The fakes follow the TensorRT 10/11 Python API as documented and as in NVIDIA/TensorRT's
python/src (pyCore.cpp, pyOnnx.cpp); they check livemask's calls, not TensorRT.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from livemask.errors import BackendUnavailable, ModelError
from livemask.inference import select
from livemask.inference import tensorrt_backend as tb
from livemask.inference.models import ModelCard, load_model_card
from livemask.inference.tensorrt_backend import (
    EngineCache,
    EngineProfile,
    TensorRTBackend,
    engine_cache_key,
    file_sha256,
    onnx_sha256,
    onnx_to_fp16,
    shared_logger,
)
from livemask.inference.tiling import needs_tiling, plan_tiles
from tests.test_backends import _FakeBackend, _FakeILogger, _FakeRuntime

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

# --------------------------------------------------------------------------- fp16 ONNX


def _ort_run(model: bytes, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def _conv_resize_model(op: str, opset: int, *, ir_version: int | None = None,
                       initializers_as_inputs: bool = False, scales_also_mul: bool = False
                       ) -> Any:
    """x (1, 1, 8, 8) → Conv 3×3 (2 channels) → Resize/Upsample ×2 → y (1, 2, 16, 16).

    ``scales_also_mul``: ×0.5 instead, then a Mul of the (1, 2, 4, 4) result by the scales.
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.array([0.1, -0.2], np.float32), "b")
    f = 0.5 if scales_also_mul else 2.0
    scales = numpy_helper.from_array(np.array([1, 1, f, f], np.float32), "scales")
    roi = numpy_helper.from_array(np.zeros(0, np.float32), "roi")
    inits = [w, b, scales]
    if op == "Resize" and opset >= 11:
        inputs, inits = ["c", "roi", "scales"], [*inits, roi]
    else:  # Resize 10 and Upsample 9: (X, scales)
        inputs = ["c", "scales"]
    up_out = "u" if scales_also_mul else "y"
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node(op, inputs, [up_out], mode="linear" if op == "Resize" else "nearest")]
    if scales_also_mul:  # the scales used as an fp16 operand too: no valid conversion
        nodes.append(helper.make_node("Mul", ["u", "scales"], ["y"]))
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])
    graph_inputs = [x_info]
    if initializers_as_inputs:
        graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                         for t in inits]
    graph = helper.make_graph(
        nodes, "g", graph_inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, int(8 * f), int(8 * f)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(
    ("op", "opset", "ir_version", "as_inputs"),
    [("Resize", 13, None, False), ("Resize", 18, None, True), ("Resize", 10, None, False),
     ("Upsample", 9, None, False), ("Upsample", 9, 3, True)],
    ids=["resize13", "resize18-inits-as-inputs", "resize10", "upsample9", "upsample9-ir3"],
)
def test_onnx_to_fp16_keeps_resize_scales_fp32(
    op: str, opset: int, ir_version: int | None, as_inputs: bool
) -> None:
    model = _conv_resize_model(op, opset, ir_version=ir_version, initializers_as_inputs=as_inputs)
    data = model.SerializeToString()
    half = onnx.load_from_string(onnx_to_fp16(data))
    onnx.checker.check_model(half, full_check=True)
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert types["w"] == types["b"] == TensorProto.FLOAT16
    assert types["scales"] == TensorProto.FLOAT
    if "roi" in types:
        assert types["roi"] == TensorProto.FLOAT
    declared = {i.name: i.type.tensor_type.elem_type for i in half.graph.input}
    for name, dtype in declared.items():  # graph inputs that are initializers match them
        assert dtype == types.get(name, TensorProto.FLOAT)
    x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    got = _ort_run(half.SerializeToString(), x)
    assert got.dtype == np.float32 and got.shape == (1, 2, 16, 16)
    np.testing.assert_allclose(got, _ort_run(data, x), atol=5e-3, rtol=0)


def test_onnx_to_fp16_refuses_what_cannot_be_typed() -> None:
    model = _conv_resize_model("Resize", 13, scales_also_mul=True)
    with pytest.raises(ModelError, match="not valid ONNX"):
        onnx_to_fp16(model.SerializeToString())


# --------------------------------------------------------------------------- profile


def _card(**changes: Any) -> ModelCard:
    nuclei = load_model_card("nuclei")
    card = nuclei.model_copy(update=changes)
    card.card_path = nuclei.card_path
    return card


def test_profile_derived_from_the_card() -> None:
    assert EngineProfile.for_card(_card()) == EngineProfile(
        (1, 8, 8), (1, 1024, 1024), (4, 1024, 1024))
    odd = _card(tile_px=1000, size_multiple=16, max_batch=2)
    assert EngineProfile.for_card(odd) == EngineProfile(
        (1, 16, 16), (1, 992, 992), (2, 992, 992))
    assert EngineProfile.for_card(odd, max_batch=6).max_shape == (6, 992, 992)
    EngineProfile.for_card(odd).validate(16)
    with pytest.raises(ModelError, match="smaller than size_multiple"):
        EngineProfile.for_card(_card(tile_px=16, size_multiple=32))
    with pytest.raises(ModelError, match="min ≤ opt ≤ max"):
        EngineProfile(opt_shape=(1, 4096, 4096)).validate()
    # the engine cache key follows the card's profile
    keys = {engine_cache_key(model_sha256="a" * 64, trt_version="10", gpu_name="g",
                             compute_capability=(9, 0), precision="fp16",
                             output_name="probabilities", profile=EngineProfile.for_card(c))
            for c in (_card(), odd, _card(max_batch=8))}
    assert len(keys) == 3


@pytest.mark.parametrize("shape", [(512, 512), (1000, 1030), (1024, 1024), (1030, 200),
                                   (2048, 2048), (3000, 700), (9, 9)])
@pytest.mark.parametrize("tile_px", [1024, 500])
def test_card_profile_covers_what_the_segmenter_sends(
    shape: tuple[int, int], tile_px: int
) -> None:
    card = _card(tile_px=tile_px)
    profile = EngineProfile.for_card(card)
    m = card.size_multiple
    if needs_tiling(shape, card.tile_px, m):
        plan = plan_tiles(shape, tile_px=card.tile_px, overlap_px=card.tile_overlap_px,
                          max_batch=card.max_batch, size_multiple=m)
        sent = [(n, *plan.tile_shape) for n in plan.batch_sizes]
    else:
        sent = [(1, -(-shape[0] // m) * m, -(-shape[1] // m) * m)]
    for n, h, w in sent:
        assert profile.fits(h, w) and 1 <= n <= profile.max_shape[0], (n, h, w)
    h, w = profile.warmup_shape(shape, m)
    assert profile.fits(h, w) and h % m == 0 and w % m == 0


@pytest.mark.parametrize(("frame", "opt"), [
    ((512, 512), (1, 512, 512)),  # whole: the padded frame
    ((500, 1001), (1, 504, 1008)),
    ((3, 3), (1, 8, 8)),
    ((2048, 2048), (4, 728, 728)),  # tiled: the plan's tiles in its largest batch
    ((1030, 200), (2, 552, 200)),
    ((0, 512), (1, 1024, 1024)),  # no usable shape: the largest whole frame
])
def test_card_profile_optimum_is_what_the_camera_sends(
    frame: tuple[int, int], opt: tuple[int, int, int]
) -> None:
    card = _card()
    profile = EngineProfile.for_card(card, frame_shape=frame)
    assert profile.opt_shape == opt
    assert (profile.min_shape, profile.max_shape) == ((1, 8, 8), (4, 1024, 1024))
    profile.validate(card.size_multiple)
    if min(frame) > 0 and needs_tiling(frame, card.tile_px, card.size_multiple):
        plan = plan_tiles(frame, tile_px=card.tile_px, overlap_px=card.tile_overlap_px,
                          max_batch=card.max_batch, size_multiple=card.size_multiple)
        assert (max(plan.batch_sizes), *plan.tile_shape) == opt
    assert EngineProfile.for_card(card, 2, frame).opt_shape[0] <= 2  # within max_batch


def test_warmup_shape_pads_and_clamps() -> None:
    p = EngineProfile.for_card(_card())
    assert p.warmup_shape((500, 1001), 8) == (504, 1008)
    assert p.warmup_shape((2048, 2048), 8) == (1024, 1024)
    assert p.warmup_shape((3, 3), 8) == (8, 8)


# --------------------------------------------------------------------------- fakes


class _Config:
    def __init__(self, calls: dict[str, Any]) -> None:
        self.calls = calls
        self.flags = {"TF32"}  # TensorRT's default

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        pass

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, data: bytes) -> Any:
        return ("timing", bytes(data))

    def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
        return True

    def add_optimization_profile(self, profile: Any) -> int:
        return int(self.calls["profile_index"])

    def get_timing_cache(self) -> Any:
        return SimpleNamespace(serialize=lambda: b"timing")


def _fake_trt(calls: dict[str, Any], *, version: str = "10.99.0", trt11: bool = False) -> Any:
    """A stand-in for the ``tensorrt`` module; ``calls`` records what livemask asked of it."""
    class Network:
        num_inputs = 1

        def __init__(self) -> None:
            self.outputs = [SimpleNamespace(name=n)
                            for n in calls.get("outputs", ["probabilities"])]
            calls["network"] = self

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> Any:
            return SimpleNamespace(name="image")

        def get_output(self, i: int) -> Any:
            return self.outputs[i]

        def unmark_output(self, tensor: Any) -> None:
            self.outputs.remove(tensor)

    class Parser:
        num_errors = 1

        def __init__(self, net: Any, logger: Any) -> None:
            calls["parser_logger"] = logger

        def parse(self, model: bytes, path: str | None = None) -> bool:
            calls["parse"] = bytes(model)
            return bool(calls.get("parses", True))

        def parse_from_file(self, model: str) -> bool:
            calls["parse_from_file"] = model
            return bool(calls.get("parses", True))

        def get_error(self, i: int) -> str:
            return "unsupported operator"

    class Builder:
        def __init__(self, logger: Any) -> None:
            calls["builder_logger"] = logger

        def create_network(self, flags: int) -> Any:
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self) -> _Config:
            calls["config"] = _Config(calls)
            return calls["config"]

        def create_optimization_profile(self) -> Any:
            def set_shape(name: str, *shapes: Any) -> None:
                calls["set_shape"] = (name, *shapes)
            return SimpleNamespace(set_shape=set_shape)

        def build_serialized_network(self, net: Any, config: Any) -> bytes:
            return b"plan"

    flags = dict(TF32="TF32") if trt11 else dict(TF32="TF32", FP16="FP16")
    calls.setdefault("profile_index", 0)
    return SimpleNamespace(
        __version__=version, ILogger=_FakeILogger, Runtime=_FakeRuntime, Builder=Builder,
        OnnxParser=Parser, BuilderFlag=SimpleNamespace(**flags),
        MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=3),
    )


def _fake_torch() -> Any:
    props = SimpleNamespace(name="Fake GPU", major=8, minor=9)
    return SimpleNamespace(version=SimpleNamespace(cuda="12.8"), cuda=SimpleNamespace(
        get_device_properties=lambda i: props,
        device=lambda i: contextlib.nullcontext(),
        stream=lambda s: contextlib.nullcontext(),
    ))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install fakes of tensorrt and torch.cuda; returns a function (trt11=...) → calls."""
    def install(**kwargs: Any) -> dict[str, Any]:
        calls: dict[str, Any] = {}
        trt = _fake_trt(calls, **kwargs)
        monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(tb, "import_torch_cuda", _fake_torch)
        monkeypatch.setattr(TensorRTBackend, "_setup", lambda self, card: None)
        return calls
    return install


# --------------------------------------------------------------------------- build (faked)


def _conv_model(shape: list[int | str], external: Path | None = None) -> Any:
    """A 3×3 convolution, 1 → 2 channels, with input (and output) ``shape``."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(2, 1, 3, 3)).astype(np.float32), "w")
    out = [shape[0], 2, shape[2], shape[3]]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["probabilities"], pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, out)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_model_with_fixed_sizes_gets_a_profile_pinned_to_them(
    fake: Any, tmp_path: Path
) -> None:
    """Before: the profile ranged over the card's sizes (min 8×8) for a network declaring a
    static (1, 1, 64, 64) input, which TensorRT rejects (GPU review)."""
    calls = fake()
    onnx.save(_conv_model([1, 1, 64, 64]), tmp_path / "fixed.onnx")
    card = _card(file="fixed.onnx", tile_px=64, tile_overlap_px=8)
    card.card_path = tmp_path / "fixed.yaml"
    backend = TensorRTBackend(cache_dir=tmp_path / "engines")
    backend.load(card)
    assert calls["set_shape"] == ("image", *[(1, 1, 64, 64)] * 3)
    assert backend.profile == EngineProfile((1, 64, 64), (1, 64, 64), (1, 64, 64))
    dynamic = EngineProfile((1, 8, 8), (2, 64, 64), (4, 64, 64))
    assert dynamic.pinned(("N", None, 64)) == EngineProfile(
        (1, 8, 64), (2, 64, 64), (4, 64, 64))


def test_only_the_cards_output_is_built(fake: Any, tmp_path: Path) -> None:
    """Before: a network with several outputs (its card naming one) failed to build."""
    calls = fake()
    backend = TensorRTBackend(cache_dir=tmp_path, profile=EngineProfile.for_card(_card()))
    calls["outputs"] = ["logits", "probabilities"]
    assert backend._build(_card()) == b"plan"
    assert [t.name for t in calls["network"].outputs] == ["probabilities"]
    calls["outputs"] = ["logits", "scores"]
    with pytest.raises(ModelError, match=r"one named 'probabilities'"):
        backend._build(_card())


def _two_output_model() -> Any:
    """A 3×3 convolution (1 → 2 channels) with two outputs: ``logits`` and their sigmoid,
    ``probabilities``."""
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    out = ["N", 2, "H", "W"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["logits"], ["probabilities"])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, out)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _two_output_card(tmp_path: Path, output_name: str) -> ModelCard:
    if not (tmp_path / "two.onnx").exists():
        onnx.save(_two_output_model(), tmp_path / "two.onnx")
    card = _card(file="two.onnx", output_name=output_name)
    card.card_path = tmp_path / "two.yaml"
    return card


def test_the_engine_key_follows_the_cards_output(fake: Any, tmp_path: Path) -> None:
    """Before: the key left out the output kept, so naming the other output of a
    two-output network reused the engine built for the first (GPU review)."""
    calls = fake()
    loaded: dict[str, TensorRTBackend] = {}
    for name in ("logits", "probabilities"):
        calls["outputs"] = ["logits", "probabilities"]
        backend = TensorRTBackend(cache_dir=tmp_path / "engines")
        backend.load(_two_output_card(tmp_path, name))
        assert backend.built, name  # each output gets its own engine
        assert [t.name for t in calls["network"].outputs] == [name]
        loaded[name] = backend
    assert loaded["logits"].engine_key != loaded["probabilities"].engine_key
    for name, backend in loaded.items():
        meta = tmp_path / "engines" / f"{backend.engine_key}.json"
        assert json.loads(meta.read_text())["output_name"] == name
    again = TensorRTBackend(cache_dir=tmp_path / "engines")
    again.load(_two_output_card(tmp_path, "logits"))
    assert not again.built and again.engine_key == loaded["logits"].engine_key


def test_an_engine_computing_another_output_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A cached engine whose one output is not the card's output_name (an engine cached
    under an older key) is refused with what to delete, not run as probabilities."""
    engine = SimpleNamespace(num_io_tensors=2, get_tensor_name=["image", "logits"].__getitem__,
                             get_tensor_mode=lambda n: "INPUT" if n == "image" else "OUTPUT")
    trt = _fake_trt({})
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tb, "import_torch_cuda", _fake_torch)
    monkeypatch.setattr(TensorRTBackend, "_build", lambda self, card: b"plan")
    backend = TensorRTBackend(cache_dir=tmp_path)
    with pytest.raises(ModelError, match=r"computes output 'logits', not 'probabilities' "
                                         r"\(the card's output_name\): delete"):
        backend.load(_two_output_card(tmp_path, "probabilities"))


def test_the_model_hash_covers_external_weights(tmp_path: Path) -> None:
    """Before: only the .onnx file was hashed, so retrained weights in its external-data
    file reused the old engine (GPU review)."""
    path = tmp_path / "m.onnx"
    onnx.save(_conv_model(["N", 1, "H", "W"]), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.weights", size_threshold=0)
    before, onnx_file = onnx_sha256(path), file_sha256(path)
    weights = tmp_path / "m.weights"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert file_sha256(path) == onnx_file  # the .onnx is unchanged
    assert onnx_sha256(path) != before
    inline = tmp_path / "inline.onnx"
    onnx.save(_conv_model(["N", 1, "H", "W"]), inline)
    assert onnx_sha256(inline) == file_sha256(inline)


def test_timing_caches_are_apart_per_precision_and_cuda(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    fp16 = cache.timing_cache_path("10", "g", (9, 0), "fp16", "12.8")
    assert fp16 != cache.timing_cache_path("10", "g", (9, 0), "fp32", "12.8")
    assert fp16 != cache.timing_cache_path("10", "g", (9, 0), "fp16", "13.0")


def test_build_fp16_fp32_and_the_profile(fake: Any, tmp_path: Path) -> None:
    calls = fake()
    card = _card(max_batch=2)
    fp16 = TensorRTBackend(cache_dir=tmp_path)
    fp16.load(card)
    assert fp16.profile == EngineProfile((1, 8, 8), (1, 1024, 1024), (2, 1024, 1024))
    assert calls["set_shape"] == ("image", (1, 1, 8, 8), (1, 1, 1024, 1024), (2, 1, 1024, 1024))
    assert calls["parse_from_file"] == str(card.onnx_path)  # external data stays findable
    assert calls["config"].flags == {"FP16", "TF32"}
    # one logger for every builder, parser and runtime, across backends
    assert calls["builder_logger"] is calls["parser_logger"] is fp16._logger
    fp32 = TensorRTBackend(cache_dir=tmp_path, fp16=False)
    assert fp32._logger is fp16._logger is shared_logger(tb.import_tensorrt())
    fp32.load(card)
    assert calls["config"].flags == set()  # no TF32: fp32 means fp32
    assert fp32.engine_key != fp16.engine_key
    assert (tmp_path / f"{fp32.engine_key}.engine").read_bytes() == b"plan"
    assert list(tmp_path.glob("timing-*.cache"))
    camera = TensorRTBackend(cache_dir=tmp_path, frame_shape=(512, 640))
    camera.load(card)  # the service passes the opened camera's frame shape
    assert calls["set_shape"][2] == (1, 1, 512, 640)  # (input, min, opt, max)
    assert camera.engine_key not in (fp16.engine_key, fp32.engine_key)


def test_build_on_trt11_converts_to_fp16_first(fake: Any, tmp_path: Path) -> None:
    calls = fake(trt11=True)
    card = _card()
    TensorRTBackend(cache_dir=tmp_path).load(card)
    assert calls["network_flags"] == 1 << 3  # STRONGLY_TYPED
    half = onnx.load_from_string(calls["parse"])
    assert {t.data_type for t in half.graph.initializer} == {TensorProto.FLOAT16}
    assert "TF32" in calls["config"].flags
    TensorRTBackend(cache_dir=tmp_path, fp16=False).load(card)
    assert calls["parse_from_file"] == str(card.onnx_path)
    assert calls["config"].flags == set()


def test_build_errors_are_model_errors(fake: Any, tmp_path: Path) -> None:
    calls = fake()
    calls["profile_index"] = -1  # add_optimization_profile's answer to an invalid profile
    with pytest.raises(ModelError, match="rejects the optimisation profile"):
        TensorRTBackend(cache_dir=tmp_path).load(_card())
    calls["profile_index"], calls["parses"] = 0, False
    with pytest.raises(ModelError, match=r"cannot parse.*unsupported operator"):
        TensorRTBackend(cache_dir=tmp_path).load(_card())
    with pytest.raises(ModelError, match="multiples of 8"):
        TensorRTBackend(profile=EngineProfile(min_shape=(1, 4, 4))).load(_card())


def test_unwritable_cache_keeps_the_built_engine(
    fake: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake()
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")  # a file where the cache directory should be: mkdir fails
    backend = TensorRTBackend(cache_dir=blocker / "engines")
    with caplog.at_level(logging.WARNING, logger="livemask"):
        backend.load(_card())
    assert backend.built and backend._engine == ("engine", b"plan")
    assert f"cannot cache it as {blocker / 'engines'}" in caplog.text
    assert "cannot save the timing cache" in caplog.text


def test_store_timing_failure_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_bytes(b"")
    cache = EngineCache(tmp_path / "file")
    path = cache.timing_cache_path("10", "g", (9, 0))
    with caplog.at_level(logging.WARNING, logger="livemask"):
        assert cache.store_timing(path, b"timing") is False
    assert str(path) in caplog.text
    with pytest.raises(OSError):
        cache.store("k", b"plan", {})
    assert EngineCache(tmp_path / "ok").store_timing(tmp_path / "ok" / "t.cache", b"t")


# --------------------------------------------------------------------------- run (faked)


class _Stream:
    cuda_stream = 0

    def __init__(self) -> None:
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


class _Context:
    def __init__(self, backend: TensorRTBackend) -> None:
        self.backend = backend
        self.accept_shape = True
        self.execute_ok = True
        self.shape: tuple[int, ...] = ()

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = shape
        return self.accept_shape

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        n, _, h, w = self.shape
        return (n, 2, h, w)

    def execute_async_v3(self, stream: int) -> bool:
        assert self.backend._dev_out is not None
        self.backend._dev_out.fill_(0.5)
        return self.execute_ok


def test_run_splits_batches_and_synchronises_before_raising(fake: Any) -> None:
    torch = pytest.importorskip("torch")
    fake()
    backend = TensorRTBackend(profile=EngineProfile((1, 8, 8), (1, 16, 16), (2, 16, 16)))
    size = 2 * 16 * 16
    backend._dev_in, backend._host_in = torch.empty(size), torch.empty(size)
    backend._dev_out, backend._host_out = torch.empty(2 * size), torch.empty(2 * size)
    backend._input, backend._output = "image", "probabilities"
    context, stream = _Context(backend), _Stream()
    backend._context, backend._stream, backend._last_shape = context, stream, (2, 1, 16, 16)
    out = backend.run(np.ones((3, 1, 16, 8), np.float32))
    assert out.shape == (3, 2, 16, 8) and np.all(out == 0.5)
    assert stream.synchronized == 2  # batches of 2 and 1
    context.accept_shape = False
    with pytest.raises(ModelError, match="rejects input shape"):
        backend.run(np.ones((1, 1, 8, 8), np.float32))
    assert stream.synchronized == 3 and backend._last_shape is None
    context.accept_shape, context.execute_ok = True, False
    with pytest.raises(ModelError, match="execution failed"):
        backend.run(np.ones((1, 1, 8, 8), np.float32))
    assert stream.synchronized == 4
    backend.close()
    with pytest.raises(ModelError, match="before load"):
        backend.warmup((8, 8))


# --------------------------------------------------------------------------- auto fallback


class _FailingBackend(_FakeBackend):
    """A backend whose close() fails too after a failed load (it must not hide the error)."""

    def __init__(self, name: str, fail: Exception | None, close_fails: bool) -> None:
        super().__init__(name, fail)
        self.close_fails = close_fails

    def close(self) -> None:
        if self.close_fails:
            raise RuntimeError("close after a failed load")
        super().close()


def _patch_backends(monkeypatch: pytest.MonkeyPatch, failures: dict[str, Exception]) -> None:
    for name in select.BACKEND_NAMES:
        status = select.BackendStatus(name, True, "test device")
        monkeypatch.setitem(select.PROBES, name, lambda s=status: s)

    def instantiate(name: str, *, threads: int = 2, **_: object) -> _FailingBackend:
        return _FailingBackend(name, failures.get(name), close_fails=name in failures)

    monkeypatch.setattr(select, "instantiate", instantiate)


def test_auto_falls_back_on_any_load_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = "/home/u/.cache/livemask/engines/k.engine"
    _patch_backends(monkeypatch, {
        "tensorrt": PermissionError(13, "Permission denied", cache),
        "torch": AttributeError("'IBuilderConfig' object has no attribute 'set_flag'"),
    })
    with caplog.at_level(logging.INFO, logger="livemask"):
        backend = select.load_backend("auto", load_model_card("nuclei"))
    assert backend.name == "onnxruntime"
    text = caplog.text
    assert ("tensorrt failed to load nuclei (PermissionError: [Errno 13] Permission denied: "
            f"'{cache}'); trying torch") in text
    assert "torch failed to load nuclei (AttributeError: " in text
    assert "Traceback" in text  # not a livemask error: the traceback is logged too
    assert "using onnxruntime" in text


def test_explicit_backend_load_errors_still_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_backends(monkeypatch, {"tensorrt": OSError(28, "No space left on device")})
    with pytest.raises(OSError, match="No space left"):
        select.load_backend("tensorrt", load_model_card("nuclei"))
    _patch_backends(monkeypatch, {"onnxruntime": BackendUnavailable("broken")})
    monkeypatch.setitem(select.PROBES, "tensorrt", lambda: select.BackendStatus(
        "tensorrt", False, "no"))
    monkeypatch.setitem(select.PROBES, "torch", lambda: select.BackendStatus(
        "torch", False, "no"))
    with pytest.raises(BackendUnavailable, match="broken"):  # the last candidate raises
        select.load_backend("auto", load_model_card("nuclei"))


# ------------------------------------------- buffers and runs (a fake engine over ORT, CPU)


class _OrtEngine:
    """A stand-in for a deserialized engine whose context runs the ONNX model with ONNX
    Runtime on the tensors at the addresses livemask gave it (CPU tensors here), in the
    engine's I/O dtype: what TensorRT does on the GPU, minus the GPU."""

    def __init__(self, onnx_path: Path, io_dtype: str, buffers: dict[int, Any]) -> None:
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.io_dtype, self.buffers = io_dtype, buffers
        self.names = [self.session.get_inputs()[0].name, self.session.get_outputs()[0].name]
        self.num_io_tensors = 2
        self.runs = 0

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == self.names[0] else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return self.io_dtype

    def create_execution_context(self) -> Any:
        engine, state = self, {"address": {}, "shape": None}

        def set_input_shape(name: str, shape: tuple[int, ...]) -> bool:
            state["shape"] = tuple(shape)
            return True

        def get_tensor_shape(name: str) -> tuple[int, ...]:
            n, _, h, w = state["shape"]
            return (n, 2, h, w) if name == engine.names[1] else state["shape"]

        def set_tensor_address(name: str, address: int) -> None:
            state["address"][name] = address

        def execute_async_v3(stream: int) -> bool:
            engine.runs += 1
            shape = state["shape"]
            n_in = int(np.prod(shape))
            x = engine.buffers[state["address"][engine.names[0]]][:n_in].view(shape)
            (y,) = engine.session.run(None, {engine.names[0]: x.float().numpy()})
            out = engine.buffers[state["address"][engine.names[1]]]
            out[:y.size].view(y.shape).copy_(torch_module().from_numpy(y))
            return True

        return SimpleNamespace(
            set_input_shape=set_input_shape, set_tensor_address=set_tensor_address,
            get_tensor_shape=get_tensor_shape, execute_async_v3=execute_async_v3)


def torch_module() -> Any:
    return pytest.importorskip("torch")


def _cpu_torch(buffers: dict[int, Any]) -> Any:
    """torch, but its CUDA buffers and pinned memory are CPU tensors registered by address
    (so the fake engine finds them), and its streams and devices do nothing."""
    torch = torch_module()

    def empty(*size: Any, dtype: Any = None, device: Any = None,
              pin_memory: bool = False) -> Any:
        t = torch.empty(*size, dtype=dtype)
        buffers[t.data_ptr()] = t
        return t

    stream = SimpleNamespace(synchronize=lambda: None, cuda_stream=0)
    cuda = SimpleNamespace(
        get_device_properties=lambda i: SimpleNamespace(name="Fake GPU", major=9, minor=0),
        device=lambda i: contextlib.nullcontext(), stream=lambda s: contextlib.nullcontext(),
        Stream=lambda device=None: stream)
    return SimpleNamespace(empty=empty, device=torch.device, from_numpy=torch.from_numpy,
                           float32=torch.float32, version=SimpleNamespace(cuda="12.8"),
                           cuda=cuda)


@pytest.mark.parametrize("io_dtype", ["float", "half"])
def test_runs_through_the_engines_buffers_equal_onnx_runtime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, io_dtype: str
) -> None:
    """_setup and _run_chunk (buffer sizes, views, shapes, copies, batches split at the
    profile's maximum) with TensorRT replaced by ONNX Runtime over the same buffers; an fp16
    engine takes and gives half-precision tensors, converted on the way in and out."""
    buffers: dict[int, Any] = {}
    card = load_model_card("nuclei")
    engine = _OrtEngine(card.onnx_path, io_dtype, buffers)
    calls: dict[str, Any] = {}
    trt = _fake_trt(calls)
    trt.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = lambda dtype: {"float": np.float32, "half": np.float16}[dtype]
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine)
    monkeypatch.setattr(tb, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tb, "import_torch_cuda", lambda: _cpu_torch(buffers))
    monkeypatch.setattr(TensorRTBackend, "_build", lambda self, card: b"plan")
    backend = TensorRTBackend(cache_dir=tmp_path, profile=EngineProfile(
        (1, 32, 32), (2, 64, 96), (2, 128, 128)))
    backend.load(card)
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 64, 96), (3, 1, 32, 48), (1, 1, 128, 128), (2, 1, 64, 96)]:
        x = rng.random(shape, dtype=np.float32)
        got = backend.run(x)
        (want,) = engine.session.run(None, {"image": x})
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-2 if io_dtype == "half" else 1e-5)
    assert engine.runs == 5  # the batch of 3 ran as 2 + 1 (the profile's largest batch is 2)
    with pytest.raises(ModelError, match=r"outside the TensorRT profile"):
        backend.run(np.zeros((1, 1, 256, 256), np.float32))
