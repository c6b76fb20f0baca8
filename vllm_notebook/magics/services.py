"""What runs beside the kernel: ``%vllm_servers`` (servers that outlive it), ``%vllm_jobs`` (engines as Slurm
jobs) and ``%vllm_cluster`` (the allocation and the Ray cluster)."""

from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from ..cluster import ray as ray_cluster
from ..cluster.allocation import Allocation
from ..engine.registry import engines
from ..errors import UsageError
from ..server import process as server_process
from ..server import record as servers
from ..backends import slurm_job
from ..ui.cluster_view import ClusterView
from .args import parse_line
from .settings import Topic


@magics_class
class ServiceMagics(Topic):
    """%vllm_servers, %vllm_jobs, %vllm_cluster."""

    @magic_arguments()
    @argument("--stop", metavar="ID", help="stop this registered server (id, port, URL or model)")
    @no_var_expand
    @line_magic
    def vllm_servers(self, line: str):
        """vLLM servers started with %vllm_load --server (by any kernel of yours): model, URL, uptime, job."""
        args = parse_line(self.vllm_servers, line, self.shell.user_ns)
        if args.stop:
            rec = servers.lookup(args.stop)
            for eng in list(engines().values()):
                if eng.backend.uses_server(rec.id):
                    eng.detach()
            server_process.stop(rec)
            print(f"stopped the server {rec.id} at {rec.url} ({rec.model})")
            return None
        return servers.listing()

    @magic_arguments()
    @argument("--cancel", metavar="WHAT", help="cancel this submission (engine name, job id, record or model)")
    @no_var_expand
    @line_magic
    def vllm_jobs(self, line: str):
        """Engines submitted as Slurm jobs (%vllm_load --slurm), by any kernel of yours: state, node, time left."""
        args = parse_line(self.vllm_jobs, line, self.shell.user_ns)
        if args.cancel:
            rec = slurm_job.lookup(args.cancel)
            for eng in list(engines().values()):
                if eng.backend.same_as(("slurm", rec.id)):
                    eng.detach()
            print(slurm_job.cancel(rec))
            return None
        return slurm_job.listing()

    @magic_arguments()
    @argument("--up", action="store_true", help="start the Ray cluster across the allocation (or attach)")
    @argument("--down", action="store_true", help="stop the Ray cluster we started; detach from one we did not")
    @argument("--ray-address", help="attach to this Ray cluster instead of starting one")
    @argument("--timeout", type=float, default=180, help="seconds to wait for every node to join")
    @no_var_expand
    @line_magic
    def vllm_cluster(self, line: str):
        """The Slurm allocation, the plans of loaded engines and the Ray cluster; --up / --down manage Ray."""
        args = parse_line(self.vllm_cluster, line, self.shell.user_ns)
        if args.up and args.down:
            raise UsageError("%vllm_cluster: --up or --down, not both")
        if args.down:
            print(ray_cluster.down())
            return None
        alloc = Allocation.from_env()
        if args.up:
            ray_cluster.up(alloc, args.ray_address, timeout=args.timeout, keep=True)
        return ClusterView.collect(alloc, ray_cluster.current())
