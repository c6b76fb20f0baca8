"""The Hugging Face cache: where it is, what it holds, fetching into it on a login node.

Everything goes through ``huggingface_hub`` and its documented cache layout
(``models--ORG--NAME/{blobs,refs,snapshots}``), so what ``vllm-notebook download``
fetches is what ``%vllm_load ORG/NAME`` and vLLM find. The cache location is read
when needed, not at import: ``os.environ["HF_HOME"] = ...`` in a cell counts.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..engine import vllm_import
from ..errors import ModelNotFoundError, VllmNotebookError
from ..tables import Table

# Weights vLLM loads, best first: only the first kind a repository has is fetched.
WEIGHT_KINDS = (("*.safetensors", "model.safetensors.index.json"), ("*.bin", "pytorch_model.bin.index.json"),
                ("*.pt", None), ("*.pth", None))
# Other frameworks' copies of the weights, and things vLLM never reads.
SKIP = ("original/*", "*.onnx", "*.onnx_data", "onnx/*", "openvino/*", "coreml/*", "*.msgpack", "*.h5", "*.ot",
        "*.tflite", "*.mlmodel", "*.gguf", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.pdf")


def cache_dir(download_dir: str | None = None) -> Path:
    """The hub cache: ``--download-dir``, ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, or ``~/.cache/huggingface/hub``."""
    if download_dir:
        return Path(download_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch_hint(model: str, revision: str | None = None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"on a login node (with internet): vllm-notebook download {model}{rev}"


def ask_hub(model: str, revision: str | None, *, unreachable: str, then: str, timeout: float = 5,
            files_metadata: bool = False, token: str | None = None):
    """The Hub's ``model_info``, every failure as one line: gated, unknown, bad revision, unreachable."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return HfApi(endpoint=endpoint(), token=token).model_info(model, revision=revision, timeout=timeout,
                                                                  files_metadata=files_metadata)
    except GatedRepoError:
        raise ModelNotFoundError(f"{model} is gated: it needs a Hugging Face token. Accept its license on its Hub "
                                 f"page, run `hf auth login` (or set HF_TOKEN), then {then}") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {model} on the Hugging Face Hub (check the spelling; a private model "
                                 "needs a token: `hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{model} has no revision {revision!r} on the Hub") from None
    except HFValidationError:
        raise ModelNotFoundError(f"{model!r} is not a Hugging Face model id (ORG/NAME)") from None
    except Exception:  # noqa: BLE001 - httpx/httpx2 connection errors, HTTP errors: all "unreachable"
        raise VllmNotebookError(unreachable) from None


# ------------------------------------------------------------------ choosing files
def select_files(names: list[str]) -> list[str]:
    """The files vLLM needs from a repository: configs, tokenizer, and one kind of weights."""
    keep = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in SKIP)]
    weights: list[str] = []
    for pattern, index in WEIGHT_KINDS:
        weights = [n for n in keep if fnmatch.fnmatch(n, pattern) or n == index]
        if weights:
            break
    is_weight = {n for n in keep for pattern, _ in WEIGHT_KINDS if fnmatch.fnmatch(n, pattern)}
    index_files = {i for _, i in WEIGHT_KINDS if i}
    return sorted({n for n in keep if n not in is_weight and n not in index_files} | set(weights))


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


# ------------------------------------------------------------------ download
def download(model: str, revision: str | None = None, include: list[str] | None = None,
             download_dir: str | None = None, token: str | None = None) -> str:
    """Fetch what vLLM needs of ``model`` into the cache (progress bars by huggingface_hub); return its folder."""
    from huggingface_hub import snapshot_download

    if offline():
        raise VllmNotebookError("HF_HUB_OFFLINE is set: unset it to download (on a node with internet)")
    cache = cache_dir(download_dir)
    info = ask_hub(model, revision, files_metadata=True, timeout=15, token=token, then="download again",
                   unreachable=f"cannot reach the Hugging Face Hub at {endpoint()}: download on a node with "
                               "internet (a login node)")
    sizes = {s.rfilename: (s.size or 0) for s in info.siblings or []}
    names = list(sizes)
    wanted = [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)] if include else select_files(names)
    if not wanted:
        raise VllmNotebookError(f"no file of {model} matches {' '.join(include or [])}; it has: "
                                f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    need, free = sum(sizes[n] for n in wanted), _free_bytes(cache)
    if need > free:
        raise VllmNotebookError(f"{model} needs {human_size(need)} but {cache} has {human_size(free)} free: point HF_HOME "
                                "at a larger filesystem (e.g. project or scratch space) and download again")
    print(f"downloading {len(wanted)} of {len(names)} files of {model} ({human_size(need)}) into {cache}")
    try:
        path = snapshot_download(model, revision=info.sha, allow_patterns=wanted, cache_dir=str(cache),
                                 endpoint=endpoint(), token=token)
    except Exception as exc:  # noqa: BLE001 - a dropped connection, a full disk, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VllmNotebookError(f"downloading {model} failed ({first}); run the same command again to resume") from None
    if revision is None or revision == "main":  # snapshot_download by commit does not move refs/main
        ref = cache / f"models--{model.replace('/', '--')}" / "refs" / (revision or "main")
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(info.sha)
    return path


# ------------------------------------------------------------------ what is cached
@dataclass
class CachedModel:
    repo_id: str
    revision: str  # commit hash
    refs: list[str]
    size: int
    architectures: list[str]
    supported: bool | None  # by this vLLM (None: vLLM not installed)
    path: str


def cached_models(download_dir: str | None = None) -> list[CachedModel]:
    """Every model revision in the cache, with its size and whether this vLLM supports its architecture."""
    from huggingface_hub import scan_cache_dir

    cache = cache_dir(download_dir)
    if not cache.exists():
        return []
    supported = _supported_architectures()
    out = []
    for repo in sorted(scan_cache_dir(cache).repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            archs = _architectures(Path(rev.snapshot_path))
            ok = None if supported is None else (bool(archs) and all(a in supported for a in archs))
            out.append(CachedModel(repo.repo_id, rev.commit_hash, sorted(rev.refs), rev.size_on_disk, archs, ok,
                                   str(rev.snapshot_path)))
    return out


def _architectures(folder: Path) -> list[str]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return []
    return list(cfg.get("architectures") or [])


def _supported_architectures() -> set[str] | None:
    try:
        return vllm_import.vllm_api().supported_architectures()
    except ImportError:
        return None


@dataclass(repr=False)  # a dataclass __repr__ would win over Table's _repr_pretty_ in IPython
class ModelTable(Table):
    models: list[CachedModel]
    cache: str

    COLUMNS = ("model", "revision", "refs", "size", "architecture", "this vLLM")

    def rows(self) -> list[tuple[str, ...]]:
        yes = {True: "supported", False: "NOT supported", None: "? (vLLM not installed)"}
        return [(m.repo_id, m.revision[:10], ",".join(m.refs) or "-", human_size(m.size),
                 ",".join(m.architectures) or "(no config.json)", yes[m.supported]) for m in self.models]

    def title(self) -> str:
        return f"Hugging Face cache: {self.cache}"

    def empty(self) -> str:
        return f"no models in the Hugging Face cache ({self.cache}); fetch one with: vllm-notebook download ORG/NAME"


def models_table(download_dir: str | None = None) -> ModelTable:
    return ModelTable(cached_models(download_dir), str(cache_dir(download_dir)))


# ------------------------------------------------------------------ putting a folder into the cache
def install_folder(folder: str | os.PathLike, repo_id: str, download_dir: str | None = None,
                   ref: str = "main") -> str:
    """Store a model folder in the cache as ``repo_id`` (blobs, a snapshot of symlinks, ``refs/ref``).

    This is the layout ``hf download`` writes; ``scan_cache_dir`` and
    ``%vllm_load repo_id`` find the result. Used to offer the demo model as a
    Hub id on machines without the Hub.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha1()
    for p in files:
        digest.update(p.relative_to(folder).as_posix().encode() + b"\0" + _sha256(p).encode())
    commit = digest.hexdigest()
    repo = cache_dir(download_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for p in files:
        blob = repo / "blobs" / _sha256(p)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snapshot / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return str(snapshot)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
