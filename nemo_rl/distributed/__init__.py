"""Ray-based distribution.

Workers must run in the driver's own virtual environment: under ``uv run`` Ray
would otherwise package the project and build a second multi-GB venv per job.
Ray reads this switch when it is imported, so it is set before any module of
this package imports ray.
"""

import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
