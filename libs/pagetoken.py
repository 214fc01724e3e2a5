"""Page tokens a caller cannot forge: a listing's position, signed by the deployment.

A token carries where the next page starts (a day, a time, an ID) — a position a hostile
caller would love to choose (ten thousand days ahead: one query per day). It is JSON signed
with HMAC-SHA256 under the deployment's page-token key (every gateway has the same key, so
any gateway continues any listing), and bound to the tenant, the listing and its filter: a
token is valid only for the listing that issued it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from libs.errors import InvalidArgument

NOT_OURS = "not a token this API returned for this listing (same filter, same caller)"


class PageTokens:
    """Encodes and checks page tokens with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a page-token key has at least 128 bits")
        self._key = key

    def encode(self, position: Any, *, listing: str, tenant_id: str, filter: str = "") -> str:
        """A token for ``position`` (anything JSON can hold) in one tenant's listing."""
        body = json.dumps({"p": position}, separators=(",", ":")).encode()
        mac = self._mac(body, listing, tenant_id, filter)
        return f"{_b64(body)}.{_b64(mac)}"

    def decode(self, token: str, *, listing: str, tenant_id: str, filter: str = "") -> Any:
        """The position of a token this listing issued.

        Raises:
            InvalidArgument: on field ``page_token`` for anything else.
        """
        try:
            body_text, mac_text = token.split(".")
            body, mac = _unb64(body_text), _unb64(mac_text)
        except ValueError:
            raise InvalidArgument({"page_token": NOT_OURS}) from None
        if not hmac.compare_digest(mac, self._mac(body, listing, tenant_id, filter)):
            raise InvalidArgument({"page_token": NOT_OURS})
        return json.loads(body)["p"]

    def _mac(self, body: bytes, listing: str, tenant_id: str, filter: str) -> bytes:
        # Lengths first, so ("ab", "c") and ("a", "bc") never sign alike.
        context = "\x00".join(f"{len(part)}:{part}" for part in (listing, tenant_id, filter))
        return hmac.new(self._key, context.encode() + b"\x00" + body, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    """Raises ValueError for anything but unpadded URL-safe base64."""
    if not text or len(text) > 4096:
        raise ValueError("empty or too long")
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
