"""Download the wheels livemask needs on a GPU host that cannot reach a package registry.

The GPU host this project is lent (an NVIDIA H200 machine, CPython 3.12, x86-64) has torch,
numpy, scipy, onnxruntime and many more installed, but not pyzmq, pymmcore-plus, useq-schema,
pydantic, zarr or orjson, and it cannot download anything. Run this here, where pip works:

    python benchmarks/gpu_wheels.py            # -> .whl/ (ignored by git), prints the list

It resolves livemask's runtime dependencies (and py-spy, for ``gpu.sh``'s GIL profile) for
CPython 3.12 on manylinux x86-64 and keeps the wheels of the distributions that the host's
image lacks (``ON_THE_IMAGE``, as read on 2026-11-17). On the host, install them beside the
image's packages and run the checks from an exported copy of the tree:

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \\
        .whl/*.whl
    export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH
    timeout 330 bash benchmarks/gpu.sh "$OUT"
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Distributions already installed on the GPU host's image (normalised names); carrying
#: another copy would shadow the image's build (torch is built against its numpy).
_IMAGE_PACKAGES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    certifi charset-normalizer click cloudpickle colorama contourpy cycler cython filelock
    flatbuffers fonttools frozenlist fsspec h11 h5py httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig jinja2 joblib kiwisolver lazy-loader markdown
    markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict mypy-extensions
    networkx numpy onnx onnxruntime opencv-python-headless packaging pandas pathspec pillow pip
    pluggy prometheus-client propcache protobuf psutil pyarrow pygments pyparsing pytest
    pytest-timeout python-dateutil pyyaml regex requests rich scikit-image scikit-learn scipy
    setuptools shellingham six sortedcontainers sympy tabulate tensorstore threadpoolctl tifffile
    toolz torch tqdm triton typer typing-extensions typing-inspect urllib3 werkzeug wheel wrapt
    xarray yarl zipp
"""
ON_THE_IMAGE = frozenset(_IMAGE_PACKAGES.split())
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
EXTRA = ("py-spy",)
#: Remote-storage packages pip resolves along (s3fs and its AWS client, 20 MB): livemask
#: never imports them, and with them the wheels no longer fit the device's 64 MiB transfer.
NOT_NEEDED = frozenset({"s3fs", "aiobotocore", "botocore", "jmespath", "aioitertools"})


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    """The distribution a wheel file holds (its name up to the first ``-``)."""
    return normalise(path.name.split("-", 1)[0])


def requirements() -> list[str]:
    """livemask's runtime dependencies (pyproject.toml) plus :data:`EXTRA`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *EXTRA]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", type=Path, default=ROOT / ".whl")
    ap.add_argument("--python-version", default="3.12")
    args = ap.parse_args(argv)
    platforms = [f"--platform={p}" for p in PLATFORMS]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
               f"--python-version={args.python_version}", "--implementation=cp", *platforms,
               f"--dest={tmp}", *requirements()]
        if subprocess.run(cmd, check=False).returncode != 0:
            print("pip download failed (see above)", file=sys.stderr)
            return 1
        args.dest.mkdir(parents=True, exist_ok=True)
        for old in args.dest.glob("*.whl"):
            old.unlink()
        kept = [w for w in sorted(Path(tmp).glob("*.whl"))
                if wheel_name(w) not in ON_THE_IMAGE | NOT_NEEDED]
        for wheel in kept:
            wheel.rename(args.dest / wheel.name)
    total = sum((args.dest / w.name).stat().st_size for w in kept) / 2**20
    for wheel in kept:
        print(wheel.name)
    print(f"{len(kept)} wheels, {total:.1f} MiB in {args.dest} (the device carries <= 64 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
