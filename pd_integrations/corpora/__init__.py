"""Generated RAG corpora (`handbook.py`, `depots.py`), their retrieval and prompt shapes, and the RAG probes built
from them (`rag.py`): shared by `bench` and `calibration`, and importing neither."""
