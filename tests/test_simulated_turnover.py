"""simulation.turnover_per_step: a long simulated time-lapse keeps dividing.

Without turnover the nuclei grow to the population cap and divisions stop after about
2,000 steps (biologist hunt: none after 2,500), so long runs could no longer exercise
division or lineage tracking."""

from __future__ import annotations

import pytest

from livemask.acquisition.simulated.nuclei import NucleiParams, NucleiSample
from livemask.config import parse_config
from tests.conftest import make_config


def _mitoses_between(sample: NucleiSample, start: int, end: int) -> int:
    for _ in range(start):
        sample.step()
    before = len(sample.mitosis_log)
    for _ in range(end - start):
        sample.step()
    return len(sample.mitosis_log) - before


def test_turnover_keeps_a_long_time_lapse_dividing() -> None:
    small = {"world_shape_px": (512, 512)}  # ≈ 125 nuclei: fast steps
    capped = NucleiSample(NucleiParams(**small), seed=1)
    assert _mitoses_between(capped, 3000, 4000) == 0  # at the cap: no division
    assert len(capped.nuclei) == capped.max_population
    turning = NucleiSample(NucleiParams(**small, turnover_per_step=0.0015), seed=1)
    late = _mitoses_between(turning, 3000, 4000)
    assert late > 50, late
    assert 0.5 * 125 < len(turning.nuclei) < turning.max_population


def test_the_config_passes_turnover_to_the_nuclei_sample() -> None:
    cfg = make_config(simulation={"turnover_per_step": 0.0015})
    assert cfg.simulation.sample_overrides() == {"turnover_per_step": 0.0015}
    grains = parse_config({"simulation": {"sample": "grains", "turnover_per_step": 0.1}})
    assert grains.simulation.sample_overrides() == {}


def test_the_lineage_of_a_sample_that_divides_for_ever_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With turnover the mitosis log and the lineage grew by every division (≈ 45 MB an
    hour at 10 frames/s in the default world): the newest LINEAGE_KEPT are kept."""
    from livemask.acquisition.simulated import nuclei

    monkeypatch.setattr(nuclei, "LINEAGE_KEPT", 20)
    sample = NucleiSample(NucleiParams(world_shape_px=(512, 512), turnover_per_step=0.0015),
                          seed=1)
    for _ in range(1500):
        sample.step()
    assert 20 <= len(sample.mitosis_log) <= 40 and 40 <= len(sample.parent_of) <= 80
    newest = max(sample.parent_of)  # the last daughter's id is kept
    assert sample.parent_of[newest] in {r.nucleus_id for r in sample.mitosis_log}
    # a step's new daughters are listed for whoever follows the lineage step by step
    # (tracking_eval counted them from the lineage's length, which a trim shortens)
    seen: list[int] = []
    while not seen:
        sample.step()
        seen = sample.new_daughters
    assert len(seen) % 2 == 0 and all(d in sample.parent_of for d in seen)
