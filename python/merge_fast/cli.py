"""The ``merge-fast`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from ._errors import MergeError

Command = Callable[[argparse.Namespace], int]
_OVERWRITE_HELP = "replace an existing output folder that holds a previous merge output (anything else is refused)"
_THREADS_HELP = "worker threads, 1 to 1024 (default: one per core); results do not depend on it"
_COMMANDS: Dict[str, Command] = {}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("merge options")
    g.add_argument("-o", "--out", required=True, help="output model folder (written atomically; must be new or empty)")
    g.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    g.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    g.add_argument("--max-shard-size", "--out-shard-size", dest="max_shard_size", default="5GB",
                   help="largest output shard, e.g. 500MB, 5GB, 1GiB (default 5GB); --out-shard-size: mergekit's spelling")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype as in mergekit configs; merge_fast always computes in float32, and "
                        "bfloat16/float16 here only set the default --out-dtype")
    g.add_argument("--out-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default: each tensor's input dtype)")
    g.add_argument("--seed", type=int, default=0, help="seed for randomized methods")
    _no_fsync(g)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    g.add_argument("--cache-dir", default=None, help=_CACHE_HELP)


_CACHE_HELP = ("Hugging Face cache for models given as hub repo ids (org/name[@revision]); "
               "default: HF_HUB_CACHE or HF_HOME/hub")


def _no_fsync(g) -> None:
    g.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="do not fsync the output before renaming it into place (faster; for scratch merges)")


def _progress(args: argparse.Namespace) -> bool:
    """A progress bar only on a terminal, and never with --quiet."""
    return (not args.quiet) and sys.stderr.isatty()


def _options(args: argparse.Namespace) -> dict:
    return dict(
        out=args.out,
        threads=args.threads,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        out_dtype=args.out_dtype,
        seed=args.seed,
        progress=_progress(args),
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        fsync=args.fsync,
    )


def _report(args: argparse.Namespace, result) -> int:
    if not args.quiet:
        rate = result.bytes_written / max(result.seconds, 1e-9) / 1e6
        print(f"{result} ({rate:.0f} MB/s written)")
    return 0


def _cmd_slerp(args: argparse.Namespace) -> int:
    from .methods.basic import slerp

    return _report(args, slerp(args.a, args.b, t=args.t, **_options(args)))


def _cmd_linear(args: argparse.Namespace) -> int:
    from .methods.basic import linear

    return _report(args, linear(args.models, weights=args.weights, normalize=not args.no_normalize, **_options(args)))


def _cmd_task_arithmetic(args: argparse.Namespace) -> int:
    from .methods.basic import task_arithmetic

    result = task_arithmetic(args.base, args.models, weights=args.weights, lam=args.lam, **_options(args))
    return _report(args, result)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import run

    if args.cuda or args.gpu_rich or args.device not in (None, "cpu"):
        print("merge-fast: note: merge_fast computes on the CPU; --cuda/--device are ignored", file=sys.stderr)
    result = run(
        args.config,
        args.out,
        max_shard_size=args.max_shard_size,
        copy_tokenizer=args.copy_tokenizer,
        allow_crimes=args.allow_crimes,
        random_seed=args.random_seed,
        write_model_card=args.write_model_card,
        threads=args.threads,
        progress=_progress(args),
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        strict=args.strict,
        stage=args.stage,
        fsync=args.fsync,
        executor="local" if args.ray is None else "ray",
        ray_address=args.ray or None,
    )
    return _report(args, result)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.workdir, quiet=args.quiet)


def _cmd_torch(command: str, argv: List[str]) -> int:
    """``merge-fast fisher|gram ARGS``: the arguments (and --help) go to merge_fast.torch's own parser."""
    try:
        from . import torch as mtorch
    except ImportError as e:
        print(f"merge-fast {command} needs torch and transformers ({e}); pip install 'merge-fast[torch]'", file=sys.stderr)
        return 1
    return getattr(mtorch, f"{command}_main")(argv)


def _cmd_subspace_masks(args: argparse.Namespace) -> int:
    from .subspace import subspace_masks

    info = subspace_masks(args.it, args.pt, args.rank, args.out, include=args.include, seed=args.seed, threads=args.threads,
                          cache_dir=args.cache_dir)
    if not args.quiet:
        energy = sum(e for _, e, _ in info.values()) / max(len(info), 1)
        print(f"wrote rank-{args.rank} masks for {len(info)} tensors to {args.out} (mean captured energy {energy:.3f})")
    return 0


def _cmd_fisher_weighted(args: argparse.Namespace) -> int:
    from .methods.data_aware import fisher_weighted

    result = fisher_weighted(args.models, args.fishers, weights=args.weights, epsilon=args.epsilon,
                             fisher_normalize=args.fisher_normalize, **_options(args))
    return _report(args, result)


def _cmd_fisher_dampened(args: argparse.Namespace) -> int:
    from .methods.data_aware import fisher_dampened

    result = fisher_dampened(args.base, args.models, args.fisher, scale=args.scale, weights=args.weights,
                             normalization=args.normalization, **_options(args))
    return _report(args, result)


def _cmd_spectral(args: argparse.Namespace) -> int:
    from .methods import spectral

    fn = getattr(spectral, args.command.replace("-", "_"))
    extra = {"alpha": args.alpha} if args.command == "tsv-merge" else {"scaling_factor": args.scaling_factor}
    if args.command == "iso-cts":
        extra["common_space_fraction"] = args.common_space_fraction
    return _report(args, fn(args.base, args.models, **extra, **_options(args)))


def _cmd_extract_lora(args: argparse.Namespace) -> int:
    from .lora_extract import extract_lora

    errors = extract_lora(args.base, args.finetuned, args.rank, args.out, energy=args.energy,
                          modules_to_save=args.modules_to_save or (), exact=args.exact, seed=args.seed,
                          out_dtype=args.out_dtype, overwrite=args.overwrite)
    if not args.quiet:
        worst = max(errors.values(), default=0.0)
        print(f"wrote a rank-{args.rank} LoRA of {len(errors)} tensors to {args.out} (worst relative error {worst:.3g})")
    return 0


def _cmd_merge_loras(args: argparse.Namespace) -> int:
    from .lora_merge import merge_adapters

    weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
    ranks = merge_adapters(args.adapters, weights, args.out, rank=args.rank, out_dtype=args.out_dtype,
                           overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote a LoRA adapter of {len(ranks)} modules (rank {max(ranks.values(), default=0)}) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merge-fast",
        description="Fast, streaming merges of safetensors LLM checkpoints (mergekit-compatible).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="make two small Llama-shaped models, merge them with slerp, report")
    p.add_argument("--workdir", default=None, help="where to put the demo models (default: a temporary folder)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final line")
    _COMMANDS["demo"] = _cmd_demo

    p = sub.add_parser("slerp", help="spherical interpolation of two models (t=0 gives A)")
    p.add_argument("a", help="first model (the base; t=0 returns it)")
    p.add_argument("b", help="second model (t=1 returns it)")
    p.add_argument("--t", type=float, required=True, help="interpolation factor in [0, 1]")
    _common(p)
    _COMMANDS["slerp"] = _cmd_slerp

    p = sub.add_parser("linear", help="weighted average of models")
    p.add_argument("models", nargs="+", help="model folders or hub repo ids (org/name[@revision])")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per model (default: equal)")
    p.add_argument("--no-normalize", action="store_true", help="weighted sum instead of weighted average")
    _common(p)
    _COMMANDS["linear"] = _cmd_linear

    p = sub.add_parser("task-arithmetic", help="base + lam * sum of weighted task vectors")
    p.add_argument("base", help="base model")
    p.add_argument("models", nargs="+", help="fine-tuned models")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per model (default 1)")
    p.add_argument("--lam", type=float, default=1.0, help="scale of the summed task vectors (default 1)")
    _common(p)
    _COMMANDS["task-arithmetic"] = _cmd_task_arithmetic

    p = sub.add_parser("run", help="run a mergekit-style YAML config (like mergekit-yaml CONFIG OUT)")
    p.add_argument("config", help="merge config (mergekit's YAML schema); models are local paths or hub repo "
                                  "ids (org/name, org/name@revision, org/name+org/lora)")
    p.add_argument("out", help="output model folder (written atomically; must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    B = argparse.BooleanOptionalAction
    p.add_argument("--max-shard-size", "--out-shard-size", dest="max_shard_size", default="5GB",
                   help="largest output shard: 5GB, 500MB, 1GiB or mergekit's 5B/500M (default 5GB); "
                        "--out-shard-size: mergekit's spelling")
    p.add_argument("--copy-tokenizer", action=B, default=True, help="copy the tokenizer to the output (default: yes)")
    p.add_argument("--allow-crimes", action=B, default=False, help="allow merging models of different architectures")
    p.add_argument("--strict", action="store_true",
                   help="refuse keys mergekit would ignore (unknown or misplaced keys and parameters); default: warn")
    p.add_argument("--stage", default=None, metavar="NAME",
                   help="multi-stage config (several YAML documents): write only stage NAME (and run what it needs)")
    p.add_argument("--random-seed", type=int, default=None, help="seed for randomized methods (DARE, DELLA...)")
    p.add_argument("--write-model-card", action=B, default=True,
                   help="write README.md and mergekit_config.yml into the output (default: yes, as mergekit)")
    p.add_argument("--lazy-unpickle", action=B, default=False, help="accepted for mergekit compatibility; no effect")
    p.add_argument("--low-cpu-memory", action=B, default=False, help="accepted for mergekit compatibility; no effect")
    p.add_argument("--trust-remote-code", action=B, default=False, help="accepted for mergekit compatibility; no effect")
    p.add_argument("--cuda", action=B, default=False, help="not used: merge_fast computes on the CPU")
    p.add_argument("--device", default=None, help="not used: merge_fast computes on the CPU")
    p.add_argument("--threads", "-j", "--num-threads", type=int, default=None, help=_THREADS_HELP)
    _no_fsync(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run as Ray tasks, one per group of output shards (needs merge-fast[ray]); "
                        "ADDRESS as ray.init's, e.g. auto or ray://head:10001 (default: a local Ray)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="accepted for mergekit compatibility")
    p.add_argument("--cache-dir", default=None, help=_CACHE_HELP)
    g = p.add_argument_group("other mergekit options (accepted, no effect here)")
    for flag in ("--clone-tensors", "--safe-serialization", "--read-to-gpu", "--multi-gpu", "--async-write"):
        g.add_argument(flag, action=B, default=None, help=argparse.SUPPRESS)
    g.add_argument("--gpu-rich", action="store_true", help=argparse.SUPPRESS)
    for opt in ("--lora-merge-cache", "--lora-merge-dtype", "--write-threads"):
        g.add_argument(opt, default=None, help=argparse.SUPPRESS)
    g.add_argument("--transformers-cache", dest="cache_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _COMMANDS["run"] = _cmd_run

    p = sub.add_parser("fisher-weighted", help="Fisher-weighted average (Matena & Raffel 2022)")
    p.add_argument("models", nargs="+", help="model folders")
    p.add_argument("--fishers", nargs="+", required=True, help="one Fisher .safetensors per model, same order")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="per-model λ (default 1)")
    p.add_argument("--epsilon", type=float, default=1e-8, help="added to every Fisher entry (default 1e-8)")
    p.add_argument("--fisher-normalize", choices=["none", "mean"], default="none",
                   help="divide each Fisher by its per-tensor mean first")
    _common(p)
    _COMMANDS["fisher-weighted"] = _cmd_fisher_weighted

    p = sub.add_parser("fisher-dampened", help="θ_IT + s·(1−F̂_param)·(1−F̂_layer)·Δ_avg")
    p.add_argument("base", help="the instruction-tuned model θ_IT")
    p.add_argument("models", nargs="+", help="models whose deltas from the base are averaged")
    p.add_argument("--fisher", required=True, help="Fisher of the base (.safetensors)")
    p.add_argument("--scale", type=float, default=1.0, help="s (default 1)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="delta weights (default equal)")
    p.add_argument("--normalization", choices=["log", "minmax", "rank"], default="log",
                   help="per-tensor Fisher normalization (default log: raw Fishers span many orders of magnitude)")
    _common(p)
    _COMMANDS["fisher-dampened"] = _cmd_fisher_dampened

    p = sub.add_parser("fisher", add_help=False, help="estimate a diagonal Fisher with torch (see merge-fast fisher --help)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    _COMMANDS["fisher"] = lambda args: _cmd_torch("fisher", args.args)

    p = sub.add_parser("gram", add_help=False, help="Gram matrices XᵀX of linear-layer inputs with torch, for regmean (see merge-fast gram --help)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    _COMMANDS["gram"] = lambda args: _cmd_torch("gram", args.args)

    p = sub.add_parser("subspace-masks", help="top-r singular vectors of W_IT − W_PT per 2-D tensor")
    p.add_argument("it", help="instruction-tuned model")
    p.add_argument("pt", help="pretrained model")
    p.add_argument("--rank", type=int, required=True, help="singular vectors kept per tensor")
    p.add_argument("-o", "--out", required=True, help="output .safetensors file")
    p.add_argument("--include", default=None, help="regex: only tensors whose name matches")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    p.add_argument("--cache-dir", default=None, help=_CACHE_HELP)
    p.add_argument("-q", "--quiet", action="store_true")
    _COMMANDS["subspace-masks"] = _cmd_subspace_masks

    for name, text in (("tsv-merge", "TSV-M: per-task top singular vectors, orthogonalised (Gargiulo et al. 2025)"),
                       ("iso-c", "Iso-C: SVD of the summed task vectors with a flat spectrum (Marczak et al. 2025)"),
                       ("iso-cts", "Iso-CTS: common plus task-specific subspaces, flat spectrum (Marczak et al. 2025)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("base", help="base model")
        p.add_argument("models", nargs="+", help="fine-tuned models")
        if name == "tsv-merge":
            p.add_argument("--alpha", type=float, default=1.0, help="scale of the merged task matrix (default 1)")
        else:
            p.add_argument("--scaling-factor", type=float, default=1.0, help="scale of the merged task matrix (default 1)")
        if name == "iso-cts":
            p.add_argument("--common-space-fraction", type=float, default=0.8,
                           help="share of the directions taken from the common subspace (default 0.8)")
        _common(p)
        _COMMANDS[name] = _cmd_spectral

    p = sub.add_parser("extract-lora", help="PEFT LoRA adapter approximating FINETUNED − BASE (top-r SVD per linear weight)")
    p.add_argument("base", help="base model")
    p.add_argument("finetuned", help="fine-tuned model")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank r (per tensor at most)")
    p.add_argument("-o", "--out", required=True, help="output adapter folder (written atomically)")
    p.add_argument("--energy", type=float, default=None,
                   help="keep per tensor the fewest components (<= rank) capturing this share of |Δ|_F² (0-1]")
    p.add_argument("--modules-to-save", nargs="+", default=None,
                   help="modules saved at full rank (embeddings and lm_head always are, as mergekit)")
    p.add_argument("--exact", action="store_true", help="exact SVD instead of the seeded randomized one")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    p.add_argument("--out-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the adapter tensors (default: the fine-tune's)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("-q", "--quiet", action="store_true")
    _COMMANDS["extract-lora"] = _cmd_extract_lora

    p = sub.add_parser("merge-loras", help="combine LoRA adapters into one: SVD of Σ w_i B_i A_i to rank r (as PEFT's svd)")
    p.add_argument("adapters", nargs="+", help="PEFT LoRA adapter folders")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter (default 1)")
    p.add_argument("--rank", type=int, default=None, help="rank of the result (default: the largest r)")
    p.add_argument("-o", "--out", required=True, help="output adapter folder (written atomically)")
    p.add_argument("--out-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("-q", "--quiet", action="store_true")
    _COMMANDS["merge-loras"] = _cmd_merge_loras
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ._output import Terminated

    argv = sys.argv[1:] if argv is None else list(argv)
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"merge-fast: warning: {str(message).removeprefix('merge-fast: ')}", file=sys.stderr)

    warnings.showwarning = show
    try:
        if argv[:1] in (["fisher"], ["gram"]):
            # Its options (and --help) belong to merge_fast.torch's own parser.
            return _cmd_torch(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except Terminated as e:
        print(f"merge-fast: {e}", file=sys.stderr)
        return 128 + e.signum
    except MergeError as e:
        print(f"merge-fast: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the environment (disk, permissions), never worth a traceback
        print(f"merge-fast: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("merge-fast: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
