"""The objects that own a DP model's state: DPSettings, PrivacyLedger, SamplingPlan, engines."""

import ast
import dataclasses
import pathlib

import keras
import numpy as np
import pytest

import torchdp_keras as tdk
from torchdp_keras.accounting import PRVAccountant, RDPAccountant
from torchdp_keras.accounting.ledger import PrivacyLedger, decode_state, encode_state
from torchdp_keras.data.sampling_plan import SamplingPlan
from torchdp_keras.errors import DPConfigError, PrivacyBudgetExceededError, PrivacyStateError
from torchdp_keras.per_example import (
    ClippingEngine,
    FastEngine,
    FastPathUnsupported,
    VmapEngine,
    make_engine,
)
from torchdp_keras.per_example.rules.base import Forward, as_forward
from torchdp_keras.settings import DP_CONFIG_KEYS, DPSettings

PACKAGE = pathlib.Path(tdk.__file__).parent


# -- DPSettings --------------------------------------------------------------------------------
def test_settings_are_frozen_validated_once_and_round_trip():
    settings = DPSettings.create(
        l2_norm_clip=2, noise_multiplier=1, num_microbatches=4, seed=7, clipping_mode="vmap"
    )
    assert (settings.l2_norm_clip, settings.noise_multiplier) == (2.0, 1.0)
    assert isinstance(settings.l2_norm_clip, float) and settings.noise_std == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.l2_norm_clip = 3.0
    assert set(settings.to_config()) == set(DP_CONFIG_KEYS)
    assert DPSettings.from_config(settings.to_config()) == settings


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"l2_norm_clip": 0.0, "noise_multiplier": 1.0}, "l2_norm_clip"),
        ({"l2_norm_clip": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "clipping_mode": "slow"}, "clipping_mode"),
        ({"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "use_xla": 1}, "use_xla"),
        ({"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "layer_registry": {}}, "layer_registry"),
        ({"l2_norm_clip": 1e30, "noise_multiplier": 1e30}, "noise_multiplier * l2_norm_clip"),
    ],
)
def test_settings_name_the_bad_argument(kwargs, name):
    with pytest.raises(DPConfigError, match=name.replace("*", r"\*")):
        DPSettings.create(**kwargs)


def test_settings_read_tf_privacys_positional_order():
    layers = [keras.Input((2,))]
    args, kwargs, settings = DPSettings.from_arguments(
        "DPSequential", (1.5, 0.7, 2, False, None, layers), {"name": "m"}
    )
    assert args == (layers,) and kwargs == {"name": "m"}
    assert (settings.l2_norm_clip, settings.noise_multiplier, settings.num_microbatches) == (
        1.5,
        0.7,
        2,
    )
    with pytest.raises(DPConfigError, match="both by position"):
        DPSettings.from_arguments("DPSequential", (1.5, 0.7), {"l2_norm_clip": 1.0})
    with pytest.raises(TypeError, match="noise_multiplier"):
        DPSettings.from_arguments("DPSequential", (layers,), {"l2_norm_clip": 1.0})
    _, _, deferred = DPSettings.from_arguments("Model", (), {}, required=False)
    assert not deferred.complete
    with pytest.raises(DPConfigError, match="compile the model"):
        _ = deferred.noise_std


# -- PrivacyLedger --------------------------------------------------------------------------------
def test_ledger_composes_each_update_at_its_q_like_the_accountant_alone():
    ledger = PrivacyLedger(sampling_probability=0.01, train_size=1000)
    reference = PRVAccountant()
    for sigma in (1.0, 1.0, 2.0):
        ledger.record_update(sigma)
        reference.compose(sigma, 0.01, 1)
    assert ledger.steps == 3
    assert ledger.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    ledger.sampling_probability = None
    ledger.record_update(1.0)
    assert ledger.unaccounted_steps == 1 and ledger.get_epsilon(1e-5) == float("inf")


def test_ledger_state_round_trips_and_refuses_foreign_states():
    ledger = PrivacyLedger(sampling_probability=0.02, train_size=500, target_delta=1e-4)
    ledger.record_update(1.3)
    ledger.nonfinite_examples = 2
    fingerprint = [[[3, 2], "float32"]]
    state = decode_state(encode_state(ledger.state_dict(fingerprint)))
    restored = PrivacyLedger()
    restored.check_state(state, fingerprint, "m")
    restored.load_state_dict(state)
    assert (restored.steps, restored.nonfinite_examples, restored.restored) == (1, 2, True)
    assert restored.get_epsilon(1e-4) == ledger.get_epsilon(1e-4)
    with pytest.raises(PrivacyStateError, match="another model"):
        restored.check_state(state, [[[4, 2], "float32"]], "m")
    with pytest.raises(PrivacyStateError, match="'rdp'"):
        PrivacyLedger(RDPAccountant()).check_state(state, None, "m")
    with pytest.raises(PrivacyStateError, match="dp_steps_taken"):
        PrivacyLedger().load_state_dict({**state, "dp_steps_taken": -1})


def test_ledger_enforces_the_config_budget_and_accountant_switches_only_when_empty():
    config = tdk.DPKerasConfig(
        epsilon=8.0, delta=1e-5, clipping_norm=1.0, batch_size=10,
        gradient_accumulation_steps=1, train_steps=1, train_size=100, noise_multiplier=2.0,
    )  # fmt: skip
    ledger = PrivacyLedger(config=config, sampling_probability=0.1)
    with pytest.raises(DPConfigError, match="batch_size=10"):
        ledger.check_before_step(11)
    ledger.check_before_step(11, poisson=True)
    ledger.record_update(2.0)
    with pytest.raises(PrivacyBudgetExceededError, match="train_steps=1"):
        ledger.check_before_step(10)
    with pytest.raises(DPConfigError, match="after training steps"):
        ledger.use_accountant(RDPAccountant())
    fresh = PrivacyLedger()
    fresh.use_accountant(RDPAccountant())
    assert fresh.accountant.name == "rdp"


# -- SamplingPlan ---------------------------------------------------------------------------------
def test_plan_for_arrays_loaders_and_unknown_inputs():
    x, y = np.zeros((200, 3), "float32"), np.zeros(200)
    plan = SamplingPlan.resolve(x, y, batch_size=20, validation_split=0.5, accumulation_steps=2)
    assert (plan.train_size, plan.sampling_probability) == (100, 0.4)
    assert plan.notice[0] == "not-poisson" and plan.expected_batch_size is None
    loader = tdk.PrivateDataLoader(x, y, batch_size=8)
    plan = SamplingPlan.resolve(loader)
    assert plan.loader is loader and plan.notice is None
    assert plan.fit_kwargs == {"shuffle": False}
    assert (plan.sampling_probability, plan.expected_batch_size) == (8 / 200, 8)
    with pytest.raises(DPConfigError, match="shuffle=True"):
        SamplingPlan.resolve(loader, fit_kwargs={"shuffle": True})
    with pytest.raises(DPConfigError, match="gradient_accumulation_steps=4"):
        SamplingPlan.resolve(loader, accumulation_steps=4)
    with pytest.raises(DPConfigError, match="secure_mode=True"):
        SamplingPlan.resolve(loader, secure_mode=True)
    plan = SamplingPlan.resolve(iter([]))
    assert plan.sampling_probability is None and plan.notice[0] == "unknown-n"


def test_a_fit_adopts_its_plan():
    model = tdk.DPSequential(
        [keras.Input((3,)), keras.layers.Dense(1)], l2_norm_clip=1.0, noise_multiplier=1.0, seed=0
    )
    model.compile(optimizer="sgd", loss="mse")
    loader = tdk.PrivateDataLoader(np.zeros((50, 3), "float32"), np.zeros(50), batch_size=5)
    model.fit(loader, epochs=1, verbose=0, target_delta=1e-3)
    assert model.sampling_plan.loader is loader
    assert model.privacy_ledger.sampling_probability == 0.1
    assert model.privacy_ledger.steps == model.dp_steps == 10


def test_a_model_accounts_replace_one_through_its_ledger():
    # The neighbouring relation is the accountant's: a model composes its updates in the
    # accountant its ledger holds, and the state saves and restores it.
    def trained():
        model = tdk.DPSequential(
            [keras.Input((3,)), keras.layers.Dense(1)],
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            seed=0,
        )
        model.compile(optimizer="sgd", loss="mse")
        model.privacy_ledger.use_accountant(PRVAccountant(neighboring="replace_one"))
        loader = tdk.PrivateDataLoader(np.zeros((50, 3), "float32"), np.zeros(50), batch_size=5)
        model.fit(loader, epochs=1, verbose=0, target_delta=1e-3)
        return model

    model = trained()
    reference = PRVAccountant(neighboring="replace_one")
    reference.compose(1.0, 0.1, 10)
    assert model.get_epsilon(1e-3) == reference.get_epsilon(1e-3)
    add_remove = PRVAccountant()
    add_remove.compose(1.0, 0.1, 10)
    assert model.get_epsilon(1e-3) > add_remove.get_epsilon(1e-3)
    state = model.accountant.state_dict()
    fresh = PRVAccountant(neighboring="replace_one")
    fresh.load_state_dict(state)
    assert fresh.get_epsilon(1e-3) == reference.get_epsilon(1e-3)
    with pytest.raises(DPConfigError, match="neighboring"):
        PRVAccountant().load_state_dict(state)  # an add/remove accountant refuses it


# -- engines --------------------------------------------------------------------------------------
def _compiled(layers):
    model = keras.Sequential([keras.Input((3,)), *layers])
    model.compile(loss="mse")
    return model


def test_make_engine_chooses_and_says_why():
    settings = DPSettings.create(l2_norm_clip=1.0, noise_multiplier=1.0)
    selection = make_engine(_compiled([keras.layers.Dense(2)]), settings)
    assert isinstance(selection.engine, FastEngine) and selection.vmap_reason is None
    assert isinstance(selection.engine, ClippingEngine) and isinstance(selection, ClippingEngine)
    shared = keras.layers.LayerNormalization()  # its rule takes one call per step
    model = _compiled([keras.layers.Dense(3), shared, shared])
    x, y = np.ones((4, 3), "float32"), np.ones((4, 3), "float32")
    step = {"num_units": 4, "l2_norm_clip": 1.0, "rng_seed": 0}
    notices = []
    selection = make_engine(model, settings, log_once=lambda k, m: notices.append(k))
    assert isinstance(selection.engine, VmapEngine) and "called 2 times" in selection.vmap_reason
    assert notices == ["vmap-fallback"] and not selection.checked
    selection.clipped_batch(x, y, None, **step)
    assert selection.checked
    assert selection.plan().engine == "vmap" and selection.plan().reason == selection.vmap_reason
    with pytest.raises(FastPathUnsupported, match="called 2 times"):
        make_engine(model, dataclasses.replace(settings, clipping_mode="fast"))
    vmap = dataclasses.replace(settings, clipping_mode="vmap")
    assert isinstance(make_engine(_compiled([keras.layers.Dense(2)]), vmap).engine, VmapEngine)


def test_rule_forward_results_are_read_as_forward_or_refused():
    z, finish = object(), (lambda t: t)
    assert as_forward(None, (z, finish)) == Forward(z, finish, None)
    assert as_forward(None, (z, finish, 1)).saved == 1
    with pytest.raises(TypeError, match="Forward"):
        as_forward(None, (z,))


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_per_example_never_imports_the_checks_or_the_models():
    for path in (PACKAGE / "per_example").rglob("*.py"):
        bad = {
            name
            for name in _imports(path)
            if name.startswith(("torchdp_keras.model_checks", "torchdp_keras.models"))
        }
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)} (an import cycle)"


def test_accounting_imports_neither_keras_nor_torch():
    for path in (PACKAGE / "accounting").rglob("*.py"):
        bad = {name for name in _imports(path) if name.split(".")[0] in ("keras", "torch")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"
