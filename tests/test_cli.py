"""The command line as a user meets it: one run per workdir, one line per
mistake, outputs that never replace each other's, SIGTERM's exit code.

Subprocesses through the real entry point (`python -m vdm.main`, what the
`vdm` console script runs); one tiny run shared by the module.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vdm import cli
from vdm import config_lib
from vdm import generation
from vdm import main as main_lib
from vdm import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny_config.py")
ENV = dict(os.environ, PYTHONUNBUFFERED="1", VDM_DEBUG="0",
           XLA_FLAGS="--xla_force_host_platform_device_count=1")


def vdm(*args, **popen_kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "vdm.main", *args],
                          cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen_kwargs)


def finish(proc: subprocess.Popen, timeout: float = 300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
  """A finished 6-step tiny run (eval and samples written by training)."""
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  code, out, err = finish(vdm("train", f"--config={TINY}",
                              f"--workdir={workdir}"))
  assert code == 0, err[-3000:]
  return workdir


def _error_line(err: str) -> str:
  lines = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  return lines[0]


# (name, args after the workdir, text of the one error line); exit code 2.
def refused_cases(workdir, missing):
  return [
      ("misspelt group", ["train", f"--workdir={workdir}",
                          "--config.trainin.batch_size=3"],
       "--config.trainin.batch_size: the config has no field 'trainin'; did "
       "you mean --config.training.batch_size?"),
      ("misspelt field", ["train", f"--workdir={workdir}",
                          "--config.training.bach_size=3"],
       "did you mean --config.training.batch_size?"),
      ("model override on eval", ["eval", f"--workdir={workdir}",
                                  "--config.model.parameterization=v"],
       "model.parameterization 'eps' -> 'v'"),
      ("other data on resume", ["train", f"--config={TINY}",
                                f"--workdir={workdir}",
                                "--config.data.flip=True"],
       "data.flip False -> True"),
      ("eval on a missing workdir", ["eval", f"--workdir={missing}"],
       f"no run in {missing}: the folder does not exist"),
      ("new run without a config", ["train", f"--workdir={missing}"],
       "--config is required to start a run"),
      ("a second trainer", ["train", f"--workdir={workdir}"],
       f"is in use by a training run: host {os.uname().nodename}, pid "
       f"{os.getpid()}"),
  ]


def test_mistakes_are_one_line_and_write_nothing(run, tmp_path):
  missing = str(tmp_path / "missing")
  config_json = os.path.join(run, "config.json")
  before = open(config_json).read()
  cases = refused_cases(run, missing)
  # This process holds the workdir like a training run would.
  with workdir_lock.WorkdirLock(run):
    procs = [(name, vdm(*args), text) for name, args, text in cases]
    results = [(name, finish(proc), text) for name, proc, text in procs]
  for name, (code, out, err), text in results:
    assert code == cli.EXIT_USAGE, (name, err[-3000:])
    assert text in _error_line(err), (name, err[-3000:])
  assert not os.path.exists(missing)           # nothing created
  assert open(config_json).read() == before    # a refused resume wrote nothing


def test_outputs_are_named_and_never_replace_each_other(run):
  config = config_lib.load_run_config(run)
  fingerprint = config_lib.run_fingerprint(config)
  with open(os.path.join(run, "checkpoints", "6", "metadata",
                         "metadata")) as f:
    assert json.load(f)["config_hash"] == fingerprint
  trained_eval, _ = config_lib.eval_output(config, "test", 6)
  trained_samples = config_lib.sample_output(config, 6)
  paths = [os.path.join(run, "eval", f"{trained_eval}.json"),
           os.path.join(run, "samples", f"{trained_samples}.png")]
  stamps = [os.stat(p).st_mtime_ns for p in paths]
  # An allowed override: another eval seed is another file.
  code, out, err = finish(vdm("eval", f"--workdir={run}",
                              "--config.training.eval_seed=5"))
  assert code == 0, err[-3000:]
  assert "could not be restored" not in err     # no Orbax warning on restore
  config.training.eval_seed = 5
  other, _ = config_lib.eval_output(config, "test", 6)
  assert other != trained_eval
  with open(os.path.join(run, "eval", f"{other}.json")) as f:
    record = json.load(f)
  assert record["fingerprint"] == fingerprint
  assert (record["eval_seed"], record["params"], record["step"]) == (5, "ema",
                                                                     6)
  assert f"wrote {os.path.join(run, 'eval', other)}.json" in out
  assert [os.stat(p).st_mtime_ns for p in paths] == stamps


def test_many_samples_are_written_in_resumable_chunks(run):
  args = ["sample", f"--workdir={run}", "--config.sampling.num_samples=5",
          "--config.sampling.chunk_size=2", "--config.sampling.num_steps=3"]
  code, out, err = finish(vdm(*args))
  assert code == 0, err[-3000:]
  config = config_lib.load_run_config(run)
  config.sampling.update(num_samples=5, chunk_size=2, num_steps=3)
  directory = os.path.join(run, "samples",
                           config_lib.sample_output(config, 6))
  assert f"wrote 5 samples to {directory}" in out
  assert "chunk 3/3 written" in out
  samples, _ = generation.load_samples(directory)
  assert samples.shape[0] == 5
  # A lost chunk is redone by the same command, equal to the bit.
  first = np.load(os.path.join(directory, "chunk_1.npz"))["samples"]
  os.remove(os.path.join(directory, "chunk_1.npz"))
  code, out, err = finish(vdm(*args))
  assert code == 0 and "chunk 3/3 written" in out, err[-3000:]
  np.testing.assert_array_equal(
      np.load(os.path.join(directory, "chunk_1.npz"))["samples"], first)


def test_info_describes_the_run(run):
  text = main_lib.run_info(run)
  config = config_lib.load_run_config(run)
  assert f"fingerprint {config_lib.run_fingerprint(config)}" in text
  assert "checkpoints: steps 4, 6 (newest 6)" in text
  assert config_lib.eval_output(config, "test", 6)[0] in text


def test_expand_argv_maps_commands_and_the_stored_config(run):
  assert cli.expand_argv(["vdm", "eval", f"--workdir={run}"]) == [
      "vdm", f"--config={cli.STORED_CONFIG}:"
      f"{os.path.join(os.path.abspath(run), 'config.json')}",
      "--mode=eval", f"--workdir={run}"]
  assert cli.expand_argv(["vdm", "train", f"--config={TINY}",
                          "--workdir=x"]) == [
      "vdm", "--mode=train", f"--config={TINY}", "--workdir=x"]


def _wait_for(proc, text: str, timeout: float = 240) -> None:
  deadline = time.monotonic() + timeout
  for line in proc.stdout:
    if text in line:
      return
    assert time.monotonic() < deadline, f"no {text!r} in time"
  raise AssertionError(f"the run ended before printing {text!r}")


@pytest.mark.slow
@pytest.mark.parametrize("when", ["compile", "training"])
def test_sigterm_exits_143(tmp_path, when):
  """During the first compile: promptly, nothing saved. During training: a
  checkpoint of the step reached, then exit. Both exit 143, never 134."""
  workdir = str(tmp_path / "run")
  proc = vdm("train", f"--config={TINY}", f"--workdir={workdir}",
             "--config.training.num_steps=1000000",
             "--config.training.checkpoint_every=0",
             "--config.training.log_every=0")
  try:
    _wait_for(proc, "compiling the train step" if when == "compile" else
              "compiled the train step")
    if when == "training":
      time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, _, err = finish(proc, timeout=120)
  finally:
    proc.kill()
  assert code == cli.exit_code_for_signal(signal.SIGTERM) == 143, err
  steps = [s for s in os.listdir(os.path.join(workdir, "checkpoints"))
           if s.isdigit()]
  if when == "compile":
    assert time.monotonic() - sent < 5.0
    assert steps == [] and "nothing unsaved was lost" in err
  else:
    assert len(steps) == 1 and int(steps[0]) > 0, steps
