"""The kernels' specs (declared next to each Rust kernel, exposed by `_core.method_specs()`)
against everything that restates them: the config schema, the public Python functions'
signatures and defaults, the README's methods table."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import merge_fast as mf
from merge_fast import _core, methods
from merge_fast.config.methods import MERGEKIT_METHODS, REQUIRED

SPECS = {s["name"]: s for s in _core.method_specs()}

# Python names of spec parameters (plural for per-model lists, mergekit's short `lam`)
ALIASES = {"weights": "weight", "lam": "lambda"}
# arguments that are inputs, not parameters
INPUTS = {"models", "model", "base", "a", "b", "fishers", "fisher", "grams"}
# where the merge runs, shared by every folder function (merge_fast.distributed.with_executor)
RUN_OPTIONS = {"executor", "ray_address"}
# Python conveniences that are not kernel parameters, and kernel parameters a function
# deliberately leaves out, each with its reason
PYTHON_ONLY = {("nuslerp", "t"): "weights [1 - t, t]",
               ("regmean", "alpha"): "the paper's name for reduce_non_diagonal_ratio"}
NOT_EXPOSED = {
    # mergekit's memory switch, no effect on the result: the functions do not offer it
    **{(m, "int8_mask"): "no effect" for m in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")},
}


def test_specs_are_complete_and_consistent():
    assert list(SPECS) == list(_core.METHODS)
    for s in SPECS.values():
        assert s["base"] in ("required", "optional", "ignored", "forbidden")
        assert s["min_models"] >= 1 and (s["max_models"] is None or s["max_models"] >= s["min_models"])
        names = [p["name"] for p in s["params"]]
        assert len(names) == len(set(names)), s["name"]
        for p in s["params"]:
            assert p["kind"] in ("float", "int", "bool", "str")
            assert p["role"] in ("read", "alias", "config_only")
            if p["range"] is not None:
                lo, lo_open, hi, hi_open = p["range"]
                assert lo <= hi
                d = p["default"]
                if isinstance(d, float):
                    assert (lo < d or (lo == d and not lo_open)) and (d < hi or (d == hi and not hi_open)), (s["name"], p)


def test_config_schema_is_the_kernels_specs():
    """Every mergekit method's config facts come from its kernel's spec, with mergekit's
    rules applied: a weight is required in configs; a base the kernel ignores or forbids is
    just another model; aliases are not config keys."""
    assert set(MERGEKIT_METHODS) == {n for n, s in SPECS.items() if s["mergekit"]}
    for name, cfg in MERGEKIT_METHODS.items():
        s = SPECS[name]
        assert cfg.base == {"forbidden": "ignored"}.get(s["base"], s["base"])
        assert list(cfg.params) == [p["name"] for p in s["params"] if p["role"] != "alias"]
        for p in s["params"]:
            if p["role"] == "alias":
                continue
            c = cfg.params[p["name"]]
            assert (c.kind, c.per_model) == (p["kind"], p["per_model"])
            if p["required"] or p["name"] == "weight":
                assert c.default is REQUIRED
            else:
                assert c.default == p["default"] and type(c.default) is type(p["default"])
    # mergekit's own facts, by hand (mergekit 0.1.5's registry)
    ties, dare, slerp = MERGEKIT_METHODS["ties"], MERGEKIT_METHODS["dare_linear"], MERGEKIT_METHODS["slerp"]
    assert ties.params["normalize"].default is True and ties.params["rescale"].default is False
    assert dare.params["normalize"].default is False and dare.params["rescale"].default is True
    assert MERGEKIT_METHODS["della"].params["epsilon"].default == 0.15
    assert MERGEKIT_METHODS["breadcrumbs"].params["gamma"].default == 0.01
    assert (slerp.base, slerp.min_inputs, slerp.max_inputs) == ("required", 2, 2)
    assert (MERGEKIT_METHODS["model_stock"].min_inputs, MERGEKIT_METHODS["nuslerp"].max_non_base) == (3, 2)
    assert MERGEKIT_METHODS["linear"].base == MERGEKIT_METHODS["karcher"].base == "ignored"


def _public_functions():
    for name in methods.__all__:
        if name in SPECS:
            yield name, getattr(methods, name)


def test_public_functions_are_methods():
    """Public functions named after a method (every method is also `merge_fast.merge(name, ...)`)."""
    named = {n for n, _ in _public_functions()}
    assert {"linear", "slerp", "ties", "fisher_weighted", "tsv_merge"} <= named <= set(SPECS)


@pytest.mark.parametrize("name", sorted(n for n, _ in _public_functions()))
def test_python_signature_matches_the_spec(name):
    """Each keyword of `merge_fast.<method>` is a declared parameter read by the kernel,
    with the kernel's default (None: "the kernel's default"), and every parameter the
    kernel reads is offered."""
    spec = {p["name"]: p for p in SPECS[name]["params"]}
    sig = inspect.signature(getattr(methods, name))
    offered = set()
    for arg in sig.parameters.values():
        if arg.kind is arg.VAR_KEYWORD or arg.name in INPUTS | RUN_OPTIONS or (name, arg.name) in PYTHON_ONLY:
            continue
        key = ALIASES.get(arg.name, arg.name)
        assert key in spec, f"{name}({arg.name}=...): not a parameter of the {name} kernel"
        p = spec[key]
        assert p["role"] != "config_only", f"{name}: {key} is not read by the kernel"
        offered.add(key)
        if arg.default is None or arg.default is arg.empty:
            continue
        d = p["default"]
        assert arg.default == d and type(arg.default) is type(d), f"{name}({arg.name}={arg.default!r}), kernel default {d!r}"
    read = {k for k, p in spec.items() if p["role"] == "read"}
    missing = read - offered - {k for (m, k) in NOT_EXPOSED if m == name}
    assert not missing, f"{name}: parameters not offered by the Python function: {sorted(missing)}"


def test_readme_methods_table_lists_exactly_the_specs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("## Methods and semantics", 1)[1].split("\n\n| method |", 1)[1].split("\n\n", 1)[0]
    listed = []
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        listed += re.findall(r"`([a-z0-9_]+)`", first.split("(")[0])
    assert sorted(listed) == sorted(SPECS)


def test_undeclared_and_config_only_parameters_are_refused():
    a = np.ones(4, np.float32)
    with pytest.raises(mf.ConfigError, match="unknown parameter"):
        mf.merge("task_arithmetic", [a], base=a, params={"density": 0.5})
    with pytest.raises(mf.ConfigError, match="unknown parameter"):
        mf.merge("slerp", [a], base=a, params={"t": 0.5, "gamma": 0.1})
    # the alias reads as its parameter: θ_b + λ(θ_1 − θ_b) with λ = 0.25
    b = np.full(4, 3.0, np.float32)
    np.testing.assert_array_equal(mf.merge("task_arithmetic", [b], base=a, params={"lam": 0.25}), np.full(4, 1.5, np.float32))


class _Stop(Exception):
    pass


def test_progress_callback_exception_travels_unchanged(tmp_path):
    """An exception raised in a progress callback comes back as itself (same object), as
    an error variant of the core, not as a MergeError."""
    from merge_fast._core import save_file

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        x = np.arange(6, dtype=np.float32) + (name == "b")
        save_file(str(tmp_path / name / "model.safetensors"), [("w", x, [2, 3], "F32"), ("v", x, [6], "F32")])
    raised = _Stop("stop here")

    def progress(done, total, *_):
        raise raised

    with pytest.raises(_Stop) as e:
        mf.linear([str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "out"), progress=progress)
    assert e.value is raised
    assert not (tmp_path / "out").exists()


# CLI option dest -> (spec parameter, how the CLI value maps to the kernel's)
CLI_ALIASES = {"weights": "weight", "lam": "lambda", "fishers": None, "fisher": None, "no_normalize": "normalize"}
CLI_GENERIC = {"out", "overwrite", "threads", "max_shard_size", "dtype", "out_dtype", "seed", "quiet", "cache_dir",
               "fsync", "help", "ray", "progress"}


def _cli_method_commands():
    import argparse

    from merge_fast.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, parser in sub.choices.items():
        name = cmd.replace("-", "_")
        if name in SPECS:
            yield name, parser


def test_cli_method_commands_exist():
    assert {"linear", "slerp", "task_arithmetic", "fisher_weighted", "fisher_dampened", "tsv_merge", "iso_c",
            "iso_cts"} <= {n for n, _ in _cli_method_commands()}


@pytest.mark.parametrize("name", sorted(n for n, _ in _cli_method_commands()))
def test_cli_options_match_the_spec(name):
    """Each option of `merge-fast <method>` is a declared parameter of that kernel, with the
    kernel's default (a flag that turns a default-true switch off is checked as such)."""
    parser = dict(_cli_method_commands())[name]
    spec = {p["name"]: p for p in SPECS[name]["params"]}
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in CLI_GENERIC:
            continue  # positional inputs and the options every merge shares
        key = CLI_ALIASES.get(dest, dest)
        if key is None:
            continue  # auxiliary inputs (Fisher files)
        assert key in spec, f"merge-fast {name} --{dest.replace('_', '-')}: not a parameter of the {name} kernel"
        p = spec[key]
        if dest.startswith("no_"):
            assert p["kind"] == "bool" and p["default"] is True, f"{name}: --{dest} turns off a switch that is off"
            continue
        if action.default is None or action.required:
            continue
        assert action.default == p["default"], f"merge-fast {name} --{dest}: default {action.default!r}, kernel {p['default']!r}"
