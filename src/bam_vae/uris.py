"""URIs as bam shows them: a password in ``scheme://user:password@host/...`` never reaches a
message, a log or a printed command (PostgreSQL stores, tracking servers, studies)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_IN_TEXT = re.compile(r"([A-Za-z][\w+.-]*://[^\s:/@]+:)[^\s@/]+@")


def mask(uri: str) -> str:
    """``uri`` with the password of its authority replaced by ``***``.

    >>> mask("postgresql://bam:secret@db.lan:5432/mlflow")
    'postgresql://bam:***@db.lan:5432/mlflow'

    A URI without a password (``~/.pgpass``, ``PGPASSWORD``, a service file) comes back as
    it is; so does anything that is not a URI (a file path)."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def has_password(uri: str) -> bool:
    """Whether ``uri`` carries a password in its authority (``user:password@``)."""
    return "://" in uri and urlsplit(uri).password is not None


def mask_text(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` (an exception's message) masked."""
    return _IN_TEXT.sub(r"\1***@", text)
