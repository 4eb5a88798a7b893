"""The model id a Synapse-style app expects: a JWT it reads the model (and the platform) from."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any


def multiplexed_model_id(model: Any, config: Any) -> str:
    """Serve's multiplexed model id for `model`, made the way the Synapse agent makes it: a JWT
    `{"model", "token", "tenant"?}` signed HS256 with the backend URL, so an app built on the SDK's
    `BaseServeDeployment` can fetch the model from the platform itself."""
    if model is None:
        return ""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    token = config.access_token or config.user_token
    claims: dict[str, Any] = {"model": str(model), "token": token.get_secret_value() if token else ""}
    if config.tenant is not None:
        claims["tenant"] = config.tenant.get_secret_value()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(config.host.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"
