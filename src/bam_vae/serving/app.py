"""The ASGI app ``bam serve`` runs: MLflow's scoring server for one model, plus ``text/csv``.

``mlflow models serve`` runs ``mlflow.pyfunc.scoring_server.app:app`` under uvicorn; this module
is that app, built the same way from the model folder in ``_SERVER_MODEL_PATH``, with one
layer in front. MLflow's own CSV parser types every column from the signature
(``Schema.pandas_types``) and so refuses every CSV request to a signature with untyped columns
(mlflow#5525: "Failed to get pandas types as some of the inputs types are not DataType"); the
generator's columns are untyped on purpose, so that a bad value gets its own one-line error.
Here a ``text/csv`` body becomes the same ``dataframe_records`` JSON request before MLflow sees
it: one row per line, empty cells left out, every cell read as JSON where it parses (``16``,
``1.5``, ``[[0.0, 1.0]]``) and kept as text where not (``gmm``, ``Sneaker``). Every other request
reaches MLflow's app unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import os

CSV = "text/csv"


class CsvError(ValueError):
    """A ``text/csv`` body that is not a header line and rows of cells."""


def csv_records(body: bytes) -> list[dict]:
    """The ``dataframe_records`` rows of a CSV request body; ``CsvError`` (one line) if it is
    not UTF-8 text with a header line and at least one row of as many cells."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvError(
            f"text/csv: the body is not UTF-8 ({exc.reason}); expected UTF-8 text"
        ) from None
    lines = list(csv.reader(io.StringIO(text)))
    rows = [line for line in lines if line]
    if len(rows) < 2 or not all(name.strip() for name in rows[0]):
        raise CsvError(
            "text/csv: expected a header line of column names (n,seed,sampler,class,latents)"
            f" and one line per request row; got {len(rows)} non-empty line(s)"
        )
    header = [name.strip() for name in rows[0]]
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise CsvError(
                f"text/csv: line {number} has {len(row)} cells; expected {len(header)}, one per"
                f" column of the header ({','.join(header)})"
            )
        records.append({k: _cell(v) for k, v in zip(header, row, strict=True) if v.strip()})
    return records


def _cell(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


class CsvRequests:
    """ASGI middleware: a ``text/csv`` POST to ``/invocations`` goes on as its JSON request;
    a body that cannot be read as CSV is HTTP 400 in MLflow's error format."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations" or not _is_csv(scope):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            payload = json.dumps({"dataframe_records": csv_records(body)}).encode()
        except CsvError as exc:
            await _reply(send, 400, {"error_code": "BAD_REQUEST", "message": str(exc)})
            return
        kept = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")
        ]
        headers = [*kept, (b"content-type", b"application/json")]
        headers.append((b"content-length", b"%d" % len(payload)))
        sent = False

        async def replay():
            nonlocal sent
            if sent:  # the request is over: wait as the server would for a disconnect
                return await receive()
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        await self.app(dict(scope, headers=headers), replay, send)


def _is_csv(scope) -> bool:
    for key, value in scope["headers"]:
        if key == b"content-type":
            return value.split(b";")[0].strip().lower() == CSV.encode()
    return False


async def _reply(send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def create_app():
    """uvicorn's ``--factory``: MLflow's scoring app for the model folder that
    ``scoring_server.get_cmd`` put in the environment, behind :class:`CsvRequests`."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(
        os.environ[scoring_server._SERVER_MODEL_PATH]
    )
    return CsvRequests(scoring_server.init(model))
