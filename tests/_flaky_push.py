"""Subprocess helper of tests/test_publishing.py: train a tiny ViT one step and push it to ``test-user/flaky``.

``python _flaky_push.py OUT [--push-at-init] [--init-failed-file FILE] [--no-retry] [--hub-token T] [--push-kwargs J]``, with the Hub test server's environment
(the test makes the server refuse or fail the first push). Pushes once, catching ``HubPushError``; lists ``OUT``;
reloads ``OUT`` with ``AutoModelForImageClassification`` and compares it with the trained model; pushes again.
Prints ``RESULT:{"error": first push's error or null, "files": OUT's entries, "same": bool, "commit": id}``.

``--push-at-init``: ``push_to_hub=True``, so building the trainer creates the repo. ``--init-failed-file FILE``:
if that fails, write ``{"error", "files"}`` to FILE, wait until the test deletes it (after restarting the
server) and build the trainer again. ``--no-retry``: no second push (``commit`` is null; for a server that stays
down). ``--hub-token T``: ``hub_token=T`` in the args. ``--push-kwargs J``: JSON keyword arguments of the pushes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from _downstream_pretrain import random_images
from _tiny_models import hf_vit
from transformers import AutoModelForImageClassification

from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.publishing import HubPushError


def main(out: str, push_at_init: bool, init_failed_file: str | None, retry: bool = True,
         hub_token: str | None = None, push_kwargs: dict | None = None) -> dict:
    args = VCRegConfig(output_dir=out, max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                       remove_unused_columns=False, disable_tqdm=True, hub_model_id="test-user/flaky",
                       push_to_hub=push_at_init, hub_token=hub_token)
    push_kwargs = push_kwargs or {}
    try:
        trainer = VCRegTrainer(model=hf_vit(), args=args, train_dataset=random_images(8, 0))
    except HubPushError as err:
        if init_failed_file is None:
            raise
        marker = Path(init_failed_file)
        files = sorted(os.listdir(out)) if os.path.isdir(out) else []
        marker.write_text(json.dumps({"error": str(err), "files": files}))
        while marker.exists():  # the test restarts the server, then deletes the file
            time.sleep(0.1)
        trainer = VCRegTrainer(model=hf_vit(), args=args, train_dataset=random_images(8, 0))
    trainer.train()
    try:
        trainer.push_to_hub(**push_kwargs)
        error = None
    except HubPushError as err:
        error = str(err)
    files = sorted(os.listdir(out))
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    same = all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), trainer.model.state_dict().values()))
    commit = trainer.push_to_hub(**push_kwargs) if retry else None
    return {"error": error, "files": files, "same": same, "commit": commit.oid if commit else None}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--push-at-init", action="store_true")
    parser.add_argument("--init-failed-file")
    parser.add_argument("--no-retry", action="store_true")
    parser.add_argument("--hub-token")
    parser.add_argument("--push-kwargs", default="{}")
    opts = parser.parse_args()
    result = main(opts.out, opts.push_at_init, opts.init_failed_file, not opts.no_retry, opts.hub_token,
                  json.loads(opts.push_kwargs))
    print("RESULT:" + json.dumps(result), flush=True)
