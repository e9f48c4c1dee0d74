"""Credentials never leave in a URL: what is logged, stored or printed goes through `redact_url`.

A URL may carry a password (`https://user:secret@host/data.tgz`, a tracking server's
`http://user:token@mlflow:5000`) or a token in its query (`?token=…`, a presigned `X-Amz-Signature`).
The program uses the URL as given; every copy that lands in MLflow params, tags and dataset
sources, in `data/runs/*.json` (a pushed DVC output) or in an error line shows `***` instead.
"""

import functools
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from retrain.errors import RetrainError

REDACTED = "***"
# Query parameters that carry a secret (compared lower-case, also as the end of a longer name,
# so `X-Amz-Signature` and `sig` both match).
_SECRET_QUERY = re.compile(
    r"(^|[-_.])(token|access_token|auth|password|passwd|pwd|secret|key|apikey|api_key|signature|sig|"
    r"credential|x-amz-credential|x-amz-security-token|code)$",
    re.IGNORECASE,
)
# scheme://userinfo@ anywhere in a text (an exception message quoting the URL).
_USERINFO_IN_TEXT = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"<>]+@")  # greedy: "p@ss" too
_SECRET_PARAM_IN_TEXT = re.compile(
    r"([?&](?:[\w.-]*[-_.])?(?:token|access_token|auth|password|passwd|pwd|secret|key|apikey|api_key|"
    r"signature|sig|credential|x-amz-credential|x-amz-security-token|code)=)[^&\s'\"<>]*",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """`url` with any user:password and secret query values replaced by ***; other text as is.

    "https://ann:pw@host/x.tgz?token=abc&v=1" → "https://***@host/x.tgz?token=***&v=1".
    A local path or a URL without secrets comes back unchanged.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_SECRET_QUERY.search(name) for name, _ in pairs):
                query = urlencode([(n, REDACTED if _SECRET_QUERY.search(n) else v) for n, v in pairs], safe="*")
        if netloc == parts.netloc and query == parts.query:
            return url
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not parseable as a URL (a bad port, brackets): redact as text
        return redact_text(url)


def redact_text(text: str) -> str:
    """Every URL's user:password and secret query values in a free text (an error message) as ***."""
    text = _USERINFO_IN_TEXT.sub(lambda m: f"{m.group(1)}{REDACTED}@", str(text))
    return _SECRET_PARAM_IN_TEXT.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def redact_values(value):
    """`value` with redact_url applied to every string in it (nested dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item) for item in value)
    return value


def without_credentials(function):
    """Decorate a function that fetches URLs: every RetrainError it raises reaches the user with
    passwords and tokens as *** (its messages quote the URL as given, and so do requests' errors)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except RetrainError as error:
            clean = redact_text(str(error))
            if clean == str(error):
                raise
            raise RetrainError(clean) from None

    return wrapper
