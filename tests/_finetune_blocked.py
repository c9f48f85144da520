"""Subprocess helper of tests/test_publishing.py: run ``examples/finetune.py`` where hf_vcreg cannot be imported.

``python _finetune_blocked.py ARG ...``, with the Hub test server's environment: installs the import blocker of
``_downstream_load.py``, runs ``examples/finetune.py ARG ...`` as ``__main__`` and prints ``RESULT:`` and the sorted
names of the hf_vcreg modules that got imported (none, if the example does not need hf_vcreg).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import _downstream_load  # installs the hf_vcreg import blocker

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"

if __name__ == "__main__":
    assert _downstream_load.HF_VCREG_BLOCKED
    sys.argv = [EXAMPLE.name, *sys.argv[1:]]
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    print("RESULT:" + json.dumps(sorted(m for m in sys.modules if m.startswith("hf_vcreg"))), flush=True)
