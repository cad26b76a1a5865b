"""A tracking server that asks who is calling (MLflow's basic-auth app), seen from a client.

Credentials are MLflow's own: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` or
``~/.mlflow/credentials``, and ``MLFLOW_TRACKING_SERVER_CERT_PATH`` to trust a self-signed
certificate; every request goes through MLflow's REST client. This module adds what a stage
needs before it works: a pre-flight call that exercises authentication and the server's host
check (:func:`check_server`), the caller's permission on what it is about to write
(:func:`require`), and a refused request as one line (:func:`refusal`). The server side,
``bam server --auth``, is :mod:`bam_vae.tracking.server`'s.
"""

from __future__ import annotations

import re
from functools import cache

from bam_vae.errors import BamError
from bam_vae.uris import mask

SET_CREDENTIALS = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"
)
# What MLflow's host check (its DNS-rebinding guard) answers with HTTP 403.
INVALID_HOST = "Invalid Host header"
PERMISSIONS = "/api/3.0/mlflow/users/permissions/get"
# Permissions that may write (MLflow's EDIT and MANAGE; USE and READ may not).
WRITERS = ("EDIT", "MANAGE")


def _creds(uri: str):
    from mlflow.tracking._tracking_service.utils import get_default_host_creds

    return get_default_host_creds(uri)


def user(uri: str) -> str | None:
    """The user MLflow's client sends to ``uri`` (None: anonymous)."""
    return _creds(uri).username or None


def _request(uri: str, endpoint: str, timeout: float, **kwargs):
    """One request with MLflow's client (its credentials and TLS settings), no retries."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import http_request

    try:
        return http_request(_creds(uri), endpoint, "GET", max_retries=0, timeout=timeout,
                            raise_on_status=False, **kwargs)  # fmt: skip
    except MlflowException as exc:
        import requests

        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, requests.exceptions.SSLError):
            raise BamError(
                f"MLFLOW_TRACKING_URI {mask(uri)}: the server's TLS certificate is not trusted"
                " here; set MLFLOW_TRACKING_SERVER_CERT_PATH to its certificate (a self-signed"
                " one: the server's --ssl-certfile, docs/team.md)"
            ) from None
        why = getattr(cause, "args", None) and type(cause).__name__ or "no answer"
        raise BamError(
            f"MLFLOW_TRACKING_URI {mask(uri)}: tracking server unreachable ({why}); start it or"
            " unset MLFLOW_TRACKING_URI to use the project's own store"
        ) from None


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Before any work: the server at ``uri`` answers ``/health`` within ``timeout`` seconds
    and lets this client search experiments, which MLflow's basic-auth app and host check
    both guard (``/health`` is exempt from both).

    Raises :class:`BamError`, one line naming the URI and what to set, for: no answer, an
    untrusted certificate, no or wrong credentials (HTTP 401), a host name the server does not
    allow (HTTP 403), any other refusal."""
    health = _request(uri, "/health", timeout)
    if health.status_code != 200:
        answer = health.status_code
        raise BamError(f"MLFLOW_TRACKING_URI {mask(uri)}: health check answered {answer}")
    reply = _request(uri, "/api/2.0/mlflow/experiments/search", timeout,
                     params={"max_results": 1})  # fmt: skip
    if reply.status_code == 200:
        return
    name = user(uri)
    if reply.status_code == 401 and name is None:
        raise BamError(
            f"MLFLOW_TRACKING_URI {mask(uri)} asks who is calling (HTTP 401); {SET_CREDENTIALS}"
            " to your account on that server"
        )
    if reply.status_code == 401:
        raise BamError(
            f"MLFLOW_TRACKING_URI {mask(uri)} refused user {name!r} (HTTP 401: no such user or a"
            " wrong password); check MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"
        )
    if reply.status_code == 403 and INVALID_HOST in reply.text:
        from urllib.parse import urlsplit

        host = urlsplit(uri).netloc.rpartition("@")[2]
        raise BamError(
            f"MLFLOW_TRACKING_URI {mask(uri)}: the server does not allow the host name {host!r}"
            f" (HTTP 403); start it with --allowed-hosts {host} (`bam server`), or use a name it"
            " allows"
        )
    raise BamError(
        f"MLFLOW_TRACKING_URI {mask(uri)} refused {_who(name)} (HTTP {reply.status_code}:"
        f" {reply.text.strip()[:120]})"
    )


def _who(name: str | None) -> str:
    return f"user {name!r}" if name else "an anonymous client"


@cache
def permission(uri: str, resource_type: str, resource_id: str) -> str | None:
    """The caller's effective permission on a resource of ``uri`` (``READ``, ``EDIT``,
    ``MANAGE``, ``NO_PERMISSIONS``...), as MLflow's basic-auth app resolves it (grants, then
    its ``default_permission``); None on a server without that app, or for an anonymous or
    admin client, whose writes the server itself decides.

    ``resource_type``: ``experiment`` or ``registered_model``; ``resource_id``: the
    experiment's id or the model's name."""
    name = user(uri)
    if not name or not uri.startswith(("http://", "https://")):
        return None
    query = {"username": name, "resource_type": resource_type, "resource_id": resource_id}
    reply = _request(uri, PERMISSIONS, 10.0, params=query)
    if reply.status_code != 200:  # 404: no auth app on this server
        return None
    return reply.json().get("permission")


def require(uri: str, resource_type: str, resource_id: str, label: str, doing: str) -> None:
    """Stop before any work unless the caller may write ``resource_id`` (EDIT or MANAGE).

    ``label`` names it for people (``experiment 'bam-vae'``); ``doing`` says what the write
    is (``train writes runs``). Raises :class:`BamError`, one line naming the server, the
    user, the permission held and the one needed."""
    held = permission(uri, resource_type, resource_id)
    if held is None or held in WRITERS:
        return
    raise BamError(
        f"{doing} into {label} of {mask(uri)}, which needs EDIT; user {user(uri)!r} has"
        f" {held}: ask its manager or an admin for a grant (docs/team.md#members-and-grants)"
    )


def can_write(uri: str, resource_type: str, resource_id: str) -> bool:
    held = permission(uri, resource_type, resource_id)
    return held is None or held in WRITERS


_ENDPOINT = re.compile(r"endpoint (\S+) failed with error code (40[13])")
_WRITES = ("create", "update", "set", "log", "delete", "alias", "rename", "restore", "transition")


def _refused(exc: BaseException) -> tuple[int, str, str] | None:
    """(HTTP status, endpoint, method) of a request refused with 401/403: MLflow's REST
    client raises ``MlflowException`` (``UNAUTHENTICATED`` / ``PERMISSION_DENIED``), its
    artifact client ``requests.HTTPError``."""
    import requests
    from mlflow.exceptions import MlflowException

    codes = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
    if isinstance(exc, MlflowException) and exc.error_code in codes:
        found = _ENDPOINT.search(str(exc))
        return codes[exc.error_code], found.group(1) if found else "a request", ""
    reply = getattr(exc, "response", None)
    status = getattr(reply, "status_code", None)
    if isinstance(exc, requests.HTTPError) and status in (401, 403):
        from urllib.parse import urlsplit

        method = exc.request.method if exc.request is not None else ""
        return status, urlsplit(reply.url).path, method or ""
    return None


def refusal(exc: BaseException, uri: str) -> str | None:
    """One line for a request the tracking server refused (HTTP 401/403), naming the server,
    the user and the permission the request needed; None for any other error."""
    refused = _refused(exc)
    if refused is None:
        return None
    status, endpoint, method = refused
    name = user(uri)
    if status == 401:
        return (
            f"{mask(uri)} refused {_who(name)} on {endpoint} (HTTP 401); {SET_CREDENTIALS} to"
            " your account on that server"
        )
    model = "registered-models" in endpoint or "model-versions" in endpoint
    on = "the registered model" if model else "the experiment"
    verb = endpoint.rsplit("/", 1)[-1]
    writes = method in ("PUT", "DELETE") or any(w in verb for w in _WRITES)
    need = "MANAGE" if "delete" in verb or method == "DELETE" else "EDIT" if writes else "READ"
    return (
        f"{mask(uri)} refused {_who(name)} on {endpoint} (HTTP 403): it needs {need} on {on};"
        " nothing was changed; ask its manager or an admin for a grant"
        " (docs/team.md#members-and-grants)"
    )
