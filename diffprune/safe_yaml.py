"""Safe, bounded YAML for params files: a regular file of bounded size, PyYAML's safe loader, and
a node budget once aliases are expanded (a "billion laughs" of nested aliases is a few hundred bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import MAX_PARAMS_BYTES, MAX_YAML_NODES, ConfigError, _r


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document of more than :data:`MAX_YAML_NODES` nodes once its aliases
    are expanded (a "billion laughs" of nested aliases is a few hundred bytes), or a recursive alias."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        sizes: dict[int, int] = self.__dict__.setdefault("sizes", {})  # id(node) -> nodes, aliases expanded
        alias = self.check_event(yaml.AliasEvent)
        node = super().compose_node(parent, index)
        if alias and id(node) not in sizes:
            raise ConfigError("an alias inside the node it refers to (recursive)")
        kids = node.value if isinstance(node, yaml.SequenceNode) else (
            [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = size = 1 + sum(sizes[id(k)] for k in kids)
        if size > MAX_YAML_NODES:
            raise ConfigError(f"more than {MAX_YAML_NODES} nodes once aliases are expanded")
        return node


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely: a regular file of at most :data:`MAX_PARAMS_BYTES`, no arbitrary
    tags, aliases within budget. Errors name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found" if not path.exists() else f"{path}: not a regular file")
    with path.open("rb") as f:
        data = f.read(MAX_PARAMS_BYTES + 1)
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_PARAMS_BYTES} bytes: not a params file")
    try:
        return yaml.load(data.decode("utf-8"), Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid YAML ({_r(str(e))})") from None
    except (ConfigError, RecursionError) as e:  # over budget, or nested too deeply
        raise ConfigError(f"{path}: refused: {e}") from None
