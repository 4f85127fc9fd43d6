"""Trust boundaries for URLs: where credentials may go, what a manifest may name, and how a
URL or any header text is shown.

- Google credentials (Application Default Credentials) are sent only over https, and only to
  the configured store's host, or (when no store is configured) to a host under
  `.googleapis.com` with a dot boundary: `evilgoogleapis.com` and `googleapis.com.evil.org`
  are not Google.
- A manifest is data: its `files` may name local paths, gs://, s3:// and https:// objects,
  and WADO-RS instance URLs under the configured DICOMweb store (with none configured, they
  are read without credentials: never another host with the source's credentials).
- Secrets embedded in URLs (basic-auth user-info, presigned signature query parameters) are
  redacted wherever a URL is shown or stored: failure rows, logs, `--manifest-out`, launch
  options.
- Control characters in anything shown on a terminal are escaped, so a header string cannot
  move the cursor or rewrite what an operator reads.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from pathlib import Path

GOOGLE_SUFFIX = ".googleapis.com"
REDACTED = "REDACTED"

# Query parameters of presigned / signed URLs and common token carriers (lowercase).
_SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "sig",
        "awsaccesskeyid",
        "googleaccessid",
        "access_token",
        "token",
        "key",
        "api_key",
        "apikey",
        "password",
        "secret",
        "client_secret",
    }
)
# A URL inside free text (messages, logs, Beam options).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SCHEMES = ("gs://", "s3://", "https://")


def is_remote(uri: str) -> bool:
    """True for a URL (gs://, s3://, http(s)://, a WADO-RS instance URL), False for a local
    path: local paths are resolved, created with os.makedirs and read with plain file I/O."""
    return "://" in uri


def host_of(url: str) -> str:
    return (urllib.parse.urlsplit(url).hostname or "").lower()


def is_google_host(host: str) -> bool:
    """True for a host under googleapis.com at a dot boundary (healthcare.googleapis.com)."""
    host = host.lower().rstrip(".")
    return host.endswith(GOOGLE_SUFFIX) and len(host) > len(GOOGLE_SUFFIX)


def google_credentials_allowed(url: str, bound_host: str | None = None) -> bool:
    """May Google credentials go with a request to `url`? Only over https, and only to the
    configured store's host (`bound_host`, exact match) or, when none is configured, to a
    `.googleapis.com` host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or parts.username or parts.password:
        return False
    host = (parts.hostname or "").lower()
    if bound_host:
        return host == bound_host.lower()
    return is_google_host(host)


def redact_url(url: str) -> str:
    """The URL without user-info and with secret-looking query values replaced."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return REDACTED
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urllib.parse.urlencode(
                [(k, REDACTED if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe=""
            )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL in a free text redacted (failure messages, log lines, option values)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def escape_control(text: str) -> str:
    """Control characters (ESC, CR, BEL, ...) as \\xNN; newlines and tabs kept as \\n, \\t so
    one value stays on one line."""
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def for_terminal(text: str) -> str:
    """What may be printed: URLs redacted, control characters escaped."""
    return escape_control(redact_text(str(text)))


def for_terminal_lines(text: str) -> str:
    """for_terminal on each line of a multi-line text (the line breaks are ours)."""
    return "\n".join(for_terminal(line) for line in str(text).split("\n"))


def is_under(uri: str, root: str) -> bool:
    """True when `uri` names a file under `root` (a local folder or a gs:// / s3:// prefix),
    after resolving `..` and symlinks of local paths."""
    if "://" in root or "://" in uri:
        if "://" not in root or "://" not in uri:
            return False
        prefix = root.rstrip("/") + "/"
        rest = uri[len(prefix) :] if uri.startswith(prefix) else None
        return rest is not None and ".." not in rest.split("/") and "//" not in rest
    try:
        Path(uri).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def is_under_any(uri: str, roots) -> bool:
    return any(root and is_under(uri, root) for root in roots)


def check_manifest_uri(uri: str, dicomweb_url: str | None, is_instance_url) -> str:
    """A manifest `files` URI, or ValueError when the source configuration does not allow it:
    a WADO-RS instance URL must lie under the configured store (with none configured it is
    read without credentials: sources/enumeration.py bound_to_source); a remote object must be
    gs://, s3:// or https:// without user-info; no other scheme (file://, ftp://, http://)."""
    if is_instance_url(uri):
        if dicomweb_url and not uri.startswith(dicomweb_url.rstrip("/") + "/studies/"):
            raise ValueError(
                f"DICOMweb URL {redact_url(uri)} is not under the configured store "
                f"{redact_url(dicomweb_url)}"
            )
        return uri
    if "://" in uri:
        if not uri.startswith(_SCHEMES):
            raise ValueError(f"{redact_url(uri)}: only gs://, s3:// and https:// objects")
        if urllib.parse.urlsplit(uri).username is not None:
            raise ValueError(f"{redact_url(uri)}: user-info in an object URL")
    return uri


class RedactingFilter(logging.Filter):
    """A handler filter that redacts URLs in every log line (messages and their arguments)
    and escapes control characters, whoever logs them (our code, Beam, ez-wsi, urllib3)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave the record as it is
            return True
        record.msg, record.args = for_terminal(message), None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Adds RedactingFilter to every handler of `logger` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def redact_options(options: dict) -> dict:
    """Beam / Dataflow options as shown: URLs redacted, secret-looking keys' values hidden."""
    secret_key = re.compile(r"(secret|token|password|passwd|credential|api_?key)", re.I)
    shown = {}
    for key, value in options.items():
        if secret_key.search(str(key)) and value not in (None, "", False):
            shown[key] = REDACTED
        elif isinstance(value, str):
            shown[key] = redact_text(value)
        elif isinstance(value, list | tuple):
            shown[key] = [redact_text(v) if isinstance(v, str) else v for v in value]
        else:
            shown[key] = value
    return shown
