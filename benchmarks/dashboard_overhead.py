"""Does the web dashboard slow the pipeline? Pipeline fps with and without it, alternated.

Runs the pipeline phase of ``livemask bench`` (the full service on the simulated camera,
free-run, the camera as fast as its exposure allows, a subscriber process on loopback)
``--rounds`` times without and with the dashboard, alternating (off, on, off, on, ...) so
that slow drifts of a shared machine hit both alike. With the dashboard on, one WebSocket
client in its own process (:class:`livemask.dashboard.probe.DashboardProbe`, standing in for
a browser) reads every update, so the dashboard decimates and sends frames all run long;
``--browser /usr/bin/chromium`` opens the page in a headless Chromium instead (then the
browser's own drawing also competes for the CPUs). Prints every run, the mean pipeline fps
of each setting and their ratio:

    .venv/bin/python benchmarks/dashboard_overhead.py --frames 600 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from typing import Any

from livemask.bench import BenchSettings, machine_info, prerender, run_pipeline
from livemask.dashboard.probe import BROWSER_ENV


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="nuclei")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    ap.add_argument("--exposure-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--browser", default=None, help="a Chromium executable: use it as client")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    if args.browser:
        os.environ[BROWSER_ENV] = args.browser  # read by the probe process

    settings = BenchSettings(model=args.model, size=args.size, frames=args.frames,
                             exposure_ms=args.exposure_ms, threads=args.threads,
                             mode="free-run")  # as docs/dashboard.md's figures were measured
    print(f"rendering {args.size}x{args.size} frames...", file=sys.stderr)
    frames = prerender(settings)
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for dashboard in (False, True):
            res = run_pipeline(replace(settings, dashboard=dashboard), frames)
            web = res.get("dashboard") or {}
            run = {"round": r, "dashboard": dashboard, "pipeline_fps": res["fps"],
                   "frames_analysed": res["frames_analysed"],
                   "frames_skipped": res["frames_skipped"],
                   "end_to_end_p50_ms": res["latency_ms"]["end_to_end"]["p50"],
                   "images_to_client": web.get("images"),
                   "images_per_s": web.get("images_per_s"),
                   "encode_ms_p50": (web.get("server") or {}).get("encode_ms_p50")}
            runs.append(run)
            print(f"round {r} dashboard {'on ' if dashboard else 'off'}: pipeline_fps "
                  f"{run['pipeline_fps']:6.2f}, analysed {run['frames_analysed']}, skipped "
                  f"{run['frames_skipped']}, e2e p50 {run['end_to_end_p50_ms']} ms"
                  + (f", {run['images_to_client']} images to the client "
                     f"({run['images_per_s']}/s, {run['encode_ms_p50']} ms each)"
                     if dashboard else ""), flush=True)
    off = [r["pipeline_fps"] for r in runs if not r["dashboard"]]
    on = [r["pipeline_fps"] for r in runs if r["dashboard"]]
    summary = {"fps_off_mean": round(statistics.fmean(off), 2),
               "fps_on_mean": round(statistics.fmean(on), 2)}
    summary["ratio_on_off"] = round(summary["fps_on_mean"] / summary["fps_off_mean"], 3)
    print(f"mean pipeline_fps: off {summary['fps_off_mean']}, on {summary['fps_on_mean']}, "
          f"on/off = {summary['ratio_on_off']}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            json.dump({"benchmark": "dashboard overhead", "machine": machine_info(),
                       "settings": vars(args), "runs": runs, **summary}, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
