"""Loading a config (YAML text, a file, or a dict) while remembering where every key sits,
so each error can name the config key and its line."""
from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import yaml

from .._errors import ConfigError, MergeWarning, config_error, unprefixed

KeyPath = Tuple[Union[str, int], ...]

# Real configs are a few KB; these bound the work a hostile one can cause.
MAX_CONFIG_BYTES = 1_000_000
# Nodes after expanding every alias ("billion laughs" expands 9 aliases to 10**9).
MAX_EXPANDED_NODES = 100_000


def key_str(path: KeyPath) -> str:
    """('slices', 0, 'sources', 1, 'layer_range') -> 'slices[0].sources[1].layer_range'."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "<top level>"


# Names seen in public configs for a known key that difflib would not find.
_RENAMED = {"pattern": "filter", "regexp": "regex", "weights": "weight", "densities": "density"}


class ConfigSource:
    """The parsed config plus the line of each key (when it came from YAML text)."""

    def __init__(self, data: Any, text: Optional[str], filename: Optional[str], lines: Dict[KeyPath, int]):
        self.data = data
        self.text = text
        self.filename = filename
        self.lines = lines
        self.strict = False
        # Keys mergekit silently ignores: key name -> messages (warnings, or errors if strict).
        self.ignored: Dict[str, List[str]] = {}
        self.errors: List[ConfigError] = []

    def where(self, path: KeyPath) -> str:
        """'merge.yml line 7, key slices[0].sources' (the nearest known line for the key)."""
        p = tuple(path)
        line = None
        while True:
            if p in self.lines:
                line = self.lines[p]
                break
            if not p:
                break
            p = p[:-1]
        name = self.filename or "config"
        if line is not None:
            return f"{name} line {line}, key {key_str(path)}"
        return f"{name}, key {key_str(path)}"

    def error(self, path: KeyPath, msg: str) -> ConfigError:
        return config_error(f"{self.where(path)}: {msg}")

    def ignore(self, path: KeyPath, what: str, known: Iterable[str], note: str = "") -> None:
        """Records a key mergekit would ignore (run anyway; an error under strict), with the
        known name it most resembles."""
        key = str(path[-1])
        close = [_RENAMED[key]] if key in _RENAMED and _RENAMED[key] in known else difflib.get_close_matches(key, sorted(set(known)), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        self.ignored.setdefault(key, []).append(f"{self.where(path)}: unknown key '{key}' in {what}{hint}; "
                                                f"{note or 'ignored, as mergekit does'}")

    def collect(self, fn, *args: Any) -> Any:
        """Runs one independent check, keeping its ConfigError for the final report."""
        try:
            return fn(*args)
        except ConfigError as e:
            self.errors.append(e)
            return None

    def finish(self) -> None:
        """Raises every problem found in one ConfigError (ignored keys count as problems under
        strict), else warns once per ignored key name."""
        msgs = [unprefixed(e) for e in self.errors]
        if self.strict:
            msgs += [m for ms in self.ignored.values() for m in ms]
        if msgs:
            self.errors, self.ignored = [], {} if self.strict else self.ignored
            if len(msgs) == 1:
                raise config_error(f"{msgs[0]}")
            raise config_error(f"{len(msgs)} problems:\n" + "\n".join(f"  - {m}" for m in msgs))
        for ms in self.ignored.values():
            more = f" (and {len(ms) - 1} more place(s))" if len(ms) > 1 else ""
            warnings.warn(f"merge-fast: {ms[0]}{more}; pass --strict (strict=True) to refuse", MergeWarning, stacklevel=4)
        self.ignored = {}


def _expanded_size(node: yaml.Node, name: str) -> int:
    """Node count with every alias expanded, computed once per distinct node (linear time);
    raises ConfigError past MAX_EXPANDED_NODES or on a recursive alias."""
    sizes: Dict[int, int] = {}
    busy: set = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in busy:
            raise config_error(f"{name} line {n.start_mark.line + 1}: recursive YAML alias")
        busy.add(id(n))
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in n.value)
        else:
            total = 1
        busy.discard(id(n))
        if total > MAX_EXPANDED_NODES:
            raise config_error(f"{name} line {n.start_mark.line + 1}: YAML aliases expand to more than "
                              f"{MAX_EXPANDED_NODES} values; refusing (is this an alias bomb?)")
        sizes[id(n)] = total
        return total

    return size(node)


def _walk(node: yaml.Node, path: KeyPath, lines: Dict[KeyPath, int], filename: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            if key in seen:
                raise config_error(
                    f"{filename} line {k.start_mark.line + 1}, key {key_str(path + (key,))}: "
                    "duplicate key (YAML would silently keep only the last one)"
                )
            seen.add(key)
            lines[path + (key,)] = k.start_mark.line + 1
            _walk(v, path + (key,), lines, filename)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[path + (i,)] = v.start_mark.line + 1
            _walk(v, path + (i,), lines, filename)


def _yaml_error(e: yaml.YAMLError, name: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark is not None else ""
    return config_error(f"{name}{where}: not valid YAML: {getattr(e, 'problem', None) or e}")


def parse_documents(text: str, filename: Optional[str] = None) -> List[ConfigSource]:
    """Every YAML document of `text` (mergekit-multi's files hold several), each with the
    lines of its keys as they are in the whole text."""
    name = filename or "config"
    if len(text) > MAX_CONFIG_BYTES:
        raise config_error(f"{name} is {len(text)} characters; configs are limited to "
                          f"{MAX_CONFIG_BYTES} (1 MB)")
    try:
        nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None]
        for node in nodes:
            _expanded_size(node, name)  # before anything walks the aliases
    except yaml.YAMLError as e:
        raise _yaml_error(e, name) from None
    out = []
    for node in nodes:
        lines: Dict[KeyPath, int] = {}
        _walk(node, (), lines, name)
        data = yaml.SafeLoader(text).construct_document(node)
        out.append(ConfigSource(data, text, filename, lines))
    return out


def parse_text(text: str, filename: Optional[str] = None) -> ConfigSource:
    docs = parse_documents(text, filename)
    if len(docs) > 1:
        raise config_error(f"{filename or 'config'}: {len(docs)} YAML documents (a multi-stage config); "
                          "run it with merge_fast.config.run / merge-fast run")
    return docs[0] if docs else ConfigSource(None, text, filename, {})


def load_all(config: Union[str, Path, Dict[str, Any], List[Dict[str, Any]]]) -> List[ConfigSource]:
    """Like `load`, keeping every YAML document (a list of dicts is several documents)."""
    if isinstance(config, list):
        return [load(c) for c in config]
    if isinstance(config, dict):
        return [load(config)]
    p = _as_file(config)
    if p is not None:
        text, name = _read_file(p), str(p)
    elif isinstance(config, str):
        text, name = config, None
    else:
        raise config_error(f"expected a YAML file path, YAML text or a dict, got {type(config).__name__}")
    return parse_documents(text, name) or [ConfigSource(None, text, name, {})]


def _read_file(p: Path) -> str:
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise config_error(f"config file {p} is {p.stat().st_size} bytes; configs are "
                              f"limited to {MAX_CONFIG_BYTES} (1 MB)")
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise config_error(f"config file {p} is not UTF-8 text (byte {e.start}); "
                          "is it a YAML file?") from None
    except OSError as e:
        raise config_error(f"cannot read config file {p}: {e.strerror or e}") from None


def _as_file(config: Any) -> Optional[Path]:
    """The file named by `config`, None when it is YAML text (anything with a newline or a ':')."""
    if isinstance(config, Path) or (isinstance(config, str) and "\n" not in config
                                    and (":" not in config or Path(config).suffix in (".yml", ".yaml") or Path(config).exists())):
        p = Path(config)
        if not p.is_file():
            raise config_error(f"config file {p} not found")
        return p
    return None


def load(config: Union[str, Path, Dict[str, Any]]) -> ConfigSource:
    """A path to a YAML file, YAML text (anything with a newline or a ':'), or a dict."""
    if isinstance(config, dict):
        from ..plan import plain

        return ConfigSource(plain(config), None, None, {})
    p = _as_file(config)
    if p is not None:
        return parse_text(_read_file(p), str(p))
    if isinstance(config, str):
        return parse_text(config, None)
    raise config_error(f"expected a YAML file path, YAML text or a dict, got {type(config).__name__}")
