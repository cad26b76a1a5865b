"""Serving a registered version for real: `bam serve` (MLflow's scoring server) on 127.0.0.1, HTTP
requests from here, the pipeline's own images back, 400s for bad requests, nothing left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import SERVE_DEADLINE, bam_serve, post, tiny_params
from helpers import served_images as images

from bam_vae.stages.fit_sampler import fit_sampler
from bam_vae.stages.generate import generate
from bam_vae.stages.train import fit

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def served(tiny_mnist, tmp_path_factory):
    """A tiny CNN trained, its gmm fitted and 1024 images generated; `bam serve` of it, one
    server for every test here (each only asks it things)."""
    project = tmp_path_factory.mktemp("served")
    (project / "dvc.yaml").write_text("stages: {}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "BAM_ARTIFACT_ROOT"):
            mp.delenv(var, raising=False)
        params = tiny_params(tiny_mnist, train={"epochs": 1},
                             generate={"n": 1024, "gmm": {"components": 3}})  # fmt: skip
        fit(params)
        fit_sampler(params)
        generate(params)
        with bam_serve("models:/bam-vae-cnn/1", project) as port:
            yield port, project


def test_a_served_version_answers_with_the_pipelines_digits(served):
    port, project = served
    first = images(port, n=16, seed=0)
    assert first.shape == (16, 28, 28) and 0 <= first.min() <= first.max() <= 1
    np.testing.assert_array_equal(images(port, n=16, seed=0), first)  # same seed, same images
    assert not np.array_equal(images(port, n=16, seed=1), first)
    # The pipeline's 1 024 images: same sampler (the version's default, gmm), same seed.
    pipeline = np.load(project / "data/generated/images.npy")
    np.testing.assert_allclose(images(port, n=1024, seed=0), pipeline, atol=1e-6)
    assert images(port, n=4, seed=0, sampler="prior").shape == (4, 28, 28)
    z = np.zeros((3, 4)).tolist()
    assert images(port, latents=z).shape == (3, 28, 28)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": 0, "seed": 0}, "n"),
        ({"n": 5000, "seed": 0}, "n"),
        ({"n": 4, "seed": 1.5}, "seed"),
        ({"n": 4, "seed": -1}, "seed"),
        ({"n": 4, "seed": 0, "sampler": "two-stage"}, "sampler"),
        ({"n": 4, "seed": 0, "digit": 3}, "digit"),
        ({"latents": [[0.0, 1.0]]}, "latents"),
        ({"seed": 0}, "n"),
    ],
)
def test_bad_requests_are_400s_naming_the_field_and_the_server_survives(served, body, field):
    port, _ = served
    status, reply = post(port, json.dumps({"dataframe_records": [body]}).encode())
    assert status == 400, reply
    last = reply["message"].splitlines()[-1]
    assert last.startswith(f"Error: {field}:") and "expected" in last, last
    status, reply = post(port, b'{"dataframe_records": [{"n": 2,')  # malformed JSON
    assert status == 400, reply
    assert images(port, n=2, seed=0).shape == (2, 28, 28)  # still serving


@pytest.mark.parametrize(
    "first",
    [
        "NaN, 0.0, 0.0, 0.0",
        "Infinity, 0, 0, 0",
        "-Infinity, 0, 0, 0",
        "1e39, 0, 0, 0",
        "3e38, -3e38, 3e38, -3e38",
    ],  # fmt: skip
)  # the last: float32 values, whose sums overflow the decoder to inf - inf
def test_non_finite_latents_are_400s_and_no_reply_holds_nan(served, first):
    """mlflow#4897: Python's JSON reader takes NaN and Infinity, float32 overflows past 3.4e38;
    neither may reach the decoder nor come back as NaN in a reply."""
    import urllib.request

    port, _ = served
    row = f"[[{first}], [0.0, 0.0, 0.0, 0.0]]"
    bodies = [(f'{{"dataframe_records": [{{"latents": {row}}}]}}', "application/json"),
              (f'latents\n"{row}"\n', "text/csv")]  # fmt: skip
    for body, kind in bodies:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": kind}
        )
        with pytest.raises(urllib.error.HTTPError) as reply:
            urllib.request.urlopen(request, timeout=60)
        raw = reply.value.read().decode()
        assert reply.value.code == 400, raw
        assert "NaN" not in raw and "Infinity" not in raw
        last = json.loads(raw)["message"].splitlines()[-1]
        assert last.startswith("Error: latents:") and "expected" in last, last
    assert images(port, n=2, seed=0).shape == (2, 28, 28)  # still serving


def test_csv_requests_get_the_same_images_and_the_same_errors_as_json(served):
    port, _ = served
    status, reply = post(port, b"n,seed,sampler\r\n16,0,\r\n4,1,prior\r\n", "text/csv")
    assert status == 200, reply
    both = np.asarray(reply["predictions"], dtype=np.float32)
    np.testing.assert_array_equal(both[:16], images(port, n=16, seed=0))
    np.testing.assert_array_equal(both[16:], images(port, n=4, seed=1, sampler="prior"))
    z = np.zeros((2, 4)).tolist()
    status, reply = post(port, f'latents\n"{json.dumps(z)}"\n'.encode(), "text/csv; charset=utf-8")
    assert status == 200, reply
    np.testing.assert_array_equal(reply["predictions"], images(port, latents=z))
    # A bad value: the generator's own one-line error, as for JSON.
    status, reply = post(port, b"n,seed\n4,1.5\n", "text/csv")
    assert status == 400
    assert reply["message"].splitlines()[-1] == (
        "Error: seed: 1.5 is not allowed; expected an integer >= 0"
    )
    # Not CSV with a header and rows: one line naming what was expected.
    for body, expected in [
        (b"n,seed\n4\n", "text/csv: line 2 has 1 cells; expected 2, one per column"),
        (b"n,seed\n", "text/csv: expected a header line of column names"),
        (b"n\n\xff\n", "text/csv: the body is not UTF-8"),
    ]:
        status, reply = post(port, body, "text/csv")
        assert status == 400 and reply["message"].startswith(expected), reply
        assert "\n" not in reply["message"]
    assert images(port, n=2, seed=0).shape == (2, 28, 28)  # still serving


def test_a_request_over_the_total_cap_is_refused_before_any_work(served):
    # Each row within the per-row cap, 32 768 images together: refused up front, in one line
    # naming the field and the cap, instead of computing past the HTTP timeout.
    port, _ = served
    rows = [{"n": 4096, "seed": s} for s in range(8)]
    status, reply = post(port, json.dumps({"dataframe_records": rows}).encode())
    assert status == 400, reply
    assert reply["message"].splitlines()[-1] == (
        "Error: n: the request asks for 32768 images in 8 rows; expected at most 4096 per"
        " request (send several requests)"
    )
    latents = [{"latents": np.zeros((4096, 4)).tolist()}, {"latents": np.zeros((1, 4)).tolist()}]
    status, reply = post(port, json.dumps({"dataframe_records": latents}).encode())
    assert status == 400 and "latents: the request asks for 4097 images" in reply["message"]
    assert images(port, n=2, seed=0).shape == (2, 28, 28)  # still serving


def test_readmes_python_client_saves_a_grid_of_the_served_digits(served):
    port, project = served
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- serving-client -->")[1].split("```python\n")[1].split("```")[0]
    client = project / "client.py"
    client.write_text(block.replace("127.0.0.1:5001", f"127.0.0.1:{port}"))
    subprocess.run([sys.executable, str(client)], cwd=project, check=True, timeout=SERVE_DEADLINE)
    from PIL import Image

    grid = np.asarray(Image.open(project / "digits.png"))
    assert grid.shape == (112, 112) and grid.dtype == np.uint8
    top_left = np.round(images(port, n=16, seed=0)[0] * 255)
    np.testing.assert_array_equal(grid[:28, :28], top_left)
