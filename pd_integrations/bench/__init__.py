"""`pd-bench`: compare full attention, GemFilter and PromptDistill on speed, needle retrieval, RULER-style tasks and
RAG-shaped prompts.

- `tasks.py`: the prompts (needle probes and synthetic long-context tasks) and their exact-match scoring;
- `ragbench.py`: the `rag` command's measurements, on the RAG probes of `pd_integrations.corpora` (generated
  corpora of look-alike passages, MiniLM retrieval, the three common RAG prompt shapes);
- `measure.py`: the compared methods, and running prompts through them with timings and peak memory;
- `report.py`: the summary table, JSON and PNG plots;
- `__main__.py`: the command line; `cli.py`: its argument types and result files, shared with `peers.py`.

Nothing in the package imports `bench`: what it shares with calibration lives below both (`pd_integrations.probes`,
`pd_integrations.corpora`, `pd_integrations.calibration.cost`).
"""
