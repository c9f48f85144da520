"""Subprocess helper of tests/test_publishing.py: load published checkpoints the standard ways, WITHOUT hf_vcreg.

``python _downstream_load.py WORK_DIR REPO_JSON``: a ``sys.meta_path`` blocker makes ``import hf_vcreg`` fail
(it is installed in this environment), then for every ``{name: repo}`` of REPO_JSON:

* transformers, exactly as ``run_image_classification.py``: ``AutoConfig`` (5 new labels), then
  ``AutoModelForImageClassification(..., ignore_mismatched_sizes=True)`` and ``AutoImageProcessor``;
* timm (names starting with ``timm``): ``timm.create_model("hf-hub:REPO", pretrained=True, num_classes=5)``;

compares every backbone tensor with ``WORK_DIR/NAME_trained.safetensors`` and runs one SGD fine-tuning step
on 4 random images prepared by the image processor. Prints one JSON line (prefix ``RESULT:``).
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class _BlockHfVcreg(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_vcreg" or name.startswith("hf_vcreg."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _BlockHfVcreg())
try:
    import hf_vcreg  # noqa: F401

    HF_VCREG_BLOCKED = False
except ModuleNotFoundError:
    HF_VCREG_BLOCKED = True

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification  # noqa: E402

NEW_LABELS = ["l0", "l1", "l2", "l3", "l4"]


def compare(loaded: dict, reference: dict, prefix: str = "") -> dict:
    """Backbone tensors of ``loaded`` against the trained ``reference`` (head: shape differs -> new)."""
    equal, differ, head, missing = 0, [], [], []
    for key, ref in reference.items():
        value = loaded.get(prefix + key)
        if value is None:
            missing.append(key)
        elif value.shape != ref.shape:
            head.append(key)
        elif torch.equal(value, ref):
            equal += 1
        else:
            differ.append(key)
    return {"equal": equal, "differ": differ, "head": sorted(head), "missing": missing, "total": len(reference)}


def finetune_step(model, pixel_values: torch.Tensor, bare: bool) -> dict:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 4])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if bare:
        logits = model(pixel_values)
        loss = F.cross_entropy(logits, labels)
    else:
        out = model(pixel_values=pixel_values, labels=labels)
        logits, loss = out.logits, out.loss
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(before[k], v) for k, v in model.named_parameters())
    return {"loss": float(loss), "logits_shape": list(logits.shape), "changed": changed,
            "params": len(before)}


def load_all(work: Path, repos: dict) -> dict:
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]
    results = {}
    for name, repo in repos.items():
        reference = load_file(str(work / f"{name}_trained.safetensors"))
        config = AutoConfig.from_pretrained(
            repo, num_labels=len(NEW_LABELS), label2id={n: i for i, n in enumerate(NEW_LABELS)},
            id2label=dict(enumerate(NEW_LABELS)), finetuning_task="image-classification",
        )
        model = AutoModelForImageClassification.from_pretrained(repo, config=config, ignore_mismatched_sizes=True)
        processor = AutoImageProcessor.from_pretrained(repo)
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        prefix = "timm_model." if name.startswith("timm") else ""
        entry = {
            "model_class": type(model).__name__,
            "processor_class": type(processor).__name__,
            "pixel_values_shape": list(pixel_values.shape),
            "transformers": compare(model.state_dict(), reference, prefix),
            "transformers_step": finetune_step(model, pixel_values, bare=False),
        }
        if name.startswith("timm"):
            bare = timm.create_model(f"hf-hub:{repo}", pretrained=True, num_classes=len(NEW_LABELS))
            entry["timm"] = compare(bare.state_dict(), reference)
            entry["timm_input_size"] = list(bare.pretrained_cfg["input_size"])
            entry["timm_step"] = finetune_step(bare, pixel_values, bare=True)
        results[name] = entry
    return results


if __name__ == "__main__":
    out = load_all(Path(sys.argv[1]), json.loads(sys.argv[2]))
    out["_hf_vcreg_blocked"] = HF_VCREG_BLOCKED
    out["_hf_vcreg_imported"] = any(m == "hf_vcreg" or m.startswith("hf_vcreg.") for m in sys.modules)
    print("RESULT:" + json.dumps(out), flush=True)
