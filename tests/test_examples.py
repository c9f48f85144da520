"""examples/pretrain.py, the main command, at tiny size: config errors before training, the table and
summary.json, the saved checkpoints, and the script defaults seen by --help and by JSON configs."""

import json
import re

import numpy as np
import pytest
from _examples import load_example
import torch

from hf_vcreg.config import RECOMMENDED
TINY = ["--seeds", "0", "--max_train_samples", "64", "--max_eval_samples", "40", "--num_train_epochs", "1",
        "--per_device_train_batch_size", "32", "--image_size", "16", "--use_cpu", "true", "--torch_threads", "1", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the main command (1 seed, baseline + VCReg, hierarchical probe) with its console output."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("pretrain")
    pretrain = load_example("pretrain")
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(stdout):
        summary = pretrain.main(["--output_dir", str(out), *TINY])
    return {"out": out, "summary": summary, "stdout": stdout.getvalue(), "pretrain": pretrain,
            "threads": (threads, torch.get_num_threads())}


def test_main_leaves_the_callers_thread_count(tiny_run):
    """main() sets --torch_threads (1 here) for its runs and restores the caller's count: in-process callers (this
    test session) keep their floating-point summation order."""
    before, after = tiny_run["threads"]
    assert tiny_run["summary"]["torch_threads"] == 1 and after == before


def test_summary_holds_both_runs_statistics_and_paired_deltas(tiny_run):
    summary = tiny_run["summary"]
    assert set(summary["runs"]) == {"baseline", "vcreg"}
    for run in ("baseline", "vcreg"):
        stats = summary["runs"][run]
        assert set(stats) == {"source_accuracy", "transfer_accuracy", "variance", "covariance"}
        for key in ("source_accuracy", "transfer_accuracy"):
            assert len(stats[key]["per_seed"]) == 1 and 0.0 <= stats[key]["mean"] <= 1.0 and stats[key]["std"] == 0.0
        # the baseline's statistics come from vcreg_monitor_only: logged, never "-"
        assert stats["variance"]["mean"] >= 0.0 and stats["covariance"]["mean"] > 0.0
    per_seed = summary["per_seed"]
    for key in ("source_accuracy", "transfer_accuracy"):
        delta = summary["paired_delta"][key]
        assert delta["seeds"] == ["0"]
        assert delta["per_seed"] == [per_seed["vcreg"]["0"][key] - per_seed["baseline"]["0"][key]]
        assert delta["ahead"] == int(delta["per_seed"][0] > 0)
    # VCReg at the library's per-family defaults, read from the trainer (the tiny ResNet is a CNN)
    assert summary["vcreg"]["family"] == "cnn"
    assert {k: summary["vcreg"][k] for k in ("vcreg_alpha", "vcreg_beta", "vcreg_layers")} == RECOMMENDED["cnn"]
    assert summary["vcreg"]["source"] == "per-family default for a cnn model"
    assert summary["vcreg"]["layers"] == (1 if RECOMMENDED["cnn"]["vcreg_layers"] == "last" else 8)
    # the hierarchical target: pretrained on the 4 superclasses, probed on the 10 classes
    assert summary["transfer"].startswith("the 10 classes from the 4-superclass model")
    assert summary["train_size"] == 64 and summary["test_size"] == 40 and summary["seeds"] == ["0"]
    assert per_seed["baseline"]["0"]["steps"] == per_seed["vcreg"]["0"]["steps"] == 2
    assert json.loads((tiny_run["out"] / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # what the README's generated demo block and its test read
    ahead = summary["paired_delta"]["transfer_accuracy"]["ahead"]
    assert summary["conclusion"] == {"vcreg_ahead_on_transfer": ahead == 1, "seeds_ahead": ahead, "seeds": 1,
                                     "transfer_delta_pts": 100 * summary["paired_delta"]["transfer_accuracy"]["mean"]}
    run = summary["run"]
    assert run["command"].startswith("python examples/pretrain.py --output_dir ") and run["threads"] == 1
    assert run["wall_s"] == summary["wall_time_s"] > 0 and run["date"].endswith("+00:00")
    assert run["commit"] is None or re.fullmatch(r"[0-9a-f]{7,}", run["commit"])


def test_console_is_one_table_a_reading_and_the_next_step(tiny_run):
    text = tiny_run["stdout"]
    assert "{'loss'" not in text and "'learning_rate'" not in text  # no per-step log dicts on the console
    lines = text.strip().splitlines()
    assert lines[0].startswith("hf_vcreg pretrain: resnet on Fashion-MNIST (64 train / 40 test images, 1 epochs)")
    cnn = RECOMMENDED["cnn"]
    assert lines[1].startswith(f"VCReg: vcreg_alpha={cnn['vcreg_alpha']}, vcreg_beta={cnn['vcreg_beta']} (per-family "
                               f"default for a cnn model), vcreg_layers={cnn['vcreg_layers']!r}")
    table = [line for line in lines if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in table] == ["run", "---", "baseline", "vcreg",
                                                            "Δ vcreg − baseline, seeds 0 (pts)"]
    base = tiny_run["summary"]["runs"]["baseline"]
    assert f"| baseline | {100 * base['source_accuracy']['mean']:.1f} ± 0.0 | " in text
    reading = next(line for line in lines if line.startswith("Reading: "))
    ahead = tiny_run["summary"]["paired_delta"]["transfer_accuracy"]["ahead"]
    verdict = "on every seed" if ahead else "on no seed"
    assert reading.startswith(f"Reading: VCReg ahead on transfer on {ahead}/1 seeds ({verdict}; Δ ")
    assert f"Saved: 2 final models in {tiny_run['out']}/<run>-seed<k>/" in text
    assert any(line.startswith("Next: publish: trainer.push_to_hub()") and "examples/finetune.py" in line
               for line in lines)
    assert (tiny_run["out"] / "summary.md").read_text().strip() == text.strip()


def test_default_run_leaves_loadable_checkpoints_with_their_preprocessing(tiny_run):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = tiny_run["out"]
    assert tiny_run["summary"]["saved"] == [str(out / "baseline-seed0"), str(out / "vcreg-seed0")]
    for run in ("baseline", "vcreg"):
        folder = out / f"{run}-seed0"
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                "trainer_state.json", "eval_results.json"} <= {p.name for p in folder.iterdir()}
        model = AutoModelForImageClassification.from_pretrained(str(folder))
        processor = AutoImageProcessor.from_pretrained(str(folder))
        assert processor.size["shortest_edge"] == 16 and list(processor.image_mean) == [0.5] * 3
        pixels = processor([np.zeros((28, 28, 3), np.uint8)], return_tensors="pt")["pixel_values"]
        assert tuple(pixels.shape) == (1, 3, 16, 16)
        assert model(pixel_values=pixels).logits.shape == (1, 4)  # the 4 superclasses
        state = json.loads((folder / "trainer_state.json").read_text())
        steps = [entry for entry in state["log_history"] if "loss" in entry]  # the per-step logs are in the folder
        assert [entry["step"] for entry in steps] == [1, 2]
        assert all(entry["vcreg/variance"] >= 0 and entry["vcreg/covariance"] > 0 for entry in steps)
        card = (folder / "README.md").read_text()
        assert "Data set: Fashion-MNIST" in card and str(out) not in card  # no local absolute path in the card


def test_bad_vcreg_layers_exits_2_before_any_training(tmp_path, capsys):
    pretrain = load_example("pretrain")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--output_dir", str(tmp_path), *TINY, "--vcreg_layers", "nomatch"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain.py: error: ") and "nomatch" in err[0]
    assert list(tmp_path.rglob("*.safetensors")) == [] and list(tmp_path.rglob("trainer_state.json")) == []
    assert not (tmp_path / "summary.json").exists()


def test_unknown_timm_model_exits_2_with_close_names(tmp_path, capsys):
    pretrain = load_example("pretrain")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--output_dir", str(tmp_path), *TINY, "--model_name", "timm:resnet1800"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretrain.py: error: --model_name 'timm:resnet1800': timm has no model 'resnet1800'; close names:")
    assert "resnet18" in err


@pytest.mark.parametrize("argv, message", [
    (["--runs", "baseline,fancy"], "--runs 'baseline,fancy': unknown run(s) ['fancy']"),
    (["--train_dir", "/no/such/folder", "--transfer", "none"], "--train_dir '/no/such/folder' does not exist"),
    (["--drop_path_rate", "0.1"], "--drop_path_rate 0.1: ResNetConfig has no drop_path_rate"),
    (["--vcreg_alpha", "-1"], "vcreg_alpha"),
    (["--transfer", "imagenet"], "--transfer 'imagenet': use fine_labels, digits or none"),
    (["--dataset_name", "digits"], "--transfer fine_labels needs --dataset_name fashion_mnist"),
])
def test_other_config_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    pretrain = load_example("pretrain")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--output_dir", str(tmp_path), *TINY, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_help_and_json_configs_see_the_script_defaults(tmp_path):
    pretrain = load_example("pretrain")
    parser = pretrain.make_parser()
    help_text = " ".join(parser.format_help().split())
    defaults = pretrain.SCRIPT_DEFAULTS
    assert defaults["num_train_epochs"] == 3 and defaults["remove_unused_columns"] is False
    for flag in ("num_train_epochs", "per_device_train_batch_size", "learning_rate", "seeds", "max_train_samples"):
        assert re.search(rf"--{flag} \S+ .*?\(default: {re.escape(str(defaults[flag]))}\)", help_text), flag
    assert "The options that matter first" in help_text and "--vcreg_alpha / --vcreg_beta unset" in help_text

    cli = pretrain.parse(["--output_dir", str(tmp_path)])
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps({"output_dir": str(tmp_path), "seeds": "4", "learning_rate": 0.01}))
    from_json = pretrain.parse([str(config_file)])
    for parsed in (cli, from_json):
        model_args, data_args, config = parsed
        assert config.remove_unused_columns is False and config.num_train_epochs == 3 and config.disable_tqdm
        assert config.per_device_train_batch_size == 256 and data_args.max_train_samples == 20000
        assert config.vcreg_alpha is None and config.vcreg_beta is None  # the per-family defaults apply
    assert cli[0].seeds == "0,1,2" and cli[2].learning_rate == 4e-3
    assert from_json[0].seeds == "4" and from_json[2].learning_rate == 0.01  # the file wins where it speaks


def test_features_are_the_heads_input(tmp_path):
    pretrain = load_example("pretrain")
    model = pretrain.build_model("resnet", 10, 16, {i: str(i) for i in range(10)}, 0.0)
    x = torch.randn(5, 3, 16, 16)
    feats = pretrain.features(model, x, batch_size=2)
    assert model.training  # restored after the eval-mode pass
    with torch.no_grad():
        pooled = model.eval().resnet(x).pooler_output.flatten(1)  # eval mode: BatchNorm running statistics
    np.testing.assert_allclose(feats, pooled.numpy(), rtol=1e-5, atol=1e-6)


def test_timm_model_with_the_augmentation_recipe_trains_and_publishes_its_preprocessing(tmp_path, capsys):
    pretrain = load_example("pretrain")
    summary = pretrain.main(["--output_dir", str(tmp_path), *TINY, "--model_name", "timm:resnet18", "--transfer", "none",
                             "--mixup_alpha", "0.8", "--cutmix_alpha", "1.0", "--auto_augment", "trivial",
                             "--rrc_scale", "0.35", "--hflip", "true", "--label_smoothing_factor", "0.1",
                             "--drop_path_rate", "0.05"])
    assert summary["vcreg"]["family"] == "cnn" and summary["transfer"] == "none"
    assert "transfer_accuracy" not in summary["runs"]["vcreg"]
    for run in ("baseline", "vcreg"):
        folder = tmp_path / f"{run}-seed0"
        state = json.loads((folder / "trainer_state.json").read_text())
        losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        assert len(losses) == 2 and all(np.isfinite(losses)) and min(losses) > 0
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 10
        assert cfg["pretrained_cfg"]["input_size"] == [3, 16, 16] and cfg["pretrained_cfg"]["mean"] == [0.5] * 3
    assert "| Δ vcreg − baseline, seeds 0 (pts) |" in capsys.readouterr().out


def test_train_transform_augments_and_eval_transform_is_the_published_resize():
    import PIL.Image

    pretrain = load_example("pretrain")
    args = pretrain.DataArguments(image_size=16, rrc_scale=0.35, hflip=True, auto_augment="rand")
    image = PIL.Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) % 251)
    torch.manual_seed(0)
    train = pretrain.make_transform(args, train=True)({"image": [image] * 4, "label": [3] * 4})
    evaluate = pretrain.make_transform(args, train=False)({"image": [image] * 2, "label": [3] * 2})
    assert tuple(train["pixel_values"].shape) == (4, 3, 16, 16) and train["labels"].tolist() == [3] * 4
    assert not torch.equal(train["pixel_values"][0], train["pixel_values"][1])  # random per image
    assert torch.equal(evaluate["pixel_values"][0], evaluate["pixel_values"][1])  # deterministic
    assert evaluate["pixel_values"].min() >= -1.0 and evaluate["pixel_values"].max() <= 1.0  # mean = std = 0.5
