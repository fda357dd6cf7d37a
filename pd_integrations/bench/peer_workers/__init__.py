"""Workers that `pd-bench peers` runs inside a peer engine's own virtualenv: standalone scripts (standard library
plus the engine), one per engine, speaking the JSON protocol of `protocol.py`."""
