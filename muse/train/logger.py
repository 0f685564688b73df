"""Training output on rank 0: a tqdm bar, scalars to TensorBoard or a CSV file (`TrainLogger`), and running means and
throughput without a device sync per step (`Meter`).

Every method is safe to call on any rank; only rank 0 writes. Scalars go to `run_dir/logs/` either as TensorBoard
events or as `scalars.csv` (one `step,name,value` row each, so new names can appear at any step). On resume the CSV
is appended to after dropping its rows past the resumed step (an interrupted run logs beyond its last checkpoint),
and TensorBoard discards such events itself, so curves have no duplicate stretch.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from persist import atomic_write_bytes



class TrainLogger:
    def __init__(self, run_dir: Path, kind: str, *, is_main: bool, total_steps: int, start_step: int) -> None:
        self.is_main = is_main
        self._bar = None
        self._writer = None
        self._csv_file = None
        if not is_main:
            return
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow and only rank 0 needs it

            self._writer = SummaryWriter(str(logs), purge_step=start_step + 1 if start_step else None)
        elif kind == "csv":
            path = logs / "scalars.csv"
            new = not path.exists()
            if not new:
                _drop_rows_after(path, start_step)
            self._csv_file = open(path, "a", newline="")
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(["step", "name", "value"])
        else:
            raise ValueError(f"logger must be tensorboard or csv, got {kind!r}")
        self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc=run_dir.name)

    def info(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        """One step done; `postfix` (plain numbers: pass it when they have been read anyway) is shown on the bar."""
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        for name, value in values.items():
            if self._writer is not None:
                self._writer.add_scalar(name, value, step)
            else:
                self._csv.writerow([step, name, f"{float(value):.6g}"])
        if self._csv_file is not None:
            self._csv_file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._csv_file is not None:
            self._csv_file.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite `path` without the rows logged after `step`; atomic, so a crash here cannot lose the log."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= step]
    if len(kept) == len(rows):
        return
    text = io.StringIO(newline="")
    csv.writer(text).writerows(kept)
    atomic_write_bytes(path, text.getvalue().encode())


class Meter:
    """Running means of per-step scalars and the item rate (images/s or tokens/s) since the last `summary`.

    Values may be tensors on the device: they are summed there and read once per `summary`, because reading a GPU
    number every step would make the CPU wait for the GPU and stop it queueing the next step's work.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, Tensor | float] = {}
        self._count = 0
        self._items = 0
        self._start = time.perf_counter()

    def add(self, values: dict[str, Tensor | float], items: int) -> None:
        for name, value in values.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._count += 1
        self._items += items

    def summary(self) -> tuple[dict[str, float], float]:
        """(mean of each scalar, items per second) over the interval, then start a new interval."""
        means = {name: float(total) / max(self._count, 1) for name, total in self._sums.items()}
        elapsed = max(time.perf_counter() - self._start, 1e-9)  # after reading the sums: the GPU work is done
        rate = self._items / elapsed
        self._reset()
        return means, rate


__all__ = ["TrainLogger", "Meter"]
