"""One readable training loop per stage (`vqgan.py`, `masked.py` for the base transformer and super-res, `scorer.py`),
the runtime they share (`runtime.py`), and `muse train` (`run.py`)."""
