"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class BamError(Exception):
    """A user-facing error: bad params, a missing or corrupt file, an unknown model."""


class Interrupted(BamError):
    """A stage stopped on SIGINT/SIGTERM after leaving a checkpoint to resume from."""


def require_extra(module: str, what: str) -> None:
    """Import ``module`` of the ``team`` extra (Ray, PostgreSQL's driver), or raise one line
    saying how to install it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise BamError(
            f"{what} needs {module}, which is not installed; expected `pip install -e '.[team]'`"
            " (Ray and PostgreSQL's driver)"
        ) from None


def reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type if the message is empty)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


# What a full disk, a quota, a file-size limit or a read-only mount raise while writing.
_STORAGE_ERRNOS = {"ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded",
                   "EFBIG": "file too large for the filesystem",
                   "EROFS": "read-only filesystem"}  # fmt: skip
# The same causes as SQLite (the MLflow store) words them, wrapped by SQLAlchemy and MLflow.
_STORAGE_TEXTS = {"database or disk is full": "ENOSPC",
                  "attempt to write a readonly database": "EROFS"}  # fmt: skip


def storage_error(exc: BaseException) -> str | None:
    """One line for a write that failed because the storage refused it (ENOSPC, EDQUOT, EFBIG,
    EROFS) anywhere in ``exc``'s chain, naming the path and the cause; None for other errors."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = errno.errorcode.get(getattr(current, "errno", None) or -1, "")
        if isinstance(current, OSError) and code in _STORAGE_ERRNOS:
            where = current.filename or _writer(current)
            return _storage_line(str(where), code)
        text = str(current)
        for words, code in _STORAGE_TEXTS.items():
            if words in text:
                return _storage_line("the MLflow store's database", code)
        current = current.__cause__ or current.__context__
    return None


def _writer(exc: BaseException) -> str:
    """Who was writing, when the error names no file: MLflow (its own copies name none)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if any("/mlflow/" in frame.filename.replace("\\", "/") for frame in frames):
        return "the MLflow store's artifacts"
    return "a file"


def _storage_line(where: str, code: str) -> str:
    return (
        f"cannot write {where}: {_STORAGE_ERRNOS[code]} ({code}); nothing was changed (earlier"
        " outputs are as they were) -- free space or fix the mount, then run again"
    )


# Libraries whose exceptions reach the command line, and what each was doing for bam.
_LIBRARIES = {"optuna": "the study (Optuna)", "sqlalchemy": "a database (SQLAlchemy)",
              "psycopg": "PostgreSQL (psycopg)", "mlflow": "the MLflow store",
              "requests": "an HTTP request"}  # fmt: skip
TRACEBACK_ENV = "BAM_TRACEBACK"


def library_error(exc: BaseException, mlflow_store: str = "") -> str | None:
    """One line for an exception of Optuna, SQLAlchemy, psycopg, MLflow or requests (its
    REST and artifact clients): what failed, the exception's type and first line, any
    password in it masked, and how to see the traceback; None for any other exception (a
    bug of ours keeps its traceback). ``mlflow_store``: the tracking URI, named in MLflow's."""
    from bam_vae.uris import mask_text

    library = type(exc).__module__.split(".")[0]
    if library not in _LIBRARIES:
        return None
    what = _LIBRARIES[library] + (
        f" {mlflow_store}" if library == "mlflow" and mlflow_store else ""
    )
    return (
        f"{what}: {type(exc).__name__}: {mask_text(reason(exc, 300))} (set {TRACEBACK_ENV}=1 for"
        " the traceback)"
    )
