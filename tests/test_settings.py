"""PRIME's knobs are declared once (`prime_trl.algo.settings.PRIMESettings`); the TRL config, the Lightning config
and the demo's settings must agree with that declaration on every shared field: default and help text."""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest
from trl import GRPOConfig

from prime_trl.algo.settings import PRIMESettings, prime_field
from prime_trl.demo.run import RLSettings
from prime_trl.trainer.prime_config import PRIMEConfig

lightning = pytest.importorskip("prime_trl.lightning.module")

# PRIMEConfig fields that exist only on the TRL side (vLLM and the Trainer's rescue checkpoint).
# prm_pretrain_batches: the warm-up re-runs TRL's generation (PRIMETrainer only; the Lightning module has no such hook yet).
TRL_ONLY = {
    "loss_type",
    "vllm_sync_mode",
    "save_checkpoint_on_error",
    "log_token_rewards",
    "prm_pretrain_batches",
}  # log_*: TRL tables
# Lightning fields mirrored from GRPOConfig whose default is deliberately different (see PRIMEModuleConfig).
LIGHTNING_DEFAULTS_DIFFER = {"gradient_checkpointing"}


def _declared(cls) -> dict:
    return {f.name: f for f in fields(cls)}


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


SETTINGS = _declared(PRIMESettings)


@pytest.mark.parametrize("config_cls", [PRIMEConfig, lightning.PRIMEModuleConfig], ids=["trl", "lightning"])
def test_configs_carry_every_prime_field_as_declared(config_cls):
    declared = _declared(config_cls)
    for name, setting in SETTINGS.items():
        assert name in declared, f"{config_cls.__name__} lacks PRIME field {name}"
        assert _default(declared[name]) == _default(setting), name
        assert declared[name].metadata.get("help") == setting.metadata["help"], name


def test_prime_fields_of_the_trl_config_are_declared_once():
    """A PRIME knob added to PRIMEConfig alone would be missing from Lightning and the demo: declare it in
    PRIMESettings (prime_trl/algo/settings.py) instead."""
    grpo = _declared(GRPOConfig)
    own = {name for name in _declared(PRIMEConfig) if name not in grpo}
    assert own - TRL_ONLY <= SETTINGS.keys(), sorted(own - TRL_ONLY - SETTINGS.keys())


def test_lightning_mirrors_trl_defaults():
    trl = _declared(PRIMEConfig)
    module = _declared(lightning.PRIMEModuleConfig)
    shared = trl.keys() & module.keys()
    assert len(shared) == len(module), sorted(module.keys() - trl.keys())  # every Lightning field is a TRL field
    differ = {name for name in shared if _default(trl[name]) != _default(module[name])}
    assert differ == LIGHTNING_DEFAULTS_DIFFER
    for name in shared:
        assert trl[name].metadata.get("help") == module[name].metadata.get("help"), name


def test_demo_settings_agree_or_say_why():
    demo = _declared(RLSettings)
    shared = demo.keys() & SETTINGS.keys()
    assert {"prime_beta", "prm_update", "learning_rate", "prm_learning_rate"} <= shared
    for name in shared:
        assert demo[name].metadata["help"] == SETTINGS[name].metadata["help"], name
        if demo[name].default != SETTINGS[name].default:
            assert demo[name].metadata.get("default_differs_because"), f"RLSettings.{name}: a new default needs a why"


def test_prime_field_rejects_an_unexplained_default():
    with pytest.raises(ValueError, match="prm_learning_rate"):
        prime_field("prm_learning_rate", 1.0)
    assert prime_field("prm_learning_rate", 1e-5).default == 1e-5  # the declared default needs no reason


def test_help_texts_survive_argparse():
    """argparse %-formats help texts (``prime-trl train --help``): a bare '%' breaks the whole help."""
    for name, setting in SETTINGS.items():
        assert "%" not in setting.metadata["help"].replace("%%", ""), name
