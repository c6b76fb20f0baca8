"""Run one node's ``ray start ... --block`` and take its whole process group down on exit.

Usage: ``python -m vllm_notebook._raynode [--token-dir DIR] RAY_START_COMMAND...``.

With ``--token-dir`` the cluster's token is read from stdin (never argv, never a file on another node)
and written on this node into DIR/token (0600), DIR a folder only we can enter (0700, checked: a folder
someone else made is refused). Ray's ``--temp-dir`` is created in the same private parent (Ray itself
makes it world-writable, but nobody else can enter the parent). The token folder is removed when Ray
exits.

``ray start --block`` stops slowly and partly on SIGTERM (measured: gcs_server outlived it); this runner
puts Ray in a process group of its own and, on SIGTERM/SIGINT/SIGHUP or when Ray exits, sends the group
SIGTERM, then SIGKILL. It imports nothing heavy (it also runs on remote nodes through srun).
"""

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

from vllm_notebook.procs import terminate_group


def private_dir(path: Path) -> Path:
    """``path`` (and a missing parent) made 0700 and checked to be ours; exits with one line otherwise."""
    for p in (path.parent, path):
        try:
            p.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            sys.exit(f"vllm-notebook: cannot create {p}: {exc.strerror}")
        st = p.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            sys.exit(f"vllm-notebook: {p} exists and is not a folder of ours: refusing to put the Ray token there")
        os.chmod(p, 0o700)
    return path


def write_token(directory: Path, token: str) -> Path:
    path = private_dir(directory) / "token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


def main() -> int:
    argv, cleanup = sys.argv[1:], []
    if argv[:1] == ["--token-dir"]:
        directory, argv = Path(argv[1]), argv[2:]
        token = sys.stdin.readline().strip()
        if not token:
            sys.exit("vllm-notebook: no Ray token on stdin")
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(write_token(directory, token)))
        cleanup.append(directory)
    for arg in argv:
        if arg.startswith("--temp-dir="):
            private_dir(Path(arg.split("=", 1)[1]))
    proc = subprocess.Popen(argv, preexec_fn=os.setpgrp, stdin=subprocess.DEVNULL)  # noqa: PLW1509

    def finish(code: int) -> int:
        terminate_group(proc.pid, grace=3.0)
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)
        return code

    def on_signal(signum, frame):
        sys.exit(finish(0))

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return finish(proc.wait())


if __name__ == "__main__":
    sys.exit(main())
