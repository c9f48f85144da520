"""Kill mid-save and mid-push: a SIGKILLed run loses nothing that was complete, and resumes.

Saving: ``tests/_kill_train.py`` trains a tiny ResNet (checkpoints at steps 2, 4, 6) in forked children that
SIGKILL themselves halfway through writing one file of the step-4 checkpoint: the weights
(``model.safetensors``), the optimizer (``optimizer.pt``) or the trainer state (``trainer_state.json``, written
last). ``VCRegTrainer`` stages every checkpoint in ``_incomplete-checkpoint-N/`` and renames it when complete,
so the killed run leaves ``checkpoint-2`` intact and no ``checkpoint-4``; the upstream ``Trainer`` (same kill)
leaves a half-written ``checkpoint-4`` that ``get_last_checkpoint`` picks.

Pushing: a ``push_to_hub`` subprocess is SIGKILLed while its LFS upload is in flight (the local Hub server
answers the upload with retryable errors, so the client is provably mid-upload); the repo must still be at
the previous commit, byte for byte, and a retry must complete. The same with the kill while the server holds
the commit request itself (after the LFS upload): the repo is at the old commit until the server applies it,
then at the new one, complete. And during training (``push_to_hub=True``, ``hub_strategy="checkpoint"``, a push
per checkpoint): a run killed halfway through the LFS upload of its step-4 model (or of its step-4 checkpoint,
one commit later) leaves ``checkpoint-2`` and ``checkpoint-4`` loadable, resumes to the uninterrupted run's
weights, and its repo at the last commit made before the kill, every file byte-identical to the checkpoint it
came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _kill_train import UPLOAD_KILL_POINTS, config, max_weight_diff, trainer, weights
from safetensors.torch import load, load_file
from transformers import AutoModelForImageClassification
from transformers.trainer_utils import get_last_checkpoint

from hf_vcreg import VCRegTrainer
from hf_vcreg.trainer import last_complete_checkpoint

HELPER = str(Path(__file__).with_name("_kill_train.py"))
MODEL = "hf_resnet"
KILL_POINTS = ("model", "optimizer", "trainer_state")


def run_kill_scenarios(root: Path, model: str, scenarios: list[str], env: dict | None = None) -> dict[str, int]:
    """Run the scenarios in one subprocess (a forked child each): ``{scenario: exit code}``."""
    proc = subprocess.run(
        [sys.executable, HELPER, "save", str(root), model, *scenarios],
        capture_output=True, text=True, timeout=600, env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("EXIT_CODES ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0][len("EXIT_CODES ") :])


def reference_run(out: Path, model: str):
    """The same training, uninterrupted, in this process: ``({step: checkpoint weights}, final weights)``."""
    t = trainer(model, config(out))
    t.train()
    checkpoints = {step: load_file(str(out / f"checkpoint-{step}" / "model.safetensors")) for step in (2, 4, 6)}
    return checkpoints, weights(t.model)


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


def _checkpoint_entries(path: Path) -> list[str]:
    return [name for name in _entries(path) if "checkpoint" in name]


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
    ref_ckpts, ref_final = reference
    # The killed run trained in a subprocess, the reference in this one: equal to float tolerance (bitwise for the
    # default ResNet; ViT and ConvNeXt kernels may reduce in another order across processes, ~1e-6 seen in CI).
    assert max_weight_diff(load_file(str(out / "checkpoint-2" / "model.safetensors")), ref_ckpts[2]) <= 1e-5
    check_resume_matches_reference(out, model, "checkpoint-2", ref_final, monkeypatch)
    assert _entries(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def check_resume_matches_reference(out: Path, model: str, last: str, ref_final, monkeypatch) -> None:
    """``resume_from_checkpoint=True`` loads ``out/last`` and ends at the uninterrupted run's final weights."""
    loaded_from = record_loads(monkeypatch)
    t = trainer(model, config(out), model_seed=7)
    t.train(resume_from_checkpoint=True)
    assert loaded_from == [str(out / last)]
    assert max_weight_diff(weights(t.model), ref_final) <= 1e-4  # the steps after a checkpoint equal to ~1e-6
    assert _checkpoint_entries(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # staged leftovers gone
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
        assert proc is None or proc.poll() is None, f"the push process exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _snapshot(hub_server, repo: str) -> dict[str, bytes]:
    """``{path: bytes}`` of every file at the repo's ``main``."""
    return {path: hub_server.read_file(repo, path) for path in hub_server.list_files(repo)}


def _commit_statuses(hub_server, repo: str) -> list[int | None]:
    """The HTTP status of every commit request to ``repo`` (None: no answer was sent)."""
    return [r.status for r in hub_server.requests_to("commit") if f"/{repo}/commit/" in r.path]


def kill_second_push(hub_env, tmp_path: Path, repo: str, arm) -> str:
    """Run the helper's ``push`` (push, wait, push changed weights) on ``tmp_path/"out"`` and SIGKILL its second push.

    ``arm(first_commit)`` runs between the two pushes and returns a condition; the process is SIGKILLed as soon as
    it holds (the second push reached the kill point). Asserts the exit code is -9; returns the first commit's id.
    """
    state, go, log_path = tmp_path / "pushed.json", tmp_path / "go", tmp_path / "push.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, HELPER, "push", str(tmp_path / "out"), repo, str(state), str(go)],
            env=hub_env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(state.exists, proc, 300, "the first push")
        first = json.loads(state.read_text())["commit"]
        reached = arm(first)
        go.touch()
        _wait_for(reached, proc, 120, "the second push's kill point")
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -9, log_path.read_text()[-3000:]
    return first


def test_sigkill_mid_push_leaves_the_hub_repo_at_the_previous_commit_and_a_retry_completes(
    hub_server, hub_env, tmp_path
):
    repo, out = "test-user/kill-push", tmp_path / "out"
    before = {}

    def arm(first):
        assert hub_server.branch_head(repo) == first
        before.update(files=_snapshot(hub_server, repo), history=hub_server.history(repo))
        before["commits"] = len(hub_server.requests_to("commit"))
        # The second push's LFS upload is answered 503 (retried by the client with back-off): it is in flight.
        rule = hub_server.fail_next("lfs_upload", status=503, count=None)
        return lambda: rule.hits >= 1

    old = kill_second_push(hub_env, tmp_path, repo, arm)
    old_bytes, old_history = before["files"], before["history"]
    # The repo is exactly at the old commit: same head, same files, same bytes, no new commit attempted.
    assert hub_server.branch_head(repo) == old
    assert _snapshot(hub_server, repo) == old_bytes and "model.safetensors" in old_bytes
    assert hub_server.history(repo) == old_history
    assert len(hub_server.requests_to("commit")) == before["commits"]
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


def test_sigkill_while_the_hub_applies_the_commit_leaves_the_old_commit_then_the_new_complete_one(
    hub_server, hub_env, tmp_path, monkeypatch
):
    """Killed after its LFS upload, while the server handles the commit call: never a partial commit.

    The server's commit handler is held (test-side patch) after it validated the request and wrote the commit
    object, before the branch ref moves; the client is SIGKILLed there. Until the server finishes, the repo is at
    the old commit; then at the new one, with every file the client sent, byte for byte.
    """
    repo, out = "test-user/kill-commit", tmp_path / "out"
    armed, held, release, written = threading.Event(), threading.Event(), threading.Event(), []
    write_commit = hub_server.storage.write_commit

    def held_write_commit(*args, **kwargs):
        commit = write_commit(*args, **kwargs)
        if armed.is_set():
            written.append(commit)
            held.set()
            release.wait(120)
        return commit

    monkeypatch.setattr(hub_server.storage, "write_commit", held_write_commit)
    before = {}

    def arm(first):
        before.update(files=_snapshot(hub_server, repo), history=hub_server.history(repo))
        armed.set()
        return held.is_set

    try:
        old = kill_second_push(hub_env, tmp_path, repo, arm)
        # Killed during the commit call: its request has no answer yet, the new model's LFS object is stored.
        assert _commit_statuses(hub_server, repo) == [200, None]
        assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() in hub_server.lfs_objects()
        [new] = [c["id"] for c in written]
        assert new != old and written[0]["parents"] == [old]
        assert hub_server.branch_head(repo) == old
        assert _snapshot(hub_server, repo) == before["files"] and hub_server.history(repo) == before["history"]
    finally:
        release.set()
    _wait_for(lambda: _commit_statuses(hub_server, repo) == [200, 200], None, 30, "the held commit to be applied")
    assert hub_server.branch_head(repo) == new
    assert [c["id"] for c in hub_server.history(repo)] == [new] + [c["id"] for c in before["history"]]
    files = _snapshot(hub_server, repo)
    assert files.keys() == before["files"].keys()
    assert {path: data for path, data in files.items() if path != ".gitattributes"} == {
        path: (out / path).read_bytes() for path in files if path != ".gitattributes"
    }
    old_weights = load(before["files"]["model.safetensors"])
    assert max_weight_diff(load(files["model.safetensors"]), old_weights) == pytest.approx(0.01, rel=1e-3)


# ------------------------------------------------------------------------------- kill mid-push, during training
UPLOAD_KILLS = tuple(UPLOAD_KILL_POINTS)
STEP_2_TITLES = ["Training in progress, step 2, checkpoint", "Training in progress, step 2", "initial commit"]
# After the kill: the repo's commit titles (newest first), and the local checkpoints that its root files and its
# last-checkpoint/ files must equal.
EXPECTED_REPO = {
    "upload_model": (STEP_2_TITLES, "checkpoint-2", "checkpoint-2"),
    "upload_checkpoint": (["Training in progress, step 4"] + STEP_2_TITLES, "checkpoint-4", "checkpoint-2"),
}


@pytest.mark.parametrize("kill_at", UPLOAD_KILLS)
def test_sigkill_mid_checkpoint_upload_keeps_checkpoints_resumable_and_the_repo_at_a_complete_commit(
    hub_server, hub_env, tmp_path, reference, kill_at, monkeypatch
):
    # One server per scenario: LFS objects are shared by all repos, and both runs produce the same step-4 files.
    server, root = hub_server, tmp_path / "killed"
    codes = run_kill_scenarios(root, MODEL, [f"vcreg:{kill_at}"], env=hub_env)
    out, repo = root / f"vcreg-{kill_at}", f"test-user/vcreg-{kill_at}"
    assert codes == {f"vcreg:{kill_at}": -9}
    # The kill came halfway through the PUT of the step-4 file: the server saw that request and no end to it.
    marker = json.loads((root / f"vcreg-{kill_at}.kill").read_text())
    assert marker["path_in_repo"] == UPLOAD_KILL_POINTS[kill_at] and marker["step"] == 4
    assert 0 < marker["sent"] < marker["size"]
    killed_file = out / "checkpoint-4" / Path(marker["path_in_repo"]).name
    assert hashlib.sha256(killed_file.read_bytes()).hexdigest() == marker["sha256"]

    def puts():
        return [r.status for r in server.requests_to("lfs_upload") if r.path.endswith(marker["sha256"])]

    _wait_for(lambda: puts() == [None], None, 30, "the server to record the cut upload")
    assert marker["sha256"] not in server.lfs_objects()

    # The repo is at the last commit made before the kill; none was attempted after it.
    titles, root_source, checkpoint_source = EXPECTED_REPO[kill_at]
    assert [c["title"] for c in server.history(repo)] == titles
    assert _commit_statuses(server, repo) == [200] * (len(titles) - 1)  # the first one is create_repo's
    files = _snapshot(server, repo)
    pushed_checkpoint = {p.split("/", 1)[1]: data for p, data in files.items() if p.startswith("last-checkpoint/")}
    pushed_root = {p: data for p, data in files.items() if "/" not in p and p != ".gitattributes"}
    assert {"model.safetensors", "config.json", "README.md"} <= pushed_root.keys()
    assert pushed_root == {p: (out / root_source / p).read_bytes() for p in pushed_root}
    assert pushed_checkpoint == {p.name: p.read_bytes() for p in (out / checkpoint_source).iterdir()}

    # Locally: both checkpoints complete, loadable, equal to the uninterrupted run's; the resume ends like it.
    assert _checkpoint_entries(out) == ["checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(out) == get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    ref_ckpts, ref_final = reference
    for step in (2, 4):
        loaded = AutoModelForImageClassification.from_pretrained(out / f"checkpoint-{step}")
        assert max_weight_diff(weights(loaded), ref_ckpts[step]) <= 1e-5
    check_resume_matches_reference(out, MODEL, "checkpoint-4", ref_final, monkeypatch)
