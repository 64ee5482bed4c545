"""Read a config: TOML (or a checkpoint's saved copy) plus `section.key=value` overrides, typed and checked.

A typo gets the closest valid key; a key of an earlier release names what replaced it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from lm.config.checks import validate
from lm.config.schema import PRESETS, closest, SECTION_TYPES, Config, ConfigError, TrainConfig, build, field_key



# Keys of earlier releases: what replaced them.
RENAMED = {("train", "eval_iters"): "train.eval_sequences (validation windows, the same for any world size; "
                                    "eval_iters x batch_size gives the old number)"}


def _unknownfield_key(where: str, section: str, key: str) -> ConfigError:
    if (section, key) in RENAMED:
        return ConfigError(f"{where}: '{section}.{key}' was replaced by {RENAMED[section, key]}")
    match = difflib.get_close_matches(key, list(_field_types(section)), n=1, cutoff=0.0)
    hint = f" (did you mean '{section}.{match[0]}'?)" if match else ""
    return ConfigError(f"{where}: unknown key '{section}.{key}'{hint}")


def _field_types(section: str) -> dict[str, type]:
    hints = typing.get_type_hints(SECTION_TYPES[section])
    return {field_key(f.name): hints[f.name] for f in dataclasses.fields(SECTION_TYPES[section])}


def _check_type(where: str, key: str, value, expected):
    """Return `value` converted to `expected` or raise a ConfigError naming `where` and `key`."""
    ok = False
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    elif typing.get_origin(expected) in (typing.Union, types.UnionType):  # the first type that fits
        for option in typing.get_args(expected):
            with contextlib.suppress(ConfigError):
                return _check_type(where, key, value, option)
    elif typing.get_origin(expected) is list and typing.get_args(expected) == (float,):
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = [float(v) for v in value] if ok else value
    elif typing.get_origin(expected) is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"{where}: '{key}' must be {name}, got {type(value).__name__} {value!r}")
    return value


def _merge(raw: dict, where: str, into: dict[str, dict]):
    for section, values in raw.items():
        if section not in SECTION_TYPES:
            raise ConfigError(f"{where}: unknown section '{section}'{closest(section, SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: '{section}' must be a table of keys")
        types = _field_types(section)
        for key, value in values.items():
            if key not in types:
                raise _unknownfield_key(where, section, key)
            into[section][key] = _check_type(where, f"{section}.{key}", value, types[key])


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value` -> (section, key, value); the value is read as TOML where the field is not a str."""
    where = f"override '{text}'"
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"{where}: expected section.key=value (e.g. train.max_steps=100)")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in SECTION_TYPES:
        raise ConfigError(f"{where}: unknown section '{section}'{closest(section, SECTION_TYPES)}")
    types = _field_types(section)
    if key not in types:
        raise _unknownfield_key(where, section, key)
    raw = raw.strip()
    if types[key] is str:
        value = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    else:
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or only defaults when `path` is None), apply overrides, validate."""
    values: dict[str, dict] = {name: {} for name in SECTION_TYPES}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        _merge(raw, str(path), values)
    origins = {}  # "section.key" -> the override that set it, so a bad value names the override
    for text in overrides:
        section, key, value = parse_override(text)
        _merge({section: {key: value}}, f"override '{text}'", values)
        origins[f"{section}.{key}"] = f"override '{text}'"

    preset = values["model"].get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"{path or 'config'}: unknown model.preset '{preset}'{closest(preset, PRESETS)}")
        values["model"] = {**PRESETS[preset], **values["model"]}
    cfg = build(values)
    validate(cfg, str(path) if path is not None else "config", origins)
    # the keys the file, its preset or an override set (not defaults): init.from fills in the others
    cfg.given = frozenset(f"{section}.{key}" for section, keys in values.items() for key in keys)
    return cfg


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal Config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def config_from_toml_text(text: str, where: str) -> Config:
    """Rebuild a Config saved by `to_toml` (e.g. inside a checkpoint)."""
    values: dict[str, dict] = {name: {} for name in SECTION_TYPES}
    _merge(_upgrade(tomllib.loads(text)), where, values)
    cfg = build(values)
    validate(cfg, where)
    return cfg


def _upgrade(raw: dict) -> dict:
    """A config saved by an earlier release, in today's keys (so its checkpoints still load)."""
    parallel = raw.get("parallel")
    if isinstance(parallel, dict) and isinstance(parallel.get("compile"), bool):
        parallel["compile"] = "blocks" if parallel["compile"] else "none"
    train = raw.get("train")
    if isinstance(train, dict) and "eval_iters" in train:
        iters = train.pop("eval_iters")
        train.setdefault("eval_sequences", iters * train.get("batch_size", TrainConfig.batch_size))
    return raw

