"""Tuning tools: ``VCRegTrainer(model_init=...)`` and ``hyperparameter_search`` over the ``vcreg_*`` fields."""

from __future__ import annotations

import math

import datasets
import optuna
import pytest
import torch
from transformers import TrainerCallback

from _tiny_models import build
from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.capture import select_layers
from hf_vcreg.config import RECOMMENDED


def make_dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g).numpy(),
            "labels": torch.randint(0, 3, (n,), generator=g).numpy()}
    return datasets.Dataset.from_dict(data).with_format("torch")


def config(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, learning_rate=0.05,
                  optim="sgd", report_to=[], logging_steps=1, save_strategy="no", eval_strategy="no", use_cpu=True,
                  disable_tqdm=True, seed=0)
    return VCRegConfig(**{**values, **kw})


def test_model_init_models_are_hooked_and_regularised(tmp_path):
    built = []

    def model_init():
        built.append(build("hf_resnet"))
        return built[-1]

    trainer = VCRegTrainer(model_init=model_init, args=config(tmp_path), train_dataset=make_dataset())
    assert len(built) == 1 and trainer.vcreg_family == "cnn"
    # the CNN family's recommended placement, resolved for the model model_init built
    assert trainer.vcreg_layer_names == select_layers(built[-1], RECOMMENDED["cnn"]["vcreg_layers"])
    assert trainer.vcreg_layer_names == ["resnet.encoder.stages.1.layers.0"]  # "last": the final block
    before = [p.detach().clone() for p in built[0].parameters()]
    trainer.train()  # the Trainer builds a second model; hooks on the first would record nothing and raise
    assert len(built) == 2 and trainer.model is built[1]
    assert all(torch.equal(a, b) for a, b in zip(before, built[0].parameters()))  # the first one never trained
    log = trainer.state.log_history[0]
    alpha, beta = RECOMMENDED["cnn"]["vcreg_alpha"], RECOMMENDED["cnn"]["vcreg_beta"]
    assert log["vcreg/penalty"] > 0
    assert log["vcreg/penalty"] == pytest.approx(alpha * log["vcreg/variance"] + beta * log["vcreg/covariance"], rel=1e-5)
    assert all(not m._forward_hooks for m in built[1].modules())


def test_values_set_on_args_before_train_are_validated_and_used(tmp_path):
    trainer = VCRegTrainer(model_init=lambda: build("hf_vit"), args=config(tmp_path), train_dataset=make_dataset())
    assert trainer.vcreg_family == "transformer" and trainer.vcreg_recommended == ["vcreg_alpha", "vcreg_beta", "vcreg_layers"]
    trainer.args.vcreg_alpha = -1.0  # what a trial's setattr could do
    with pytest.raises(ValueError, match=r"^vcreg_alpha=-1.0 is invalid: use a finite number >= 0"):
        trainer.train()
    trainer.args.vcreg_alpha, trainer.args.vcreg_beta = 0.0, 2.0
    trainer.train()
    assert trainer.vcreg_recommended == ["vcreg_layers"] and trainer._vcreg_spec.beta == 2.0
    log = trainer.state.log_history[0]
    assert log["vcreg/penalty"] == pytest.approx(2.0 * log["vcreg/covariance"], rel=1e-5)


class RecordTrials(TrainerCallback):
    """Per trial: the trial's parameters, the coefficients in the trainer's penalty spec, the first log line."""

    def __init__(self):
        self.trainer = None
        self.trials = []

    def on_train_end(self, args, state, control, **kwargs):
        spec = self.trainer._vcreg_spec
        self.trials.append({"params": dict(state.trial_params), "spec": (spec.alpha, spec.beta),
                            "args": (args.vcreg_alpha, args.vcreg_beta), "log": dict(state.log_history[0])})


def test_hyperparameter_search_over_the_vcreg_coefficients(tmp_path):
    record = RecordTrials()
    trainer = VCRegTrainer(model_init=lambda trial: build("hf_resnet"), args=config(tmp_path),
                           train_dataset=make_dataset(), eval_dataset=make_dataset(8, seed=1), callbacks=[record])
    record.trainer = trainer

    def hp_space(trial):
        return {"vcreg_alpha": trial.suggest_float("vcreg_alpha", 1e-3, 10.0, log=True),
                "vcreg_beta": trial.suggest_float("vcreg_beta", 1e-3, 10.0, log=True)}

    storage = optuna.storages.InMemoryStorage()
    best = trainer.hyperparameter_search(
        direction="minimize", backend="optuna", hp_space=hp_space, n_trials=2,
        compute_objective=lambda metrics: metrics["eval_loss"],
        sampler=optuna.samplers.RandomSampler(seed=0), storage=storage, study_name="vcreg",
    )
    trials = optuna.load_study(study_name="vcreg", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert len(record.trials) == 2
    for trial, seen in zip(trials, record.trials):
        params = (trial.params["vcreg_alpha"], trial.params["vcreg_beta"])
        assert seen["params"] == trial.params and seen["spec"] == params == seen["args"]
        log = seen["log"]  # the penalty of the trial's first step is built from the trial's coefficients
        assert log["vcreg/penalty"] == pytest.approx(params[0] * log["vcreg/variance"] + params[1] * log["vcreg/covariance"],
                                                     rel=1e-5)
        assert math.isfinite(trial.value)
    assert record.trials[0]["spec"][0] != record.trials[1]["spec"][0]
    assert record.trials[0]["spec"][1] != record.trials[1]["spec"][1]
    assert trials[0].value != trials[1].value
    assert best.objective == min(t.value for t in trials)
    assert best.hyperparameters == min(trials, key=lambda t: t.value).params
