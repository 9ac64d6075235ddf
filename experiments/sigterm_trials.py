"""SIGTERM at random moments of tiny training runs; prints each exit code.

  .venv/bin/python experiments/sigterm_trials.py 20

Each trial starts `python -m vdm.main train` on tests/tiny_config.py (a
million steps), waits until it starts compiling the train step, sleeps a
random 0-8 s (the compile takes ~2-6 s, so about half the signals land in
it and half in training), sends SIGTERM and records the exit code, how long
the exit took and the checkpoints left. Every code must be 143.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trial(workdir: str, delay: float) -> tuple[int, float, list[str]]:
  proc = subprocess.Popen(
      [sys.executable, "-m", "vdm.main", "train",
       "--config=tests/tiny_config.py", f"--workdir={workdir}",
       "--config.training.num_steps=1000000",
       "--config.training.checkpoint_every=0",
       "--config.training.log_every=0"], cwd=REPO,
      env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if "compiling the train step" in line:
      break
  time.sleep(delay)
  proc.send_signal(signal.SIGTERM)
  sent = time.monotonic()
  proc.communicate(timeout=300)
  folder = os.path.join(workdir, "checkpoints")
  steps = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  return proc.returncode, time.monotonic() - sent, steps


def main():
  count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
  codes = []
  with tempfile.TemporaryDirectory() as root:
    for i in range(count):
      workdir = os.path.join(root, str(i))
      delay = random.uniform(0.0, 8.0)
      code, took, steps = trial(workdir, delay)
      codes.append(code)
      print(f"trial {i + 1:2d}: signal {delay:4.1f} s after 'compiling': "
            f"exit {code} in {took:.1f} s, checkpoints {steps}", flush=True)
      shutil.rmtree(workdir, ignore_errors=True)
  print(f"exit codes: {sorted(set(codes))}; all 143: "
        f"{all(c == 143 for c in codes)}")


if __name__ == "__main__":
  main()
