#!/usr/bin/env python
"""Train several configs side by side on one machine within a wall-clock budget (a lent GPU's minutes).

A cosine schedule needs ``train.max_steps`` up front, but the step rate of runs that share a GPU (and the CPU cores
that feed it) is only known by running them together. So, for a spec of runs::

    runs:
      regression_nc48:
        script: training/train_regression.py
        config: configs/regression_default_x4.yaml
        overrides: [model.num_feat=48]
        threads: 2          # OMP/MKL threads of the process (default 2: runs that share a machine share its cores)

1. **probe**: every run starts at once with an unreachable ``max_steps`` and no checkpoints or validation; after
   ``--probe`` seconds the step counts (read from each run's progress bar) give each run's rate under the same
   contention, and the runs are stopped;
2. **train**: every run starts again from scratch with ``train.max_steps = rate × (budget − probe − start-up −
   --reserve) × --safety``, so they all finish inside the budget with their schedules complete; each exports its
   pipeline as the scripts do (``train.output_dir/pipeline``);
3. a summary (``sweep.json``: each run's rate, steps, wall time and exit code) is written to ``--out``.

The steps a run reached are in its ``config.yaml``, so the same weights can be retrained anywhere with the config and
``train.max_steps=<steps>`` (the runs are seeded; only the device's float rounding differs).

    python training/run_timed.py --spec configs/sweeps/issue12.yaml --budget 420 --probe 50 --out outputs/sweep
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

_STEP = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
_PROBE_STEPS = 10**7


class Run:
    """One training process, its output logged and its progress-bar step count followed."""

    def __init__(self, name: str, spec: dict, out: Path, phase: str, extra: list[str]):
        self.name, self.phase = name, phase
        self.output_dir = out / phase / name
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.output_dir / "log.txt"
        cmd = [sys.executable, spec["script"], "--config", spec["config"], *spec.get("overrides", [])]
        cmd += [f"train.output_dir={self.output_dir}", *extra]
        self.cmd = cmd
        self.started = time.monotonic()
        self.first_step_at: float | None = None
        self.samples: list[tuple[float, int]] = []
        threads = str(spec.get("threads", 2))
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        buffer = b""
        with open(self.log_path, "wb") as log:
            while chunk := self.proc.stdout.read1(4096):
                log.write(chunk)
                buffer = (buffer + chunk)[-4096:]
                matches = _STEP.findall(buffer.decode("utf-8", "replace"))
                if matches:
                    step = int(matches[-1][0])
                    now = time.monotonic()
                    if step > 0 and self.first_step_at is None:
                        self.first_step_at = now
                    self.samples.append((now, step))

    def rate(self, window: float) -> float:
        """Steps per second over the last ``window`` seconds of samples."""
        if len(self.samples) < 2:
            return 0.0
        end_t, end_step = self.samples[-1]
        start_t, start_step = next(((t, s) for t, s in self.samples if t >= end_t - window), self.samples[0])
        return (end_step - start_step) / max(end_t - start_t, 1e-6)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._thread.join(5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="YAML with a 'runs' mapping: name -> script, config, overrides")
    parser.add_argument("--budget", type=float, required=True, help="wall-clock seconds for probe + training")
    parser.add_argument("--probe", type=float, default=50.0, help="seconds of the rate probe")
    parser.add_argument("--safety", type=float, default=0.9, help="fraction of the estimated steps to schedule")
    parser.add_argument("--reserve", type=float, default=20.0, help="seconds kept for each run's export and exit")
    parser.add_argument("--out", required=True, help="folder for the runs' output_dirs and sweep.json")
    parser.add_argument("--only", nargs="*", help="names of the runs to start (default: all)")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="overrides added to every run, e.g. validation.source=none"
    )
    args = parser.parse_args(argv)

    spec = yaml.safe_load(Path(args.spec).read_text())["runs"]
    names = args.only or list(spec)
    unknown = sorted(set(names) - set(spec))
    if unknown:
        parser.error(f"unknown runs {unknown}; the spec has {sorted(spec)}")
    out = Path(args.out)
    t0 = time.monotonic()
    quiet = ["train.checkpointing_steps=0", "train.validation_steps=0", "train.report_to=none"]

    # 1. probe
    probes = {n: Run(n, spec[n], out, "probe", [*args.extra, f"train.max_steps={_PROBE_STEPS}", *quiet]) for n in names}
    time.sleep(args.probe)
    summary = {}
    for name, run in probes.items():
        run.stop()
        start_up = (run.first_step_at or time.monotonic()) - run.started
        rate = run.rate(window=args.probe / 3)
        summary[name] = {"probe_rate": rate, "start_up_s": start_up}
        print(f"[probe] {name}: {rate:.2f} steps/s, first step after {start_up:.0f} s", flush=True)

    # 2. train
    left = args.budget - (time.monotonic() - t0)
    runs = {}
    for name in names:
        s = summary[name]
        steps = int(s["probe_rate"] * max(left - s["start_up_s"] - args.reserve, 0) * args.safety)
        if steps < 10:
            print(f"[train] {name}: skipped ({steps} steps fit)", flush=True)
            continue
        s["max_steps"] = steps
        extra = [*args.extra, f"train.max_steps={steps}", "train.checkpointing_steps=0"]
        runs[name] = Run(name, spec[name], out, "train", extra)
        print(f"[train] {name}: {steps} steps", flush=True)
    for name, run in runs.items():
        run.proc.wait()
        run._thread.join(5)
        summary[name].update(returncode=run.proc.returncode, wall_s=time.monotonic() - run.started)
        print(f"[done] {name}: exit {run.proc.returncode} after {summary[name]['wall_s']:.0f} s", flush=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(summary[n].get("returncode", 1) == 0 for n in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
