"""Where a person's account key lives on their machine, and loading it.

The account is the key: whoever holds `account.key` acts as the account, so the file is created
with mode 0600 and refused if others can read it (as ssh refuses a private key other users can read).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from protocol.errors import LocalError
from protocol.signing import Identity

from .errors import SparecyclesError

ACCOUNT_KEY = "account.key"


def config_dir() -> Path:
    """`$SPARECYCLES_CONFIG_DIR`, else `$XDG_CONFIG_HOME/sparecycles`, else `~/.config/sparecycles`."""
    explicit = os.environ.get("SPARECYCLES_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    # the XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "sparecycles"
    return Path.home() / ".config" / "sparecycles"


def default_key_path() -> Path:
    return config_dir() / ACCOUNT_KEY


def load_or_create_key(path: Path | None = None) -> Identity:
    """The Ed25519 key at `path` (default: `account.key` in `config_dir()`), created with mode 0600
    if it does not exist. A key file readable by group or others raises `SparecyclesError`."""
    path = default_key_path() if path is None else Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and stat.S_IMODE(mode) & 0o077:
        raise SparecyclesError(
            f"key file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); anyone who can "
            f"read it can act as this account. Fix it with `chmod 600 {path}`"
        )
    try:
        return Identity.load_or_create(path)
    except LocalError as exc:
        raise SparecyclesError(str(exc)) from exc
    except OSError as exc:
        raise SparecyclesError(f"cannot read or create the key file {path}: {exc.strerror or exc}") from exc
