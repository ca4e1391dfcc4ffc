"""User mapping files: YAML descriptions of custom architectures.

The file holds one family spec in the schema documented in :mod:`merge_fast.arch.family`
(see ``examples/qed.yaml`` (QED-75M) and ``examples/qed_fused.yaml`` (fused projections) for complete, commented examples)::

    fam = load_mapping("qed.yaml", register=True)   # now detect_family() knows model_type "qed"
    canon = canonicalize(tensors, config)            # or canonicalize(tensors, config, fam)

Any problem (YAML syntax, unknown field, unknown role, bad regex, bad size expression,
duplicate role, scope mismatch) raises :class:`MappingFileError` naming the file and entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .errors import MappingFileError
from .families import register_family
from .family import Family

__all__ = ["load_mapping", "parse_mapping", "dump_mapping", "EXAMPLES_DIR"]

#: Folder with example mapping files shipped with the package.
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - pyyaml is a dependency
        raise MappingFileError("reading mapping files needs PyYAML (pip install pyyaml)") from e
    return yaml


def parse_mapping(text: str, *, source: str = "<string>", register: bool = False, replace: bool = False) -> Family:
    """Build a :class:`Family` from mapping-file text (YAML; JSON is valid YAML too)."""
    yaml = _yaml()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MappingFileError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise MappingFileError(f"{source}: a mapping file must contain a mapping at top level, got {type(data).__name__}")
    fam = Family.from_spec(data, source=source)
    if register:
        register_family(fam, replace=replace)
    return fam


def load_mapping(
    path: "str | os.PathLike[str] | Mapping[str, Any]", *, register: bool = False, replace: bool = False
) -> Family:
    """Load a mapping file (or an already-parsed spec mapping) into a :class:`Family`.

    Args:
        path: YAML file path, or a spec mapping.
        register: also register it, so :func:`detect_family` matches its ``match`` entries.
        replace: allow replacing an already-registered user family of the same name.
    """
    if isinstance(path, Mapping):
        fam = Family.from_spec(path, source="<mapping>")
        if register:
            register_family(fam, replace=replace)
        return fam
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise MappingFileError(f"cannot read mapping file {str(p)!r}: {e.strerror or e}") from None
    return parse_mapping(text, source=str(p), register=register, replace=replace)


def dump_mapping(family: Family) -> str:
    """YAML text of a family's spec (built-in tables can be dumped as a starting point)."""
    return _yaml().safe_dump(family.to_spec(), sort_keys=False, default_flow_style=None, width=120)
