"""The registered model: a VAE's decoder and the samplers fitted for it, as an MLflow pyfunc.

Every registered version (``models:/bam-vae-<arch>/<n>``) is this wrapper, logged with
MLflow's models-from-code (``serving/model_code.py``) and this package's code, so it loads
without unpickling anything and without bam-vae installed:

- ``model.json`` and ``weights.npz`` (the VAE's config and state dict; ``allow_pickle=False``)
  and ``model.sha256`` (the digest of the ``models/vae.pt`` they come from);
- ``samplers/<kind>.npz``: every sampler ``fit-sampler`` fitted for the model (added to the
  version when it runs), and ``samplers/default.json`` naming the one the pipeline used.

``predict`` takes a DataFrame with one row per request and returns their images, float32
(N x 28 x 28) in [0, 1], the rows' images one after the other. Columns: ``n`` (images,
1..``MAX_N``), ``seed`` (int >= 0), optional ``sampler`` (one of the version's; default
``samplers/default.json``), ``class`` (conditional models only: a class index 0..K-1 or a
class name of the version's dataset; ``digit`` is the same column for MNIST), ``latents`` (n lists
of ``z_dim`` floats, or 7 x 7 code grids for ``vqvae``: decoded as they are). Same request,
same images: latents are drawn on the CPU by :func:`bam_vae.samplers.sample` with the
request's seed, exactly as stage ``generate-1024`` draws them.

Device: the machine's (CUDA where there is one), or ``model_config={"device": "cpu"}`` at
load time; weights are always read on the CPU and then moved.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

MAX_N = 4096  # images per request row: 4096 x 28 x 28 floats is ~13 MB of JSON per 1 000
# Images per request, all rows together: bounds one request's work and reply (~50 MB of JSON)
# so a client cannot make a worker compute past the HTTP timeout.
MAX_REQUEST = 4096


def bad_request(message: str) -> MlflowException:
    """HTTP 400 from ``mlflow models serve``, with ``message`` as the error's last line."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _integer(row: dict, key: str, low: int, high: int | None = None) -> int:
    value = row.get(key)
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value, ok = int(value), True  # JSON numbers arrive as floats when a column has NaNs
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise bad_request(f"{key}: {value!r} is not allowed; expected {allowed}")
    return int(value)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """A registered VAE version as a generator of images (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from bam_vae.models.saved import build_saved

        model_json = Path(context.artifacts["model"])
        root = model_json.parent
        with np.load(context.artifacts["weights"], allow_pickle=False) as arrays:
            state = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        vae = build_saved(json.loads(model_json.read_text()))
        vae.load_state_dict(state)
        wanted = (context.model_config or {}).get("device")
        device = wanted or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = vae.eval().to(device)
        # Versions registered before other datasets existed are MNIST's.
        dataset = Path(context.artifacts.get("dataset", root / "absent.json"))
        info = json.loads(dataset.read_text()) if dataset.is_file() else {}
        self.dataset = info.get("name", "mnist")
        self.classes = list(info.get("classes", [str(d) for d in range(10)]))
        digest = Path(context.artifacts["digest"]).read_text()
        self.samplers = self._load_samplers(root / "samplers", digest)
        default = root / "samplers" / "default.json"
        self.default = json.loads(default.read_text())["sampler"] if default.is_file() else "prior"

    def _load_samplers(self, folder: Path, digest: str) -> dict[str, Any]:
        """``prior``, and each sampler in ``folder`` (checked to be fitted to this model)."""
        from bam_vae.config import GenerateConfig
        from bam_vae.samplers import load_sampler, sampler_for

        samplers = {"prior": sampler_for(GenerateConfig(sampler="prior"), self.vae)}
        for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            samplers[path.stem] = load_sampler(path, path.stem, digest)
        return samplers

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> np.ndarray:
        if not isinstance(model_input, pd.DataFrame) or model_input.empty:
            raise bad_request("input: expected one or more rows with columns n and seed")
        rows = model_input.to_dict("records")
        total = sum(_count(row) for row in rows)
        if total > MAX_REQUEST:
            field = "latents" if any(_given(row.get("latents")) for row in rows) else "n"
            raise bad_request(
                f"{field}: the request asks for {total} images in {len(rows)} rows; expected at"
                f" most {MAX_REQUEST} per request (send several requests)"
            )
        return np.concatenate([self._generate(row) for row in rows]).astype(np.float32)

    def _generate(self, row: dict) -> np.ndarray:
        from bam_vae.samplers import sample, sample_labels

        label = self._label(row)
        labels = None
        latents = row.get("latents")
        if _given(latents):
            return self._decode(latents, label)
        n = _integer(row, "n", 1, MAX_N)
        seed = _integer(row, "seed", 0)
        kind = row.get("sampler")
        kind = self.default if _missing(kind) else kind
        if kind not in self.samplers:
            raise bad_request(f"sampler: {kind!r} is not fitted for this version; expected one"
                              f" of {', '.join(self.samplers)}")  # fmt: skip
        if self.vae.conditional:
            labels = sample_labels(n, seed, label, len(self.classes))
        return sample(self.vae, self.samplers[kind], n, seed, labels)[:, 0].numpy()

    def _label(self, row: dict) -> int | None:
        """The ``class`` asked for (``digit`` for MNIST), as an index; None if not given."""
        given = [key for key in ("class", "digit") if not _missing(row.get(key))]
        if not given:
            return None
        key = given[0]
        if len(given) == 2:
            raise bad_request("digit: give class or digit, not both; expected one of them")
        if key == "digit" and self.dataset != "mnist":
            raise bad_request(f"digit: only for MNIST; this {self.dataset} model takes class")
        if not self.vae.conditional:
            name = type(self.vae).__name__
            raise bad_request(f"{key}: not allowed for {name}; expected no {key} (only cvae)")
        value = row[key]
        if isinstance(value, str) and value in self.classes:
            return self.classes.index(value)
        if isinstance(value, str) and key == "class":
            names = ", ".join(self.classes[:12]) + (", ..." if len(self.classes) > 12 else "")
            raise bad_request(
                f"class: {value!r} is not a class; expected an index or one of {names}"
            )
        return _integer(row, key, 0, len(self.classes) - 1)

    @torch.no_grad()
    def _decode(self, latents: Any, label: int | None) -> np.ndarray:
        codes = self.vae.latent_kind == "codes"
        try:
            with np.errstate(over="ignore"):  # 1e39 becomes inf: refused below, by name
                z = np.asarray(_nested(latents), dtype=np.int64 if codes else np.float32)
            z = torch.as_tensor(z)
        except (TypeError, ValueError, OverflowError):
            z = None
        shape = "(n, 7, 7) integer codes" if codes else f"(n, {self.vae.z_dim}) floats"
        good = z is not None and z.dim() >= 2 and 1 <= len(z) <= MAX_N
        good = good and (z.shape[1:] == (7, 7) if codes else z.shape[1:] == (self.vae.z_dim,))
        if good and codes:
            good = int(z.min()) >= 0 and int(z.max()) < len(self.vae.quantizer.codebook)
        if not good:
            raise bad_request(f"latents: expected {shape}, at most {MAX_N} of them")
        if not codes and not torch.isfinite(z).all():  # JSON parsers take NaN and Infinity
            raise bad_request(
                "latents: a value that is not a number, infinite or beyond float32's range"
                " (3.4e38) is not allowed; expected finite float32 values"
            )
        if self.vae.conditional:
            if label is None:
                raise bad_request("class: required with latents for a conditional model")
            labels = torch.full((len(z),), label, dtype=torch.int64, device=self.vae.device)
        else:
            labels = None
        z = self.vae.embed_codes(z) if codes else z.to(self.vae.device)
        images = torch.sigmoid(self.vae.decode(z, labels)).cpu()[:, 0].numpy()
        if not np.isfinite(images).all():  # a reply never holds NaN (not JSON for strict clients)
            raise bad_request(
                "latents: values this large overflow the decoder (its pixels are not finite);"
                " expected latents of the scale the sampler draws (a few units)"
            )
        return images


def _given(latents: Any) -> bool:
    return latents is not None and not (isinstance(latents, float) and math.isnan(latents))


def _count(row: dict) -> int:
    """Images a request row asks for (its own checks come later, in ``_generate``)."""
    latents = row.get("latents")
    if _given(latents):
        return len(latents) if hasattr(latents, "__len__") else 0
    return _integer(row, "n", 1, MAX_N)


def _nested(value: Any) -> Any:
    """Lists of lists, whatever JSON/pandas made of them (numpy object arrays included)."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_nested(v) for v in value]
    return value
