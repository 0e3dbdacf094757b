"""livemask: acquisition-side real-time segmentation for microscopes."""

from __future__ import annotations

__version__ = "0.1.0"
