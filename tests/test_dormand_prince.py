"""_dormand_prince.integrate (phase 1 of solver="rosenbrock") against exact solutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmargin._flow import _dormand_prince as dp
from jaxmargin._flow._stepping import Outcome


def _rotation(y):
    # y = (cos x, sin x, e^x): a circle and a growing component, known in closed form.
    return jnp.stack([-y[1], y[0], y[2]])


def _exact(x):
    return np.stack([np.cos(x), np.sin(x), np.exp(x)], axis=-1)


def _run(event, x_end=5.0, rtol=1e-10, atol=1e-12, max_steps=10_000, field=_rotation):
    save_xs = jnp.linspace(0.0, x_end, 11)
    run = jax.jit(lambda y0: dp.integrate(field, event, y0, x_end, save_xs, rtol, atol, max_steps))
    return run(jnp.asarray([1.0, 0.0, 1.0])), np.asarray(save_xs)


def test_saves_and_end_match_the_exact_solution():
    out, xs = _run(lambda y: -1.0 + 0.0 * y[0])  # never fires
    assert int(out.outcome) == Outcome.REACHED_END
    assert float(out.x) == 5.0
    np.testing.assert_allclose(np.asarray(out.y), _exact(5.0), rtol=1e-8)
    assert bool(np.all(out.saved))
    # The saves come from the 4th-order dense output: accurate to ~rtol^(4/5) per step.
    np.testing.assert_allclose(np.asarray(out.ys), _exact(xs), rtol=1e-7, atol=1e-9)


def test_event_located_on_the_dense_output():
    # e^x crosses 20 upwards at x = ln 20; sin x crosses 0.5 upwards first at pi / 6.
    out, xs = _run(lambda y: y[2] - 20.0)
    assert int(out.outcome) == Outcome.EVENT
    assert float(out.x) == pytest.approx(np.log(20.0), rel=1e-9)
    np.testing.assert_allclose(np.asarray(out.y), _exact(np.log(20.0)), rtol=1e-8)
    # Saves beyond the event are not reached (and keep y0).
    assert np.array_equal(np.asarray(out.saved), xs <= np.log(20.0))
    out, _ = _run(lambda y: y[1] - 0.5)
    assert float(out.x) == pytest.approx(np.pi / 6, rel=1e-9)


def test_a_start_a_rounding_error_short_of_the_event_ends_past_it():
    # sin x - 1e-17 is -1e-17 at the start (w(t0) from another solver: -ln L = -1e-17 there):
    # the event is at x = 1e-17; the end must be past it (event > 0), not the start itself.
    out, _ = _run(lambda y: y[1] - 1e-17)
    assert int(out.outcome) == Outcome.EVENT and 0.0 < float(out.x) < 1e-14
    assert float(out.y[1]) > 1e-17


def test_tighter_tolerance_converges_and_takes_more_steps():
    errors, steps = [], []
    for rtol in (1e-5, 1e-7, 1e-9):
        out, _ = _run(lambda y: y[2] - 20.0, rtol=rtol, atol=rtol * 1e-2)
        errors.append(abs(float(out.x) - np.log(20.0)))
        steps.append(int(out.steps))
    assert errors[2] < errors[1] < errors[0] < 1e-4
    assert steps[0] < steps[1] < steps[2]


def test_step_budget_and_failure_are_reported():
    out, _ = _run(lambda y: -1.0 + 0.0 * y[0], max_steps=5)
    assert int(out.outcome) == Outcome.OUT_OF_STEPS
    assert int(out.steps) + int(out.rejected) == 5 and float(out.x) < 5.0

    def blows_up(y):  # finite until x = 1 (y = 1 / (1 - x)), then NaN
        return jnp.where(y[0] < 1e6, y * y, jnp.nan)

    out, _ = _run(lambda y: -1.0 + 0.0 * y[0], field=blows_up)
    assert int(out.outcome) == Outcome.FAILED
    # What was reached is reported: the last accepted point, before the blow-up.
    assert 0.99 < float(out.x) < 1.0 and bool(np.all(np.isfinite(np.asarray(out.y))))
