"""`jm.predictor`: a user's own network, its kinks found by tracing (jaxmargin/_traced_kinks.py).

References independent of the tracing: the hand-written Kinks of the built-in MLPs, the built-in
MLP's flow from the same weights, and for max-pool ties the gradients of the tied entries (the
patches of the convolution) taken one by one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import integer_relu_params_on_kinks
from jax import lax
from jax.flatten_util import ravel_pytree

import jaxmargin as jm
from jaxmargin._checks import theorem5_max_decrease
from jaxmargin._flow import _solution as codes

jax.config.update("jax_enable_x64", True)

WIDTH, DIM = 5, 4


def _user_mlp(slope):
    """The built-in MLP written as a user would: jax.nn.relu, or leaky relu as a max."""

    def apply(params, x):
        hidden = x
        for layer in params[:-1]:
            z = layer @ hidden
            hidden = jax.nn.relu(z) if slope == 0.0 else jnp.maximum(z, slope * z)
        return params[-1] @ hidden

    return apply


def _random_gates(z_layers, rng):
    """Per layer (mask, alpha): every unit on its kink masked, a third of the others; alphas
    uniform with some exactly 0 and 1."""
    gates = []
    for z in z_layers:
        z = np.asarray(z)
        mask = (z == 0.0) | (rng.random(z.shape) < 0.3)
        alpha = rng.choice([0.0, 1.0, 0.5], size=z.shape) * (rng.random(z.shape) < 0.3)
        alpha = np.where(alpha == 0.0, rng.random(z.shape), alpha)
        gates.append((jnp.asarray(mask), jnp.asarray(alpha)))
    return tuple(gates)


def _kink_outputs(predictor, params, X, gates):
    """Everything the flow engine reads from a predictor's kinks, flattened per example."""
    kinks = predictor.kinks
    zeros = tuple(jnp.zeros(np.shape(mask)[1:]) for mask, _ in gates)

    def one(x, gate):
        def flat_z(p):
            return jnp.concatenate(kinks.preactivations(p, x, gate))

        def gated(p, offsets, branch):
            return kinks.gated_apply(p, x, gate, offsets, branch=branch)

        def flat(tree):
            return ravel_pytree(tree)[0]

        offsets_grad = jax.grad(gated, argnums=1)(params, zeros, False)
        return {
            "value": predictor.apply(params, x),
            "grad": flat(jax.grad(predictor.apply)(params, x)),
            "z": jnp.concatenate(kinks.preactivations(params, x)),
            "gated z": flat_z(params),
            "gated z jacobian": jax.jacrev(lambda w: flat_z(ravel_unravel(w)))(flat(params)),
            "gated value": gated(params, zeros, False),
            "gated grad": flat(jax.grad(gated)(params, zeros, False)),
            # The engine scales the backpropagated signal by (1 - slope): compare that.
            "signal": (1.0 - kinks.slope) * jnp.concatenate(offsets_grad),
            "branch value": gated(params, zeros, True),
            "branch grad": flat(jax.grad(gated)(params, zeros, True)),
        }

    ravel_unravel = ravel_pytree(params)[1]
    return jax.jit(jax.vmap(one))(X, gates)


@pytest.mark.parametrize("depth, slope", [(2, 0.0), (3, 0.0), (2, 0.2), (3, 0.2)])
def test_traced_mlp_kinks_equal_the_hand_written(depth, slope):
    hand = jm.relu_mlp(depth, WIDTH) if slope == 0.0 else jm.leaky_relu_mlp(depth, WIDTH, slope)
    rng = np.random.default_rng(depth)
    x_kinked = rng.integers(-3, 4, size=DIM).astype(float)
    params, placed = integer_relu_params_on_kinks(depth, WIDTH, x_kinked, rng)
    X = jnp.asarray(np.vstack([x_kinked, rng.normal(size=(2, DIM))]))
    z_layers = jax.vmap(hand.kinks.preactivations, in_axes=(None, 0))(params, X)
    assert sum(int(np.sum(np.asarray(z)[0] == 0.0)) for z in z_layers) >= len(placed) // 2
    gates = _random_gates(z_layers, rng)
    reference = _kink_outputs(hand, params, X, gates)
    traced = {
        "builtin apply": jm.predictor(hand.apply, hand.init, in_shape=DIM),
        "user-written": jm.predictor(_user_mlp(slope), hand.init, in_shape=DIM),
    }
    for source, predictor in traced.items():
        assert predictor.degree == depth and predictor.layer_degrees == (1,) * depth
        ours = _kink_outputs(predictor, params, X, gates)
        for name, expected in reference.items():
            expected = np.asarray(expected)
            scale = max(1.0, float(np.max(np.abs(expected))))
            np.testing.assert_allclose(
                np.asarray(ours[name]), expected, rtol=0, atol=1e-12 * scale, err_msg=source + name
            )


def test_kink_convention_at_zero_follows_relu_grad_at_zero():
    hand = jm.relu_mlp(3, WIDTH, relu_grad_at_zero=0.5)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.integers(-3, 4, size=DIM).astype(float))
    params, _ = integer_relu_params_on_kinks(3, WIDTH, x, rng)
    ours = jm.predictor(_user_mlp(0.0), hand.init, in_shape=DIM)
    half = ours.rebuild(relu_grad_at_zero=0.5)
    assert half.relu_grad_at_zero == 0.5 and half.rebuild(relu_grad_at_zero=0.0) is ours
    expected = jax.grad(hand.apply)(params, x)
    for got, want in zip(jax.grad(half.apply)(params, x), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    zero = jax.grad(ours.apply)(params, x)
    assert any(not np.allclose(a, b) for a, b in zip(zero, expected))  # the kinks matter here


# --------------------------------------------------------------------------- flows


def _flow_pair(problem, **options):
    predictor, params0, X, y = problem
    user = jm.predictor(_user_mlp(0.0), predictor.init, in_shape=X.shape[1])
    return [
        jm.gradient_flow(p, params0, X, y, **options)  # the default: the asymptotic engine
        for p in (predictor, user)
    ]


def _assert_same_flow(builtin, user, rel):
    assert int(user.status.code) == int(builtin.status.code), user.status.message
    assert int(builtin.status.code) == codes.REACHED_TARGET, builtin.status.message
    ours, theirs = float(user.soft_margin[-1]), float(builtin.soft_margin[-1])
    print(f"gamma~ at the end: built-in {theirs:.10g}, user-written {ours:.10g}")
    assert ours == pytest.approx(theirs, rel=rel)


@pytest.mark.slow  # two compilations of the stiff-stage pipeline: 39 s on one core
def test_user_mlp_flows_like_the_builtin():
    """The same weights, the same flow: on a small problem to beta = 1e4 (gamma~ agreed to the
    last digit, with the same steps, when measured). What the engine reads from the kinks is
    compared to 1e-12 by test_traced_mlp_kinks_equal_the_hand_written."""
    builtin, user = _flow_pair(jm.reference_problem(2, width=4, n=8), beta_max=1e4, kink_slots=32)
    _assert_same_flow(builtin, user, rel=1e-6)


@pytest.mark.slow
def test_user_mlp_flows_like_the_builtin_to_beta_1e12():
    """The reference problem (L = 2) to beta = 1e12, through the limit flow. docs/benchmarks.md
    ("How reproducible the ReLU rows are") measures how ReLU flows amplify rounding: moving t0
    by a rounding error moved gamma~ at 1e12 by 7.5e-4 relative; allowed: 2e-3."""
    builtin, user = _flow_pair(jm.reference_problem(2), beta_max=1e12)
    _assert_same_flow(builtin, user, rel=2e-3)


# --------------------------------------------------------------------------- max-pool ties


def _conv(kernel, x):
    return lax.conv_general_dilated(
        x[None, :, :, None], kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )[0]


def _pool_by_reduce_window(h):
    return lax.reduce_window(h, -jnp.inf, lax.max, (2, 2, 1), (2, 2, 1), "VALID")


def _pool_by_max(h):
    rows, cols, channels = h.shape
    windows = h.reshape(rows // 2, 2, cols // 2, 2, channels).transpose(0, 2, 4, 1, 3)
    return jnp.max(windows.reshape(rows // 2, cols // 2, channels, 4), axis=-1)


def _user_cnn(pool):
    def apply(params, x):
        kernel, readout = params
        return readout @ pool(jax.nn.relu(_conv(kernel, x))).reshape(-1)

    return apply


def _tied_image(kernel, rng):
    """A 6x6 integer image whose 3x3 VALID convolution with `kernel` (kernel[0, 0] = 1) ties all
    four entries of every 2x2 pooling window, while the patches differ. A pixel changes the
    entries whose patch holds it, all up and left of it: windows are tied from the bottom right,
    each by its patches' top-left pixels."""
    image = rng.integers(10, 20, size=(6, 6)).astype(float)
    k = np.asarray(kernel)[:, :, 0, 0]

    def entry(i, j):
        return float(np.sum(k * image[i : i + 3, j : j + 3]))

    for i in (2, 0):
        for j in (2, 0):
            image[i + 1, j] += entry(i + 1, j + 1) - entry(i + 1, j)  # ties the bottom pair
            image[i, j + 1] += entry(i + 1, j + 1) - entry(i, j + 1)  # top right to them
            image[i, j] += entry(i, j + 1) - entry(i, j)  # top left (moved by the last too)
    return jnp.asarray(image)


@pytest.mark.parametrize("pool", [_pool_by_reduce_window, _pool_by_max])
def test_lemma2_and_the_clarke_hull_at_max_pool_ties(pool):
    rng = np.random.default_rng(3)
    kernel = rng.integers(1, 3, size=(3, 3, 1, 1)).astype(float)
    kernel[0, 0] = 1.0
    image = _tied_image(kernel, rng)
    z = np.asarray(_conv(jnp.asarray(kernel), image))[:, :, 0]
    windows = z.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
    assert np.all(windows == windows[:, :1]) and np.all(z > 0)  # all four tie, relus active
    params = (jnp.asarray(kernel), jnp.asarray(rng.choice([-2.0, -1.0, 1.0, 3.0], size=4)))
    predictor = jm.predictor(_user_cnn(pool), lambda key, shape: params, in_shape=(6, 6))
    assert predictor.degree == 2 and predictor.kinks is not None
    kinks = predictor.kinks
    sites = [np.asarray(u) for u in kinks.preactivations(params, image)]
    assert sum(int(np.sum(u == 0.0)) for u in sites) == 12  # three pairwise sites per window
    f = float(predictor.apply(params, image))
    w = ravel_pytree(params)[0]
    # The tied entries' gradients in the kernel: their patches, one by one.
    patches = [
        jax.grad(lambda k, i=i, j=j: _conv(k, image)[i, j, 0])(params[0]).ravel()
        for i in range(4)
        for j in range(4)
    ]

    def gated_gradient(alpha, masked_window=None):
        gates = []
        for u, a in zip(sites, alpha):
            mask = u == 0.0
            if masked_window is not None:
                mask &= np.arange(u.size) == masked_window
            gates.append((jnp.asarray(mask), jnp.asarray(a)))
        grad = jax.grad(lambda p: kinks.gated_apply(p, image, tuple(gates)))(params)
        return np.asarray(ravel_pytree(grad)[0])

    spread = []
    for trial in range(6):
        alpha = [rng.random(u.size) if trial > 1 else np.full(u.size, 1.0 * trial) for u in sites]
        s = gated_gradient(alpha)
        assert abs(s @ np.asarray(w) - 2.0 * f) <= 1e-12 * max(1.0, abs(f))  # Lemma 2
        spread.append(s)
        # One window gated, the rest at the unmasked convention: the kernel part of s moves in
        # the hull of that window's four patches, with the pairwise tree's weights.
        window = trial % 4
        s_window = gated_gradient(alpha, window)
        a1, a2, a3 = (alpha[k][window] for k in range(3))
        weights = [a3 * a1, a3 * (1 - a1), (1 - a3) * a2, (1 - a3) * (1 - a2)]
        rows, cols = divmod(window, 2)
        entries = [(2 * rows + di) * 4 + 2 * cols + dj for di in (0, 1) for dj in (0, 1)]
        rest = gated_gradient([np.zeros(u.size) for u in sites], window)[:9]
        hull_point = rest + float(params[1][window]) * sum(
            weight * (patches[e] - patches[entries[-1]]) for weight, e in zip(weights, entries)
        )
        np.testing.assert_allclose(
            s_window[:9], hull_point, rtol=0, atol=1e-12 * np.abs(rest).max()
        )
    assert np.ptp(np.stack(spread), axis=0).max() > 1.0  # the alphas moved s


# --------------------------------------------------------------------------- rewrites


def _mlp_init(key, in_dim):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "W1": jax.random.normal(k1, (6, in_dim)),
        "W2": jax.random.normal(k2, (6, 6)),
        "v": jax.random.normal(k3, (6,)),
    }


# Activations written in the ways the rewrites recognise, with the number of kink sites each
# network should have: one for the first layer's relu, the rest for the activation.
PATTERNS = {
    "min(z, 0)": (lambda z: jnp.minimum(z, 0.0), 2),
    "clip": (lambda z: jnp.clip(z, 0.0), 2),
    "where(z < 0, a z, z)": (lambda z: jnp.where(z < 0, 0.1 * z, z), 2),
    "where(0 > z, ...)": (lambda z: jnp.where(0 > z, -0.3 * z, 2 * z), 2),
    "where(a > b, a, b)": (lambda z: jnp.where(z[:3] > z[3:], z[:3], z[3:]).repeat(2), 2),
    "relu(relu(z))": (lambda z: jax.nn.relu(jax.nn.relu(z)), 2),
    "min(relu, 2 relu)": (lambda z: jnp.minimum(jax.nn.relu(z), 2 * jax.nn.relu(z)), 2),
    "max of relus": (lambda z: jnp.maximum(jax.nn.relu(z[:3]), jax.nn.relu(z[3:])), 3),
    "min over an axis": (lambda z: jnp.min(z.reshape(3, 2), axis=1), 2),
    "global max": (lambda z: jnp.max(jax.nn.relu(z)) * jnp.ones(3), 7),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_rewrites_match_autodiff_off_kinks(pattern):
    """Away from the kinks the traced network's value and gradient are the function's own."""
    activation, num_sites = PATTERNS[pattern]

    def apply(params, x):
        z = params["W2"] @ jax.nn.relu(params["W1"] @ x)
        return params["v"][: activation(z).size] @ activation(z)

    predictor = jm.predictor(apply, _mlp_init, in_shape=3)
    assert predictor.degree == 3
    for seed in range(2):
        params = predictor.init(jax.random.key(seed), 3)
        tree = _mlp_init(jax.random.key(seed), 3)
        x = jax.random.normal(jax.random.key(10 + seed), (3,))
        value, grad = jax.value_and_grad(predictor.apply)(params, x)
        expected_value, expected_grad = jax.value_and_grad(apply)(tree, x)
        assert float(value) == pytest.approx(float(expected_value), rel=1e-14, abs=1e-14)
        np.testing.assert_allclose(
            ravel_pytree(grad)[0], ravel_pytree(jax.tree.leaves(expected_grad))[0], atol=1e-14
        )
    assert len(predictor.kinks.preactivations(params, x)) == num_sites


# --------------------------------------------------------------------------- errors, degree


@pytest.mark.parametrize(
    "body, primitive",
    [
        (lambda p, h: p["v"] @ jnp.exp(p["W2"] @ h), "exp"),
        (lambda p, h: p["v"] @ jnp.tanh(p["W2"] @ h), "tanh"),
        (lambda p, h: p["v"] @ jax.nn.sigmoid(p["W2"] @ h), "logistic"),
        (lambda p, h: p["v"] @ (p["W2"] @ h) / jnp.linalg.norm(p["v"]), "sqrt"),
        (lambda p, h: p["v"] @ jnp.where(p["W2"] @ h > 0, 1.0, 0.0), "select_n"),
        (lambda p, h: p["v"] @ jnp.sign(p["W2"] @ h), "sign"),
    ],
)
def test_unsupported_primitives_are_named(body, primitive):
    def apply(params, x):
        return body(params, jax.nn.relu(params["W1"] @ x))

    with pytest.raises(ValueError, match=f"`{primitive}`.*test_user_predictor.py"):
        jm.predictor(apply, _mlp_init, in_shape=3)


def test_biases_are_rejected_as_not_homogeneous():
    def apply(params, x):  # a bias in the second layer: degrees 2 and 1 added
        hidden = jax.nn.relu(params["W1"] @ x)
        return params["v"] @ jax.nn.relu(params["W2"] @ hidden + params["v"])

    with pytest.raises(ValueError, match=r"`add`.*degrees \[1, 2\].*not positively homogeneous"):
        jm.predictor(apply, _mlp_init, in_shape=3)


def test_degree_and_layer_degrees_are_found():
    def apply(params, x):  # abs, leaky relu by jnp.where, min, max over axes, a shared weight
        hidden = jnp.abs(params["W1"] @ x)
        z = params["W2"] @ hidden
        hidden = jnp.where(z > 0, z, 0.1 * z)
        hidden = jnp.minimum(hidden, hidden[::-1])
        hidden = jnp.max((params["W2"] @ hidden).reshape(3, 2), axis=1)
        return params["v"][:3] @ hidden

    predictor = jm.predictor(apply, _mlp_init, in_shape=3)
    assert predictor.degree == 4 and predictor.layer_degrees == (1, 2, 1)
    assert predictor.name == "predictor(apply)" and predictor.kinks is not None
    X = jax.random.normal(jax.random.key(1), (5, 3))
    params = predictor.init(jax.random.key(0), 3)
    assert jm.estimate_degree(predictor, params, X) == pytest.approx(4.0, abs=1e-9)
    with pytest.raises(ValueError, match="declared of degree 3 but has degree 4"):
        jm.predictor(apply, _mlp_init, in_shape=3, degree=3)
    # A bias in the first layer is homogeneous of degree 2, but not in each array alone.
    biased = jm.predictor(
        lambda p, x: p["v"] @ jax.nn.relu(p["W1"] @ x + p["v"]), _mlp_init, in_shape=6
    )
    assert biased.degree == 2 and biased.layer_degrees is None


def test_bad_arguments():
    apply = _user_mlp(0.0)
    init = jm.relu_mlp(2, 3).init
    with pytest.raises(ValueError, match="in_shape"):
        jm.predictor(apply, init, in_shape=(3, 0))
    with pytest.raises(ValueError, match="degree"):
        jm.predictor(apply, init, in_shape=3, degree=0)
    with pytest.raises(ValueError, match="relu_grad_at_zero"):
        jm.predictor(apply, init, in_shape=3, relu_grad_at_zero=2.0)
    with pytest.raises(TypeError, match="callables"):
        jm.predictor(None, init, in_shape=3)
    with pytest.raises(TypeError, match="float arrays"):
        jm.predictor(lambda p, x: p[0] @ x, lambda key, d: (jnp.ones(d, int),), in_shape=3)
    with pytest.raises(ValueError, match="scalar"):
        jm.predictor(lambda p, x: p[0] * x, lambda key, d: (jnp.ones(d),), in_shape=3)
    padded = lambda p, x: jnp.sum(  # noqa: E731
        lax.reduce_window(p[0] * x, -jnp.inf, lax.max, (2,), (2,), [(1, 1)])
    )
    with pytest.raises(NotImplementedError, match="padding"):
        jm.predictor(padded, lambda key, d: (jnp.ones(d),), in_shape=4)


def test_predictor_traces_under_jit_vmap_and_grad():
    predictor = jm.predictor(_user_mlp(0.0), jm.relu_mlp(3, 4).init, in_shape=3)
    assert jm.predictor(_user_mlp(0.0), jm.relu_mlp(3, 4).init, in_shape=3) is not predictor
    same = jm.predictor(predictor.rebuild.args[0], predictor.rebuild.args[1], in_shape=3)
    assert same is predictor  # cached: compiled programs are reused
    params = predictor.init(jax.random.key(0), 3)
    X = jax.random.normal(jax.random.key(1), (4, 3))
    eager = jnp.stack([predictor.apply(params, x) for x in X])
    batched = jax.jit(jax.vmap(predictor.apply, in_axes=(None, 0)))(params, X)
    np.testing.assert_allclose(batched, eager, rtol=1e-14)
    grads = jax.jit(jax.vmap(jax.grad(predictor.apply), in_axes=(None, 0)))(params, X)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # Other input shapes are traced when first used.
    assert np.shape(predictor.apply(predictor.init(jax.random.key(0), 5), jnp.ones(5))) == ()


# --------------------------------------------------------------------------- equinox, flax


def test_equinox_network():
    import equinox as eqx

    model = eqx.nn.MLP(
        3,
        "scalar",
        6,
        2,
        activation=jax.nn.relu,
        use_bias=False,
        use_final_bias=False,
        key=jax.random.key(0),
    )
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    predictor = jm.predictor(
        lambda params, x: eqx.combine(params, static)(x),
        lambda key, in_shape: arrays,
        in_shape=3,
    )
    assert predictor.degree == 3 and predictor.layer_degrees == (1, 1, 1)
    reference = jm.relu_mlp(3, 6)
    params = tuple(
        leaf.reshape(-1) if leaf.shape[0] == 1 else leaf for leaf in jax.tree.leaves(arrays)
    )
    x = jax.random.normal(jax.random.key(2), (3,))
    own = predictor.init(jax.random.key(0), 3)
    assert float(predictor.apply(own, x)) == pytest.approx(
        float(reference.apply(params, x)), rel=1e-13
    )
    z = predictor.kinks.preactivations(own, x)
    assert [u.shape for u in z] == [(6,), (6,)]


def test_flax_network():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(2, (3, 3), use_bias=False)(x[..., None])
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            return nn.Dense(1, use_bias=False)(x.reshape(-1))[0]

    net = Net()
    predictor = jm.predictor(
        net.apply, lambda key, in_shape: net.init(key, jnp.zeros(in_shape)), in_shape=(6, 6)
    )
    assert predictor.degree == 2 and predictor.layer_degrees == (1, 1)
    params = predictor.init(jax.random.key(0), (6, 6))
    assert [p.dtype for p in params] == [jnp.float64] * 2  # flax's float32 made float64
    x = jax.random.normal(jax.random.key(1), (6, 6))
    tree = net.init(jax.random.key(0), jnp.zeros((6, 6)))
    tree = jax.tree.map(lambda a: a.astype(jnp.float64), tree)
    assert float(predictor.apply(params, x)) == pytest.approx(float(net.apply(tree, x)), rel=1e-13)
    # Pool commuted with relu: three pairwise sites per window and a relu per pooled value.
    assert [u.shape for u in predictor.kinks.preactivations(params, x)] == [(18,)] * 4


# --------------------------------------------------------------------------- the built-in CNN


def _cnn_problem():
    predictor = jm.relu_cnn((2,), 3, 2)
    X = jax.random.normal(jax.random.key(3), (8, 6, 6))
    y = jnp.sign(X[:, :3].sum(axis=(1, 2)) - X[:, 3:].sum(axis=(1, 2)))
    options = dict(solver="rosenbrock", beta_max=1e2, max_steps=5000, kink_slots=32)
    return predictor, predictor.init(jax.random.key(4), (6, 6)), X, y, options


def test_builtin_cnn_kinks_and_a_sliding_run():
    """The built-in CNN's kinks (relu units, max-pool ties) found by tracing: its stiff-stage run
    reaches beta = 1e2 holding pairs on their kinks, gamma~ never falling."""
    predictor, params0, X, y, options = _cnn_problem()
    assert predictor.kinks is not None and predictor.kinks.slope == 0.0
    solution = jm.gradient_flow(predictor, params0, X, y, **options)
    assert int(solution.status.code) == codes.REACHED_TARGET, solution.status.message
    assert theorem5_max_decrease(solution) <= 1e-8
    # The run slid: pairs held on their kinks at the end, to rounding.
    last = jax.tree.map(lambda a: a[-1], solution.params)
    z = jax.vmap(lambda x: jnp.concatenate(predictor.kinks.preactivations(last, x)))(X)
    relative = np.abs(np.asarray(z)) / np.abs(np.asarray(z)).mean()
    assert np.sum(relative < 1e-12) >= 3


@pytest.mark.slow
def test_builtin_cnn_without_its_kinks_chatters():
    """The same run with autodiff's element (kinks=None, the CNN before it had kinks): phase 1
    chatters through its step budget (docs/decisions.md D52)."""
    predictor, params0, X, y, options = _cnn_problem()
    autodiff = jm.gradient_flow(predictor._replace(kinks=None), params0, X, y, **options)
    assert int(autodiff.status.code) == codes.MAX_STEPS
