"""Offline datasets for the benchmarks: re-exported from :mod:`hf_vcreg.data` (shared with ``examples/``)."""

from hf_vcreg.data import *  # noqa: F401,F403
from hf_vcreg.data import __all__  # noqa: F401
