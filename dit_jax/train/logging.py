"""What a run reports: a JSONL log and TensorBoard events in the workdir, a progress bar, and
throughput / MFU (docs/numerics.md#cost-and-mfu). Only host 0 writes; the other hosts' writers do
nothing.

    WORKDIR/log.jsonl        one JSON object per logged step:
                             step, loss, mse, vb, grad_norm, lr, steps_per_sec, images_per_sec,
                             mfu (null where no peak is known, e.g. on CPU), time
                             and, at sample-grid steps on the built-in data, shape_score (the
                             fraction of grid samples that show the requested shape, clean) and
                             shape_accuracy (the fraction whose shape is the requested one)
    WORKDIR/tensorboard/     the same scalars as TensorBoard events (train/<key>; not the Unix
                             `time`), the sample grids as images (samples/grid) and the run's
                             config as text (config)

On a terminal the console shows a progress bar; otherwise (a file, a pipe, a batch scheduler's
log) one plain line per logged step: `step 100/1200 (8%) loss 0.1234 ... eta 5m12s`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from dit_jax.flops import peak_flops_per_device

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_log(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of WORKDIR/log.jsonl. A torn last line (a write cut short: a full disk, a
    killed run) is skipped with a warning; a bad line elsewhere is an error naming it."""
    path = Path(workdir) / LOG_FILE
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(
        path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                log.warning("%s: skipping its torn last line %d (%s)", path, number, err)
                break
            raise ValueError(f"{path} line {number} is not JSON ({err}); delete that line (or "
                             f"the file: checkpoints do not depend on it)") from None
    return records


class MetricWriter:
    """JSONL + TensorBoard. On resume from step s, entries after s (written by the interrupted
    run, and about to be written again) are dropped, so the log reads as one uninterrupted run."""

    def __init__(self, workdir: str | Path, *, resume_step: int = 0, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / LOG_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [r for r in read_log(workdir) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        if tensorboard:
            self._tb = _summary_writer_class()(str(Path(workdir) / TENSORBOARD_DIR))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _json_number(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                # `time` is a Unix time, for the JSONL reader: no curve to plot.
                if key not in ("step", "time") and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, step)
            self._tb.flush()

    def write_image(self, step: int, tag: str, image) -> None:
        """An (H, W, 3) uint8 image to TensorBoard (JSONL holds numbers only)."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")
            self._tb.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Text (markdown) to TensorBoard, e.g. the run's config."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it
    is installed only to accept torch tensors (seconds of start-up), and this writer logs floats."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _json_number(value):
    if value is None:
        return None
    value = float(value)
    # JSON has no NaN/inf; a non-finite loss is logged as its string.
    return value if math.isfinite(value) else str(value)


class Progress:
    """What host 0 shows while training: on a terminal a tqdm bar (steps, ETA, the latest loss and
    throughput); elsewhere (`interactive` False: stdout or stderr is not a terminal) a plain line
    per logged step on stdout, which files and batch schedulers' logs keep readable."""

    def __init__(self, total: int, initial: int, enabled: bool = True,
                 interactive: bool | None = None):
        if interactive is None:
            interactive = sys.stdout.isatty() and sys.stderr.isatty()
        self.total, self.step, self.enabled = total, initial, enabled
        self.interactive = interactive
        self._start = (initial, time.perf_counter())
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        disable=not (enabled and interactive), smoothing=0.1)

    def update(self, n: int = 1) -> None:
        self.step += n
        self.bar.update(n)

    def show(self, metrics: dict[str, Any]) -> None:
        shown = {"loss": f"{metrics['loss']:.4f}"}
        if metrics.get("steps_per_sec") is not None:
            shown["steps/s"] = f"{metrics['steps_per_sec']:.2f}"
            shown["img/s"] = f"{metrics['images_per_sec']:.1f}"
        if metrics.get("mfu") is not None:
            shown["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        if self.interactive:
            self.bar.set_postfix(shown, refresh=False)
            return
        for key in ("grad_norm", "lr"):
            if metrics.get(key) is not None:
                shown[key] = f"{metrics[key]:.3g}"
        done = self.step - self._start[0]
        eta = ""
        if done > 0 and self.step < self.total:
            seconds = (time.perf_counter() - self._start[1]) / done * (self.total - self.step)
            eta = f" eta {format_duration(seconds)}"
        self.write(f"step {self.step}/{self.total} ({100 * self.step // max(self.total, 1)}%) "
                   + " ".join(f"{k} {v}" for k, v in shown.items()) + eta)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        self.bar.close()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Throughput:
    """Steps/s, images/s and MFU over a window of steps, timed between host syncs."""

    def __init__(self, *, global_batch_size: int, flops_per_image: float, num_devices: int,
                 peak_tflops_override: float = 0.0, dtype="bfloat16"):
        device = jax.devices()[0]
        self.global_batch_size = global_batch_size
        self.flops_per_image = flops_per_image
        per_device = peak_flops_per_device(device.device_kind, device.platform,
                                           peak_tflops_override, dtype)
        self.peak = None if per_device is None else per_device * num_devices
        self.restart(0)

    def restart(self, step: int) -> None:
        """Begin a window at `step` (after a sync, so the clock covers only the steps after it)."""
        self._start_step, self._start_time = step, time.perf_counter()

    def measure(self, step: int) -> dict[str, float | None]:
        steps = step - self._start_step
        seconds = max(time.perf_counter() - self._start_time, 1e-9)
        if steps <= 0:  # no step timed yet (the first, compiling step is never timed)
            return {"steps_per_sec": None, "images_per_sec": None, "mfu": None}
        steps_per_sec = steps / seconds
        images_per_sec = steps_per_sec * self.global_batch_size
        mfu = None if self.peak is None else images_per_sec * self.flops_per_image / self.peak
        return {"steps_per_sec": steps_per_sec, "images_per_sec": images_per_sec, "mfu": mfu}
