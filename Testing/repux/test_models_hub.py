"""repux models: the registry, downloads from a loopback server, refusals, import, remove, verify."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from hub_support import (
    CUT,
    HTML,
    SLOW,
    STALL,
    CheckpointServer,
    Route,
    published_checkpoint,
    registry_entry,
    small_network,
    write_registry,
)
from repux.bundle import load_bundle
from repux.cli import main
from repux.hub.folders import MODELS_DIR_ENV
from repux.hub.registry import REGISTRY_ENV, SHIPPED_REGISTRY, load_registry


@dataclass
class MakeDirectoryOnLoad:
    """Unpickling this runs ``os.mkdir(path)``: a stand-in for any code a pickle can carry."""

    path: str

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@dataclass
class Site:
    server: CheckpointServer
    registry: Path
    checkpoint: bytes
    marker: Path  # created only if code from a served file ran


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    folder = tmp_path_factory.mktemp("site")
    network = small_network()
    checkpoint = published_checkpoint(network)
    digest = hashlib.sha256(checkpoint).hexdigest()
    marker = folder / "code-ran"
    wider = small_network(feat_size=[4, 8, 16, 16])
    slow_network = small_network(feat_size=[16, 32, 48, 64], hidden_size=64, seed=1)
    slow_body = published_checkpoint(slow_network)
    server = CheckpointServer()
    server.routes.update(
        {
            "/tiny.pth": Route(checkpoint),
            "/unhashed.pth": Route(checkpoint),
            "/cut.pth": Route(checkpoint, CUT),
            "/page": Route(checkpoint, HTML),
            "/disguised.pth": Route(b"\n<!DOCTYPE html><html>Sign in to continue</html>"),
            "/stall.pth": Route(checkpoint, STALL),
            "/slow.pth": Route(slow_body, SLOW),
            "/needs-code.pth": Route(published_checkpoint(network, {"hook": MakeDirectoryOnLoad(str(marker))})),
            "/wider.pth": Route(published_checkpoint(wider)),
            "/uxnet.pth": Route(published_checkpoint(small_network("uxnet"))),
        }
    )
    url = server.url
    entries = [
        registry_entry("tiny", url("/tiny.pth"), network, sha256=digest, size_bytes=len(checkpoint)),
        registry_entry("unhashed", url("/unhashed.pth"), network),
        registry_entry("cut", url("/cut.pth"), network, sha256=digest),
        registry_entry("page", url("/page"), network),
        registry_entry("disguised", url("/disguised.pth"), network),
        registry_entry("missing", url("/nothing-here.pth"), network),
        registry_entry("wrong-hash", url("/tiny.pth"), network, sha256="0" * 64),
        registry_entry("wrong-size", url("/tiny.pth"), network, size_bytes=len(checkpoint) + 7),
        registry_entry("stall", url("/stall.pth"), network),
        registry_entry("slow", url("/slow.pth"), slow_network),
        registry_entry("needs-code", url("/needs-code.pth"), network),
        registry_entry("wider", url("/wider.pth"), network),
        registry_entry("uxnet-file", url("/uxnet.pth"), network),
        # A host that does not exist: reachable only through the proxy of the proxy test.
        registry_entry("proxied", "http://checkpoints.invalid/tiny.pth", network, sha256=digest),
    ]
    yield Site(server, write_registry(folder / "registry.json", entries), checkpoint, marker)
    server.close()


@pytest.fixture
def models(tmp_path, site, monkeypatch) -> Path:
    """The models folder of one test, with the loopback registry in force."""
    folder = tmp_path / "models"
    monkeypatch.setenv(MODELS_DIR_ENV, str(folder))
    monkeypatch.setenv(REGISTRY_ENV, str(site.registry))
    return folder


def models_cli(capsys, *args: str | os.PathLike) -> tuple[int, str, str]:
    code = main(["models", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_installed(models: Path, name: str) -> None:
    assert not (models / name).exists()
    leftovers = [p.name for p in models.iterdir() if p.name != ".downloads"] if models.exists() else []
    assert leftovers == [], leftovers


# -- the registry ------------------------------------------------------------------------
def test_the_shipped_registry_lists_the_published_checkpoints_as_the_authors_publish_them():
    registry = load_registry(SHIPPED_REGISTRY)
    by_name = {model.name: model for model in registry.models}
    assert by_name["repuxnet-amos"].url == "https://drive.google.com/drive/folders/1ri_2tTVEB4RJQYegI5fh7F5TIBN9T4Is"
    assert by_name["repuxnet-amos"].source_kind == "google-drive-folder"
    assert by_name["uxnet-flare"].url == "https://drive.google.com/file/d/1APxKmq3MuueY4KtuKAZG3vs3vPLetLaK"
    assert by_name["uxnet-amos"].url == "https://drive.google.com/file/d/1G8uhjKh8392UFtGsMeolO__Lmz3GLAiG"
    assert by_name["uxnet-feta"].url == "https://drive.google.com/file/d/1AqJMIM2w8OGGiN1FonmZqNoRHd2x5fTL"
    # Published values (spec/ORIGINAL_REPUXNET.md): classes, spacing per dataset, Dice.
    expected = {
        "repuxnet-amos": ("repuxnet", 16, "amos", [1.5, 1.5, 2.0], 0.902),
        "uxnet-flare": ("uxnet", 5, "flare", [1.0, 1.0, 1.2], 0.936),
        "uxnet-amos": ("uxnet", 16, "amos", [1.5, 1.5, 2.0], 0.900),
        "uxnet-feta": ("uxnet", 8, None, None, 0.874),
    }
    for name, (arch, out_chans, labels, spacing, dice) in expected.items():
        model = by_name[name]
        assert (model.architecture, model.network["out_chans"], model.labels) == (arch, out_chans, labels)
        assert (model.preprocessing["spacing"], model.reported_dice) == (spacing, dice)
        assert model.sha256 is None and model.size_bytes is None  # nobody publishes them
        assert model.preprocessing["patch_size"] == [96, 96, 96] and model.preprocessing["overlap"] == 0.5
        assert model.citation and (model.license is not None or model.license_note)
    assert by_name["uxnet-feta"].modality == "MR" and not by_name["uxnet-feta"].importable
    assert by_name["uxnet-feta"].preprocessing["intensity"]["a_max"] == 1000.0
    assert "flare21" in by_name["uxnet-flare"].label_note


def test_each_registry_network_is_the_published_one():
    """Built on the meta device: RepUX-Net with 21^3 kernels, UX-Net with 7^3, paper widths."""
    from repux.network import build_network

    for model in load_registry(SHIPPED_REGISTRY).models:
        with torch.device("meta"):
            network = build_network(model.architecture, **model.network)
        kernel = network.state_dict()[f"{network.encoder_name}.stages.0.0.dwconv.weight"].shape[-1]
        assert kernel == (21 if model.architecture == "repuxnet" else 7), model.name
        params = sum(p.numel() for p in network.parameters())
        if model.name == "repuxnet-amos":
            assert 60e6 < params < 70e6  # the paper's 65.8M (at 13 classes)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.pop("sha256"), r"key 'models\[0\]\.sha256' is missing"),
        (
            lambda e: e.update(sha256="ABC"),
            r"key 'models\[0\]\.sha256': expected 64 lower-case hexadecimal digits or null, got 'ABC'",
        ),
        (lambda e: e.update(labels="flare99"), r"key 'models\[0\]\.labels': expected a label preset"),
        (lambda e: e.update(labels="amos"), r"key 'models\[0\]\.labels': expected a preset with 5 labels"),
        (
            lambda e: e.update(labels=None),
            r"key 'models\[0\]\.importable': expected false for a model without a label preset",
        ),
        (lambda e: e.update(name="../escape"), r"key 'models\[0\]\.name': expected a folder name"),
        (lambda e: e["source"].update(kind="ftp"), r"key 'models\[0\]\.source\.kind': expected one of"),
        (lambda e: e.update(sizes=3), r"unknown key 'models\[0\]\.sizes'"),
    ],
)
def test_a_malformed_registry_is_refused_naming_file_and_key(tmp_path, change, message):
    entry = registry_entry("x", "http://127.0.0.1:1/x.pth")
    change(entry)
    path = write_registry(tmp_path / "registry.json", [entry])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        load_registry(path)


def test_duplicate_names_are_refused(tmp_path):
    entry = registry_entry("x", "http://127.0.0.1:1/x.pth")
    with pytest.raises(ValueError, match=r"'x' appears twice"):
        load_registry(write_registry(tmp_path / "r.json", [entry, entry]))


# -- downloads ---------------------------------------------------------------------------
def test_pull_downloads_once_checks_and_installs(models, site, capsys):
    code, out, err = models_cli(capsys, "pull", "tiny", "--progress", "none")
    assert code == 0, err
    bundle = load_bundle(models / "tiny")
    provenance = bundle.metadata.provenance
    assert provenance["source"] == site.server.url("/tiny.pth")
    assert provenance["source_sha256"] == hashlib.sha256(site.checkpoint).hexdigest()
    assert provenance["registry_model"] == "tiny" and provenance["command"] == "repux models pull tiny"
    assert bundle.metadata.preprocessing["spacing"] == [8.0, 8.0, 8.0]
    network = small_network()
    for key, value in network.state_dict().items():
        assert torch.equal(bundle.state_dict()[key], value.float() if value.is_floating_point() else value), key
    assert not (models / ".downloads" / "tiny.part").exists()

    served = site.server.routes["/tiny.pth"].served
    code, out, err = models_cli(capsys, "pull", "tiny", "--progress", "none")
    assert code == 0 and site.server.routes["/tiny.pth"].served == served  # not downloaded again

    code, out, _ = models_cli(capsys, "list", "--json")
    states = {row["name"]: row["state"] for row in json.loads(out)}
    assert states["tiny"] == "installed" and states["unhashed"] == "available" and states["demo"] == "shipped"

    code, out, err = models_cli(capsys, "verify", "tiny")
    assert code == 0 and "made from the published file" in out, out + err
    code, out, err = models_cli(capsys, "remove", "tiny")
    assert code == 0 and not (models / "tiny").exists()
    assert models_cli(capsys, "remove", "tiny")[0] == 2


def test_a_pulled_model_segments_voxel_for_voxel_as_import_checkpoint(models, site, tmp_path, capsys):
    from repux.data.phantoms import make_phantom
    from repux.infer.engine import Segmenter

    assert models_cli(capsys, "pull", "unhashed", "--progress", "none")[0] == 0
    checkpoint = tmp_path / "best_metric_model.pth"
    checkpoint.write_bytes(site.checkpoint)
    imported = tmp_path / "imported"
    args = ["import-checkpoint", checkpoint, "--arch", "repuxnet", "--labels", "flare", "-o", imported]
    assert main([*map(str, args), "--spacing", "8", "8", "8", "--patch-size", "32"]) == 0
    image, _ = make_phantom(5, shape=(48, 40, 32))
    pulled_labels = Segmenter(load_bundle(models / "unhashed"), device="cpu").segment(image).array
    imported_labels = Segmenter(load_bundle(imported), device="cpu").segment(image).array
    assert len(np.unique(pulled_labels)) > 1  # a real segmentation, not all background
    np.testing.assert_array_equal(pulled_labels, imported_labels)


def test_a_cut_download_is_resumed_where_it_stopped(models, site, capsys):
    code, _, err = models_cli(capsys, "pull", "cut", "--progress", "none")
    assert code == 2
    total = len(site.checkpoint)
    assert re.search(rf"model cut: the connection closed after (\d+) of {total} bytes; the part is kept in", err), err
    part = models / ".downloads" / "cut.part"
    half = part.stat().st_size
    assert 0 < half < total and not (models / "cut").exists()

    code, _, err = models_cli(capsys, "pull", "cut", "--progress", "none")
    assert code == 0, err
    assert site.server.requests[-1] == ("/cut.pth", f"bytes={half}-")
    assert (
        load_bundle(models / "cut").metadata.provenance["source_sha256"] == hashlib.sha256(site.checkpoint).hexdigest()
    )
    assert not part.exists()


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "page",
            r"model page: http://127\.0\.0\.1:\d+/page answered with a web page \(text/html; charset=utf-8\), not the checkpoint",
        ),
        (
            "disguised",
            r"model disguised: http://127\.0\.0\.1:\d+/disguised\.pth sent a web page, not the checkpoint",
        ),
        (
            "missing",
            r"model missing: http://127\.0\.0\.1:\d+/nothing-here\.pth: HTTP 404 Not Found \(expected the checkpoint file\)",
        ),
        (
            "wrong-hash",
            r"model wrong-hash: the downloaded file \S+ has SHA-256 [0-9a-f]{64}, expected 0{64} \(the registry's\)",
        ),
        (
            "wrong-size",
            r"model wrong-size: the downloaded file \S+ has (\d+) bytes, expected \d+ \(the registry's size\)",
        ),
    ],
)
def test_a_wrong_download_is_refused_with_the_way_round_it(models, site, capsys, name, message):
    code, _, err = models_cli(capsys, "pull", name, "--progress", "none")
    assert code == 2
    assert re.search(message, err), err
    assert f"then run: repux models import {name} DOWNLOADED_FILE" in err
    assert_nothing_installed(models, name)
    assert not (models / ".downloads" / f"{name}.part").exists()


def test_the_proxy_variables_users_set_are_used(models, site, capsys, monkeypatch):
    proxy = CheckpointServer(routes={"/tiny.pth": Route(site.checkpoint)})
    try:
        monkeypatch.setenv("http_proxy", proxy.base_url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        code, _, err = models_cli(capsys, "pull", "proxied", "--progress", "none")
    finally:
        proxy.close()
    assert code == 0, err
    assert proxy.requests == [("http://checkpoints.invalid/tiny.pth", None)]
    assert load_bundle(models / "proxied").metadata.provenance["source"] == "http://checkpoints.invalid/tiny.pth"


@pytest.mark.parametrize("name, kind", [("uxnet-flare", "file"), ("repuxnet-amos", "folder")])
def test_google_drive_goes_through_gdown_and_its_failure_is_refused_with_the_way_round_it(
    tmp_path, monkeypatch, capsys, name, kind
):
    """The shipped registry's Drive links, through a loopback HTTPS proxy that refuses every
    tunnel: gdown really asks for drive.google.com, and nothing leaves this machine."""
    proxy = CheckpointServer()
    try:
        monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "models"))
        monkeypatch.delenv(REGISTRY_ENV, raising=False)
        for variable in ("https_proxy", "HTTPS_PROXY"):
            monkeypatch.setenv(variable, proxy.base_url)
        for variable in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(variable, raising=False)
        code, _, err = models_cli(capsys, "pull", name, "--progress", "none")
    finally:
        proxy.close()
    assert code == 2
    assert proxy.requests and all(request == ("CONNECT drive.google.com:443", None) for request in proxy.requests)
    assert f"model {name}: the download from Google Drive failed (" in err, err
    registry_url = load_registry(SHIPPED_REGISTRY).get(name).url
    assert f"Download it in a web browser from {registry_url}" in err
    assert f"then run: repux models import {name} DOWNLOADED_FILE" in err
    assert_nothing_installed(tmp_path / "models", name)


def test_a_stalled_server_times_out_and_keeps_the_part(models, site, capsys):
    start = time.monotonic()
    code, _, err = models_cli(capsys, "pull", "stall", "--timeout", "1", "--progress", "none")
    assert code == 2 and time.monotonic() - start < 20
    found = re.search(
        r"model stall: no data from http://127\.0\.0\.1:\d+/stall\.pth for 1 s \(timeout\); the (\d+) bytes received are kept",
        err,
    )
    assert found, err
    # Everything the server sent before it stalled is kept for resuming.
    assert int(found.group(1)) == (models / ".downloads" / "stall.part").stat().st_size == len(site.checkpoint) // 4
    assert_nothing_installed(models, "stall")


def test_a_pickle_that_needs_code_is_refused_without_running_it(models, site, capsys):
    code, _, err = models_cli(capsys, "pull", "needs-code", "--progress", "none")
    assert code == 2
    assert re.search(
        r"model needs-code: \S+needs-code\.part: refusing to load: the file is a pickle that needs code \(\S*mkdir\)",
        err,
    ), err
    assert not site.marker.exists()
    assert_nothing_installed(models, "needs-code")


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "wider",
            r"model wider: \S+wider\.part: expected a repuxnet network with feat_size \[4, 8, 12, 16\] \(the file has \[4, 8, 16, 16\]\)",
        ),
        (
            "uxnet-file",
            r"model uxnet-file: \S+: state_dict is not a repuxnet network: no key starts with 'repuxnet_3d\.' \(the keys are those of a uxnet network\)",
        ),
    ],
)
def test_weights_that_do_not_fit_the_registry_network_are_refused(models, site, capsys, name, message):
    code, _, err = models_cli(capsys, "pull", name, "--progress", "none")
    assert code == 2 and re.search(message, err), err
    assert_nothing_installed(models, name)


def test_sigterm_mid_download_leaves_no_bundle_and_a_resumable_part(models, site):
    command = [sys.executable, "-m", "repux", "models", "pull", "slow", "--progress", "jsonl"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    records = []
    for line in process.stdout:
        records.append(json.loads(line))
        if records[-1].get("done"):
            break
    part = models / ".downloads" / "slow.part"
    assert records[-1]["stage"] == "download slow" and records[-1]["total"] == len(site.server.routes["/slow.pth"].body)
    process.send_signal(signal.SIGTERM)
    rest, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err  # 143, as shells report a SIGTERM
    assert json.loads(rest.strip().splitlines()[-1]) == {"stage": "cancelled"}
    assert "repux models: cancelled" in err
    assert 0 < part.stat().st_size < records[-1]["total"]
    assert_nothing_installed(models, "slow")


# -- a file downloaded by hand -------------------------------------------------------------
def test_a_hand_downloaded_file_is_imported_and_checked_the_same_way(models, site, tmp_path, capsys):
    download = tmp_path / "best_metric_model.pth"
    download.write_bytes(site.checkpoint)
    code, out, err = models_cli(capsys, "import", "tiny", download, "--progress", "none")
    assert code == 0, err
    assert download.read_bytes() == site.checkpoint  # the user's file stays
    assert load_bundle(models / "tiny").metadata.provenance["command"] == f"repux models import tiny {download}"

    page = tmp_path / "uc.html"
    page.write_text("<!DOCTYPE html><html>Sign in - Google Accounts</html>")
    code, _, err = models_cli(capsys, "import", "unhashed", page, "--progress", "none")
    assert code == 2 and f"model unhashed: {page} is a web page, not the checkpoint" in err, err
    code, _, err = models_cli(capsys, "import", "wrong-hash", download, "--progress", "none")
    assert code == 2 and "expected " + "0" * 64 in err
    assert not (models / "unhashed").exists() and not (models / "wrong-hash").exists()


def test_another_label_order_can_be_chosen(models, site, tmp_path, capsys):
    """What settles a FLARE checkpoint once repux models check has spoken: flare21 instead of flare."""
    download = tmp_path / "best_metric_model.pth"
    download.write_bytes(site.checkpoint)
    assert models_cli(capsys, "import", "unhashed", download, "--labels", "flare21", "--progress", "none")[0] == 0
    metadata = load_bundle(models / "unhashed").metadata
    assert [label.name for label in metadata.labels] == ["background", "liver", "kidney", "spleen", "pancreas"]
    assert metadata.provenance["label_preset"] == "flare21"
    assert metadata.provenance["command"] == f"repux models import unhashed {download} --labels flare21"
    code, _, err = models_cli(capsys, "import", "tiny", download, "--labels", "amos", "--progress", "none")
    assert code == 2 and "the network has 5 output channels but the labels give 16" in err, err


def test_verify_finds_damaged_weights(models, site, capsys):
    assert models_cli(capsys, "pull", "tiny", "--progress", "none")[0] == 0
    weights = models / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, _, err = models_cli(capsys, "verify", "tiny")
    assert code == 2 and "model.safetensors" in err, err


def test_reference_only_models_are_listed_but_not_pulled(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "models"))
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    code, out, _ = models_cli(capsys, "list")
    line = next(line for line in out.splitlines() if line.startswith("uxnet-feta"))
    assert "reference" in line and "MR" in line and "size unknown" in line
    code, _, err = models_cli(capsys, "pull", "uxnet-feta")
    assert code == 2 and "model uxnet-feta: listed for reference only: bundles hold CT models only" in err
    assert not (tmp_path / "models").exists()
