"""FSDP2 through the Trainer's own ``fsdp=True`` / ``fsdp_config={"version": 2, ...}``: real 2-process runs (gloo).

accelerate runs FSDP only on accelerators and silently trains with DDP on a CPU machine; the worker enables its
FSDP path on CPU (``tests/_cpu_engines.py``), after which everything is the real code: ``fully_shard`` units (one per
block: ``transformer_layer_cls_to_wrap``), DTensor parameters, FSDP's reduce-scatter of the gradients, the FSDP
checkpoint files. Each test checks that the run was FSDP (``engine``) and that the parameters were sharded.

What is pinned (one launch for the training scenarios, two for resume):

* weights equal one process on the concatenated batch (global statistics), for both implementations, ViT and CNN,
  with gradient accumulation and with non-reentrant activation checkpointing (FSDP's own, whose checkpoint encloses
  the hooked blocks, and transformers' ``gradient_checkpointing``); local statistics equal the DDP run;
* the logs equal the single-process logs line by line and ``loss == task_loss + vcreg/penalty`` on every line;
  evaluation equals the single-process evaluation;
* resume from a full and from a sharded (DCP) state dict equals the uninterrupted run, and a checkpoint that does
  not match the model (missing keys, unexpected keys) is refused with the library's error on every rank;
* the final ``save_model()`` loads with plain ``from_pretrained`` / ``timm.create_model`` and equals the gathered
  weights bit for bit.
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

WRAP = {"vit": "ViTLayer", "cnn": "Sequential", "timm_vit": "Block"}  # the FSDP unit of each model: its blocks


def fsdp(kind: str, **config) -> dict:
    """``VCRegConfig`` fields of an FSDP2 run wrapping every block of ``kind`` (plus ``fsdp_config`` entries)."""
    return dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [WRAP[kind]], **config})


def _fsdp_scenario(name, kind, impl="gradient", fsdp_config=None, overrides=None, **extra):
    return _scenario(name, kind, impl, overrides={**fsdp(kind, **(fsdp_config or {})), **(overrides or {})}, **extra)


NON_REENTRANT = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
SCENARIOS = [
    *[_fsdp_scenario(f"{m}_{i}_global", m, i, save_final=m == "vit") for m in ("vit", "cnn") for i in ("gradient", "loss")],
    _fsdp_scenario("vit_gradient_local", "vit", dist=False),
    _fsdp_scenario("cnn_loss_local", "cnn", "loss", dist=False),
    _scenario("ddp_vit_gradient_local", "vit", dist=False),  # the same runs without FSDP
    _scenario("ddp_cnn_loss_local", "cnn", "loss", dist=False),
    _fsdp_scenario("vit_gradient_global_ga2", "vit", n_train=16, ga=2),
    # FSDP's activation checkpointing wraps each block in a checkpoint that encloses its VCReg hook.
    _fsdp_scenario("vit_gradient_global_fsdp_ac", "vit", fsdp_config={"activation_checkpointing": True}),
    _fsdp_scenario("cnn_loss_global_fsdp_ac", "cnn", "loss", fsdp_config={"activation_checkpointing": True}),
    _fsdp_scenario("vit_loss_global_hf_ac", "vit", "loss", overrides=NON_REENTRANT),
    _fsdp_scenario("timm_vit_gradient_global", "timm_vit", save_final=True),
    # accelerate prepares an FSDP2 model only with its optimizer: evaluate() before train() raises there.
    _fsdp_scenario("train_eval", "vit", n_eval=8),
]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return launch(SCENARIOS, tmp_path_factory.mktemp("fsdp"), timeout=600)


def _layers(kind: str) -> str:
    return CNN_LAYERS if kind == "cnn" else "blocks"


def _fsdp_ok(results) -> None:
    """No error, FSDP ran, and every rank held shards of the parameters (not whole copies)."""
    _ok(results)
    assert [r["engine"] for r in results] == ["FSDP"] * WORLD
    assert all(r["sharded_params"] > 0 for r in results)


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize(
    "name,ga",
    [("vit_gradient_global", 1), ("vit_loss_global", 1), ("cnn_gradient_global", 1), ("cnn_loss_global", 1),
     ("vit_gradient_global_ga2", 2), ("vit_gradient_global_fsdp_ac", 1), ("cnn_loss_global_fsdp_ac", 1),
     ("vit_loss_global_hf_ac", 1)],
)
def test_fsdp_update_and_logs_equal_single_process_on_concatenated_batch(fsdp_results, name, ga, tmp_path):
    results = fsdp_results[name]
    _fsdp_ok(results)
    kind, impl = name.split("_")[:2]
    batches = _global_batches(results)
    assert len(batches) == 2 * ga and all(len(step) == WORLD for step in batches)
    rank0, rank1 = (r["state_dict"] for r in results)
    assert _max_diff(rank0, rank1) == 0.0  # the gathered weights are the same on both ranks
    weights, single = single_process_run(kind, impl, batches, _layers(kind), tmp_path, ga=ga)
    reference, _ = reference_updates(kind, batches, global_stats=True, layers=_layers(kind), ga=ga)
    assert _max_diff(rank0, weights) < TOL, _max_diff(rank0, weights)
    assert _max_diff(rank0, reference) < TOL, _max_diff(rank0, reference)
    assert _max_diff(rank0, worker.build_model(kind).state_dict()) > 1e-2  # it trained
    for r in results:
        assert_same_log_lines(r["log_history"], single.state.log_history)
        assert assert_loss_is_task_loss_plus_penalty(r["log_history"]) == 2


@pytest.mark.parametrize("name", ["vit_gradient_local", "cnn_loss_local"])
def test_fsdp_local_stats_equal_ddp_run(fsdp_results, name):
    sharded, ddp = fsdp_results[name], fsdp_results[f"ddp_{name}"]
    _fsdp_ok(sharded)
    assert [r["engine"] for r in ddp] == ["MULTI_CPU"] * WORLD
    kind = name.split("_")[0]
    local, _ = reference_updates(kind, _global_batches(sharded), global_stats=False, layers=_layers(kind))
    glob, _ = reference_updates(kind, _global_batches(sharded), global_stats=True, layers=_layers(kind))
    assert _max_diff(sharded[0]["state_dict"], ddp[0]["state_dict"]) < TOL
    assert _max_diff(sharded[0]["state_dict"], local) < TOL
    assert _max_diff(sharded[0]["state_dict"], glob) > 100 * TOL  # local, not global statistics
    for f, d in zip(sharded, ddp):
        assert_same_log_lines(f["log_history"], d["log_history"])


def test_fsdp_evaluation_equals_single_process_evaluation(fsdp_results, tmp_path):
    """2 training steps, then ``evaluate()`` on 8 samples (2 full rounds): the metrics of 1 process doing the same."""
    results = fsdp_results["train_eval"]
    _fsdp_ok(results)
    _, single = single_process_run("vit", "gradient", _global_batches(results), "blocks", tmp_path,
                                   eval_batches=_global_batches(results, training=False))
    expected = single.state.log_history[-1]
    keys = [k for k in expected if k.startswith("eval_") and ("loss" in k or "vcreg" in k)]
    assert {"eval_loss", "eval_task_loss", "eval_vcreg/penalty"} <= set(keys)
    for r in results:
        assert assert_loss_is_task_loss_plus_penalty([r["eval_metrics"]], prefix="eval_") == 1
        for k in keys:
            assert r["eval_metrics"][k] == pytest.approx(expected[k], rel=1e-4, abs=1e-8), k


# ---------------------------------------------------------------------------------------------- the saved model
def test_fsdp_final_model_loads_with_from_pretrained_bit_identical_to_gathered_weights(fsdp_results):
    from transformers import ViTForImageClassification

    results = fsdp_results["vit_gradient_global"]
    _fsdp_ok(results)
    loaded = ViTForImageClassification.from_pretrained(results[0]["saved_to"]).state_dict()
    gathered = results[0]["state_dict"]
    assert loaded.keys() == gathered.keys()
    assert all(torch.equal(loaded[k], gathered[k]) for k in gathered)


def test_fsdp_final_timm_model_loads_with_timm_bit_identical_to_gathered_weights(fsdp_results, tmp_path):
    import timm

    results = fsdp_results["timm_vit_gradient_global"]
    _fsdp_ok(results)
    gathered = results[0]["state_dict"]
    assert _max_diff(gathered, worker.build_model("timm_vit").state_dict()) > 1e-2  # it trained
    loaded = timm.create_model(f"local-dir:{results[0]['saved_to']}", pretrained=True).state_dict()
    assert loaded.keys() == gathered.keys()
    assert all(torch.equal(loaded[k], gathered[k]) for k in gathered)


# ---------------------------------------------------------------------------------------------- resume
RESUME_STOP = 3
ADAMW = dict(optim="adamw_torch", learning_rate=0.01)  # optimizer state to shard, save and load (see docs/scale.md)


def _resume_scenario(name, state_dict_type, **extra):
    """6 steps of the ViT, global statistics, AdamW, random sampling, a checkpoint every 3 steps."""
    overrides = dict(save_strategy="steps", save_steps=RESUME_STOP, train_sampling_strategy="random", **ADAMW)
    return _fsdp_scenario(name, "vit", fsdp_config={"state_dict_type": state_dict_type}, overrides=overrides,
                          n_train=8, steps=extra.pop("steps", 6), **extra)


@pytest.mark.slow  # 2 launches, about 60-80 s each variant
@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_fsdp_resume_matches_uninterrupted_run_and_mismatched_checkpoints_are_refused(tmp_path, state_dict_type):
    """Launch 1: the uninterrupted run, one stopped after checkpoint-3, and a 3-block model's checkpoint. Launch 2:
    resume from checkpoint-3 with another initialisation; a 3-block model from it (missing keys); a 2-block model
    from the 3-block checkpoint (unexpected keys)."""
    first = launch([_resume_scenario("full", state_dict_type),
                    _resume_scenario("cut", state_dict_type, stop_at=RESUME_STOP),
                    _resume_scenario("deeper", state_dict_type, depth=3, steps=RESUME_STOP)],
                   tmp_path / "first", timeout=400)
    for results in first.values():
        _fsdp_ok(results)
    files = set(__import__("os").listdir(f"{first['cut'][0]['output_dir']}/checkpoint-{RESUME_STOP}"))
    assert ("pytorch_model_fsdp.bin" in files) == (state_dict_type == "FULL_STATE_DICT")
    assert ("pytorch_model_fsdp_0" in files) == (state_dict_type == "SHARDED_STATE_DICT")
    cut = f"{first['cut'][0]['output_dir']}/checkpoint-{RESUME_STOP}"
    deeper = f"{first['deeper'][0]['output_dir']}/checkpoint-{RESUME_STOP}"
    second = launch(
        [_resume_scenario("resumed", state_dict_type, model_seed=worker.MODEL_SEED + 1, output_dir=first["cut"][0]["output_dir"],
                          resume=cut),
         _resume_scenario("missing", state_dict_type, depth=3, resume=cut),
         _resume_scenario("unexpected", state_dict_type, resume=deeper)],
        tmp_path / "second", timeout=400,
    )
    full, resumed = first["full"], second["resumed"]
    _fsdp_ok(resumed)
    for f, r in zip(full, resumed):
        assert f["global_step"] == r["global_step"] == 6
        assert r["seen"][0]["step"] == RESUME_STOP  # it resumed: its first forward ran at step 3
        after = [s for s in f["seen"] if s["step"] >= RESUME_STOP]
        assert len(after) == len(r["seen"]) == 3
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(after, r["seen"]))
        assert _max_diff(f["state_dict"], r["state_dict"]) <= TOL, _max_diff(f["state_dict"], r["state_dict"])
        lines = {h["step"]: h for h in f["log_history"] if "loss" in h}
        for h in (h for h in r["log_history"] if "loss" in h and h["step"] > RESUME_STOP):
            for k in ("loss", "task_loss", "vcreg/penalty", "vcreg/covariance"):
                assert h[k] == pytest.approx(lines[h["step"]][k], rel=1e-5, abs=1e-8), (h["step"], k)
    # A resume that loaded nothing would have started from other weights.
    assert _max_diff(worker.build_model("vit").state_dict(),
                     worker.build_model("vit", seed=worker.MODEL_SEED + 1).state_dict()) > 1e-2
    for name, block in (("missing", "missing keys ['vit.layers.2."), ("unexpected", "unexpected keys ['vit.layers.2.")):
        for r in second[name]:
            assert r["error"] is not None and r["error"].startswith("RuntimeError"), (name, r["error"])
            assert "does not match the model" in r["error"] and block in r["error"], r["error"]
            assert r["seen"] == []  # refused before any forward pass
