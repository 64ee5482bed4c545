"""The run configuration (TOML sections `[model]`, `[data]`, `[optim]`, `[train]`, ...).

    schema.py   one dataclass per section, defaults, presets, `ConfigError`
    load.py     TOML and `section.key=value` overrides -> a typed Config; `to_toml` writes it back
    checks.py   impossible values and combinations, each one line naming the key and where it was set

Import from the module that defines a name (`from lm.config.load import load_config`).
"""
