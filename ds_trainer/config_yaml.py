"""Reading a config's YAML (its file, its `--set` overrides) without trusting it: bounded, no repeated keys.

A config is a few KB of hand-written YAML, so anything far beyond that is a mistake or an attack,
and is refused before it costs memory or time:

- a file over `MAX_CONFIG_BYTES` (and a `--set` over it, or deeper than `MAX_DEPTH`), an empty or whitespace-only file
  (it would silently mean "all defaults");
- more than `MAX_ALIASES` aliases (`*name`), or a document that expands to more than `MAX_VALUES`
  values or `MAX_DEPTH` levels once aliases are followed: a 750-byte "billion laughs" file
  otherwise becomes gigabytes when validated or printed;
- a key given twice in one mapping, a section (`training:`) included: YAML keeps the last one
  silently, so half of what the user wrote would be ignored.

`echo` is how an error message shows a value: a short prefix, never the value of a key that
looks like a secret.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.error import MarkedYAMLError

from ds_trainer.errors import ConfigError

MAX_CONFIG_BYTES = 256 * 1024  # 50x the largest shipped config
MAX_ALIASES = 32
MAX_VALUES = 10_000  # scalars, lists and mappings after following aliases
MAX_DEPTH = 16  # a config nests 3 levels (logging.wandb.tags)
ECHO_CHARS = 60  # how much of a value an error message shows
LINE_CHARS = 300  # the longest line of an error message
_DOTTED_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,5}")
SECRET_KEY = re.compile(r"api_?key|token|secret|passw|credential|auth", re.I)


class _Refused(MarkedYAMLError):
    """Well-formed YAML that is not an acceptable config (a repeated key, too many aliases, too deep)."""


# PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string. Users write learning rates
# exactly like that (the seed does), so resolve YAML 1.2 style floats as floats.
class _Loader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self.root: yaml.Node | None = None  # the document's top mapping, whose keys are sections

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise _Refused(problem=f"more than {MAX_ALIASES} aliases (*name); a config needs a few at most",
                               problem_mark=mark)  # fmt: skip
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Before SafeConstructor merges `<<: *base` entries: overriding a merged key is what merging is for.
        seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                what = "section" if node is self.root and isinstance(value_node, yaml.MappingNode) else "key"
                raise _Refused(
                    problem=f"{what} {cut(str(key), ECHO_CHARS)!r} appears twice (first at line "
                    f"{seen[key].start_mark.line + 1}); YAML would keep only the last one: merge them",
                    problem_mark=key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it beyond MAX_VALUES values or MAX_DEPTH levels.

    Walks the tree as the constructed value will be used (an alias counts as a copy of what it
    names) and stops as soon as a bound is passed, so the walk itself is bounded too.
    """
    count = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES or depth > MAX_DEPTH:
            what = (f"holds more than {MAX_VALUES:,} values" if count > MAX_VALUES
                    else f"nests deeper than {MAX_DEPTH} levels")  # fmt: skip
            raise _Refused(problem=f"the document {what} once aliases are followed (an alias bomb?)",
                           problem_mark=node.start_mark)  # fmt: skip
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack += [(key, depth + 1), (value, depth + 1)]


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """`text` as YAML (safe tags only, YAML 1.2 floats), within the bounds above; None for an empty document."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters; a config is at most {MAX_CONFIG_BYTES:,}")
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_expansion(root)
        loader.root = root
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "" if isinstance(exc, _Refused) else "YAML syntax error: "
        raise ConfigError(f"{source}:{where}: {kind}{cut(problem, LINE_CHARS)}") from None
    finally:
        loader.dispose()


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b.c=value` to a raw config dict (value parsed as YAML)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        # Shown only when it looks like a key: it may be a secret pasted in the wrong place.
        shown = len(key) <= 64 and "." in key and _DOTTED_KEY.fullmatch(key)
        given = repr(key) if shown else f"({len(assignment)} characters without '=')"
        raise ConfigError(f"--set {given}: expected KEY=VALUE, e.g. --set training.learning_rate=3e-5")
    parts = key.split(".")
    if len(assignment) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--set {cut(key)}: {len(assignment):,} characters; a --set is at most {MAX_CONFIG_BYTES:,}")
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"--set {cut(key)}: {len(parts)} levels deep; a config key has at most {MAX_DEPTH}")
    node: dict[str, Any] = tree
    for i, part in enumerate(parts[:-1]):
        # An unknown section is created here and reported by validation with a suggestion.
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {cut(key)}: {cut('.'.join(parts[: i + 1]))} is not a section")
        node = child
    node[parts[-1]] = parse_yaml(raw, source=f"--set {cut(key)}") if raw.strip() else None


def read_config_text(path: Path) -> str:
    """The text of a config file: a regular file, at most MAX_CONFIG_BYTES of UTF-8, not blank."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (see ds_configs/ for examples)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,} "
                          "(is this the right file?)")  # fmt: skip
    try:
        text = path.read_bytes()[: MAX_CONFIG_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
    return text


def empty_config_error(path: Path) -> ConfigError:
    return ConfigError(
        f"config file {path} is empty (or only comments); an empty file would silently mean every default. "
        "Write the sections you mean, e.g. start from ds_configs/demo.yaml"
    )


def cut(text: str, limit: int = ECHO_CHARS) -> str:
    """`text`, shortened to `limit` characters with the length said when it was longer."""
    if len(text) <= limit:
        return text
    return f"{text[: max(0, limit - 20)]}… ({len(text):,} chars)"


_REPR = reprlib.Repr()
_REPR.maxstring = ECHO_CHARS
_REPR.maxother = ECHO_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def echo(value: Any, loc: Sequence[Any] = ()) -> str:
    """A value as an error message shows it: a short repr (bounded work on huge values); hidden under a secret's key."""
    if any(SECRET_KEY.search(str(part)) for part in loc):
        return "<value hidden: the key may hold a secret>"
    return cut(_REPR.repr(value), ECHO_CHARS + 20)
