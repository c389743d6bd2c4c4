"""``repux serve`` and ``repux segment --server``: a real server process on loopback, real uploads and jobs.

Same result as a local run, authentication, upload limits, bad input, hostile file names,
concurrent clients and the queue limit, cancel, a server killed mid-job and restarted.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from repux.cli import main
from repux.data.phantoms import make_phantom
from repux.imageio import read_volume, write_volume
from repux.serve.client import ServerClient, ServerError
from infer_support import save_tiny_bundle
from serve_support import job_processes, start_server, wait_until

MAX_QUEUED = 1
UPLOAD_LIMIT_MB = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny bundle at 8 mm: small phantoms fit one or two windows (a job takes about a second)."""
    return save_tiny_bundle(tmp_path_factory.mktemp("model") / "tiny", spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny):
    running = start_server(
        tmp_path_factory.mktemp("server"), ["demo", str(tiny)], "--max-queued", str(MAX_QUEUED), "--max-upload-mb", str(UPLOAD_LIMIT_MB)
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def no_jobs_left_to_the_next_test(request):
    """After a test on the shared server, delete whatever jobs it left, so one failure cannot cascade
    through the per-token queue limit into the next tests (each test asserts its own clean-up itself)."""
    yield
    if "server" not in request.fixturenames:
        return
    running = request.getfixturevalue("server")
    client = running.client()
    for job in client._json("GET", "/v1/jobs")["jobs"]:
        if job["state"] in ("queued", "running"):
            client.cancel(job["id"])
        wait_until(lambda: client.status(job["id"]).get("state") not in ("queued", "running"), 30, what="leftover job ended")
        client.delete(job["id"])


def phantom_file(folder: Path, seed: int, shape=(40, 36, 24), name: str | None = None) -> Path:
    image, _ = make_phantom(seed, shape=shape)
    return write_volume(image, folder / (name or f"case{seed}.nrrd"))


def raw_request(server, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """(status, JSON answer) of one request, with exactly the headers given."""
    host, port = server.url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_same_labels_and_progress_as_a_local_run(server, tmp_path, capsys):
    # 160 x 160 x 120 mm of a phantom's abdomen, every organ in it: one window of the demo model.
    image = write_volume(make_phantom(5, shape=(32, 32, 24), spacing=(5.0, 5.0, 5.0))[0], tmp_path / "case5.nrrd")
    assert main(["segment", str(image), "-o", str(tmp_path / "local.seg.nrrd"), "--device", "cpu", "--progress", "none"]) == 0
    capsys.readouterr()
    remote = tmp_path / "remote.seg.nrrd"
    argv = ["segment", str(image), "-o", str(remote), "--server", server.url, "--token-file", str(server.token_file)]
    assert main([*argv, "--progress", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    local, served = read_volume(tmp_path / "local.seg.nrrd"), read_volume(remote)
    assert served.array.dtype == local.array.dtype
    np.testing.assert_array_equal(served.array, local.array)
    assert served.same_geometry(local, tol=1e-9)
    assert set(np.unique(local.array)) == {0, 1, 2, 3, 4}  # the comparison is about real labels
    infer = [r for r in records if r.get("stage") == "infer" and "done" in r]
    assert infer[0]["done"] == 0 and infer[-1]["done"] == infer[-1]["total"] > 0
    assert records[-1] == {"stage": "done", "outputs": [str(remote)], "skipped": []}
    assert not any(str(server.work_dir) in json.dumps(r) for r in records)  # no server path reaches the client
    assert server.job_files() == []  # downloaded and deleted


def test_every_endpoint_but_health_needs_a_valid_token(server, tmp_path):
    image = phantom_file(tmp_path, 6).read_bytes()
    valid = server.client()
    before = valid._json("GET", "/v1/jobs")["jobs"]
    job = "0" * 32
    calls = [
        ("GET", "/v1/info", None),
        ("GET", "/v1/models", None),
        ("GET", "/v1/jobs", None),
        ("POST", f"/v1/jobs?model=demo&filename=case.nrrd", image),
        ("GET", f"/v1/jobs/{job}", None),
        ("GET", f"/v1/jobs/{job}/progress", None),
        ("POST", f"/v1/jobs/{job}/cancel", None),
        ("GET", f"/v1/jobs/{job}/result", None),
        ("DELETE", f"/v1/jobs/{job}", None),
        ("POST", "/v1/jobs", image),  # parameters missing: still 401, not a description of the API
        ("GET", "/v1/no-such-path", None),
    ]
    for headers in ({}, bearer("wrong-" + server.token), {"Authorization": f"Basic {server.token}"}, bearer("")):
        for method, path, body in calls:
            status, answer = raw_request(server, method, path, headers, body)
            assert status == 401, (method, path, headers)
            assert "token" in answer["error"]
    assert raw_request(server, "GET", "/health") == (200, {"status": "ok"})
    assert valid._json("GET", "/v1/jobs")["jobs"] == before
    assert server.job_files() == []
    assert job_processes(server.work_dir) == []


def test_added_token_works_and_revoked_token_stops_at_once(server):
    assert main(["serve", "--token-file", str(server.token_file), "--add-token"]) == 0
    added = server.token_file.read_text().split()[-1]
    assert server.client(added).info()["version"]
    assert main(["serve", "--token-file", str(server.token_file), "--revoke-token", added]) == 0
    with pytest.raises(ServerError) as refused:
        server.client(added).info()
    assert refused.value.status == 401
    assert server.client().info()["name"] == "repux"  # the other token is untouched
    assert (server.token_file.stat().st_mode & 0o777) == 0o600


def test_oversized_upload_is_refused_before_its_body_is_read(server):
    host, port = server.url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/jobs?model=demo&filename=big.nii.gz")
    connection.putheader("Authorization", f"Bearer {server.token}")
    connection.putheader("Content-Length", str(50 * 1024**2))
    connection.endheaders()  # and not one byte of the body
    response = connection.getresponse()
    assert response.status == 413
    assert "larger than this server takes" in json.loads(response.read())["error"]
    connection.close()

    # Without a length (chunked), the stream is cut at the limit and nothing is kept.
    chunks = (b"\0" * 65536 for _ in range(UPLOAD_LIMIT_MB * 16 + 8))
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/v1/jobs?model=demo&filename=big.nii.gz", body=chunks, headers=bearer(server.token), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before the client has sent everything; what matters is below
    finally:
        connection.close()
    assert server.job_files() == []


@pytest.mark.parametrize("kind", ["garbage", "constant"])
def test_bad_volume_gets_400_with_the_cli_message(server, tmp_path, tiny, capsys, kind):
    if kind == "garbage":
        path = tmp_path / "broken.nii.gz"
        path.write_bytes(b"\x1f\x8b" + b"not a volume" * 100)
    else:
        image, _ = make_phantom(2, shape=(20, 20, 12))
        path = write_volume(image.with_array(np.full(image.shape, 7, np.int16)), tmp_path / "flat.nrrd")
    assert main(["segment", str(path), "-o", str(tmp_path / "local.nii.gz"), "--model", str(tiny)]) == 2
    local_error = capsys.readouterr().err.strip().splitlines()[-1]
    argv = ["segment", str(path), "-o", str(tmp_path / "remote.nii.gz"), "--model", "tiny"]
    assert main([*argv, "--server", server.url, "--token-file", str(server.token_file), "--progress", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == local_error
    assert local_error.startswith(f"repux segment: error: {path}")

    status, answer = raw_request(server, "POST", f"/v1/jobs?model=tiny&filename={path.name}", bearer(server.token), path.read_bytes())
    assert status == 400
    assert f"repux segment: error: {answer['error']}" == local_error.replace(str(path), path.name)
    assert not (tmp_path / "remote.nii.gz").exists()
    assert server.job_files() == []


def test_file_names_and_job_ids_never_become_paths(server, tmp_path):
    body = phantom_file(tmp_path, 8, shape=(20, 20, 12)).read_bytes()
    client = server.client()
    outside = server.work_dir.parent
    before = sorted(outside.rglob("*"))
    for name in ("../../../escape.nrrd", "..\\..\\escape.nrrd", "/etc/passwd.nrrd"):
        query = "/v1/jobs?model=tiny&filename=" + __import__("urllib.parse").parse.quote(name)
        status, job = raw_request(server, "POST", query, bearer(server.token), body)
        assert status == 201, job
        assert "/" not in job["filename"] and "\\" not in job["filename"]
        folder = server.work_dir / "jobs" / job["id"]
        # A running job may be mid-way through an atomic write: ".job.tmp-PID-XXXXXXXX.json" is job.json's.
        names = {re.sub(r"^\.(.+)\.tmp-\d+-[0-9a-f]{8}(\..+)$", r"\1\2", p.name) for p in folder.iterdir()}
        assert names <= {"input.nrrd", "job.json", "records.jsonl", "stderr.log", "result.seg.nrrd"}
        client.delete(job["id"])
    for name in ("..", "../", "passwd"):
        status, answer = raw_request(server, "POST", f"/v1/jobs?model=tiny&filename={name}", bearer(server.token), body)
        assert status == 400 and "expected one of" in answer["error"]
    for job_id in ("..%2F..%2Ftokens", "..", "%2e%2e", "0" * 31 + "g"):
        status, _ = raw_request(server, "GET", f"/v1/jobs/{job_id}", bearer(server.token))
        assert status == 404
    wait_until(lambda: server.job_files() == [], 20, what="deleted jobs' files gone")
    assert [p for p in sorted(outside.rglob("*")) if p not in before and "work" not in p.relative_to(outside).parts] == []


def test_ten_concurrent_submissions_from_three_clients(server, tmp_path):
    tokens = [server.token]
    for _ in range(2):
        assert main(["serve", "--token-file", str(server.token_file), "--add-token"]) == 0
        tokens.append(server.token_file.read_text().split()[-1])
    # Each submission has its own grid, so a result can only match its own input.
    plan = [(tokens[i % 3], phantom_file(tmp_path, 20 + i, shape=(18 + i, 16, 10 + i))) for i in range(10)]
    outcomes: dict[int, object] = {}
    start = threading.Barrier(len(plan))

    def submit_and_fetch(index: int, token: str, image: Path) -> None:
        client = server.client(token, retry_s=30)
        start.wait()
        try:
            job = client.submit(image, "tiny", ".nii.gz")
        except ServerError as error:
            outcomes[index] = error.status
            return
        list(client.follow(job["id"]))
        outcomes[index] = client.download(job["id"], tmp_path / f"result{index}.nii.gz")
        client.delete(job["id"])

    threads = [threading.Thread(target=submit_and_fetch, args=(i, t, p)) for i, (t, p) in enumerate(plan)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 10
    refused = [i for i, outcome in outcomes.items() if outcome == 429]
    done = [i for i, outcome in outcomes.items() if isinstance(outcome, Path)]
    assert len(done) == 3 * MAX_QUEUED and len(refused) == 10 - 3 * MAX_QUEUED
    for token in tokens:  # the limit is per token: each got exactly its share
        assert sum(1 for i in done if plan[i][0] == token) == MAX_QUEUED
    for index in done:
        result, image = read_volume(outcomes[index]), read_volume(plan[index][1])
        assert result.same_geometry(image)
        assert set(np.unique(result.array)) <= {0, 1, 2, 3, 4}
    assert server.job_files() == []


def test_client_cancel_stops_the_server_job_and_frees_its_files(server, tmp_path):
    image = phantom_file(tmp_path, 9)
    output = tmp_path / "out.seg.nrrd"
    # A dense overlap: many windows, so the job is still running when the client cancels.
    command = [sys.executable, "-m", "repux", "segment", str(image), "-o", str(output), "--progress", "jsonl", "--overlap", "0.75"]
    command += ["--server", server.url, "--token-file", str(server.token_file)]
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in client.stdout:  # until the server's job is part-way through its windows
        record = json.loads(line)
        if record.get("stage") == "infer" and record.get("done", 0) > 0:
            break
    jobs = server.client()._json("GET", "/v1/jobs")["jobs"]
    assert [job["state"] for job in jobs] == ["running"]
    assert job_processes(server.work_dir)
    client.send_signal(signal.SIGINT)
    rest, error = client.communicate(timeout=30)
    assert client.returncode == 130 and "cancelled" in error
    assert json.loads(rest.splitlines()[-1]) == {"stage": "cancelled"}
    wait_until(lambda: not job_processes(server.work_dir), 20, what="job process ended")
    wait_until(lambda: server.job_files() == [], 10, what="job files removed")
    assert server.client()._json("GET", "/v1/jobs")["jobs"] == []
    assert list(tmp_path.glob("*out*")) == []


def test_server_killed_mid_job_then_restarted(tmp_path, tiny):
    """The client reports the loss; on restart the running job is reported lost and the queued one runs."""
    server = start_server(tmp_path / "server", ["demo", str(tiny)])
    try:
        running_image, queued_image = phantom_file(tmp_path, 11), phantom_file(tmp_path, 12, shape=(20, 18, 12))
        output = tmp_path / "out.seg.nrrd"
        command = [sys.executable, "-m", "repux", "segment", str(running_image), "-o", str(output), "--progress", "jsonl"]
        command += ["--overlap", "0.75"]  # many windows: still running when the server is killed
        command += ["--server", server.url, "--token-file", str(server.token_file), "--server-timeout", "2"]
        client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in client.stdout:
            if json.loads(line).get("stage") == "infer":
                break
        api = server.client()
        queued = api.submit(queued_image, "tiny", ".nii.gz")
        assert api.status(queued["id"])["state"] == "queued"
        running = next(job for job in api._json("GET", "/v1/jobs")["jobs"] if job["state"] == "running")
        server.kill()
        _, error = client.communicate(timeout=60)
        assert client.returncode == 2
        assert f"repux segment: error: {server.url}: no answer" in error and "no answer for 2 s" in error
        assert not output.exists() and [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
        # The orphaned job process dies with its server and leaves no partial result.
        wait_until(lambda: not job_processes(server.work_dir), 30, what="job process ended with its server")
        assert not [p for p in server.job_files() if p.name.startswith(("result", ".result"))]

        port = int(server.url.rsplit(":", 1)[1])
        restarted = start_server(tmp_path / "server", ["demo", str(tiny)], port=port)
        server = restarted
        api = server.client()
        lost = api.status(running["id"])
        assert lost["state"] == "lost" and "server stopped while this job ran" in lost["error"]
        list(api.follow(queued["id"]))
        assert api.status(queued["id"])["state"] == "succeeded"
        result = api.download(queued["id"], tmp_path / "queued.nii.gz")
        assert read_volume(result).same_geometry(read_volume(queued_image))
        with pytest.raises(ServerError) as gone:
            api.download(queued["id"], tmp_path / "again.nii.gz")
        assert gone.value.status == 404  # deleted once downloaded
        server.stop()  # Ctrl-C: the normal way to stop it
        assert server.process.returncode == 0 and "repux serve: stopped" in server.log.read_text(encoding="utf-8")
    finally:
        server.stop()


def test_client_refuses_what_the_server_cannot_honour(server, tmp_path, capsys):
    image = phantom_file(tmp_path, 13, shape=(20, 20, 12))
    argv = ["segment", str(image), "-o", str(tmp_path / "o.nii.gz"), "--server", server.url, "--token-file", str(server.token_file)]
    assert main([*argv, "--volumes", str(tmp_path / "v.csv")]) == 2
    assert "--volumes: not available with --server" in capsys.readouterr().err
    assert main([*argv, "--confidence", str(tmp_path / "c.nii.gz"), "--tta", "flips"]) == 2
    assert "--confidence, --tta: not available with --server" in capsys.readouterr().err
    assert main([*argv, "--windows", "all"]) == 2
    assert "--windows: not available with --server" in capsys.readouterr().err
    assert main([*argv, "--model", "nosuch"]) == 2
    assert "model 'nosuch': not served here" in capsys.readouterr().err
    wrong = tmp_path / "wrong-token"
    wrong.write_text("nope\n")
    assert main([*argv[:-1], str(wrong)]) == 2
    assert "(HTTP 401)" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()
    assert ServerClient(server.url, server.token).models()[0]["labels"]


def test_a_token_file_others_can_read_is_refused(tmp_path, capsys):
    token_file = tmp_path / "tokens"
    assert main(["serve", "--token-file", str(token_file), "--add-token"]) == 0
    assert token_file.stat().st_mode & 0o777 == 0o600
    token_file.chmod(0o644)
    assert main(["serve", "--token-file", str(token_file), "--work-dir", str(tmp_path / "work")]) == 2
    assert f"{token_file}: token file is accessible to other users (mode 644); expected 600" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_https_default_models_time_limit_and_retention(tmp_path, tiny):
    """HTTPS with a self-signed certificate for 127.0.0.1 (made with the openssl command): trusted when
    given, refused when not. That server, started without --models, serves the shipped and the
    installed models; a job over its time limit is stopped and reported, and a finished job is
    deleted after its retention time."""
    models = tmp_path / "models"
    shutil.copytree(tiny, models / "tiny")
    (models / "broken").mkdir()
    (models / "broken" / "model.json").write_text("{}")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    tls = ["--certfile", str(cert), "--keyfile", str(key)]
    limits = ["--job-time-limit", "1", "--retention", "3"]
    server = start_server(tmp_path / "server", [], *tls, *limits, cafile=str(cert), env={"REPUX_MODELS_DIR": str(models)})
    try:
        assert server.url.startswith("https://")
        assert server.client().info()["models"] == ["demo", "tiny"]
        assert "not serving" in server.log.read_text(encoding="utf-8") and "broken" in server.log.read_text(encoding="utf-8")
        with pytest.raises(ServerError, match="CERTIFICATE_VERIFY_FAILED"):
            ServerClient(server.url, server.token).info()  # the system's CAs do not know it
        with pytest.raises(ServerError):
            ServerClient(server.url.replace("https", "http"), server.token, retry_s=0).info()  # no plain HTTP

        client = server.client()
        job = client.submit(phantom_file(tmp_path, 14), "demo")  # the job's process alone takes over 1 s to start
        list(client.follow(job["id"]))
        status = client.status(job["id"])
        assert status["state"] == "failed" and "longer than the server's time limit (1 s)" in status["error"]
        assert not job_processes(server.work_dir)
        assert {p.name for p in server.job_files()} <= {"job.json", "records.jsonl"}
        with pytest.raises(ServerError) as expired:
            wait_until(lambda: not client.status(job["id"]), 10, what="job deleted after the retention time")
        assert expired.value.status == 404
        assert server.job_files() == []
    finally:
        server.stop()


def test_replayed_records_are_the_jobs_own_in_jsonl_and_drive_the_bar(capsys):
    from repux.progress import Progress

    records = [
        {"stage": "infer", "done": 0, "total": 3, "eta": None},
        {"stage": "infer", "done": 2, "total": 3, "eta": 0.5},
        {"stage": "infer", "message": "resampled to 4 mm", "case": "c"},
        {"stage": "infer", "done": 3, "total": 3, "eta": 0.0},
    ]
    jsonl = Progress("jsonl")
    for record in records:
        jsonl.replay(record)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    bar = Progress("bar")
    for record in records:
        bar.replay(record)
    bar.finish()
    err = capsys.readouterr().err
    assert "resampled to 4 mm" in err and "infer" in err and "3/3" in err


def test_restart_removes_only_the_servers_own_unfinished_uploads(tmp_path):
    """A --work-dir whose jobs/ folder also holds the user's own things: only job-id folders are the server's."""
    from repux.serve.jobs import JobManager, Limits

    jobs = tmp_path / "work" / "jobs"
    (jobs / "my-notes").mkdir(parents=True)
    (jobs / "my-notes" / "notes.txt").write_text("mine", encoding="utf-8")
    (jobs / ("a" * 32)).mkdir()
    (jobs / ("a" * 32) / "input.nrrd").write_bytes(b"half an upload")
    manager = JobManager(tmp_path / "work", {}, [], Limits())
    manager.start()
    try:
        assert (jobs / "my-notes" / "notes.txt").read_text(encoding="utf-8") == "mine"
        assert not (jobs / ("a" * 32)).exists()
    finally:
        manager.stop()
