"""Run configuration: YAML recipes with defaults and overrides (``loader``), and their typed schema (``schema``).

Every error found while loading or validating is reported at once, before Ray,
conversion or any output directory starts.
"""
