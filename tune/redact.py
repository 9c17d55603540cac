"""Secrets in URLs, masked wherever a URL is shown or written.

The rule: a URL's user info (``user:password@``, or a bare ``user@``) and the values of its password-like query
parameters (``password=``, ``token=``, ``sslpassword=``, ``secret=``, ``api_key=``, ...) become ``***``. Everything
else stays, so a reader still sees the scheme, host, port and database (``postgresql://***@db:5432/optuna``), and a
URL without a secret is returned as it is. Every message, log line, MLflow param or tag and written file
(search.json, Tune's pickled state) gets the masked form; the real URL lives only in this process's memory, in
what Ray's object store carries to the trials, and in the flag or environment variable the user gave.

``remember`` records a real URL in this process so that an object unpickled here from a masked form (Tune's saved
searcher and callbacks, restored by ``--resume``) can ``reveal`` the real one again.

No Ray, MLflow or Optuna here.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

MASK = "***"
# where a command finds a real URL that a record (search.json) keeps masked, besides its flag
TRACKING_ENV = "MLFLOW_TRACKING_URI"
OPTUNA_STORAGE_ENV = "PDCBDM_OPTUNA_STORAGE"
# the query parameters whose value is a secret (matched anywhere in the name, case-insensitively): password,
# passwd, pwd, sslpassword, token, access_token, secret, client_secret, api_key, apikey, credential, signature, ...
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|credential|signature|api[-_]?key|access[-_]?key|^sig$|^key$"
                           r"|^auth", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# a URL inside free text: a scheme and "://", up to whitespace, a quote or an angle bracket
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# SQLAlchemy's reading of user info: a user without ':' or '/', then ':' and a password up to the first '@' (a
# password with an unencoded '/' is still a password there)
_LOOSE_USERINFO = re.compile(r"^[^:/?#@\s]*(?::[^@\s?#]*)?@")
_QUERY_ITEM = re.compile(r"(^|[&;])([^=&;#]+)=([^&;#]*)")

# real URL by its masked form, for the URLs this process was given (``remember``)
_KNOWN: dict[str, str] = {}


def redact_url(url: str) -> str:
    """``url`` with its user info and password-like query values masked (``***``); unchanged without either.
    A string without ``scheme://`` (a file path) is returned as it is."""
    match = _SCHEME.match(url)
    if not match:
        return url
    head, rest = url[:match.end()], url[match.end():]
    rest = _mask_userinfo(rest)
    query_at = rest.find("?")
    if query_at < 0:
        return head + rest
    fragment_at = rest.find("#", query_at)
    end = len(rest) if fragment_at < 0 else fragment_at
    return head + rest[:query_at + 1] + _mask_query(rest[query_at + 1:end]) + rest[end:]


def _mask_userinfo(rest: str) -> str:
    """The part after ``scheme://`` with everything before the host masked: the authority (up to the first
    '/', '?' or '#') up to its last '@'; else, as SQLAlchemy reads a password holding a '/', up to the first '@'."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        return MASK + rest[authority.rindex("@"):]
    loose = _LOOSE_USERINFO.match(rest)
    if loose:
        return MASK + rest[loose.end() - 1:]
    return rest


def _mask_query(query: str) -> str:
    return _QUERY_ITEM.sub(lambda m: f"{m[1]}{m[2]}={MASK}" if _SECRET_PARAM.search(m[2]) and m[3] else m[0], query)


def redact_text(text: str) -> str:
    """Free text (a message, an exception's text, a command line) with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m[0]), text)


def has_secret(url: str) -> bool:
    """Whether ``url`` holds user info or a password-like query value (``redact_url`` would change it)."""
    return redact_url(url) != url


def is_redacted(url: str) -> bool:
    """Whether ``url`` is a masked form (holds ``***`` where a secret was), so that the real one must come from
    elsewhere."""
    return MASK in url and not has_secret(url)


def remember(url: str) -> str:
    """Record ``url`` (a real one) in this process, so that ``reveal`` of its masked form finds it; returns it."""
    if has_secret(url):
        _KNOWN[redact_url(url)] = url
    return url


def reveal(url: str, env: Sequence[str] = ()) -> str:
    """The real URL behind a masked ``url``: one ``remember``-ed in this process, else the value of the first
    environment variable in ``env`` that masks to it; ``url`` itself when it is not masked or nothing matches."""
    if not is_redacted(url):
        return url
    if url in _KNOWN:
        return _KNOWN[url]
    for name in env:
        value = os.environ.get(name)
        if value and redact_url(value) == url:
            return value
    return url
