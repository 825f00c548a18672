"""The module hub on s3:// (s3fs, the hub extra), offline against moto's S3 server (the test extra):
round trip, tampering refused, two concurrent publisher processes lose nothing (versions are
claimed by S3 conditional writes)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from moto import server as moto_server  # the test extra; s3fs (the hub extra) is what fsspec loads for s3://

from helpers import save_small_mesh
from modulemesh.cli import main
from modulemesh.hub import Hub
from modulemesh.mesh import ModuleMesh

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on localhost with one bucket, ``hub``; yields its endpoint URL."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # request lines would fill stderr
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {**CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)  # the publisher subprocesses read the endpoint from here
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="hub")
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def mesh_dir(tmp_path) -> Path:
    return save_small_mesh(tmp_path)


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def files_of(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_s3_round_trip_is_bit_identical_and_tampering_is_refused(s3, mesh_dir, tmp_path, capsys):
    import boto3

    url = "s3://hub/team"
    assert cli(capsys, "hub", "publish", mesh_dir, url, "--name", "shared")[0] == 0
    assert cli(capsys, "hub", "publish", mesh_dir / "experts" / "e1.json", url)[0] == 0
    assert [(e["name"], e["version"]) for e in Hub(url).entries()] == [("e1", 1), ("shared", 1)]
    assert cli(capsys, "hub", "pull", "shared@1", url, "--out", tmp_path / "got")[0] == 0
    got = files_of(tmp_path / "got")
    got.pop("hub-package.json")
    assert got == files_of(mesh_dir)
    x = torch.randn(8, 6)
    assert torch.equal(ModuleMesh.load(tmp_path / "got")(x).log_probs, ModuleMesh.load(mesh_dir)(x).log_probs)
    # Flip one byte of the weights blob of e1 in the bucket: the pull is refused with one line.
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    entry = json.loads(client.get_object(Bucket="hub", Key="team/index/e1/1.json")["Body"].read())
    desc = json.loads(client.get_object(Bucket="hub", Key=f"team/blobs/sha256/{entry['descriptor']}")["Body"].read())
    digest = desc["files"]["e1.safetensors"]["sha256"]
    blob = bytearray(client.get_object(Bucket="hub", Key=f"team/blobs/sha256/{digest}")["Body"].read())
    blob[len(blob) // 2] ^= 0x01
    client.put_object(Bucket="hub", Key=f"team/blobs/sha256/{digest}", Body=bytes(blob))
    code, err = cli(capsys, "hub", "pull", "e1", url, "--out", tmp_path / "bad")
    assert code == 2 and len(err.splitlines()) == 1 and "does not match its hash" in err, err
    assert not (tmp_path / "bad").exists()
    code, err = cli(capsys, "hub", "list", "s3://no-such-bucket/hub")
    assert code == 2 and len(err.splitlines()) == 1 and "no hub at" in err, err


PUBLISHER = """
import sys
from modulemesh.hub import Hub
for _ in range(5):
    Hub(sys.argv[1]).publish(sys.argv[2], name="shared")
"""


def test_two_concurrent_s3_publishers_lose_nothing(s3, mesh_dir, tmp_path):
    url = "s3://hub/race"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, url, str(mesh_dir)], env=env) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert [e["version"] for e in Hub(url).entries()] == list(range(1, 11))
    Hub(url).pull("shared@7", tmp_path / "v7")
    assert ModuleMesh.read_manifest(tmp_path / "v7")["seal"] == ModuleMesh.read_manifest(mesh_dir)["seal"]
