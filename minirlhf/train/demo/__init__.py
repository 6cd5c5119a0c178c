"""`minirlhf demo`: the lecture's whole pipeline on the built-in Shakespeare (being split by job)."""

from .plan import (LARGE, PRESETS, QUICK, SMOKE, DemoConfig, demo, make_plan,  # noqa: F401
                   parse_betas)
