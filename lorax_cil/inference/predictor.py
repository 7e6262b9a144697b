"""The predictor: a trained model, its evaluation transform and its identity, answering per image.

:class:`Predictor` does everything that does not depend on the kind of model: it accepts paths,
PIL images, tensors and arrays (one or a list), reads and transforms them in batches (optionally
in background threads, one batch ahead of the model), turns unreadable inputs into rows with an
``error`` and builds one flat result row per input. Subclasses
(:mod:`lorax_cil.inference.kinds`) say what the classes are, how probabilities are computed, what
the fake score is and how a row is labelled.

Result rows (dicts, all with the same keys, in input order)::

    path            the file, or "<PIL image #i>" / "<tensor #i>" / "<array #i>" for in-memory input
    prediction      the attributed generator (a task name) or "real"; "fake"/"real" for a detector
    is_fake         fake score >= threshold
    <score_name>    the fake score: "fakeness_cddb" (runs) or "p_fake" (detectors)
    threshold       the threshold that decided is_fake
    top1, top1_prob ... topK, topK_prob   the K most probable classes and their probabilities
    model_id, model_kind, weights_sha256, data_manifest_sha256, config_sha256   the model's identity
    error           None, or why this input could not be predicted (then the fields above are None)
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lorax_cil.errors import printable
from lorax_cil.inference.inputs import InputItem

__all__ = ["ModelIdentity", "Predictor", "IDENTITY_COLUMNS", "image_to_pil"]

logger = logging.getLogger(__name__)

IDENTITY_COLUMNS = ("model_id", "model_kind", "weights_sha256", "data_manifest_sha256",
                    "config_sha256")


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered.

    Attributes:
        model_id: ``<run dir>/<checkpoint>`` for a run, the folder name for a detector.
        model_kind: the ``kind`` the model was loaded as (``lorax-cil/run``, ...).
        path: the checkpoint folder that was loaded.
        weights_sha256: SHA-256 of the tensor file (recorded at save time, verified at load).
        data_manifest_sha256: the ``listing_sha256`` of the training data manifest.
        config_sha256: SHA-256 of the canonical JSON of the resolved training configuration.
        details: further facts for the output header (strategy, backbone, tasks, ...).
    """

    model_id: str
    model_kind: str
    path: str
    weights_sha256: str | None = None
    data_manifest_sha256: str | None = None
    config_sha256: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, Any]:
        """The identity fields repeated in every result row."""
        return {k: getattr(self, k) for k in IDENTITY_COLUMNS}


def image_to_pil(image: Any) -> Any:
    """An RGB ``PIL.Image`` from a PIL image, a tensor or a NumPy array.

    Tensors are ``(C, H, W)``, arrays ``(H, W, C)`` or ``(H, W)``; C is 1, 3 or 4 (alpha is
    composited on white). Floating-point values are in ``[0, 1]`` (as ``ToTensor`` makes them),
    integer values in ``[0, 255]``. The result then goes through the model's evaluation transform.

    Raises:
        ValueError: an empty image (0 pixels), NaN or infinite values, or values outside the
            range of their type (nothing is clipped silently).
    """
    from PIL import Image

    from lorax_cil.benchmarks.images import to_rgb

    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"the image is empty ({image.width}x{image.height} pixels)")
        return to_rgb(image)
    if type(image).__module__.startswith("torch"):
        if image.ndim != 3:
            raise ValueError(f"an image tensor must be (C, H, W), got shape {tuple(image.shape)}")
        image = image.detach().cpu().float().permute(1, 2, 0).numpy() \
            if image.is_floating_point() else image.detach().cpu().permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"the image is empty (shape {arr.shape})")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating)
                                 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"an image array must hold numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("the image holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:  # float error of upstream arithmetic is tolerated
            raise ValueError(f"a floating-point image must hold values in [0, 1], got "
                             f"[{lo:g}, {hi:g}] (scale it, e.g. divide 0-255 values by 255)")
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0)
    else:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"an integer image must hold values in [0, 255], got [{lo}, {hi}]")
    return to_rgb(Image.fromarray(arr.astype(np.uint8)))


def _is_batch(obj: Any) -> bool:
    kind = type(obj).__module__
    return (kind.startswith("torch") or isinstance(obj, np.ndarray)) and obj.ndim == 4


def _iter_inputs(images: Any) -> Iterator[Any]:
    """Single inputs from one image, a batch tensor/array, or any iterable of them (lazily)."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, InputItem, Image.Image)):
        yield images
    elif _is_batch(images):
        yield from images
    elif type(images).__module__.startswith("torch") or isinstance(images, np.ndarray):
        yield images
    else:
        for item in images:
            yield from (item if _is_batch(item) else [item])


def _chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(it)
    while chunk := list(islice(it, size)):
        yield chunk


class Predictor:
    """A trained model ready to answer: see the module doc for the result rows.

    Args:
        model: the ``torch.nn.Module`` (already on ``device``, in eval mode).
        transform: the model's evaluation transform (PIL image -> normalised tensor).
        classes: output class names, in logit order.
        identity: which model this is.
        threshold: default decision threshold on the fake score.
        threshold_source: how the default threshold was chosen (shown in output headers).
        device: where the model runs.
    """

    #: name of the fake-score column; subclasses name their definition.
    score_name = "fake_score"
    #: one sentence defining the fake score.
    score_definition = ""

    def __init__(self, *, model: Any, transform: Callable, classes: list[str],
                 identity: ModelIdentity, threshold: float, threshold_source: str,
                 device: Any = "cpu") -> None:
        self.model = model
        self.transform = transform
        self.classes = list(classes)
        self.identity = identity
        self.threshold = float(threshold)
        self.threshold_source = threshold_source
        self.device = device

    # --- what subclasses define ----------------------------------------------------------------
    def probabilities(self, batch: Any) -> np.ndarray:
        """Class probabilities ``(B, len(classes))`` of a transformed batch ``(B, 3, H, W)``."""
        raise NotImplementedError

    def fake_scores(self, probs: np.ndarray) -> np.ndarray:
        """The fake score ``(B,)`` of class probabilities ``(B, C)``."""
        raise NotImplementedError

    def labels(self, probs: np.ndarray, is_fake: np.ndarray) -> list[str]:
        """The ``prediction`` of every row (a generator, ``"real"``, ``"fake"``)."""
        raise NotImplementedError

    # --- public API ------------------------------------------------------------------------------
    def columns(self, top_k: int = 3) -> list[str]:
        """The keys of every result row for ``top_k`` (capped at the number of classes)."""
        k = min(int(top_k), len(self.classes))
        tops = [c for i in range(1, k + 1) for c in (f"top{i}", f"top{i}_prob")]
        return ["path", "prediction", "is_fake", self.score_name, "threshold", *tops,
                *IDENTITY_COLUMNS, "error"]

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable facts about the model (the header of JSON output)."""
        ident = self.identity
        return {**ident.columns(), "path": ident.path, **ident.details,
                "classes": list(self.classes), "threshold": self.threshold,
                "threshold_source": self.threshold_source, "score": self.score_name,
                "score_definition": self.score_definition}

    def predict(self, images: Any, *, top_k: int = 3, threshold: float | None = None,
                batch_size: int = 32, workers: int = 0, as_frame: bool = False) -> Any:
        """Predict one image or many.

        Args:
            images: a path, ``PIL.Image``, tensor ``(C, H, W)`` / ``(B, C, H, W)`` or array
                ``(H, W, C)``, or a list (any iterable) of them. Tensors and float arrays hold
                values in ``[0, 1]``, integer arrays ``[0, 255]``; every input goes through the
                model's evaluation transform (resize, centre crop, normalisation).
            top_k: how many classes (with probabilities) each row lists.
            threshold: decision threshold on the fake score (default: :attr:`threshold`).
            batch_size: images per forward pass.
            workers: background threads reading images (0: read in this thread).
            as_frame: return a ``pandas.DataFrame`` instead of a list of dicts.

        Returns:
            One row per input, in order (see the module doc); unreadable inputs get an ``error``.
        """
        rows = list(self.iter_predict(images, top_k=top_k, threshold=threshold,
                                      batch_size=batch_size, workers=workers))
        if not as_frame:
            return rows
        import pandas as pd

        return pd.DataFrame(rows, columns=self.columns(top_k))

    def iter_predict(self, images: Any, *, top_k: int = 3, threshold: float | None = None,
                     batch_size: int = 32, workers: int = 0) -> Iterator[dict[str, Any]]:
        """Like :meth:`predict`, but a generator: images are read batch by batch as rows are
        consumed, so arbitrarily long inputs stream in constant memory."""
        if batch_size < 1 or top_k < 1:
            raise ValueError(f"batch_size and top_k must be >= 1, got {batch_size} and {top_k}")
        thr = self.threshold if threshold is None else float(threshold)
        for prepared in self._prepared_batches(_iter_inputs(images), batch_size, workers):
            yield from self._batch_rows(prepared, top_k, thr)

    def predict_proba(self, images: Any, *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities ``(N, len(classes))``; raises on the first unreadable input."""
        out = []
        for prepared in self._prepared_batches(_iter_inputs(images), batch_size, 0):
            bad = [(name, err) for name, _, err in prepared if err is not None]
            if bad:
                raise ValueError(f"cannot predict {bad[0][0]}: {bad[0][1]}")
            out.append(self._forward([x for _, x, _ in prepared]))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    # --- internals -------------------------------------------------------------------------------
    def _prepare(self, index_item: tuple[int, Any]) -> tuple[str, Any, str | None]:
        """``(name, tensor, None)`` or ``(name, None, error)``; never raises for bad images."""
        from lorax_cil.benchmarks.images import load_rgb

        index, item = index_item
        if isinstance(item, InputItem) and item.error is not None:
            return printable(item.path), None, item.error
        if isinstance(item, (str, os.PathLike, InputItem)):
            name = item.path if isinstance(item, InputItem) else os.fspath(item)
            # rows show file names that are not UTF-8 with \xNN escapes (CSV/JSON stay text)
            try:
                return printable(name), self.transform(load_rgb(name)), None
            except Exception as exc:  # noqa: BLE001 - a bad file must never stop the run
                return printable(name), None, printable(str(exc) or type(exc).__name__)
        kind = ("PIL image" if type(item).__module__.startswith("PIL") else
                "tensor" if type(item).__module__.startswith("torch") else "array")
        name = f"<{kind} #{index}>"
        try:
            return name, self.transform(image_to_pil(item)), None
        except Exception as exc:  # noqa: BLE001 - reported in the row's error
            return name, None, f"{type(exc).__name__}: {exc}"

    def _prepared_batches(self, items: Iterable[Any], batch_size: int,
                          workers: int) -> Iterator[list[tuple[str, Any, str | None]]]:
        """Batches of prepared items; with ``workers``, the next batch is read while the
        current one is on the model."""
        chunks = _chunks(enumerate(items), batch_size)
        if workers <= 0:
            for chunk in chunks:
                yield [self._prepare(x) for x in chunk]
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = None
            for chunk in chunks:
                futures = [pool.submit(self._prepare, x) for x in chunk]
                if pending is not None:
                    yield [f.result() for f in pending]
                pending = futures
            if pending is not None:
                yield [f.result() for f in pending]

    def _forward(self, tensors: list[Any]) -> np.ndarray:
        import torch

        return self.probabilities(torch.stack(tensors))

    def _batch_rows(self, prepared: list[tuple[str, Any, str | None]], top_k: int,
                    thr: float) -> Iterator[dict[str, Any]]:
        ok = [x for _, x, err in prepared if err is None]
        probs = self._forward(ok) if ok else np.zeros((0, len(self.classes)))
        scores = self.fake_scores(probs)
        is_fake = scores >= thr
        labels = self.labels(probs, is_fake)
        cols = self.columns(top_k)
        k = min(int(top_k), len(self.classes))
        ident = self.identity.columns()
        j = 0
        for name, _, err in prepared:
            row = dict.fromkeys(cols)
            row.update(ident, path=name, error=err)
            if err is None:
                row.update(prediction=labels[j], is_fake=bool(is_fake[j]), threshold=thr)
                row[self.score_name] = float(scores[j])
                order = np.argsort(-probs[j], kind="stable")[:k]
                for rank, c in enumerate(order, start=1):
                    row[f"top{rank}"], row[f"top{rank}_prob"] = self.classes[c], float(probs[j, c])
                j += 1
            yield row
