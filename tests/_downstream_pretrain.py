"""Subprocess helper of tests/test_publishing.py: pretrain tiny models with VCRegTrainer and push them.

Run with the Hub test server's environment (``HF_ENDPOINT`` set before huggingface_hub is imported):
``python _downstream_pretrain.py WORK_DIR NAME [NAME ...]`` with NAME in ``vit``, ``convnext``, ``timm_resnet``.
For each model: 3 VCReg training steps on random 32x32 images (3 classes), evaluation with accuracy
(``mean(argmax == label)``), push to ``test-user/vcreg-NAME`` (a different ``hub_strategy`` per model), and the
trained weights saved to ``WORK_DIR/NAME_trained.safetensors`` (live ``state_dict`` names) as the reference for the
loading process.
Prints one JSON line (prefix ``RESULT:``) with the repo ids, regularised layers and final logged values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
from datasets import ClassLabel, Dataset, Features, Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiny_models import hf_convnext, hf_vit  # noqa: E402

from hf_vcreg import VCRegConfig, VCRegTrainer  # noqa: E402

CLASSES = ["cat", "dog", "fox"]


def random_images(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
    data = Dataset.from_dict({"image": images, "label": rng.integers(0, len(CLASSES), n)}, features=features)

    def transform(batch):
        pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in batch["image"]])
        return {"pixel_values": (torch.from_numpy(pixels).permute(0, 3, 1, 2) - 0.5) / 0.5,
                "labels": torch.as_tensor(batch["label"])}

    return data.with_transform(transform)


def tiny_timm_resnet() -> torch.nn.Module:
    model = timm.create_model("resnet18", num_classes=len(CLASSES), channels=(8, 16, 32, 64), stem_width=8)
    # Record the preprocessing trained with (timm convention): 32x32 inputs, no crop, mean = std = 0.5.
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("test_input_size", "test_crop_pct")}
    model.pretrained_cfg = {**cfg, "input_size": (3, 32, 32), "crop_pct": 1.0, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    return model


BUILDERS = {
    "vit": (lambda: hf_vit(num_labels=3), {"hub_strategy": "every_save"}),
    "convnext": (lambda: hf_convnext(num_labels=3), {"hub_strategy": "end"}),
    "timm_resnet": (tiny_timm_resnet, {"hub_strategy": "checkpoint"}),
}


def main(work: Path, names: list[str]) -> dict:
    results = {}
    for name in names:
        build, hub_args = BUILDERS[name]
        torch.manual_seed(0)
        model = build()
        args = VCRegConfig(
            output_dir=str(work / f"out_{name}"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
            logging_steps=1, save_steps=2, eval_strategy="steps", eval_steps=3, report_to=[], use_cpu=True,
            remove_unused_columns=False, push_to_hub=True, hub_model_id=f"test-user/vcreg-{name}",
            disable_tqdm=True, **hub_args,
        )
        trainer = VCRegTrainer(
            model=model, args=args, train_dataset=random_images(32, 0), eval_dataset=random_images(16, 1),
            compute_metrics=lambda p: {"accuracy": float(np.mean(p.predictions.argmax(-1) == p.label_ids))},
        )
        trainer.train()
        trainer.push_to_hub(dataset="random-32px")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(state, str(work / f"{name}_trained.safetensors"))
        last = {}
        for entry in trainer.state.log_history:
            last.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
        results[name] = {"repo": trainer.hub_model_id, "layers": trainer.vcreg_layer_names, "last": last,
                         "output_dir": args.output_dir}
    return results


if __name__ == "__main__":
    print("RESULT:" + json.dumps(main(Path(sys.argv[1]), sys.argv[2:])), flush=True)
