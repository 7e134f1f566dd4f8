"""MLflow's own system metrics for a training run: CPU, memory, disk and network of the machine of the
process that trains (Ray Train's rank 0), and its GPUs when nvidia-ml-py is installed (the `gpu` extra).

MLflow's `SystemMetricsMonitor` samples in a background thread and logs `system/*` metrics to the run for
as long as the run is RUNNING; the run page's "System metrics" tab charts them. It must not change what a
tracking-server outage does to training (nothing): the worker's MLflow calls make one short try
(``client.short_http``), so a sampler that meets a server that is down ends its thread within seconds
rather than retrying for minutes, and `stop()` never waits long. The worker's writer restarts it once the
server answers again (`Tracker.flush`), continuing at the next step.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Protocol

from .client import delivery_errors
from .uri import redact


class _Sampler(Protocol):
    """What SystemMetrics uses of the monitor that `_monitor_class` builds (MLflow is not imported here)."""

    ended: threading.Event

    def start(self) -> None: ...

    def finish(self) -> None: ...


@functools.cache
def _monitor_class():
    # Built on first use: MLflow is imported where it is used, never by importing the package.
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        """MLflow's monitor, telling when its sampling thread has ended (run ended, or server unreachable)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ended = threading.Event()

        def monitor(self):
            try:
                super().monitor()
            finally:
                self.ended.set()

    return Monitor


class SystemMetrics:
    """Samples the machine every `interval_s` seconds into run `run_id` while it trains."""

    def __init__(self, uri: str, run_id: str, interval_s: float):
        self.uri = uri
        self.run_id = run_id
        self.interval_s = interval_s
        self.monitor: _Sampler | None = None

    @property
    def running(self) -> bool:
        return self.monitor is not None and not self.monitor.ended.is_set()

    def start(self) -> None:
        """Start sampling, or start again after the sampler ended (its steps continue where they were)."""
        if self.running:
            return
        try:
            # resume_logging: a restarted worker or sampler continues the run's system/* steps.
            self.monitor = _monitor_class()(
                self.run_id,
                sampling_interval=self.interval_s,
                samples_before_logging=1,
                resume_logging=True,
                tracking_uri=self.uri,
            )
        except delivery_errors() as e:
            print(
                f"[mlflow] system metrics not recorded for now: {redact(self.uri)} did not answer ({type(e).__name__})",
                file=sys.stderr,
                flush=True,
            )
            self.monitor = None
            return
        self.monitor.start()

    def stop(self) -> None:
        """Stop sampling and send what was sampled (MLflow's finish() catches its own errors)."""
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
