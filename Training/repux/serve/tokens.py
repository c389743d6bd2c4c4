"""The server's access tokens: a file with one token per line, readable by its owner only.

The file is created with one random token at the server's first start. Lines can be added
(``repux serve --add-token``) and removed (``--revoke-token`` or any editor); a running
server re-reads the file when it changes, so a revoked token stops working at once.
Blank lines and lines starting with ``#`` are ignored. Tokens are compared in constant time
and never stored anywhere else: jobs are tied to a token's SHA-256 fingerprint.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import threading
from pathlib import Path

from repux.atomic import atomic_path
from repux.errors import InputError

#: Default token file, in the user's repux folder next to ``models``.
DEFAULT_TOKEN_FILE = Path("~/.repux/server-tokens")
#: Random bytes per token (256 bits), written as URL-safe base64 (43 characters).
TOKEN_BYTES = 32


def new_token() -> str:
    """A random token that does not start with "-" (so ``--revoke-token TOKEN`` parses)."""
    while (token := secrets.token_urlsafe(TOKEN_BYTES)).startswith("-"):
        pass
    return token


def fingerprint(token: str) -> str:
    """A token's SHA-256 (hex, first 16 digits): names its owner in job records and logs."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


def read_first_token(path: str | os.PathLike) -> str:
    """The first token of a token file (what a client sends).

    Raises:
        InputError: the file is missing or holds no token.
    """
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise InputError(f"{path}: cannot read the token file: {error.strerror or error}") from None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise InputError(f"{path}: holds no token; expected the server's token on its first line")


class TokenStore:
    """The accepted tokens of ``path``, re-read whenever the file changes."""

    def __init__(self, path: str | os.PathLike = DEFAULT_TOKEN_FILE) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: list[bytes] = []

    def ensure(self) -> str | None:
        """Create the file with a new token when it does not exist; return that token (else None).

        Raises:
            InputError: the file exists but others can read or write it (POSIX).
        """
        if self.path.exists():
            self._check_private()
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = new_token()
        # O_EXCL and mode 0600 at creation: the token is never readable by others, not even briefly.
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write("# repux serve access tokens: one per line; delete a line to revoke that token\n")
            stream.write(token + "\n")
        return token

    def _check_private(self) -> None:
        if os.name != "posix":
            return
        mode = self.path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InputError(
                f"{self.path}: token file is accessible to other users (mode {stat.S_IMODE(mode):o}); "
                f"expected 600 (run: chmod 600 {self.path})"
            )

    def tokens(self) -> list[str]:
        """The tokens in the file, in order."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]

    def _reload(self) -> None:
        try:
            info = self.path.stat()
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._tokens = [token.encode("utf-8") for token in self.tokens()]
            self._stamp = stamp

    def owner(self, token: str | None) -> str | None:
        """The fingerprint of ``token`` when the file lists it, else None.

        Every listed token is compared (in constant time each), so the time taken does not
        tell which one matched or how much of a guess was right.
        """
        if not token:
            return None
        given = token.encode("utf-8")
        with self._lock:
            self._reload()
            matched = False
            for known in self._tokens:
                matched |= hmac.compare_digest(given, known)
        return fingerprint(token) if matched else None

    def add(self) -> str:
        """Append a new random token (creating the file when needed) and return it."""
        created = self.ensure()
        if created is not None:
            return created
        token = new_token()
        self._rewrite(self.path.read_text(encoding="utf-8").rstrip("\n") + "\n" + token + "\n")
        return token

    def revoke(self, token: str) -> None:
        """Remove ``token`` from the file.

        Raises:
            InputError: the file does not list it.
        """
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        kept = [line for line in lines if line.strip() != token.strip()]
        if len(kept) == len(lines):
            raise InputError(f"{self.path}: does not list the token {token[:6]}...; nothing revoked")
        self._rewrite("\n".join(kept) + "\n")

    def _rewrite(self, text: str) -> None:
        self._check_private()
        with atomic_path(self.path, overwrite=True) as tmp:
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
                stream.write(text)
