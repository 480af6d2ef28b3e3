"""Training metrics to stdout (progress bar), a JSONL file and TensorBoard events; process 0 only."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import jax
import tqdm
from etils import epath

from avg_jax.json_io import jsonable

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricWriter:
    """Writes scalar metrics of a run. On a resumed run, rows after the resume step are dropped first.

    The JSONL file is rewritten whole at every write (object stores such as gs:// cannot append).
    """

    def __init__(self, run_dir: str | epath.PathLike, total_steps: int, start_step: int = 0, progress_bar: bool = True,
                 tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._bar = None
        self._rows: list[str] = []
        self._tb = None
        if not self.enabled:
            return
        run_dir = epath.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._path = run_dir / METRICS_FILE
        if self._path.exists():  # a restart replays steps after the checkpoint: keep only rows up to it
            rows = [line for line in self._path.read_text().splitlines() if line.strip()]
            self._rows = [line for line in rows if json.loads(line)["step"] <= start_step]
            self._path.write_text("".join(line + "\n" for line in self._rows))
        if tensorboard:  # imported lazily: tensorboardX pulls in torch when it is installed (seconds)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)
        if progress_bar:
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=sys.stdout, dynamic_ncols=True,
                                  mininterval=1.0, desc="train")

    def advance(self, step: int, postfix: Mapping[str, float] | None = None) -> None:
        """Move the progress bar to `step`."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        """One JSONL row and one TensorBoard scalar per metric at `step`."""
        if not self.enabled:
            return
        row = {"step": int(step), **{prefix + k: jsonable(float(v)) for k, v in metrics.items()}}
        self._rows.append(json.dumps(row))
        self._path.write_text("".join(line + "\n" for line in self._rows))
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(prefix + k, float(v), int(step))
            self._tb.flush()

    def print(self, message: str) -> None:
        """A line on stdout that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
