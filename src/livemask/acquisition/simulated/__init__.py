"""Simulated microscope: virtual samples with ground truth and Micro-Manager Python devices."""
