"""RDP accountant against published values and a high-precision integral."""

import math

import numpy as np
import pytest
from helpers import mp_subsampled_gaussian_rdp

from torchdp_keras.accounting import RDPAccountant, compute_dp_sgd_privacy
from torchdp_keras.accounting.analysis import TF_PRIVACY_ORDERS
from torchdp_keras.accounting.rdp import rdp_to_epsilon, subsampled_gaussian_rdp
from torchdp_keras.errors import DPConfigError


def test_tf_privacy_notebook_values():
    eps, order = compute_dp_sgd_privacy(
        n=60000, batch_size=250, noise_multiplier=1.3, epochs=15, delta=1e-5
    )
    assert order == 17.0
    assert eps == pytest.approx(0.9422, abs=5e-4)
    classic = RDPAccountant(orders=TF_PRIVACY_ORDERS, conversion="classic")
    classic.compose(1.3, 250 / 60000, 3600)
    eps, order = classic.get_epsilon_and_order(1e-5)
    assert (round(eps, 2), order) == (1.18, 17.0)
    assert eps == pytest.approx(1.17990067, abs=1e-6)


def test_opacus_published_rdp_epsilon():
    acc = RDPAccountant()
    acc.compose(noise_multiplier=1.5, sampling_probability=0.04, steps=2250)
    assert acc.get_epsilon(1e-5) == pytest.approx(7.3291, abs=1e-3)


def test_dp_accounting_published_rdp_vector_integer_orders():
    # dp_accounting's test: q=0.01, sigma=2.5, 50 compositions.
    orders = [2.5, 5, 50, 100]
    expected = [1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02]
    acc = RDPAccountant(orders=orders)
    acc.compose(2.5, 0.01, 50)
    np.testing.assert_allclose(acc.get_rdp(), expected, rtol=1e-4)


def test_dp_accounting_published_conversion():
    # Constant RDP 1.1 over orders 2..32 (pure DP): epsilon 1.32783806176 at order 32.
    eps, order = rdp_to_epsilon([1.1] * 31, range(2, 33), 1e-5)
    assert eps == pytest.approx(1.32783806176, abs=1e-9)
    assert order == 32


@pytest.mark.parametrize(
    "q,sigma,alpha",
    [
        (0.01, 2.5, 1.5),
        (0.04, 1.5, 1.25),
        (0.5, 0.7, 1.25),
        (1e-4, 1.0, 1.5),
        (0.01, 10.0, 20.5),
        (0.1, 1.0, 7.3),
        (1e-3, 1.0, 2.0),
        (0.3, 0.9, 13.0),
    ],
)
def test_rdp_matches_the_defining_integral(q, sigma, alpha):
    actual = subsampled_gaussian_rdp(q, sigma, [alpha])[0]
    assert actual == pytest.approx(mp_subsampled_gaussian_rdp(q, sigma, alpha), rel=1e-6)


def test_special_cases():
    assert np.all(subsampled_gaussian_rdp(0.0, 1.0, [2, 3.5]) == 0)
    assert np.all(np.isinf(subsampled_gaussian_rdp(0.1, 0.0, [2, 3.5])))
    np.testing.assert_allclose(subsampled_gaussian_rdp(1.0, 2.0, [2, 3.5]), [0.25, 3.5 / 8])


def test_epsilon_edge_cases_and_monotonicity():
    acc = RDPAccountant()
    assert acc.get_epsilon(1e-5) == 0.0
    acc.compose(1.0, 0.0, 100)
    assert acc.get_epsilon(1e-5) == 0.0
    acc.compose(0.0, 0.1, 1)
    assert acc.get_epsilon(1e-5) == math.inf
    previous = math.inf
    for sigma in (0.6, 0.8, 1.0, 1.5, 3.0):
        acc = RDPAccountant()
        acc.compose(sigma, 0.01, 1000)
        eps = acc.get_epsilon(1e-5)
        assert eps < previous
        previous = eps


def test_heterogeneous_history_is_the_sum_of_its_parts():
    acc = RDPAccountant()
    acc.compose(1.0, 0.01, 100)
    acc.compose(2.0, 0.05, 50)
    acc.compose(1.0, 0.01, 20)
    expected = 120 * subsampled_gaussian_rdp(0.01, 1.0, acc.orders) + 50 * subsampled_gaussian_rdp(
        0.05, 2.0, acc.orders
    )
    np.testing.assert_allclose(acc.get_rdp(), expected, rtol=1e-12)
    assert acc.history == [(1.0, 0.01, 100), (2.0, 0.05, 50), (1.0, 0.01, 20)]
    assert acc.steps == 170


def test_state_round_trip_and_mismatch():
    acc = RDPAccountant()
    acc.compose(1.1, 0.02, 300)
    clone = RDPAccountant()
    clone.load_state_dict(acc.state_dict())
    assert clone.get_epsilon(1e-6) == acc.get_epsilon(1e-6)
    state = acc.state_dict()
    state["accountant"] = "prv"
    with pytest.raises(DPConfigError, match="Received: accountant='prv'"):
        RDPAccountant().load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(noise_multiplier=-1, sampling_probability=0.1), "noise_multiplier=-1"),
        (dict(noise_multiplier=1, sampling_probability=1.5), "sampling_probability=1.5"),
        (dict(noise_multiplier=1, sampling_probability=0.1, steps=-2), "steps=-2"),
        (dict(noise_multiplier=1, sampling_probability=0.1, steps=2.5), "steps=2.5"),
    ],
)
def test_bad_events(kwargs, message):
    with pytest.raises(DPConfigError, match=message):
        RDPAccountant().compose(**kwargs)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, float("nan")])
def test_bad_delta(delta):
    acc = RDPAccountant()
    acc.compose(1.0, 0.1, 1)
    with pytest.raises(DPConfigError, match="Expected 0 < delta < 1"):
        acc.get_epsilon(delta)


def test_bad_constructor_arguments():
    with pytest.raises(DPConfigError, match="conversion='tight'"):
        RDPAccountant(conversion="tight")
    with pytest.raises(DPConfigError, match="orders"):
        RDPAccountant(orders=[0.5, 2])
