"""Suite-wide settings: reproducible property tests, no wall-clock deadlines.

Hypothesis draws its examples from a fixed seed (``derandomize``), so a run of the suite is the
same run everywhere, CI included; a failure found once is found again. Set
``HYPOTHESIS_PROFILE=explore`` to search with fresh random examples.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
