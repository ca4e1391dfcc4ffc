"""The Ray executor: the driver has resolved and validated the plan; here it asks the engine
for the output layout (checking everything again, still before any write), splits the
output shards into groups balanced by bytes, and runs one Ray task per group. Each task
opens the inputs itself and runs the same Rust engine on its shards' tensors, writing
only its shard files into the shared staging folder (created or truncated, then positioned
writes of the same bytes, so a retried task is idempotent). The driver then writes the
index; the caller (``_folders.execute``) adds side files and commits the staging folder
atomically, so a driver that dies leaves only a hidden staging folder."""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import _core
from .._errors import InvalidCheckpoint, MergeError, io_error

INDEX_NAME = "model.safetensors.index.json"


def balance(sizes: Sequence[int], groups: int) -> List[List[int]]:
    """Greedy longest-first: each shard (largest first) goes to the lightest group. Returns
    non-empty groups of shard indices, each sorted."""
    groups = max(1, min(groups, len(sizes)))
    load = [0] * groups
    out: List[List[int]] = [[] for _ in range(groups)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = min(range(groups), key=lambda k: (load[k], k))
        out[g].append(i)
        load[g] += sizes[i]
    return [sorted(g) for g in out if g]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _node() -> str:
    try:
        import ray

        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - only used in a message
        return socket.gethostname()


def run_shards(plan_json: str, out_dir: str, shards: List[int], threads: Optional[int],
               progress: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """One task's work (plain Python, also callable without Ray): run the plan restricted to
    `shards` into `out_dir`; returns counts, and a sha256 per file written."""
    plan = json.loads(plan_json)
    for p in plan["inputs"]:
        if not os.path.exists(p):
            raise InvalidCheckpoint(f"invalid checkpoint {p}: not visible on node {_node()} "
                                    f"(inputs must be on storage every worker sees)")
    if not os.path.isdir(out_dir):
        raise io_error(f"staging folder {out_dir} is not visible on node {_node()} "
                           f"(the output must be on storage every worker sees)")
    plan["only_shards"] = shards
    cb = None
    if progress is not None:
        def cb(done: int, total: int, bytes_done: int, bytes_total: int) -> None:
            progress(bytes_done)
    stats = dict(_core.execute_plan(json.dumps(plan), out_dir, threads=threads, progress=cb))
    stats["sha256"] = {Path(f).name: _sha256(Path(f)) for f in stats["files"]}
    stats["files"] = [Path(f).name for f in stats["files"]]
    import resource

    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this worker, so far
    stats["node"] = _node()
    return stats


class RayRunner:
    """A plan runner (see ``merge_fast.distributed.run_plan``) that uses a Ray cluster:
    `address` as ``ray.init(address=...)`` (``None``: the running Ray of this process, else
    a new local one; ``"auto"``: the cluster of this node)."""

    def __init__(self, address: Optional[str] = None, *, max_retries: int = 3, tasks: Optional[int] = None):
        self.address = address
        self.max_retries = int(max_retries)
        self.tasks = tasks
        self.last: Optional[Dict[str, Any]] = None  # per-task results of the last run (tests, logs)

    def __call__(self, plan_json: str, tmp: Path, threads: Optional[int], progress) -> Dict[str, Any]:
        layout = _core.plan_layout(plan_json)  # every plan error, on the driver, before any task
        shards: List[Tuple[str, List[str], int]] = layout["shards"]
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        n = self.tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
        groups = balance([s[2] for s in shards], n)
        total_bytes = sum(s[2] for s in shards)
        n_tensors = sum(len(s[1]) for s in shards)

        counter = _Counter.remote() if progress is not None else None
        plan_ref = ray.put(plan_json)
        task = ray.remote(_task).options(max_retries=self.max_retries, retry_exceptions=False, num_cpus=1)
        refs = [task.remote(plan_ref, str(tmp), g, threads, counter, k) for k, g in enumerate(groups)]
        results: Dict[Any, Dict[str, Any]] = {}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
                for r in done:
                    results[r] = ray.get(r)
                if progress is not None and counter is not None:
                    got = ray.get(counter.total.remote())
                    progress(sum(len(shards[i][1]) for g, r in zip(groups, refs) if r in results for i in g),
                             n_tensors, got, total_bytes)
        except ray.exceptions.RayTaskError as e:
            for r in pending:
                ray.cancel(r, force=True)
            cause = getattr(e, "cause", None)
            if isinstance(cause, MergeError):
                raise cause from None  # the error a local run raises, on the driver
            raise MergeError(f"merge task failed on the Ray cluster: {e}") from e
        except ray.exceptions.RayError as e:  # a worker or node lost beyond max_retries
            for r in pending:
                ray.cancel(r, force=True)
            raise MergeError(f"merge task failed on the Ray cluster after {self.max_retries} "
                             f"retries: {type(e).__name__}: {e}") from e
        except BaseException:
            for r in pending:
                ray.cancel(r, force=True)
            raise
        finally:
            if counter is not None:
                ray.kill(counter)
        per_task = [results[r] for r in refs]
        if progress is not None:  # the tasks' last reports to the counter may still be in flight
            progress(n_tensors, n_tensors, total_bytes, total_bytes)
        self.last = {"groups": groups, "results": per_task}
        files = [name for name, _, _ in shards]
        bytes_written = sum(t["bytes_written"] for t in per_task)
        for name, _, size in shards:
            if not (tmp / name).is_file():
                raise io_error(f"shard {name} is missing from {tmp} after its task finished "
                                   f"(is the output on storage every worker sees?)")
        if layout["index"] is not None:
            (tmp / INDEX_NAME).write_text(layout["index"])
            bytes_written += (tmp / INDEX_NAME).stat().st_size
            files.append(INDEX_NAME)
        return {
            "tensors_written": sum(t["tensors_written"] for t in per_task),
            "bytes_read": sum(t["bytes_read"] for t in per_task),
            "bytes_written": bytes_written,
            "files": [str(tmp / f) for f in files],
            "sha256": {k: v for t in per_task for k, v in t["sha256"].items()},
            # Notes of the whole plan (mixed input dtypes) come from every task: once each.
            "notes": list(dict.fromkeys(n for t in per_task for n in t.get("notes", ()))),
        }


def _task(plan_json: str, out_dir: str, shards: List[int], threads: Optional[int], counter, key: int):
    report = None
    if counter is not None:
        def report(bytes_done: int) -> None:
            counter.set.remote(key, bytes_done)
        report(0)  # a retried task starts its count again
    return run_shards(plan_json, out_dir, shards, threads, report)


def _make_counter():
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        """Bytes done per task (the latest count each task reported), for one progress bar."""

        def __init__(self) -> None:
            self.done: Dict[int, int] = {}

        def set(self, key: int, n: int) -> None:
            self.done[key] = n

        def total(self) -> int:
            return sum(self.done.values())

    return Counter


class _LazyCounter:
    _cls: Any = None  # the Ray actor class, made on first use (ray is imported lazily)

    def remote(self):
        if _LazyCounter._cls is None:
            _LazyCounter._cls = _make_counter()
        return _LazyCounter._cls.remote()


_Counter = _LazyCounter()
