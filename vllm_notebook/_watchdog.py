"""Kills engine process groups when the kernel that started them is gone.

Run as ``python -m vllm_notebook._watchdog`` (``procs.guard`` starts it in a session of
its own). The kernel writes ``+PGID`` or ``-PGID`` lines to our stdin; end of file
(the kernel exited, even by SIGKILL) means: terminate every process group still listed.
"""

import signal
import sys

from vllm_notebook.procs import terminate_groups


def main() -> None:
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] in "+-" and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    terminate_groups(groups, grace=5.0)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main()
