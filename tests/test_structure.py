"""The package's shape: the public API, and one place that names every private ``Trainer`` method overridden."""

from __future__ import annotations

import inspect

from transformers import Trainer

import hf_vcreg
import hf_vcreg.trainer as trainer_module
from hf_vcreg import VCRegTrainer

# where each public name comes from: the config, the trainer, the Hub error, the penalty and metric functions
PUBLIC_MODULES = {
    "hf_vcreg.config": {"VCRegConfig"},
    "hf_vcreg.trainer": {"VCRegTrainer"},
    "hf_vcreg.publishing": {"HubPushError"},
    "hf_vcreg.penalty": {"variance_loss", "covariance_loss", "covariance_matrix", "vcreg_loss"},
    "hf_vcreg.metrics.representation": {"effective_rank", "neural_collapse"},
}


def test_top_level_exports_only_the_user_facing_names():
    by_module: dict[str, set[str]] = {}
    for name in hf_vcreg.__all__:
        by_module.setdefault(getattr(hf_vcreg, name).__module__, set()).add(name)
    assert by_module == PUBLIC_MODULES
    for internal in ("BlockCapture", "find_blocks", "feature_axis", "VCRegSpec", "VCRegFunction"):
        assert internal not in hf_vcreg.__all__ and not hasattr(hf_vcreg, internal)


def overridden_private_methods() -> dict[str, list[str]]:
    """``{method: [classes of hf_vcreg that define it]}`` for every private ``Trainer`` method they override."""
    found: dict[str, list[str]] = {}
    for cls in VCRegTrainer.__mro__:
        if not cls.__module__.startswith("hf_vcreg"):
            continue
        for name, value in vars(cls).items():
            private = name.startswith("_") and not name.startswith("__")
            if private and callable(value) and callable(getattr(Trainer, name, None)):
                found.setdefault(name, []).append(cls.__name__)
    return found


def test_every_private_trainer_override_is_named_in_the_trainer_module_docstring():
    overrides = overridden_private_methods()
    # the mixins and the trainer itself; a new override must be added to the list (what to check on an upgrade)
    assert {"_save_checkpoint", "_load_from_checkpoint", "_save", "_hp_search_setup",
            "_set_signature_columns_if_needed"} <= set(overrides)
    doc = trainer_module.__doc__
    missing = sorted(name for name in overrides if f"``{name}``" not in doc)
    assert not missing, f"private Trainer methods overridden but not listed in hf_vcreg/trainer.py's docstring: {missing}"
    for name, classes in overrides.items():  # each defining mixin is named beside its methods
        for cls in classes:
            if cls != "VCRegTrainer":
                assert cls in doc, (name, cls)


def test_trainer_mixins_live_in_their_own_modules():
    modules = {cls.__name__: cls.__module__ for cls in VCRegTrainer.__mro__ if cls.__module__.startswith("hf_vcreg")}
    assert modules == {
        "VCRegTrainer": "hf_vcreg.trainer",
        "AtomicCheckpointMixin": "hf_vcreg.checkpointing",
        "HubPublishingMixin": "hf_vcreg.publishing",
        "EqualBatchCountsMixin": "hf_vcreg.distributed",
        "TaskLossMixin": "hf_vcreg.task_loss",
    }
    # the trainer module defines the method only: no loss or checkpoint helpers of its own
    functions = [n for n, v in vars(trainer_module).items() if inspect.isfunction(v) and v.__module__ == trainer_module.__name__]
    assert functions == []
