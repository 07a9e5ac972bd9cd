"""Re-run the test cases that travel with artifacts (stages/support/testcases.py) in their runtimes.

    python -m pipelines.check_artifact PATH [PATH...] [--device cortex-a76]

PATH: a model.onnx, model.pte or model.bpte, or a folder holding them (a run's artifacts/<part>/).
--device: a device profile of conf/target/*.yaml, run natively or under qemu-user as
verify_target runs it (make device-runtimes builds the emulated ones).
One line per artifact (PASS, FAIL with the case and output that broke, or ERROR when the
artifact or its cases are missing); exit 1 unless every artifact passes.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from .errors import PipelineError


def artifacts(path: Path) -> list[Path]:
    """The artifacts a PATH names: itself, or the .onnx and .pte files in a folder (a .bpte
    alone when its .pte is not there)."""
    if not path.is_dir():
        return [path]
    found = [p for p in sorted(path.iterdir()) if p.suffix in (".onnx", ".pte") and p.name != "app_steps.onnx"
             or p.suffix == ".bpte" and not p.with_suffix(".pte").exists()]  # app_steps: the app's, no cases
    if not found:
        raise PipelineError(f"{path}: no .onnx, .pte or .bpte artifact in it")
    return found


def line(artifact: Path, device: dict | None = None) -> tuple[bool, str]:
    """The verdict on one artifact, as one line."""
    from stages.support.testcases import check

    try:
        result = check(artifact, device)
    except PipelineError as exc:
        return False, f"ERROR {exc.message}"
    if not result["passed"]:
        return False, f"FAIL {artifact}: {result['reason']}"
    cases = len({row["case"] for row in result["cases"]})
    worst = max(row["max_abs"] for row in result["cases"])
    where = f" on {device['name']}" if device else ""
    return True, f"PASS {artifact}{where} ({cases} case{'s' * (cases != 1)}, worst max abs {worst:.3g})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.check_artifact",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument("--device", help="a device of conf/target/*.yaml (cortex-a76, x86-64-avx2...)")
    args = parser.parse_args(argv)
    from stages.runtimes.devices import profile

    try:
        device = profile(args.device) if args.device else None
    except PipelineError as exc:
        print(f"ERROR {exc.message}")
        return 1
    passed = True
    for path in args.paths:
        try:
            found = artifacts(path)
        except PipelineError as exc:
            print(f"ERROR {exc.message}")
            passed = False
            continue
        for artifact in found:
            ok, text = line(artifact, device)
            print(text, flush=True)
            passed &= ok
    return 0 if passed else 1


if __name__ == "__main__":
    warnings.filterwarnings("ignore")  # the runtimes' import-time notices are not verdicts
    logging.disable(logging.WARNING)
    sys.exit(main())
