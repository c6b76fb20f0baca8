"""Run one node's ``ray start ... --block`` and take its whole process group down on exit.

Usage: ``python -m vllm_notebook._raynode RAY_START_COMMAND...``. ``ray start --block``
stops slowly and partly on SIGTERM (measured: gcs_server outlived it); this runner
puts Ray in a process group of its own and, on SIGTERM/SIGINT/SIGHUP or when Ray exits,
sends the group SIGTERM, then SIGKILL. It imports nothing heavy (it also runs on
remote nodes through srun).
"""

import os
import signal
import subprocess
import sys

from vllm_notebook.procs import terminate_group


def main() -> int:
    proc = subprocess.Popen(sys.argv[1:], preexec_fn=os.setpgrp)  # noqa: PLW1509 - works on py3.10 too

    def on_signal(signum, frame):
        terminate_group(proc.pid, grace=3.0)
        sys.exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = proc.wait()
    terminate_group(proc.pid, grace=3.0)
    return code


if __name__ == "__main__":
    sys.exit(main())
