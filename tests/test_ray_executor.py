"""The Ray executor on a real local Ray cluster (one per module, 2 CPUs, 127.0.0.1): configs
run as Ray tasks write byte-identical folders to the local engine (many small output shards,
so several tasks each write several shards); a worker SIGKILLed mid-task (synchronised on a
marker file it writes) is retried by Ray and the output is still identical; a bad input
raises the local MergeError on the driver before any task is submitted."""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import merge_fast as mf  # noqa: E402
from merge_fast.distributed import use_executor  # noqa: E402
from merge_fast.distributed._ray import RayRunner, balance  # noqa: E402

from conftest import build_model_dirs  # noqa: E402

ARM_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / f"mf-ray-test-{os.getpid()}"


def _worker_setup() -> None:
    """Runs in every Ray worker: the first engine run that finds ARM_DIR/arm (renamed away
    atomically, so only one wins) writes its PID after its first tensor and waits to be
    killed. Inert otherwise."""
    import merge_fast._core as core

    real = core.execute_plan
    arm_dir = ARM_DIR

    def execute_plan(plan_json, out_dir, threads=None, progress=None):
        def cb(*args):
            try:
                os.rename(arm_dir / "arm", arm_dir / "taken")
            except OSError:
                pass
            else:
                (arm_dir / "pid.tmp").write_text(str(os.getpid()))
                os.rename(arm_dir / "pid.tmp", arm_dir / "pid")
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:  # killed by the test long before
                    time.sleep(0.01)
                raise RuntimeError("test worker was not killed")
            if progress is not None:
                progress(*args)
        return real(plan_json, out_dir, threads=threads, progress=cb)

    core.execute_plan = execute_plan


@pytest.fixture(scope="module")
def cluster():
    ARM_DIR.mkdir(parents=True, exist_ok=True)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _worker_setup,
                          "env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_models")
    d = build_model_dirs(root / "m", "llama", "bfloat16", sharded=True, names=("base", "a", "b"), layers=4)
    d.update(build_model_dirs(root / "w", "llama", names=("wide",), layers=4, hidden=48, seed=5))
    return d


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


CONFIGS = {
    "linear": """
        models:
          - model: {a}
            parameters: {{weight: 0.3}}
          - model: {b}
            parameters: {{weight: 0.7}}
        merge_method: linear
        dtype: bfloat16
        """,
    "slerp": """
        base_model: {a}
        models: [{{model: {a}}}, {{model: {b}}}]
        merge_method: slerp
        parameters: {{t: [0.1, 0.6, 0.9]}}
        dtype: bfloat16
        """,
    "ties": """
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.4, density: 0.7}}
        merge_method: ties
        dtype: bfloat16
        """,
    "dare_ties": """
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.4, density: 0.3}}
        merge_method: dare_ties
        dtype: bfloat16
        """,
    "model_stock": """
        base_model: {base}
        models: [{{model: {a}}}, {{model: {b}}}]
        merge_method: model_stock
        dtype: bfloat16
        """,
    "frankenmerge": """
        slices:
          - sources: [{{model: {a}, layer_range: [0, 3]}}]
          - sources: [{{model: {b}, layer_range: [1, 4]}}]
        merge_method: passthrough
        dtype: bfloat16
        """,
}


def _cfg(tmp_path: Path, name: str, models) -> Path:
    f = tmp_path / f"{name}.yml"
    f.write_text(textwrap.dedent(CONFIGS[name]).format(**{k: str(v) for k, v in models.items()}))
    return f


def test_import_merge_fast_does_not_import_ray():
    from conftest import run_py

    r = run_py("import sys, merge_fast, merge_fast.distributed; "
               "m = merge_fast.__all__; assert 'ray' not in sys.modules, 'ray imported'")
    assert r.returncode == 0, r.stderr


def test_balance_by_bytes():
    # largest first to the lightest group: 5->g0, 4->g1, 3->g1 (7), 2->g0 (7), 1->g0 (tie: first)
    assert balance([5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]
    g = balance([5, 1, 4, 2, 3], 2)
    assert sorted(i for x in g for i in x) == [0, 1, 2, 3, 4]
    assert sorted(sum([5, 1, 4, 2, 3][i] for i in x) for x in g) == [7, 8]
    assert balance([3], 4) == [[0]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_byte_identical_to_local(cluster, models, tmp_path, name):
    cfg = _cfg(tmp_path, name, models)
    # Same folder name: the model card names the output.
    local = mf.run(cfg, out=tmp_path / "local" / "out", out_shard_size="30KB", random_seed=7)
    seen = []
    if name == "frankenmerge":  # the CLI, on the Ray this process already runs
        from merge_fast.cli import main

        assert main(["run", str(cfg), str(tmp_path / "ray" / "out"), "--out-shard-size", "30KB",
                     "--random-seed", "7", "--ray", "-q"]) == 0
        remote = local
        seen.append((0, 0, 1, 1))
        got = _files(tmp_path / "ray" / "out")
    else:
        remote = mf.run(cfg, out=tmp_path / "ray" / "out", out_shard_size="30KB", random_seed=7,
                        executor="ray", progress=lambda *a: seen.append(a))
        got = _files(remote.path)
    want = _files(local.path)
    n_shards = sum(1 for f in want if f.endswith(".safetensors"))
    assert n_shards >= 4 and "model.safetensors.index.json" in want
    assert got.keys() == want.keys()
    for f in want:
        assert got[f] == want[f], f
    assert (remote.tensors_written, remote.bytes_read, remote.bytes_written) == \
        (local.tensors_written, local.bytes_read, local.bytes_written)
    # one progress stream over bytes of all tasks, ending complete
    if name == "frankenmerge":
        return
    assert seen and seen[-1][2] == seen[-1][3] == sum(
        (local.path / f).stat().st_size for f in want if f.endswith(".safetensors")) - sum(
        8 + int.from_bytes((local.path / f).read_bytes()[:8], "little") for f in want if f.endswith(".safetensors"))


def test_folder_functions_take_executor(cluster, models, tmp_path):
    """The Python folder functions run on Ray with ``executor="ray"``, byte-identical to the
    local engine; arrays have no executor."""
    import numpy as np

    calls = [
        ("ties", lambda **kw: mf.ties(models["base"], [models["a"], models["b"]], [0.6, 0.4], [0.5, 0.7],
                                      max_shard_size="30KB", seed=3, **kw)),
        ("linear", lambda **kw: mf.linear([models["a"], models["b"]], [0.3, 0.7], max_shard_size="30KB", **kw)),
    ]
    for name, call in calls:
        local = call(out=tmp_path / "local" / name)
        remote = call(out=tmp_path / "ray" / name, executor="ray")
        want, got = _files(local.path), _files(remote.path)
        assert sum(f.endswith(".safetensors") for f in want) >= 4
        assert got == want, name
    # Inside a use_executor block the functions' default keeps the block's executor.
    from merge_fast.distributed import _RUNNER

    runner = RayRunner(tasks=2)
    token = _RUNNER.set(runner)
    try:
        inner = calls[0][1](out=tmp_path / "block" / "ties")
    finally:
        _RUNNER.reset(token)
    assert runner.last is not None and len(runner.last["results"]) == 2
    assert _files(inner.path) == _files(tmp_path / "local" / "ties")
    a = np.ones(4, np.float32)
    with pytest.raises(mf.ConfigError, match="executor"):
        mf.linear([a, a], executor="ray")


def test_killed_worker_is_retried(cluster, models, tmp_path):
    cfg = _cfg(tmp_path, "ties", models)
    local = mf.run(cfg, out=tmp_path / "local" / "out", out_shard_size="30KB")
    for f in ("pid", "taken"):
        (ARM_DIR / f).unlink(missing_ok=True)
    (ARM_DIR / "arm").write_text("")
    runner = RayRunner(max_retries=2, tasks=2)
    import threading

    box = {}

    def merge():
        from merge_fast import distributed

        token = distributed._RUNNER.set(runner)
        try:
            box["r"] = mf.run(cfg, out=tmp_path / "ray" / "out", out_shard_size="30KB")
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["e"] = e
        finally:
            distributed._RUNNER.reset(token)

    t = threading.Thread(target=merge)
    t.start()
    while not (ARM_DIR / "pid").exists():  # the task has written a tensor and now waits
        assert t.is_alive(), box
        time.sleep(0.01)
    pid = int((ARM_DIR / "pid").read_text())
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    assert not t.is_alive() and "e" not in box, box
    want, got = _files(local.path), _files(box["r"].path)
    assert got == want
    assert (ARM_DIR / "taken").exists() and not (ARM_DIR / "arm").exists()


def test_bad_input_fails_on_driver_before_any_task(cluster, models, tmp_path, monkeypatch):
    f = tmp_path / "bad.yml"
    f.write_text(textwrap.dedent(f"""
        models: [{{model: {models['a']}}}, {{model: {models['wide']}}}]
        merge_method: linear
        """))
    with pytest.raises(mf.MergeError) as local:
        mf.run(f, out=tmp_path / "local")

    def no_tasks(*a, **k):
        raise AssertionError("a Ray task was submitted")

    monkeypatch.setattr(ray, "remote", no_tasks)
    with pytest.raises(mf.MergeError) as remote:
        with use_executor("ray"):
            mf.run(f, out=tmp_path / "ray")
    assert type(remote.value) is type(local.value) and str(remote.value) == str(local.value)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "local").exists()
    assert not [p for p in tmp_path.iterdir() if "merge-fast" in p.name]


def test_error_inside_a_task_is_the_local_error(cluster, tmp_path):
    """A data error found only while merging (an infinite weight) is raised by the task and
    re-raised on the driver as the same MergeError a local run raises; no output is left."""
    import numpy as np

    from conftest import st_write

    for k, bad in (("x", False), ("y", True)):
        (tmp_path / k).mkdir()
        w = np.ones((8, 8), np.float32)
        if bad:
            w[3, 5] = np.inf
        st_write(tmp_path / k / "model.safetensors", {"w": w, "v": np.ones(4, np.float32)})
    with pytest.raises(mf.MergeError) as local:
        mf.linear([tmp_path / "x", tmp_path / "y"], out=tmp_path / "local")
    with pytest.raises(mf.MergeError) as remote:
        with use_executor("ray", max_retries=0):
            mf.linear([tmp_path / "x", tmp_path / "y"], out=tmp_path / "ray")
    assert type(remote.value) is type(local.value) and str(remote.value) == str(local.value)
    assert "'w'" in str(remote.value)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("x", "y")]


def test_task_that_cannot_see_an_input_names_node_and_path(tmp_path):
    """What one task does when its node lacks an input (run here without Ray: the same code)."""
    import json
    import socket

    from merge_fast.distributed._ray import run_shards

    plan = {"inputs": [str(tmp_path / "nowhere")], "tensors": [], "max_shard_size": 1000}
    with pytest.raises(mf.InvalidCheckpoint) as e:
        run_shards(json.dumps(plan), str(tmp_path), [0], None)
    assert str(tmp_path / "nowhere") in str(e.value) and socket.gethostname() in str(e.value)
    plan["inputs"] = []
    with pytest.raises(mf.MergeIOError, match="staging folder .*gone.* is not visible on node"):
        run_shards(json.dumps(plan), str(tmp_path / "gone"), [0], None)
