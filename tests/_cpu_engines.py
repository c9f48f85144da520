"""Let accelerate's FSDP and DeepSpeed code paths run on CPU processes (gloo), for the multi-process tests.

accelerate (1.15) runs these engines only on accelerators, and on a CPU machine it drops them without a word:

* FSDP: ``AcceleratorState`` keeps ``distributed_type = MULTI_CPU`` and ignores the ``fsdp_plugin`` (only the
  ``MULTI_GPU``-like types become ``FSDP``), so ``Trainer(fsdp=True)`` trains with DDP;
* DeepSpeed: ``PartialState`` picks no backend without a GPU unless ``use_cpu=True``, and ``use_cpu=True`` turns
  DeepSpeed off; without a backend the Trainer sees one process while DeepSpeed's engine sees two (every rank
  then trains on the same batches).

:func:`enable` makes the two choices a GPU machine makes (``FSDP`` with the given plugin; the ``gloo`` backend for
DeepSpeed's CPU accelerator). Everything after that choice is the real code: ``fully_shard`` and DTensor state
dicts, FSDP and DeepSpeed checkpoints, ZeRO-3's partitioned parameters and hooks.

Run a script with them enabled (what the ``accelerate launch`` test does)::

    accelerate launch --config_file fsdp2.yaml tests/_cpu_engines.py examples/pretrain.py --max_steps 2 ...
"""

from __future__ import annotations

import os
import runpy
import sys

_ENABLED = False


def enable() -> None:
    """Patch ``AcceleratorState.__init__`` and ``PartialState._prepare_backend`` (idempotent)."""
    global _ENABLED
    if _ENABLED:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state_init = AcceleratorState.__init__
    prepare_backend = PartialState._prepare_backend

    def init(self, *args, fsdp_plugin=None, **kwargs):
        state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as AcceleratorState does

    def backend(self, cpu=False, sagemaker_dp=False, backend=None):
        name, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if name is None and not cpu and deepspeed and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return name, kind

    AcceleratorState.__init__ = init
    PartialState._prepare_backend = backend
    _ENABLED = True


if __name__ == "__main__":
    enable()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
