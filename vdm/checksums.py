"""Checksums of checkpoint steps: damage is detected before a restore.

Every step a `checkpointing.Manager` saves holds `checksums.json`: the
SHA-256 of every file of the step (its state arrays, metadata and metrics),
written by process 0 into the step's tmp folder just before Orbax renames it
to `<step>/`, so a committed step always has it. Restoring a step first
re-hashes its files (`verify_checksums`); damaged bytes anywhere, a missing
or extra file, or a missing `checksums.json` in a step saved with one are
reported, and the Manager skips the step.

SHA-256 because hashlib's uses the CPU's SHA instructions: about 1 s per GiB
per core here (docs/reliability.md), so verifying a cifar10 state of a few
hundred MB costs well under a second; files are hashed in parallel threads.
"""

import hashlib
import json
import os
from typing import Any, Optional, Sequence

from absl import logging
from etils import epath

FILENAME = "checksums.json"
# The Orbax item holding the step's JSON metadata (`checkpointing.Manager`
# saves it as `<step>/metadata/metadata`).
METADATA_ITEM = "metadata"
# Written into the step's metadata JSON by the Manager (and stripped on
# restore): the step was saved with a checksums.json, so one missing from it
# is damage.
CHECKSUMMED_KEY = "_vdm_checksums"
# Orbax writes these after checksums.json (the commit timestamp, the commit
# marker), so they cannot be covered; neither holds data we restore.
_UNHASHED_TOP = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt",
                           FILENAME})
_HASH_CHUNK = 4 << 20


def short_error(error: BaseException, limit: int = 300) -> str:
  """The error in at most `limit` characters: its head and its tail (where
  tensorstore puts the OS error); for problems and warnings that name a
  step."""
  text = f"{type(error).__name__}: {error}"
  if len(text) <= limit:
    return text
  return text[:limit // 3] + " ... " + text[-(limit - limit // 3):]


def _hash_file(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _hashed_files(step_dir: epath.Path) -> list[str]:
  """Paths under `step_dir` that checksums.json covers, sorted."""
  names, folders = [], [(step_dir, "")]
  while folders:          # epath has no recursive glob on object stores
    folder, prefix = folders.pop()
    for path in folder.iterdir():
      name = prefix + path.name
      if path.is_dir():
        folders.append((path, name + "/"))
      elif (name not in _UNHASHED_TOP and
            path.name != "commit_success.txt"):
        names.append(name)
  return sorted(names)


def _digests(step_dir: epath.Path, names: Sequence[str]) -> dict[str, str]:
  """{name: sha256} of files under `step_dir`, hashed in parallel threads."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  workers = max(1, min(8, os.cpu_count() or 1, len(names)))
  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    hashes = pool.map(lambda name: _hash_file(step_dir / name), names)
    return dict(zip(names, hashes))


def write_checksums(step_dir: str | os.PathLike) -> None:
  """Writes `step_dir/checksums.json`: the SHA-256 of each file in the step."""
  step_dir = epath.Path(step_dir)
  files = _digests(step_dir, _hashed_files(step_dir))
  (step_dir / FILENAME).write_text(
      json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def _read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def verify_checksums(step_dir: str | os.PathLike) -> Optional[str]:
  """None if the step's files match its checksums.json, else the problem.

  A step without checksums.json passes (with a warning) only if its metadata
  says it was saved before checksums were written.
  """
  step_dir = epath.Path(step_dir)
  checksums = step_dir / FILENAME
  if not checksums.exists():
    try:
      metadata = _read_json(step_dir / METADATA_ITEM / METADATA_ITEM)
    except (OSError, ValueError) as e:
      return f"no {FILENAME} and unreadable metadata ({short_error(e)})"
    if not isinstance(metadata, dict) or metadata.get(CHECKSUMMED_KEY):
      return f"{FILENAME} is missing"
    logging.warning("checkpoint %s has no %s (saved by an older version); "
                    "restoring it unverified.", step_dir, FILENAME)
    return None
  try:
    expected = _read_json(checksums)["files"]
    if not isinstance(expected, dict):
      raise ValueError("'files' is not a mapping")
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{FILENAME} is unreadable ({short_error(e)})"
  found = _hashed_files(step_dir)
  missing = sorted(set(expected) - set(found))
  extra = sorted(set(found) - set(expected))
  if missing:
    return f"missing files: {', '.join(missing[:3])}"
  if extra:
    return f"files not in {FILENAME}: {', '.join(extra[:3])}"
  actual = _digests(step_dir, found)
  bad = [name for name in found if actual[name] != expected[name]]
  if bad:
    return (f"checksum mismatch (damaged bytes) in {len(bad)} files: "
            f"{', '.join(bad[:3])}")
  return None
