"""Checks on an untrusted ONNX file before it enters the cache (DESIGN.md §8).

External-data references are refused: ORT would read the named files from this machine's disk
into the weights, and the outputs would carry them back to whoever sent the model. Operators
must come from the standard domains or functions the model itself defines; this node never loads
custom-op libraries. The rules are the coordinator's too: protocol/modelpolicy.py.
"""

from __future__ import annotations

from pathlib import Path

from protocol.modelpolicy import ModelPolicyError, load_checked

from .errors import TaskFailed


class UnsafeModel(TaskFailed):
    pass


def check_model(path: Path) -> None:
    """Raise `UnsafeModel` unless the file keeps the shared model policy (protocol/modelpolicy.py):
    parses as ONNX, inline weights everywhere, standard operator domains or the model's own functions."""
    try:
        load_checked(path.read_bytes())
    except ModelPolicyError as exc:
        raise UnsafeModel(str(exc)) from exc
