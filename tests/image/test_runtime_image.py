"""runtime/Containerfile: podman builds the runtime image from a named base and the wheelhouse,
and the image serves the demo model through the official openai client as a non-root user on a
read-only root filesystem, with every capability dropped."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / ".cache/demo"
IMAGE = "localhost/inferd-runtime:test"
NAME = "inferd-image-test"


def podman(*args: str, check: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout)


def base_image() -> str:
    """CI's base: the Debian bookworm image the test hosts boot from (built from debootstrap)."""
    return subprocess.check_output([ROOT / "scripts/testhost-image.sh", "--name"], text=True).strip()


@pytest.fixture(scope="module")
def image() -> str:
    assert shutil.which("podman"), "podman is needed to build the runtime image (make setup installs it)"
    base = base_image()
    subprocess.run([ROOT / "scripts/testhost-image.sh"], check=True, capture_output=True)
    subprocess.run([ROOT / "scripts/demo-assets.sh", DEMO], check=True, capture_output=True)
    before = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    build = podman(
        "build", "--format", "docker", "-f", str(ROOT / "runtime/Containerfile"),
        "--build-arg", f"BASE={base}", "-t", IMAGE, str(DEMO / "wheelhouse"), check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    after = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if before and before != after:  # the image the tag left: 1.5 GB a run on a CI machine's disk otherwise
        podman("rmi", before, check=False)  # kept while a container still uses it
    return IMAGE


def test_build_refuses_a_context_that_is_not_a_wheelhouse(image, tmp_path):
    (tmp_path / "README").write_text("not a wheelhouse\n")
    build = podman(
        "build", "-f", str(ROOT / "runtime/Containerfile"), "--build-arg", f"BASE={base_image()}",
        "-t", "localhost/inferd-runtime:refused", str(tmp_path), check=False,
    )  # fmt: skip
    assert build.returncode != 0
    assert "the build context is not a wheelhouse with an inferd wheel" in build.stdout + build.stderr
    assert podman("image", "exists", "localhost/inferd-runtime:refused", check=False).returncode == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(image: str, name: str, data: Path, model: Path) -> str:
    """Run the image as a service would: read-only root, no capabilities, loopback port."""
    port = free_port()
    podman("rm", "-f", name, check=False)
    podman(
        "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "all",
        "--security-opt", "no-new-privileges", "-p", f"127.0.0.1:{port}:8000",
        "-v", f"{data}:/var/lib/inferd", "-v", f"{model}:/models/demo:ro",
        image, "serve", "--model", "/models/demo", "--host", "0.0.0.0", "--device", "cpu", "--allow-unsigned",
    )  # fmt: skip
    return f"http://127.0.0.1:{port}"


def wait_ready(base: str, name: str) -> dict:
    """/ready's answer once the model is loaded or has failed to load."""
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=5) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
            if body.get("status") == "failed":
                return body
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            logs = podman("logs", name, check=False)
            pytest.fail(f"the image did not answer /ready (state {state}):\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("image-data")
    os.chown(data, 10001, 10001)
    return data


@pytest.fixture(scope="module")
def served(image, data_dir, tmp_path_factory):
    add = podman(
        "run", "--rm", "-v", f"{data_dir}:/var/lib/inferd", image,
        "keys", "add", "--keys-file", "/var/lib/inferd/keys.json", "--name", "ci", "--role", "user",
    )  # fmt: skip
    key = add.stdout.strip()
    # The model as a deployment leaves it: files readable by the service user.
    model = tmp_path_factory.mktemp("image-model") / "demo"
    shutil.copytree(DEMO / "demo-model", model)
    for f in model.iterdir():
        f.chmod(0o644)
    base = start(image, NAME, data_dir, model)
    status = wait_ready(base, NAME)
    assert status.get("status") == "ready", status
    yield base, key
    podman("rm", "-f", NAME, check=False)


def test_the_image_names_model_files_its_user_cannot_read(image, data_dir, tmp_path):
    """A weights file the service user cannot read (save_pretrained writes 0600 as root) is named in
    the error, and the server exits 1 for its supervisor rather than staying up unready."""
    model = tmp_path / "demo"
    shutil.copytree(DEMO / "demo-model", model)
    (model / "model.safetensors").chmod(0o600)
    name = NAME + "-unreadable"
    try:
        start(image, name, data_dir, model)
        deadline = time.monotonic() + 300
        while podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip() == "running":
            assert time.monotonic() < deadline, "the server stayed up with a model it cannot read"
            time.sleep(2)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        logs = podman("logs", name, check=False)
    finally:
        podman("rm", "-f", name, check=False)
    assert code == "1", logs.stdout[-2000:] + logs.stderr[-2000:]
    assert "cannot be read by uid 10001" in logs.stdout + logs.stderr and "model.safetensors" in logs.stdout + logs.stderr


def test_the_image_serves_chat_through_the_openai_client(served):
    base, key = served
    client = openai.OpenAI(base_url=base + "/v1", api_key=key)
    model = client.models.list().data[0].id
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert out.choices[0].message.content
    assert out.usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong").models.list()


def test_the_image_runs_unprivileged_and_reports_health(served):
    inspect = json.loads(podman("inspect", NAME).stdout)[0]
    assert inspect["Config"]["User"] == "10001:10001"
    assert podman("exec", NAME, "id", "-u").stdout.strip() == "10001"
    status = podman("exec", NAME, "grep", "^CapEff", "/proc/self/status").stdout.split()
    assert status[1] == "0000000000000000"
    write = podman("exec", NAME, "touch", "/opt/inferd/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert podman("healthcheck", "run", NAME, check=False).returncode == 0


def test_the_image_stops_cleanly_on_sigterm(served):
    # The server drains in-flight requests for up to shutdown_timeout_s (30 s) on SIGTERM.
    stop = podman("stop", "--time", "40", NAME, check=False)
    assert stop.returncode == 0, stop.stderr
    state = json.loads(podman("inspect", NAME).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state
