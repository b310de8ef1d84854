"""Webhook notifier: POST a JSON document to a URL, raise `DeliveryError` unless it is accepted.

Standard library only (urllib). The outbox decides what goes into the payload and retries;
this module only moves bytes and reports failures in words an operator can act on.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from service.delivery_errors import DeliveryError

USER_AGENT = "befund-webhook/1"


def post_json(url: str, payload: dict, timeout: float, token: str | None = None) -> None:
    """POST `payload` as JSON to `url`; any 2xx is success, anything else raises DeliveryError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DeliveryError(f"webhook URL {url!r} is not an http(s) URL")
    body = json.dumps(payload, separators=(",", ":"), default=str).encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    where = f"{parts.scheme}://{parts.netloc}{parts.path}"  # no query string: it may hold secrets
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status = response.status
            response.read(65536)
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"webhook {where} answered HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DeliveryError(f"webhook {where} unreachable: {exc.reason}") from exc
    except (TimeoutError, OSError) as exc:
        raise DeliveryError(f"webhook {where} failed: {exc}") from exc
    if not 200 <= status < 300:
        raise DeliveryError(f"webhook {where} answered HTTP {status}")
