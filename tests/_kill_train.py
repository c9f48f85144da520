"""Tiny training set-ups shared by the robustness tests, and the subprocess that ``tests/test_kill.py`` kills.

As a module: :func:`dataset`, :func:`config`, :func:`trainer`, :func:`weights`, :func:`step_logs`.

As a script, ``python tests/_kill_train.py save ROOT MODEL TRAINER:KILL_AT ...``: for each scenario, a forked child
trains ``MODEL`` (a name of ``tests/_tiny_models.py``) for 6 steps with a checkpoint every 2 into
``ROOT/TRAINER-KILL_AT`` and SIGKILLs itself in the middle of writing one file of the step-4 checkpoint; the
parent prints the children's exit codes (``-9``: killed) as ``EXIT_CODES {json}``. ``TRAINER`` is ``vcreg``
(``VCRegTrainer``) or ``plain`` (``transformers.Trainer``, to show the upstream layout). ``KILL_AT`` names the
file and how it is cut:

* ``model``: ``model.safetensors``, half its bytes written;
* ``optimizer``: ``optimizer.pt``, half its bytes written;
* ``trainer_state``: ``trainer_state.json`` (written last), half its text written;
* ``none``: no kill (the run completes).
* ``upload_model`` / ``upload_checkpoint``: the run pushes every checkpoint to the Hub (``push_to_hub=True``,
  ``hub_strategy="checkpoint"``, repo ``test-user/TRAINER-KILL_AT``; run the script with the Hub server's
  environment) and waits at each save until that push is done; the step-4 push's LFS upload of
  ``model.safetensors`` (the model commit) or of ``last-checkpoint/optimizer.pt`` (the checkpoint commit that
  follows it) sends half its body, writes ``ROOT/TRAINER-KILL_AT.kill`` (JSON: the file, its sha256, size, bytes
  sent, step) and SIGKILLs. Every checkpoint is complete on disk by then (the push runs after the rename).

The kill is real (``os.kill(os.getpid(), SIGKILL)``: no ``finally``, no atexit, no flush of Python buffers).

``python tests/_kill_train.py push OUT REPO STATE_FILE GO_FILE`` (with the Hub server's environment) trains
and pushes a tiny ResNet, writes that commit to ``STATE_FILE``, waits for ``GO_FILE``, changes the weights and
pushes again; the test SIGKILLs it during that push (its LFS upload, or its commit call). ``... retry OUT REPO``
loads ``OUT`` and pushes it again.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import torch
from datasets import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny_models import IMG, build  # noqa: E402

from hf_vcreg import VCRegConfig, VCRegTrainer  # noqa: E402

VCREG_KEYS = ("loss", "task_loss", "vcreg/penalty", "vcreg/variance", "vcreg/covariance", "vcreg/skipped_layers")


def dataset(n: int = 24, seed: int = 0, size: int = IMG, num_labels: int = 3) -> Dataset:
    """``n`` random images ``(3, size, size)`` with labels, as a real ``datasets.Dataset`` in torch format."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, num_labels, n)
    return Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


def config(output_dir, **overrides) -> VCRegConfig:
    """A CPU config: batch 4, 6 steps, AdamW, a checkpoint every 2 steps, a log line every step."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        seed=0,
        report_to=[],
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        vcreg_alpha=0.5,
        vcreg_beta=0.5,
        vcreg_layers="blocks",  # every block: these tests pin the mechanics, not the per-family default placement
    )
    kwargs.update(overrides)
    return VCRegConfig(**kwargs)


def trainer(model_name: str, args: VCRegConfig, model_seed: int = 0, trainer_cls=VCRegTrainer, **kw):
    model = build(model_name, seed=model_seed)
    return trainer_cls(model=model, args=args, train_dataset=dataset(), **kw)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), f"different parameter names: {sorted(a.keys() ^ b.keys())[:5]}"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def step_logs(log_history: list[dict], keys=VCREG_KEYS) -> dict[int, dict[str, float]]:
    """The log lines holding ``keys[0]`` (``loss``: per-step training lines), as ``{step: {key: value}}``."""
    return {e["step"]: {k: e[k] for k in keys if k in e} for e in log_history if keys[0] in e}


# ---------------------------------------------------------------------------------------------- the script
def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half_and_die(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    _kill_self()


UPLOAD_KILL_POINTS = {"upload_model": "model.safetensors", "upload_checkpoint": "last-checkpoint/optimizer.pt"}


def _upload_half_and_die(url: str, data: bytes, marker: str, record: dict) -> None:
    """PUT ``data`` to ``url`` announcing its full length, send half of it, write ``marker`` and SIGKILL."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("PUT", parts.path + (f"?{parts.query}" if parts.query else ""))
    conn.putheader("Content-Length", str(len(data)))
    conn.endheaders()
    conn.send(data[: len(data) // 2])
    with open(marker, "w") as f:
        json.dump({**record, "size": len(data), "sent": len(data) // 2}, f)
    _kill_self()


def _install_kill(kill_at: str, step: int, state_of, marker: str | None = None) -> None:
    """Patch the writer of one checkpoint file (or its upload) so that, at ``step``, it writes half and SIGKILLs."""
    import io

    import safetensors.torch
    import transformers.modeling_utils as modeling_utils
    from transformers.trainer_callback import TrainerState

    if kill_at == "model":
        original = safetensors.torch.save_file

        def save_file(tensors, filename, *a, **kw):
            if state_of().global_step == step:
                from safetensors.torch import save as to_bytes

                _write_half_and_die(filename, to_bytes(tensors, metadata=kw.get("metadata")))
            return original(tensors, filename, *a, **kw)

        modeling_utils.safe_save_file = save_file
        safetensors.torch.save_file = save_file  # bare (non-PreTrainedModel) models: trainer.py calls it by attribute
    elif kill_at == "optimizer":
        original_save = torch.save

        def save(obj, f, *a, **kw):
            if isinstance(f, (str, os.PathLike)) and str(f).endswith("optimizer.pt") and state_of().global_step == step:
                buf = io.BytesIO()
                original_save(obj, buf, *a, **kw)
                _write_half_and_die(str(f), buf.getvalue())
            return original_save(obj, f, *a, **kw)

        torch.save = save
    elif kill_at == "trainer_state":
        original_json = TrainerState.save_to_json

        def save_to_json(self, json_path):
            if self.global_step == step and os.path.basename(os.path.dirname(json_path)).endswith(f"-{step}"):
                original_json(self, json_path + ".full")
                with open(json_path + ".full", "rb") as f:
                    data = f.read()
                os.remove(json_path + ".full")
                _write_half_and_die(json_path, data)
            return original_json(self, json_path)

        TrainerState.save_to_json = save_to_json
    elif kill_at in UPLOAD_KILL_POINTS:
        import hashlib

        import huggingface_hub.lfs as lfs

        original_upload = lfs._upload_single_part  # lfs_upload calls it by module attribute, in upload threads

        def upload(operation, upload_url):
            if operation.path_in_repo == UPLOAD_KILL_POINTS[kill_at] and state_of().global_step == step:
                with operation.as_file() as f:
                    data = f.read()
                sha256 = hashlib.sha256(data).hexdigest()
                record = {"path_in_repo": operation.path_in_repo, "sha256": sha256, "step": step}
                _upload_half_and_die(upload_url, data, marker, record)
            return original_upload(operation, upload_url)

        lfs._upload_single_part = upload
    elif kill_at != "none":
        raise SystemExit(f"unknown kill point {kill_at!r}: use model, optimizer, trainer_state, "
                         f"{', '.join(UPLOAD_KILL_POINTS)} or none")


def _run(output_dir: str, model: str, trainer_kind: str, kill_at: str, kill_step: int) -> None:
    from transformers import Trainer

    # NOTE: no torch.set_num_threads here: the tests compare with runs in the pytest process, and the thread
    # count changes float summation order (AdamW's first steps amplify that to ~lr).
    cls = VCRegTrainer if trainer_kind == "vcreg" else Trainer
    if kill_at not in UPLOAD_KILL_POINTS:
        t = trainer(model, config(output_dir), trainer_cls=cls)
    else:
        from transformers import TrainerCallback

        class WaitForPush(TrainerCallback):  # one push per save, finished before training goes on: deterministic
            def on_save(self, args, state, control, **kwargs):
                t._finish_current_push()

        repo = "test-user/" + os.path.basename(output_dir)
        args = config(output_dir, push_to_hub=True, hub_model_id=repo, hub_strategy="checkpoint")
        t = trainer(model, args, trainer_cls=cls, callbacks=[WaitForPush()])
    _install_kill(kill_at, kill_step, lambda: t.state, marker=output_dir + ".kill")
    t.train()


def _push(out: str, repo: str, state_file: str, go_file: str) -> None:
    """Push once (the "old" commit), write ``state_file``, wait for ``go_file``, change the weights, push again.

    The test makes the Hub fail the second push's LFS upload (retryably), or holds its commit request, and
    SIGKILLs this process meanwhile.
    """
    import json
    import time

    t = trainer("hf_resnet", config(out, max_steps=2, save_strategy="no", push_to_hub=True, hub_model_id=repo))
    t.train()
    first = t.push_to_hub()
    with open(state_file + ".tmp", "w") as f:
        json.dump({"commit": first.oid}, f)
    os.replace(state_file + ".tmp", state_file)
    while not os.path.exists(go_file):
        time.sleep(0.05)
    with torch.no_grad():
        for p in t.model.parameters():
            p.add_(0.01)
    t.push_to_hub()  # the test kills us while this upload is in flight
    raise SystemExit("the second push was expected to be killed, but it returned")


def _retry(out: str, repo: str) -> None:
    """What a user does after the kill: load the saved model from ``out`` and push it again."""
    import json

    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out)
    args = config(out, save_strategy="no", push_to_hub=True, hub_model_id=repo)
    commit = VCRegTrainer(model=model, args=args, train_dataset=dataset()).push_to_hub()
    print("RESULT " + json.dumps({"commit": commit.oid}), flush=True)


def _save_scenarios(root: str, model: str, scenarios: list[str], kill_step: int) -> None:
    """Run each ``TRAINER:KILL_AT`` scenario in a forked child (one import for all); print their exit codes."""
    import json
    import traceback

    codes = {}
    for scenario in scenarios:
        trainer_kind, kill_at = scenario.split(":")
        pid = os.fork()
        if pid == 0:  # the child trains and (unless kill_at is "none") SIGKILLs itself mid-save
            code = 0
            try:
                _run(os.path.join(root, scenario.replace(":", "-")), model, trainer_kind, kill_at, kill_step)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        codes[scenario] = os.waitstatus_to_exitcode(status)  # -9: killed by SIGKILL
    print("EXIT_CODES " + json.dumps(codes), flush=True)


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="kill mid-save scenarios")
    save.add_argument("root", help="scenario S writes to ROOT/S with ':' replaced by '-'")
    save.add_argument("model", help="a name of tests/_tiny_models.py")
    save.add_argument("scenarios", nargs="+", help="TRAINER:KILL_AT, TRAINER in {vcreg, plain}")
    save.add_argument("--kill_step", type=int, default=4)
    push = sub.add_parser("push", help="push, wait for GO_FILE, push changed weights (to be killed)")
    push.add_argument("out")
    push.add_argument("repo")
    push.add_argument("state_file")
    push.add_argument("go_file")
    retry = sub.add_parser("retry", help="load OUT and push it again")
    retry.add_argument("out")
    retry.add_argument("repo")
    opts = parser.parse_args(argv)
    if opts.command == "save":
        _save_scenarios(opts.root, opts.model, opts.scenarios, opts.kill_step)
    elif opts.command == "push":
        _push(opts.out, opts.repo, opts.state_file, opts.go_file)
    else:
        _retry(opts.out, opts.repo)


if __name__ == "__main__":
    main(sys.argv[1:])
