"""Who is calling: bearer tokens from a file, or the client certificate's subject under mTLS.

* ``--auth-tokens FILE``: lines ``PRINCIPAL TOKEN`` (``#`` starts a comment). Clients send
  ``authorization: Bearer TOKEN`` as metadata. Tokens are compared in constant time (each
  candidate through :func:`hmac.compare_digest` of SHA-256 digests, all of them every time, so
  neither the match nor its position shows in the timing). The file is read again on SIGHUP
  (:meth:`Authenticator.reload`); a file that cannot be read keeps the tokens already loaded.
* ``--tls-client-ca``: the server asks for client certificates signed by that CA; a verified
  certificate's subject common name is the principal when no token is sent.
* Neither: every client is the same anonymous principal ``""``.

The health service stays open (it is registered apart from :mod:`server.servicer`); every call
of ours without a valid credential gets UNAUTHENTICATED.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import Unauthenticated

log = logging.getLogger(__name__)


class AuthError(ValueError):
    """The tokens file is unusable (the message says which line)."""


def parse_tokens(text: str, source: str = "tokens file") -> dict[bytes, str]:
    """``{sha256(token): principal}`` from ``PRINCIPAL TOKEN`` lines; :class:`AuthError`."""
    out: dict[bytes, str] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise AuthError(f"{source} line {n}: expected 'PRINCIPAL TOKEN'")
        principal, token = parts
        if len(token) < 16:
            raise AuthError(f"{source} line {n}: a token needs at least 16 characters")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in out:
            raise AuthError(f"{source} line {n}: the same token is listed twice")
        out[digest] = principal
    return out


class Authenticator:
    """Turns a call's metadata and TLS peer into a principal."""

    def __init__(self, tokens_file: str = "", *, client_certs: bool = False) -> None:
        self.tokens_file = tokens_file
        self.client_certs = client_certs
        self._tokens: dict[bytes, str] = {}
        if tokens_file:
            self._tokens = self._read()

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file) or self.client_certs

    def _read(self) -> dict[bytes, str]:
        try:
            text = Path(self.tokens_file).read_text(encoding="utf-8")
        except OSError as e:
            raise AuthError(f"cannot read {self.tokens_file}: {e.strerror or e}") from None
        return parse_tokens(text, self.tokens_file)

    def reload(self) -> bool:
        """Read the tokens file again (SIGHUP); on failure keep the old tokens. True if read."""
        if not self.tokens_file:
            return False
        try:
            self._tokens = self._read()
        except AuthError as e:
            log.error("tokens not reloaded: %s", e)
            return False
        log.info("reloaded %d token(s) from %s", len(self._tokens), self.tokens_file)
        return True

    def principal(
        self, metadata: Sequence[tuple[str, str | bytes]], peer: Mapping[str, Sequence[bytes]]
    ) -> str:
        """The caller's principal; :class:`Unauthenticated` when a credential is required and
        none is valid. ``peer`` is gRPC's auth context (``x509_common_name`` under mTLS)."""
        if not self.enabled:
            return ""
        bearer = ""
        for key, value in metadata:
            if key == "authorization":
                text = value.decode("latin-1") if isinstance(value, bytes) else value
                if text[:7].lower() == "bearer ":
                    bearer = text[7:].strip()
                break
        if bearer and self._tokens:
            digest = hashlib.sha256(bearer.encode()).digest()
            found = ""
            for known, principal in self._tokens.items():
                # Every entry is compared, so the time does not depend on which one matched.
                if hmac.compare_digest(known, digest):
                    found = principal
            if found:
                return found
            raise Unauthenticated("invalid token")
        if self.client_certs:
            names = peer.get("x509_common_name") or []
            if names:
                return names[0].decode("utf-8", "replace")
        raise Unauthenticated("a credential is required: send 'authorization: Bearer TOKEN'")
