"""Model references: a local path when one exists, otherwise a Hugging Face Hub repo id,
with ``@revision`` (branch, tag or commit) and ``+adapter`` as mergekit writes them
(``org/model@v2+org/lora``).

Hub references are fetched by huggingface_hub (imported here, and only when a reference
needs it) into the standard cache (``HF_HOME`` / ``HF_HUB_CACHE`` or ``cache_dir``), and only
the files a merge reads: the weights (safetensors, else ``pytorch_model*.bin``), their index,
``config.json``, ``generation_config.json``, tokenizer files, and for adapters
``adapter_config.json`` + adapter weights. ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are honoured;
a model already in the cache needs no network. Every reference of a merge is resolved, in
parallel, before anything is written; failures are :class:`ModelNotFound` (missing, private
or gated repo, missing revision or file, offline without a cached copy) or
:class:`merge_fast.MergeIOError` (a download that broke off), each naming the repo and
revision. Folders holding only ``.bin`` checkpoints are converted once (see ``_bin.py``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

from ._errors import MergeError, MergeIOError, ModelNotFound, config_error, unprefixed

__all__ = ["HubInput", "Resolved", "Request", "split_reference", "resolve", "resolve_config", "resolve_paths",
           "hub_cache_dir", "ModelNotFound"]

PathLike = Union[str, "os.PathLike[str]"]

# Besides the weights: what a merge copies or reads (config, generation config, tokenizer).
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
)
# `org/name` (or a legacy bare `name` such as gpt2): what the hub accepts as a model repo id.
_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = ("1", "on", "yes", "true")


@dataclasses.dataclass(frozen=True)
class HubInput:
    """One hub input of a merge, pinned: enough to repeat the merge exactly."""

    repo_id: str
    revision: Optional[str]  # as asked (None: the default branch)
    commit: str
    kind: str  # "model", "adapter" or "file"
    filename: Optional[str] = None  # for kind "file"

    def to_json(self) -> Dict[str, Any]:
        d = {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit, "kind": self.kind}
        if self.filename:
            d["filename"] = self.filename
        return d

    def __str__(self) -> str:
        what = f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id
        return f"{what} (revision {self.revision or 'main'}, commit {self.commit})"


@dataclasses.dataclass(frozen=True)
class Request:
    """What to resolve: `name` is a local path or a repo id (kind "file": ``org/repo/path``)."""

    name: str
    revision: Optional[str] = None
    kind: str = "model"  # "model", "adapter" or "file"


@dataclasses.dataclass(frozen=True)
class Resolved:
    path: Path  # local folder (or file) to read
    hub: Optional[HubInput]  # None for a local path


def split_reference(text: str) -> Tuple[str, Optional[str], Optional[str], Optional[str]]:
    """``org/m@rev+org/lora@rev2`` -> ("org/m", "rev", "org/lora", "rev2"). A string that
    exists as a local path is taken whole."""
    text = str(text)
    if os.path.exists(os.path.expanduser(text)):
        return text, None, None, None
    parts = text.split("+")
    if len(parts) > 2 or not all(parts):
        raise config_error(f"cannot parse model reference {text!r} (use MODEL or MODEL+LORA_ADAPTER)")

    def one(p: str) -> Tuple[str, Optional[str]]:
        if os.path.exists(os.path.expanduser(p)) or "@" not in p:
            return p, None
        name, rev = p.rsplit("@", 1)
        if not name or not rev:
            raise config_error(f"cannot parse model reference {p!r} (use NAME@REVISION)")
        return name, rev

    m, mrev = one(parts[0])
    a, arev = one(parts[1]) if len(parts) == 2 else (None, None)
    return m, mrev, a, arev


# ------------------------------------------------------------------ environment
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read when a merge runs."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    return bool(constants is not None and getattr(constants, "HF_HUB_OFFLINE", False))


def hub_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The cache huggingface_hub uses: `cache_dir`, else HF_HUB_CACHE, else HF_HOME/hub."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _endpoint() -> Optional[str]:
    e = os.environ.get("HF_ENDPOINT")
    return e.rstrip("/") if e else None


# ------------------------------------------------------------------ resolution
def resolve(requests: Sequence[Request], *, cache_dir: Optional[PathLike] = None,
            progress: bool = False) -> Dict[Request, Resolved]:
    """Resolves every request (hub downloads in parallel); all failures in one error."""
    out, errors = resolve_each(requests, cache_dir=cache_dir, progress=progress)
    raise_all(list(errors.values()))
    return out


def raise_all(errors: List[MergeError]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise type(errors[0])("; ".join(str(e) for e in errors))


def resolve_each(requests: Sequence[Request], *, cache_dir: Optional[PathLike] = None,
                 progress: bool = False) -> Tuple[Dict[Request, Resolved], Dict[Request, MergeError]]:
    """Each request's local path, or its error."""
    out: Dict[Request, Resolved] = {}
    errors: Dict[Request, MergeError] = {}
    remote: List[Request] = []
    for r in dict.fromkeys(requests):
        local = Path(os.path.expanduser(r.name))
        if local.exists():
            if r.revision is not None:
                errors[r] = config_error(f"{r.name}@{r.revision}: {r.name} is a local path; "
                                        "a revision applies only to Hugging Face Hub repos")
            else:
                out[r] = Resolved(local, None)
        else:
            remote.append(r)
    if remote:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(remote))) as pool:
            futs = {r: pool.submit(_fetch, r, cache_dir, progress) for r in remote}
            for r, f in futs.items():
                try:
                    out[r] = f.result()
                except MergeError as e:
                    errors[r] = e
    # Folders (local or downloaded) with only pytorch_model*.bin: read through a converted copy.
    from ._bin import as_safetensors

    bin_root = hub_cache_dir(cache_dir).parent / "merge_fast" / "bin-cache"
    for r, res in list(out.items()):
        if r.kind != "file":
            try:
                conv = as_safetensors(res.path, bin_root)
            except MergeError as e:
                errors[r] = e
                del out[r]
                continue
            if conv != res.path:
                out[r] = Resolved(conv, res.hub)
    return out, errors


def _where(repo: str, revision: Optional[str]) -> str:
    return f"{repo!r} (revision {revision or 'main'})"


def _hf_error(e: BaseException, r: Request, repo: str, filename: Optional[str], cache: Path) -> MergeError:
    """huggingface_hub's exception as one of ours, saying what to do."""
    hfe = _HfErrors()
    what = {"model": "model", "adapter": "LoRA adapter", "file": "file"}[r.kind]
    where = _where(repo, r.revision)
    if isinstance(e, hfe.gated):
        return ModelNotFound(f"{what} {where} is gated: accept its terms on the repo page, then log in "
                             "(`hf auth login`) or set HF_TOKEN")
    if isinstance(e, hfe.revision):
        return ModelNotFound(f"{what} {where}: revision {r.revision!r} not found on the Hub "
                             "(give a branch, tag or commit hash of the repo)")
    if isinstance(e, hfe.repo):
        return ModelNotFound(f"{what} {where} not found: no such local path, and no such repo on the Hugging Face Hub "
                             "(or it is private/gated and no valid token was sent): check the name, or log in "
                             "(`hf auth login`) / set HF_TOKEN")
    if isinstance(e, hfe.entry):
        if filename is None:  # which file of a snapshot: the end of the request's URL
            from urllib.parse import unquote

            url = str(getattr(getattr(e, "response", None), "url", ""))
            filename = unquote(url.split("/resolve/", 1)[1].split("/", 1)[-1]) if "/resolve/" in url else "?"
        return ModelNotFound(f"{what} {where}: file {filename} not found on the Hub")
    if isinstance(e, hfe.not_cached):
        if offline():
            return ModelNotFound(f"{what} {where}: no such local path, and not in the Hugging Face cache {cache} while "
                                 "HF_HUB_OFFLINE is set: run once online to download it, or point --cache-dir / "
                                 "HF_HUB_CACHE at a cache that has it")
        return ModelNotFound(f"{what} {where}: no such local path, the Hugging Face Hub could not be reached, and no "
                             f"complete copy is in the cache {cache}: check the name, the connection or HF_ENDPOINT "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hfe.http) and not (isinstance(status, int) and status >= 500):
        return ModelNotFound(f"{what} {where}: the Hub refused the request ({str(e).splitlines()[0]}); "
                             "for a private repo log in (`hf auth login`) or set HF_TOKEN")
    first = str(e).splitlines()[0] if str(e) else ""
    return MergeIOError(f"{what} {where}: download failed ({type(e).__name__}: {first}); nothing was written. "
                        "Run again to resume the download")


class _HfErrors:
    """huggingface_hub's exception classes by role; names and modules moved between
    releases (0.x: requests, 1.x: httpx, 2.x: httpx2), so each role is a tuple of whichever
    classes this installation has."""

    def __init__(self) -> None:
        import importlib
        import sys

        try:
            mod = importlib.import_module("huggingface_hub.errors")
        except ImportError:  # before 0.23
            mod = importlib.import_module("huggingface_hub.utils")

        def cls(*names: str) -> Tuple[Type[BaseException], ...]:
            return tuple(c for n in names if isinstance(c := getattr(mod, n, None), type) and issubclass(c, BaseException))

        self.gated = cls("GatedRepoError")
        self.revision = cls("RevisionNotFoundError")
        self.repo = cls("RepositoryNotFoundError")
        self.entry = cls("RemoteEntryNotFoundError", "EntryNotFoundError")
        self.http = cls("HfHubHTTPError")
        self.offline = cls("OfflineModeIsEnabled")
        self.not_cached = cls("LocalEntryNotFoundError", "OfflineModeIsEnabled", "CachedRepoTreeNotFoundError",
                              "IncompleteSnapshotError")
        # The hub is unreachable (not a refusal): the transport's connection and timeout errors.
        net: List[Type[BaseException]] = list(self.offline)
        for module, names in (("httpx2", ("ConnectError", "TimeoutException")),
                              ("httpx", ("ConnectError", "TimeoutException")), ("requests", ("ConnectionError", "Timeout"))):
            m = sys.modules.get(module)
            net += [c for n in names if isinstance(c := getattr(m, n, None), type) and issubclass(c, BaseException)] if m is not None else []
        self.unreachable = tuple(net)


def _fetch(r: Request, cache_dir: Optional[PathLike], progress: bool) -> Resolved:
    name = r.name
    filename = None
    if r.kind == "file":
        parts = name.split("/")
        repo, filename = ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) > 2 else (None, None)
    else:
        repo = name
    if repo is None or not _REPO_RE.match(repo):
        what = "ORG/REPO/FILE of a hub repo" if r.kind == "file" else "a Hugging Face repo id (org/name)"
        kind = {"model": "model", "adapter": "LoRA adapter", "file": "file"}[r.kind]
        raise ModelNotFound(f"{kind} {r.name!r} not found: no such local path, and not {what}")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise config_error(f"{r.name!r} is not a local path; hub models need huggingface_hub "
                          "(pip install huggingface_hub)") from None
    cache = hub_cache_dir(cache_dir)
    try:
        if filename is not None:  # r.kind == "file"
            path = Path(_download_file(repo, filename, r.revision, cache))
        else:
            path = Path(_download_folder(repo, r.revision, r.kind, cache, progress))
    except MergeError:
        raise
    except Exception as e:  # huggingface_hub's and the transport's errors, explained
        raise _hf_error(e, r, repo, filename, cache) from e
    path_parts = path.parts
    commit = path_parts[path_parts.index("snapshots") + 1] if "snapshots" in path_parts else "unknown"
    return Resolved(path, HubInput(repo, r.revision, commit, r.kind, filename))


def _quiet_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *a: Any, **k: Any) -> None:
            k["disable"] = True
            super().__init__(*a, **k)

    return Quiet


def _download_file(repo: str, filename: str, revision: Optional[str], cache: Path) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache), endpoint=_endpoint(),
                           local_files_only=offline())


def _download_folder(repo: str, revision: Optional[str], kind: str, cache: Path, progress: bool) -> str:
    import huggingface_hub as hf
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    revision = revision or "main"  # what huggingface_hub's downloads take for "no revision"

    local_only = offline()
    files: Optional[List[str]] = None
    if not local_only:
        try:
            info = HfApi(endpoint=_endpoint()).model_info(repo, revision=revision)
            files = [s.rfilename for s in (info.siblings or [])]
            if not files:
                files = HfApi(endpoint=_endpoint()).list_repo_files(repo, revision=revision)
        except _HfErrors().unreachable:
            # Unreachable hub (not a refusal): use the cached copy, as huggingface_hub does.
            local_only = True
    if files is None:
        if hasattr(hf, "get_cached_repo_tree"):  # 2.x: the repo's listing, cached when downloaded
            files = [f.path for f in hf.get_cached_repo_tree(repo, revision=revision, cache_dir=str(cache))]
        else:  # older releases: what the cached snapshot holds
            snap = snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=True)
            files = [f.name for f in Path(snap).iterdir()]
    top = [f for f in files if "/" not in f]

    def index_files(index: str) -> List[str]:
        p = hf_hub_download(repo, index, revision=revision, cache_dir=str(cache), endpoint=_endpoint(),
                            local_files_only=local_only)
        try:
            wm = json.loads(Path(p).read_text()).get("weight_map") or {}
        except ValueError as e:
            raise ModelNotFound(f"{_where(repo, revision)}: {index} is not valid JSON ({e})") from None
        shards = sorted(set(wm.values()))
        absent = [f for f in shards if f not in files]
        if absent:
            raise ModelNotFound(f"model {_where(repo, revision)}: file {absent[0]} not found on the Hub "
                                f"({index} names it; {len(absent)} such file(s))")
        return shards + [index]

    if kind == "adapter":
        weights: List[str] = [f for f in ["adapter_model.safetensors", "adapter_model.bin"] if f in top][:1]
        if "adapter_config.json" not in top:
            raise ModelNotFound(f"LoRA adapter {_where(repo, revision)} has no adapter_config.json (is it a PEFT adapter repo?)")
        side = ["adapter_config.json"]
    else:
        st = [f for f in top if f.endswith(".safetensors")]
        bins = [f for f in top if re.fullmatch(r"pytorch_model.*\.bin", f)]
        if "model.safetensors.index.json" in top:
            weights = index_files("model.safetensors.index.json")
        elif "model.safetensors" in top:
            weights = ["model.safetensors"]
        elif st:
            weights = st
        elif "pytorch_model.bin.index.json" in top:
            weights = index_files("pytorch_model.bin.index.json")
        else:
            weights = bins[:1] if "pytorch_model.bin" not in bins else ["pytorch_model.bin"]
        # top-level *.py: custom architectures' code (auto_map, trust_remote_code), copied to the output
        side = [f for f in top if f in SIDE_FILES or (f.endswith(".py") and "/" not in f)]
    if not weights:
        raise ModelNotFound(f"{'LoRA adapter' if kind == 'adapter' else 'model'} {_where(repo, revision)} has no weights "
                            "the merge can read (*.safetensors or pytorch_model*.bin at the top of the repo)")
    # Exact names (not globs), so a repo's other copies (consolidated.*, onnx/...) stay remote.
    allow = [re.sub(r"([\[\]*?])", r"[\1]", f) for f in weights + side]
    return snapshot_download(repo, revision=revision, cache_dir=str(cache), allow_patterns=allow, endpoint=_endpoint(),
                             local_files_only=local_only, tqdm_class=None if progress else _quiet_tqdm())


# ------------------------------------------------------------------ configs
def resolve_config(cfg: Any, ref_type: type, *, cache_dir: Optional[PathLike] = None,
                   progress: bool = False) -> Tuple[Any, List[HubInput]]:
    """Every model reference of a parsed config (merge_fast.config.schema.MergeConfig)
    resolved to local folders; returns the new config and its hub inputs, pinned.

    The config is walked generically (every ModelRef in any dataclass field, list or dict),
    so new parts of the schema need nothing here; errors name the nearest config key.
    `ref_type`: the config's model reference class (ModelRef; the config layer passes it,
    this module stays below it)."""
    ModelRef = ref_type
    where: Dict[Request, Tuple[Any, ...]] = {}  # first config key naming each reference

    def collect(m: Any, key: Tuple[Any, ...]) -> Any:
        where.setdefault(Request(m.path, m.revision, "model"), key)
        if m.lora:
            where.setdefault(Request(m.lora, m.lora_revision, "adapter"), key)
        return m

    _walk(cfg, (), ModelRef, collect)
    done, errors = resolve_each(list(where), cache_dir=cache_dir, progress=progress)
    located: List[MergeError] = []
    for r, e in errors.items():
        msg = unprefixed(e)
        located.append(config_error(f"{cfg.src.where(where[r])}: {msg}", type(e)))
    raise_all(located)

    def new(m: Any, key: Tuple[Any, ...]) -> Any:
        p = done[Request(m.path, m.revision, "model")]
        a = done[Request(m.lora, m.lora_revision, "adapter")] if m.lora else None
        if p.path == Path(os.path.expanduser(m.path)) and (a is None or a.path == Path(os.path.expanduser(m.lora))):
            return m  # local and read as it is
        return dataclasses.replace(m, path=str(p.path), lora=str(a.path) if a else None, revision=None,
                                   lora_revision=None, label=m.label or str(m))

    inputs = list(dict.fromkeys(r.hub for r in done.values() if r.hub is not None))
    return _walk(cfg, (), ModelRef, new), inputs


def _walk(obj: Any, key: Tuple[Any, ...], ref_type: type, visit: Any) -> Any:
    """`obj` with every `ref_type` inside replaced by visit(ref, config key); parts without
    any replacement are returned as they are. A dataclass with a tuple ``path`` (SourceDef,
    SliceDef, TokenSpec) carries its own config key."""
    if isinstance(obj, ref_type):
        return visit(obj, key)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        own = getattr(obj, "path", None)
        base = tuple(own) if isinstance(own, tuple) else key
        changes = {}
        for f in dataclasses.fields(obj):
            if f.name in ("src", "path"):
                continue
            v = getattr(obj, f.name)
            nv = _walk(v, base + (f.name,), ref_type, visit)
            if nv is not v:
                changes[f.name] = nv
        return dataclasses.replace(obj, **changes) if changes else obj
    if isinstance(obj, (list, tuple)):
        items = [_walk(x, key + (i,), ref_type, visit) for i, x in enumerate(obj)]
        return type(obj)(items) if any(a is not b for a, b in zip(items, obj)) else obj
    if isinstance(obj, dict):
        d = {k: _walk(v, key + (k,), ref_type, visit) for k, v in obj.items()}
        return d if any(d[k] is not obj[k] for k in obj) else obj
    return obj


def resolve_paths(models: Sequence[PathLike], *, cache_dir: Optional[PathLike] = None, progress: bool = False,
                  kind: str = "model") -> Tuple[List[Tuple[str, Optional[str]]], List[HubInput]]:
    """For the Python API: each ``model[@rev][+adapter[@rev]]`` as (local folder, local
    adapter or None), plus the hub inputs."""
    split = [split_reference(os.fspath(m)) if kind == "model" else (os.fspath(m), None, None, None) for m in models]
    reqs = []
    for m, mrev, a, arev in split:
        reqs.append(Request(m, mrev, kind))
        if a:
            reqs.append(Request(a, arev, "adapter"))
    done = resolve(reqs, cache_dir=cache_dir, progress=progress)
    out = [(str(done[Request(m, mrev, kind)].path), str(done[Request(a, arev, "adapter")].path) if a else None)
           for m, mrev, a, arev in split]
    return out, list(dict.fromkeys(r.hub for r in done.values() if r.hub is not None))


