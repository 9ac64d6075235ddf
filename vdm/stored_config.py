"""A run's stored config (WORKDIR/config.json) as a config file.

The command line passes `--config=<this file>:WORKDIR/config.json` when a
run's workdir is given without `--config`, so `--config.a.b=value`
overrides apply to the stored config exactly as to a config file.
"""

from vdm import config_lib


def get_config(path: str):
  """The config stored at `path` (a run's config.json)."""
  import os  # pylint: disable=g-import-not-at-top
  config = config_lib.load_run_config(os.path.dirname(path))
  if config is None:
    raise FileNotFoundError(f"no run config at {path}.")
  # Eval options added since the run started are overridable too.
  return config_lib.with_eval_defaults(config)
