"""Kill mid-save and mid-push: a SIGKILLed run loses nothing that was complete, and resumes.

Saving: ``tests/_kill_train.py`` trains a tiny ResNet (checkpoints at steps 2, 4, 6) in forked children that
SIGKILL themselves halfway through writing one file of the step-4 checkpoint: the weights
(``model.safetensors``), the optimizer (``optimizer.pt``) or the trainer state (``trainer_state.json``, written
last). ``VCRegTrainer`` stages every checkpoint in ``_incomplete-checkpoint-N/`` and renames it when complete,
so the killed run leaves ``checkpoint-2`` intact and no ``checkpoint-4``; the upstream ``Trainer`` (same kill)
leaves a half-written ``checkpoint-4`` that ``get_last_checkpoint`` picks.

Pushing: a ``push_to_hub`` subprocess is SIGKILLed while its LFS upload is in flight (the local Hub server
answers the upload with retryable errors, so the client is provably mid-upload); the repo must still be at
the previous commit, byte for byte, and a retry must complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _kill_train import config, max_weight_diff, trainer, weights
from safetensors.torch import load, load_file
from transformers.trainer_utils import get_last_checkpoint

from hf_vcreg import VCRegTrainer
from hf_vcreg.trainer import last_complete_checkpoint

HELPER = str(Path(__file__).with_name("_kill_train.py"))
MODEL = "hf_resnet"
KILL_POINTS = ("model", "optimizer", "trainer_state")


def run_kill_scenarios(root: Path, model: str, scenarios: list[str]) -> dict[str, int]:
    """Run the scenarios in one subprocess (a forked child each): ``{scenario: exit code}``."""
    proc = subprocess.run(
        [sys.executable, HELPER, "save", str(root), model, *scenarios], capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("EXIT_CODES ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0][len("EXIT_CODES ") :])


def reference_run(out: Path, model: str):
    """The same training, uninterrupted, in this process: its checkpoint-2 weights and final weights."""
    t = trainer(model, config(out))
    t.train()
    return load_file(str(out / "checkpoint-2" / "model.safetensors")), weights(t.model)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every kill scenario of MODEL, run once: ``(root, {scenario: exit code})``."""
    root = tmp_path_factory.mktemp("killed")
    scenarios = [f"vcreg:{k}" for k in KILL_POINTS] + ["plain:optimizer", "plain:trainer_state"]
    return root, run_kill_scenarios(root, MODEL, scenarios)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("reference"), MODEL)


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def record_loads(monkeypatch) -> list[str]:
    """The checkpoints ``VCRegTrainer._load_from_checkpoint`` is asked to load, in order."""
    loaded_from = []
    original = VCRegTrainer._load_from_checkpoint
    monkeypatch.setattr(
        VCRegTrainer, "_load_from_checkpoint", lambda self, path, *a: (loaded_from.append(path), original(self, path, *a))
    )
    return loaded_from


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sigkill_mid_save_keeps_previous_checkpoint_and_resume_matches_uninterrupted_run(
    killed, reference, kill_at, monkeypatch
):
    root, codes = killed
    assert codes[f"vcreg:{kill_at}"] == -9  # really killed by SIGKILL, during the step-4 save
    check_killed_run_resumes(root / f"vcreg-{kill_at}", MODEL, kill_at, reference, monkeypatch)


KILLED_FILE = {"model": "model.safetensors", "optimizer": "optimizer.pt", "trainer_state": "trainer_state.json"}


def check_killed_run_resumes(out: Path, model: str, kill_at: str, reference, monkeypatch) -> None:
    assert _entries(out) == ["_incomplete-checkpoint-4", "checkpoint-2"]
    # the kill was mid-save: the file being written when it came is there, cut short
    cut = out / "_incomplete-checkpoint-4" / "checkpoint-4" / KILLED_FILE[kill_at]
    if kill_at == "trainer_state":
        with pytest.raises(json.JSONDecodeError):
            json.loads(cut.read_text())
    else:
        assert 0 < cut.stat().st_size < (out / "checkpoint-2" / KILLED_FILE[kill_at]).stat().st_size
    # Both resolvers, ours and the one example scripts call, see only the complete checkpoint.
    assert last_complete_checkpoint(out) == get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    ref_ckpt2, ref_final = reference
    # The killed run trained in a subprocess, the reference in this one: equal to float tolerance (bitwise for the
    # default ResNet; ViT and ConvNeXt kernels may reduce in another order across processes, ~1e-6 seen in CI).
    assert max_weight_diff(load_file(str(out / "checkpoint-2" / "model.safetensors")), ref_ckpt2) <= 1e-5

    loaded_from = record_loads(monkeypatch)
    t = trainer(model, config(out), model_seed=7)
    t.train(resume_from_checkpoint=True)
    assert loaded_from == [str(out / "checkpoint-2")]
    assert max_weight_diff(weights(t.model), ref_final) <= 1e-4  # 4 steps on from a checkpoint equal to ~1e-6
    assert _entries(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # the staged leftovers are gone
    assert last_complete_checkpoint(out) == str(out / "checkpoint-6")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hf_vit", "timm_vit", "hf_convnext"])
def test_sigkill_mid_save_of_other_architectures_resumes_like_uninterrupted_run(model, tmp_path, monkeypatch):
    """The same guarantee for a ViT (legacy checkpoint keys), a bare timm model (timm's hub format) and ConvNeXt."""
    codes = run_kill_scenarios(tmp_path / "killed", model, [f"vcreg:{k}" for k in KILL_POINTS])
    assert codes == {f"vcreg:{k}": -9 for k in KILL_POINTS}
    reference = reference_run(tmp_path / "reference", model)
    for kill_at in KILL_POINTS:
        with monkeypatch.context() as patch:
            check_killed_run_resumes(tmp_path / "killed" / f"vcreg-{kill_at}", model, kill_at, reference, patch)


@pytest.mark.parametrize("kill_at", ["optimizer", "trainer_state"])
def test_upstream_trainer_killed_mid_save_leaves_half_written_checkpoint_that_we_skip(killed, kill_at, monkeypatch):
    root, codes = killed
    out = root / f"plain-{kill_at}"
    assert codes[f"plain:{kill_at}"] == -9
    half = out / "checkpoint-4"
    assert _entries(out) == ["checkpoint-2", "checkpoint-4"]
    # Upstream's resolver picks the half-written folder ...
    assert get_last_checkpoint(str(out)) == str(half)
    if kill_at == "optimizer":
        assert not (half / "trainer_state.json").exists()
        with pytest.raises(Exception):  # truncated pickle
            torch.load(half / "optimizer.pt", weights_only=True)
    else:
        with pytest.raises(json.JSONDecodeError):
            json.loads((half / "trainer_state.json").read_text())
    # ... ours skips it, and an explicit path to it is refused before any work, naming the complete one.
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    t = trainer(MODEL, config(out))
    with pytest.raises(ValueError, match=r"is not a complete checkpoint.*checkpoint-2"):
        t.train(resume_from_checkpoint=str(half))
    loaded_from = record_loads(monkeypatch)
    t.train(resume_from_checkpoint=True)
    assert loaded_from == [str(out / "checkpoint-2")] and t.state.global_step == 6
    assert last_complete_checkpoint(out) == str(out / "checkpoint-6")
    assert json.loads((half / "trainer_state.json").read_text())["global_step"] == 4  # rewritten, complete


def test_resume_true_without_a_complete_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3, "log_hi')
    t = trainer(MODEL, config(tmp_path))
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True: no complete checkpoint-N .* output_dir="):
        t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 0


def test_atomic_checkpoints_keep_rotation_and_best_model_paths(tmp_path):
    """The staged save must not change what the Trainer keeps: save_total_limit, best_model_checkpoint."""
    from _kill_train import dataset

    args = config(
        tmp_path,
        save_total_limit=1,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    t = trainer(MODEL, args, eval_dataset=dataset(8, seed=1))
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None and Path(best).parent == tmp_path and Path(best).name.startswith("checkpoint-")
    assert os.path.isdir(best) and "_incomplete" not in best
    assert json.loads((Path(best) / "trainer_state.json").read_text())["best_model_checkpoint"] == best
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("_incomplete")]
    # save_total_limit=1 with a best checkpoint: the Trainer keeps only the best one at the end
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")] == [Path(best).name]


# ------------------------------------------------------------------------------------------------ kill mid-push
def _wait_for(condition, proc, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the push process exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigkill_mid_push_leaves_the_hub_repo_at_the_previous_commit_and_a_retry_completes(
    hub_server, hub_env, tmp_path
):
    repo, out = "test-user/kill-push", tmp_path / "out"
    state, go = tmp_path / "pushed.json", tmp_path / "go"
    with open(tmp_path / "push.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, HELPER, "push", str(out), repo, str(state), str(go)],
            env=hub_env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(state.exists, proc, 300, "the first push")
        old = json.loads(state.read_text())["commit"]
        assert hub_server.branch_head(repo) == old
        old_files = hub_server.list_files(repo)
        old_bytes = {path: hub_server.read_file(repo, path) for path in old_files}
        old_history = hub_server.history(repo)
        commits_before = len(hub_server.requests_to("commit"))
        # The second push's LFS upload is answered 503 (retried by the client with back-off): it is in flight.
        rule = hub_server.fail_next("lfs_upload", status=503, count=None)
        go.touch()
        _wait_for(lambda: rule.hits >= 1, proc, 120, "the second push's upload")
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
    finally:
        proc.kill()
    log_text = (tmp_path / "push.log").read_text()
    assert proc.returncode == -9, log_text[-3000:]
    # The repo is exactly at the old commit: same head, same files, same bytes, no new commit attempted.
    assert hub_server.branch_head(repo) == old
    assert hub_server.list_files(repo) == old_files and "model.safetensors" in old_files
    assert {path: hub_server.read_file(repo, path) for path in old_files} == old_bytes
    assert hub_server.history(repo) == old_history
    assert len(hub_server.requests_to("commit")) == commits_before
    # The local folder holds the new weights (saved before the upload began); a retry publishes them.
    local = load_file(str(out / "model.safetensors"))
    assert max_weight_diff(local, load(old_bytes["model.safetensors"])) == pytest.approx(0.01, rel=1e-3)
    hub_server.clear_failures()
    proc = subprocess.run(
        [sys.executable, HELPER, "retry", str(out), repo], env=hub_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])["commit"]
    assert hub_server.branch_head(repo) == new != old
    assert [c["id"] for c in hub_server.history(repo)] == [new] + [c["id"] for c in old_history]
    assert max_weight_diff(load(hub_server.read_file(repo, "model.safetensors")), local) == 0.0
