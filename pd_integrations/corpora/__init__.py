"""Generated RAG corpora (`handbook.py`, `depots.py`, from the records and drawing in `passages.py` and the name
tables in `names.py`), their retrieval and prompt shapes, and the RAG probes built from them (`rag.py`): shared by
`bench` and `calibration`, and importing neither."""
