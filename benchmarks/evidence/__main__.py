"""Command line: ``python -m benchmarks.evidence [--quick | --profile NAME] [--out DIR] [--jobs N] [--threads N]
[--models ...] [--experiments ...]`` runs the suite (resuming from ``DIR/runs.jsonl``) and writes the report;
``python -m benchmarks.evidence report [--results DIR] [--out FILE]`` regenerates the report only."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks/results/evidence")
DEFAULT_REPORT = Path("benchmarks/RESULTS.md")


def _report_path(results: Path) -> Path:
    """``benchmarks/RESULTS.md`` for the committed results folder, ``<results>/RESULTS.md`` for any other."""
    return DEFAULT_REPORT if results.resolve() == DEFAULT_RESULTS.resolve() else results / "RESULTS.md"


def report_main(argv: list[str]) -> int:
    from .reporting import build

    parser = argparse.ArgumentParser(prog="python -m benchmarks.evidence report",
                                     description="Regenerate RESULTS.md and the plots from a results folder.")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="Results folder of a suite run.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Default: benchmarks/RESULTS.md for benchmarks/results/evidence, else RESULTS.md inside "
                        "the results folder.")
    ns = parser.parse_args(argv)
    out = ns.out or _report_path(ns.results)
    build(ns.results, out)
    print(f"wrote {out}")
    return 0


def run_main(argv: list[str]) -> int:
    from .experiments import EXPERIMENTS, PROFILES, Suite
    from .models import FAMILIES
    from .reporting import build

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.evidence",
        description="Baseline vs VCReg evidence suite: trains the runs missing from --out (finished runs in "
        "runs.jsonl are reused, so a killed suite resumes), then writes the report. `... report --help`: the report "
        "alone.",
    )
    parser.add_argument("--quick", action="store_true", help="The smoke-test profile (a few minutes).")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="Overrides --quick.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Results folder (default benchmarks/results/evidence; other profiles: "
                        "benchmarks/results/evidence_<profile>). Finished runs there are reused.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs trained in parallel (worker processes).")
    parser.add_argument("--threads", type=int, default=1, help="Threads per job (torch and BLAS).")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(FAMILIES),
                        help="Model families (default: the profile's).")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS,
                        help="headline needs the sweep, which then runs too.")
    ns = parser.parse_args(argv)
    profile = PROFILES[ns.profile or ("quick" if ns.quick else "full")]
    out = ns.out or (DEFAULT_RESULTS if profile.name == "full" else Path(f"benchmarks/results/evidence_{profile.name}"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for name in ("transformers", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    experiments = tuple(ns.experiments)
    if "headline" in experiments and "sweep" not in experiments:
        experiments = ("sweep", *experiments)
    suite = Suite(profile, out, tuple(ns.models or profile.families), experiments, ns.jobs, ns.threads,
                  command=" ".join(["python -m benchmarks.evidence", *argv]))
    t0 = time.time()
    trained = suite.run()
    report = _report_path(out)
    build(out, report)
    logging.getLogger("benchmarks.evidence").info("%d runs trained in %.0f s; results in %s, report %s", trained,
                                                  time.time() - t0, out, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
