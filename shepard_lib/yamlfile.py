"""Reading a YAML settings file (configuration, scenario) into a mapping, with one-line problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shepard_lib.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first_line.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if line != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (lines {line + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def read_yaml_mapping(
    path: str | Path, *, kind: str = "config file", error: type[ConfigError] = ConfigError
) -> dict[str, Any]:
    """The mapping at the top level of the YAML file ``path``; ``{}`` for an empty file.

    Every failure raises ``error`` with one message naming the file: ``<kind> not found: <path>``,
    ``cannot read <kind> <path>: <reason>``, ``<path>: not a UTF-8 text file``,
    ``<path>:<line>:<column>: YAML syntax error: <problem>``, or
    ``<path>: expected a mapping of settings at the top level, got <type>``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{kind} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {kind} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise error(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: YAML error: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data
