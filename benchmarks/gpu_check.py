"""GPU correctness and per-stage timing of the torch CUDA path (run by benchmarks/gpu.sh).

Checks, on a real NVIDIA GPU:

1. the torch backend (fp16, channels-last, CUDA graphs) against ONNX Runtime on the CPU: the
   largest difference of the probability maps on simulated frames;
2. the device labelling path against the CPU path (object F1 between the two label images)
   and both against the simulator's ground truth;
3. per-stage times at the given frame size (upload + normalise, model, the pipeline's
   analysis from probabilities to labels and objects on the host, and the exact labelling
   loops for comparison), medians over repeated runs, synchronised; and the analysis again
   while another Python thread keeps the GIL busy;
4. which optional GPU runtimes are importable here (TensorRT, ONNX Runtime's CUDA provider).

Writes one JSON record (``--json``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def write_record(record: dict[str, Any], path: Path | None) -> None:
    """Print ``record`` as JSON and write it to ``path`` (if given)."""
    text = json.dumps(record, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")


def median_ms(fn: Any, sync: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return round(float(np.median(times)), 3)


def ta_of(seg: Any) -> Any:
    """The segmenter's device analysis (present on the device path)."""
    assert seg._device is not None
    return seg._device


def _normalisation_parity(gpu: Any, cpu: Any, ta: Any, rng: Any) -> dict[str, Any]:
    """Device vs host on frames that exercise the normalisation's special rules: a bright
    debris disc (the rule that takes the high percentile below 20 x the median object
    pixel), saturated nuclei (the saturated plateau, ``saturated_px``) and 8-bit and float
    frames. Per case: the largest difference of the model input, label F1 between the
    paths, and the saturated pixels and objects each path reports."""
    from livemask.acquisition.simulated.nuclei import random_field
    from livemask.analysis.metrics import match_instances

    norm = gpu.card.normalization
    image, truth = random_field(rng, (512, 512))
    yy, xx = np.ogrid[:512, :512]
    debris = image.astype(np.float64)
    debris[(yy - 256) ** 2 + (xx - 256) ** 2 <= 20 ** 2] += 40000
    saturated = image.copy()
    for label in range(1, 4):
        saturated[truth == label] = np.iinfo(np.uint16).max
    scaled = image.astype(np.float64) / max(float(image.max()), 1.0)
    cases = {
        "clean_uint16": image,
        "debris_disc_r20_plus40k": debris.clip(0, 65535).astype(np.uint16),
        "three_saturated_nuclei": saturated,
        "uint8": (scaled * 255).astype(np.uint8),
        "float32": scaled.astype(np.float32),
    }
    out: dict[str, Any] = {}
    for name, frame in cases.items():
        _, batch = ta.preprocess(frame, norm.low, norm.high, gpu.card.size_multiple,
                                 min_span_noise=norm.min_span_noise, clip=norm.clip_range,
                                 exclude_saturated=norm.exclude_saturated)
        host_input = cpu._normalize(frame)
        device_input = batch[0, 0, :512, :512].float().cpu().numpy()
        lab_gpu, obj_gpu, sum_gpu = gpu.analyse(gpu.infer(frame), frame, pixel_size_um=0.65)
        lab_cpu, obj_cpu, sum_cpu = cpu.analyse(cpu.predict(frame), frame, pixel_size_um=0.65)
        out[name] = {
            "input_max_abs_diff": round(float(np.abs(device_input - host_input).max()), 6),
            "labels_f1": round(match_instances(lab_cpu, lab_gpu).f1, 4),
            "f1_vs_truth_gpu": round(match_instances(truth, lab_gpu).f1, 4),
            "f1_vs_truth_cpu": round(match_instances(truth, lab_cpu).f1, 4),
            "saturated_px_gpu": sum(int(o.get("saturated_px") or 0) for o in obj_gpu),
            "saturated_px_cpu": sum(int(o.get("saturated_px") or 0) for o in obj_cpu),
            "saturated_objects_gpu": sum_gpu.get("saturated_objects"),
            "saturated_objects_cpu": sum_cpu.get("saturated_objects"),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run without a GPU")
    args = parser.parse_args()

    import torch

    from livemask.acquisition.simulated.nuclei import random_field
    from livemask.analysis.metrics import aggregate, match_instances
    from livemask.inference.models import load_model_card
    from livemask.inference.onnxruntime_backend import OnnxRuntimeBackend
    from livemask.inference.segmenter import DeviceProbabilities, Segmenter
    from livemask.inference.torch_backend import TorchBackend

    card = load_model_card("nuclei")
    on_gpu = args.device != "cpu"
    gpu_backend = TorchBackend(device=args.device)
    gpu_backend.load(card)
    gpu = Segmenter(card, gpu_backend, device_resident=True)
    cpu_backend = OnnxRuntimeBackend(threads=8)
    cpu_backend.load(card)
    cpu = Segmenter(card, cpu_backend)
    assert gpu.device_resident and not cpu.device_resident

    rng = np.random.default_rng(0)
    diffs, gpu_vs_cpu, gpu_vs_truth, cpu_vs_truth = [], [], [], []
    for _ in range(6):
        image, truth = random_field(rng, (512, 512))
        p_cpu = cpu.predict(image)
        out = gpu.infer(image)
        assert isinstance(out, DeviceProbabilities)
        diffs.append(float(np.abs(out.probabilities.cpu().numpy() - p_cpu).max()))
        lab_gpu, _, _ = gpu.analyse(out, image, pixel_size_um=0.65)
        lab_cpu, _, _ = cpu.analyse(p_cpu, image, pixel_size_um=0.65)
        gpu_vs_cpu.append(match_instances(lab_cpu, lab_gpu))
        gpu_vs_truth.append(match_instances(truth, lab_gpu))
        cpu_vs_truth.append(match_instances(truth, lab_cpu))

    parity = _normalisation_parity(gpu, cpu, ta_of(gpu), np.random.default_rng(1))

    # per-stage times at the benchmark size, on one realistic frame
    from livemask.bench import BenchSettings, prerender

    side = args.size
    frame = prerender(BenchSettings(size=side, frames=2))[0].image
    ta = ta_of(gpu)
    dev = ta.device

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(dev)

    state: dict[str, Any] = {}

    def upload() -> None:
        norm = card.normalization
        state["img"], state["x"] = ta.preprocess(frame, norm.low, norm.high, card.size_multiple,
                                                 min_span_noise=norm.min_span_noise)

    def model() -> None:
        state["p"] = gpu_backend.run_tensor(state["x"])[0, :, :side, :side]

    params = gpu._label_params()

    def analyse() -> None:  # the pipeline's analysis: fixed-step CUDA graphs, to the host
        p = state["p"]
        state["objects"] = ta.analyse(p[0], p[1], state["img"], params, pixel_size_um=0.65)[1]

    def labels_exact() -> None:  # the exact loops (the fall-back), for comparison
        p = state["p"]
        ta.labels_from_probabilities(p[0], p[1], flood_levels=params.flood_levels)

    for fn in (upload, model, model, model, analyse):  # warm-up, graph capture
        fn()
        sync()  # the analysis stream must not read a model output still being written
    calls: list[str] = []
    run = ta._run

    def counted(key: tuple[Any, ...], *rest: Any) -> Any:
        calls.append(key[0])
        return run(key, *rest)

    ta._run = counted  # type: ignore[method-assign]
    analyse()
    ta._run = run  # type: ignore[method-assign]
    stages = {name: median_ms(fn, sync, args.repeats) for name, fn in
              [("upload_normalize", upload), ("model", model), ("analyse", analyse)]}
    stages["labels_exact_loops"] = median_ms(labels_exact, sync, 5)
    whole = median_ms(lambda: gpu.analyse(gpu.infer(frame), frame, pixel_size_um=0.65),
                       sync, args.repeats)

    # The same analysis while another thread keeps the GIL busy (as the camera, the event
    # loop and the inference thread do in the service): each torch call releases the GIL and
    # must win it back, so the fewer Python-level calls, the smaller this slowdown.
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(1000))

    from livemask.service.app import GPU_SWITCH_INTERVAL_S

    interval = sys.getswitchinterval()
    sys.setswitchinterval(GPU_SWITCH_INTERVAL_S)  # as the service sets it on the GPU path
    hog = threading.Thread(target=busy, daemon=True)
    hog.start()
    try:
        analyse_busy = median_ms(analyse, sync, args.repeats)
        exact_busy = median_ms(labels_exact, sync, 5)
    finally:
        stop.set()
        hog.join()
        sys.setswitchinterval(interval)
    cpu_times = {
        "cpu_analyse_ms": median_ms(
            lambda: cpu.analyse(state["p"].cpu().numpy(), frame, pixel_size_um=0.65),
            lambda: None, 5),
    }

    runtimes: dict[str, Any] = {}
    try:
        import tensorrt

        runtimes["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        runtimes["tensorrt"] = f"not importable: {exc}"
    import onnxruntime

    runtimes["onnxruntime"] = onnxruntime.__version__
    runtimes["onnxruntime_providers"] = onnxruntime.get_available_providers()

    g_c, g_t, c_t = aggregate(gpu_vs_cpu), aggregate(gpu_vs_truth), aggregate(cpu_vs_truth)
    record = {
        "gpu": torch.cuda.get_device_name(dev) if on_gpu else "none (dry run on the CPU)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "probability_max_abs_diff_fp16_vs_onnxruntime": round(max(diffs), 5),
        "conversion_max_abs_diff_fp32_cpu": gpu_backend.max_difference,
        "labels_gpu_vs_cpu_f1": round(g_c.f1, 4),
        "labels_gpu_vs_cpu_mean_iou": round(g_c.mean_matched_iou, 4),
        "f1_vs_truth_gpu_path": round(g_t.f1, 4),
        "f1_vs_truth_cpu_path": round(c_t.f1, 4),
        "parity_device_vs_host": parity,
        "objects_in_check": g_t.n_true,
        "frame_px": side,
        "objects_in_timed_frame": len(state["objects"]),
        "stage_ms_median": stages,
        "analyse_stages_run": calls,
        "analyse_ms_median_gil_busy": analyse_busy,
        "labels_exact_ms_median_gil_busy": exact_busy,
        "infer_plus_analyse_ms_median": whole,
        **cpu_times,
        "max_memory_allocated_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        if on_gpu else None,
        "runtimes": runtimes,
    }
    write_record(record, args.json)


if __name__ == "__main__":
    main()
