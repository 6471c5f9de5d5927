"""Strict YAML loading into the typed config.

- `base: other.yaml` (or a list) includes recipes; paths are relative to the including file.
  Later files and the including file win; mappings merge key by key, lists are replaced.
- `a.b.c=value` command-line overrides, parsed as YAML scalars.
- `${oc.env:VAR}` and `${oc.env:VAR,default}` interpolate environment variables.
- Unknown keys are errors naming the key, the file it came from and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from nemotron_train.config.schema import Config
from nemotron_train.errors import ConfigError




_ENV_RE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")


# --------------------------------------------------------------------------- raw YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` entries may be overridden by explicit keys
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first_line:
                        raise yaml.constructor.ConstructorError(
                            None, None,
                            f"duplicate key {key!r} (first given on line {first_line[key] + 1}); keep one of them",
                            key_node.start_mark,
                        )
                    first_line[key] = key_node.start_mark.line
                except TypeError:
                    pass  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep)


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: `line L, column C: problem` (PyYAML's own text spans several)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context and "duplicate key" not in problem else problem
    text = " ".join(str(text).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark is not None else text


def _check_acyclic(value: Any, path: Any, _ancestors: Tuple[int, ...] = ()) -> None:
    """A self-referential anchor (`a: &x [*x]`) loads as a cyclic structure; refuse it here
    rather than recurse forever when merging."""
    if not isinstance(value, (dict, list)):
        return
    if id(value) in _ancestors:
        raise ConfigError(f"{path}: a YAML anchor refers to itself (e.g. `a: &x [*x]`); a config must be a tree")
    children = value.values() if isinstance(value, dict) else value
    for child in children:
        _check_acyclic(child, path, _ancestors + (id(value),))


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        # Configs are UTF-8 whatever the locale (LC_ALL=C would otherwise decode them as ASCII).
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_error_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    _check_acyclic(data, path)
    return data


def _merge(dst: Dict[str, Any], src: Dict[str, Any], src_file: str, origins: Dict[str, str], prefix: str = "") -> None:
    """Deep-merge src into dst, recording which file set each leaf key."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, src_file, origins, dotted + ".")
        else:
            dst[key] = value
            _record_origins(value, dotted, src_file, origins)


def _record_origins(value: Any, dotted: str, src_file: str, origins: Dict[str, str]) -> None:
    origins[dotted] = src_file
    if isinstance(value, dict):
        for k, v in value.items():
            _record_origins(v, f"{dotted}.{k}", src_file, origins)


def load_raw(path: str | Path, origins: Optional[Dict[str, str]] = None, _seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """Load a YAML file with its `base:` includes resolved; returns a plain dict."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in _seen + (path,))
        raise ConfigError(f"circular `base:` include: {chain}")
    origins = {} if origins is None else origins
    data = _read_yaml(path)
    bases = data.pop("base", None)
    merged: Dict[str, Any] = {}
    if bases is not None:
        if not isinstance(bases, (str, list)):
            raise ConfigError(f"{path}: `base:` must be a file name or a list of file names, got {bases!r}")
        for base in [bases] if isinstance(bases, str) else bases:
            if not isinstance(base, str):
                raise ConfigError(f"{path}: `base:` must be a file name or a list of file names, got {base!r}")
            base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
            _merge(merged, load_raw(base_path, origins, _seen + (path,)), str(base_path), origins)
    _merge(merged, data, str(path), origins)
    return merged


# --------------------------------------------------------------------------- overrides


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str], origins: Dict[str, str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=10)")
        dotted, _, text = item.partition("=")
        dotted = dotted.strip()
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key component in {dotted!r}")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        _check_acyclic(value, f"override {dotted}")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        _record_origins(value, dotted, "command line", origins)


# --------------------------------------------------------------------------- interpolation


def _interpolate(value: Any, dotted: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{dotted}.{k}" if dotted else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def repl(match: re.Match) -> str:
        var, default = match.group(1), match.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise ConfigError(f"{dotted}: environment variable {var} is not set (use ${{oc.env:{var},default}} for a fallback)")

    out = _ENV_RE.sub(repl, value)
    if "${" in out:
        raise ConfigError(f"{dotted}: unsupported interpolation in {value!r}; only ${{oc.env:VAR}} and ${{oc.env:VAR,default}} are supported")
    # A whole-value interpolation is re-parsed so `${oc.env:STEPS}` can feed an int field.
    if _ENV_RE.fullmatch(value):
        try:
            return yaml.safe_load(out)
        except yaml.YAMLError:
            return out
    return out


# --------------------------------------------------------------------------- dataclass construction


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, dotted: str, origins: Dict[str, str]) -> Any:
    origin = typing.get_origin(tp)
    where = origins.get(dotted, "defaults")
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], dotted, origins)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{dotted}={value!r} is not supported (from {where}); use one of: {', '.join(map(str, allowed))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} (from {where}): expected a mapping for section {_type_name(tp)}, got {value!r}")
        return _build(tp, value, dotted + ".", origins)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{dotted} (from {where}): expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{dotted}[{i}]", origins) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted} (from {where}): expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{dotted} (from {where}): expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # YAML reads `1e-5` as a string
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{dotted} (from {where}): expected a number, got {value!r}") from None
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{dotted} (from {where}): expected a finite number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{dotted} (from {where}): expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: Any, raw: Dict[str, Any], prefix: str, origins: Dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            dotted = f"{prefix}{key}"
            where = origins.get(dotted, "defaults")
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key `{dotted}` in {where}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", origins)
    return cls(**kwargs)


# --------------------------------------------------------------------------- public API


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a run config: YAML with includes, then overrides, then interpolation, then types."""
    origins: Dict[str, str] = {}
    raw = load_raw(path, origins) if path is not None else {}
    apply_overrides(raw, overrides, origins)
    raw = _interpolate(raw, "")
    return _build(Config, raw, "", origins)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; loading it back gives an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def config_from_dict(raw: Dict[str, Any]) -> Config:
    return _build(Config, raw, "", {})
