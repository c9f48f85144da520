"""DeepSpeed ZeRO-2 and ZeRO-3 through the Trainer's own ``deepspeed=`` config: real 2-process runs (gloo, CPU).

DeepSpeed is not a dependency of hf_vcreg: these tests run where it is installed (``pip install deepspeed``; its
CPU accelerator needs no GPU and no compiled ops). accelerate picks no process-group backend for DeepSpeed on a
CPU machine; the worker supplies gloo (``tests/_cpu_engines.py``), after which the engine is DeepSpeed's own:
ZeRO-3 partitions every parameter and drives it with its module hooks, into which VCReg's block hooks and
identity-forward autograd function must fit (see ``docs/scale.md``).

Pinned: weights and logs equal one process on the concatenated batch (global statistics; both implementations,
ViT and CNN, gradient accumulation); ``loss == task_loss + vcreg/penalty`` on every line; the final model gathered
by ZeRO-3 loads with ``from_pretrained`` bit-identical to the trained weights; resume (slow suite) equals the
uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch

from test_distributed import (
    CNN_LAYERS,
    TOL,
    WORLD,
    _global_batches,
    _max_diff,
    _ok,
    _scenario,
    assert_loss_is_task_loss_plus_penalty,
    assert_same_log_lines,
    launch,
    reference_updates,
    single_process_run,
    worker,
)

pytest.importorskip("deepspeed", reason="DeepSpeed is optional: pip install deepspeed")


def zero(stage: int, **overrides) -> dict:
    """``VCRegConfig`` fields of a ZeRO run; ``"auto"`` values come from the Trainer's arguments."""
    config = {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": stage == 3},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the tests' plain SGD
    }
    # use_cpu=True would turn DeepSpeed off in accelerate: the CPU comes from DeepSpeed's accelerator instead.
    return dict(use_cpu=False, deepspeed=config, **overrides)


SCENARIOS = [
    _scenario("zero2_vit_gradient_global", "vit", overrides=zero(2)),
    _scenario("zero3_vit_gradient_global", "vit", overrides=zero(3), save_final=True),
    _scenario("zero3_cnn_loss_global", "cnn", "loss", overrides=zero(3)),
    _scenario("zero3_vit_gradient_global_ga2", "vit", n_train=16, ga=2, overrides=zero(3)),
]


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory):
    return launch(SCENARIOS, tmp_path_factory.mktemp("deepspeed"), timeout=600)


def _zero_ok(results, stage: int) -> None:
    _ok(results)
    assert [r["engine"] for r in results] == ["DEEPSPEED"] * WORLD
    if stage == 3:  # every rank held a partition of the parameters, not whole copies
        assert all(r["sharded_params"] > 0 for r in results)


@pytest.mark.parametrize(
    "name,ga",
    [("zero2_vit_gradient_global", 1), ("zero3_vit_gradient_global", 1), ("zero3_cnn_loss_global", 1),
     ("zero3_vit_gradient_global_ga2", 2)],
)
def test_zero_update_and_logs_equal_single_process_on_concatenated_batch(zero_results, name, ga, tmp_path):
    results = zero_results[name]
    _zero_ok(results, int(name[4]))
    kind, impl = name.split("_")[1:3]
    layers = CNN_LAYERS if kind == "cnn" else "blocks"
    batches = _global_batches(results)
    assert len(batches) == 2 * ga and all(len(step) == WORLD for step in batches)
    assert not torch.equal(batches[0][0][0], batches[0][1][0])  # the ranks got different data
    weights, single = single_process_run(kind, impl, batches, layers, tmp_path, ga=ga)
    reference, _ = reference_updates(kind, batches, global_stats=True, layers=layers, ga=ga)
    for r in results:
        assert _max_diff(r["state_dict"], weights) < TOL, _max_diff(r["state_dict"], weights)
        assert_same_log_lines(r["log_history"], single.state.log_history)
        assert assert_loss_is_task_loss_plus_penalty(r["log_history"]) == 2
    assert _max_diff(results[0]["state_dict"], reference) < TOL
    assert _max_diff(results[0]["state_dict"], worker.build_model(kind).state_dict()) > 1e-2  # it trained


def test_zero3_final_model_loads_with_from_pretrained_bit_identical_to_gathered_weights(zero_results):
    from transformers import ViTForImageClassification

    results = zero_results["zero3_vit_gradient_global"]
    _zero_ok(results, 3)
    loaded = ViTForImageClassification.from_pretrained(results[0]["saved_to"]).state_dict()
    gathered = results[0]["state_dict"]
    assert loaded.keys() == gathered.keys()
    assert all(torch.equal(loaded[k], gathered[k]) for k in gathered)


@pytest.mark.slow
def test_zero3_resume_matches_uninterrupted_run(tmp_path):
    """6 steps with AdamW and a checkpoint every 3; a run stopped after checkpoint-3 resumed in a new launch from
    another initialisation ends with the uninterrupted run's weights and logs."""
    overrides = zero(3, save_strategy="steps", save_steps=3, train_sampling_strategy="random", optim="adamw_torch",
                     learning_rate=0.01)
    first = launch([_scenario("full", "vit", steps=6, overrides=overrides),
                    _scenario("cut", "vit", steps=6, stop_at=3, overrides=overrides)], tmp_path / "first", timeout=600)
    _zero_ok(first["full"], 3)
    _zero_ok(first["cut"], 3)
    resume = _scenario("resumed", "vit", steps=6, overrides=overrides, model_seed=worker.MODEL_SEED + 1,
                       output_dir=first["cut"][0]["output_dir"], resume=True)
    resumed = launch([resume], tmp_path / "second", timeout=600)["resumed"]
    _zero_ok(resumed, 3)
    for f, r in zip(first["full"], resumed):
        assert r["seen"][0]["step"] == 3 and f["global_step"] == r["global_step"] == 6
        assert _max_diff(f["state_dict"], r["state_dict"]) <= TOL, _max_diff(f["state_dict"], r["state_dict"])
        lines = {h["step"]: h for h in f["log_history"] if "loss" in h}
        for h in (h for h in r["log_history"] if "loss" in h and h["step"] > 3):
            for k in ("loss", "task_loss", "vcreg/penalty"):
                assert h[k] == pytest.approx(lines[h["step"]][k], rel=1e-5, abs=1e-8), (h["step"], k)
