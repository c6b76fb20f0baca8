"""A real ipykernel driven through jupyter_client, for tests that need a kernel process."""

from __future__ import annotations

import contextlib
import os
import queue
import time
import uuid
from pathlib import Path

import psutil
from jupyter_client.manager import KernelManager
from jupyter_core.paths import jupyter_runtime_dir


def engine_processes(pid: int) -> list[psutil.Process]:
    """The kernel's engine processes (not our watchdog, nor multiprocessing's resource tracker)."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    keep = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "_watchdog" not in cmd and "resource_tracker" not in cmd:
            keep.append(p)
    return keep


def ray_processes() -> list[str]:
    """Command lines of the processes a Ray cluster of ours runs (its head's and a node's daemons)."""
    return processes_running(("raylet", "gcs_server", "vllm_notebook._raynode"))


def ray_gone(timeout: float = 30) -> list[str]:
    """Wait up to ``timeout`` s for no Ray process of ours (a stopped cluster's daemons take seconds to exit);
    what is still running then."""
    deadline = time.monotonic() + timeout
    while (left := ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


def processes_running(names: tuple[str, ...]) -> list[str]:
    """Command lines (cut to 120 characters) of processes whose command line holds one of ``names``,
    pytest's own excepted (e.g. Ray's: raylet, gcs_server)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in names) and "pytest" not in cmd:
            found.append(cmd[:120])
    return found


def kernel_manager(kernel_name: str = "python3") -> KernelManager:
    """A manager whose connection file is where Jupyter's server puts it (the runtime folder, in $HOME).

    jupyter_client alone would write it under /tmp, which a kernel started on another node through srun
    (each dev-cluster node has a /tmp of its own) cannot see.
    """
    os.makedirs(jupyter_runtime_dir(), mode=0o700, exist_ok=True)
    return KernelManager(kernel_name=kernel_name,
                         connection_file=os.path.join(jupyter_runtime_dir(), f"kernel-{uuid.uuid4()}.json"))


#: The autogroup nice of a session whose engines compete with this test process for the cores: see ``yield_cpu``.
YIELD_NICE = 10


def yield_cpu(pid: int, nice: int | None = None) -> None:
    """Lower the scheduler weight of ``pid``'s session (a Linux autogroup: a kernel and the engines it starts, or a
    server in its own session) so that this process, the client, is not starved while they use every core.

    Measured here (2 cores, kernel 6.18, a TP 2 CPU engine streaming, which asks for ~2.6 cores): a process of
    another session that sleeps 10 ms at a time was held for up to 0.7-3.7 s, and this client read a stream's
    first update, or sent its interrupt, only when the stream had ended (30 of 40 trials with two busy loops
    beside it). With the engine's autogroup at nice 10: at most 1.3 ms in 8 streams, and no throughput change
    that this machine's noise shows. docs/cluster.md's Troubleshooting gives users the same line.
    """
    with contextlib.suppress(OSError):  # no autogroups (kernel built without them, not Linux)
        Path(f"/proc/{pid}/autogroup").write_text(str(YIELD_NICE if nice is None else nice))


class Kernel:
    def __init__(self, kernel_name: str = "python3", env: dict | None = None):
        self.km = kernel_manager(kernel_name)
        self.km.start_kernel(**({"env": {**os.environ, **env}} if env else {}))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.yield_cpu()

    def yield_cpu(self) -> None:
        """The kernel's session yields the cores to this client (``yield_cpu``)."""
        yield_cpu(self.pid)

    def restart(self) -> None:
        """Kernel > Restart: a new kernel process (engines in servers live on)."""
        self.km.restart_kernel(now=False)
        self.kc.wait_for_ready(timeout=60)
        self.yield_cpu()

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def submit(self, code: str) -> str:
        return self.kc.execute(code)

    def collect(self, msg_id: str, timeout: float = 120, on_update=None) -> tuple[str, dict | None]:
        """Text of every output of one execution, and its error (if any).

        ``on_update()`` is called once, at the first display update (streamed text).
        """
        text, error, deadline = [], None, time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no idle status within {timeout} s; got: {''.join(text)[-2000:]}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind in ("display_data", "update_display_data", "execute_result"):
                text.append(content["data"].get("text/plain", "") + "\n")
                if kind == "update_display_data" and on_update is not None:
                    on_update()
                    on_update = None
            elif kind == "error":
                error = content
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(text), error

    def interrupted(self, code: str, timeout: float = 60) -> tuple[str, dict | None, float | None]:
        """Run ``code``, interrupt the kernel at its first streamed update (Kernel > Interrupt, Ctrl-C).

        Returns the output, the error (if any) and the seconds from the interrupt to the kernel being idle
        (None if nothing was streamed, so no interrupt was sent).
        """
        sent: list[float] = []

        def interrupt():
            sent.append(time.monotonic())
            self.km.interrupt_kernel()

        submitted = time.monotonic()
        out, error = self.collect(self.submit(code), timeout, on_update=interrupt)
        self.interrupt_sent_after = (sent[0] - submitted) if sent else None  # s from submitting to the interrupt
        return out, error, (time.monotonic() - sent[0]) if sent else None

    def run(self, code: str, timeout: float = 120) -> str:
        out, error = self.collect(self.submit(code), timeout)
        if error:
            raise AssertionError(f"{error['ename']}: {error['evalue']}\n" + "\n".join(error["traceback"]) + out)
        return out

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)
