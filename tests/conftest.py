"""Shared pytest fixtures for the hf_vcreg test-suite.

Each section below belongs to one area; add new fixtures in a section of their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # so that `import hub_server` works whatever pytest's import mode
    sys.path.insert(0, _TESTS_DIR)


# ========================================================================================================
# Hub test server (tests/hub_server.py) -- fixtures: hub_server, hub_env
#
# huggingface_hub reads HF_ENDPOINT / HF_HUB_DISABLE_XET / HF_HOME / HF_HUB_OFFLINE when it is first
# IMPORTED, and this test process has usually imported it already (hf_vcreg -> transformers). So run the
# client code that must talk to the server in a subprocess started with `hub_env` (a script under tests/),
# never in the test process itself.
# ========================================================================================================


@pytest.fixture
def hub_server(tmp_path):
    """A fresh Hub-compatible server on 127.0.0.1 (random port), storage under ``tmp_path/"hub_storage"``.

    Yields a started :class:`hub_server.HubServer`; stopped at teardown. See tests/hub_server.py for its
    API (``url``, ``fail_next``, ``stop``/``start``, ``branch_head``, ``read_file``, ``requests_to``, ...).
    """
    from hub_server import HubServer

    with HubServer(root=tmp_path / "hub_storage") as server:
        yield server


@pytest.fixture
def hub_env(hub_server, tmp_path) -> dict[str, str]:
    """Environment for a client subprocess of ``hub_server``.

    ``HF_ENDPOINT`` = server URL, ``HF_TOKEN=hf_test_token`` (user ``test-user``), ``HF_HUB_DISABLE_XET=1``,
    ``HF_HOME``/``HF_HUB_CACHE``/``HF_XET_CACHE`` under ``tmp_path/"hf_home"``, offline/staging variables
    removed, telemetry/progress bars/update checks off, ``NO_PROXY`` covering 127.0.0.1. A copy: tests may
    edit it.
    """
    return hub_server.client_env(hf_home=tmp_path / "hf_home")


# ======================================== end of Hub test server ========================================
