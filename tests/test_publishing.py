"""Publishing: checkpoints pushed by VCRegTrainer load with the standard loaders, without hf_vcreg.

The pushes and downloads run in subprocesses (huggingface_hub reads HF_ENDPOINT when imported) against the
Hub-compatible server of tests/hub_server.py; the loading subprocess blocks ``import hf_vcreg``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard
from hub_server import HubServer

from hf_vcreg import VCRegConfig, VCRegTrainer, publishing

TESTS = Path(__file__).resolve().parent
MODELS = ("vit", "convnext", "timm_resnet")


def _script(path: Path, args: list[str], env: dict, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{path.name} failed\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT:")))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Pretrain + push the three models, then load them in a process where hf_vcreg cannot be imported."""
    work = tmp_path_factory.mktemp("publishing")
    with HubServer(root=work / "hub") as server:
        server.start()
        env = server.client_env(hf_home=work / "hf_home")
        pretrained = _script(TESTS / "_downstream_pretrain.py", [str(work), *MODELS], env)
        repos = {name: info["repo"] for name, info in pretrained.items()}
        loaded = _script(TESTS / "_downstream_load.py", [str(work), json.dumps(repos)], env)
        files = {name: server.list_files(repo) for name, repo in repos.items()}
        cards = {name: server.read_file(repo, "README.md").decode() for name, repo in repos.items()}
        configs = {name: json.loads(server.read_file(repo, "config.json")) for name, repo in repos.items()}
        yield {"work": work, "env": env, "server": server, "pretrained": pretrained, "loaded": loaded,
               "files": files, "cards": cards, "configs": configs}


# ------------------------------------------------------------------------------ the three published models
def test_loading_process_could_not_import_hf_vcreg(published):
    assert published["loaded"]["_hf_vcreg_blocked"] is True
    assert published["loaded"]["_hf_vcreg_imported"] is False


@pytest.mark.parametrize("name", MODELS)
def test_pushed_checkpoint_loads_like_run_image_classification_with_identical_backbone(published, name):
    result = published["loaded"][name]
    expected_class = {"vit": "ViTForImageClassification", "convnext": "ConvNextForImageClassification",
                      "timm_resnet": "TimmWrapperForImageClassification"}[name]
    assert result["model_class"] == expected_class
    compared = result["transformers"]
    head = ["fc.bias", "fc.weight"] if name.startswith("timm") else ["classifier.bias", "classifier.weight"]
    assert compared["head"] == head  # the 3-class head was replaced by a 5-class one
    assert compared["differ"] == [] and compared["missing"] == []
    assert compared["equal"] == compared["total"] - 2  # every other tensor (buffers included) is bit-identical
    step = result["transformers_step"]
    assert step["logits_shape"] == [4, 5] and np.isfinite(step["loss"])
    assert step["changed"] == step["params"]  # one SGD step moved every parameter


def test_pushed_timm_checkpoint_loads_in_timm_with_identical_backbone(published):
    result = published["loaded"]["timm_resnet"]
    assert result["timm"]["head"] == ["fc.bias", "fc.weight"]
    assert result["timm"]["differ"] == [] and result["timm"]["equal"] == result["timm"]["total"] - 2
    assert result["timm_input_size"] == [3, 32, 32]  # the preprocessing recorded in pretrained_cfg
    assert result["processor_class"] == "TimmWrapperImageProcessor" and result["pixel_values_shape"] == [4, 3, 32, 32]
    assert np.isfinite(result["timm_step"]["loss"]) and result["timm_step"]["changed"] == result["timm_step"]["params"]


def test_pushed_repos_hold_the_standard_files(published):
    files, configs = published["files"], published["configs"]
    for name in ("vit", "convnext"):
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files[name])
        assert not [f for f in files[name] if f.startswith(("checkpoint-", "_", "last-checkpoint"))]
    assert configs["vit"]["model_type"] == "vit" and configs["convnext"]["model_type"] == "convnext"
    timm_files = set(files["timm_resnet"])
    assert {"config.json", "model.safetensors", "README.md", "last-checkpoint/model.safetensors"} <= timm_files
    timm_config = configs["timm_resnet"]
    assert timm_config["architecture"] == "resnet18" and timm_config["num_classes"] == 3
    assert "num_classes" not in timm_config["model_args"]  # the timm 1.0.31 / TimmWrapper clash
    assert timm_config["model_args"]["channels"] == [8, 16, 32, 64]
    assert timm_config["label_names"] == ["cat", "dog", "fox"]
    assert timm_config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert "tag" not in timm_config["pretrained_cfg"] and "model_type" not in timm_config


def test_pushed_card_metadata_and_content(published):
    for name, text in published["cards"].items():
        info = published["pretrained"][name]
        card = ModelCard(text)
        data = card.data
        is_timm = name.startswith("timm")
        assert data.library_name == ("timm" if is_timm else "transformers")
        assert data.pipeline_tag == "image-classification"
        assert {"vcreg", "image-classification"} <= set(data.tags) and ("timm" in data.tags) == is_timm
        assert data.datasets == ["random-32px"]
        accuracy = info["last"]["eval_accuracy"]
        assert data.eval_results[0].metric_type == "accuracy" and data.eval_results[0].metric_value == accuracy
        for field in VCRegConfig.__dataclass_fields__:
            if field.startswith("vcreg_"):
                assert f"| `{field}` |" in card.text
        for layer in info["layers"]:
            assert f"`{layer}`" in card.text
        for key in ("task_loss", "vcreg/variance", "vcreg/covariance", "eval_task_loss", "eval_vcreg/variance",
                    "eval_vcreg/covariance", "eval_accuracy"):
            assert f"| `{key}` | {info['last'][key]:.6g} |" in card.text, key
        assert "arXiv:2306.13292" in card.text and "@article{zhu2023vcreg" in card.text
        assert f"--model_name_or_path {info['repo']}" in card.text
        assert ("hf-hub:" + info["repo"] in card.text) == is_timm


# ------------------------------------------------------------------------------ failures and resume
def test_refused_push_raises_clear_error_keeps_local_model_and_retry_succeeds(hub_server, hub_env, tmp_path):
    rule = hub_server.fail_next("preupload", status=403)
    result = _script(TESTS / "_flaky_push.py", [str(tmp_path / "out")], hub_env, timeout=240)
    assert rule.hits == 1
    assert "failed" in result["error"] and "test-user/flaky" in result["error"] and "push_to_hub() again" in result["error"]
    assert "403" in result["error"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(result["files"])
    assert result["same"] is True  # the local folder is complete and loads with the trained weights
    assert hub_server.branch_head("test-user/flaky") == result["commit"]  # the retry committed
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub_server.list_files("test-user/flaky"))


def test_interrupted_push_resumes_without_resending_uploaded_weights(hub_server, hub_env, tmp_path):
    hub_server.fail_next("commit", status=500)  # weights uploaded (LFS), then the commit fails
    result = _script(TESTS / "_flaky_push.py", [str(tmp_path / "out")], hub_env, timeout=240)
    assert "500" in result["error"] and "push_to_hub() again" in result["error"]
    assert result["same"] is True and hub_server.branch_head("test-user/flaky") == result["commit"]
    uploads = [r for r in hub_server.requests if r.endpoint == "lfs_upload"]
    commits = [r for r in hub_server.requests if r.endpoint == "commit"]
    assert len(commits) == 2 and commits[0].status == 500 and commits[1].status == 200
    # model.safetensors and training_args.bin were PUT once, by the failed attempt; the retry reused them
    assert len(uploads) == 2 and all(r.status == 200 for r in uploads)
    assert len(hub_server.history("test-user/flaky")) == 2  # repo creation + the one successful push


def test_server_down_at_start_raises_before_training_and_retry_pushes(hub_server, hub_env, tmp_path):
    hub_server.stop()
    marker = tmp_path / "init_failed"
    command = [sys.executable, str(TESTS / "_flaky_push.py"), str(tmp_path / "out"), "--push-at-init",
               "--init-failed-file", str(marker)]
    proc = subprocess.Popen(command, env=hub_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        failure = json.loads(marker.read_text())
        assert failure["error"].startswith("Creating the Hub repo 'test-user/flaky' failed")
        assert failure["files"] == []  # nothing was trained or written
        hub_server.start()
        marker.unlink()
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-4000:]
    result = json.loads([line[7:] for line in out.splitlines() if line.startswith("RESULT:")][-1])
    assert result["error"] is None and hub_server.branch_head("test-user/flaky") == result["commit"]


def test_offline_push_after_training_keeps_a_complete_folder_and_says_what_happened(hub_server, hub_env, tmp_path):
    hub_server.stop()  # offline: the Hub cannot be reached at all
    out = tmp_path / "out"
    result = _script(TESTS / "_flaky_push.py", [str(out), "--no-retry"], hub_env, timeout=240)
    error = result["error"]
    assert error.startswith(f"Training finished (1 steps); the checkpoint is complete at '{out}' (weights, config, "
                            "preprocessing, model card)")
    assert "Pushing it to the Hub repo 'test-user/flaky' failed in creating the repo: " in error
    assert "Nothing was trained" not in error and "call trainer.push_to_hub() again" in error
    # written before any network call: complete, and loads with the trained weights
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
            "training_args.bin"} <= set(result["files"])
    assert result["same"] is True and result["commit"] is None


def test_no_token_in_any_pushed_or_saved_file(hub_server, hub_env, tmp_path):
    token = hub_env["HF_TOKEN"]  # the test server's write token, also passed as hub_token
    out = tmp_path / "out"
    result = _script(TESTS / "_flaky_push.py", [str(out), "--hub-token", token], hub_env, timeout=240)
    assert result["error"] is None and hub_server.branch_head("test-user/flaky") == result["commit"]
    pushed = hub_server.list_files("test-user/flaky")
    assert "training_args.bin" in pushed and "README.md" in pushed
    for name in pushed:
        assert token.encode() not in hub_server.read_file("test-user/flaky", name), name
    local = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in local)
    for path in local:
        assert token.encode() not in path.read_bytes(), path
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.hub_model_id == "test-user/flaky"  # the rest of the config is kept


def test_pushed_card_takes_dataset_name_and_license_from_push_kwargs(hub_server, hub_env, tmp_path):
    kwargs = {"dataset_name": "fashion_mnist", "license": "apache-2.0"}
    result = _script(TESTS / "_flaky_push.py", [str(tmp_path / "out"), "--push-kwargs", json.dumps(kwargs)],
                     hub_env, timeout=240)
    assert result["error"] is None
    card = ModelCard(hub_server.read_file("test-user/flaky", "README.md").decode())
    assert card.data.license == "apache-2.0" and card.data.datasets == ["fashion_mnist"]
    assert card.text.splitlines()[card.text.splitlines().index("# flaky")] == "# flaky"  # title from the repo id
    assert "- Data set: fashion_mnist" in card.text and str(tmp_path) not in card.text


# ------------------------------------------------------------------------------ examples/finetune.py
def test_finetune_example_linear_probe_on_published_timm_checkpoint_without_hf_vcreg(published, tmp_path):
    out = tmp_path / "probe"
    args = ["--model_name_or_path", "test-user/vcreg-timm_resnet", "--dataset_name", "sklearn-digits",
            "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "2", "--linear_probe",
            "--per_device_train_batch_size", "8", "--max_eval_samples", "16", "--report_to", "none", "--use_cpu",
            "--disable_tqdm", "True"]
    assert _script(TESTS / "_finetune_blocked.py", args, published["env"], timeout=300) == []
    trained = safetensors.torch.load_file(str(published["work"] / "timm_resnet_trained.safetensors"))
    tuned = safetensors.torch.load_file(str(out / "model.safetensors"))
    tuned = {k.removeprefix("timm_model."): v for k, v in tuned.items()}
    backbone = [k for k in trained if not k.startswith("fc.")]
    assert all(torch.equal(tuned[k], trained[k]) for k in backbone)  # weights AND BatchNorm statistics frozen
    assert tuned["fc.weight"].shape == (10, 64)  # new 10-class digits head, trained
    metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])


# ------------------------------------------------------------------------------ local saving (no Hub)
def _random_batchset(n=8):
    from _downstream_pretrain import random_images

    return random_images(n, 0)


def test_wrapped_timm_model_is_saved_in_timm_format(tmp_path):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig(architecture="resnet18", num_labels=3,
                               model_args={"channels": [8, 16, 32, 64], "stem_width": 8})
    model = TimmWrapperForImageClassification(config)
    args = VCRegConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                       use_cpu=True, remove_unused_columns=False, disable_tqdm=True, save_strategy="no")
    trainer = VCRegTrainer(model=model, args=args, train_dataset=_random_batchset())
    trainer.train()
    trainer.save_model()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architecture"] == "resnet18" and "pretrained_cfg" in saved and "model_type" not in saved
    assert "num_classes" not in saved.get("model_args", {})
    weights = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert not [k for k in weights if k.startswith("timm_model.")]
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    live = model.timm_model.state_dict()
    assert reloaded.state_dict().keys() == live.keys()
    assert all(torch.equal(v, live[k]) for k, v in reloaded.state_dict().items())
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "timm"


def test_default_image_processor_follows_the_model_config():
    from _tiny_models import hf_convnext, hf_vit

    vit = publishing.default_image_processor(hf_vit().config)
    assert (vit.size.height, vit.size.width) == (32, 32)
    convnext_config = hf_convnext().config
    convnext_config.image_size = 64
    convnext = publishing.default_image_processor(convnext_config)
    assert convnext.size.shortest_edge == 64


def test_final_metrics_takes_the_last_logged_value_of_each_key():
    history = [{"loss": 2.0, "task_loss": 1.9, "step": 1}, {"eval_loss": 1.5, "eval_accuracy": 0.25, "step": 1},
               {"loss": 1.0, "vcreg/variance": 0.3, "step": 2}, {"train_loss": 1.5, "step": 2}]
    metrics = publishing.final_metrics(history)
    assert [(k, v, s) for k, _, v, s in metrics["train"]] == [("loss", 1.0, 2), ("task_loss", 1.9, 1),
                                                              ("vcreg/variance", 0.3, 2)]
    assert [(k, v) for k, _, v, _ in metrics["eval"]] == [("eval_loss", 1.5), ("eval_accuracy", 0.25)]


def test_card_template_ships_inside_the_package():
    from importlib import resources

    template = resources.files("hf_vcreg") / "model_cards" / publishing.CARD_TEMPLATE
    assert template.is_file() and "{{ card_data }}" in template.read_text()


def test_card_tables_render_every_value_exactly_in_github_markdown():
    """Floats in their shortest round-trip form; strings in code spans whose pipes are escaped (GFM tables)."""
    markdown_it = pytest.importorskip("markdown_it")
    hparams = {"vcreg_alpha": 0.0123456789, "vcreg_eps": 1e-06, "vcreg_delta": None, "vcreg_max_rows": 16,
               "vcreg_layers": r"vit\.layers\.(3|7|11), head\|x", "vcreg_distributed_stats": False,
               "odd": "`quoted` ", "learning_rate": np.float64(0.1) / 3}
    card = publishing.render_model_card(repo_id="user/m", library_name="transformers", vcreg_hparams=hparams,
                                        layer_names=[], architecture="x", log_history=[{"loss": 1 / 3, "step": 1}])
    assert "| `vcreg_alpha` | 0.0123456789 |" in card.text and "| `vcreg_eps` | 1e-06 |" in card.text
    assert r"| `vcreg_layers` | `vit\.layers\.(3\|7\|11), head\\|x` |" in card.text
    assert "| train | loss (task + VCReg) | `loss` | 0.333333 | 1 |" in card.text  # metrics: 6 digits
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(card.text)
    cells = dict(re.findall(r"<tr>\s*<td><code>(\w+)</code></td>\s*<td>(.*?)</td>\s*</tr>", html, re.S))
    shown = {k: v.removeprefix("<code>").removesuffix("</code>") for k, v in cells.items() if k in hparams}
    expected = {k: v if isinstance(v, str) else str(v) for k, v in hparams.items()}
    expected["learning_rate"] = repr(float(hparams["learning_rate"]))
    assert shown == expected
    assert float(shown["vcreg_alpha"]) == 0.0123456789 and float(shown["learning_rate"]) == np.float64(0.1) / 3


# ------------------------------------------------------------------------------ the card of a local save
def test_local_card_has_a_model_title_no_absolute_path_base_model_and_the_homepage(tmp_path):
    from markdown_it import MarkdownIt

    from _tiny_models import hf_vit

    model = hf_vit()
    model.config._name_or_path = "google/vit-base-patch16-224"  # what from_pretrained("<hub id>") records
    out = tmp_path / "vcreg"
    args = VCRegConfig(output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = VCRegTrainer(model=model, args=args)
    trainer.create_model_card(dataset="Fashion-MNIST", license="mit")
    trainer.save_model()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "google/vit-base-patch16-224" and card.data.license == "mit"
    lines = card.text.splitlines()
    assert "# vit-base-patch16-224 pretrained with VCReg" in lines and "# vcreg" not in lines
    assert str(tmp_path) not in card.content and "<path-or-repo-id>" in card.text
    assert "--model_name_or_path <path-or-repo-id>" in card.text
    assert "- Data set: Fashion-MNIST" in card.text and "not recorded" not in card.text
    assert "[hf_vcreg](https://github.com/hf-vcreg/hf_vcreg)" in card.text
    html = MarkdownIt("commonmark").enable("table").render(card.text)
    assert '<a href="https://github.com/hf-vcreg/hf_vcreg">hf_vcreg</a>' in html and "<table>" in html

    plain = VCRegTrainer(model=hf_vit(), args=VCRegConfig(output_dir=str(tmp_path / "plain"), report_to=[],
                                                          use_cpu=True))
    card = publishing.model_card_from_trainer(plain)
    assert card.data.base_model is None  # built from a config: no Hub checkpoint to name
    assert "# ViTForImageClassification pretrained with VCReg" in card.text.splitlines()


def test_homepage_matches_pyproject():
    import tomllib

    urls = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Homepage"] == publishing.HOMEPAGE == "https://github.com/hf-vcreg/hf_vcreg"
