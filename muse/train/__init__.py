"""One readable training loop per stage (`vqgan.py`, `masked.py` for the base transformer and super-res, `scorer.py`),
what they share, each module one job (`runtime.py`: processes, devices, DDP / FSDP, precision; `checkpoint.py`: the
run directory, saving and resuming; `ema.py`; `optim.py`: AdamW and the schedule; `batches.py`: resumable batches;
`logger.py`), and `muse train` (`run.py`)."""
