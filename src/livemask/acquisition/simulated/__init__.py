"""Simulated microscope: virtual samples with ground truth and Micro-Manager Python devices."""

from pathlib import Path

#: The simulated rig's Micro-Manager config, shipped as package data; the default
#: ``hardware.config_file`` and the template to copy for a real rig (hardware/README.md).
SIMULATED_CFG = Path(__file__).resolve().parent / "simulated.cfg"
