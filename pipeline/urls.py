"""Database and tracking URLs as they may be shown: with the password masked.

Floor 0 (the standard library only), so the light commands (``schedule``) can redact without
importing Optuna or SQLAlchemy.
"""

from __future__ import annotations

import re


def redact(url: str) -> str:
    """A database URL with its password (in the user part or a ``password=`` query) replaced."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    # the user:password@host part ends at the first / ? or # after the last @ (a password may hold
    # an unencoded @; one holding an unencoded / ? or # is masked up to the last @)
    cut = rest.rfind("@") + 1
    end = min([i for i in (rest.find(c, cut) for c in "/?#") if i >= 0] or [len(rest)])
    authority, tail = rest[:end], rest[end:]
    creds, at, host = authority.rpartition("@")
    if at and ":" in creds:
        authority = f"{creds.split(':', 1)[0]}:***@{host}"
    tail = re.sub(r"(?i)([?&;]password=)[^&;#]*", r"\1***", tail)
    return f"{scheme}://{authority}{tail}"
