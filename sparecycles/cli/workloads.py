"""Real workloads that need no download: scikit-learn's bundled digits through an MLP in ONNX.

The 1,797 digits (8×8 grey levels 0–16) ship inside scikit-learn; the model is trained here and
converted with skl2onnx, then cached so a second demo run loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# sklearn, skl2onnx, onnx and onnxruntime are imported inside the functions that need them: together
# they take about a second to import, which `sparecycles demo --help` should not pay.

DIGITS_INPUT = "input"
# Bump when the recipe below changes, so cached models built the old way are not reused.
RECIPE = "digits-mlp-v1"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}  # opset 17 loads in every onnxruntime since 1.13
TEST_FRACTION = 0.25
PIXEL_MAX = 16.0


@dataclass(frozen=True, eq=False, kw_only=True)
class Workload:
    """A model and the batch it runs on. `labels` are the true answers, row for row."""

    name: str
    model: bytes
    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    description: str
    held_out: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """Row indices the model never saw in training: accuracy there is the honest figure."""
    cached: bool = False
    """True when the model came from the cache rather than being trained just now."""

    @property
    def rows(self) -> int:
        return len(self.labels)


def missing_demo_extra() -> list[str]:
    """The demo extra's packages that are not installed (found without importing them, which takes
    a second): scikit-learn trains the model, skl2onnx converts it."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # ValueError: blocked in sys.modules, import would fail too
            return True

    return [name for module, name in (("sklearn", "scikit-learn"), ("skl2onnx", "skl2onnx")) if absent(module)]


def cache_dir() -> Path:
    """`$SPARECYCLES_CACHE_DIR`, else `$XDG_CACHE_HOME/sparecycles`, else `~/.cache/sparecycles`."""
    if explicit := os.environ.get("SPARECYCLES_CACHE_DIR"):
        return Path(explicit) / "workloads"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparecycles" / "workloads"


def _cache_key(seed: int) -> str:
    import onnx
    import skl2onnx
    import sklearn

    # A different sklearn can train a different model; a different skl2onnx converts differently.
    parts = [RECIPE, f"sklearn={sklearn.__version__}", f"skl2onnx={skl2onnx.__version__}",
             f"onnx={onnx.__version__}", f"numpy={np.__version__}", f"seed={seed}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _load_cached(path: Path) -> bytes | None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        data = path.read_bytes()
        onnx.load_model_from_string(data)  # a truncated or foreign file is rebuilt, not trusted
    except (OSError, DecodeError):
        return None
    return data


def _store_cached(path: Path, data: bytes) -> None:
    """Write atomically (temp file + rename) so two demos starting at once never read half a model."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".onnx")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a retrain next time


def _train_digits_mlp(x_train: np.ndarray, y_train: np.ndarray, seed: int) -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        # Not converging to sklearn's tolerance still gives ~97 % held-out accuracy; the warning is noise.
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(x_train, y_train)
    onx = to_onnx(
        mlp,
        initial_types=[(DIGITS_INPUT, FloatTensorType([None, x_train.shape[1]]))],
        # zipmap=False: plain tensors "label" int64 [N] and "probabilities" float32 [N, 10],
        # not a sequence of maps, which the wire protocol cannot carry.
        options={id(mlp): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    return bytes(onx.SerializeToString())


def digits_mlp(seed: int = 0, *, cache: Path | None = None, use_cache: bool = True) -> Workload:
    """All 1,797 digits as float32 [1797, 64] scaled to [0, 1], with an MLP trained on 75 % of them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / PIXEL_MAX).astype(np.float32)
    y = digits.target.astype(np.int64)
    rows = np.arange(len(y))
    train_rows, test_rows = train_test_split(rows, test_size=TEST_FRACTION, random_state=seed, stratify=y)

    path = (cache or cache_dir()) / f"digits_mlp-{_cache_key(seed)}.onnx"
    model = _load_cached(path) if use_cache else None
    cached = model is not None
    if model is None:
        model = _train_digits_mlp(x[train_rows], y[train_rows], seed)
        if use_cache:
            _store_cached(path, model)
    return Workload(
        name=f"digits-mlp-seed{seed}",
        model=model,
        inputs={DIGITS_INPUT: x},
        labels=y,
        description=(
            f"scikit-learn digits: {len(y)} real 8×8 handwritten digits, MLP (64 hidden) trained on "
            f"{len(train_rows)}, {len(test_rows)} held out; ONNX via skl2onnx"
        ),
        held_out=np.sort(test_rows).astype(np.int64),
        cached=cached,
    )


def predicted_labels(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The model's answer per row: its "label" output, else argmax of "probabilities" (or the only output)."""
    if "label" in outputs:
        return np.asarray(outputs["label"]).reshape(-1)
    scores = outputs["probabilities"] if "probabilities" in outputs else next(iter(outputs.values()))
    return np.asarray(np.asarray(scores).argmax(axis=-1))


def accuracy(outputs: Mapping[str, np.ndarray], labels: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Fraction of rows (all, or only `rows`) whose predicted label equals the true one."""
    predicted = predicted_labels(outputs)
    truth = np.asarray(labels).reshape(-1)
    if predicted.shape != truth.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {truth.shape[0]} labels")
    if rows is not None:
        predicted, truth = predicted[rows], truth[rows]
    return float(np.mean(predicted == truth)) if truth.size else 0.0


def run_onnx(model: bytes, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the whole batch in one local onnxruntime session: the reference for the network's answer."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(inputs)), strict=True))
