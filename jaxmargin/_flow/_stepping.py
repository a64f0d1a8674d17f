"""What the engine's own integrators share: outcomes, the loop's carry, step control and saves.

The stiff stage (_stiff_stage.py) and the limit flow (_limit_stage.py) are adaptive one-step
loops in a lax.while_loop over a `StepCarry`. A step either passes its tests (error, landings
on kinks or events) and is accepted, or is redone from the same point: its start products (the
kinks' Clarke element, the field, ...) are kept in the carry for the redo. Saved rows go to a
fixed-size save grid; a run that stops off the grid keeps its last point in the next free row.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Outcome(enum.IntEnum):
    """How an integrator of the engine ended (RUNNING while it runs)."""

    RUNNING = -1
    REACHED_END = 0
    EVENT = 1
    OUT_OF_STEPS = 2
    FAILED = 3  # the step size collapsed (e.g. a field that is not finite)
    CONVERGED = 4  # ||dy/dx|| fell below direction_tol
    STALLED = 5  # the step fell below a floor: the caller continues on the limit flow
    KINK_OVERFLOW = 6  # more pairs on their kinks than the integrator's slots


class Integration(NamedTuple):
    """An integrator's saved rows and where (and how) it stopped."""

    xs: jax.Array  # (S,) saved clock values
    ys: jax.Array  # (S, d) saved states
    auxs: jax.Array  # (S, 2) saved clocks (tau, ln(t L))
    saved: jax.Array  # (S,) bool: the row holds a point
    x: jax.Array
    y: jax.Array
    aux: jax.Array
    outcome: jax.Array
    steps: jax.Array
    rejected: jax.Array
    max_sliding: jax.Array  # the most pairs held on their kinks in one step


class StepCarry(NamedTuple):
    """The state of an integrator's loop between two step attempts."""

    x: jax.Array
    y: jax.Array
    aux: jax.Array
    # What the integrator keeps per point besides y: pre-activations (stiff stage) or the
    # weights lambda (limit flow).
    z: jax.Array
    h: jax.Array
    # The step size an event or kink landing cut short (0 if none): the step after the landing
    # resumes with it instead of growing back from the landing's short step.
    h_resume: jax.Array
    index: jax.Array  # the next row of the save grid
    xs: jax.Array
    ys: jax.Array
    auxs: jax.Array
    saved: jax.Array
    steps: jax.Array
    rejected: jax.Array
    outcome: jax.Array
    max_sliding: jax.Array
    # What a step computes at its start before it knows its size: a rejected step is redone
    # from the same point with these (`fresh` False) instead of recomputing them.
    start: object
    fresh: jax.Array


def initial_carry(x0, y0, aux0, z0, first_step, save_xs, saved0, x_end, start) -> StepCarry:
    """The carry before the first step: save rows at or before x0 are the start (marked saved
    where `saved0`), the others wait for the integration."""
    dtype = y0.dtype
    S = save_xs.shape[0]
    return StepCarry(
        x=jnp.asarray(x0, dtype),
        y=y0,
        aux=aux0,
        z=z0,
        h=jnp.asarray(first_step, dtype),
        h_resume=jnp.zeros((), dtype),
        index=jnp.sum(save_xs <= x0) if saved0 else jnp.sum(save_xs < x0),
        xs=jnp.where(save_xs <= x0, x0, save_xs),
        ys=jnp.broadcast_to(y0, (S,) + y0.shape),
        auxs=jnp.broadcast_to(aux0, (S, 2)),
        saved=save_xs <= x0 if saved0 else jnp.zeros(S, bool),
        steps=jnp.zeros((), jnp.int32),
        rejected=jnp.zeros((), jnp.int32),
        outcome=jnp.where(x0 >= x_end, Outcome.REACHED_END, Outcome.RUNNING),
        max_sliding=jnp.zeros((), jnp.int32),
        start=start,
        fresh=jnp.asarray(True),
    )


def integration(carry: StepCarry, steps=None) -> Integration:
    """The loop's result (`steps` overrides the accepted count)."""
    return Integration(
        carry.xs,
        carry.ys,
        carry.auxs,
        carry.saved,
        carry.x,
        carry.y,
        carry.aux,
        carry.outcome,
        carry.steps if steps is None else steps,
        carry.rejected,
        carry.max_sliding,
    )


def reuse_after_rejection(fresh, compute, cached):
    """compute() where the step starts from a new point, else the cached start products."""
    return jax.lax.cond(fresh, compute, lambda: cached)


def placeholder(compute):
    """Zeros shaped like compute()'s output: the start products before the first step."""
    return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), jax.eval_shape(compute))


def error_factor(err, order, largest):
    """The controller's step-size factor from the error ratio err (<= 1 passes): integral
    control with safety 0.9, clipped to [0.2, largest]."""
    return jnp.clip(0.9 * jnp.where(err > 0, err, 1e-10) ** (-1.0 / order), 0.2, largest)


def next_step(c: StepCarry, accept, clipped, h, factor, h_land, error_ok):
    """(next step size, h_resume) after a step of size h with the controller's `factor`. A step
    rejected only to land on an event or a kink (error_ok) is redone with h_land and the
    rejected h is kept: the step after the landing resumes with it (docs/decisions.md D26)."""
    h_next = jnp.where(
        accept,
        jnp.where(clipped, jnp.maximum(c.h, h * factor), h * factor),
        jnp.minimum(h * jnp.minimum(factor, 1.0), h_land),
    )
    h_next = jnp.where(accept, jnp.maximum(h_next, c.h_resume), h_next)
    landing = ~accept & error_ok & (h_land < h)
    return h_next, jnp.where(landing, jnp.maximum(c.h_resume, h), 0.0)


def collapsed(h_next, x):
    """The step size fell below float64's resolution of x: the integrator cannot go on."""
    return h_next < 1e-14 * (1.0 + jnp.abs(x))


def store(carry: StepCarry, x, y, aux, index) -> StepCarry:
    """carry with (x, y, aux) in save row `index`."""
    return carry._replace(
        xs=carry.xs.at[index].set(x),
        ys=carry.ys.at[index].set(y),
        auxs=carry.auxs.at[index].set(aux),
        saved=carry.saved.at[index].set(True),
    )


def end_with(new: StepCarry, outcome, at_save) -> StepCarry:
    """new with its outcome; a run that stops off the save grid keeps its last point in the
    next free row."""
    S = new.xs.shape[0]
    new = new._replace(outcome=outcome)
    final = store(new, new.x, new.y, new.aux, jnp.minimum(new.index, S - 1))
    off_grid = (outcome >= 0) & ~at_save & (new.index < S)
    new = jax.tree.map(lambda a, b: jnp.where(off_grid, a, b), final, new)
    return new._replace(index=new.index + off_grid)


# Smaller slot counts a run switches to while few pairs sit on their kinks (see slot_sizes).
SLOT_SIZES = (32,)
# The least kink work per step at the capacity (slots^2 x parameters: the Gram of the kinks'
# gradients) for which the smaller sizes are compiled: below it each extra loop costs more
# compilation than its cheaper steps save over a run (docs/decisions.md D55).
SIZED_SLOTS_MIN_WORK = 128**2 * 1500


def slot_sizes(capacity, num_pairs, num_params):
    """The slot counts a run switches between: the smaller SLOT_SIZES below the capacity, then
    the capacity (at most the number of pairs). A step's kink work (the Clarke element's Gram
    and box QP, the projection onto the kinks) grows with its slots, not with the pairs on
    kinks: a step with few pairs on kinks runs with few slots (docs/decisions.md D49), where
    that work is large enough to pay for the extra loop's compilation (D55)."""
    if num_pairs is None:
        return (capacity,)
    top = min(capacity, num_pairs)
    if top * top * num_params < SIZED_SLOTS_MIN_WORK:
        return (top,)
    return tuple(size for size in SLOT_SIZES if size < top) + (top,)


def loop_by_slots(carry: StepCarry, sizes, count_on_kinks, start_of, body_of) -> StepCarry:
    """The integrator's while loop, each step with the fewest of `sizes` kink slots that fit the
    pairs on kinks at its start. body_of(size): carry -> carry, one step attempt with that many
    slots; start_of(size, carry): a placeholder of its start products; count_on_kinks(carry):
    the pairs on kinks. A size runs until the run ends or the count leaves its range: above the
    size (except the largest, whose steps report the overflow), or at most half the next
    smaller size (hysteresis: no switching back and forth)."""

    def loop(j):
        size, top = sizes[j], j == len(sizes) - 1
        low = sizes[j - 1] // 2 if j > 0 else -1

        def going(c: StepCarry):
            if len(sizes) == 1:
                return c.outcome < 0
            count = count_on_kinks(c)
            return (c.outcome < 0) & (count > low) & ((count <= size) | top)

        def run(c: StepCarry):
            c = c._replace(start=start_of(size, c), fresh=jnp.asarray(True))
            return jax.lax.while_loop(going, body_of(size), c)._replace(start=None)

        return run

    if len(sizes) == 1:
        return loop(0)(carry)
    loops = [loop(j) for j in range(len(sizes))]

    def run_fitting(c: StepCarry):
        fitting = jnp.searchsorted(jnp.asarray(sizes), count_on_kinks(c))
        return jax.lax.switch(jnp.minimum(fitting, len(sizes) - 1), loops, c)

    return jax.lax.while_loop(lambda c: c.outcome < 0, run_fitting, carry)
