"""``profile=(start_step, end_step)``: a ``torch.profiler`` trace of those steps, written into the run folder
as ``profile/trace.json`` (open it in Perfetto or chrome://tracing)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import bad


class StepProfiler:
    def __init__(self, window: tuple[int, int], out_dir: Path) -> None:
        if len(window) != 2 or not 0 <= window[0] < window[1]:
            raise bad("profile", window, "use (start_step, end_step) with 0 <= start < end, e.g. (10, 20).")
        self.start, self.end = int(window[0]), int(window[1])
        self.out_dir = out_dir
        self._prof: torch.profiler.profile | None = None
        self.path: Path | None = None

    def after_step(self, step: int) -> None:
        """Called with the number of steps done; starts and stops the profiler at the window's edges."""
        if step == self.start and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self._prof.__enter__()
        elif step == self.end and self._prof is not None:
            self.close()

    def close(self) -> None:
        if self._prof is None:
            return
        self._prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "trace.json"
        self._prof.export_chrome_trace(str(self.path))
        self._prof = None
