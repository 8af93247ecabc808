"""Planning and reporting functions, the CLI and DPKerasConfig."""

import math

import pytest

from torchdp_keras import privacy as privacy_cli
from torchdp_keras.accounting import (
    PRVAccountant,
    RDPAccountant,
    calibrate_noise_multiplier,
    compute_dp_sgd_privacy_statement,
    default_delta,
    get_privacy_budget,
)
from torchdp_keras.config import DPKerasConfig
from torchdp_keras.errors import DPConfigError


def _prv(sigma, q, steps, delta):
    acc = PRVAccountant()
    acc.compose(sigma, q, steps)
    return acc.get_epsilon(delta)


def test_get_privacy_budget_matches_accountants():
    prv = get_privacy_budget(60000, 250, 15, 1.3, 1e-5)
    rdp = get_privacy_budget(60000, 250, 15, 1.3, 1e-5, accountant="rdp")
    assert prv == pytest.approx(_prv(1.3, 250 / 60000, 3600, 1e-5))
    assert rdp == pytest.approx(0.9422, abs=5e-4)
    assert prv < rdp  # PRV is tighter than RDP


@pytest.mark.parametrize(
    "target,q,steps", [(1.0, 0.004, 3600), (3.0, 0.01, 1000), (8.0, 0.05, 500)]
)
def test_calibration_round_trip(target, q, steps):
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps)
    # The budget is spent to within 1% and never exceeded.
    assert 0.99 * target <= _prv(sigma, q, steps, 1e-5) <= target


def test_calibration_with_rdp_and_edge_cases():
    sigma = calibrate_noise_multiplier(2.0, 1e-5, 0.01, 1000, accountant="rdp")
    acc = RDPAccountant()
    acc.compose(sigma, 0.01, 1000)
    assert acc.get_epsilon(1e-5) <= 2.0
    assert calibrate_noise_multiplier(math.inf, 1e-5, 0.01, 1000) == 0.0
    assert calibrate_noise_multiplier(1.0, 1e-5, 0.0, 1000) == 0.0
    with pytest.raises(DPConfigError, match="target_epsilon=0"):
        calibrate_noise_multiplier(0, 1e-5, 0.01, 10)
    with pytest.raises(DPConfigError, match="accountant='moments'"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 10, accountant="moments")


def test_privacy_statement_contents():
    text = compute_dp_sgd_privacy_statement(
        number_of_examples=60000,
        batch_size=250,
        num_epochs=15,
        noise_multiplier=1.3,
        delta=1e-5,
        used_microbatching=False,
    )
    rdp = get_privacy_budget(60000, 250, 15, 1.3, 1e-5, accountant="rdp")
    prv = get_privacy_budget(60000, 250, 15, 1.3, 1e-5)
    assert f"PRV accountant: {prv:.3f}" in text
    assert f"RDP accountant: {rdp:.3f}" in text
    assert "Poisson sampling" in text and "once per epoch" in text
    assert "User-level caveat" in text
    doubled = compute_dp_sgd_privacy_statement(60000, 250, 15, 1.3, 1e-5)
    assert "doubles the sensitivity" in doubled
    users = compute_dp_sgd_privacy_statement(
        60000, 250, 15, 1.3, 1e-5, used_microbatching=False, max_examples_per_user=3
    )
    assert "User-level DP" in users and "at most 3 examples" in users


def test_cli_statement_and_calibration(capsys):
    args = ["--n", "60000", "--batch-size", "250", "--epochs", "15", "--delta", "1e-5"]
    assert privacy_cli.main([*args, "--noise-multiplier", "1.3"]) == 0
    assert "Epsilon assuming Poisson sampling" in capsys.readouterr().out
    assert privacy_cli.main([*args, "--target-epsilon", "1.0"]) == 0
    out = capsys.readouterr().out
    sigma = float(out.split("noise_multiplier = ")[1].split()[0])
    assert _prv(sigma, 250 / 60000, 3600, 1e-5) <= 1.0
    assert privacy_cli.main([*args, "--noise-multiplier", "-1"]) == 2
    assert "noise_multiplier=-1" in capsys.readouterr().err


def _sigma_from(out: str) -> float:
    return float(out.split("noise_multiplier = ")[1].split()[0])


@pytest.mark.parametrize(
    "extra,kwargs",
    [
        (["--neighboring", "replace_one"], {"neighboring": "replace_one"}),
        (["--max-examples-per-user", "3"], {"group_size": 3}),
    ],
)
def test_cli_calibrates_for_the_relation_and_the_user(capsys, extra, kwargs):
    args = ["--n", "60000", "--batch-size", "250", "--epochs", "3", "--delta", "1e-5"]
    assert privacy_cli.main([*args, "--target-epsilon", "2.0"]) == 0
    example = _sigma_from(capsys.readouterr().out)
    assert privacy_cli.main([*args, "--target-epsilon", "2.0", *extra]) == 0
    out = capsys.readouterr().out
    sigma = _sigma_from(out)
    assert sigma > example  # both relations cost more noise than add/remove of one example
    acc = PRVAccountant(**kwargs)
    acc.compose(sigma, 250 / 60000, 720)
    assert 0.99 * 2.0 <= acc.get_epsilon(1e-5) <= 2.0
    assert ("replace_one" in out) == ("neighboring" in kwargs)
    assert ("user of at most 3 examples" in out) == ("group_size" in kwargs)


def test_cli_statement_with_replace_one(capsys):
    args = ["--n", "60000", "--batch-size", "250", "--epochs", "3", "--delta", "1e-5"]
    args += ["--noise-multiplier", "1.0"]
    assert privacy_cli.main(args) == 0
    add_remove = capsys.readouterr().out
    assert privacy_cli.main([*args, "--neighboring", "replace_one"]) == 0
    replace = capsys.readouterr().out
    assert "replace-one adjacency" in replace and "add-or-remove-one adjacency" in add_remove

    def first_epsilon(text):
        return float(text.split("PRV accountant: ")[1].split()[0])

    assert first_epsilon(replace) > first_epsilon(add_remove)
    # User-level DP adds or removes a user: refused with replace_one, naming both.
    assert (
        privacy_cli.main([*args, "--neighboring", "replace_one", "--max-examples-per-user", "2"])
        == 2
    )
    err = capsys.readouterr().err
    assert "neighboring='replace_one'" in err and "max_examples_per_user=2" in err


CONFIG = dict(
    epsilon=3.0,
    delta=1e-5,
    clipping_norm=1.0,
    batch_size=100,
    gradient_accumulation_steps=1,
    train_steps=600,
    train_size=10000,
)


def test_config_defaults_and_calibration():
    config = DPKerasConfig(**CONFIG)
    assert config.poisson_sampling_in_fit is False and config.rescale_to_unit_norm is True
    assert config.noise_multiplier is None and config.microbatch_size is None
    assert config.effective_batch_size == 100 and config.l2_norm_clip == 1.0
    calibrated = config.update_with_calibrated_noise_multiplier()
    assert calibrated.noise_multiplier > 0
    assert calibrated.planned_epsilon() <= 3.0
    assert DPKerasConfig(**{**CONFIG, "gradient_accumulation_steps": 4}).effective_batch_size == 400
    assert DPKerasConfig.from_dict(calibrated.to_dict()) == calibrated


def test_config_rejects_a_sigma_that_overspends():
    with pytest.raises(DPConfigError, match=r"noise_multiplier=0.3 gives epsilon=\d"):
        DPKerasConfig(**CONFIG, noise_multiplier=0.3)
    assert DPKerasConfig(**CONFIG, noise_multiplier=5.0).noise_multiplier == 5.0


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(epsilon=0), "epsilon=0"),
        (dict(epsilon=-1.0), "epsilon=-1.0"),
        (dict(delta=0), "delta=0"),
        (dict(delta=1.5), "delta=1.5"),
        (dict(clipping_norm=-1), "clipping_norm=-1"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(batch_size=2.0), "batch_size=2.0"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps=0"),
        (dict(train_steps=-5), "train_steps=-5"),
        (dict(train_size=50), "effective_batch_size=100, train_size=50"),
        (dict(poisson_sampling_in_fit="yes"), "poisson_sampling_in_fit='yes'"),
        (dict(noise_multiplier=-0.1), "noise_multiplier=-0.1"),
        (dict(rescale_to_unit_norm=1), "rescale_to_unit_norm=1"),
        (dict(microbatch_size=0), "microbatch_size=0"),
        (dict(microbatch_size=11, batch_size=10), "microbatch_size=11, batch_size=10"),
        (dict(seed=-1), "seed=-1"),
        (dict(seed=2**64), "seed="),
    ],
)
def test_config_validation(change, message):
    with pytest.raises(DPConfigError, match=message):
        DPKerasConfig(**{**CONFIG, **change})


def test_get_privacy_budget_prints_as_op_tensorflow_and_gives_its_rdp_number(capsys):
    """op_tensorflow's example: RDP 0.2778802396005823; PRV, the default, is lower."""
    rdp = get_privacy_budget(
        sample_size=100000,
        batch_size=4,
        num_epochs=20,
        noise_multiplier=1.2,
        target_delta=1e-5,
        accountant="rdp",
    )
    assert rdp == pytest.approx(0.2778802396005823, abs=1e-9)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:6] == [
        f"=> EPSILON_REQUIRED = {rdp} using TARGET_DELTA = 1e-05",
        "Training parameters used :-",
        "SAMPLE_SIZE = 100000",
        "BATCH_SIZE = 4",
        "NUM_EPOCHS = 20",
        "NOISE_MULTIPLIER = 1.2",
    ]
    assert lines[6] == "ACCOUNTANT = RDP"
    prv = get_privacy_budget(100000, 4, 20, 1.2, 1e-5)
    assert prv < rdp
    assert capsys.readouterr().out.splitlines()[6].startswith("ACCOUNTANT = PRV (upper bound")
    assert get_privacy_budget(100000, 4, 20, 1.2, 1e-5, verbose=False) == prv
    assert capsys.readouterr().out == ""
    doc = " ".join(get_privacy_budget.__doc__.split())
    assert "upper bound" in doc and 'accountant="rdp"' in doc


@pytest.mark.parametrize("n", [1, 2, 99, 100, 60000])
def test_default_delta_is_valid_for_every_n(n):
    delta = default_delta(n)
    assert 0 < delta < 1 and delta <= 1.0 / max(n, 2) ** 1.1 * (1 + 1e-12)
    if n >= 2:
        assert delta < 1.0 / n
