"""A pre-processor written the way Synapse plugins write them, with none of totask-ray's code.

A FastAPI-ingress Ray Serve deployment whose `POST /` takes `{"image_path": url, ...params}`,
merges concurrent requests with `@serve.batch`, picks its model by Serve's multiplexed model id
(which the Synapse agent derives from the job's `model`), and answers in task-compatible format
(`{"objects": [...]}`), as the Synapse user guide asks. The model is OpenCV's Haar face cascade,
which ships inside opencv-python-headless. totask-ray calls it through its deployment handle, one
request per task with many in flight; `config.yaml` beside this file is its release config, in the
Synapse SDK's shape.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import cv2
import httpx
import numpy as np
from fastapi import Body, FastAPI
from ray import serve

app = FastAPI()


def _model_from_token(token: str) -> str:
    """The `model` claim of the agent's multiplexed model id (a JWT; the signature is the
    backend's to check when it serves the model's files, which this demo does not need)."""
    if not token:
        return ""
    try:
        payload = token.split(".")[1]
        return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["model"])
    except (IndexError, ValueError, KeyError):
        return token


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(app)
class FaceFinder:
    def __init__(self) -> None:
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        self.http = httpx.AsyncClient(timeout=30)
        self.batch_sizes: list[int] = []

    @app.post("/")
    async def infer(self, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        model = _model_from_token(serve.get_multiplexed_model_id())
        response = await self.http.get(body["image_path"])
        response.raise_for_status()
        image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_GRAYSCALE)
        threshold = float(body.get("threshold", 0.0))
        return await self.infer_batch((image, threshold, model))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def infer_batch(self, items: list[tuple[np.ndarray, float, str]]) -> list[dict[str, Any]]:
        self.batch_sizes.append(len(items))
        loop = asyncio.get_running_loop()
        results = []
        for image, threshold, model in items:
            faces = await loop.run_in_executor(
                None, lambda img=image: self.cascade.detectMultiScale(img, 1.1, 5, minSize=(24, 24))
            )
            objects = [
                {"id": f"face_{i + 1}", "class_id": 0, "type": "bbox",
                 "coordinates": {"x": float(x), "y": float(y), "width": float(w), "height": float(h)},
                 "properties": {"label": "face", "confidence": 0.9, "model": model}}
                for i, (x, y, w, h) in enumerate(faces)
                if threshold <= 0.9
            ]  # fmt: skip
            results.append({"objects": objects})
        return results

    @app.get("/batches")
    async def batches(self) -> dict[str, Any]:
        return {"sizes": self.batch_sizes}


deployment = FaceFinder
