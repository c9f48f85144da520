"""Distributed VCReg: real 2-process runs (``torch.distributed.run``, gloo, CPU) through ``VCRegTrainer``.

Every multi-process run is a subprocess bounded by a timeout (its whole process group is killed when it
expires), so a deadlock fails the test instead of hanging the suite. One launch
(:func:`ddp_results`) trains all the correctness scenarios of ``tests/_ddp_worker.py``; each rank records
the batches it received, so the single-process references below rebuild the exact global batch of every step.

What is pinned:

* global statistics (``vcreg_distributed_stats=True``): after DDP's gradient averaging the update equals a
  single process's on the concatenated batch, for both implementations (``gradient``: the injected gradient
  times the world size; ``loss``: ``torch.distributed.nn`` all-reduce whose backward sums), ViT and a CNN;
* local statistics: the update is the mean over ranks of the per-rank updates;
* uneven last batches (accelerate's padding, ``dataloader_drop_last``, ``even_batches=False`` with a rank
  holding a single row in a layer): the all-reduced count is the sum of the rows of all ranks and the
  update matches the reference; unequal numbers of batches raise a clear error on every rank, never hang;
* evaluation under DDP: ``evaluate()`` returns ``eval_vcreg/*`` computed on the global batch;
* resume under DDP: global statistics with a row cap, interrupted after a checkpoint and resumed in a new
  launch from a different initialisation, end with the weights and logs of the uninterrupted 2-process run;
* without a process group, ``vcreg_distributed_stats=True`` is a ``ValueError`` at construction;
* load: memory (RSS), forward hooks and captured records stay flat over a long 2-process run with checkpoints
  (``HF_VCREG_LOAD_SECONDS`` sets the duration of the slow variant, default 600 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _kill_train import VCREG_KEYS, step_logs
from test_resume import assert_same_logs

from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.capture import feature_axis, samples_view, select_layers
from hf_vcreg.penalty import covariance_loss, variance_loss

WORKER = Path(__file__).with_name("_ddp_worker.py")
_spec = importlib.util.spec_from_file_location("_ddp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

WORLD = 2
BATCH = 2  # per rank
CNN_LAYERS = r"blocks\.\d+,embed"  # the conv blocks (B*H*W rows) and the pooled embedding (B rows)
TOL = 1e-6  # float32, two SGD steps at lr 0.5: measured differences are <= 1e-7


# ---------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(cmd: list[str], log: Path, timeout: float) -> None:
    """Run a multi-process launcher (``torch.distributed.run``, ``accelerate launch``) with its output in ``log``.

    Fails the test (never hangs) when it exceeds ``timeout`` seconds or exits non-zero.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts every worker in a session of its own: kill them by id, then the launcher's group.
            import psutil

            workers = psutil.Process(proc.pid).children(recursive=True)
            for p in workers:
                p.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            psutil.wait_procs(workers, timeout=30)
            pytest.fail(f"2-process run exceeded {timeout:.0f} s (deadlock?); log tail:\n{log.read_text()[-4000:]}")
    if rc != 0:
        pytest.fail(f"2-process run exited with {rc}; log tail:\n{log.read_text()[-4000:]}")


def launch(scenarios: list[dict], out_dir: Path, timeout: float) -> dict[str, list[dict]]:
    """Run the scenarios on 2 processes; return ``{name: [rank0 result, rank1 result]}`` (see :func:`run_launcher`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scenarios.json").write_text(json.dumps(scenarios))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(WORKER),
        str(out_dir / "scenarios.json"),
        str(out_dir),
    ]
    run_launcher(cmd, out_dir / "launch.log", timeout)
    return {
        s["name"]: [torch.load(out_dir / f"{s['name']}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
        for s in scenarios
    }


def _scenario(name, model, impl="gradient", dist=True, n_train=8, steps=2, batch=BATCH, **extra):
    layers = CNN_LAYERS if model == "cnn" else "blocks"
    return dict(name=name, model=model, impl=impl, dist=dist, n_train=n_train, batch=batch, steps=steps,
                layers=layers, **extra)


SCENARIOS = [
    *[_scenario(f"{m}_{i}_global", m, i) for m in ("vit", "cnn") for i in ("gradient", "loss")],
    # Gradient accumulation: 2 micro-batches per step, each with its own global statistics.
    _scenario("vit_gradient_global_ga2", "vit", n_train=16, ga=2),
    _scenario("cnn_loss_global_ga2", "cnn", "loss", n_train=16, ga=2),
    _scenario("vit_gradient_local", "vit", "gradient", dist=False),
    _scenario("cnn_loss_local", "cnn", "loss", dist=False),
    # 7 samples, 2 per rank: the last round has 3 samples.
    _scenario("uneven_padded", "cnn", n_train=7, steps=None),  # accelerate completes rank 1's batch from the start
    _scenario("uneven_drop_last", "cnn", n_train=7, steps=None, drop_last=True),  # the incomplete round is dropped
    _scenario("uneven_unequal_gradient", "cnn", n_train=7, steps=None, even_batches=False),  # rank 1: one row
    _scenario("uneven_unequal_loss", "cnn", "loss", n_train=7, steps=None, even_batches=False),
    _scenario("uneven_unequal_local", "cnn", dist=False, n_train=7, steps=None, even_batches=False),
    _scenario("unequal_counts_drop_last", "cnn", n_train=5, steps=None, even_batches=False, drop_last=True),
    # 5 samples, even_batches=False: rank 0 gets 2 batches, rank 1 one. Must be an error, not a deadlock.
    _scenario("unequal_batch_counts", "cnn", n_train=5, steps=None, even_batches=False),
    _scenario("eval_global", "vit", n_eval=7, train=False),
    _scenario("eval_even", "vit", n_eval=8, train=False),  # 2 full rounds: the single-process evaluation's batches
    _scenario("eval_unequal_batch_counts", "vit", n_eval=5, train=False, even_batches=False),
]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return launch(SCENARIOS, tmp_path_factory.mktemp("ddp"), timeout=300)


# ---------------------------------------------------------------------------------------------- references
def _global_batches(results: list[dict], training: bool = True) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, the batch of every rank (in rank order), as the ranks recorded them."""
    per_rank = [[s for s in r["seen"] if s["training"] == training] for r in results]
    assert len({len(p) for p in per_rank}) == 1, f"ranks ran different numbers of steps: {[len(p) for p in per_rank]}"
    return [[(s["pixel_values"], s["labels"]) for s in step] for step in zip(*per_rank)]


def _first_tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _sample_matrix(module, output) -> torch.Tensor:
    """A block output as its ``(n, d)`` sample matrix (every token / position a row)."""
    x = _first_tensor(output)
    axis = feature_axis(module, x)
    return samples_view(x, axis).reshape(-1, x.shape[axis])


def _layer_penalty(z, alpha, beta):
    return alpha * variance_loss(z) + beta * covariance_loss(z)


def reference_updates(model_kind, steps, *, global_stats, layers, alpha=1.0, beta=4.0, lr=0.5, ga=1):
    """Plain autograd + SGD, independent of the trainer and of torch.distributed.

    Per micro-batch: ``mean_r task_loss(batch_r) + mean_l P_l`` with ``P_l`` the penalty of layer ``l`` on the
    rows of all ranks (global statistics) or ``mean_r P_l(rows of rank r)`` (local; a rank with < 2 rows
    contributes 0). That is what DDP's averaging of per-rank gradients must produce. An SGD step follows every
    ``ga`` micro-batches with the mean of their gradients. Returns the final weights and, per micro-batch, the
    per-layer ``(V, K)`` of the global batch.
    """
    model = worker.build_model(model_kind)
    model.train()
    names = select_layers(model, layers)
    modules = dict(model.named_modules())
    params = [p for p in model.parameters() if p.requires_grad]
    stats = []
    accumulated = [torch.zeros_like(p) for p in params]
    for micro, rank_batches in enumerate(steps):
        outputs = {n: [] for n in names}
        handles = [
            modules[n].register_forward_hook(lambda m, a, o, n=n: outputs[n].append(_sample_matrix(m, o)))
            for n in names
        ]
        task = []
        for x, y in rank_batches:
            out = model(pixel_values=x) if model_kind == "vit" else model(x)
            logits = out.logits if model_kind == "vit" else out
            task.append(F.cross_entropy(logits, y))
        for h in handles:
            h.remove()
        per_layer, step_stats = [], {}
        for n in names:
            z = torch.cat(outputs[n])
            step_stats[n] = (variance_loss(z).item(), covariance_loss(z).item())
            if global_stats:
                per_layer.append(_layer_penalty(z, alpha, beta))
            else:
                per_rank = [_layer_penalty(zr, alpha, beta) if zr.shape[0] >= 2 else zr.sum() * 0 for zr in outputs[n]]
                per_layer.append(torch.stack(per_rank).mean())
        stats.append(step_stats)
        loss = torch.stack(task).mean() + torch.stack(per_layer).mean()
        for acc, g in zip(accumulated, torch.autograd.grad(loss, params)):
            acc += g / ga
        if (micro + 1) % ga == 0:
            with torch.no_grad():
                for p, acc in zip(params, accumulated):
                    p -= lr * acc
                    acc.zero_()
    return {k: v.detach() for k, v in model.state_dict().items()}, stats


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _dataset_from(batches):
    from datasets import Dataset

    x = torch.cat([b[0] for step in batches for b in step]).numpy()
    y = torch.cat([b[1] for step in batches for b in step]).numpy()
    return Dataset.from_dict({"pixel_values": x, "labels": y}).with_format("torch")


def single_process_run(model_kind, impl, batches, layers, tmp_path, ga=1, eval_batches=None):
    """``VCRegTrainer`` in this (non-distributed) process on the concatenated global batches (``ga`` micro-batches a
    step); with ``eval_batches``, also ``evaluate()`` on theirs. Returns the final weights and the trainer."""
    global_batch = sum(b[0].shape[0] for b in (batches or eval_batches)[0])
    scenario = dict(batch=global_batch, steps=len(batches) // ga if batches else None, impl=impl, dist=False,
                    layers=layers, ga=ga)
    args = worker.make_config(str(tmp_path / f"single_{model_kind}_{impl}"), scenario, ddp_backend=None)
    model = worker.build_model(model_kind)
    evalset = _dataset_from(eval_batches) if eval_batches else None
    trainer = VCRegTrainer(model=model, args=args, train_dataset=_dataset_from(batches) if batches else None,
                           eval_dataset=evalset)
    if batches:
        trainer.train()
    if eval_batches:
        trainer.evaluate()
    return {k: v.detach() for k, v in model.state_dict().items()}, trainer


def single_process_trainer_updates(model_kind, impl, batches, layers, tmp_path):
    """``VCRegTrainer`` in this (non-distributed) process on the concatenated global batches: final weights."""
    return single_process_run(model_kind, impl, batches, layers, tmp_path)[0]


def _ok(results):
    for r in results:
        assert r["error"] is None, f"rank {r['rank']} of {r['name']} failed:\n{r.get('traceback')}"


# ---------------------------------------------------------------------------------------------- global statistics
@pytest.mark.parametrize("model_kind", ["vit", "cnn"])
@pytest.mark.parametrize("impl", ["gradient", "loss"])
def test_global_stats_update_equals_single_process_on_concatenated_batch(ddp_results, model_kind, impl, tmp_path):
    results = ddp_results[f"{model_kind}_{impl}_global"]
    _ok(results)
    # DistributedSampler-like order: at step s rank r holds rows [4s + 2r, 4s + 2r + 2) of the dataset.
    data = worker.make_dataset(8)
    batches = _global_batches(results)
    assert len(batches) == 2
    for s, step in enumerate(batches):
        for r, (x, _) in enumerate(step):
            start = s * WORLD * BATCH + r * BATCH
            torch.testing.assert_close(x, data[start : start + BATCH]["pixel_values"], rtol=0, atol=0)
    layers = CNN_LAYERS if model_kind == "cnn" else "blocks"
    rank0, rank1 = (r["state_dict"] for r in results)
    assert _max_diff(rank0, rank1) == 0.0  # DDP keeps the replicas identical

    single = single_process_trainer_updates(model_kind, impl, batches, layers, tmp_path)
    reference, _ = reference_updates(model_kind, batches, global_stats=True, layers=layers)
    local, _ = reference_updates(model_kind, batches, global_stats=False, layers=layers)
    initial = worker.build_model(model_kind).state_dict()
    assert _max_diff(rank0, single) < TOL, _max_diff(rank0, single)
    assert _max_diff(rank0, reference) < TOL, _max_diff(rank0, reference)
    # The test can tell global from local statistics, and the penalty moved the weights.
    assert _max_diff(reference, local) > 100 * TOL
    assert _max_diff(rank0, initial) > 1e-2


@pytest.mark.parametrize("name,model_kind", [("vit_gradient_global_ga2", "vit"), ("cnn_loss_global_ga2", "cnn")])
def test_global_stats_with_grad_accumulation_is_mean_of_micro_batch_global_gradients(ddp_results, name, model_kind):
    results = ddp_results[name]
    _ok(results)
    batches = _global_batches(results)
    assert len(batches) == 4  # 2 optimizer steps x 2 micro-batches
    assert [s["step"] for s in results[0]["seen"]] == [0, 0, 1, 1]
    layers = CNN_LAYERS if model_kind == "cnn" else "blocks"
    reference, _ = reference_updates(model_kind, batches, global_stats=True, layers=layers, ga=2)
    as_large_batch, _ = reference_updates(model_kind, [a + b for a, b in zip(batches[::2], batches[1::2])],
                                          global_stats=True, layers=layers)
    assert _max_diff(results[0]["state_dict"], reference) < TOL, _max_diff(results[0]["state_dict"], reference)
    assert _max_diff(results[0]["state_dict"], results[1]["state_dict"]) == 0.0
    # Statistics are per micro-batch: not the update of one batch of 8 per step.
    assert _max_diff(reference, as_large_batch) > 100 * TOL


@pytest.mark.parametrize("name,model_kind", [("vit_gradient_local", "vit"), ("cnn_loss_local", "cnn")])
def test_local_stats_update_is_mean_of_per_rank_gradients(ddp_results, name, model_kind):
    results = ddp_results[name]
    _ok(results)
    batches = _global_batches(results)
    layers = CNN_LAYERS if model_kind == "cnn" else "blocks"
    local, _ = reference_updates(model_kind, batches, global_stats=False, layers=layers)
    glob, _ = reference_updates(model_kind, batches, global_stats=True, layers=layers)
    assert _max_diff(results[0]["state_dict"], local) < TOL, _max_diff(results[0]["state_dict"], local)
    assert _max_diff(results[0]["state_dict"], glob) > 100 * TOL


def test_global_count_is_sum_of_rank_rows_and_local_count_is_not_reduced(ddp_results):
    for name in ("vit_gradient_global", "cnn_gradient_global", "uneven_padded", "uneven_unequal_gradient"):
        c0, c1 = (r["counts"] for r in ddp_results[name])
        assert len(c0) == len(c1) > 0
        for (rows0, n0), (rows1, n1) in zip(c0, c1):
            assert n0 == n1 == rows0 + rows1, (name, rows0, rows1, n0, n1)
    for rows, n in ddp_results["vit_gradient_local"][0]["counts"]:
        assert n == rows
    # ViT: 2 images x 5 tokens per rank -> 20 rows; CNN blocks: 2 x 8 x 8 per rank; embed: 2 per rank.
    assert {n for _, n in ddp_results["vit_gradient_global"][0]["counts"]} == {20.0}
    assert [n for _, n in ddp_results["cnn_gradient_global"][0]["counts"][:3]] == [256.0, 256.0, 4.0]


def test_logged_global_stats_equal_statistics_of_concatenated_batch(ddp_results):
    results = ddp_results["cnn_gradient_global"]
    _, stats = reference_updates("cnn", _global_batches(results), global_stats=True, layers=CNN_LAYERS)
    for r in results:
        logged = [h for h in r["log_history"] if "vcreg/variance/embed" in h]
        assert len(logged) == len(stats) == 2
        for entry, step in zip(logged, stats):
            for layer, (v, k) in step.items():
                assert entry[f"vcreg/variance/{layer}"] == pytest.approx(v, abs=1e-5)
                assert entry[f"vcreg/covariance/{layer}"] == pytest.approx(k, rel=1e-4, abs=1e-8)


def test_hooks_and_records_released_after_distributed_training(ddp_results):
    for name in ("vit_gradient_global", "cnn_loss_global", "eval_global"):
        for r in ddp_results[name]:
            assert r.get("hooks_after_train", 0) == 0 and r.get("hooks_after_eval", 0) == 0
            assert r["records_after"] == 0


# ---------------------------------------------------------------------------------------------- uneven batches
@pytest.mark.parametrize(
    "name,impl,global_stats,sizes",
    [
        ("uneven_padded", "gradient", True, [(2, 2), (2, 2)]),
        ("uneven_drop_last", "gradient", True, [(2, 2)]),
        ("uneven_unequal_gradient", "gradient", True, [(2, 2), (2, 1)]),
        ("uneven_unequal_loss", "loss", True, [(2, 2), (2, 1)]),
        ("uneven_unequal_local", "gradient", False, [(2, 2), (2, 1)]),
        ("unequal_counts_drop_last", "gradient", True, [(2, 2)]),
    ],
)
def test_uneven_last_batch_gives_reference_update(ddp_results, name, impl, global_stats, sizes):
    results = ddp_results[name]
    _ok(results)
    batches = _global_batches(results)
    assert [tuple(b[0].shape[0] for b in step) for step in batches] == sizes
    if name == "uneven_padded":  # rank 1's last batch is sample 6 completed with sample 0
        data = worker.make_dataset(7)
        torch.testing.assert_close(batches[1][1][0], data[[6, 0]]["pixel_values"], rtol=0, atol=0)
    reference, _ = reference_updates("cnn", batches, global_stats=global_stats, layers=CNN_LAYERS)
    assert _max_diff(results[0]["state_dict"], reference) < TOL, _max_diff(results[0]["state_dict"], reference)
    assert _max_diff(results[0]["state_dict"], results[1]["state_dict"]) == 0.0


def test_rank_with_one_row_uses_global_count_or_skips_with_local_stats(ddp_results):
    # Rank 1's last batch is one image: its pooled ``embed`` layer has 1 row.
    counts = [r["counts"] for r in ddp_results["uneven_unequal_gradient"]]
    assert [c[-1] for c in counts] == [(2, 3.0), (1, 3.0)]  # global statistics: 3 rows, valid
    last = [h for h in ddp_results["uneven_unequal_gradient"][1]["log_history"] if "vcreg/skipped_layers" in h][-1]
    assert last["vcreg/skipped_layers"] == 0
    # Local statistics: rank 1 skips ``embed`` in that step, rank 0 does not. The log is the mean over the ranks
    # (the same line on both): half a layer skipped, and rank 0's variance of ``embed`` halved by rank 1's 0.
    results = ddp_results["uneven_unequal_local"]
    logs = [[h for h in r["log_history"] if "vcreg/skipped_layers" in h] for r in results]
    assert logs[0] == logs[1]
    assert [h["vcreg/skipped_layers"] for h in logs[0]] == [0, 0.5]
    rank_embed = [r["local"][-1]["layers"]["embed"] for r in results]  # (V, K, valid) of each rank's last forward
    assert [valid for _, _, valid in rank_embed] == [True, False]
    assert logs[0][-1]["vcreg/variance/embed"] == pytest.approx(rank_embed[0][0] / 2, rel=1e-6)


@pytest.mark.parametrize("name", ["unequal_batch_counts", "eval_unequal_batch_counts"])
def test_unequal_batch_counts_raise_clear_error_on_every_rank(ddp_results, name):
    for r in ddp_results[name]:
        assert r["error"] is not None and r["error"].startswith("ValueError"), r["error"]
        assert "different numbers of batches (1 to 2" in r["error"]
        assert "even_batches" in r["error"] and "dataloader_drop_last=True" in r["error"]


# ---------------------------------------------------------------------------------------------- evaluation
def test_ddp_evaluate_returns_global_vcreg_metrics(ddp_results):
    results = ddp_results["eval_global"]
    _ok(results)
    batches = _global_batches(results, training=False)
    # 7 samples, 2 per rank: rank 1's second batch is sample 6 completed with sample 0 (accelerate).
    assert [tuple(b[0].shape[0] for b in step) for step in batches] == [(2, 2), (2, 2)]
    model = worker.build_model("vit").eval()
    names = select_layers(model, "blocks")
    expected = {n: [] for n in names}
    with torch.no_grad():
        for step in batches:
            captured = {n: [] for n in names}
            modules = dict(model.named_modules())
            handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: captured[n].append(_sample_matrix(m, o)))
                       for n in names]
            for x, _ in step:
                model(pixel_values=x)
            for h in handles:
                h.remove()
            for n in names:
                z = torch.cat(captured[n])
                expected[n].append((variance_loss(z).item(), covariance_loss(z).item()))
    # Every batch weighs what it weighs in eval_loss: its real samples (4, then 3: the padding copy of sample 0 is
    # dropped by gather_for_metrics).
    w = np.array([4, 3]) / 7
    v_mean = np.dot(w, [np.mean([expected[n][s][0] for n in names]) for s in range(len(batches))])
    for r in results:
        metrics = r["eval_metrics"]
        assert metrics["eval_vcreg/variance"] == pytest.approx(v_mean, abs=1e-5)
        for n in names:
            assert metrics[f"eval_vcreg/variance/{n}"] == pytest.approx(np.dot(w, [e[0] for e in expected[n]]), abs=1e-5)
            assert metrics[f"eval_vcreg/covariance/{n}"] == pytest.approx(
                np.dot(w, [e[1] for e in expected[n]]), rel=1e-4, abs=1e-9
            )
        assert metrics["eval_vcreg/skipped_layers"] == 0
        for rows, n in r["counts"]:
            assert n == 20.0 and rows == 10  # both ranks' 10 token rows per layer
    # Global statistics: the same numbers on both ranks.
    assert results[0]["eval_metrics"]["eval_vcreg/covariance"] == results[1]["eval_metrics"]["eval_vcreg/covariance"]


# ---------------------------------------------------------------------------------------------- true logs
# Logged values are float32 sums formed in another order on 2 processes (all-reduced moments, per-rank means):
# measured relative differences to 1 process <= 1.2e-7, covariances (values ~1e-5, from a cancelling sum) <= 1.2e-6.
LOG_RTOL, LOG_ATOL = 1e-4, 1e-8
# ``loss`` is the Trainer's float32 accumulation of each micro-batch's task_loss + penalty; task_loss and the penalty
# are averaged apart (float64 sums of float32 values): a few float32 roundings (2^-24 = 6e-8 each); measured <= 1e-7.
SUM_RTOL = 1e-6
LOGGED_KEYS = ("loss", "task_loss", "vcreg/penalty", "vcreg/variance", "vcreg/covariance", "vcreg/skipped_layers")


def assert_loss_is_task_loss_plus_penalty(history: list[dict], prefix: str = "") -> int:
    """Every line of ``history`` with ``{prefix}loss`` has ``loss == task_loss + vcreg/penalty``; returns the count."""
    lines = [h for h in history if f"{prefix}loss" in h]
    for h in lines:
        total = h[f"{prefix}task_loss"] + h.get(f"{prefix}vcreg/penalty", 0.0)
        assert h[f"{prefix}loss"] == pytest.approx(total, rel=SUM_RTOL), h
    return len(lines)


def assert_same_log_lines(history_a: list[dict], history_b: list[dict], keys=LOGGED_KEYS) -> None:
    """The training lines of two log histories agree line by line on ``keys`` and on every per-layer term."""
    lines_a, lines_b = ([h for h in hist if "loss" in h] for hist in (history_a, history_b))
    assert [h["step"] for h in lines_a] == [h["step"] for h in lines_b] and lines_a
    for a, b in zip(lines_a, lines_b):
        per_layer = {k for k in a if k.startswith(("vcreg/variance/", "vcreg/covariance/"))}
        assert per_layer and per_layer == {k for k in b if k.startswith("vcreg/") and k.count("/") == 2}
        for k in (*keys, *sorted(per_layer)):
            assert a[k] == pytest.approx(b[k], rel=LOG_RTOL, abs=LOG_ATOL), (a["step"], k, a[k], b[k])


def test_logged_loss_equals_task_loss_plus_penalty_on_every_line_and_rank(ddp_results):
    checked = 0
    for name, results in ddp_results.items():
        for r in results:
            if r["error"] is None:
                checked += assert_loss_is_task_loss_plus_penalty(r["log_history"])
                checked += assert_loss_is_task_loss_plus_penalty([r.get("eval_metrics", {})], prefix="eval_")
    assert checked >= 40


@pytest.mark.parametrize(
    "name,ga", [("vit_gradient_global", 1), ("vit_loss_global", 1), ("cnn_gradient_global", 1),
                ("cnn_loss_global", 1), ("vit_gradient_global_ga2", 2), ("cnn_loss_global_ga2", 2)]
)
def test_two_process_log_equals_single_process_log_of_concatenated_batch(ddp_results, name, ga, tmp_path):
    """Global statistics: every logged line of both ranks is the line of 1 process on the concatenated batches."""
    results = ddp_results[name]
    _ok(results)
    model_kind, impl = name.split("_")[:2]
    layers = CNN_LAYERS if model_kind == "cnn" else "blocks"
    _, single = single_process_run(model_kind, impl, _global_batches(results), layers, tmp_path, ga=ga)
    for r in results:
        assert_same_log_lines(r["log_history"], single.state.log_history)
    # Before the fix, task_loss was rank 0's own: the ranks' own values differ, so the test can tell.
    own = [[f["task_loss"] for f in r["local"]] for r in results]
    assert max(abs(a - b) for a, b in zip(*own)) > 1e-3


@pytest.mark.parametrize("name", ["vit_gradient_local", "cnn_loss_local"])
def test_local_stats_log_is_mean_over_ranks_of_their_own_values(ddp_results, name):
    results = ddp_results[name]
    _ok(results)
    lines = [[h for h in r["log_history"] if "loss" in h] for r in results]
    assert lines[0] == lines[1] and len(lines[0]) == 2
    for step, line in enumerate(lines[0]):
        own = [r["local"][step] for r in results]  # 1 forward a step
        for key, field in (("task_loss", "task_loss"), ("vcreg/penalty", "penalty")):
            assert line[key] == pytest.approx(np.mean([o[field] for o in own]), rel=1e-6)
        # Local statistics differ between the ranks, so this is a real average.
        assert abs(own[0]["penalty"] - own[1]["penalty"]) > 1e-4


def test_two_process_evaluation_equals_single_process_evaluation(ddp_results, tmp_path):
    results = ddp_results["eval_even"]
    _ok(results)
    _, single = single_process_run("vit", "gradient", None, "blocks", tmp_path,
                                   eval_batches=_global_batches(results, training=False))
    expected = single.state.log_history[-1]
    keys = [k for k in expected if k.startswith("eval_") and ("loss" in k or "vcreg" in k)]
    assert {"eval_loss", "eval_task_loss", "eval_vcreg/penalty", "eval_vcreg/variance/vit.layers.1"} <= set(keys)
    for r in results:
        for k in keys:
            assert r["eval_metrics"][k] == pytest.approx(expected[k], rel=LOG_RTOL, abs=LOG_ATOL), k


def test_single_process_evaluation_with_short_last_batch_weighs_it_like_eval_loss(tmp_path):
    """7 samples in batches of 4: eval_loss weighs the batches 4 : 3, and so must eval_task_loss and eval_vcreg/*."""
    scenario = dict(batch=4, steps=1, impl="gradient", dist=False, layers="blocks")
    args = worker.make_config(str(tmp_path), scenario, ddp_backend=None)
    trainer = VCRegTrainer(model=worker.build_model("vit"), args=args, eval_dataset=worker.make_dataset(7))
    metrics = trainer.evaluate()
    assert assert_loss_is_task_loss_plus_penalty([metrics], prefix="eval_") == 1
    # The unweighted mean of the two batches would differ by more than the tolerance.
    model = worker.build_model("vit").eval()
    data = worker.make_dataset(7)
    with torch.no_grad():
        losses = [model(pixel_values=data[i:j]["pixel_values"], labels=data[i:j]["labels"]).loss.item()
                  for i, j in ((0, 4), (4, 7))]
    assert metrics["eval_task_loss"] == pytest.approx((4 * losses[0] + 3 * losses[1]) / 7, rel=1e-6)
    assert abs(np.mean(losses) - metrics["eval_task_loss"]) > 1e-4


# ---------------------------------------------------------------------------------------------- resume
RESUME_ROWS = 6  # ViT: 2 images x 5 tokens = 10 rows per rank and layer; every statistic draws 6 on each rank
RESUME_STOP = 3  # 8 samples, 4 per step: 2 steps an epoch, so checkpoint-3 is mid-epoch 2 of 3


def _resume_scenario(name, **extra):
    """6 steps of the ViT, global statistics, a row cap, random sampling, a checkpoint every 3 steps."""
    overrides = dict(save_strategy="steps", save_steps=RESUME_STOP, vcreg_max_rows=RESUME_ROWS,
                     train_sampling_strategy="random")
    return _scenario(name, "vit", n_train=8, steps=6, lr=0.1, overrides=overrides, **extra)


def test_ddp_resume_with_global_stats_and_row_cap_matches_uninterrupted_run(tmp_path):
    """Launch 1: the uninterrupted run and one stopped right after checkpoint-3. Launch 2 (new torchrun): a model
    initialised with another seed, ``train(resume_from_checkpoint=True)`` in the stopped run's directory."""
    first = launch([_resume_scenario("full"), _resume_scenario("cut", stop_at=RESUME_STOP)], tmp_path / "first",
                   timeout=240)
    full, cut = first["full"], first["cut"]
    _ok(full)
    _ok(cut)
    assert [r["global_step"] for r in cut] == [RESUME_STOP] * WORLD
    assert sorted(os.listdir(cut[0]["output_dir"])) == [f"checkpoint-{RESUME_STOP}"]
    resume = _resume_scenario("resumed", model_seed=worker.MODEL_SEED + 1, output_dir=cut[0]["output_dir"],
                              resume=True)
    resumed = launch([resume], tmp_path / "second", timeout=240)["resumed"]
    _ok(resumed)

    # A resume that loaded nothing would start from other weights.
    initial, other = (worker.build_model("vit", seed=s).state_dict() for s in (worker.MODEL_SEED, resume["model_seed"]))
    assert _max_diff(initial, other) > 1e-2
    vcreg_keys = {k for e in full[0]["log_history"] for k in e if k.startswith("vcreg/")}
    keys = ("loss", "task_loss", *sorted(vcreg_keys))
    assert len(keys) > len(VCREG_KEYS)  # the per-layer vcreg/variance/<layer>, vcreg/covariance/<layer> too
    checkpoint = Path(cut[0]["output_dir"]) / f"checkpoint-{RESUME_STOP}"
    restored = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    for f, r in zip(full, resumed):
        assert f["global_step"] == r["global_step"] == 6
        # It really resumed: its log history starts with the checkpoint's (steps 1-3), its first forward ran at
        # global_step 3 and the first step it logged itself is 4.
        assert r["log_history"][: len(restored)] == restored and sorted(step_logs(restored)) == [1, 2, 3]
        assert r["seen"][0]["step"] == RESUME_STOP
        assert min(step_logs(r["log_history"][len(restored) :])) == RESUME_STOP + 1
        # The same batches (random sampler state restored per rank) from the checkpoint on.
        after = [s for s in f["seen"] if s["step"] >= RESUME_STOP]
        assert len(after) == len(r["seen"]) == 3
        for a, b in zip(after, r["seen"]):
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
        # Every statistic used a drawn subset: 6 rows of each rank's 10, 12 in the all-reduced count.
        assert {c for c in f["counts"] + r["counts"]} == {(RESUME_ROWS, 2.0 * RESUME_ROWS)}
        # Measured: 0.0 on both ranks, weights and logged values alike (bitwise the uninterrupted run).
        assert _max_diff(f["state_dict"], r["state_dict"]) <= TOL, _max_diff(f["state_dict"], r["state_dict"])
        assert_same_logs(f["log_history"], r["log_history"], keys, first_step=RESUME_STOP + 1)
    assert _max_diff(resumed[0]["state_dict"], resumed[1]["state_dict"]) == 0.0


# ---------------------------------------------------------------------------------------------- configuration
def test_distributed_stats_without_process_group_raises_at_construction(tmp_path):
    import torch.distributed as dist

    assert not dist.is_initialized()
    args = VCRegConfig(output_dir=str(tmp_path), vcreg_distributed_stats=True, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"vcreg_distributed_stats=True needs a torch.distributed process group"):
        VCRegTrainer(model=worker.build_model("cnn"), args=args, train_dataset=worker.make_dataset(4))


# ---------------------------------------------------------------------------------------------- load
RSS_GROWTH_BOUND = 32 * 2**20  # bytes, least-squares trend over the post-warm-up samples
TENSOR_COUNT_BOUND = 8  # live torch.Tensor objects (gc) after warm-up; measured: exactly constant
LOAD_SECONDS_ENV = "HF_VCREG_LOAD_SECONDS"


def _rss_trend(samples: list[dict]) -> tuple[float, int]:
    """Least-squares RSS growth (bytes) over the samples, and the number of steps they span."""
    steps = np.array([s["step"] for s in samples], dtype=float)
    rss = np.array([s["rss"] for s in samples], dtype=float)
    slope = np.polyfit(steps, rss, 1)[0]
    return slope * (steps[-1] - steps[0]), int(steps[-1] - steps[0])


def run_load_check(tmp_path: Path, duration_s: float, min_steps: int, sample_every: int) -> list[dict]:
    """2 ranks train a CNN (32 channels, 16x16 maps, batch 8 per rank) for ``duration_s`` with a checkpoint every
    5 steps; after a warm-up of a quarter of the samples, RSS, live tensors, hooks and records stay flat."""
    scenario = _scenario("load", "cnn", steps=None, n_train=64, batch=8, kind="load", duration_s=duration_s,
                         min_steps=min_steps, sample_every=sample_every, save_steps=5, logging_steps=5, channels=32,
                         image_size=16)
    results = launch([scenario], tmp_path, timeout=duration_s + 300)["load"]
    assert results[0]["global_step"] == results[1]["global_step"] >= min_steps
    for r in results:
        samples = r["samples"]
        assert len(samples) >= 4, len(samples)
        # Hooks are installed once (one per regularised layer) and never pile up; records are released per step;
        # the log buffers hold the same number of values at every sample (they are emptied at every log).
        assert {s["hooks"] for s in samples} == {3}
        assert {s["records"] for s in samples} == {0}
        assert len({s["buffered"] for s in samples}) == 1
        assert r["hooks_after_train"] == 0 and r["records_after"] == 0
        warm = samples[len(samples) // 4 :]
        tensors = [s["tensors"] for s in warm]
        assert max(tensors) - min(tensors) <= TENSOR_COUNT_BOUND, f"rank {r['rank']}: live tensors {tensors}"
        growth, span = _rss_trend(warm)
        assert growth < RSS_GROWTH_BOUND, f"rank {r['rank']}: RSS grew {growth / 2**20:.1f} MiB over {span} steps"
        steps = r["global_step"]
        # numeric order: a run stopping at steps 100-104 keeps checkpoint-95 and checkpoint-100 ("100" < "95" as text)
        kept = sorted(r["checkpoints"], key=lambda name: int(name.rsplit("-", 1)[1]))
        expected = [f"checkpoint-{s}" for s in sorted({steps // 5 * 5 - 5, steps // 5 * 5})]
        assert kept == expected, f"rank {r['rank']} stopped at step {steps}: {r['checkpoints']}"
    return results


def test_load_memory_hooks_and_records_flat_short_run(tmp_path):
    run_load_check(tmp_path, duration_s=15, min_steps=60, sample_every=5)


@pytest.mark.slow
def test_load_memory_hooks_and_records_flat_long_run(tmp_path):
    """Run with: HF_VCREG_LOAD_SECONDS=600 python -m pytest tests/test_distributed.py -m slow -k long_run."""
    duration = float(os.environ.get(LOAD_SECONDS_ENV, "600"))
    results = run_load_check(tmp_path, duration_s=duration, min_steps=0, sample_every=20)
    for r in results:
        assert r["train_seconds"] >= duration
        print(f"rank {r['rank']}: {r['global_step']} steps in {r['train_seconds']:.0f} s, RSS MiB "
              f"{[round(s['rss'] / 2**20) for s in r['samples'][:: max(1, len(r['samples']) // 12)]]}")
