"""Run one node's ``ray start ... --block`` and take its whole process group down on exit.

Usage: ``python -m vllm_notebook._raynode RAY_START_COMMAND...``. ``ray start --block``
stops slowly and partly on SIGTERM (measured: gcs_server outlived it); this runner
puts Ray in a process group of its own and, on SIGTERM/SIGINT/SIGHUP or when Ray exits,
sends the group SIGTERM, then SIGKILL. Standard library only (it also runs on
remote nodes through srun).
"""

import os
import signal
import subprocess
import sys
import time


def _stop(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except OSError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except OSError:
                return
            time.sleep(0.1)


def main() -> int:
    proc = subprocess.Popen(sys.argv[1:], preexec_fn=os.setpgrp)  # noqa: PLW1509 - stdlib only, py3.10

    def on_signal(signum, frame):
        _stop(proc.pid)
        sys.exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = proc.wait()
    _stop(proc.pid)
    return code


if __name__ == "__main__":
    sys.exit(main())
