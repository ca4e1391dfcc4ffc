"""Loading a config (YAML text, a file, or a dict) while remembering where every key sits,
so each error can name the config key and its line."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import yaml

from .._errors import ConfigError

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


class ConfigSource:
    """The parsed config plus the line of each key (when it came from YAML text)."""

    def __init__(self, data: Any, text: Optional[str], filename: Optional[str], lines: Dict[KeyPath, int]):
        self.data = data
        self.text = text
        self.filename = filename
        self.lines = lines

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
        return ConfigError(f"config error: {self.where(path)}: {msg}")


def _expanded_size(node: yaml.Node, name: str) -> int:
    """Node count with every alias expanded, computed once per distinct node (linear time);
    raises ConfigError past MAX_EXPANDED_NODES or on a recursive alias."""
    sizes: Dict[int, int] = {}
    busy: set = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in busy:
            raise ConfigError(f"config error: {name} line {n.start_mark.line + 1}: recursive YAML alias")
        busy.add(id(n))
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in n.value)
        else:
            total = 1
        busy.discard(id(n))
        if total > MAX_EXPANDED_NODES:
            raise ConfigError(f"config error: {name} line {n.start_mark.line + 1}: YAML aliases expand to more than "
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
                raise ConfigError(
                    f"config error: {filename} line {k.start_mark.line + 1}, key {key_str(path + (key,))}: "
                    "duplicate key (YAML would silently keep only the last one)"
                )
            seen.add(key)
            lines[path + (key,)] = k.start_mark.line + 1
            _walk(v, path + (key,), lines, filename)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[path + (i,)] = v.start_mark.line + 1
            _walk(v, path + (i,), lines, filename)


def parse_text(text: str, filename: Optional[str] = None) -> ConfigSource:
    name = filename or "config"
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config error: {name} is {len(text)} characters; configs are limited to "
                          f"{MAX_CONFIG_BYTES} (1 MB)")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _expanded_size(node, name)  # before anything walks the aliases
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config error: {name}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    lines: Dict[KeyPath, int] = {}
    if node is not None:
        _walk(node, (), lines, name)
    return ConfigSource(data, text, filename, lines)


def load(config: Union[str, Path, Dict[str, Any]]) -> ConfigSource:
    """A path to a YAML file, YAML text (anything with a newline or a ':'), or a dict."""
    if isinstance(config, dict):
        from .._folders import plain

        return ConfigSource(plain(config), None, None, {})
    if isinstance(config, Path) or (isinstance(config, str) and "\n" not in config
                                    and (":" not in config or Path(config).suffix in (".yml", ".yaml") or Path(config).exists())):
        p = Path(config)
        if not p.is_file():
            raise ConfigError(f"config error: config file {p} not found")
        try:
            if p.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"config error: config file {p} is {p.stat().st_size} bytes; configs are "
                                  f"limited to {MAX_CONFIG_BYTES} (1 MB)")
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config error: config file {p} is not UTF-8 text (byte {e.start}); "
                              "is it a YAML file?") from None
        except OSError as e:
            raise ConfigError(f"config error: cannot read config file {p}: {e.strerror or e}") from None
        return parse_text(text, str(p))
    if isinstance(config, str):
        return parse_text(config, None)
    raise ConfigError(f"config error: expected a YAML file path, YAML text or a dict, got {type(config).__name__}")
