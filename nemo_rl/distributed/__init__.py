"""Ray-based distribution.

Workers must run in the driver's own virtual environment: under ``uv run`` Ray
would otherwise package the project and build a second multi-GB venv per job.
Ray reads this switch when it is imported, so it is set before any module of
this package imports ray.

Ray also starts its workers at niceness 15, so that the driver stays
responsive. Here the workers *are* the job (the trainer, the generator): at
niceness 15 anything else on the machine, the driver's own data preparation
included, takes their cores first, which halved a CPU pre-training run's speed.
A local cluster therefore starts them at normal priority (an existing cluster
joined through ``RAY_ADDRESS`` keeps its own setting).
"""

import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_worker_niceness", "0")
