"""Read MMDetection's Python configs as data, never executing them.

MMDetection (2.x with ``mmcv.Config``, 3.x with ``mmengine.Config``) describes a model in a Python file
of assignments: ``model = dict(type='MaskRCNN', backbone=dict(...), ...)``, with ``_base_ = [...]``
naming files whose variables the file inherits and overrides. This module parses such a file with
:mod:`ast` and evaluates only data:

* literals (numbers, strings, ``True``/``False``/``None``), lists, tuples, dicts, sets;
* ``dict(...)`` / ``list(...)`` / ``tuple(...)`` calls, including ``dict(a=1, **other)``;
* names assigned earlier in the same file, subscripts of them (``x['key']``, ``x[0]``);
* ``+ - * / // %`` on numbers, ``+`` on strings/lists/tuples, ``*`` of a list by an integer, unary ``-``;
* mmengine's ``{{_base_.key.sub}}`` references to an inherited value and its predefined
  ``{{fileDirname}}``-style variables.

Anything else (an ``import``, a call of any other function, a lambda, a comprehension, an attribute
access, an f-string, mmengine's new-style ``with read_base():`` configs) raises
:class:`ConfigNeedsExecutionError` naming the construct and its line: such a config would have to be
run to be read, which this project never does.

Inheritance follows mmengine: the bases are merged in order (a key defined by two bases is an error),
then the file's own variables are merged over them: dicts merge key by key, a dict holding
``_delete_=True`` replaces the base's value, any other value replaces the base's whole.
"""

from __future__ import annotations

import ast
import copy
import operator
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = [
    "ConfigNeedsExecutionError",
    "parse_config_text",
    "merge_configs",
    "load_config_file",
]


class ConfigNeedsExecutionError(ValueError):
    """The config file holds something that only running it would evaluate (the message names it)."""


_MAX_BASE_DEPTH = 16
_BASE_REF = re.compile(r"""(['"]?)\{\{\s*_base_\.([A-Za-z_][\w.]*)\s*\}\}\1""")
_PREDEFINED = re.compile(r"\{\{\s*(fileDirname|fileBasename|fileBasenameNoExtension|fileExtname)\s*\}\}")
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_BASE_FN = "__mmdet_base_ref__"


def _describe(node: ast.AST) -> str:
    try:
        text = ast.unparse(node)
    except Exception:  # noqa: BLE001 - only for the message
        text = type(node).__name__
    return text if len(text) <= 60 else text[:57] + "..."


class _Evaluator:
    """Evaluates the data expressions of one config file (see the module docstring)."""

    def __init__(self, source: str, base: Mapping[str, Any]):
        self.source = source
        self.base = base
        self.names: dict[str, Any] = {}

    def fail(self, node: ast.AST, what: str) -> ConfigNeedsExecutionError:
        line = getattr(node, "lineno", "?")
        return ConfigNeedsExecutionError(
            f"{self.source}, line {line}: {what} ({_describe(node)}) would need the config to be executed, "
            "which is never done here; replace it by plain values, or pass the config text MMDetection "
            "stored in the checkpoint (its meta)"
        )

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (str, int, float, bool, type(None))):
                return node.value
            raise self.fail(node, f"a {type(node.value).__name__} constant")
        if isinstance(node, ast.List):
            return [self.value(e) for e in self._elements(node.elts)]
        if isinstance(node, ast.Tuple):
            return tuple(self.value(e) for e in self._elements(node.elts))
        if isinstance(node, ast.Set):
            return {self._hashable(self.value(e), e) for e in node.elts}
        if isinstance(node, ast.Dict):
            out: dict = {}
            for k, v in zip(node.keys, node.values):
                if k is None:  # {**other}
                    out.update(self._mapping(v))
                else:
                    out[self._hashable(self.value(k), k)] = self.value(v)
            return out
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return copy.deepcopy(self.names[node.id])
            raise ConfigNeedsExecutionError(
                f"{self.source}, line {node.lineno}: name {node.id!r} is not assigned above it in this file "
                "(names of base files are referenced as {{_base_." + node.id + "}})"
            )
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise self.fail(node, f"the operator {type(node.op).__name__}")
            left, right = self.value(node.left), self.value(node.right)
            if isinstance(node.op, ast.Mod) and isinstance(left, str):
                raise self.fail(node, "%-formatting of a string")
            try:
                return op(left, right)
            except Exception as exc:  # noqa: BLE001 - bad operand types etc.
                raise ConfigNeedsExecutionError(f"{self.source}, line {node.lineno}: cannot evaluate {_describe(node)} ({exc})") from exc
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            v = self.value(node.operand)
            if isinstance(node.op, ast.Not):
                return not v
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise self.fail(node, "a sign on a non-number")
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Subscript):
            container = self.value(node.value)
            key = self.value(node.slice)
            try:
                return copy.deepcopy(container[key])
            except (KeyError, IndexError, TypeError) as exc:
                raise ConfigNeedsExecutionError(f"{self.source}, line {node.lineno}: {_describe(node)} has no value ({exc!r})") from exc
        if isinstance(node, ast.Attribute):
            raise self.fail(node, "an attribute access")
        if isinstance(node, (ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp)):
            raise self.fail(node, "a comprehension")
        if isinstance(node, ast.Lambda):
            raise self.fail(node, "a lambda")
        if isinstance(node, ast.JoinedStr):
            raise self.fail(node, "an f-string")
        raise self.fail(node, f"a {type(node).__name__} expression")

    def _elements(self, elts):
        for e in elts:
            if isinstance(e, ast.Starred):
                raise self.fail(e, "a starred expression")
            yield e

    def _hashable(self, v, node):
        try:
            hash(v)
        except TypeError:
            raise self.fail(node, "an unhashable dict key") from None
        return v

    def _mapping(self, node) -> dict:
        v = self.value(node)
        if not isinstance(v, Mapping):
            raise self.fail(node, "** of a non-dict")
        return dict(v)

    def _call(self, node: ast.Call) -> Any:
        fn = node.func
        if isinstance(fn, ast.Name) and fn.id == _BASE_FN:
            dotted = self.value(node.args[0])
            return self._base_ref(dotted, node)
        if not isinstance(fn, ast.Name) or fn.id not in ("dict", "list", "tuple"):
            raise self.fail(node, f"a call of {_describe(fn)}()")
        if fn.id == "dict":
            out: dict = {}
            for a in node.args:
                out.update(self._mapping(a))
            for kw in node.keywords:
                if kw.arg is None:
                    out.update(self._mapping(kw.value))
                else:
                    out[kw.arg] = self.value(kw.value)
            if len(node.args) > 1:
                raise self.fail(node, "dict() with several positional arguments")
            return out
        if node.keywords or len(node.args) > 1:
            raise self.fail(node, f"{fn.id}() with keyword or several arguments")
        items = self.value(node.args[0]) if node.args else []
        if not isinstance(items, (list, tuple, str)):
            raise self.fail(node, f"{fn.id}() of a non-sequence")
        return list(items) if fn.id == "list" else tuple(items)

    def _base_ref(self, dotted: str, node) -> Any:
        cur: Any = self.base
        for part in dotted.split("."):
            if not isinstance(cur, Mapping) or part not in cur:
                raise ConfigNeedsExecutionError(
                    f"{self.source}, line {node.lineno}: {{{{_base_.{dotted}}}}} names no value of the base configs"
                )
            cur = cur[part]
        return copy.deepcopy(cur)


def _substitute(text: str, path: Path | None) -> str:
    """mmengine's text substitutions: predefined variables and ``{{_base_.x}}`` references."""
    if path is not None:
        values = {
            "fileDirname": str(path.parent),
            "fileBasename": path.name,
            "fileBasenameNoExtension": path.stem,
            "fileExtname": path.suffix,
        }
        text = _PREDEFINED.sub(lambda m: values[m.group(1)], text)
    return _BASE_REF.sub(lambda m: f"{_BASE_FN}({m.group(2)!r})", text)


def _statements(tree: ast.Module, source: str):
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # a docstring or a bare string
        if isinstance(stmt, ast.With):
            raise ConfigNeedsExecutionError(
                f"{source}, line {stmt.lineno}: a new-style mmengine config (`with read_base(): from ... import *`) "
                "is Python code that must be executed to be read; pass an old-style config (MMDetection's "
                "configs/ folder) or the config text stored in the checkpoint"
            )
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            raise ConfigNeedsExecutionError(
                f"{source}, line {stmt.lineno}: `{_describe(stmt)}` imports code; configs are read as data only, "
                "remove the import (custom_imports=dict(...) is the data form) or pass the config text stored in the checkpoint"
            )
        if isinstance(stmt, ast.Assign):
            if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
                raise ConfigNeedsExecutionError(
                    f"{source}, line {stmt.lineno}: only `name = value` assignments are read as data, not `{_describe(stmt)}`"
                )
            yield stmt.targets[0].id, stmt.value
            continue
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            yield stmt.target.id, stmt.value
            continue
        raise ConfigNeedsExecutionError(
            f"{source}, line {stmt.lineno}: a {type(stmt).__name__} statement (`{_describe(stmt)}`) would need "
            "the config to be executed; only `name = value` assignments are read"
        )


def parse_config_text(text: str, *, source: str = "<config>", base: Mapping[str, Any] | None = None, path: Path | None = None) -> dict:
    """Evaluate the assignments of one config file's text as data.

    Args:
        text: the Python source of the config.
        source: how messages name it.
        base: the merged variables of its bases (for ``{{_base_.x}}`` references).
        path: the file the text comes from (for ``{{fileDirname}}`` and friends).

    Returns:
        ``{variable name: value}`` in assignment order, ``_base_`` included when present. Names starting
        with ``__`` are dropped, as mmengine does.

    Raises:
        ConfigNeedsExecutionError: a construct that is not data (see the module docstring).
        ValueError: a syntax error.
    """
    text = _substitute(text, path)
    try:
        tree = ast.parse(text, filename=source)
    except SyntaxError as exc:
        raise ValueError(f"{source} is not valid Python (line {exc.lineno}: {exc.msg})") from exc
    ev = _Evaluator(source, base or {})
    for name, node in _statements(tree, source):
        ev.names[name] = ev.value(node)
    return {k: v for k, v in ev.names.items() if not k.startswith("__")}


def merge_configs(base: Mapping, override: Mapping) -> dict:
    """mmengine's merge of a child config dict into its base (a deep copy; the base is not changed).

    Nested dicts merge key by key; a child dict with ``_delete_=True`` replaces the base's value (the
    flag itself is dropped); any other child value replaces the base's whole.
    """
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping):
            value = dict(value)
            delete = value.pop("_delete_", False)
            if not delete and isinstance(out.get(key), Mapping):
                out[key] = merge_configs(out[key], value)
                continue
            out[key] = _strip_delete(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _strip_delete(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_delete(v) for k, v in value.items() if k != "_delete_"}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip_delete(v) for v in value)
    return value


def load_config_file(
    source: str | Path,
    *,
    bundled: Callable[[str, tuple[str, ...]], tuple[str, str] | None] | None = None,
    text: str | None = None,
    _depth: int = 0,
    _chain: tuple[str, ...] = (),
) -> dict:
    """Read a config (a file, or ``text``) with its ``_base_`` files merged in.

    Args:
        source: the config's path (or, with ``text``, its name for messages; bases are then looked up
            relative to it if it is a path, else in ``bundled`` only).
        bundled: ``bundled(base_name, chain) -> (key, text)`` for a base that is not on disk (model-zoo
            bases shipped with the package), or None.
        text: the config's text, when it does not come from a file (e.g. a checkpoint's meta).

    Returns:
        The merged variables (no ``_base_`` key).

    Raises:
        FileNotFoundError: the file or one of its bases is neither on disk nor bundled.
        ConfigNeedsExecutionError, ValueError: see :func:`parse_config_text`; a ``_base_`` cycle or
            a key defined by two bases.
    """
    if _depth > _MAX_BASE_DEPTH:
        raise ValueError(f"_base_ chain deeper than {_MAX_BASE_DEPTH}: {' -> '.join(_chain)}")
    path: Path | None = None
    if text is None:
        path = Path(os.path.expanduser(str(source)))
        if not path.is_file():
            raise FileNotFoundError(f"MMDetection config {source} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read MMDetection config {path}: {exc}") from exc
        where = str(path.resolve())
    else:
        where = str(source)
        candidate = Path(str(source))
        path = candidate if candidate.suffix == ".py" and candidate.parent.is_dir() and str(candidate.parent) != "." else None
    if where in _chain:
        raise ValueError(f"_base_ cycle: {' -> '.join(_chain + (where,))}")
    chain = _chain + (where,)
    base_names = _base_names(text, where)
    merged: dict = {}
    for name in base_names:
        base_cfg = _load_base(name, path, bundled, _depth, chain)
        dup = sorted(set(merged) & set(base_cfg))
        if dup:
            raise ValueError(f"{where}: the bases define {', '.join(dup)} more than once (mmengine forbids it)")
        merged.update(base_cfg)
    own = parse_config_text(text, source=where, base=merged, path=path)
    own.pop("_base_", None)
    return merge_configs(merged, own)


def _base_names(text: str, where: str) -> list[str]:
    """The ``_base_`` entries of a config, read before anything else (they may not use variables)."""
    try:
        tree = ast.parse(_substitute(text, None), filename=where)
    except SyntaxError as exc:
        raise ValueError(f"{where} is not valid Python (line {exc.lineno}: {exc.msg})") from exc
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_base_" for t in stmt.targets):
            value = _Evaluator(where, {}).value(stmt.value)
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{where}: _base_ must be a file name or a list of them, got {value!r}")
            return list(names)
    return []


def _load_base(name: str, parent: Path | None, bundled, depth: int, chain: tuple[str, ...]) -> dict:
    if name.startswith(("http://", "https://")):
        raise ValueError(f"_base_ {name!r} in {chain[-1]} is a URL; download it next to the config")
    plain = name.split("::", 1)[1] if "::" in name else name  # mmengine's "mmdet::_base_/..." scope
    if "::" not in name:
        candidate = Path(os.path.expanduser(plain))
        if not candidate.is_absolute() and parent is not None:
            candidate = parent.parent / candidate
        if candidate.is_file():
            return load_config_file(candidate, bundled=bundled, _depth=depth + 1, _chain=chain)
    found = bundled(plain, chain) if bundled is not None else None
    if found is None:
        raise FileNotFoundError(
            f"base config {name} of {chain[-1]} is neither beside it nor one of the bundled model-zoo bases; "
            "copy MMDetection's configs/ folder next to the config, or pass the config text stored in the checkpoint"
        )
    key, base_text = found
    return load_config_file(f"<bundled {key}>", bundled=bundled, text=base_text, _depth=depth + 1, _chain=chain)
