"""experiments/cost_real_cpu.py: the DHR extrapolation, the README table and the saved-bytes count (small size)."""
import pytest

from experiments.cost_real_cpu import OFFICIAL_STEPS, extrapolate_dhr, measure_bytes, table

pytestmark = pytest.mark.usefixtures("single_thread")


def test_extrapolation_recovers_constant_step_times():
    # 10 s before the first coarse step; coarse steps of 2 s; 7 s of segmentation; 3 steps tuning weights + f* of
    # 5 s; 3 f*-only steps of 3 s; 4 s of decoding after the last one
    starts = [10, 12, 14, 16, 25, 30, 35, 40, 43, 46]
    est = extrapolate_dhr(starts, total=53.0, coarse=4, weight=3, feature=6)
    assert (est["coarse"], est["both"], est["feature"]) == (2, 5, 3)
    assert est["fixed"] == 53 - 4 * 2 - 3 * 5 - 3 * 3
    assert est["full"] == est["fixed"] + OFFICIAL_STEPS["coarse"] * 2 + OFFICIAL_STEPS["both"] * 5 \
        + OFFICIAL_STEPS["feature"] * 3
    with pytest.raises(ValueError, match="one start per step"):
        extrapolate_dhr(starts[:-1], 53.0, 4, 3, 6)


def test_table_has_one_row_per_measured_part():
    inference = {"cpu_s_per_image": 3.0, "wall_s_per_image": 1.6, "load_average": [1.0, 1.2], "peak_rss_gib": 2.0}
    dhr = {"batch": 2, "cpu_full_s_per_image": 4000.0, "wall_full_s_per_image": 2100.0, "load_average": [1.0, 2.0],
           "peak_rss_gib": 9.5, "wall_coarse_step_s": 3.0, "wall_both_step_s": 30.0, "wall_feature_step_s": 20.0,
           "wall_fixed_s": 60.0}
    text = table({"e4e": inference, "dhr2": dhr}, threads=2)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[1].startswith("| e4e inference") and "| 1.6 (1.2) | 2.0 GiB |" in rows[1]
    assert rows[2].startswith("| DHR, official steps") and "| 2 | 4000 | 2100 (2.0) | 9.5 GiB |" in rows[2]
    assert text.endswith("2 threads)")


def test_saved_bytes_of_one_dhr_step_at_a_small_size():
    out = measure_bytes(64)
    assert out["generator_params"] > out["synthesis_params"] > 0 and out["feature_elems"] == 512 * 8 * 8
    assert out["saved_for_backward_bytes"] == sum(out["saved_by_side_bytes"].values()) > 0
    assert "64" in out["saved_by_side_bytes"]  # full-resolution maps are saved for the backward
