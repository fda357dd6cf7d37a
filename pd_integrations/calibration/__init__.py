"""`pd-calibrate`: measure where a model's question→context retrieval happens and pick the fastest schedule that
keeps it (docs/calibration.md). Its public names, from the modules that hold them:

- `cost.py`: `Schedule` and the one prefill cost model (`predicted_prefill_ratio`, `predicted_ratio_of`);
- `records.py`: the probes and their recorded seed attention (`ProbeRecord`, `save_records`, `load_records`);
- `search.py`: retrieval heads, candidate schedules and the schedule search (`tokens_needed`, `rag_search`);
- `verify.py`: end-to-end verification against full attention;
- `run.py`: `calibrate` and `calibrate_rag`; `__main__.py`: the command line.
"""

from .cost import TOKEN_COST, Schedule, layer_cost, predicted_prefill_ratio, predicted_ratio_of
from .records import ProbeRecord, load_records, make_probes, rag_probes, record_probes, record_rag_probes, save_records
from .run import calibrate, calibrate_rag
from .search import (
    SCORINGS,
    SPANS,
    candidate_schedules,
    choose_retrieval_heads,
    compare_scoring,
    keeps_evidence,
    needle_rank_table,
    rag_search,
    tokens_needed,
)
from .verify import Verification, answer_rate, verification_probes, verify_schedules

__all__ = [
    "TOKEN_COST",
    "SCORINGS",
    "SPANS",
    "ProbeRecord",
    "Schedule",
    "Verification",
    "answer_rate",
    "calibrate",
    "calibrate_rag",
    "candidate_schedules",
    "choose_retrieval_heads",
    "compare_scoring",
    "keeps_evidence",
    "layer_cost",
    "load_records",
    "make_probes",
    "needle_rank_table",
    "predicted_prefill_ratio",
    "predicted_ratio_of",
    "rag_probes",
    "rag_search",
    "record_probes",
    "record_rag_probes",
    "save_records",
    "tokens_needed",
    "verification_probes",
    "verify_schedules",
]
