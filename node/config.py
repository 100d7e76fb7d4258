"""The node's configuration from a TOML file, `SPARECYCLES_NODE_*` environment variables and flags.

Precedence: command-line flags > environment > file > NodeSettings' defaults. The file is
`--config PATH` (or `$SPARECYCLES_NODE_CONFIG`), else `node.toml` in the user's config directory
if it exists. Keys are the flags' names with underscores (`cache_quota_mb = 512` is
`--cache-quota-mb 512` is `SPARECYCLES_NODE_CACHE_QUOTA_MB=512`). Every other NodeSettings field of
a plain type (`worker_idle_seconds`, `heartbeat_seconds`, ...) is a key and a variable too, under
its own name, with no flag: a field added to NodeSettings is configurable without a change here.

Anything unknown or of the wrong type is a `ConfigError` whose one line names the key and where it
came from: a volunteer's typo must not start a daemon that silently ignores it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import NodeSettings

ENV_PREFIX = "SPARECYCLES_NODE_"
ENV_CONFIG = ENV_PREFIX + "CONFIG"
CONFIG_NAME = "node.toml"
MIB = 1024 * 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A configuration problem, in one line that says which key and where."""


@dataclass(frozen=True, slots=True)
class Option:
    key: str
    """Name in the file; the flag is `--key-with-dashes`, the variable SPARECYCLES_NODE_KEY."""
    kind: type
    """int, float, str, bool or Path: what the file's value must be and how flag and variable parse."""
    field: str | None
    """The NodeSettings field it sets; None for the daemon's own options (log_level)."""
    help: str = ""
    scale: int = 1
    """Multiplier from the option's unit to the field's (MiB to bytes)."""
    bounds: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    flag: bool = True


# The options a volunteer sets; each is also a flag. The help text's defaults come from NodeSettings.
OPTIONS: tuple[Option, ...] = (
    Option("broker", str, "broker_url", "MQTT broker", metavar="mqtt://HOST:PORT"),
    Option("coordinator", str, "coordinator_url", "coordinator HTTP API", metavar="http://HOST:PORT"),
    Option("key", Path, "key_path", "node key file, created with mode 0600 if absent; the lock and status files "
           "sit beside it", metavar="PATH"),
    Option("owner", str, "owner", "the account that gets the credit (default: $USER); on an open coordinator it is "
           "registered on first use with a key kept beside the node key"),
    Option("owner_key", Path, "owner_key_path", "the owner account's key (default: owner-<OWNER>.key beside --key, "
           "created if absent)", metavar="PATH"),
    Option("cert", Path, "cert_path", "a certificate from the owner (sparecycles owner certify NODE_PUBKEY); "
           "no owner key needed", metavar="FILE"),
    Option("slots", int, "slots", "tasks run at once, one core each (default: every core)", bounds=(1, 4096)),
    Option("cache_dir", Path, "cache_dir", "model cache directory", metavar="DIR"),
    Option("cache_quota_mb", int, "cache_quota_bytes", "model cache size limit in MiB; least recently used models "
           "go first", scale=MIB, bounds=(1, 1 << 40), metavar="MB"),
    Option("prefetch", int, "prefetch", "assignments held beyond --slots, fetched ahead (default: adapted to how "
           "long tasks take)", bounds=(0, 4096), metavar="N"),
    Option("drain_seconds", float, "drain_seconds", "on SIGTERM, how long running tasks may take to finish",
           bounds=(0, 86400), metavar="S"),
    Option("run_memory_mb", int, "run_memory_bytes", "memory one run may use; a model that wants more fails its "
           "task", scale=MIB, bounds=(1, 1 << 30), metavar="MB"),
    Option("max_run_seconds", float, "max_run_seconds", "no run takes longer; below it each model's limit follows "
           "its measured speed", bounds=(0.001, 86400 * 7), metavar="S"),
    Option("idle_only", bool, "idle_only", "compute only while the machine is spare (other processes' CPU, user "
           "input, battery); false on a dedicated server", metavar="true|false"),
    Option("max_other_cpu_percent", float, "max_other_cpu_percent", "suspend when other processes use more "
           "than this share of the machine", bounds=(0, 100), metavar="PCT"),
    Option("resume_after_seconds", float, "resume_after_seconds", "how long the machine must stay spare before "
           "the node resumes", bounds=(0, 86400), metavar="S"),
    Option("cpu_cap_percent", float, "cpu_cap_percent", "share of each slot's core the runs may use (100: no "
           "cap)", bounds=(1, 100), metavar="PCT"),
    Option("nice", int, "nice", "scheduling niceness of the run workers, 0..19 (19: lowest priority)",
           bounds=(0, 19), metavar="N"),
    Option("log_level", str, None, "DEBUG shows every message; INFO only state changes, joins, refusals and "
           "errors", choices=LOG_LEVELS),
)
SIMPLE_TYPES: dict[Any, type] = {int: int, float: float, str: str, bool: bool, Path: Path,
                                 int | None: int, float | None: float, str | None: str, Path | None: Path}


def _advanced() -> tuple[Option, ...]:
    """NodeSettings fields no option above covers, by their own names (file and environment only)."""
    covered = {o.field for o in OPTIONS}
    hints = typing.get_type_hints(NodeSettings)
    return tuple(Option(f.name, SIMPLE_TYPES[hints[f.name]], f.name, flag=False)
                 for f in dataclasses.fields(NodeSettings)
                 if f.name not in covered and hints[f.name] in SIMPLE_TYPES)


ALL_OPTIONS: dict[str, Option] = {o.key: o for o in (*OPTIONS, *_advanced())}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    settings: NodeSettings
    log_level: str
    file: Path | None
    """The TOML file read, if any."""
    sources: Mapping[str, str]
    """Where each key that is not a default came from: the file's path, the variable, or the flag."""


def config_dir(env: Mapping[str, str]) -> Path:
    """`$SPARECYCLES_CONFIG_DIR`, else `$XDG_CONFIG_HOME/sparecycles`, else `~/.config/sparecycles`
    (the CLI's own rule, sparecycles/identity.py: tests point it at a private directory)."""
    explicit = env.get("SPARECYCLES_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CONFIG_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is invalid, ignore it
        return Path(xdg) / "sparecycles"
    return Path.home() / ".config" / "sparecycles"


def default_config_path(env: Mapping[str, str]) -> Path:
    return config_dir(env) / CONFIG_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` and one flag per option. A flag's default is None, meaning "not given": file and
    environment apply only where no flag was given."""
    defaults = NodeSettings()
    parser.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help=f"TOML file of settings (default: ${ENV_CONFIG}, else {CONFIG_NAME} in "
                             "$XDG_CONFIG_HOME/sparecycles or ~/.config/sparecycles if it exists)")
    for o in OPTIONS:
        default = "INFO" if o.field is None else getattr(defaults, o.field)
        if isinstance(default, int) and o.scale > 1:
            default //= o.scale
        shown = "" if default is None or o.key in ("owner", "slots") else f" (default: {default})"
        parser.add_argument(f"--{o.key.replace('_', '-')}", dest=o.key, default=None, metavar=o.metavar,
                            type=str.upper if o.choices else _bool_flag if o.kind is bool else o.kind,
                            choices=o.choices,
                            help=f"{o.help}{shown}")


def load(flags: Mapping[str, Any], env: Mapping[str, str]) -> NodeConfig:
    """The configuration from parsed flags (None: not given; `config` names the file) and the
    environment. Raises ConfigError."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = _config_file(flags, env)
    if path is not None:
        for key, value in _read_file(path).items():
            values[key], sources[key] = value, str(path)
    for key, value in _read_env(env).items():
        values[key], sources[key] = value, f"{ENV_PREFIX}{key.upper()}"
    for key, value in flags.items():
        if value is not None and key in ALL_OPTIONS:
            option = ALL_OPTIONS[key]
            source = f"--{key.replace('_', '-')}"
            values[key], sources[key] = _checked(option, value.expanduser() if isinstance(value, Path) else value,
                                                 source), source
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        option = ALL_OPTIONS[key]
        if option.field is not None:
            kwargs[option.field] = value * option.scale if option.scale > 1 else value
    try:
        settings = NodeSettings(**kwargs)
    except ValueError as exc:
        where = ", ".join(sorted(set(sources.values()))) or "defaults"
        raise ConfigError(f"invalid settings ({where}): {exc}") from None
    return NodeConfig(settings=settings, log_level=str(values.get("log_level", "INFO")), file=path,
                      sources=sources)


def _config_file(flags: Mapping[str, Any], env: Mapping[str, str]) -> Path | None:
    explicit = flags.get("config") or env.get(ENV_CONFIG) or None
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (given by "
                              f"{'--config' if flags.get('config') else ENV_CONFIG})")
        return path
    path = default_config_path(env)
    return path if path.is_file() else None


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(ALL_OPTIONS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else " (docs/node.md lists the keys)"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        option = ALL_OPTIONS.get(key)
        if option is None:
            raise _unknown(key, str(path))
        where = f"{path}: key {key!r}"
        if option.kind is Path:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where} must be a path (a string), got {value!r}")
            value = path.parent / Path(value).expanduser()  # relative to the file, not the daemon's cwd
        elif option.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif option.choices is not None and isinstance(value, str):
            value = value.upper()
        if not isinstance(value, option.kind) or (option.kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where} must be {_kind_name(option.kind)}, got {value!r}")
        values[key] = _checked(option, value, where)
    return values


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        key = name[len(ENV_PREFIX):].lower()
        option = ALL_OPTIONS.get(key)
        if option is None:
            raise _unknown(key, f"environment variable {name}")
        if text == "":  # compose's `${VAR:-}` and friends: an empty variable is an unset one
            continue
        values[key] = _checked(option, _parse(option, text, name), name)
    return values


def _bool_flag(text: str) -> bool:
    """argparse's `type=bool` would read "false" as True (a non-empty string)."""
    try:
        return bool(_parse(Option("flag", bool, None), text, "the flag"))
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from None


def _parse(option: Option, text: str, where: str) -> Any:
    kind = option.kind
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is Path:
            return Path(text).expanduser()
        if option.choices is not None:
            return text.upper()
        return kind(text)
    except ValueError:
        raise ConfigError(f"{where} must be {_kind_name(kind)}, got {text!r}") from None


def _checked(option: Option, value: Any, where: str) -> Any:
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{where} must be one of {', '.join(option.choices)}, got {value!r}")
    if option.bounds is not None and not option.bounds[0] <= value <= option.bounds[1]:
        low, high = option.bounds
        raise ConfigError(f"{where} must be between {low:g} and {high:g}, got {value!r}")
    return value


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Path: "a path"}.get(kind, kind.__name__)
