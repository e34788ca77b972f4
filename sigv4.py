"""AWS Signature Version 4 and a small S3 client, in the standard library only.

This module imports nothing from buquet: copy it alone into any project.

    >>> client = S3Client(endpoint="http://127.0.0.1:9000", region="us-east-1",
    ...                   credentials=Credentials("AKID", "SECRET"))
    >>> r = client.put_object("bucket", "tasks/0/a.json", b"{}", if_none_match="*")
    >>> client.get_object("bucket", "tasks/0/a.json", if_none_match=r.etag).status
    304

Signing (`sign`, `presign`) is a chain of pure functions named after the steps
of the SigV4 specification: `canonical_request`, `string_to_sign`,
`signing_key`, `signature`.  The clock is an argument, never read inside.
S3 paths are signed exactly as sent (S3 does not normalise them), as botocore
does.

The client (`S3Client`) speaks the handful of S3 calls a task queue needs,
named after the S3 API.  It keeps one persistent connection per thread and
host, verifies TLS by default (`AWS_CA_BUNDLE`, `SSL_CERT_FILE`), honours
`HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`, and retries throttling, 5xx and
broken connections (and 409 ConditionalRequestConflict) with capped
exponential backoff and full jitter.

Errors: every failure is an `S3Error` (one line: what, where, why, what to
check).  Lost conditional writes are `ConflictError`.  A conditional write
that may have reached the server in an earlier attempt, and whose retry
answered 412 or whose attempts all went unanswered, is `UncertainWriteError`:
it may have succeeded, so the caller must re-read and decide.  Credentials
never appear in errors, reprs or logs.

Environment read here: AWS credential variables and files (see
`resolve_credentials`), `AWS_REGION`, `AWS_DEFAULT_REGION`,
`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `S3_FORCE_PATH_STYLE`,
`AWS_CA_BUNDLE`, `SSL_CERT_FILE`, `HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`
(and their lowercase forms).
"""

import os
import re
import socket
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from functools import lru_cache

# SHA-256 from CPython's own module: hashlib would load OpenSSL's, 2.5 ms of
# every cold start, for payloads of a few kilobytes.
try:
    from _sha2 import sha256 as _sha256  # Python 3.12+
except ImportError:
    try:
        from _sha256 import sha256 as _sha256  # Python 3.9 to 3.11
    except ImportError:  # a build without them
        from hashlib import sha256 as _sha256

__all__ = [
    "CredentialProvider",
    "Credentials",
    "CredentialsError",
    "ConflictError",
    "NoSuchKey",
    "S3Client",
    "S3Error",
    "S3Response",
    "TransportError",
    "UncertainWriteError",
    "UNSIGNED_PAYLOAD",
    "canonical_request",
    "presign",
    "resolve_credentials",
    "resolve_region",
    "sign",
    "signing_key",
    "string_to_sign",
]

# ============================================================================
# Constants
# ============================================================================

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
DEFAULT_REGION = "us-east-1"

# Headers botocore never signs: proxies and HTTP stacks may add or rewrite them.
_UNSIGNED_HEADERS = frozenset(
    ("authorization", "expect", "transfer-encoding", "user-agent", "x-amzn-trace-id")
)

# Status codes and S3 error codes worth another attempt.  503 SlowDown means
# "not processed"; 500/502/504 may have been applied before the reply broke.
_RETRY_STATUSES = frozenset((500, 502, 503, 504))
_RETRY_CODES = frozenset(
    ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed",
     # 409 to a conditional write: another one on the key is in progress, this
     # one was not applied; S3 says to try again (and the retry then wins or
     # meets 412).
     "ConditionalRequestConflict")
)
# Replies that say the request was not applied, so retrying cannot apply it twice.
_NOT_APPLIED_CODES = frozenset(("SlowDown", "ConditionalRequestConflict", "RequestTimeTooSkewed"))
_MAX_ERROR_BODY = 64 * 1024
_USER_AGENT = "buquet-sigv4/1"

# What to check for the common configuration errors, said once in the error.
_HINTS = {
    "NoSuchKey": "the object does not exist",
    "NoSuchBucket": "check the bucket name, region and endpoint",
    "AccessDenied": "check the credentials' permissions on this bucket",
    "SignatureDoesNotMatch": "check the secret access key and the region",
    "InvalidAccessKeyId": "check the access key id (and the endpoint it belongs to)",
    "AuthorizationHeaderMalformed": "check the region",
    "PermanentRedirect": "the bucket lives in another region: set the region",
    "RequestTimeTooSkewed": "the local clock is far from the server's: sync it",
    "ExpiredToken": "the session token expired: refresh the credentials",
}


# ============================================================================
# Errors
# ============================================================================


class S3Error(Exception):
    """Any failure of this module: an S3 error reply, a transport failure, bad
    credentials.  `str()` is one line naming the call, the object, the reply
    and what to check.  Never carries credentials."""

    def __init__(
        self,
        message,
        *,
        status=None,
        code=None,
        method=None,
        bucket=None,
        key=None,
        request_id=None,
        date=None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.method = method
        self.bucket = bucket
        self.key = key
        self.request_id = request_id
        self.date = date  # the server's Date header, when there was a reply

    def __str__(self):
        where = ""
        if self.method:
            target = self.bucket or ""
            if self.key is not None:
                target += "/" + self.key
            where = "%s s3://%s: " % (self.method, target)
        reply = ""
        if self.status is not None:
            reply = "%s %s: " % (self.status, self.code or "")
        text = where + reply + self.message
        hint = _HINTS.get(self.code or "")
        if hint and hint not in text:
            text += " (%s)" % hint
        if self.request_id:
            text += " [request id %s]" % self.request_id
        return text


class CredentialsError(S3Error):
    """No credentials could be found, or a credential source failed."""


class NoSuchKey(S3Error):
    """GET or HEAD of an object that does not exist (404)."""


class ConflictError(S3Error):
    """A conditional write lost: 412 PreconditionFailed, 409
    ConditionalRequestConflict, or 404 on an If-Match write (AWS and moto
    answer 404 when the object is gone; SeaweedFS and Ceph answer 412)."""


class UncertainWriteError(S3Error):
    """A conditional write failed in transit, was retried, and the retry lost
    (412).  The first attempt may have been applied: re-read and decide."""


class TransportError(S3Error):
    """The server could not be reached or did not answer, after retries."""


# ============================================================================
# Credentials
# ============================================================================

# The AWS SDK default chain, for the SigV4 client.
#
# Resolution happens in two steps, and the split is deliberate:
#
# * ``resolve_credentials()`` walks the chain *locally*: arguments, environment
#   variables and the two shared files. It performs no network request (connect
#   must stay cheap, e.g. in a Lambda cold start). It picks the first source that
#   is configured and returns a ``CredentialProvider`` for it. Configuration
#   mistakes (half a key pair, an unparsable file, a named profile that does not
#   exist, a container URI on a forbidden host) raise ``CredentialsError`` here.
# * ``CredentialProvider.get()`` returns the cached credentials. Network sources
#   (STS web identity, container endpoint, instance metadata) are fetched on the
#   first ``get()`` and refreshed before they expire.
#
# This gives the same answers as botocore, which also commits to web identity and
# container sources as soon as they are configured, and only falls through past
# instance metadata (the last source) to "no credentials". Chain order, as in
# botocore's ``create_credential_resolver``:
#
#     explicit arguments
#     environment         AWS_ACCESS_KEY_ID ... (skipped when a profile is passed)
#     [assume role]       profile role_arn + source_profile     -> unsupported, raises
#     web identity        AWS_WEB_IDENTITY_TOKEN_FILE / profile -> STS, lazy
#     [sso]               profile sso_account_id/sso_role_name  -> unsupported, raises
#     shared credentials  ~/.aws/credentials [NAME]
#     [login, process]    profile login_session / credential_process -> unsupported
#     config file         ~/.aws/config [profile NAME] / [default]
#     container           AWS_CONTAINER_CREDENTIALS_*_URI       -> lazy
#     instance metadata   IMDSv2, falling back to v1            -> lazy

# Public names: Credentials, CredentialProvider, CredentialsError,
# resolve_credentials, resolve_region.


# botocore's RefreshableCredentials windows: inside the advisory window one
# thread tries to refresh and everyone keeps using the old credentials if it
# fails; inside the mandatory window callers wait for fresh ones or get the error.
_ADVISORY_REFRESH = timedelta(minutes=15)
_MANDATORY_REFRESH = timedelta(minutes=10)

_IMDS_URL = "http://169.254.169.254/"
_IMDS_URL_IPV6 = "http://[fd00:ec2::254]/"
_IMDS_TOKEN_TTL = "21600"  # botocore's value; we fetch a new token per refresh anyway
_IMDS_TIMEOUT = 1.0  # botocore's default: a host that is not EC2 must not hang us
_IMDS_ATTEMPTS = 1  # botocore's default (AWS_METADATA_SERVICE_NUM_ATTEMPTS)
_CONTAINER_HOST = "169.254.170.2"
# Plain http is allowed only to these (ECS, EKS Pod Identity) or to loopback:
# anything else could hand the authorization token to a stranger.
_CONTAINER_HOSTS = ("169.254.170.2", "169.254.170.23", "fd00:ec2::23", "localhost")
_CONTAINER_TIMEOUT = 2.0  # botocore's ContainerMetadataFetcher values
_CONTAINER_ATTEMPTS = 3
_STS_TIMEOUT = 10.0  # STS is a real service on the internet, not a link-local agent
_STS_ATTEMPTS = 3
_STS_RETRY_CODES = ("IDPCommunicationError", "Throttling", "RequestLimitExceeded")
_RETRY_DELAY = 1.0  # seconds before the second attempt; doubles after that

# Regions where botocore's `sts_regional_endpoints = legacy` uses sts.amazonaws.com.
_LEGACY_GLOBAL_STS_REGIONS = frozenset((
    "ap-northeast-1", "ap-south-1", "ap-southeast-1", "ap-southeast-2", "aws-global",
    "ca-central-1", "eu-central-1", "eu-north-1", "eu-west-1", "eu-west-2",
    "eu-west-3", "sa-east-1", "us-east-1", "us-east-2", "us-west-1", "us-west-2",
))


def _utcnow():
    return datetime.now(timezone.utc)


# --- Credentials value --------------------------------------------------------


class Credentials:
    """An access key pair, with a session token and expiry for temporary ones.

    Immutable. ``repr`` shows the access key id (not a secret: it appears in
    CloudTrail and error replies) but never the secret key or the token.
    """

    __slots__ = ("access_key", "secret_key", "session_token", "expiration")

    def __init__(self, access_key, secret_key, session_token=None, expiration=None):
        if not access_key or not secret_key:
            raise ValueError("access_key and secret_key must be non-empty strings")
        if expiration is not None:
            if expiration.tzinfo is None or expiration.utcoffset() is None:
                raise ValueError("expiration must be a timezone-aware datetime")
            expiration = expiration.astimezone(timezone.utc)
        setter = object.__setattr__
        setter(self, "access_key", access_key)
        setter(self, "secret_key", secret_key)
        setter(self, "session_token", session_token or None)
        setter(self, "expiration", expiration)

    def __setattr__(self, name, value):
        raise AttributeError("Credentials are immutable")

    __delattr__ = __setattr__

    def __reduce__(self):
        # The default slot-state pickling would go through __setattr__.
        return (Credentials, self._fields())

    def _fields(self):
        return (self.access_key, self.secret_key, self.session_token, self.expiration)

    def __eq__(self, other):
        if not isinstance(other, Credentials):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        expiration = None if self.expiration is None else _format_timestamp(self.expiration)
        return "Credentials(access_key=%r, secret_key='***', session_token=%s, expiration=%s)" % (
            self.access_key,
            "'***'" if self.session_token else "None",
            expiration,
        )


def _refresh_due(credentials, now, window):
    """True when ``credentials`` expire less than ``window`` after ``now``."""
    expiration = credentials.expiration
    return expiration is not None and expiration - now < window


def _format_timestamp(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# Patterns stay strings (compiled and cached by `re` on first use) to keep
# import cheap.
_TIMESTAMP = r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?\s*([Zz]|[+-]\d\d:?\d\d)?\Z"


def _parse_iso_timestamp(text):
    """Parse the ISO 8601 forms STS, ECS, EKS and IMDS use (``...Z``, fractions,
    offsets) or epoch seconds, to an aware UTC datetime.

    ``datetime.fromisoformat`` rejects ``Z`` before Python 3.11, hence the regex.
    """
    text = text.strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text), timezone.utc)
    match = re.match(_TIMESTAMP, text)
    if match is None:
        raise ValueError("not an ISO 8601 timestamp")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    tz = timezone.utc
    if offset and offset not in ("Z", "z"):
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        tz = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    moment = datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second),
        int((fraction or "0")[:6].ljust(6, "0")), tz,
    )
    return moment.astimezone(timezone.utc)


def _credentials_from(fields, names, where):
    """Credentials from a reply's ``fields``: ``names`` are the keys holding
    access key, secret key, token and expiration. Errors name ``where``."""
    values = []
    for name in names:
        value = fields.get(name)
        if not isinstance(value, str) or not value:
            raise CredentialsError("%s: reply lacks %s" % (where, name))
        values.append(value)
    try:
        expiration = _parse_iso_timestamp(values[3])
    except ValueError:
        raise CredentialsError("%s: reply has an unparsable %s" % (where, names[3])) from None
    return Credentials(values[0], values[1], values[2], expiration)


# --- Provider: cache and refresh ---------------------------------------------


class CredentialProvider:
    """One resolved source of credentials, with a cache of the current ones.

    ``fetch(now)`` returns fresh ``Credentials`` or raises ``CredentialsError``;
    it is called on the first ``get()`` unless ``credentials`` are given, and
    again when the credentials near their expiration. ``clock()`` returns an
    aware datetime (tests inject one). ``source`` names where the credentials
    come from, for humans; it never contains a secret.
    """

    __slots__ = ("source", "_fetch", "_clock", "_lock", "_credentials")

    def __init__(self, fetch, *, source, clock=None, credentials=None):
        self.source = source
        self._fetch = fetch
        self._clock = clock or _utcnow
        self._lock = threading.Lock()
        self._credentials = credentials

    def __repr__(self):
        return "<CredentialProvider %s>" % self.source

    def get(self):
        """The current credentials, refreshed first if they are about to expire."""
        credentials = self._credentials
        if credentials is not None and (
            credentials.expiration is None
            or not _refresh_due(credentials, self._clock(), _ADVISORY_REFRESH)
        ):
            return credentials
        return self._refresh()

    def _refresh(self):
        # Same protocol as botocore's RefreshableCredentials._refresh.
        if self._lock.acquire(blocking=False):
            try:
                credentials = self._credentials
                now = self._clock()
                if credentials is not None and not _refresh_due(credentials, now, _ADVISORY_REFRESH):
                    return credentials  # another thread refreshed meanwhile
                mandatory = credentials is None or _refresh_due(credentials, now, _MANDATORY_REFRESH)
                return self._protected_refresh(now, mandatory)
            finally:
                self._lock.release()
        credentials = self._credentials
        if credentials is not None and not _refresh_due(credentials, self._clock(), _MANDATORY_REFRESH):
            return credentials  # another thread is refreshing; these are still good
        with self._lock:
            credentials = self._credentials
            now = self._clock()
            if credentials is not None and not _refresh_due(credentials, now, _MANDATORY_REFRESH):
                return credentials
            return self._protected_refresh(now, True)

    def _protected_refresh(self, now, mandatory):
        # Caller holds the lock.
        try:
            fresh = self._fetch(now)
            if _refresh_due(fresh, now, timedelta(0)):
                raise CredentialsError(
                    "%s: fetched credentials already expired at %s"
                    % (self.source, _format_timestamp(fresh.expiration))
                )
        except Exception:
            if mandatory:
                raise
            return self._credentials  # advisory: keep what still works
        self._credentials = fresh
        return fresh


# --- Shared files -------------------------------------------------------------

_ENV_REFERENCE = r"\$(\w+|\{[^}]*\})"


def _expand_path(path, environ):
    """Like botocore's expandvars + expanduser, but reading ``environ``."""

    def variable(match):
        name = match.group(1).strip("{}")
        return environ.get(name, match.group(0))

    path = re.sub(_ENV_REFERENCE, variable, path)
    if path == "~" or path.startswith("~/") or path.startswith("~" + os.sep):
        home = environ.get("HOME")
        if home:
            return home + path[1:]
    return os.path.expanduser(path)


def _ini_problem(error):
    """Describe a configparser error without quoting the offending line,
    which may hold a secret key."""
    import configparser

    if isinstance(error, configparser.MissingSectionHeaderError):
        return "line %d comes before any [section] header" % error.lineno
    if isinstance(error, configparser.ParsingError):
        return "cannot parse line %s" % ", ".join(str(lineno) for lineno, _ in error.errors)
    if isinstance(error, configparser.DuplicateOptionError):
        return "key %r appears twice in [%s]" % (error.option, error.section)
    if isinstance(error, configparser.DuplicateSectionError):
        return "section [%s] appears twice" % error.section
    return type(error).__name__


def _read_ini(path, shown):
    """The sections of an INI file as dicts, or None when there is no file.

    Same reading as botocore: RawConfigParser (keys lower-cased, no
    interpolation, no inline comments, ``[DEFAULT]`` applies to every section).
    """
    if not os.path.isfile(path):
        return None
    import configparser

    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except configparser.Error as error:
        raise CredentialsError("cannot parse %s: %s" % (shown, _ini_problem(error))) from None
    except UnicodeDecodeError:
        raise CredentialsError("cannot parse %s: not UTF-8" % shown) from None
    except OSError as error:
        raise CredentialsError("cannot read %s: %s" % (shown, error.strerror)) from None
    return {name: dict(parser.items(name)) for name in parser.sections()}


def _config_profiles(sections):
    """Profiles of the config file: ``[profile NAME]`` sections and ``[default]``."""
    import shlex

    profiles = {}
    for name, values in sections.items():
        if name == "default":
            profiles[name] = values
        elif name.startswith("profile"):
            try:
                parts = shlex.split(name)  # botocore allows [profile "with space"]
            except ValueError:
                continue
            if len(parts) == 2 and parts[0] == "profile":
                profiles[parts[1]] = values
    return profiles


class _Profile:
    """The selected profile as found in the credentials and config files."""

    __slots__ = ("name", "credentials_shown", "credentials", "config_shown", "config", "settings")

    def __init__(self, environ, name):
        self.name = name
        self.credentials_shown = environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
        self.config_shown = environ.get("AWS_CONFIG_FILE") or "~/.aws/config"
        credential_sections = _read_ini(
            _expand_path(self.credentials_shown, environ), self.credentials_shown
        )
        config_sections = _read_ini(_expand_path(self.config_shown, environ), self.config_shown)
        # Section of each file, or None when the file or section is absent.
        self.credentials = (credential_sections or {}).get(name)
        self.config = _config_profiles(config_sections or {}).get(name)
        # botocore's session.full_config: config-file profile overlaid with the
        # credentials-file section; settings such as region or role_arn come
        # from this merge.
        self.settings = dict(self.config or {})
        self.settings.update(self.credentials or {})

    @property
    def found(self):
        return self.credentials is not None or self.config is not None


def _profile_name(environ, profile):
    # botocore reads AWS_DEFAULT_PROFILE before AWS_PROFILE.
    return profile or environ.get("AWS_DEFAULT_PROFILE") or environ.get("AWS_PROFILE") or "default"


def _setting(environ, variable, profile, key):
    """A setting from the environment, else from the profile, else None."""
    value = environ.get(variable) if variable else None
    if value:
        return value
    return profile.settings.get(key) or None


def _config_true(value):
    return (value or "").strip().lower() == "true"


def _static_keys(section, where):
    """Static keys from a file section, or None when it has none."""
    access_key = section.get("aws_access_key_id")
    if access_key is None:
        return None
    secret_key = section.get("aws_secret_access_key")
    if not access_key or not secret_key:
        raise CredentialsError("%s: aws_access_key_id needs aws_secret_access_key" % where)
    # botocore prefers the legacy name when both are present.
    token = section.get("aws_security_token") or section.get("aws_session_token")
    return Credentials(access_key, secret_key, token)


# --- Region -------------------------------------------------------------------


def resolve_region(profile=None, environ=None):
    """The region from ``AWS_REGION``, ``AWS_DEFAULT_REGION``, then the
    profile's ``region`` in the config (or credentials) file; None if unset.

    Reads files only, never the network. A named profile that does not exist
    gives None here; ``resolve_credentials`` is the one that reports it.
    """
    environ = os.environ if environ is None else environ
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    return _Profile(environ, _profile_name(environ, profile)).settings.get("region") or None


# --- Chain --------------------------------------------------------------------


def resolve_credentials(
    *,
    access_key=None,
    secret_key=None,
    session_token=None,
    profile=None,
    region=None,
    environ=None,
    clock=None,
):
    """Pick the credential source the AWS SDKs would pick; see the module notes.

    ``region`` is the client's region, used to choose the STS endpoint for web
    identity (boto3 uses the region of the client being created); without it
    ``resolve_region`` decides. ``environ`` defaults to ``os.environ``.
    Performs no network request; ``get()`` on the result may.
    """
    environ = os.environ if environ is None else environ
    clock = clock or _utcnow

    def static(credentials, source):
        return CredentialProvider(
            lambda now: credentials, source=source, clock=clock, credentials=credentials
        )

    if access_key is not None or secret_key is not None:
        if not access_key or not secret_key:
            raise CredentialsError("explicit arguments: access_key and secret_key go together")
        return static(Credentials(access_key, secret_key, session_token), "explicit")
    looked = ["explicit arguments"]

    # An explicit profile means "use that profile", so like botocore we skip
    # the environment keys (AWS_PROFILE set in the environment does not).
    if profile:
        looked.append("environment (skipped: profile given)")
    else:
        credentials = _environment_credentials(environ)
        if credentials is not None:
            if credentials.expiration is None:
                return static(credentials, "environment")
            return CredentialProvider(
                lambda now: _environment_credentials(environ) or _no_environment_credentials(),
                source="environment",
                clock=clock,
                credentials=credentials,
            )
        looked.append("environment")

    chosen = _Profile(environ, _profile_name(environ, profile))
    if not chosen.found and chosen.name != "default":
        raise CredentialsError(
            "profile %r not found in %s or %s"
            % (chosen.name, chosen.config_shown, chosen.credentials_shown)
        )
    settings = chosen.settings
    if "role_arn" in settings and "web_identity_token_file" not in settings:
        _unsupported(chosen, "role_arn with source_profile/credential_source (STS AssumeRole)")

    provider = _web_identity_provider(environ, chosen, not profile, region, clock)
    if provider is not None:
        return provider
    looked.append("web identity")

    if "sso_account_id" in settings or "sso_role_name" in settings:
        _unsupported(chosen, "IAM Identity Center (sso_*)")

    shown = "%s [%s]" % (chosen.credentials_shown, chosen.name)
    if chosen.credentials is not None:
        credentials = _static_keys(chosen.credentials, chosen.credentials_shown)
        if credentials is not None:
            return static(credentials, "shared-credentials-file " + shown)
    looked.append("shared credentials file " + shown)

    if "login_session" in settings:
        _unsupported(chosen, "login_session")
    if "credential_process" in settings:
        _unsupported(chosen, "credential_process")

    shown = "%s [%s]" % (chosen.config_shown, chosen.name)
    if chosen.config is not None:
        credentials = _static_keys(chosen.config, chosen.config_shown)
        if credentials is not None:
            return static(credentials, "config-file " + shown)
    looked.append("config file " + shown)

    provider = _container_provider(environ, clock)
    if provider is not None:
        return provider
    looked.append("container")

    return _instance_metadata_provider(environ, chosen, looked, clock)


def _unsupported(profile, feature):
    raise CredentialsError(
        "profile %r uses %s, which buquet does not support; use static keys, web"
        " identity, or export temporary keys (aws configure export-credentials)"
        % (profile.name, feature)
    )


def _environment_credentials(environ):
    access_key = environ.get("AWS_ACCESS_KEY_ID")
    if not access_key:
        return None
    secret_key = environ.get("AWS_SECRET_ACCESS_KEY")
    if not secret_key:
        raise CredentialsError("environment: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not")
    # botocore checks the legacy AWS_SECURITY_TOKEN first.
    token = environ.get("AWS_SECURITY_TOKEN") or environ.get("AWS_SESSION_TOKEN")
    expiration = environ.get("AWS_CREDENTIAL_EXPIRATION")
    if expiration:
        try:
            expiration = _parse_iso_timestamp(expiration)
        except ValueError:
            raise CredentialsError("environment: AWS_CREDENTIAL_EXPIRATION is not an ISO 8601 time") from None
    return Credentials(access_key, secret_key, token, expiration or None)


def _no_environment_credentials():
    raise CredentialsError("environment: AWS_ACCESS_KEY_ID is no longer set")


# --- HTTP for the network sources ---------------------------------------------


class _HTTPFailure(Exception):
    """No HTTP reply. ``connected`` tells a refused or unreachable host (False)
    from one that accepted the connection and then failed or went quiet."""

    def __init__(self, reason, connected):
        super().__init__(reason)
        self.reason = reason
        self.connected = connected


def _describe_os_error(error):
    if isinstance(error, TimeoutError) or type(error).__name__ == "timeout":
        return "timed out"
    return getattr(error, "strerror", None) or type(error).__name__


def _http(method, url, headers, body=None, timeout=1.0):
    """One request without proxies (the link-local agents are never behind
    one); returns (status, body bytes) or raises _HTTPFailure."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https":
        import ssl

        connection = http.client.HTTPSConnection(
            parts.netloc, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    try:
        try:
            connection.connect()
        except OSError as error:
            raise _HTTPFailure(_describe_os_error(error), False) from None
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as error:
            raise _HTTPFailure(_describe_os_error(error), True) from None
    finally:
        connection.close()


def _shown_url(url):
    """The URL without its query, for messages and ``source``."""
    return url.split("?", 1)[0]


# --- Web identity (STS AssumeRoleWithWebIdentity) ------------------------------


def _sts_endpoint(environ, profile, region):
    """The STS endpoint botocore would use for this region and configuration."""
    if not _config_true(_setting(environ, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", profile, "ignore_configured_endpoint_urls")):
        for variable in ("AWS_ENDPOINT_URL_STS", "AWS_ENDPOINT_URL"):
            if environ.get(variable):
                return environ[variable]
        if profile.settings.get("endpoint_url"):
            return profile.settings["endpoint_url"]
    mode = (_setting(environ, "AWS_STS_REGIONAL_ENDPOINTS", profile, "sts_regional_endpoints") or "regional").lower()
    if mode not in ("regional", "legacy"):
        raise CredentialsError("sts_regional_endpoints must be 'regional' or 'legacy', not %r" % mode)
    if not region or (mode == "legacy" and region in _LEGACY_GLOBAL_STS_REGIONS):
        return "https://sts.amazonaws.com"
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return "https://sts.%s.%s" % (region, suffix)


def _web_identity_provider(environ, profile, use_environ, region, clock):
    def setting(variable, key):
        return _setting(environ, variable if use_environ else None, profile, key)

    token_file = setting("AWS_WEB_IDENTITY_TOKEN_FILE", "web_identity_token_file")
    if not token_file:
        return None
    role_arn = setting("AWS_ROLE_ARN", "role_arn")
    if not role_arn:
        raise CredentialsError(
            "web identity: a token file is configured but no role ARN (AWS_ROLE_ARN or role_arn)"
        )
    # botocore names the session after the time it was configured.
    session_name = setting("AWS_ROLE_SESSION_NAME", "role_session_name") or (
        "buquet-session-%d" % clock().timestamp()
    )
    if region is None:  # resolve_region without reading the files again
        region = (
            environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
            or profile.settings.get("region")
        )
    endpoint = _sts_endpoint(environ, profile, region)
    path = _expand_path(token_file, environ)

    def fetch(now):
        return _assume_role_with_web_identity(endpoint, role_arn, session_name, path)

    return CredentialProvider(
        fetch, source="web-identity %s via %s" % (role_arn, _shown_url(endpoint)), clock=clock
    )


def _read_token_file(path, where):
    try:
        with open(path, encoding="utf-8") as file:
            # Tokens never contain whitespace; a trailing newline from an
            # editor or `echo` would otherwise be sent along.
            return file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8"
        raise CredentialsError("%s: cannot read token file %s: %s" % (where, path, reason)) from None


def _sts_error(reply):
    """(code, message) of an STS error reply, as far as it can be parsed."""
    import xml.etree.ElementTree as ElementTree

    try:
        error = ElementTree.fromstring(reply).find("{*}Error")
    except ElementTree.ParseError:
        return "", ""
    if error is None:
        return "", ""
    code = (error.findtext("{*}Code") or "").strip()
    message = " ".join((error.findtext("{*}Message") or "").split())[:200]
    return code, message


def _parse_sts_reply(reply, where):
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(reply)
    except ElementTree.ParseError:
        raise CredentialsError("%s: HTTP 200 reply is not XML" % where) from None
    node = root.find("{*}AssumeRoleWithWebIdentityResult/{*}Credentials")
    if node is None:
        raise CredentialsError("%s: HTTP 200 reply lacks Credentials" % where)
    fields = {child.tag.rpartition("}")[2]: (child.text or "").strip() for child in node}
    return _credentials_from(
        fields, ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"), where
    )


def _assume_role_with_web_identity(endpoint, role_arn, session_name, token_file):
    """Exchange the token in ``token_file`` for role credentials. The request is
    unsigned: the token is the proof. The file is re-read on every call since
    Kubernetes rotates it."""
    from urllib.parse import urlencode

    where = "web identity: STS " + _shown_url(endpoint)
    body = urlencode({
        "Action": "AssumeRoleWithWebIdentity",
        "Version": "2011-06-15",
        "RoleArn": role_arn,
        "RoleSessionName": session_name,
        "WebIdentityToken": _read_token_file(token_file, "web identity"),
    }).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    for attempt in range(_STS_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_DELAY * 2 ** (attempt - 1))
        try:
            status, reply = _http("POST", endpoint, headers, body, _STS_TIMEOUT)
        except _HTTPFailure as failure:
            problem = failure.reason
            continue
        if status == 200:
            return _parse_sts_reply(reply, where)
        code, message = _sts_error(reply)
        problem = "HTTP %d %s" % (status, ": ".join(part for part in (code, message) if part))
        if status < 500 and code not in _STS_RETRY_CODES:
            break
    raise CredentialsError("%s: %s" % (where, problem.strip()))


# --- Container (ECS, EKS Pod Identity) -----------------------------------------


def _is_loopback(host):
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _container_provider(environ, clock):
    relative = environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if relative:
        url = "http://%s%s" % (_CONTAINER_HOST, relative)
    else:
        url = environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        if not url:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme != "https" and not (
            parts.scheme == "http" and (host in _CONTAINER_HOSTS or _is_loopback(host))
        ):
            raise CredentialsError(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI must be https, or http to a loopback"
                " address or one of %s; host is %r" % (", ".join(_CONTAINER_HOSTS), host)
            )

    def fetch(now):
        return _fetch_container_credentials(url, environ)

    return CredentialProvider(fetch, source="container " + _shown_url(url), clock=clock)


def _container_authorization(environ):
    path = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    if path:  # re-read on every fetch: EKS rotates it; botocore prefers it too
        token = _read_token_file(path, "container credentials")
    else:
        token = (environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN") or "").strip()
    if "\r" in token or "\n" in token:
        raise CredentialsError("container credentials: the authorization token contains a line break")
    return token


def _fetch_container_credentials(url, environ):
    import json

    where = "container credentials " + _shown_url(url)
    headers = {"Accept": "application/json"}
    token = _container_authorization(environ)
    if token:
        headers["Authorization"] = token
    for attempt in range(_CONTAINER_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_DELAY)
        try:
            status, reply = _http("GET", url, headers, timeout=_CONTAINER_TIMEOUT)
        except _HTTPFailure as failure:
            problem = failure.reason
            continue
        if status == 200:
            try:
                fields = json.loads(reply.decode("utf-8"))
            except ValueError:
                raise CredentialsError("%s: HTTP 200 reply is not JSON" % where) from None
            if not isinstance(fields, dict):
                raise CredentialsError("%s: HTTP 200 reply is not a JSON object" % where)
            return _credentials_from(
                fields, ("AccessKeyId", "SecretAccessKey", "Token", "Expiration"), where
            )
        problem = "HTTP %d" % status
        if status < 500 and status != 429:
            break  # a wrong token or URI does not fix itself
    raise CredentialsError("%s: %s" % (where, problem))


# --- EC2 instance metadata (IMDS) ---------------------------------------------


def _int_setting(environ, variable, profile, key, default):
    value = _setting(environ, variable, profile, key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise CredentialsError("%s / %s must be a positive integer" % (variable, key))
    return number


def _imds_base_url(environ, profile):
    endpoint = _setting(environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT", profile, "ec2_metadata_service_endpoint")
    if endpoint:
        from urllib.parse import urlsplit

        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CredentialsError("AWS_EC2_METADATA_SERVICE_ENDPOINT is not an http(s) URL")
        return endpoint if endpoint.endswith("/") else endpoint + "/"
    mode = _setting(environ, "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", profile, "ec2_metadata_service_endpoint_mode")
    if mode is not None:
        mode = mode.lower()
        if mode not in ("ipv4", "ipv6"):
            raise CredentialsError("ec2_metadata_service_endpoint_mode must be ipv4 or ipv6, not %r" % mode)
    elif _config_true(_setting(environ, "AWS_IMDS_USE_IPV6", profile, "imds_use_ipv6")):
        mode = "ipv6"
    return _IMDS_URL_IPV6 if mode == "ipv6" else _IMDS_URL


def _instance_metadata_provider(environ, profile, looked, clock):
    # botocore reads this one from the environment only.
    if _config_true(environ.get("AWS_EC2_METADATA_DISABLED")):
        looked.append("instance metadata (disabled by AWS_EC2_METADATA_DISABLED)")
        message = "no AWS credentials found; looked at: " + ", ".join(looked)

        def nothing(now):
            raise CredentialsError(message)

        return CredentialProvider(nothing, source="none", clock=clock)

    base_url = _imds_base_url(environ, profile)
    timeout = _int_setting(environ, "AWS_METADATA_SERVICE_TIMEOUT", profile, "metadata_service_timeout", _IMDS_TIMEOUT)
    attempts = _int_setting(
        environ, "AWS_METADATA_SERVICE_NUM_ATTEMPTS", profile, "metadata_service_num_attempts", _IMDS_ATTEMPTS
    )
    v1_disabled = _config_true(_setting(environ, "AWS_EC2_METADATA_V1_DISABLED", profile, "ec2_metadata_v1_disabled"))
    prefix = "no AWS credentials found; looked at: %s; then " % ", ".join(looked)
    fetched = []

    def fetch(now):
        import random

        try:
            credentials = _fetch_instance_credentials(
                base_url, timeout, attempts, v1_disabled, now, random.randint(120, 600)
            )
        except CredentialsError as error:
            if fetched:
                raise
            # Nothing ever came from here: say what else was looked at.
            raise CredentialsError(prefix + str(error)) from None
        fetched.append(True)
        return credentials

    return CredentialProvider(fetch, source="instance-metadata " + base_url, clock=clock)


def _imds_token(base_url, timeout, attempts, where):
    """An IMDSv2 session token, or None to fall back to IMDSv1 as botocore does."""
    failure = None
    for _ in range(attempts):
        try:
            status, reply = _http(
                "PUT", base_url + "latest/api/token",
                {"x-aws-ec2-metadata-token-ttl-seconds": _IMDS_TOKEN_TTL}, timeout=timeout,
            )
        except _HTTPFailure as error:
            if error.connected:
                # A hop limit of 1 drops the PUT reply inside containers on
                # EC2, while a v1 GET still works: fall back like botocore.
                return None
            failure = error
            continue
        if status == 200:
            return reply.decode("utf-8", "replace").strip()
        if status in (403, 404, 405):
            return None  # IMDSv2 unavailable here; v1 may still answer
        if status == 400:
            raise CredentialsError("%s: token request rejected (HTTP 400)" % where)
    if failure is not None:
        # Diverges from botocore, which would still try a v1 GET at a host
        # that refused the connection: on a laptop that only doubles the wait.
        raise CredentialsError("%s: unreachable (%s)" % (where, failure.reason))
    return None


def _imds_get(url, headers, timeout, attempts, where, what, valid=None):
    """GET with botocore's IMDS retry rule: retry non-200, empty or invalid replies."""
    problem = "no attempt"
    for _ in range(attempts):
        try:
            status, reply = _http("GET", url, headers, timeout=timeout)
        except _HTTPFailure as failure:
            problem = failure.reason if failure.connected else "unreachable (%s)" % failure.reason
            continue
        text = reply.decode("utf-8", "replace")
        if status != 200:
            problem = "HTTP %d" % status + (" (no IAM role attached?)" if status == 404 else "")
        elif not text.strip():
            problem = "HTTP 200 with an empty reply"
        elif valid is not None and valid(text) is None:
            problem = "HTTP 200 reply is not JSON"
        else:
            return text
    raise CredentialsError("%s: %s %s" % (where, what, problem))


def _json_object(text):
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _extended_expiration(expiration, now, window):
    """botocore's static stability for IMDS: when the service hands out
    credentials expiring within ``window`` (it keeps serving the last ones
    during an outage), pretend they last ``window`` more so that every call
    does not hammer IMDS; requests keep working for as long as AWS accepts them."""
    if now >= expiration - window:
        return now + window
    return expiration


def _fetch_instance_credentials(base_url, timeout, attempts, v1_disabled, now, jitter):
    """Role credentials from IMDS: PUT a token, GET the role name, GET its keys.
    ``jitter`` (seconds) spreads a fleet's retries during an IMDS outage."""
    where = "instance metadata " + base_url
    token = _imds_token(base_url, timeout, attempts, where)
    headers = {}
    if token:
        headers["x-aws-ec2-metadata-token"] = token
    elif v1_disabled:
        raise CredentialsError("%s: no IMDSv2 token and IMDSv1 is disabled" % where)
    url = base_url + "latest/meta-data/iam/security-credentials/"
    role = _imds_get(url, headers, timeout, attempts, where, "role list:").splitlines()[0].strip()
    text = _imds_get(url + role, headers, timeout, attempts, where, "role credentials:", _json_object)
    fields = _json_object(text)
    if fields.get("Code", "Success") != "Success":
        raise CredentialsError("%s: role %s: %s" % (where, role, fields.get("Code")))
    credentials = _credentials_from(
        fields, ("AccessKeyId", "SecretAccessKey", "Token", "Expiration"), where
    )
    expiration = _extended_expiration(
        credentials.expiration, now, _ADVISORY_REFRESH + timedelta(seconds=jitter)
    )
    if expiration == credentials.expiration:
        return credentials
    return Credentials(credentials.access_key, credentials.secret_key, credentials.session_token, expiration)


# ============================================================================
# Signing (pure functions of their arguments)
# ============================================================================


# -- URLs: the few pieces of urllib.parse this module needs, without the
# import (cold starts count).

_UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~"
_QUOTE_TABLES = {}


def quote(text, safe="/"):
    """Percent-encode UTF-8 `text`; RFC 3986 unreserved characters and
    those in `safe` stay (as urllib.parse.quote)."""
    keep = _UNRESERVED + safe.encode("ascii")
    raw = text.encode("utf-8")
    if not raw.rstrip(keep):
        return text
    table = _QUOTE_TABLES.get(keep)
    if table is None:
        table = _QUOTE_TABLES[keep] = [chr(b) if b in keep else "%%%02X" % b for b in range(256)]
    return "".join([table[b] for b in raw])


_HEX = frozenset(b"0123456789abcdefABCDEF")


def unquote(text):
    """Decode %XX escapes (as UTF-8, bad bytes replaced); a lone % stays."""
    if "%" not in text:
        return text
    first, *rest = text.encode("utf-8").split(b"%")
    out = bytearray(first)
    for part in rest:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            out.append(int(part[:2], 16))
            out += part[2:]
        else:
            out += b"%" + part
    return out.decode("utf-8", "replace")


def unquote_plus(text):
    return unquote(text.replace("+", " "))


class _URL:
    """The parts of an http(s) URL this module uses."""

    __slots__ = ("scheme", "hostname", "port", "path", "query", "username", "password")

    def __init__(self, url):
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "", url
        self.scheme = scheme.lower()
        rest = rest.split("#", 1)[0]
        netloc, path_query = rest, ""
        for i, c in enumerate(rest):
            if c in "/?":
                netloc, path_query = rest[:i], rest[i:]
                break
        self.path, _, self.query = path_query.partition("?")
        userinfo, at, hostport = netloc.rpartition("@")
        self.username = self.password = None
        if at:
            self.username, _, self.password = userinfo.partition(":")
        if hostport.startswith("["):
            host, _, port = hostport[1:].partition("]")
            port = port[1:] if port.startswith(":") else ""
        else:
            host, _, port = hostport.partition(":")
        self.hostname = host.lower() or None
        if port and not (port.isdigit() and int(port) <= 65535):
            raise ValueError("bad port in URL %r" % (url,))
        self.port = int(port) if port else None


def _sha256_hex(data):
    return _sha256(data).hexdigest()


def _content_md5(body):
    """The Content-MD5 header DeleteObjects and PutBucketVersioning require."""
    import base64
    import hashlib

    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode("ascii")


def _random():
    """random.random(); the random module (2 ms to import) loads when a retry
    first needs a jitter."""
    import random

    return random.random()


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _hmac_sha256(key, msg):
    """HMAC-SHA256 (RFC 2104) of bytes; hmac would bring hashlib along."""
    if len(key) > 64:
        key = _sha256(key).digest()
    key = key.ljust(64, b"\0")
    return _sha256(key.translate(_OPAD) + _sha256(key.translate(_IPAD) + msg).digest())


def _hmac(key, msg):
    return _hmac_sha256(key, msg.encode("utf-8")).digest()


def _amz_date(now):
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _uri_encode(text, safe=""):
    # RFC 3986 unreserved characters stay; everything else is %XX in UTF-8.
    return quote(text, safe="-_.~" + safe)


def canonical_uri(path, service="s3"):
    """The CanonicalURI of a path exactly as it is sent (already encoded).

    S3 signs the path as sent.  Other services normalise dot segments and
    encode the encoded path once more, as the SigV4 test suite requires."""
    if not path:
        return "/"
    if service == "s3":
        return path
    segments = []
    for seg in path.split("/"):
        if seg == "..":
            if segments:
                segments.pop()
        elif seg not in (".", ""):
            segments.append(seg)
    normalized = "/" + "/".join(segments)
    if path.endswith("/") and normalized != "/":
        normalized += "/"
    return quote(normalized, safe="/~")


def canonical_query_string(query):
    """The CanonicalQueryString of a raw query: each name and value encoded
    with the unreserved set, sorted by name then value."""
    if not query:
        return ""
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((_uri_encode(unquote(name)), _uri_encode(unquote(value))))
    pairs.sort()
    return "&".join("%s=%s" % pair for pair in pairs)


def _canonical_headers(headers):
    """(CanonicalHeaders, SignedHeaders) from (name, value) pairs.  Names are
    lowercased, values trimmed with inner runs of spaces folded, repeated
    names joined with commas in the order given."""
    merged = {}
    for name, value in headers:
        lname = name.lower().strip()
        if lname in _UNSIGNED_HEADERS:
            continue
        merged.setdefault(lname, []).append(" ".join(str(value).split()))
    names = sorted(merged)
    canonical = "".join("%s:%s\n" % (n, ",".join(merged[n])) for n in names)
    return canonical, ";".join(names)


def canonical_request(method, url, headers, payload_hash, service="s3"):
    """The SigV4 CanonicalRequest, and the SignedHeaders list it used.

    `headers` is a mapping or a list of (name, value) pairs and must already
    hold every header to sign (host and x-amz-date included)."""
    parts = _URL(url)
    items = headers.items() if hasattr(headers, "items") else headers
    canon_headers, signed = _canonical_headers(items)
    request = "\n".join(
        (
            method.upper(),
            canonical_uri(parts.path, service),
            canonical_query_string(parts.query),
            canon_headers,
            signed,
            payload_hash,
        )
    )
    return request, signed


def _scope(amz_date, region, service):
    return "%s/%s/%s/aws4_request" % (amz_date[:8], region, service)


def string_to_sign(amz_date, scope, canonical):
    return "\n".join(
        (ALGORITHM, amz_date, scope, _sha256_hex(canonical.encode("utf-8")))
    )


@lru_cache(maxsize=16)
def signing_key(secret_key, datestamp, region, service):
    """The derived key for one day, region and service; cached because it
    only changes once a day and costs four HMACs."""
    key = _hmac(("AWS4" + secret_key).encode("utf-8"), datestamp)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def signature(key, to_sign):
    return _hmac_sha256(key, to_sign.encode("utf-8")).hexdigest()


def _host_header(parts):
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = "[%s]" % host
    port = parts.port
    default = 443 if parts.scheme == "https" else 80
    if port and port != default:
        host += ":%d" % port
    return host


def sign(method, url, headers, payload_hash, credentials, region, service="s3", now=None):
    """Sign a request; return every header to send.

    The result holds the given headers plus `host`, `x-amz-date`,
    `x-amz-content-sha256` (S3 only), `x-amz-security-token` (when the
    credentials carry a session token) and `authorization`.  Headers of the
    same names given by the caller are replaced, whatever their case.
    `url` is the exact URL that will be sent, query included; `payload_hash`
    is the hex SHA-256 of the body or `UNSIGNED_PAYLOAD`; `now` is an aware
    datetime (default: the current time)."""
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        raise ValueError("sign(): now must be an aware datetime, got %r" % (now,))
    amz_date = _amz_date(now)
    parts = _URL(url)
    ours = {"host": _host_header(parts), "x-amz-date": amz_date}
    if service == "s3":
        ours["x-amz-content-sha256"] = payload_hash
    if credentials.session_token:
        ours["x-amz-security-token"] = credentials.session_token
    out = {k: v for k, v in headers.items() if k.lower() not in ours and k.lower() != "authorization"}
    out.update(ours)
    canonical, signed = canonical_request(method, url, out, payload_hash, service)
    scope = _scope(amz_date, region, service)
    key = signing_key(credentials.secret_key, amz_date[:8], region, service)
    sig = signature(key, string_to_sign(amz_date, scope, canonical))
    out["authorization"] = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        ALGORITHM,
        credentials.access_key,
        scope,
        signed,
        sig,
    )
    return out


def presign(method, url, credentials, region, expires=3600, service="s3", now=None):
    """A presigned URL (query-string authentication) valid for `expires`
    seconds, signing only the host header and an unsigned payload."""
    if not 1 <= int(expires) <= 604800:
        raise ValueError("presign(): expires must be 1 to 604800 seconds, got %r" % (expires,))
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        raise ValueError("presign(): now must be an aware datetime, got %r" % (now,))
    amz_date = _amz_date(now)
    scope = _scope(amz_date, region, service)
    parts = _URL(url)
    params = [
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", "%s/%s" % (credentials.access_key, scope)),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(int(expires))),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if credentials.session_token:
        params.append(("X-Amz-Security-Token", credentials.session_token))
    extra = "&".join("%s=%s" % (_uri_encode(k), _uri_encode(v)) for k, v in params)
    query = parts.query + "&" + extra if parts.query else extra
    signed_url = url.split("#", 1)[0].split("?", 1)[0] + "?" + query
    canonical, _ = canonical_request(
        method, signed_url, {"host": _host_header(parts)}, UNSIGNED_PAYLOAD, service
    )
    key = signing_key(credentials.secret_key, amz_date[:8], region, service)
    sig = signature(key, string_to_sign(amz_date, scope, canonical))
    return signed_url + "&X-Amz-Signature=" + sig


# ============================================================================
# Addressing
# ============================================================================


def _truthy(value):
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _dns_compatible(bucket):
    """Whether a bucket name can be a host label (virtual-hosted style).
    Names with dots work in DNS but break the TLS wildcard certificate."""
    if not 3 <= len(bucket) <= 63 or "." in bucket:
        return False
    return all(c.islower() or c.isdigit() or c == "-" for c in bucket) and bucket[0] != "-" and bucket[-1] != "-"


class _Endpoint:
    """Where requests go: scheme, host, port, and the addressing style."""

    __slots__ = ("scheme", "host", "port", "base_path", "path_style", "aws")

    def __init__(self, endpoint, region, path_style):
        self.aws = endpoint is None
        if endpoint is None:
            suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
            endpoint = "https://s3.%s.%s" % (region, suffix)
        elif "://" not in endpoint:
            endpoint = "https://" + endpoint
        parts = _URL(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("endpoint must be an http:// or https:// URL, got %r" % (endpoint,))
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        # Custom endpoints (MinIO, SeaweedFS, R2, ...) default to path style.
        self.path_style = (not self.aws) if path_style is None else bool(path_style)

    def url(self, bucket, key=None, query=""):
        quoted_key = "" if key is None else quote(key, safe="/~")
        host = self.host if ":" not in self.host else "[%s]" % self.host
        default_port = 443 if self.scheme == "https" else 80
        port = "" if self.port == default_port else ":%d" % self.port
        if bucket and not self.path_style and _dns_compatible(bucket):
            path = "%s/%s" % (self.base_path, quoted_key)
            netloc = "%s.%s%s" % (bucket, host, port)
        else:
            path = "%s/%s" % (self.base_path, quote(bucket, safe="") if bucket else "")
            if key is not None:
                path += "/" + quoted_key
            netloc = host + port
        url = "%s://%s%s" % (self.scheme, netloc, path or "/")
        return url + "?" + query if query else url


def _query(params):
    """A query string from (name, value) pairs, encoded as SigV4 canonicalises
    it, so the signed form and the sent form are the same.  A value of None
    gives a bare name (`?versioning`)."""
    out = []
    for name, value in params:
        if value is None:
            out.append(_uri_encode(name))
        else:
            out.append("%s=%s" % (_uri_encode(name), _uri_encode(str(value))))
    return "&".join(out)


# ============================================================================
# Transport: one persistent connection per thread and host
# ============================================================================


class _NotSent(Exception):
    """The connection could not be opened: the request never left."""


class _Proxy:
    __slots__ = ("host", "port", "auth")

    def __init__(self, url):
        parts = _URL(url if "://" in url else "http://" + url)
        if parts.scheme != "http":
            raise ValueError("only http:// proxies are supported, got scheme %r" % (parts.scheme,))
        self.host = parts.hostname
        self.port = parts.port or 80
        self.auth = None
        if parts.username:
            import base64

            raw = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
            self.auth = "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")

    def __repr__(self):  # the userinfo may hold a password
        return "_Proxy(%s:%d)" % (self.host, self.port)


def _env(environ, name):
    return environ.get(name) or environ.get(name.lower())


def _no_proxy_matches(no_proxy, host, port):
    """curl's NO_PROXY rules: `*`, exact names, domain suffixes (with or
    without a leading dot), optional `:port`."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, eport = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if eport and eport != str(port):
            continue
        name = name.lstrip(".").strip("[]")
        if host == name or host.endswith("." + name):
            return True
    return False


class _Transport:
    def __init__(self, *, connect_timeout, read_timeout, verify, ca_bundle, environ):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._verify = verify
        self._ca_bundle = ca_bundle or _env(environ, "AWS_CA_BUNDLE") or None
        self._proxies = {}
        for scheme in ("http", "https"):
            url = _env(environ, scheme.upper() + "_PROXY")
            if url:
                self._proxies[scheme] = _Proxy(url)
        self._no_proxy = _env(environ, "NO_PROXY") or ""
        self._ssl_context = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def _context(self):
        if self._ssl_context is None:
            import ssl

            with self._lock:
                if self._verify:
                    # ssl's defaults read SSL_CERT_FILE / SSL_CERT_DIR themselves.
                    ctx = ssl.create_default_context(cafile=self._ca_bundle)
                else:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                self._ssl_context = ctx
        return self._ssl_context

    def _proxy_for(self, scheme, host, port):
        proxy = self._proxies.get(scheme)
        if proxy is None or (self._no_proxy and _no_proxy_matches(self._no_proxy, host, port)):
            return None
        return proxy

    def _connect(self, scheme, host, port):
        """An open connection: TCP (through a proxy's CONNECT tunnel for
        https when one is set), TLS for https."""
        proxy = self._proxy_for(scheme, host, port)
        sock = None
        try:
            target = proxy.host if proxy else host
            # An ASCII name given as bytes spares getaddrinfo the idna codec
            # (2 ms of a cold start); other names take the codec's road.
            target = target.encode("ascii") if target.isascii() else target
            sock = socket.create_connection((target, proxy.port if proxy else port), self.connect_timeout)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (a test's socket pair): nothing to tune
            if proxy and scheme == "https":
                _tunnel(sock, host, port, proxy)
            if scheme == "https":
                sock = self._context().wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise _NotSent(exc) from exc
        sock.settimeout(self.read_timeout)
        return _Connection(sock, sock.makefile("rb"), proxy if scheme == "http" else None)

    def send(self, method, url, headers, body):
        """One HTTP/1.1 exchange.  Returns (status, headers, body, reused)
        with lowercase header names.  Raises _NotSent when no connection
        could be opened, OSError / HTTPException when the exchange broke
        after the request may have been sent."""
        parts = _URL(url)
        scheme = parts.scheme
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, parts.hostname, port)
        pool = self._local.__dict__.setdefault("pool", {})
        conn = pool.get(key)
        reused = conn is not None
        if not reused:
            conn = pool[key] = self._connect(scheme, parts.hostname, port)
        if conn.http_proxy is not None:
            target = url  # a plain-http proxy wants the absolute URL
            if conn.http_proxy.auth:
                headers = dict(headers, **{"proxy-authorization": conn.http_proxy.auth})
        else:
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        lines = ["%s %s HTTP/1.1\r\n" % (method, target)]
        lines.extend("%s: %s\r\n" % item for item in headers.items())
        lines.append("\r\n")
        try:
            request = "".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError("HTTP header values must be latin-1 text: %r" % (
                [k for k, v in headers.items() if not str(v).isascii()],)) from None
        try:
            # Head and body in one send: no Nagle / delayed-ACK stall.
            conn.sock.sendall(request + body if body else request)
            status, rheaders, data, will_close = _read_response(conn.rfile, method)
        except BaseException as exc:
            conn.close()
            pool.pop(key, None)
            if isinstance(exc, Exception):
                exc.buquet_reused = reused  # the caller retries stale keep-alives at once
            raise
        if will_close:
            conn.close()
            pool.pop(key, None)
        return status, rheaders, data, reused

    def close(self):
        for conn in self._local.__dict__.pop("pool", {}).values():
            conn.close()


class _Connection:
    __slots__ = ("sock", "rfile", "http_proxy")

    def __init__(self, sock, rfile, http_proxy):
        self.sock = sock
        self.rfile = rfile
        self.http_proxy = http_proxy

    def close(self):
        try:
            self.rfile.close()
        finally:
            self.sock.close()


class _BadReply(OSError):
    """A reply that broke off or was not HTTP (a broken exchange, retried)."""


class _Disconnected(_BadReply):
    """The connection closed before any reply: on a kept-alive connection,
    the server had closed it while idle."""


def _tunnel(sock, host, port, proxy):
    """Open a CONNECT tunnel through an http:// proxy."""
    head = "CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n" % (host, port, host, port)
    if proxy.auth:
        head += "Proxy-Authorization: %s\r\n" % proxy.auth
    sock.sendall((head + "\r\n").encode("latin-1"))
    rfile = sock.makefile("rb")
    try:
        status, _, _, _ = _read_response(rfile, "CONNECT")
    finally:
        rfile.close()  # nothing follows until our TLS handshake: no bytes lost
    if not 200 <= status < 300:
        raise _BadReply("proxy %s:%d refused the tunnel to %s:%d: HTTP %d" % (
            proxy.host, proxy.port, host, port, status))


_MAX_LINE = 65536
_MAX_HEADERS = 200


def _readline(rfile):
    line = rfile.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise _BadReply("header line longer than %d bytes" % _MAX_LINE)
    return line


def _read_response(rfile, method):
    """(status, headers, body, will_close) of one HTTP/1.x response.

    http.client's parser goes through the email package; this one reads
    what S3 sends (status line, headers, a Content-Length or chunked body)
    for a fraction of the CPU."""
    while True:
        line = _readline(rfile)
        if not line:
            raise _Disconnected("the connection closed without a reply")
        parts = line.decode("latin-1").split(None, 2)
        version = parts[0] if parts else ""
        status = int(parts[1]) if len(parts) > 1 and parts[1].isascii() and parts[1].isdigit() else 0
        if not version.startswith("HTTP/") or not 100 <= status <= 999:
            raise _BadReply("not an HTTP status line: %r" % (line[:80],))
        headers = {}
        for _ in range(_MAX_HEADERS + 1):
            hline = _readline(rfile)
            if hline in (b"\r\n", b"\n", b""):
                break
            name, sep, value = hline.decode("latin-1").partition(":")
            if not sep:
                continue  # not a header line; ignore as lenient clients do
            name = name.strip().lower()
            value = value.strip()
            headers[name] = headers[name] + ", " + value if name in headers else value
        else:
            raise _BadReply("more than %d headers" % _MAX_HEADERS)
        if 100 <= status < 200 and status != 101:
            continue  # 100 Continue and friends: the real reply follows
        break
    connection = headers.get("connection", "").lower()
    will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    if method == "HEAD" or status in (204, 304) or (method == "CONNECT" and 200 <= status < 300):
        return status, headers, b"", will_close
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size_line = _readline(rfile).split(b";", 1)[0].strip()
            # Hex digits only (int() would take a sign, 0x or _), at most 2**64.
            if not size_line or len(size_line) > 16 or size_line.strip(b"0123456789abcdefABCDEF"):
                raise _BadReply("bad chunk size %r" % (size_line[:20],))
            size = int(size_line, 16)
            if size == 0:
                while _readline(rfile) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return status, headers, b"".join(chunks), will_close
            chunk = rfile.read(size)
            if len(chunk) < size:
                raise _BadReply("chunked body cut short (%d bytes missing)" % (size - len(chunk)))
            chunks.append(chunk)
            rfile.read(2)  # the CRLF after each chunk
    length = headers.get("content-length")
    if length is not None:
        # ASCII digits only (int() would take a sign, _ or other scripts' digits);
        # more than 18 of them cannot be read anyway.
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise _BadReply("bad Content-Length %r" % (length[:40],))
        n = int(length)
        data = rfile.read(n) if n > 0 else b""
        if len(data) < n:
            raise _BadReply("body cut short: %d of %d bytes" % (len(data), n))
        return status, headers, data, will_close
    return status, headers, rfile.read(), True  # delimited by the connection closing


# ============================================================================
# Replies: records and XML parsing
# ============================================================================


_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                                         "Nov", "Dec"), 1)}


def _parse_http_date(value):
    """An HTTP date (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`, which
    S3 sends) -> aware UTC datetime; None when absent or in another form."""
    if not value:
        return None
    parts = value.split()
    try:
        if len(parts) != 6 or parts[5] not in ("GMT", "UTC"):
            return None
        hh, mm, ss = parts[4].split(":")
        return datetime(int(parts[3]), _MONTHS[parts[2]], int(parts[1]), int(hh), int(mm), int(ss),
                        tzinfo=timezone.utc)
    except (ValueError, KeyError, OverflowError):
        return None


def _parse_timestamp(value):
    """ISO 8601 timestamps as S3 writes them in XML
    (`2009-10-12T17:50:30.000Z`); None when absent or unreadable."""
    if not value:
        return None
    try:
        dt = datetime(
            int(value[0:4]), int(value[5:7]), int(value[8:10]),
            int(value[11:13]), int(value[14:16]), int(value[17:19]),
            tzinfo=timezone.utc,
        )
    except (ValueError, IndexError):
        return None
    if len(value) > 20 and value[19] == ".":
        digits = value[20:].rstrip("Zz")
        if digits.isdigit():
            dt = dt.replace(microsecond=int(digits[:6].ljust(6, "0")))
    return dt


class _Record:
    """A small value object: slots, keyword construction, repr, equality."""

    __slots__ = ()

    def __init__(self, *args, **kwargs):
        for name, value in zip(self.__slots__, args):
            setattr(self, name, value)
        for name in self.__slots__[len(args):]:
            setattr(self, name, kwargs.pop(name, None))
        if kwargs:
            raise TypeError("unexpected fields: %s" % ", ".join(kwargs))

    def __repr__(self):
        fields = ", ".join("%s=%r" % (n, getattr(self, n)) for n in self.__slots__ if n != "body")
        return "%s(%s)" % (type(self).__name__, fields)

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    __hash__ = None


class S3Response(_Record):
    """A successful reply.  `status` is 304 when a GET with If-None-Match
    found the object unchanged (then `body` is empty).  `date` is the
    server's clock (the `Date` header) as an aware UTC datetime."""

    __slots__ = ("status", "headers", "body", "date")

    @property
    def etag(self):
        return self.headers.get("etag")

    @property
    def version_id(self):
        vid = self.headers.get("x-amz-version-id")
        return None if vid in (None, "null") else vid

    @property
    def last_modified(self):
        return _parse_http_date(self.headers.get("last-modified"))

    @property
    def content_type(self):
        return self.headers.get("content-type")

    @property
    def metadata(self):
        return {k[11:]: v for k, v in self.headers.items() if k.startswith("x-amz-meta-")}

    @property
    def not_modified(self):
        return self.status == 304


class S3Object(_Record):
    """One entry of a ListObjectsV2 page.  `last_modified` is parsed when
    first read: a queue lists many keys and looks at few dates."""

    __slots__ = ("key", "etag", "size", "last_modified_text")

    @property
    def last_modified(self):
        return _parse_timestamp(self.last_modified_text)


class ListObjectsV2Result(_Record):
    __slots__ = ("contents", "common_prefixes", "is_truncated", "next_continuation_token", "key_count", "date")

    @property
    def keys(self):
        return [obj.key for obj in self.contents]


class ObjectVersion(_Record):
    """One version or delete marker from ListObjectVersions."""

    __slots__ = ("key", "version_id", "is_latest", "is_delete_marker", "etag", "size", "last_modified")


class ListObjectVersionsResult(_Record):
    __slots__ = ("versions", "date")


def _fromstring(body):
    """ET.fromstring, failing only with ET.ParseError: an XML declaration
    naming an unknown encoding raises LookupError from the parser."""
    import xml.etree.ElementTree as ET  # noqa: N817 - only replies with XML pay for it

    try:
        return ET.fromstring(body)
    except LookupError as exc:
        raise ET.ParseError("unreadable XML: %s" % exc) from None


def _malformed(operation, method, bucket, resp, call, *args):
    """`call(*args)`, a parse of a success body; S3Error when it is not XML."""
    try:
        return call(*args)
    except SyntaxError as exc:  # xml.etree.ElementTree.ParseError
        raise S3Error("malformed %s reply (not XML: %s)" % (operation, exc), status=resp.status,
                      code="MalformedReply", method=method, bucket=bucket,
                      request_id=resp.headers.get("x-amz-request-id"), date=resp.date) from None


def _xml_root(body):
    root = _fromstring(body)
    # Drop namespaces: S3 answers with one, compatible servers sometimes not.
    for elem in root.iter():
        if isinstance(elem.tag, str) and "}" in elem.tag:
            elem.tag = elem.tag.rsplit("}", 1)[1]
    return root


def _text(elem, name, default=None):
    child = elem.find(name)
    if child is None or child.text is None:
        return default
    return child.text


def _parse_error(status, body):
    """(code, message, request id) from an error reply, whatever its shape:
    S3 XML, an HTML page from a proxy, empty, or cut short."""
    default_code = {
        301: "PermanentRedirect", 304: "NotModified", 400: "BadRequest",
        403: "AccessDenied", 404: "NotFound", 405: "MethodNotAllowed",
        409: "Conflict", 412: "PreconditionFailed", 416: "InvalidRange",
        500: "InternalError", 501: "NotImplemented", 502: "BadGateway",
        503: "ServiceUnavailable", 504: "GatewayTimeout",
    }.get(status, "HTTP%d" % status)
    text = body[:_MAX_ERROR_BODY].decode("utf-8", "replace").strip() if body else ""
    if text.startswith("<?xml") or text.startswith("<Error"):
        try:
            root = _xml_root(body[:_MAX_ERROR_BODY])
        except Exception:  # truncated or malformed: show its start, it is not HTML
            return default_code, "malformed XML error reply: " + " ".join(text.split())[:200], None
        else:
            err = root if root.tag == "Error" else root.find("Error")
            if err is not None:
                code = _text(err, "Code") or default_code
                message = _text(err, "Message") or code
                return code, " ".join(message.split()), _text(err, "RequestId")
    if not text:
        return default_code, "empty error reply", None
    if "<html" in text[:200].lower() or text.startswith("<"):
        return default_code, "non-S3 error reply (HTML); a proxy or a wrong endpoint?", None
    first = " ".join(text.split())
    return default_code, first[:200], None


def _parse_list_objects_v2(body, date):
    # The hot path of discovery: one pass over each entry's children, the
    # namespace matched as found instead of rewritten, dates left as text.
    root = _fromstring(body)
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    decode = unquote_plus if root.findtext(ns + "EncodingType") == "url" else str
    t_key, t_etag, t_size, t_date = ns + "Key", ns + "ETag", ns + "Size", ns + "LastModified"
    contents = []
    for item in root.iterfind(ns + "Contents"):
        key = etag = size = modified = None
        for child in item:
            tag = child.tag
            if tag == t_key:
                key = child.text
            elif tag == t_etag:
                etag = child.text
            elif tag == t_size:
                size = child.text
            elif tag == t_date:
                modified = child.text
        size = int(size) if size and size.isascii() and size.isdigit() else None  # int() rejects '²'
        contents.append(S3Object(decode(key or ""), etag, size, modified))
    prefixes = [decode(p.findtext(ns + "Prefix") or "") for p in root.iterfind(ns + "CommonPrefixes")]
    key_count = root.findtext(ns + "KeyCount")
    return ListObjectsV2Result(
        contents,
        prefixes,
        (root.findtext(ns + "IsTruncated") or "false").strip().lower() == "true",
        root.findtext(ns + "NextContinuationToken"),
        int(key_count) if key_count and key_count.isascii() and key_count.isdigit() else len(contents),
        date,
    )


def _parse_list_object_versions(body):
    """(versions, is_truncated, next key marker, next version marker)."""
    root = _xml_root(body)
    decode = unquote_plus if _text(root, "EncodingType") == "url" else str
    versions = []
    for item in root:
        if item.tag not in ("Version", "DeleteMarker"):
            continue
        size = _text(item, "Size")
        versions.append(ObjectVersion(
            decode(_text(item, "Key", "")),
            _text(item, "VersionId"),
            _text(item, "IsLatest", "false").strip().lower() == "true",
            item.tag == "DeleteMarker",
            _text(item, "ETag"),
            int(size) if size and size.isascii() and size.isdigit() else None,
            _parse_timestamp(_text(item, "LastModified")),
        ))
    truncated = _text(root, "IsTruncated", "false").strip().lower() == "true"
    key_marker = _text(root, "NextKeyMarker")
    return versions, truncated, key_marker and decode(key_marker), _text(root, "NextVersionIdMarker")


def _parse_versioning(body):
    # Lenient about the root element: moto answers GetBucketVersioningResponse
    # where AWS answers VersioningConfiguration.
    if not body or not body.strip():
        return None
    root = _xml_root(body)
    for elem in root.iter():
        if elem.tag == "Status" and elem.text:
            return elem.text.strip()
    return None


# ============================================================================
# The client
# ============================================================================


class S3Client:
    """A small S3 client: the calls a task queue needs, named after the S3 API.

    Thread-safe: each thread keeps its own persistent connection per host.
    Creating a client performs no network request.

    Arguments (all keyword-only):
      endpoint: URL of an S3-compatible service; default AWS S3 in `region`
        (also `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`).
      region: signing region; default from `resolve_region`, else us-east-1.
      credentials: `Credentials`, or an object with `get()` returning them
        (a refreshing provider); default `resolve_credentials(profile=...)`.
      path_style: force path-style (True) or virtual-hosted (False) URLs;
        default: path style for custom endpoints (or `S3_FORCE_PATH_STYLE`),
        virtual-hosted on AWS.
      connect_timeout, read_timeout: seconds.
      max_attempts: tries per request, including the first.
      verify: TLS verification (on by default); ca_bundle: a CA file
        (default `AWS_CA_BUNDLE`, then the system's / `SSL_CERT_FILE`).
      on_reply: optional callable(date, sent_monotonic, received_monotonic)
        called for every reply that carried a `Date` header, errors included;
        a queue uses it to follow the server's clock.
    """

    def __init__(
        self,
        *,
        endpoint=None,
        region=None,
        credentials=None,
        profile=None,
        path_style=None,
        connect_timeout=5.0,
        read_timeout=30.0,
        max_attempts=5,
        backoff_base=0.1,
        backoff_cap=5.0,
        verify=True,
        ca_bundle=None,
        environ=None,
        on_reply=None,
        sleep=time.sleep,
        rand=None,
    ):
        environ = os.environ if environ is None else environ
        if endpoint is None:
            endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None
        self.region = region or resolve_region(profile, environ) or DEFAULT_REGION
        if path_style is None and _truthy(environ.get("S3_FORCE_PATH_STYLE", "")):
            path_style = True
        self._endpoint = _Endpoint(endpoint, self.region, path_style)
        if credentials is None:
            credentials = resolve_credentials(profile=profile, region=self.region, environ=environ)
        self._credentials = credentials
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1, got %r" % (max_attempts,))
        self.max_attempts = int(max_attempts)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._transport = _Transport(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            verify=verify,
            ca_bundle=ca_bundle,
            environ=environ,
        )
        self._on_reply = on_reply
        self._sleep = sleep
        self._rand = rand or _random
        # Local clock minus server clock, learnt from RequestTimeTooSkewed
        # replies so that signing keeps working on a host with a bad clock.
        self._skew = timedelta(0)

    def __repr__(self):
        ep = self._endpoint
        return "S3Client(endpoint=%r, region=%r, path_style=%r)" % (
            "%s://%s:%d%s" % (ep.scheme, ep.host, ep.port, ep.base_path),
            self.region,
            ep.path_style,
        )

    @property
    def endpoint_url(self):
        ep = self._endpoint
        return "%s://%s:%d%s" % (ep.scheme, ep.host, ep.port, ep.base_path)

    def credentials(self):
        """The credentials the next request will be signed with."""
        creds = self._credentials
        return creds.get() if hasattr(creds, "get") else creds

    def close(self):
        """Close this thread's connections."""
        self._transport.close()

    # -- the request loop ---------------------------------------------------

    def _backoff(self, attempt):
        # Full jitter (AWS architecture blog): spreads retries of many clients.
        return self._rand() * min(self._backoff_cap, self._backoff_base * (2 ** attempt))

    def _request(self, method, bucket, key=None, params=(), headers=None, body=b"", ok=(200,)):
        query = _query(params)
        url = self._endpoint.url(bucket, key, query)
        headers = dict(headers or ())
        payload_hash = _sha256_hex(body) if body else EMPTY_SHA256
        conditional = "if-match" in headers or "if-none-match" in headers
        conditional_write = conditional and method in ("PUT", "DELETE", "POST")
        may_have_applied = False
        last_exc = None
        attempt = 0
        free_retry = True
        while True:
            attempt += 1
            signed = sign(
                method, url, headers, payload_hash, self.credentials(), self.region,
                now=datetime.now(timezone.utc) - self._skew,
            )
            signed["user-agent"] = _USER_AGENT
            if body or method in ("PUT", "POST"):
                signed["content-length"] = str(len(body))
            sent = time.monotonic()
            try:
                status, rheaders, rbody, reused = self._transport.send(method, url, signed, body or None)
            except _NotSent as exc:
                last_exc = exc.__cause__ or exc
                ssl = sys.modules.get("ssl")  # imported only when TLS is in use
                if ssl is not None and isinstance(last_exc, ssl.SSLCertVerificationError):
                    # Another attempt cannot fix a certificate: say so now.
                    raise TransportError(
                        "TLS certificate verification failed: %s (set AWS_CA_BUNDLE or ca_bundle for a private CA)"
                        % _describe(last_exc), code="SSLCertVerificationError", method=method, bucket=bucket,
                        key=key) from last_exc
            except OSError as exc:
                last_exc = exc
                may_have_applied = True
                if free_retry and getattr(exc, "buquet_reused", False) and isinstance(
                        exc, (_Disconnected, ConnectionResetError, BrokenPipeError)):
                    # A kept-alive connection the server had already closed:
                    # try once more at once on a fresh one.
                    free_retry = False
                    attempt -= 1
                    continue
            else:
                date = _parse_http_date(rheaders.get("date"))
                if date is not None and self._on_reply is not None:
                    self._on_reply(date, sent, time.monotonic())
                if status in ok:
                    return S3Response(status, rheaders, rbody, date)
                code, message, request_id = _parse_error(status, rbody)
                err_args = dict(status=status, code=code, method=method, bucket=bucket, key=key,
                                request_id=request_id or rheaders.get("x-amz-request-id"), date=date)
                retryable = status in _RETRY_STATUSES or code in _RETRY_CODES
                if code == "RequestTimeTooSkewed" and date is not None:
                    self._skew = datetime.now(timezone.utc) - date
                if retryable and attempt < self.max_attempts:
                    if not (status == 503 or code in _NOT_APPLIED_CODES):
                        may_have_applied = True
                    self._sleep(self._backoff(attempt))
                    continue
                raise self._error(status, code, message, err_args, conditional_write, may_have_applied)
            if attempt >= self.max_attempts:
                if conditional_write and may_have_applied:
                    raise UncertainWriteError(
                        "no reply after %d attempts (%s): the write may have been applied; re-read to decide"
                        % (attempt, _describe(last_exc)),
                        code=type(last_exc).__name__, method=method, bucket=bucket, key=key) from last_exc
                raise TransportError(
                    "no reply after %d attempts: %s" % (attempt, _describe(last_exc)),
                    code=type(last_exc).__name__, method=method, bucket=bucket, key=key,
                ) from last_exc
            self._sleep(self._backoff(attempt))

    @staticmethod
    def _error(status, code, message, err_args, conditional_write, may_have_applied):
        lost = status == 412
        if conditional_write and status == 404 and code in ("NoSuchKey", "NotFound"):
            lost = True
        if conditional_write and lost:
            if may_have_applied:
                return UncertainWriteError(
                    "conditional write retried after a broken attempt, and the retry lost: "
                    "the first attempt may have been applied; re-read to decide", **err_args)
            return ConflictError("precondition failed: " + message, **err_args)
        if conditional_write and may_have_applied:
            return UncertainWriteError(
                "%s after a broken attempt that may have been applied; re-read to decide" % message, **err_args)
        if status == 404 and code in ("NoSuchKey", "NotFound"):
            return NoSuchKey(message, **err_args)
        return S3Error(message, **err_args)

    # -- objects --------------------------------------------------------------

    def put_object(self, bucket, key, body=b"", *, if_match=None, if_none_match=None,
                   content_type=None, metadata=None):
        """PutObject.  `if_match` is an ETag (compare-and-swap); `if_none_match`
        may only be "*" (create only: AWS answers 501 to anything else).
        Raises ConflictError when the condition fails."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = {}
        if if_match is not None:
            headers["if-match"] = if_match
        if if_none_match is not None:
            if if_none_match != "*":
                raise ValueError("put_object(): if_none_match must be '*', got %r" % (if_none_match,))
            headers["if-none-match"] = "*"
        if content_type:
            headers["content-type"] = content_type
        for name, value in (metadata or {}).items():
            headers["x-amz-meta-" + name.lower()] = str(value)
        return self._request("PUT", bucket, key, headers=headers, body=body)

    def get_object(self, bucket, key, *, version_id=None, if_none_match=None, range=None):
        """GetObject.  With `if_none_match` (an ETag) an unchanged object
        answers status 304 with an empty body.  Raises NoSuchKey."""
        headers = {}
        if if_none_match is not None:
            headers["if-none-match"] = if_none_match
        if range is not None:
            headers["range"] = range
        params = [("versionId", version_id)] if version_id else ()
        return self._request("GET", bucket, key, params=params, headers=headers, ok=(200, 206, 304))

    def head_object(self, bucket, key, *, version_id=None):
        params = [("versionId", version_id)] if version_id else ()
        return self._request("HEAD", bucket, key, params=params)

    def delete_object(self, bucket, key, *, if_match=None, version_id=None):
        """DeleteObject (204 whether or not the key existed).  Conditional
        delete (`if_match`) is not portable: some servers ignore it."""
        headers = {"if-match": if_match} if if_match is not None else None
        params = [("versionId", version_id)] if version_id else ()
        return self._request("DELETE", bucket, key, params=params, headers=headers, ok=(200, 204))

    def delete_objects(self, bucket, keys):
        """DeleteObjects: up to 1000 keys in one request (quiet mode).
        Returns the keys that could not be deleted as [(key, code, message)]."""
        keys = list(keys)
        if not keys:
            return []
        if len(keys) > 1000:
            raise ValueError("delete_objects(): at most 1000 keys per request, got %d" % len(keys))
        from xml.sax.saxutils import escape

        body = ('<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Quiet>true</Quiet>%s</Delete>' % "".join(
            "<Object><Key>%s</Key></Object>" % escape(k) for k in keys)).encode("utf-8")
        headers = {"content-md5": _content_md5(body), "content-type": "application/xml"}
        resp = self._request("POST", bucket, params=[("delete", None)], headers=headers, body=body)
        root = _malformed("DeleteObjects", "POST", bucket, resp, _xml_root, resp.body)
        return [(e.findtext("Key"), e.findtext("Code"), e.findtext("Message")) for e in root.iter("Error")]

    # -- listing --------------------------------------------------------------

    def list_objects_v2(self, bucket, *, prefix="", start_after=None, continuation_token=None,
                        max_keys=1000, delimiter=None):
        """One page of ListObjectsV2, keys in ascending UTF-8 byte order.
        Keys are requested URL-encoded (XML 1.0 cannot carry every key) and
        decoded here."""
        params = [("list-type", "2"), ("encoding-type", "url")]
        if prefix:
            params.append(("prefix", prefix))
        if start_after:
            params.append(("start-after", start_after))
        if continuation_token:
            params.append(("continuation-token", continuation_token))
        if delimiter:
            params.append(("delimiter", delimiter))
        params.append(("max-keys", str(int(max_keys))))
        params.sort()
        resp = self._request("GET", bucket, params=params)
        return _malformed("ListObjectsV2", "GET", bucket, resp, _parse_list_objects_v2, resp.body, resp.date)

    def list_object_versions(self, bucket, *, prefix=""):
        """Every version and delete marker under `prefix`, all pages
        followed, newest first per key as S3 orders them."""
        versions = []
        key_marker = version_marker = None
        date = None
        while True:
            params = [("versions", None), ("encoding-type", "url")]
            if prefix:
                params.append(("prefix", prefix))
            if key_marker:
                params.append(("key-marker", key_marker))
            if version_marker:
                params.append(("version-id-marker", version_marker))
            params.sort()
            resp = self._request("GET", bucket, params=params)
            date = resp.date
            page, truncated, key_marker, version_marker = _malformed(
                "ListObjectVersions", "GET", bucket, resp, _parse_list_object_versions, resp.body)
            versions.extend(page)
            if not truncated or not (key_marker or version_marker):
                return ListObjectVersionsResult(versions, date)

    # -- buckets --------------------------------------------------------------

    def create_bucket(self, bucket):
        body = b""
        if self.region != DEFAULT_REGION:
            body = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                "<LocationConstraint>%s</LocationConstraint></CreateBucketConfiguration>" % self.region
            ).encode("utf-8")
        return self._request("PUT", bucket, body=body)

    def get_bucket_versioning(self, bucket):
        """'Enabled', 'Suspended', or None for a bucket never versioned."""
        resp = self._request("GET", bucket, params=[("versioning", None)])
        return _malformed("GetBucketVersioning", "GET", bucket, resp, _parse_versioning, resp.body)

    def put_bucket_versioning(self, bucket, status="Enabled"):
        if status not in ("Enabled", "Suspended"):
            raise ValueError("versioning status must be 'Enabled' or 'Suspended', got %r" % (status,))
        body = (
            '<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            "<Status>%s</Status></VersioningConfiguration>" % status
        ).encode("utf-8")
        headers = {"content-md5": _content_md5(body)}
        return self._request("PUT", bucket, params=[("versioning", None)], headers=headers, body=body)


def _describe(exc):
    if exc is None:
        return "unknown error"
    if isinstance(exc, socket.timeout):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return "%s: %s" % (type(exc).__name__, text) if text != type(exc).__name__ else text
