"""``bam``: one command per pipeline stage, reading params.yaml (``--set key=value`` overrides).

``dvc.yaml`` calls these same commands, so a stage run by hand and by DVC is the same code.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from bam_vae.config import Params, load_params
from bam_vae.errors import TRACEBACK_ENV, BamError, Interrupted, library_error, storage_error

app = typer.Typer(
    help="bam-vae: VAEs on MNIST, Fashion-MNIST or your own images as a reproducible DVC + MLflow"
    " pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsFile = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override one param, e.g. --set model.z_dim=16 (repeatable)"),
]

ModelUri = Annotated[
    str | None,
    typer.Option(help="any MLflow model URI, e.g. models:/bam-vae-cnn@champion (default: the"
                 " pipeline's models/vae.pt)"),
]  # fmt: skip


def _fail(message: str, code: int) -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):  # so the error gets a line of its own
        bar.close()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


_locks: ExitStack | None = None  # the running writer's stack; ``_params`` adds the checkout lock
_command = ""  # the running writer's name, as dvc.yaml's cmd says it (``bam fit-sampler``)


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # outside the loops that checkpoint, SIGTERM stops like Ctrl-C


def _run(fn: Callable[..., Any], lock: bool, *args: Any, **kwargs: Any) -> Any:
    """Turn project errors into one line on stderr and a non-zero exit, with no traceback;
    with ``lock``, one writing command per checkout at a time."""
    global _locks, _command
    _command = fn.__name__.replace("_", "-")
    previous = signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C raises KeyboardInterrupt even where the parent started us with SIGINT ignored
    # (a background job of a non-interactive shell, as CI runners do).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ExitStack() as stack:
            _locks = stack if lock else None
            return fn(*args, **kwargs)
    except BamError as exc:
        _fail(str(exc), 130 if isinstance(exc, Interrupted) else 2)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written (outputs and the MLflow store are as before)", 130)
    except Exception as exc:  # a full disk, a quota, a read-only mount: one line, no traceback
        line = storage_error(exc) or _refused(exc) or _library_error(exc)
        if line is None or os.environ.get(TRACEBACK_ENV):
            raise
        _fail(line, 2)
    finally:
        _locks = None
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _refused(exc: Exception) -> str | None:
    """A request the tracking server refused (HTTP 401/403) as one line; None otherwise."""
    if "mlflow" not in sys.modules:
        return None
    from bam_vae.tracking import auth
    from bam_vae.tracking.store import tracking_uri

    return auth.refusal(exc, tracking_uri())


def _library_error(exc: Exception) -> str | None:
    """An exception of Optuna, SQLAlchemy, psycopg or MLflow's clients as one line."""
    store = ""
    if "mlflow" in sys.modules:
        from bam_vae.tracking.store import tracking_uri
        from bam_vae.uris import mask

        store = mask(tracking_uri())
    return library_error(exc, store)


def stage(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command that writes pipeline outputs: errors as one line, one writer per checkout."""
    return wraps(fn)(lambda *a, **k: _run(fn, True, *a, **k))


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command that only reads the pipeline (report, UI...): errors as one line."""
    return wraps(fn)(lambda *a, **k: _run(fn, False, *a, **k))


def _params(params: Path, overrides: list[str] | None) -> Params:
    """Validated params; also caps torch threads so parallel queue workers share the cores."""
    from bam_vae.training.runtime import configure_threads

    loaded = load_params(params, overrides or [])
    if _locks is not None:  # taken once the params are valid, so bad ones touch nothing
        from bam_vae.files import commit_check, exclusive
        from bam_vae.paths import lock_file
        from bam_vae.stage_inputs import snapshot

        _locks.enter_context(exclusive(lock_file(), f"this checkout ({Path.cwd()})"))
        # Params or code edited while the stage runs fail it before it writes (dvc#11058).
        taken = snapshot(_command, params)
        if taken is not None:
            _locks.enter_context(commit_check(taken.check))
    configure_threads(loaded.train.threads)
    return loaded


@app.command()
@stage
def prepare(params: ParamsFile = Path("params.yaml"), set_: Overrides = None) -> None:
    """Stage prepare-mnist: read data.dataset (MNIST by default), check it, write data/prepared/."""
    from bam_vae.stages.prepare import prepare as run

    run(_params(params, set_).data)


@app.command()
@stage
def train(params: ParamsFile = Path("params.yaml"), set_: Overrides = None) -> None:
    """Stage train: fit the VAE, log it to MLflow and register a new model version."""
    from bam_vae.stages.train import fit

    fit(_params(params, set_))


@app.command("train-evaluator")
@stage
def train_evaluator(params: ParamsFile = Path("params.yaml"), set_: Overrides = None) -> None:
    """Stage train-evaluator: the dataset's classifier behind FID features and class metrics."""
    from bam_vae.stages.train_evaluator import train_evaluator as run

    loaded = _params(params, set_)
    run(loaded.evaluator, loaded.data.out_dir)


@app.command("fit-sampler")
@stage
def fit_sampler(params: ParamsFile = Path("params.yaml"), set_: Overrides = None) -> None:
    """Stage fit-sampler: fit generate.sampler (auto, gmm, two-stage, pixelcnn) to the data."""
    from bam_vae.stages.fit_sampler import fit_sampler as run

    run(_params(params, set_))


@app.command()
@stage
def generate(
    params: ParamsFile = Path("params.yaml"),
    set_: Overrides = None,
    model: ModelUri = None,
    label: Annotated[
        int | None,
        typer.Option(
            "--class",
            "--digit",
            min=0,
            help="conditional models: draw only this class index (--digit: MNIST's name)",
        ),
    ] = None,  # fmt: skip
    out: Annotated[Path, typer.Option(help="folder for images.npy")] = Path("data/generated"),
    figures: Annotated[Path, typer.Option(help="folder for the PNG figures")] = Path("figures"),
) -> None:
    """Stage generate-1024: draw latents (generate.sampler), decode, draw samples and recons."""
    from bam_vae.stages.generate import generate as run

    run(_params(params, set_), model_uri=model, label=label, out_dir=out, fig_dir=figures)


@app.command("compare-samplers")
@stage  # writes into figures/: one writer per checkout, as the stages
def compare_samplers(
    params: ParamsFile = Path("params.yaml"),
    set_: Overrides = None,
    model: ModelUri = None,
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("figures/samplers.png"),
) -> None:
    """One model's samples from each sampler that fits it, side by side."""
    from bam_vae.reporting.compare_samplers import compare_samplers as run

    run(_params(params, set_), model_uri=model, out=out)


@app.command("fid-reference")
@stage
def fid_reference(
    params: ParamsFile = Path("params.yaml"),
    set_: Overrides = None,
    space: Annotated[
        str, typer.Option(help="feature space: classifier or inception")
    ] = "classifier",
) -> None:
    """Stage fid-reference: test-set features of one FID feature space (computed once)."""
    from bam_vae.stages.fid_reference import reference

    reference(_params(params, set_), space)


@app.command("compute-fid")
@stage
def compute_fid(params: ParamsFile = Path("params.yaml"), set_: Overrides = None) -> None:
    """Stage compute-fid: FID, floor, KID and class metrics of the generated images."""
    from bam_vae.stages.compute_fid import compute

    compute(_params(params, set_))


@app.command()
@stage
def tsne(params: ParamsFile = Path("params.yaml"), set_: Overrides = None) -> None:
    """Stage tsne: latent means of unseen test images, projected to 2-D and coloured by class."""
    from bam_vae.stages.tsne import tsne as run

    run(_params(params, set_))


@app.command()
@stage
def robustness(params: ParamsFile = Path("params.yaml"), set_: Overrides = None) -> None:
    """Stage robustness: reconstructions of pure noise and out-of-distribution metrics."""
    from bam_vae.stages.robustness import robustness as run

    run(_params(params, set_))


@app.command()
@stage
def inspect(params: ParamsFile = Path("params.yaml"), set_: Overrides = None) -> None:
    """Stage inspect: nearest training images and memorisation, interpolations, traversals."""
    from bam_vae.stages.inspect import inspect as run

    run(_params(params, set_))


@app.command()
@command
def report(
    sweep: Annotated[str | None, typer.Option(help="only runs with this sweep tag")] = None,
    exp: Annotated[
        list[str] | None, typer.Option(help="only these DVC experiment names (repeatable)")
    ] = None,
    query: Annotated[
        str | None, typer.Option(help="MLflow search filter, e.g. \"params.model.arch = 'cnn'\"")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="only runs of this dataset (e.g. mnist, fashion-mnist)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output folder [default: reports/ in the project root]")
    ] = None,
) -> None:
    """Compare runs from the MLflow store: table (CSV, Markdown) and Figures 2, 5, 6a, 6b
    (one curve per dataset, architecture and sampler)."""
    from bam_vae.paths import REPORTS, project_root
    from bam_vae.reporting.report import report as run

    # From a subfolder too: the store is the project's, so its report goes beside it.
    out_dir = out or project_root() / REPORTS
    run(sweep=sweep, exp_names=exp, query=query, out_dir=out_dir, dataset=dataset)


@app.command()
@command
def promote(
    space: Annotated[str, typer.Option(help="FID feature space to rank by")] = "classifier",
    alias: Annotated[str, typer.Option(help="registry alias to set")] = "champion",
    sampler: Annotated[
        str, typer.Option(help="rank by the FID of this sampler: prior, gmm, two-stage or pixelcnn")
    ] = "gmm",
) -> None:
    """Set the alias `champion` on the lowest-FID registered version of each architecture
    and dataset (bam-vae-<arch> for MNIST, bam-vae-<dataset>-<arch> otherwise)."""
    from bam_vae.tracking.registry import promote as run

    run(space, alias, sampler)


@app.command()
@command
def ui(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000,
) -> None:
    """Start the MLflow UI on the project's store, bound to 127.0.0.1."""
    from bam_vae.tracking.server import serve_ui

    serve_ui(port)


@app.command()
@command
def serve(
    model: Annotated[
        str, typer.Option(help="registered version: models:/bam-vae-cnn@champion, .../3")
    ] = "models:/bam-vae-cnn@champion",
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5001,
    workers: Annotated[int, typer.Option(min=1, help="server worker processes")] = 1,
) -> None:
    """Serve a registered version over HTTP (MLflow's scoring server): POST /invocations."""
    from bam_vae.tracking.server import serve_model

    serve_model(model, port, workers)


@app.command()
@command
def server(
    db: Annotated[
        str | None,
        typer.Option(help="backend store: postgresql://USER@HOST/DB, its password from ~/.pgpass"
                     " or PGPASSWORD (or $BAM_SERVER_DB)"),
    ] = None,
    artifacts: Annotated[
        str, typer.Option(help="where the server keeps artifacts: a folder or s3://bucket/path")
    ] = "mlflow-artifacts",
    host: Annotated[str, typer.Option(help="address to bind (127.0.0.1: this machine only;"
                                      " another needs --auth and TLS)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 5000,
    workers: Annotated[int, typer.Option(min=1, help="server worker processes")] = 2,
    auth: Annotated[bool, typer.Option(help="MLflow's basic-auth app: users, passwords and"
                                       " permissions (docs/team.md)")] = False,
    auth_db: Annotated[
        str | None,
        typer.Option(help="--auth: the database of users and permissions, its own beside --db"
                     " (or $BAM_SERVER_AUTH_DB; or MLflow's ini in $MLFLOW_AUTH_CONFIG_PATH)"),
    ] = None,
    default_permission: Annotated[
        str, typer.Option(help="--auth: what members may do where nobody granted them more:"
                          " READ | USE | EDIT | MANAGE | NO_PERMISSIONS")
    ] = "NO_PERMISSIONS",
    ssl_certfile: Annotated[
        str | None, typer.Option(help="TLS certificate (PEM): serve HTTPS")
    ] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="TLS private key (PEM)")] = None,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(help="host names clients may use, comma-separated (MLflow's host check;"
                     " default: localhost and private addresses)"),
    ] = None,
    cors_allowed_origins: Annotated[
        str | None, typer.Option(help="origins of other web apps that may call it (MLflow's CORS)")
    ] = None,
    trusted_network: Annotated[
        bool, typer.Option(help="allow a non-loopback --host without --auth or TLS: a private"
                           " network you trust")
    ] = False,
) -> None:  # fmt: skip
    """Start a team's MLflow tracking server: PostgreSQL backend, proxied artifacts, and with
    --auth MLflow's basic-auth app (TLS with --ssl-certfile/--ssl-keyfile)."""
    from bam_vae.tracking.server import ServerOptions, serve

    serve(ServerOptions(db, artifacts, host, port, workers, auth, auth_db, default_permission,
                        ssl_certfile, ssl_keyfile, allowed_hosts, cors_allowed_origins,
                        trusted_network))  # fmt: skip


@app.command()
@command
def sweep(
    space: Annotated[
        list[str],
        typer.Option("--set-param", "-S", help="KEY=V, KEY=V1,V2, KEY=choice(..),"
                     " KEY=range(START,STOP[,STEP]), KEY=interval(LOW,HIGH),"
                     " KEY='tag(log, interval(LOW,HIGH))' (Hydra's grammar; repeatable)"),
    ],
    trials: Annotated[
        int | None,
        typer.Option(help="finished trials the study ends with [default: the grid's size]"),
    ] = None,
    metric: Annotated[
        str, typer.Option(help="what the study optimises: a key of metrics/*.json")
    ] = "fid_classifier",
    direction: Annotated[str, typer.Option(help="minimize | maximize")] = "minimize",
    sampler: Annotated[
        str | None,
        typer.Option(help="tpe | random | grid [default: grid without --trials, else tpe]"),
    ] = None,
    pruner: Annotated[str, typer.Option(help="none | median | hyperband | asha")] = "none",
    prune_on: Annotated[
        str, typer.Option(help="train's per-epoch value the pruner compares (lower is better)")
    ] = "test_loss",
    warmup: Annotated[int, typer.Option(help="epochs before a trial may be pruned")] = 1,
    startup: Annotated[
        int, typer.Option(help="median pruner: trials that finish before any is pruned")
    ] = 5,
    seed: Annotated[int, typer.Option(help="the sampler's seed")] = 0,
    storage: Annotated[
        str | None,
        typer.Option(help="the study's storage: postgresql://... to share it across machines"
                     " [default: $BAM_STUDY_STORAGE, else .cache/sweeps/optuna.journal]"),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster: auto or HOST:PORT of `ray start --head` (default: a new"
                     " local Ray instance on 127.0.0.1)"),
    ] = None,
    num_cpus: Annotated[float, typer.Option(help="CPUs per trial (Ray resource)")] = 1.0,
    num_gpus: Annotated[float, typer.Option(help="GPUs per trial (Ray resource)")] = 0.0,
    trusted_network: Annotated[
        bool,
        typer.Option(help="allow an --address cluster without Ray's token auth: a private"
                     " network you trust"),
    ] = False,
    name: Annotated[
        str | None,
        typer.Option(help="the study: its name, MLflow tag and experiments NAME-<trial>; the"
                     " same name again resumes or joins it (default: sweep-YYYYmmdd-HHMMSS)"),
    ] = None,
) -> None:  # fmt: skip
    """A grid or a search (Optuna: TPE, pruning) of DVC experiments of the committed code,
    each trial a Ray task; resumable, and other machines can join it."""
    from bam_vae.sweep.study import sweep as run

    run(space, trials, metric=metric, direction=direction, sampler=sampler, pruner=pruner,
        prune_on=prune_on, warmup=warmup, startup=startup, seed=seed, storage=storage,
        address=address, num_cpus=num_cpus, num_gpus=num_gpus, name=name,
        trusted_network=trusted_network)  # fmt: skip


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
