"""The results journal: every finished generation, appended as it finishes, to a JSONL file beside the notebook.

A journal line is a run record (``"kind": "run"``: what made the results: model and revision, versions,
engine flags, sampling, seed, node and job) or a result (``"kind": "result"``: prompt, texts, token ids,
finish reasons, logprobs when asked, timings), which names its run and carries a ``key``: a hash of the
model, engine flags, sampling settings and prompt. Re-running a batch looks its prompts' keys up and sends
only the ones with no finished result (``Engine.run``'s ``resume``).

Why JSONL and not SQLite: each line goes out in one ``write`` on an ``O_APPEND`` descriptor, so two kernels
can append to one journal, a crash tears at most the last line (the reader skips it, and the next append
starts a fresh line), and it works on the NFS and Lustre home folders of clusters, where SQLite's locking
does not. pandas reads the records as they are.

Prompts and outputs may be private data on a shared machine, and a journal feeds results back into runs: the
file is created 0600 (``O_EXCL``) and opened without following links (``O_NOFOLLOW``); one that is not the user's
own regular file, or that the group or others may write, is neither read nor appended to (another user could have
made it first, to read what is appended or to forge results), and results go to a private journal in the cache
instead, which one line names. A result read back counts only if its run record (in the same file) is of the same
model, revision, engine flags and sampling.

The journal is on unless ``$VLLM_NOTEBOOK_JOURNAL`` is ``off`` (or ``configure(enabled=False)``,
``%config VllmMagics.journal = False``); ``$VLLM_NOTEBOOK_JOURNAL`` (or ``configure(path=...)``) may also
name its file. Without one it lies beside the notebook (``analysis.ipynb`` → ``analysis.vllm-journal.jsonl``,
from ``$JPY_SESSION_NAME``, which Jupyter's server gives kernels), else in the working folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import UnsafePathError, UsageError

SUFFIX = ".vllm-journal.jsonl"
_MISSING = object()
OFF_WORDS = ("off", "0", "false", "no")  # what turns a $VLLM_NOTEBOOK_... switch off, or on
ON_WORDS = ("on", "1", "true", "yes")
_settings: dict[str, Any] = {"enabled": None, "path": None, "notebook": None}
_open: dict[str, Journal] = {}
_lock = threading.Lock()
_told: set[str] = set()  # unsafe journals already named in a line


# ------------------------------------------------------------------ which journal
def configure(*, enabled: bool | None = None, path: str | os.PathLike | None = None,
              notebook: str | None = None) -> None:
    """Turn the journal on or off, or choose its file (``path``) or the notebook it sits beside."""
    if enabled is not None:
        _settings["enabled"] = bool(enabled)
    if path is not None:
        _settings["path"] = str(path) or None
    if notebook is not None:
        _settings["notebook"] = notebook or None


def reset() -> None:
    """Forget ``configure``: the environment and the notebook decide again."""
    _settings.update(enabled=None, path=None, notebook=None)


def enabled() -> bool:
    if _settings["enabled"] is not None:
        return _settings["enabled"]
    return enabled_by_environment()


def enabled_by_environment() -> bool:
    """False when ``$VLLM_NOTEBOOK_JOURNAL`` turns the journal off."""
    return os.environ.get("VLLM_NOTEBOOK_JOURNAL", "").strip().lower() not in OFF_WORDS


def default_path() -> Path:
    """The journal's file: configured, ``$VLLM_NOTEBOOK_JOURNAL``, beside the notebook, or in the working folder."""
    chosen = _settings["path"] or os.environ.get("VLLM_NOTEBOOK_JOURNAL", "").strip()
    if chosen and chosen.lower() not in ON_WORDS + OFF_WORDS:
        return Path(chosen).expanduser().absolute()
    notebook = _settings["notebook"] or os.environ.get("JPY_SESSION_NAME", "")
    if notebook.endswith(".ipynb"):
        nb = Path(notebook).expanduser()
        # Jupyter's server may give the path from its root; the kernel runs in the notebook's folder
        folder = nb.parent if nb.is_absolute() and nb.parent.is_dir() else Path.cwd()
        return (folder / (nb.stem + SUFFIX)).absolute()
    return (Path.cwd() / ("vllm" + SUFFIX.removeprefix(".vllm"))).absolute()


def current() -> Journal | None:
    """The journal results go to now, or None when it is off. A journal another user could read or forge is
    replaced by a private one (see the module's docstring), and one line says so, once."""
    if not enabled():
        return None
    path = default_path()
    why = unsafe(path)
    if why is None:
        return at(path)
    instead = private_fallback(path)
    if str(path) not in _told:
        _told.add(str(path))
        print(f"vllm-notebook: the results journal {path} {why}: it is neither read nor appended to "
              f"(another user could read or forge it); results go to {instead}")
    return at(instead)


def unsafe(path: Path) -> str | None:
    """Why ``path`` may not be used as a journal (a link, not a file, another user's, writable by others);
    None when it is safe or does not exist yet."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return None  # a mistake, not a trap: reading it says so in one line
    return _why_unsafe(st)


def _why_unsafe(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        import pwd

        try:
            owner = f"user {pwd.getpwuid(st.st_uid).pw_name!r}"
        except KeyError:
            owner = f"uid {st.st_uid}"
        return f"belongs to {owner}"
    if st.st_mode & 0o022:
        who = "others" if st.st_mode & 0o002 else "the group"
        return f"can be written by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_fallback(path: Path) -> Path:
    """Where results go when the journal at ``path`` is unsafe: a 0600 file in the user's private cache."""
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    name = path.name.removesuffix(SUFFIX).removesuffix(".jsonl") or "vllm"
    return paths.private_dir(paths.cache_root() / "journals") / f"{name}-{tag}{SUFFIX}"


def _open_checked(path: Path, flags: int) -> int:
    """A descriptor of ``path`` (never through a link), checked to be the user's own file closed to others."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    why = _why_unsafe(st)
    if why is not None:
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        raise UnsafePathError(f"the results journal {path} {why}: it is neither read nor appended to (another user "
                              "could read or forge it); choose a file of your own with %config VllmMagics.journal_path")
    return fd


def at(path: str | os.PathLike) -> Journal:
    """The journal in ``path`` (one object per file in this process)."""
    key = str(Path(path).expanduser().absolute())
    with _lock:
        if key not in _open:
            _open[key] = Journal(key)
        return _open[key]


# ------------------------------------------------------------------ keys and records
def result_key(identity: dict, sampling: dict, prompt: Any) -> str:
    """What a result is a result of: the model and engine flags, the sampling settings and the prompt."""
    blob = json.dumps([identity, sampling, prompt], sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def reusable(sampling: dict) -> bool:
    """Greedy results are reused; sampled ones only with a seed (the key holds it)."""
    temperature = sampling.get("temperature")
    return (temperature is not None and float(temperature) < 1e-5) or sampling.get("seed") is not None


def output_record(out: Any) -> list[dict]:
    """The completions of a vLLM ``RequestOutput`` (or ours) as JSON."""
    rows = []
    for c in out.outputs:
        row = {"text": c.text, "token_ids": list(c.token_ids or ()), "finish_reason": c.finish_reason}
        if getattr(c, "stop_reason", None) is not None:
            row["stop_reason"] = c.stop_reason
        logprobs = getattr(c, "logprobs", None)
        if logprobs:
            row["logprobs"] = [{str(t): float(getattr(lp, "logprob", lp)) for t, lp in step.items()}
                               for step in logprobs]
        rows.append(row)
    return rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=_jsonable)


# ------------------------------------------------------------------ the store
class Journal:
    """An append-only JSONL journal (see the module's docstring). Thread-safe."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._index: dict[str, dict] = {}  # key -> its latest finished result
        self._runs: dict[str, dict] = {}
        self._read_to = 0  # the index covers the file up to here
        self.torn = 0  # lines that could not be read (a crash mid-write)

    def __repr__(self) -> str:
        return f"<Journal {str(self.path)!r} {self.size_text()}>"

    # ---------------------------------------------------------------- writing
    def append(self, record: dict) -> None:
        """Add one line; the index picks it up (with other kernels' lines) at the next lookup."""
        data = (dumps(record) + "\n").encode()
        with self._lock:
            os.write(self._descriptor(), data)  # one write on O_APPEND: whole lines, even from two kernels

    def _descriptor(self) -> int:
        if self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:  # a new journal is ours alone; an existing one must already be
                    fd = _open_checked(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL)
                except FileExistsError:
                    fd = _open_checked(self.path, os.O_WRONLY | os.O_APPEND)
            except OSError as exc:
                raise self._unusable("write", exc) from None
            size = os.fstat(fd).st_size
            if size and self._last_byte() != b"\n":
                # A torn line from a crash: start a fresh one. (If another kernel is mid-write this adds a
                # blank line after its record instead, which readers skip.)
                os.write(fd, b"\n")
            self._fd = fd
        return self._fd

    def _last_byte(self) -> bytes:
        with self._reader() as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1)

    def _reader(self):
        """The journal opened for reading, checked as ``_open_checked`` checks it."""
        return os.fdopen(_open_checked(self.path, os.O_RDONLY), "rb")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _unusable(self, what: str, exc: OSError) -> UsageError:
        return UsageError(f"cannot {what} the results journal {self.path}: {exc.strerror}; choose another file with "
                          "%config VllmMagics.journal_path = '...', or turn it off with %config VllmMagics.journal = False")

    # ---------------------------------------------------------------- reading
    def _catch_up(self) -> None:
        """Index what was appended since the last read (by us or another kernel); torn lines are skipped."""
        try:
            self._read_new()
        except FileNotFoundError:
            return
        except OSError as exc:  # a folder, no permission, a broken NFS handle: one line
            raise self._unusable("read", exc) from None

    def _read_new(self) -> None:
        """Index the lines appended since the last read."""
        with self._reader() as f:
            size = os.fstat(f.fileno()).st_size
            if size < self._read_to:  # replaced or truncated: start over
                self._index.clear()
                self._runs.clear()
                self._read_to = 0
            if size == self._read_to:
                return
            f.seek(self._read_to)
            data = f.read(size - self._read_to)
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        for line in data[:end].splitlines():
            record = self._parse(line)
            if record is None:
                continue
            if record.get("kind") == "result" and record.get("key"):
                self._index[record["key"]] = record
            elif record.get("kind") == "run":
                self._runs[record.get("run", "")] = record
        self._read_to += end

    def _parse(self, line: bytes) -> dict | None:
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except ValueError:
            self.torn += 1
            return None
        return record if isinstance(record, dict) else None

    def lookup(self, keys: list[str], run: dict | None = None) -> dict[str, dict]:
        """The finished results the journal holds for ``keys``; with ``run`` (fields of a run record), only those
        whose own run record has the same values for them."""
        with self._lock:
            self._catch_up()
            found = {k: self._index[k] for k in keys if k in self._index}
            if run is not None:
                want = json.loads(dumps(run))
                found = {k: r for k, r in found.items()
                         if all(self._runs.get(r.get("run", ""), {}).get(f, _MISSING) == v for f, v in want.items())}
            return found

    def records(self) -> list[dict]:
        """Every readable line, oldest first (torn lines skipped)."""
        try:
            with self._reader() as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._unusable("read", exc) from None
        return [r for r in map(self._parse, lines) if r is not None]

    def runs(self) -> dict[str, dict]:
        with self._lock:
            self._catch_up()
            return dict(self._runs)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def size_text(self) -> str:
        records = len(self._index)
        size = self.size()
        unit = next(((size / d, u) for d, u in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")) if size >= d),
                    (size, "B"))
        return f"{unit[0]:.1f} {unit[1]}" + (f", {records:,} results" if records else "")

    def history(self):
        """Every result, one row per completion, with its run's model, revision, versions and sampling."""
        try:
            import pandas as pd
        except ImportError:
            raise UsageError("history() needs pandas: pip install pandas") from None
        runs: dict[str, dict] = {}
        rows = []
        for r in self.records():
            if r.get("kind") == "run":
                runs[r.get("run", "")] = r
                continue
            if r.get("kind") != "result":
                continue
            run = runs.get(r.get("run", ""), {})
            for k, c in enumerate(r.get("outputs") or ()):
                rows.append({
                    "time": pd.Timestamp(r.get("time", 0), unit="s"), "run": r.get("run"),
                    "engine": run.get("engine"), "model": run.get("model"), "revision": run.get("revision"),
                    "prompt": r.get("prompt"), "completion": k, "text": c.get("text"),
                    "tokens": len(c.get("token_ids") or ()), "finish_reason": c.get("finish_reason"),
                    "temperature": (run.get("sampling") or {}).get("temperature"),
                    "seed": (run.get("sampling") or {}).get("seed"),
                    "elapsed_s": r.get("elapsed_s"), "key": r.get("key"),
                })
        df = pd.DataFrame.from_records(rows, columns=[
            "time", "run", "engine", "model", "revision", "prompt", "completion", "text", "tokens",
            "finish_reason", "temperature", "seed", "elapsed_s", "key"])
        df.attrs["journal"] = str(self.path)
        df.attrs["runs"] = runs
        return df


def history(path: str | os.PathLike | None = None):
    """The results journal (``path``, or the current one) as a pandas DataFrame, one row per completion.

    The run records (model, revision, versions, engine flags, sampling, node, job) are in ``df.attrs["runs"]``.
    """
    return at(path if path is not None else default_path()).history()


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()
