"""A run's folder: its lock, its record (the stage, the settings and the digests of the input files,
and once finished the result), and its log, ``metrics.jsonl``. `minirlhf.train.run.Run` opens one
and adds the checkpoints and the steps; see there for what a run guarantees.

    ckpt.npz        the last checkpoint (written by `Run`)
    metrics.jsonl   one JSON object per step, each step once (also after a resume), names as TRL's;
                    a NaN or infinite metric is null
    run.json        the stage, its settings and input files, and, once finished, its result
    .lock           the process that holds the folder
"""

import contextlib
import hashlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .common import ConfigError

try:
    import fcntl
except ImportError:          # Windows: no advisory locks; runs are then not protected from each other
    fcntl = None

# what may change between the runs of one folder (the folder itself may move): none of it changes
# the numbers of the steps already taken
NOT_SETTINGS = ("quiet", "device", "overwrite", "max_steps", "ckpt_interval", "out_dir")
# config fields that name input files: a run made from other versions of them is another run
INPUT_FIELDS = ("data", "init", "prompts", "reward_model", "value_model", "ptx_data")


class RunFolder:
    """The folder ``cfg.out_dir`` of the run of ``stage`` with config ``cfg``.

    Opening it takes the folder's lock (a second live run refuses, naming its process; the lock of
    a dead process is taken over), removes the ``*.tmp`` files of a save that was killed, and reads
    ``run.json``: the same settings and inputs go on (``finished``, with its ``result``, if there is
    nothing left to do), other settings are refused unless ``cfg.overwrite``, in which case
    ``fresh`` holds the new record and `clear` replaces the old run once the new one has loaded.
    """

    def __init__(self, cfg, stage):
        self.cfg, self.stage = cfg, stage
        self.quiet = cfg.quiet
        self.max_steps = cfg.max_steps
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "ckpt.npz"
        self.metrics_path, self.record_path = self.out / "metrics.jsonl", self.out / "run.json"
        self.fresh = None      # the record of a run that starts afresh (once `clear` is called)
        self.bar = self.metrics_file = self._lock = None
        self.last = {}
        self.t0 = time.time()
        self._open_folder()
        self._lock_folder()
        for tmp in self.out.glob(".*.tmp"):  # what a save killed half-way leaves; we hold the lock
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.finished, self.result = False, None
        self._check_record()

    # ----- opening the folder -----------------------------------------------------------------

    def _open_folder(self):
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"out_dir {self.out} is a file, not a folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to out_dir {self.out}: {e.strerror or e}") from None

    def _lock_folder(self):
        """Hold ``out_dir/.lock`` (an advisory lock, released by the system when the process dies)."""
        if fcntl is None:
            return
        path = self.out / ".lock"
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"out_dir {self.out} is in use by process {holder}; wait for it to "
                              f"end, or use another --out-dir") from None
        f.seek(0)
        stale = f.read().strip()
        if stale and not self.quiet:  # the process that wrote it died without releasing it
            tqdm.write(f"{self.stage}: took over the lock of process {stale}, which is no longer running",
                       file=sys.stderr)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} ({command_line(sys.argv[1:])})\n")
        f.flush()
        self._lock = f

    def _settings(self):
        settings = {k: v for k, v in asdict(self.cfg).items() if k not in NOT_SETTINGS}
        inputs = {}
        for name in INPUT_FIELDS:
            value = getattr(self.cfg, name, None)
            if isinstance(value, str) and os.path.exists(value):
                inputs[name] = _digest(value)
        return json.loads(json.dumps({"stage": self.stage, "settings": settings, "inputs": inputs}))

    def _check_record(self):
        """Compare ``run.json`` with this run: go on, say finished, refuse, or start afresh."""
        mine = self._settings()
        old = None
        if self.record_path.exists():
            with contextlib.suppress(OSError, ValueError):
                old = json.loads(self.record_path.read_text(encoding="utf-8"))
        overwrite = self.cfg.overwrite
        has_ckpt = self.ckpt_path.exists()
        if not has_ckpt:  # nothing done yet (or a run that failed before its first checkpoint)
            return self._start_afresh(mine)
        problem = _difference(old, mine) if old is not None else "a checkpoint of an unknown run"
        if problem:
            if not overwrite:
                raise ConfigError(f"out_dir {self.out} holds {problem}; use another --out-dir, or "
                                  f"--overwrite to replace it")
            return self._start_afresh(mine)
        if old.get("finished") and self.max_steps <= old.get("max_steps", 0):
            if not overwrite:
                self.finished, self.result = True, old.get("result") or {}
                self.print(f"{self.stage}: {self.out} holds this run, finished at step "
                           f"{old.get('max_steps')}; nothing to do (--overwrite trains it again)")
                return None
            return self._start_afresh(mine)
        self._write_record({**mine, "max_steps": self.max_steps, "finished": False})

    def _start_afresh(self, record):
        """Note that the folder's old run is to be replaced: `clear` does it, once the new run's
        data and model have loaded (a typo in --data must not cost the old run)."""
        self.fresh = {**record, "max_steps": self.max_steps, "finished": False}

    def _write_record(self, record):
        tmp = self.out / ".run.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n", encoding="utf-8")
        os.replace(tmp, self.record_path)
        self.record = record

    def clear(self):
        """Replace the folder's old run by this one, if it starts afresh (see `_start_afresh`)."""
        if self.fresh is not None:
            for path in (self.ckpt_path, self.metrics_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._write_record(self.fresh)

    # ----- the log -----------------------------------------------------------------------------

    def open_metrics(self, start):
        """metrics.jsonl holding exactly the rows of steps 1..start, ready to append to."""
        rows = []
        if start and self.metrics_path.exists():
            for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError):  # a line torn by a kill is dropped
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
                        rows.append(row)
        seen = {}
        for row in rows:  # an older copy of a step (from before an earlier resume) gives way
            seen[row["step"]] = row
        rows = [seen[s] for s in sorted(seen)]
        self.last = rows[-1] if rows else {}
        tmp = self.out / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, self.metrics_path)
        self.metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        self.bar = tqdm(total=self.max_steps, initial=min(start, self.max_steps), desc=self.stage,
                        disable=self.quiet or None, dynamic_ncols=True, file=sys.stderr, leave=False)
        if start:
            self.print(f"{self.stage}: resuming at step {start} from {self.ckpt_path}")

    def log(self, step, metrics):
        """Write ``{"step", **metrics, "time"}`` as one JSON line (NaN as null), show it on the bar."""
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()},
               "time": round(time.time() - self.t0, 3)}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        shown = {k: f"{v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "time"}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        self.last = row

    def print(self, text):
        """A message that does not break the progress bar (nothing with ``quiet``)."""
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)

    def finish(self, result, summary=""):
        """Mark the run finished in ``run.json`` with ``result`` and print one summary line."""
        result = {"checkpoint": str(self.ckpt_path), **result, "steps": self.max_steps,
                  "seconds": time.time() - self.t0}
        self._write_record({**self.record, "finished": True,
                            "result": json.loads(json.dumps(result, default=_jsonable))})
        self._close_bar()
        self.print(f"{self.stage}: {self.max_steps} steps in {result['seconds']:.1f} s"
                   + (f", {summary}" if summary else "") + f"; checkpoint {self.ckpt_path}")
        self.result = result
        return result

    # ----- closing -----------------------------------------------------------------------------

    def _close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        """Release the folder (the lock, the metrics file, the bar); safe to call twice."""
        self._close_bar()
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self._lock is not None:
            self._lock.seek(0)
            self._lock.truncate()
            self._lock.close()          # closing the file releases the lock
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _difference(old, mine):
    """What makes the recorded run ``old`` another run than ``mine`` (None if it is the same)."""
    if old.get("stage") != mine["stage"]:
        return f"a {old.get('stage')} run"
    a, b = old.get("settings", {}), mine["settings"]
    diff = [f"{k}={a.get(k)!r}, not {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        return f"a {mine['stage']} run with other settings ({'; '.join(diff)})"
    changed = [k for k in sorted(set(old.get("inputs", {})) | set(mine["inputs"]))
               if old.get("inputs", {}).get(k) != mine["inputs"].get(k)]
    if changed:
        return (f"a {mine['stage']} run made from other versions of its inputs "
                f"({', '.join(f'{k} {b.get(k)}' for k in changed)} changed since)")
    return None


def _jsonable(v):
    """A metric as JSON: Python numbers, and null for NaN or infinity (JSON has neither)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _digest(path):
    """The SHA-256 of a file's bytes, or of a folder's files (names and bytes, in sorted order: a
    text corpus, a Hugging Face checkpoint): a file edited in place is another input."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, name) for d, _, names in os.walk(path) for name in names)
    for name in files:
        if files != [path]:
            h.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def command_line(argv):
    """``minirlhf <argv>`` quoted for a shell: what to type to run the same command again."""
    return "minirlhf " + shlex.join(argv)
