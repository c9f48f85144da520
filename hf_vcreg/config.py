"""``VCRegConfig``: ``TrainingArguments`` plus every VCReg knob as a ``vcreg_*`` field.

Parses with ``HfArgumentParser`` from the command line (``--vcreg_alpha 0.1``) and from JSON, like trl's
``SFTConfig``. Invalid values raise ``ValueError`` naming the field and the fix when the config is built.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

from .penalty import VCRegSpec

__all__ = ["RECOMMENDED", "VCRegConfig"]

RECOMMENDED: dict[str, dict[str, Any]] = {
    "cnn": {"vcreg_alpha": 1.0, "vcreg_beta": 1.0, "vcreg_layers": "last"},
    "transformer": {"vcreg_alpha": 0.01, "vcreg_beta": 0.1, "vcreg_layers": "blocks"},
}
"""Recommended ``vcreg_*`` values per model family (:func:`hf_vcreg.family.model_family`: ``"cnn"`` or
``"transformer"``). A field listed here defaults to ``None`` in :class:`VCRegConfig`, which means "this table's
value for the model's family"; the trainer fills it in when it is built (``VCRegTrainer.vcreg_resolved``), and an
explicit value always wins. Every family lists the same fields, and only fields whose ``None`` means "recommended"
belong here (``vcreg_delta`` / ``vcreg_max_rows`` use ``None`` for "off"). The values are the evidence suite's choice
per family (``benchmarks/results/evidence/selection.json``, pinned by ``tests/test_config_validation.py``; how they
were chosen and what they do: ``benchmarks/RESULTS.md``)."""

@dataclass
class VCRegConfig(TrainingArguments):
    r"""Training arguments for :class:`~hf_vcreg.VCRegTrainer`.

    Per regularised layer :math:`l` with sample matrix :math:`Z_l` (every token / spatial position a row), the
    loss is ``task_loss + reduce_l(alpha * V(Z_l) + beta * K(Z_l))`` with the variance and covariance terms
    of :mod:`hf_vcreg.penalty` and ``reduce`` the mean (default) or the sum over layers. Statistics are per
    micro-batch (per device unless ``vcreg_distributed_stats``); with gradient accumulation the update is the
    mean of the per-micro-batch gradients.

    ``vcreg_alpha`` / ``vcreg_beta`` left unset (``None``) take the :data:`RECOMMENDED` value of the model's
    family, resolved by the trainer from the model (``VCRegTrainer.vcreg_family``, ``.vcreg_resolved``); both
    set to 0 is plain training (no hooks). ``vcreg_monitor_only`` logs the statistics without any penalty.
    """

    vcreg_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Coefficient of the variance term V = mean_j relu(gamma - sqrt(Var(z_j) + eps)). >= 0. Unset: "
            "the recommended value for the model's family (hf_vcreg.config.RECOMMENDED: 'cnn' or 'transformer'), "
            "resolved and logged when the trainer is built."
        },
    )
    vcreg_beta: float | None = field(
        default=None,
        metadata={
            "help": "Coefficient of the covariance term K = sum_{i!=j} h(C_ij) / (d (d - 1)). >= 0. Unset: the "
            "recommended value for the model's family (hf_vcreg.config.RECOMMENDED). alpha = beta = 0: plain "
            "training, no hooks."
        },
    )
    vcreg_gamma: float = field(
        default=1.0, metadata={"help": "Target standard deviation of every feature in the variance hinge. > 0."}
    )
    vcreg_eps: float = field(
        default=1e-4, metadata={"help": "Added to each variance under the square root (numerical floor). > 0."}
    )
    vcreg_delta: float | None = field(
        default=None,
        metadata={
            "help": "Huber threshold of the covariance term (the paper's robust 'smooth L1' form): h(c) = c^2 for "
            "|c| <= delta, 2 delta |c| - delta^2 beyond. Unset: plain c^2. > 0."
        },
    )
    # None: the family's RECOMMENDED value (the annotation leaves None out: HfArgumentParser then gives nargs).
    vcreg_layers: list[str] | str = field(
        default=None,
        metadata={
            "help": "Unset: the recommended placement for the model's family (hf_vcreg.config.RECOMMENDED). "
            "Which module outputs to regularise: 'blocks' (every residual / transformer block inside the "
            "stages, found from timm feature_info or transformers hidden_states), 'stages' (every stage / feature "
            "level), 'last' (the final block only), or regular expressions matched in full against module names: "
            "several after the flag (--vcreg_layers 'layer1\\.\\d+' 'layer4'), a list in JSON / Python, or one string "
            "split at its top-level commas (a comma inside {}, [] or () stays in the pattern). See docs/architectures.md."
        },
    )
    vcreg_layer_reduction: Literal["mean", "sum"] = field(
        default="mean", metadata={"help": "How the per-layer penalties are combined: 'mean' or 'sum' over layers."}
    )
    vcreg_implementation: Literal["gradient", "loss"] = field(
        default="gradient",
        metadata={
            "help": "'gradient': identity-forward autograd function whose backward adds the analytic gradient (fast, "
            "the paper's form). 'loss': explicit penalty differentiated by autograd. Both give the same gradient."
        },
    )
    vcreg_max_rows: int | None = field(
        default=None,
        metadata={
            "help": "Cap on the rows (samples = tokens x images) per layer used for the statistics: a random subset, "
            "seeded by (seed, step, micro-batch, layer), with the micro-batches counted apart for training and "
            "evaluation (each evaluation restarts its count), so that resumed runs draw the same rows. Unset: all "
            "rows. >= 2."
        },
    )
    vcreg_distributed_stats: bool = field(
        default=False,
        metadata={
            "help": "Compute the statistics over the global batch of all processes (all-reduce of the count, sum and "
            "centred Z^T Z: O(d^2) traffic per layer). Off: per-device statistics. Needs a process group."
        },
    )
    vcreg_log_per_layer: bool = field(
        default=False, metadata={"help": "Also log the variance and covariance terms of every layer."}
    )
    vcreg_monitor_only: bool = field(
        default=False,
        metadata={
            "help": "Hook the layers and log vcreg/variance, vcreg/covariance and vcreg/skipped_layers (computed "
            "without gradient, same rows, gamma, eps, delta and statistics as the penalty would use), but add "
            "nothing to the loss: training is exactly the plain run's (loss == task_loss; no vcreg/penalty is "
            "logged; vcreg_alpha / vcreg_beta are not applied). For a baseline to set beside a VCReg run."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_vcreg()

    # Credentials never leave the process: the Trainer pickles its args into training_args.bin, which
    # push_to_hub uploads. Pickling drops every ``*_token`` field (hub_token, ...) to None, as ``to_dict`` already
    # redacts them; a resumed run reads the token from HF_TOKEN / the login cache again. Copies keep them.
    def __getstate__(self) -> dict[str, Any]:
        return {k: None if k.endswith("_token") else v for k, v in self.__dict__.items()}

    def __copy__(self) -> VCRegConfig:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> VCRegConfig:
        import copy

        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _validate_vcreg(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is invalid: {fix}")

        def number(value) -> bool:  # JSON / dict values arrive unconverted: "0.1" and true are not numbers
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("vcreg_alpha", "vcreg_beta"):
            value = getattr(self, name)
            if value is not None and (not number(value) or value < 0):
                raise bad(name, "use a finite number >= 0 (0 turns the term off), or leave it unset for the "
                          "recommended value of the model's family.")
        for name in ("vcreg_gamma", "vcreg_eps"):
            value = getattr(self, name)
            if not number(value) or value <= 0:
                raise bad(name, "use a finite number > 0.")
        if self.vcreg_delta is not None and (not number(self.vcreg_delta) or self.vcreg_delta <= 0):
            raise bad("vcreg_delta", "use a finite number > 0, or leave it unset for the plain squared covariance.")
        if self.vcreg_layer_reduction not in ("mean", "sum"):
            raise bad("vcreg_layer_reduction", "use 'mean' or 'sum'.")
        if self.vcreg_implementation not in ("gradient", "loss"):
            raise bad("vcreg_implementation", "use 'gradient' (fast, analytic backward) or 'loss' (autograd).")
        if self.vcreg_max_rows is not None and (
            isinstance(self.vcreg_max_rows, bool) or not isinstance(self.vcreg_max_rows, int) or self.vcreg_max_rows < 2
        ):
            raise bad("vcreg_max_rows", "use an integer >= 2 (a covariance needs 2 rows), or leave it unset.")
        for name in ("vcreg_distributed_stats", "vcreg_log_per_layer", "vcreg_monitor_only"):  # JSON "false" / 0 would be truthy
            if type(getattr(self, name)) is not bool:
                raise bad(name, "use a bool: true or false (True / False in Python); strings such as 'false', "
                          "numbers such as 0 and numpy bools are refused.")
        from .capture import KEYWORDS, split_patterns  # capture imports torch only; kept local to this check

        layers = self.vcreg_layers
        if layers is None:  # the family's recommended placement, resolved by the trainer
            return
        if isinstance(layers, (list, tuple)) and len(layers) == 1:  # the command line's one value: as from Python
            layers = self.vcreg_layers = layers[0]
        elif isinstance(layers, tuple):
            layers = self.vcreg_layers = list(layers)
        entries = [layers] if isinstance(layers, str) else layers if isinstance(layers, list) else [None]
        patterns = split_patterns(layers) if all(isinstance(e, str) and split_patterns(e) for e in entries) else []
        if not patterns:
            raise bad("vcreg_layers", "use 'blocks', 'stages', 'last', a list of module-name regular expressions, or "
                      "one string of comma-separated regular expressions (every entry a non-empty string).")
        keywords = [p for p in patterns if p in KEYWORDS]
        if keywords and len(patterns) > 1:
            raise bad("vcreg_layers", f"the keyword {keywords[0]!r} cannot be combined with other entries: use it "
                      "alone, or name every module with regular expressions.")
        for pattern in patterns if not keywords else []:  # compile now; matching needs the model (trainer)
            try:
                re.compile(pattern)
            except re.error as err:
                raise bad(
                    "vcreg_layers", f"{pattern!r} is not a valid regular expression ({err}); escape literal dots "
                    "and brackets, e.g. 'vit\\.layers\\.(3|7)'."
                ) from err

    @property
    def vcreg_enabled(self) -> bool:
        """False when the config alone turns VCReg off: both coefficients set to 0 and ``vcreg_monitor_only`` off.

        The trainer then selects no layers and installs no hooks. An unset coefficient counts as on here; the
        trainer decides with the model's family (``VCRegTrainer.vcreg_resolved``), and installs no hooks either
        when the resolved coefficients are both 0.
        """
        if self.vcreg_monitor_only:
            return True
        return any(value is None or value > 0 for value in (self.vcreg_alpha, self.vcreg_beta))

    def vcreg_recommended_fields(self) -> list[str]:
        """Names of the fields left unset (``None``) that take their family's :data:`RECOMMENDED` value."""
        fields = RECOMMENDED[next(iter(RECOMMENDED))]
        return [name for name in fields if getattr(self, name) is None]

    def vcreg_dict(self, family: str | None = None) -> dict:
        """The ``vcreg_*`` fields as a plain dict (for model cards and logs).

        Without ``family``: the fields as set (``None`` for a coefficient left to its family's recommendation).
        With ``family`` (a key of :data:`RECOMMENDED`): those unset fields filled with the family's values, i.e.
        the values a trainer uses for a model of that family.
        """
        values = {k: getattr(self, k) for k in self.__dataclass_fields__ if k.startswith("vcreg_")}
        if family is not None:
            if family not in RECOMMENDED:
                raise ValueError(f"family={family!r} is unknown: use one of {sorted(RECOMMENDED)}.")
            values.update({k: RECOMMENDED[family][k] for k in self.vcreg_recommended_fields()})
        return values

    def _validate_checkpointing(self) -> None:
        """Refuse reentrant activation checkpointing: it runs blocks without autograd, dropping the VCReg gradient."""
        # transformers 5.x: activation_checkpointing(_kwargs); gradient_checkpointing(_kwargs) is the old alias.
        enabled = getattr(self, "activation_checkpointing", False) or getattr(self, "gradient_checkpointing", False)
        kwargs = getattr(self, "activation_checkpointing_kwargs", None) or self.gradient_checkpointing_kwargs or {}
        if enabled and kwargs.get("use_reentrant", False):
            raise ValueError(
                "gradient_checkpointing_kwargs={'use_reentrant': True} runs blocks without autograd, which would "
                "silently drop the VCReg gradient. Use gradient_checkpointing_kwargs={'use_reentrant': False}."
            )

    def vcreg_summary(self, family: str, n_layers: int) -> str:
        """One line for the log: the values a trainer uses for a ``family`` model with ``n_layers`` hooked layers
        (0: VCReg off), and which of them are the family's recommendation."""
        resolved, recommended = self.vcreg_dict(family), self.vcreg_recommended_fields()
        if self.vcreg_monitor_only:
            return (f"VCReg monitor-only for a {family} model: logging vcreg/variance and vcreg/covariance of "
                    f"{n_layers} layers without a penalty (vcreg_alpha / vcreg_beta are not applied).")
        keys = ("vcreg_alpha", "vcreg_beta", "vcreg_layers")

        def show(names, note=lambda k: ""):
            return ", ".join(f"{k.removeprefix('vcreg_')}={resolved[k]!r}{note(k)}" for k in names)

        if not n_layers:
            return f"VCReg off for a {family} model ({show(keys[:2])}): plain training, no hooks."
        if len(recommended) == len(keys):
            return (f"VCReg defaults for a {family} model: {show(keys)} (recommended; set vcreg_alpha / vcreg_beta / "
                    "vcreg_layers to override).")
        values = show(keys, lambda k: f" (recommended for {family}; set {k} to override)" if k in recommended
                      else " (set by the user)")
        return f"VCReg for a {family} model: {values}."

    def vcreg_spec(self, alpha: float, beta: float, n_layers: int, world: int) -> VCRegSpec:
        """The penalty's coefficients per layer for the resolved ``alpha`` / ``beta`` and ``n_layers`` hooked layers;
        ``world``: the processes the statistics are global over (the gradient path undoes DDP's averaging)."""
        monitor = self.vcreg_monitor_only  # statistics only: the spec applies no penalty
        return VCRegSpec(
            alpha=0.0 if monitor else alpha,
            beta=0.0 if monitor else beta,
            gamma=self.vcreg_gamma,
            eps=self.vcreg_eps,
            delta=self.vcreg_delta,
            weight=1.0 / n_layers if self.vcreg_layer_reduction == "mean" else 1.0,
            grad_multiplier=float(world) if self.vcreg_implementation == "gradient" else 1.0,
        )
