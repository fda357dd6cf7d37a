"""`pd-bench`: compare full attention, GemFilter and PromptDistill on speed, needle retrieval and RULER-style tasks.

- `tasks.py`: the prompts (needle probes and synthetic long-context tasks) and their exact-match scoring;
- `measure.py`: the compared methods, and running prompts through them with timings and peak memory;
- `report.py`: the summary table, JSON and PNG plots;
- `__main__.py`: the command line.

Nothing in the package imports `bench`.
"""
