import numpy as np
import pytest

from enkg_dist import schedules


def test_karras_grid_endpoints_and_monotone():
    s = schedules.karras_sigmas(80, 80.0, 0.002, 7.0)
    assert s.shape == (81,) and s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002) and s[-1] == 0.0
    assert np.all(np.diff(s) < 0)
    # rho = 1 is a linear grid
    assert np.allclose(schedules.karras_sigmas(5, 4.0, 1.0, 1.0, append_zero=False), [4, 3.25, 2.5, 1.75, 1])
    assert schedules.karras_sigmas(1, 3.0, 0.1).tolist() == [3.0, 0.0]
    with pytest.raises(ValueError):
        schedules.karras_sigmas(3, 0.1, 1.0)


def test_guidance_window_matches_authors_count():
    # N = 80, window 0.05/0.05: 71 guided steps (i = 5..75), so K = 2 gives the 142 sequential evaluations of enkg.md
    steps = schedules.guided_steps(80, 0.05, 0.05)
    assert steps[0] == 5 and steps[-1] == 75 and len(steps) == 71
    assert schedules.guided_steps(10, 0.0, 0.0) == list(range(1, 10))


def test_step_scale_and_inner_steps():
    assert schedules.guidance_scale(7, 80, 2.0) == 2.0
    assert schedules.guidance_scale(0, 100, 3.5, 1e-3) == pytest.approx(3.5 * (1 - 1e-3) + 1e-3)
    assert schedules.guidance_scale(100, 100, 3.5, 1e-3) == pytest.approx(1e-3)
    assert schedules.inner_ode_steps(5, 80) == 19 and schedules.inner_ode_steps(0, 200) == 20
    assert schedules.inner_ode_steps(79, 80) == 1
    assert schedules.inner_ode_steps(40, 80, divisor=8) == 6
