"""Metrics out: JSONL always, TensorBoard / W&B when configured, a tqdm progress bar.

``<out_dir>/metrics.jsonl`` gets one JSON object per logged step: ``{"step": s, ...}`` with
TRL's names (``loss``, ``mean_token_accuracy``, ``entropy``, ``num_tokens``, ``grad_norm``,
``learning_rate``, ``epoch``; evaluation lines carry ``eval_``-prefixed names) plus
``tokens_per_second``, ``mfu`` (only when the peak FLOPs of the device are known) and
``skipped`` (1.0 when a non-finite step was not applied). A non-finite value (a NaN loss,
a reward mean with no applicable completion) is written as ``null``.

In a multi-process run only process 0 writes (``enabled=False`` elsewhere: ``write`` returns
the row and touches no file, no bar, no TensorBoard / W&B).

The loop hands metrics over one step late (the device values of step s are fetched after
step s+1 is dispatched), so logging never makes the device wait.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

# Peak dense bf16 FLOP/s per device, by substring of `jax.Device.device_kind` (lower case).
# CPU: unknown (mfu is left out unless logging.peak_flops is set).
PEAK_FLOPS = {
    "v6 lite": 918e12,
    "v6e": 918e12,
    "v5p": 459e12,
    "v5 lite": 197e12,
    "v5e": 197e12,
    "v4": 275e12,
    "v3": 123e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l4": 121e12,
    "a10g": 70e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for key, flops in PEAK_FLOPS.items():
        if key in kind:
            return flops
    return None


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop lines with ``step > max_step`` (logged after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            if json.loads(line).get("step", 0) > max_step:
                continue
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        # JSON has no nan/inf; null keeps every reader (the run report, pandas) working,
        # where the strings "nan" / "inf" broke numeric code that read them back
        return None
    return v


class MetricsWriter:
    """Writes metric dicts to JSONL, TensorBoard and W&B; drives the progress bar."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        resume: bool = False,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            truncate_jsonl(self.path, start_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        self._tb = self._open_tensorboard() if tensorboard else None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError(
                    "logging.wandb_project is set but wandb is not installed (pip install wandb)"
                ) from e
            self._wandb = wandb.init(
                project=wandb_project,
                name=wandb_run_name,
                config=dict(run_config or {}),
                dir=str(self.out_dir),
                resume="allow",
            )
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _open_tensorboard(self):
        logdir = str(self.out_dir / "tensorboard")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(
                    "logging.tensorboard=true needs tensorboard (pip install tensorboard) "
                    "or tensorboardX"
                ) from e
        return SummaryWriter(logdir)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        return row

    def progress(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        if metrics:
            shown = {
                k: metrics[k]
                for k in ("loss", "eval_loss", "tokens_per_second")
                if k in metrics and isinstance(metrics[k], int | float)
            }
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()


class Throughput:
    """Tokens per second (and MFU) between successive metric fetches."""

    def __init__(self, *, flops_per_token: float | None, peak_flops_total: float | None):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self._last: float | None = None

    def reset(self) -> None:
        self._last = None

    def update(self, tokens: float) -> dict[str, float]:
        now = time.perf_counter()
        out: dict[str, float] = {}
        if self._last is not None and now > self._last:
            tps = tokens / (now - self._last)
            out["tokens_per_second"] = tps
            if self.flops_per_token and self.peak:
                out["mfu"] = tps * self.flops_per_token / self.peak
        self._last = now
        return out
