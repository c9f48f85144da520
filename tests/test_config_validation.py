"""Configuration: every invalid ``vcreg_*`` value is refused when the config (or the trainer) is built, with a
message naming the field and the fix, whichever way the config arrives: ``VCRegConfig(...)``, the command line
(``HfArgumentParser.parse_args_into_dataclasses``) or a JSON file (``parse_json_file``). And the config saved
with a run (``training_args.bin``, the model card's table) reproduces the run.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from _kill_train import config, max_weight_diff, trainer, weights
from _tiny_models import build
from torch import nn
from transformers import HfArgumentParser, TrainingArguments

from hf_vcreg import VCRegConfig, VCRegTrainer

# (field, bad value, what the message must say besides "<field>=<value> is invalid")
INVALID = [
    ("vcreg_alpha", -0.1, r"finite number >= 0"),
    ("vcreg_alpha", math.nan, r"finite number >= 0"),
    ("vcreg_alpha", math.inf, r"finite number >= 0"),
    ("vcreg_beta", -1.0, r"finite number >= 0"),
    ("vcreg_beta", -math.inf, r"finite number >= 0"),
    ("vcreg_gamma", 0.0, r"finite number > 0"),
    ("vcreg_gamma", math.inf, r"finite number > 0"),
    ("vcreg_eps", 0.0, r"finite number > 0"),
    ("vcreg_eps", -1e-4, r"finite number > 0"),
    ("vcreg_eps", math.nan, r"finite number > 0"),
    ("vcreg_delta", 0.0, r"finite number > 0, or leave it unset"),
    ("vcreg_delta", -0.5, r"finite number > 0, or leave it unset"),
    ("vcreg_delta", math.nan, r"finite number > 0, or leave it unset"),
    ("vcreg_delta", math.inf, r"finite number > 0, or leave it unset"),
    ("vcreg_max_rows", 1, r"integer >= 2"),
    ("vcreg_max_rows", 0, r"integer >= 2"),
    ("vcreg_max_rows", -5, r"integer >= 2"),
    ("vcreg_layers", "", r"'blocks', 'stages', 'last', a list of module-name regular expressions"),
    ("vcreg_layers", " , ", r"'blocks', 'stages', 'last', a list of module-name regular expressions"),
    ("vcreg_layers", "blocks, layer1", r"the keyword 'blocks' cannot be combined with other entries"),
    ("vcreg_layers", r"vit\.layers\.(3", r"not a valid regular expression.*escape"),
    ("vcreg_layers", r"blocks\.[0", r"not a valid regular expression.*escape"),
    ("vcreg_layers", r"a, *b", r"'\*b' is not a valid regular expression"),
    ("vcreg_layer_reduction", "max", r"'mean' or 'sum'"),
    ("vcreg_implementation", "fast", r"'gradient' .* or 'loss'"),
]
# Values only a dict / JSON file can carry (the command line converts or refuses them itself).
INVALID_TYPES = [
    ("vcreg_alpha", "0.1", r"finite number >= 0"),
    ("vcreg_alpha", True, r"finite number >= 0"),
    ("vcreg_delta", "0.5", r"finite number > 0"),
    ("vcreg_max_rows", 2.5, r"integer >= 2"),
    ("vcreg_max_rows", True, r"integer >= 2"),
    ("vcreg_layers", 3, r"'blocks', 'stages', 'last'"),
    ("vcreg_layers", ["layer1", 3], r"every entry a non-empty string"),
    ("vcreg_layers", ["layer1", ""], r"every entry a non-empty string"),
    ("vcreg_distributed_stats", "false", r"use a bool: true or false"),  # truthy: would turn the all-reduce on
    ("vcreg_distributed_stats", 0, r"use a bool: true or false"),
    ("vcreg_distributed_stats", None, r"use a bool: true or false"),
    ("vcreg_log_per_layer", "true", r"use a bool: true or false"),
    ("vcreg_log_per_layer", 1, r"use a bool: true or false"),
    ("vcreg_monitor_only", "false", r"use a bool: true or false"),
    ("vcreg_monitor_only", 0, r"use a bool: true or false"),
]


def _message(field, value, fix):
    return rf"^{field}={re.escape(repr(value))} is invalid: .*{fix}"


def _ids(cases):
    return [f"{f}={v!r}" for f, v, _ in cases]


@pytest.mark.parametrize("field,value,fix", INVALID + INVALID_TYPES, ids=_ids(INVALID + INVALID_TYPES))
def test_invalid_value_is_refused_by_the_constructor(tmp_path, field, value, fix):
    with pytest.raises(ValueError, match=_message(field, value, fix)):
        VCRegConfig(output_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("field,value,fix", INVALID + INVALID_TYPES, ids=_ids(INVALID + INVALID_TYPES))
def test_invalid_value_is_refused_from_a_json_file(tmp_path, field, value, fix):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), field: value}))  # NaN / Infinity: Python's JSON
    with pytest.raises(ValueError, match=_message(field, value, fix)):
        HfArgumentParser(VCRegConfig).parse_json_file(str(path))


CHOICE_FIELDS = {"vcreg_layer_reduction": "mean, sum", "vcreg_implementation": "gradient, loss"}


@pytest.mark.parametrize("field,value,fix", INVALID, ids=_ids(INVALID))
def test_invalid_value_is_refused_on_the_command_line(tmp_path, capsys, field, value, fix):
    argv = ["--output_dir", str(tmp_path), f"--{field}={value}"]  # "=": "-inf" is a value, not an option
    parser = HfArgumentParser(VCRegConfig)
    if field in CHOICE_FIELDS:  # argparse refuses a Literal's unknown value itself, listing the choices
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args_into_dataclasses(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert re.search(rf"argument --{field}(/--[\w-]+)?: invalid choice: '{value}'", err), err
        assert all(choice in err for choice in CHOICE_FIELDS[field].split(", "))
        return
    expected = float(value) if isinstance(value, float) else value  # argparse hands the parsed type on
    with pytest.raises(ValueError, match=_message(field, expected, fix)):
        parser.parse_args_into_dataclasses(argv)


def test_command_line_refuses_a_non_integer_row_cap_and_unknown_json_keys(tmp_path, capsys):
    parser = HfArgumentParser(VCRegConfig)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--vcreg_max_rows", "2.5"])
    assert re.search(r"argument --vcreg_max_rows(/--[\w-]+)?: invalid int value: '2.5'", capsys.readouterr().err)
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "vcreg_alpah": 0.1}))  # a typo must not pass silently
    with pytest.raises(ValueError, match=r"vcreg_alpah"):
        parser.parse_json_file(str(path))


@pytest.mark.parametrize("field", ["vcreg_distributed_stats", "vcreg_log_per_layer", "vcreg_monitor_only"])
def test_bool_fields_refuse_numpy_bools_and_the_command_line_converts_or_refuses_strings(tmp_path, capsys, field):
    import numpy as np

    with pytest.raises(ValueError, match=_message(field, np.True_, "use a bool: true or false")):
        VCRegConfig(output_dir=str(tmp_path), **{field: np.True_})
    parser = HfArgumentParser(VCRegConfig)
    for text, expected in (("false", False), ("False", False), ("0", False), ("true", True), ("1", True)):
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), f"--{field}={text}"])
        assert getattr(args, field) is expected, text
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), f"--{field}"])  # bare flag
    assert getattr(args, field) is True
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses other strings itself, before the config exists
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), f"--{field}=maybe"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"argument --{field}(/--[\w-]+)?: Truthy value expected: got maybe", err), err


def test_valid_values_pass_every_route_unchanged(tmp_path):
    values = dict(
        vcreg_alpha=0.0, vcreg_beta=2.5, vcreg_gamma=0.5, vcreg_eps=1e-6, vcreg_delta=0.25, vcreg_max_rows=2,
        vcreg_layers=r"vit\.layers\.(0|1), classifier", vcreg_layer_reduction="sum", vcreg_implementation="loss",
        vcreg_distributed_stats=True, vcreg_log_per_layer=True, vcreg_monitor_only=True,
    )
    direct = VCRegConfig(output_dir=str(tmp_path), **values).vcreg_dict()
    argv = ["--output_dir", str(tmp_path)]
    argv += [f"--{k}={v}" for k, v in values.items()]
    (cli,) = HfArgumentParser(VCRegConfig).parse_args_into_dataclasses(argv)
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), **values}))
    (from_json,) = HfArgumentParser(VCRegConfig).parse_json_file(str(path))
    assert direct == cli.vcreg_dict() == from_json.vcreg_dict() == values


# --------------------------------------------------------------------------------- refused when the trainer is built
def test_pattern_matching_no_module_is_refused_with_the_detected_blocks(tmp_path):
    pattern = r"vit\.layer\.0"  # a 4.x module name: 5.x renamed vit.encoder.layer to vit.layers
    expected = (
        rf"^vcreg_layers={re.escape(repr(pattern))} is invalid: pattern '{re.escape(pattern)}' matches no module.*"
        r"Fix: use 'blocks' \(every detected block\) or a regular expression that matches one of these module names "
        r"in full\. Detected blocks: " + re.escape("['vit.layers.0', 'vit.layers.1']")
    )
    with pytest.raises(ValueError, match=expected):
        trainer("hf_vit", config(tmp_path, vcreg_layers=pattern))


def test_blocks_on_a_model_without_blocks_asks_for_patterns(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"vcreg_layers='blocks': no blocks were detected in Sequential.*regular "
                       r"expressions"):
        VCRegTrainer(model=model, args=config(tmp_path))


def test_distributed_statistics_without_a_process_group_are_refused(tmp_path):
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match=r"vcreg_distributed_stats=True needs a torch.distributed process group.*"
                       r"torchrun.*or set vcreg_distributed_stats=False"):
        trainer("hf_resnet", config(tmp_path, vcreg_distributed_stats=True))


def test_a_config_changed_after_construction_is_checked_again_by_the_trainer(tmp_path):
    args = config(tmp_path)
    args.vcreg_max_rows = 1
    with pytest.raises(ValueError, match=_message("vcreg_max_rows", 1, "integer >= 2")):
        trainer("hf_resnet", args)


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"args must be a VCRegConfig, got TrainingArguments"):
        VCRegTrainer(model=nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path)))


# --------------------------------------------------------------------------------------- the saved config reproduces
def _card_value(cell: str):
    """A card cell back to its value: a code span is a string (GFM: ``\\|`` is ``|``), else None/bool/int/float."""
    span = re.fullmatch(r"(`+)( ?)(.*)\2\1", cell)  # a longer fence / padding spaces when the text needs them
    if span:
        return span[3].replace("\\|", "|")
    if cell in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[cell]
    return int(cell) if re.fullmatch(r"-?\d+", cell) else float(cell)


def _card_vcreg_table(card: str) -> dict:
    """The card's ``vcreg_*`` rows, split into cells the way GFM does (a pipe after a backslash is text)."""
    table = {}
    for row in card.splitlines():
        if row.startswith("| `vcreg_"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]
            assert len(cells) == 2, f"row does not have 2 cells in GFM: {row}"
            table[cells[0].strip("`")] = _card_value(cells[1])
    return table


def test_training_args_bin_and_model_card_reproduce_the_run(tmp_path):
    vcreg = dict(
        vcreg_alpha=0.0123456789, vcreg_beta=0.7, vcreg_gamma=0.8, vcreg_eps=2e-4, vcreg_delta=0.05, vcreg_max_rows=16,
        vcreg_layers=r"resnet\.encoder\.stages\.(0|1)", vcreg_layer_reduction="sum", vcreg_implementation="loss",
        vcreg_log_per_layer=True,
    )
    a = trainer("hf_resnet", config(tmp_path / "a", max_steps=4, save_steps=4, **vcreg))
    a.train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    saved = torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert type(saved) is VCRegConfig and saved.vcreg_dict() == a.args.vcreg_dict()
    assert {k: v for k, v in saved.vcreg_dict().items() if k in vcreg} == vcreg
    # Rebuild the trainer from the saved config alone (same initial model): the same run, the same weights.
    saved.output_dir = str(tmp_path / "b")
    b = trainer("hf_resnet", saved)
    b.train()
    assert max_weight_diff(weights(a.model), weights(b.model)) <= 1e-6
    assert b.state.log_history[-2]["vcreg/penalty"] == a.state.log_history[-2]["vcreg/penalty"]
    # The model card lists every vcreg_* field; its values rebuild the same VCReg configuration, exactly.
    card = (checkpoint / "README.md").read_text()
    assert "| `vcreg_alpha` | 0.0123456789 |" in card
    assert r"| `vcreg_layers` | `resnet\.encoder\.stages\.(0\|1)` |" in card  # backslashes kept, the pipe escaped
    from_card = _card_vcreg_table(card)
    assert from_card == a.args.vcreg_dict()
    assert VCRegConfig(output_dir=str(tmp_path / "c"), **from_card).vcreg_dict() == a.args.vcreg_dict()


# Which model family of the evidence protocol (benchmarks/evidence, selection.json's "families") stands for each
# library family of RECOMMENDED.
EVIDENCE_FAMILY = {"cnn": "cnn", "transformer": "vit"}


def test_recommended_defaults_are_the_committed_selection():
    """RECOMMENDED holds, per family, the (alpha, beta) and the placement that the committed evidence suite chose,
    and the placement's keyword selects, on the suite's own model, exactly the modules the suite regularised."""
    from pathlib import Path

    from benchmarks.evidence.models import FAMILIES as EVIDENCE_MODELS
    from hf_vcreg.capture import select_layers
    from hf_vcreg.config import RECOMMENDED

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/evidence/selection.json"
    families = json.loads(path.read_text())["families"]
    assert set(EVIDENCE_FAMILY) == set(RECOMMENDED)
    for family, source in EVIDENCE_FAMILY.items():
        chosen = families[source]
        assert {k: RECOMMENDED[family][k] for k in ("vcreg_alpha", "vcreg_beta", "vcreg_layers")} == {
            "vcreg_alpha": chosen["vcreg_alpha"], "vcreg_beta": chosen["vcreg_beta"],
            "vcreg_layers": chosen["placement"]}, family
        model = EVIDENCE_MODELS[source].build(10, 0)
        assert select_layers(model, RECOMMENDED[family]["vcreg_layers"]) == chosen["layers"], family


def test_layer_patterns_pass_as_a_list_from_python_the_command_line_and_json(tmp_path):
    """Quantifiers with commas stay whole; several patterns arrive as a list; the config still serialises."""
    import pickle

    patterns = [r"vit\.layers\.[0-9]{1,2}", r"vit\.layernorm"]
    direct = VCRegConfig(output_dir=str(tmp_path), vcreg_layers=patterns)
    (cli,) = HfArgumentParser(VCRegConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--vcreg_layers", *patterns])
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "vcreg_layers": patterns}))
    (from_json,) = HfArgumentParser(VCRegConfig).parse_json_file(str(path))
    assert direct.vcreg_layers == cli.vcreg_layers == from_json.vcreg_layers == patterns
    (one,) = HfArgumentParser(VCRegConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--vcreg_layers", patterns[0]])
    assert one.vcreg_layers == patterns[0]  # one value: the same string as from Python
    (default,) = HfArgumentParser(VCRegConfig).parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert default.vcreg_layers is None is VCRegConfig(output_dir=str(tmp_path)).vcreg_layers  # recommended
    assert json.loads(direct.to_json_string())["vcreg_layers"] == patterns
    assert pickle.loads(pickle.dumps(direct)).vcreg_layers == patterns
    model = build("hf_vit")
    t = VCRegTrainer(model=model, args=config(tmp_path / "t", vcreg_layers=patterns, max_steps=1))
    assert t.vcreg_layer_names == ["vit.layers.0", "vit.layers.1", "vit.layernorm"]
    t = VCRegTrainer(model=model, args=config(tmp_path / "s", vcreg_layers=r"vit\.layers\.[0-9]{1,2}", max_steps=1))
    assert t.vcreg_layer_names == ["vit.layers.0", "vit.layers.1"]
