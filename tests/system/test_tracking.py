"""``run --track`` and ``hica-bench track``: a real tiny grid (real BreastMNIST, the pixels test encoder) tracked to a
local MLflow store, to a real MLflow tracking server started on loopback by the test, and to W&B offline run files
read back record by record. Each side is read with the tracker's own client (or its file format), never ours."""

import hashlib
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, TEST_PLUGINS

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'hica-bench[mlflow]')")
from mlflow import MlflowClient  # noqa: E402


def _run(medmnist_root, cache, out, *extra):
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TEST_PLUGINS))
        return invoke("-p", "pixel_encoder", "run", "--no-report", "--encoder", "pixels", "--datasets", "breastmnist",
                      "--methods", "prototype,zero-shot", "--shots", "1", "--seeds", "0,1", "--data-root",
                      medmnist_root, "--cache-dir", cache, "--out", out, "--save-predictions", *extra)


@pytest.fixture(scope="module")
def grid(medmnist_root, tmp_path_factory):
    """A finished grid tracked by the run itself to the local MLflow store and to W&B offline: 2 prototype cells (ok,
    predictions saved) and 2 zero-shot cells (not applicable: the pixel encoder has no text side)."""
    root = tmp_path_factory.mktemp("track")
    code, out, err = _run(medmnist_root, root / "cache", root / "grid", "--track", "mlflow", "--track", "wandb",
                          "--experiment", "tiny-suite")
    assert code == 0, err
    records = [json.loads(line) for line in (root / "grid" / "results.jsonl").read_text().splitlines()]
    return root, records, out


def _by_cell(client, experiment):
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {r.data.tags["hica_bench.cell_id"]: r for r in runs if "hica_bench.cell_id" in r.data.tags}, \
        [r for r in runs if r.data.tags.get("hica_bench.kind") == "grid"]


def _check_mlflow(client, experiment, records, folder):
    cells, parents = _by_cell(client, experiment)
    assert len(parents) == 1 and parents[0].info.run_name == folder.name
    assert set(cells) == {r["cell_id"] for r in records}
    for record in records:
        run = cells[record["cell_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["hica_bench.status"] == record["status"]
        assert run.data.tags["hica_bench.origin_id"] == record["origin_id"]
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["cell_id"] == record["cell_id"] and params["identity.support"] == record["identity"]["support"]
        assert params["identity.origin.method.name"] == record["key"]["method"]
        assert params["identity.origin.features.encoder"] == record["identity"]["origin"]["features"]["encoder"]
        if record["status"] == "ok":
            for name in ("acc", "auc", "f1_macro", "balanced_acc", "ece"):
                assert run.data.metrics[name] == pytest.approx(record["metrics"][name])
            for i, recall in enumerate(record["per_class"]["recall"]):
                assert run.data.metrics[f"per_class.recall.{i}"] == pytest.approx(recall)
            (folder.parent / "dl" / run.info.run_id).mkdir(parents=True, exist_ok=True)
            saved = Path(client.download_artifacts(run.info.run_id, "predictions", str(folder.parent / "dl" / run.info.run_id)))
            (npz,) = saved.glob("*.npz")
            assert npz.read_bytes() == (folder / record["predictions"]).read_bytes()
        else:
            assert run.data.tags["hica_bench.reason"] == record["reason"] and "acc" not in run.data.metrics
    report = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"leaderboard.md", "leaderboard.csv"} <= report
    return cells


def test_run_tracks_the_grid_to_a_local_mlflow_store(grid):
    root, records, out = grid
    assert "tracked to mlflow" in out and "4 runs created" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'grid' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-suite")
    _check_mlflow(client, experiment, records, root / "grid")


def test_tracking_again_creates_no_duplicates_and_a_rerun_updates_its_runs(grid, medmnist_root):
    root, records, _ = grid
    code, out, err = invoke("track", root / "grid", "--to", "mlflow", "--to", "wandb", "--experiment", "tiny-suite")
    assert code == 0, err
    assert out.count("0 runs created, 0 updated, 4 already tracked") == 2
    # seed 0 again (--force): its two cells' runs are updated in place, none added
    code, out, err = _run(medmnist_root, root / "cache", root / "grid", "--seeds", "0", "--force", "--track", "mlflow",
                          "--experiment", "tiny-suite")
    assert code == 0, err
    assert "0 runs created, 2 updated, 2 already tracked" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'grid' / 'mlflow' / 'mlflow.db'}")
    cells, parents = _by_cell(client, client.get_experiment_by_name("tiny-suite"))
    assert len(cells) == 4 and len(parents) == 1
    assert len(client.search_runs([client.get_experiment_by_name("tiny-suite").experiment_id])) == 5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_track_to_a_real_mlflow_server_on_loopback(grid, tmp_path):
    root, records, _ = grid
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              # the server's job runner (a dozen huey workers) is not needed to track runs
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        code, out, err = invoke("track", root / "grid", "--to", f"mlflow:{uri}")
        assert code == 0, err
        assert "4 runs created" in out and f"{uri}/#/experiments/" in out
        client = MlflowClient(tracking_uri=uri)
        _check_mlflow(client, client.get_experiment_by_name("grid"), records, root / "grid")  # named after the folder
        code, out, err = invoke("track", root / "grid", "--to", f"mlflow:{uri}")
        assert code == 0 and "0 runs created, 0 updated, 4 already tracked" in out
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        server.wait(timeout=30)


def test_bad_tracking_input_is_one_line_before_any_cell(grid, medmnist_root, tmp_path):
    root, _, _ = grid
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    code, out, err = _run(medmnist_root, root / "cache", tmp_path / "unreached", "--track", f"mlflow:http://127.0.0.1:{port}")
    assert time.monotonic() - started < 5
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot reach the MLflow tracking server" in err
    assert not (tmp_path / "unreached" / "results.jsonl").exists()
    for bad, says in (("wandb:x", "takes no URI"), ("neptune", "a tracker is mlflow"), ("mlflow:", "needs a URI")):
        code, _, err = _run(medmnist_root, root / "cache", tmp_path / "bad", "--track", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "bad").exists()
    code, _, err = invoke("track", root / "grid", "--to", "mlflow", "--experiment", "x\ny")
    assert code == 2 and "--experiment" in err
    with pytest.MonkeyPatch.context() as patch:  # the extra not installed: its import fails as it would
        patch.setitem(sys.modules, "wandb", None)
        code, _, err = invoke("track", root / "grid", "--to", "wandb")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install 'hica-bench[wandb]'" in err


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-ID.wandb``), written by wandb-core in LevelDB's log format: a 7-byte
    header (``:W&B``, magic, version), then 32 KiB blocks of chunks (CRC, length, type: full/first/middle/last).
    Hand-written here because wandb 0.2x+ no longer ships a Python reader of it."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's trailer too short for a chunk header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_files_hold_the_mapping(grid):
    root, records, _ = grid
    runs = {}
    for path in (root / "grid" / "wandb").glob("offline-run-*/run-*.wandb"):
        run, summary, artifacts = None, {}, []
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "summary":
                summary.update({u.key: json.loads(u.value_json) for u in record.summary.update if u.key})
            elif kind == "artifact":
                artifacts.append(record.artifact)
        runs[run.run_id] = (run, summary, artifacts)
    grid_runs = [r for r in runs.values() if r[0].job_type == "grid"]
    assert len(grid_runs) == 1 and grid_runs[0][0].project == "tiny-suite"
    assert {"leaderboard.md", "leaderboard.csv"} <= {e.path for a in grid_runs[0][2] for e in a.manifest.contents}
    for record in records:
        run, summary, artifacts = runs[record["cell_id"]]  # the W&B run id is the cell id
        assert run.project == "tiny-suite" and run.run_group == "grid" and run.job_type == "cell"
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["identity"] == record["identity"] and config["cell_id"] == record["cell_id"]
        assert config["tags"]["hica_bench.status"] == record["status"] and record["status"] in run.tags
        if record["status"] == "ok":
            assert summary["acc"] == pytest.approx(record["metrics"]["acc"])
            assert summary["per_class.precision.1"] == pytest.approx(record["per_class"]["precision"][1])
            (entry,) = [e for a in artifacts if a.type == "predictions" for e in a.manifest.contents]
            file = root / "grid" / record["predictions"]
            assert entry.digest == base64.b64encode(hashlib.md5(file.read_bytes()).digest()).decode()
            assert np.load(entry.local_path, allow_pickle=False)["proba"].shape[0] == record["n_test"]
        else:
            assert "acc" not in summary and config["tags"]["hica_bench.reason"] == record["reason"]
