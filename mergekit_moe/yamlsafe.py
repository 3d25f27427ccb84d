"""A strict, safe YAML loader for recipes.

``yaml.safe_load`` already refuses ``!!python/...`` tags, but it still accepts aliases (so a
"billion laughs" alias bomb expands to gigabytes), silently keeps the *last* of two duplicate
keys, and turns ``2024-01-01`` into a ``date``. Recipes are small, hand-written documents, so we
compose the YAML node graph with PyYAML's safe composer and build Python values ourselves:

* aliases and merge keys (``<<``) are refused (no expansion, no bombs);
* duplicate keys are refused, naming the key path;
* only the core tags (str, int, float, bool, null, map, seq) are accepted; any other tag
  (``!!python/object``, ``!!binary``, custom ``!tags``) is refused;
* implicit timestamps stay strings; documents are capped in size and nesting depth.

Every problem raises :class:`YamlProblem` with a key path (``experts[1].source``) or a
``line N`` location, so callers can report it the same way as schema problems.
"""

from __future__ import annotations

from typing import Any

import yaml

#: recipes are kilobytes; refuse anything absurd before parsing it
MAX_BYTES = 1_000_000
MAX_DEPTH = 64

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_CORE}{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")}


class YamlProblem(Exception):
    """One problem with the YAML text itself. ``path`` is a key path or ``line N``."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer refuses aliases (resolution of scalars is unchanged)."""

    def compose_node(self, parent, index):  # noqa: D401  (PyYAML hook)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlProblem(_line(event.start_mark), f"YAML alias *{event.anchor} is not allowed in recipes (write the value out)")
        return super().compose_node(parent, index)


def _line(mark) -> str:
    return f"line {mark.line + 1}" if mark is not None else "<yaml>"


def _join(path: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


#: a constructor instance used only to convert core scalars (int/float/bool spellings of YAML 1.1)
_CONSTRUCTOR = yaml.SafeLoader("")


def _scalar(node: yaml.ScalarNode, path: str) -> Any:
    tag = node.tag
    if tag not in _SCALAR_TAGS:
        raise YamlProblem(path or _line(node.start_mark), f"YAML tag {tag!r} is not allowed in recipes (only plain values)")
    if tag == f"{_CORE}str" or tag == f"{_CORE}timestamp":
        return str(node.value)  # dates stay strings: recipes never need datetime objects
    if tag == f"{_CORE}null":
        return None
    try:
        if tag == f"{_CORE}bool":
            return _CONSTRUCTOR.construct_yaml_bool(node)
        if tag == f"{_CORE}int":
            return _CONSTRUCTOR.construct_yaml_int(node)
        return _CONSTRUCTOR.construct_yaml_float(node)
    except (ValueError, yaml.YAMLError) as exc:
        raise YamlProblem(path or _line(node.start_mark), f"bad {tag.rsplit(':', 1)[-1]} value {node.value!r} ({exc})") from exc


def _build(node: yaml.Node, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise YamlProblem(path or _line(node.start_mark), f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node, path)
    if isinstance(node, yaml.SequenceNode):
        if node.tag != f"{_CORE}seq":
            raise YamlProblem(path or _line(node.start_mark), f"YAML tag {node.tag!r} is not allowed in recipes")
        return [_build(child, _join(path, i), depth + 1) for i, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        if node.tag != f"{_CORE}map":
            raise YamlProblem(path or _line(node.start_mark), f"YAML tag {node.tag!r} is not allowed in recipes")
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            if knode.tag == f"{_CORE}merge":
                raise YamlProblem(_join(path, "<<"), "YAML merge keys (<<) are not allowed in recipes")
            if not isinstance(knode, yaml.ScalarNode):
                raise YamlProblem(path or _line(knode.start_mark), f"keys must be plain strings ({_line(knode.start_mark)})")
            key = _scalar(knode, path)
            if not isinstance(key, str):
                # `1: x` or `true: x`: keep the text so the schema check can name it
                key = str(knode.value)
            if key in out:
                raise YamlProblem(_join(path, key), f"duplicate key {key!r} ({_line(knode.start_mark)})")
            out[key] = _build(vnode, _join(path, key), depth + 1)
        return out
    raise YamlProblem(path or "<yaml>", f"unsupported YAML node {type(node).__name__}")


def load(text: str | bytes) -> Any:
    """Parse one YAML document strictly into dicts, lists and scalars; raise ``YamlProblem``."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise YamlProblem("<yaml>", f"file is larger than {MAX_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YamlProblem("<yaml>", f"not UTF-8 text (byte {exc.start})") from exc
    if len(text) > MAX_BYTES:
        raise YamlProblem("<yaml>", f"file is larger than {MAX_BYTES} characters")
    loader = None
    try:
        loader = _Loader(text)  # the reader already rejects non-printable characters here
        node = loader.get_single_node()
    except YamlProblem:
        raise
    except yaml.MarkedYAMLError as exc:
        where = _line(exc.problem_mark) if exc.problem_mark is not None else "<yaml>"
        raise YamlProblem(where, f"not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlProblem("<yaml>", f"not valid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    except RecursionError:
        raise YamlProblem("<yaml>", "nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return None
    try:
        return _build(node, "", 0)
    except RecursionError:
        raise YamlProblem("<yaml>", "nested too deeply") from None


class _Dumper(yaml.SafeDumper):
    """SafeDumper that never writes anchors/aliases (our loader refuses them)."""

    def ignore_aliases(self, data):  # noqa: D401  (PyYAML hook)
        return True


def dump(data: Any) -> str:
    """YAML text for plain data (dicts keep their order), readable and loadable by :func:`load`."""
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    try:
        if load(text) == data:
            return text
    except YamlProblem:
        pass
    # raw unicode line breaks (U+0085, U+2028) do not survive unquoted; escape everything non-ASCII
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=False, default_flow_style=False, width=100)


# --- checking loaded data against a schema, collecting every problem with its key path ------------

def suggest(word: str, choices) -> str | None:
    """The closest known spelling of a misspelled key or value, if any is close enough."""
    import difflib

    hits = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1, cutoff=0.6)
    return hits[0] if hits else None


class Checker:
    """Typed access to loaded YAML with key paths; problems are collected, never raised.

    Each getter returns the checked value (or ``default`` when the key is absent / null) and
    returns ``None`` after recording a problem, so one pass reports everything at once.
    """

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, path: str, message: str, *, hint: str | None = None) -> None:
        self.problems.append((path or "<root>", f"{message} ({hint})" if hint else message))

    def missing(self, path: str, hint: str) -> None:
        self.add(path, "required key is missing", hint=hint)
        return None

    def keys(self, d: dict, known, path: str) -> None:
        for k in d:
            if k not in known:
                near = suggest(k, known)
                hint = f"did you mean {near!r}?" if near else f"known keys: {', '.join(sorted(known))}"
                self.add(_join(path, k), "unknown key", hint=hint)

    def _get(self, d: dict, key: str, path: str, required: bool, hint: str | None = None):
        if d.get(key) is None:
            if required:
                self.missing(_join(path, key), hint or "this key is required")
            return None, False
        return d[key], True

    def str_(self, d: dict, key: str, path: str, *, required: bool = False, default: str | None = None) -> str | None:
        v, present = self._get(d, key, path, required)
        if not present:
            return default
        if not isinstance(v, str) or not v.strip():
            self.add(_join(path, key), f"must be a non-empty string, got {v!r}")
            return None
        return v

    def name(self, d: dict, key: str, path: str, *, default: str | None = None) -> str | None:
        import re

        v = self.str_(d, key, path, required=default is None, default=default)
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            self.add(_join(path, key), f"name {v!r} must be letters, digits, '_', '.', '-' (max 100, no spaces or '@')")
            return None
        return v

    def str_list(self, d: dict, key: str, path: str) -> list[str] | None:
        v, present = self._get(d, key, path, False)
        if not present:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.add(_join(path, key), f"must be a list of strings, got {v!r}"[:200])
            return None
        return list(v)

    def bool_(self, d: dict, key: str, path: str, *, default: bool | None = None) -> bool | None:
        v, present = self._get(d, key, path, False)
        if not present:
            return default
        if not isinstance(v, bool):
            self.add(_join(path, key), f"must be true or false, got {v!r}")
            return None
        return v

    def int_(self, d: dict, key: str, path: str, *, default: int | None = None, lo: int | None = None,
             hi: int | None = None) -> int | None:
        v, present = self._get(d, key, path, False)
        if not present:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            self.add(_join(path, key), f"must be an integer, got {v!r}")
            return None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.add(_join(path, key), f"{v} is out of range [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
            return None
        return v

    def num(self, d: dict, key: str, path: str, *, default: float | None = None, lo: float | None = None,
            hi: float | None = None, lo_open: bool = False) -> float | None:
        import math

        v, present = self._get(d, key, path, False)
        if not present:
            return default
        if isinstance(v, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept numeric spellings
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.add(_join(path, key), f"must be a finite number, got {d[key]!r}")
            return None
        v = float(v)
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            self.add(_join(path, key), f"{v:g} is out of range {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, "
                                       f"{hi if hi is not None else 'inf'}]")
            return None
        return v

    def choice(self, d: dict, key: str, path: str, choices, *, default: str | None = None) -> str | None:
        v, present = self._get(d, key, path, False)
        if not present:
            return default
        if not isinstance(v, str) or v not in choices:
            near = suggest(v, choices) if isinstance(v, str) else None
            hint = f"did you mean {near!r}?" if near else None
            self.add(_join(path, key), f"{v!r} is not one of {', '.join(sorted(choices))}", hint=hint)
            return None
        return v
