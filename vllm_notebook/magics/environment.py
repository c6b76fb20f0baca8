"""This machine: ``%vllm_doctor`` (vLLM, GPUs, Slurm, Ray, the cache, offline) and ``%vllm_models`` (the models
in the Hugging Face cache)."""

from __future__ import annotations

from IPython.core.magic import line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from ..doctor import diagnose
from ..models.hub import models_table
from .args import parse_line
from .settings import Topic


@magics_class
class EnvironmentMagics(Topic):
    """%vllm_doctor, %vllm_models."""

    @magic_arguments()
    @argument("--no-hub", action="store_true", help="do not check whether the Hub is reachable")
    @no_var_expand
    @line_magic
    def vllm_doctor(self, line: str):
        """This environment on one screen (vLLM, GPUs, Slurm, Ray, HF cache, offline), with pitfalls and fixes."""
        args = parse_line(self.vllm_doctor, line, self.shell.user_ns)
        return diagnose(in_kernel=True, check_hub=not args.no_hub)

    @magic_arguments()
    @argument("--download-dir", help="cache folder (default: $HF_HUB_CACHE, $HF_HOME/hub)")
    @no_var_expand
    @line_magic
    def vllm_models(self, line: str):
        """Models in the Hugging Face cache: size, revision, and whether this vLLM supports them."""
        args = parse_line(self.vllm_models, line, self.shell.user_ns)
        return models_table(args.download_dir)
