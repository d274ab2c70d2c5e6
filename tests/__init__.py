

import os as _os

from hypothesis import settings as _settings

# Property-based tests: in CI the same examples every run (a failure there
# reproduces on any machine); elsewhere random ones, to find new failures.
# Either way a failure prints the blob that replays it
# (@reproduce_failure).
_settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
_settings.register_profile("dev", print_blob=True)
_settings.load_profile("ci" if _os.environ.get("CI") else "dev")
