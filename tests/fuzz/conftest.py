"""Hypothesis profiles for the fuzz suite: "ci" (default, derandomized, small) and "long" (XDSI_FUZZ=long).

See tests/fuzz/README.md for how to run it by hand and what each module asserts.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

# Each test also has its own wall-clock allotment (tests/fuzz/fuzzing.py: Budget): hypothesis bounds
# examples, the budget bounds seconds, whichever ends first.
_COMMON = dict(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    deadline=None,  # a server round trip varies with the machine; time is bounded by the Budget instead
    print_blob=True,
)
settings.register_profile("ci", max_examples=400, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate, Phase.shrink], **_COMMON)
settings.register_profile("long", max_examples=1_000_000, derandomize=False, **_COMMON)
settings.load_profile("long" if os.environ.get("XDSI_FUZZ") == "long" else "ci")
