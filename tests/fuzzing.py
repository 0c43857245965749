"""What the fuzzers share (tests/nats/test_fuzz.py: a real node's edges;
tests/unit/test_fuzz.py: config files): the budget, the hypothesis profile,
and the report of examples and inputs/s per property.

Budget: ``HERALD_FUZZ_EXAMPLES`` examples per property (default 100); ``make
fuzz`` runs 5000. A test module that fuzzes imports :func:`fuzz_report` (an
autouse fixture) and adds its properties' figures to :data:`REPORTS`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("HERALD_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # CI runs the same examples every time (a red build is reproducible);
    # make fuzz and local runs draw new ones.
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one node per property, shared by its examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "fuzz"


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (hypothesis favours small integers,
    so ``integers(0, n - 1) == 0`` would come up far more often)."""
    return st.sampled_from([False] * (n - 1) + [True])


# property -> its figures, filled by the module running it and emptied by its fuzz_report
REPORTS: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module", autouse=True)
def fuzz_report(request: pytest.FixtureRequest) -> Any:
    """After the module: examples and inputs/s per property, on the terminal
    and in artifacts/fuzz/stats.json (merged with what the file holds for the
    same budget: the fuzzing modules may run in different processes)."""
    yield
    if not REPORTS:
        return
    fresh = dict(REPORTS)
    REPORTS.clear()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "stats.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or known.get("max_examples") != EXAMPLES:
        known = {}
    path.write_text(json.dumps({**known, "max_examples": EXAMPLES, **fresh}, indent=2) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for name, r in fresh.items():
            reporter.write_line(
                f"fuzz {name}: {r['examples']} examples in {r['seconds']} s ({r['per_second']}/s)"
                + (f", notes: {r['notes']}" if r.get("notes") else "")
            )
