"""The planner's parts: hardware profiles, model arithmetic, memory, time, layout search.

`angelptm.plan` is the entry point (`plan`, `search`, `plan_main`); these modules hold the
formulas it composes. Nothing here builds a model or imports torch: planning a 1T model is
arithmetic.
"""
