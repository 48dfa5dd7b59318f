"""Shared by the tests of the bench/ scripts: load a script by name as a module."""

import importlib.util
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the scripts import the bench library (common.py, models.py) beside them


@pytest.fixture(scope="session")
def load_script():
    """``load_script("e2e")`` -> bench/e2e.py as the module ``bench_e2e`` (registered: dataclasses
    look their module up)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def budget_from_the_test():
    """The scripts' ``--budget-s`` counts from ``common.START`` (the process start in a real run): from
    each test's own start here, not the suite's, so a long suite does not skip a dry run's measurements."""
    import common

    now = time.perf_counter()
    common.START = now
    for name, module in list(sys.modules.items()):
        if name.startswith("bench_") and hasattr(module, "START"):  # scripts that copied it (from common import START)
            module.START = now
