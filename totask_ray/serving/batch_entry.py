"""The replica's side of a batched call: decode what the annotators sent, mark when the model starts.

The annotators send each task's image as the file's bytes (:class:`~totask_ray.net.images.EncodedImage`,
checked from its header) unless the app's spec asks for arrays (``PreProcessorSpec.payload``); the
replica decodes them here, beside the model, with the package's one decoder, on a pool of its own so
that the next batch decodes while the model runs the current one. A model that takes encoded images
(``PreProcessorSpec.input = "encoded"``) gets them as they came. An image that does not decode fails
only its own task: its entry in the answer is ``{"error": "<predicate>"}`` (e.g. "cannot be decoded
(...)"), which the caller says of "the primary file".

:meth:`BatchEntry.predict_timed` is what the annotators call, as a streaming handle call: it yields
:data:`STARTED` once this batch has the model to itself, then the answer. The caller's call timeout
runs from that first item, so time spent queued (in its router or behind other batches on this
replica) never counts against it: a small or cold replica set slows a run down instead of failing
its batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from totask_ray.net import images as imaging
from totask_ray.serving.interface import PreProcessorInputError
from totask_ray.serving.params import InferenceParams
from totask_ray.serving.postprocess import detections_to_dicts
from totask_ray.serving.validation import validate_images

if TYPE_CHECKING:
    from totask_ray.serving.interface import Detection, PreProcessor

__all__ = [
    "DEFAULT_MAX_QUEUED_REQUESTS",
    "IMAGE_ERROR_KEY",
    "STARTED",
    "BatchEntry",
    "image_error",
]

# The first item `predict_timed` yields: the model has started on this batch.
STARTED = "started"
# An answer entry for an image the replica could not decode: {IMAGE_ERROR_KEY: "<predicate>"}.
IMAGE_ERROR_KEY = "error"
# Calls a caller's router holds for the app before Serve refuses more with a BackPressureError (per
# handle: Serve counts the requests each router has not yet assigned to a replica), when the release
# declares no `max_queued_requests`. A batched annotator has at most two calls in flight, a synapse
# one a Data batch of requests: 256 leaves the normal flow alone and bounds what piles up behind a
# cold or small replica set; the callers back off and retry on the refusal (methods/inference).
DEFAULT_MAX_QUEUED_REQUESTS = 256


def image_error(entry: Any) -> str | None:
    """The predicate an answer entry carries for an image that did not decode, else None."""
    if (
        isinstance(entry, dict)
        and set(entry) == {IMAGE_ERROR_KEY}
        and isinstance(entry[IMAGE_ERROR_KEY], str)
    ):
        return entry[IMAGE_ERROR_KEY]
    return None


class BatchEntry:
    """Mixed into the shared deployment (:class:`~totask_ray.serving.deployment.PreProcessorDeployment`),
    which provides ``model``, ``_run(images, params)`` and ``max_batch_size``."""

    model: PreProcessor
    max_batch_size: int

    async def _run(self, images: list[Any], params: InferenceParams) -> list[list[Detection]]:
        raise NotImplementedError  # the deployment's own

    def _decode_pool(self) -> ThreadPoolExecutor:
        pool: ThreadPoolExecutor | None = getattr(self, "_decoder_pool", None)
        if pool is None:
            import ray

            # PIL releases the GIL while decoding: one thread per reserved CPU keeps them busy.
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            pool = ThreadPoolExecutor(max_workers=max(1, round(cpus)), thread_name_prefix="decode")
            self._decoder_pool = pool
        return pool

    def _turn(self) -> asyncio.Lock:
        lock: asyncio.Lock | None = getattr(self, "_model_turn", None)
        if lock is None:
            lock = self._model_turn = asyncio.Lock()
        return lock

    async def model_inputs(self, images: Sequence[Any]) -> tuple[list[Any], dict[int, str]]:
        """What ``detect`` takes, one per image that is usable, and {index: predicate} for those
        that are not. Arrays pass as they are (the decoded payload); encoded images are decoded
        unless the model takes them encoded."""
        takes_encoded = getattr(self.model.spec, "input", "arrays") == "encoded"
        loop = asyncio.get_running_loop()
        pending: dict[int, asyncio.Future[np.ndarray]] = {}
        out: list[Any] = list(images)
        for i, img in enumerate(images):
            if isinstance(img, imaging.EncodedImage) and not takes_encoded:
                pending[i] = loop.run_in_executor(self._decode_pool(), imaging.decode_image, img)
            elif isinstance(img, (bytes, bytearray)):
                raise TypeError(
                    f"image {i}: raw bytes; send totask_ray.net.images.EncodedImage (sniff_image(body))"
                )
        failed: dict[int, str] = {}
        for i, fut in pending.items():
            try:
                out[i] = await fut
            except imaging.ImageDecodeError as exc:
                failed[i] = str(exc)
        usable = [img for i, img in enumerate(out) if i not in failed]
        if not takes_encoded:
            return validate_images(usable), failed
        wrong = next(
            (type(img).__name__ for img in usable if not isinstance(img, imaging.EncodedImage)), None
        )
        if wrong is not None:
            raise PreProcessorInputError(f"this model takes encoded images (spec.input), got a {wrong}")
        return usable, failed

    async def answer(self, images: Sequence[Any], params: InferenceParams) -> list[Any]:
        """One entry per image: its detections as dicts, or the decode error of that image."""
        usable, failed = await self.model_inputs(images)
        dets = detections_to_dicts(await self._run(usable, params)) if usable else []
        found = iter(dets)
        return [{IMAGE_ERROR_KEY: failed[i]} if i in failed else next(found) for i in range(len(images))]

    async def predict_timed(
        self, images: list[Any], params: dict[str, Any] | None = None
    ) -> AsyncIterator[Any]:
        """``predict`` as a stream: :data:`STARTED` once the batch is decoded and has the model to
        itself, then the answer (one entry per image, see :meth:`answer`)."""
        p = InferenceParams.model_validate(params or {})
        usable, failed = await self.model_inputs(images)
        async with self._turn():
            yield STARTED
            dets = detections_to_dicts(await self._run(usable, p)) if usable else []
        found = iter(dets)
        yield [{IMAGE_ERROR_KEY: failed[i]} if i in failed else next(found) for i in range(len(images))]
