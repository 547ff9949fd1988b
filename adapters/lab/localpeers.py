"""Real peers started on loopback for the demo, the tests and the benchmarks: Orthanc and dcmtk's storescp.

Each peer gets its own config and data under a work directory, listens on 127.0.0.1 only, is waited for
with a deadline, and is stopped by the PID we started (terminate, then kill). dcmtk-based servers get
``TCP_NODELAY=1`` in their environment (Debian's dcmtk leaves Nagle on otherwise).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PORT_BLOCK = 1000  # ports per process
_PORT_FLOOR = 20000
_port_lock = threading.Lock()
_port_offset: int | None = None  # where in its block this process hands out the next port


@functools.cache
def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (whence every outgoing connection's local port comes)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_block() -> range:
    """This process's block of ports: below the ephemeral range, one block per pytest-xdist worker (another
    process's servers never get a port picked here); empty when the range leaves no room below it."""
    slots = (ephemeral_low() - _PORT_FLOOR) // _PORT_BLOCK
    if slots < 1:
        return range(0)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else os.getpid()
    start = _PORT_FLOOR + (index % slots) * _PORT_BLOCK
    return range(start, start + _PORT_BLOCK)


def free_port() -> int:
    """A loopback TCP port free now, that no other free_port() of this run hands out while it may be in use: the
    next of this process's block (it wraps after 1000 ports) that a bind accepts. A port picked by bind(0) came
    from the ephemeral range, and the servers bound to it seconds later met another worker's server on the same
    port (a SOCKS5 proxy answered a gateway's XMPP stream in CI) or an outgoing connection's local end."""
    global _port_offset
    block = _port_block()
    if not block:  # no room below a machine's ephemeral range: the kernel's pick
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    with _port_lock:
        if _port_offset is None:
            _port_offset = random.randrange(len(block))
        for _attempt in range(len(block)):  # bounded: each port of the block once
            port = block[_port_offset]
            _port_offset = (_port_offset + 1) % len(block)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise OSError(f"no free port in {block.start}..{block.stop - 1}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _exchange(port: int, hello: bytes, enough: Callable[[bytes], bool], host: str = "127.0.0.1", timeout_s: float = 1.0) -> bytes:
    """Send ``hello`` to ``port`` and read until ``enough(answer)`` or ``timeout_s``: what the server said."""
    answer = b""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(hello)
            deadline = time.monotonic() + timeout_s
            while not enough(answer) and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        pass
    return answer


def xmpp_answers(port: int, domain: str, host: str = "127.0.0.1") -> bool:
    """An XMPP server for ``domain`` answers on ``port``: it opens a stream from ``domain`` and offers its
    features. A port that only accepts (or another test's proxy or server that took it) does not."""
    hello = (f"<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xmlns='jabber:client' "
             f"xmlns:stream='http://etherx.jabber.org/streams'>").encode()
    answer = _exchange(port, hello, lambda got: b"stream:features" in got, host)
    return b"<stream:stream" in answer and b"stream:features" in answer and domain.encode() in answer


def socks5_answers(port: int, host: str = "127.0.0.1") -> bool:
    """A SOCKS5 proxy (XEP-0065's proxy65) answers on ``port``: it takes the no-authentication method."""
    return _exchange(port, b"\x05\x01\x00", lambda got: len(got) >= 2, host)[:2] == b"\x05\x00"


def nodelay_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a live process, in MiB (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeerProcess:
    """A child process we own: started with a deadline on readiness, stopped by PID."""

    name = "peer"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        log.close()

    def _wait_ready(self, ready: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not ready after {timeout_s} s; log: {self.log_path}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Orthanc(PeerProcess):
    """Debian's Orthanc with its own config: storage and index in ``workdir``, loopback ports, no auth."""

    name = "orthanc"

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC", sync_storage: bool = True, extra: dict[str, Any] | None = None,
                 nagle: bool = False) -> None:
        super().__init__(workdir)
        self.ae_title = ae_title
        self.nagle = nagle  # True: started as Debian starts it, without TCP_NODELAY=1 (Nagle's algorithm on)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config = {
            "Name": "dicomgw-test-orthanc",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SyncStorageArea": sync_storage,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "StorageCompression": False,
            **(extra or {}),
        }

    @staticmethod
    def available() -> bool:
        return shutil.which("Orthanc") is not None

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        """Start, and on a port taken meanwhile by another process (free_port's race with a parallel test run)
        start again on new ports, twice at most."""
        for attempt in range(3):
            self.workdir.mkdir(parents=True, exist_ok=True)
            config_path = self.workdir / "orthanc.json"
            config_path.write_text(json.dumps(self.config, indent=2))
            env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"} if self.nagle else nodelay_env()
            self._spawn(["Orthanc", str(config_path)], env=env)
            try:
                self._wait_ready(lambda: port_open(self.dicom_port) and self._http_ok(), timeout_s)
                return self
            except RuntimeError:
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                if attempt == 2 or "already in use" not in log:
                    raise
                self.dicom_port, self.http_port = free_port(), free_port()
                self.config.update(DicomPort=self.dicom_port, HttpPort=self.http_port)
        return self

    def _http_ok(self) -> bool:
        """Our Orthanc answers: its /system names the DICOM and HTTP ports we gave it (not another's on a port
        taken meanwhile)."""
        try:
            system = self.rest("/system")
        except (OSError, ValueError):
            return False
        return (isinstance(system, dict) and system.get("DicomPort") == self.dicom_port
                and system.get("HttpPort") == self.http_port)

    def rest(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def raw(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return bytes(response.read())

    def instance_count(self) -> int:
        return int(self.rest("/statistics")["CountInstances"])


class StoreSCP(PeerProcess):
    """dcmtk's storescp writing every received instance to ``workdir/out`` (no fsync: the C++ ceiling)."""

    name = "storescp"

    def __init__(self, workdir: Path, ae_title: str = "STORESCP", bit_preserving: bool = False,
                 tls: tuple[Path, Path, Path] | None = None, forked: bool = False) -> None:
        super().__init__(workdir)
        self.ae_title = ae_title
        self.forked = forked  # --fork: a child per association (several at once), as a site would run it
        self.port = free_port()
        self.out_dir = workdir / "out"
        self.bit_preserving = bit_preserving
        self.tls = tls  # (key, certificate, CA): TLS with the client's certificate required

    def start(self, timeout_s: float = 15.0) -> StoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        argv = ["/usr/bin/storescp", "-aet", self.ae_title, "-od", str(self.out_dir)]
        if self.bit_preserving:
            argv += ["+B", "-xf", "/etc/dcmtk/storescp.cfg", "AllDICOM"]
        if self.forked:
            argv.append("--fork")
        if self.tls is not None:
            key, cert, ca = self.tls
            argv += ["+tls", str(key), str(cert), "+cf", str(ca), "-rc", "+px"]
        self._spawn([*argv, str(self.port)], env=nodelay_env())
        self._wait_ready(lambda: port_open(self.port), timeout_s)
        return self


def make_test_pki(directory: Path, server_name: str, kind: str = "ca") -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``server_name`` generated for one run: (CA PEM, cert PEM, key PEM).
    ``kind``: ``ca`` (issued by the CA, as a site runs it), ``wrong-name`` (issued by the CA for another
    name), ``self-signed`` (not issued by the CA), ``expired`` (issued by the CA, validity over)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = f"dicomgw test CA {os.urandom(4).hex()}"
    ca = (x509.CertificateBuilder().subject_name(name(ca_name)).issuer_name(name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - day).not_valid_after(now + 30 * day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = "other.example" if kind == "wrong-name" else server_name
    builder = (x509.CertificateBuilder().subject_name(name(subject)).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject), x509.DNSName(f"*.{subject}")]), critical=False))
    if kind == "expired":
        builder = builder.not_valid_before(now - 20 * day).not_valid_after(now - 10 * day)
    else:
        builder = builder.not_valid_before(now - day).not_valid_after(now + 30 * day)
    if kind == "self-signed":
        cert = builder.issuer_name(name(subject)).sign(key, hashes.SHA256())
    else:
        cert = builder.issuer_name(ca.subject).sign(ca_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    (directory / "ca.key").chmod(0o600)
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def issue_test_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for ``name`` (client and server use) from the CA ``make_test_pki`` left in ``directory``:
    (certificate PEM, key PEM)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class Prosody(PeerProcess):
    """Debian's Prosody with a generated config on loopback: c2s with STARTTLS required (a CA and a server
    certificate generated for the run, ``ca_file`` for the gateways; ``tls=False`` for a plaintext server), a proxy65
    component (``proxy.<domain>``), server-side shared roster groups so every gateway account sees the
    others' presence, and the settings that matter for throughput (xmpp-notes.md). Runs as the ``prosody``
    user when started as root (Prosody refuses root and then hangs)."""

    name = "prosody"

    def __init__(
        self,
        workdir: Path,
        domain: str = "helsenett.test",
        plugin_paths: list[Path] | None = None,
        proxy65: bool = True,
        stanza_size_limit: int = 1 << 20,
        tls: bool | str = True,
        admins: tuple[str, ...] = (),
        modules: tuple[str, ...] = (),
        groups_text: str | None = None,
    ) -> None:
        # Prosody runs as its own user, which cannot enter private temp dirs (pytest's are 0700): its
        # runtime dir is a fresh world-traversable one under /tmp; its log is copied to ``workdir`` on stop.
        self.report_dir = workdir
        runtime = Path(tempfile.mkdtemp(prefix="dicomgw-prosody-"))
        runtime.chmod(0o755)
        super().__init__(runtime)
        # Its console (stdout) apart from its own log: opened by us (root) first, prosody.log was a file the
        # prosody user could not write, and Prosody's own log was lost whenever the tests ran as root.
        self.log_path = self.workdir / "prosody-console.log"
        self.domain = domain
        self.proxy_jid = f"proxy.{domain}"
        self.c2s_port = free_port()
        self.proxy_port = free_port()
        self.plugin_paths = plugin_paths or []
        self.proxy65 = proxy65
        self.stanza_size_limit = stanza_size_limit
        self.config_path = self.workdir / "prosody.cfg.lua"
        self.accounts: dict[str, str] = {}
        self.admins = admins  # bare JIDs that may send server announcements (mod_announce)
        self.modules = modules  # more modules to load, e.g. ("announce",)
        self.groups_text = groups_text  # a mod_groups file (e.g. `dicomgw peers export prosody`); None: every account
        self.tls = bool(tls)
        self.ca_file: Path | None = None
        if tls:  # the CA stays with the test (report dir); the key and certificate with the server
            ca, cert, key = make_test_pki(self.workdir / "certs", domain, "ca" if tls is True else str(tls))
            self.ca_file = workdir / "ca.pem"
            workdir.mkdir(parents=True, exist_ok=True)
            shutil.copy(ca, self.ca_file)
            self.cert_path, self.key_path = cert, key

    @staticmethod
    def available() -> bool:
        return shutil.which("prosody") is not None and shutil.which("prosodyctl") is not None

    def _config_text(self) -> str:
        paths = ", ".join(f'"{p}"' for p in self.plugin_paths)
        tls = (
            f'ssl = {{ certificate = "{self.cert_path}"; key = "{self.key_path}"; }}\n'
            'c2s_require_encryption = true\nallow_unencrypted_plain_auth = false'
            if self.tls else "c2s_require_encryption = false\nallow_unencrypted_plain_auth = true"
        )
        proxy = (
            f'Component "{self.proxy_jid}" "proxy65"\n'
            f'    proxy65_address = "127.0.0.1"\n'
            f'    proxy65_acl = {{ "{self.domain}" }}\n'
            if self.proxy65
            else ""
        )
        return f"""-- generated by dicomgw for a loopback test/demo server
pidfile = "{self.workdir}/prosody.pid"
certificates = "{self.workdir}/certs"
data_path = "{self.workdir}/data"
log = {{ info = "{self.workdir}/prosody.log"; error = "{self.workdir}/prosody.err" }}
{f'plugin_paths = {{ {paths} }}' if paths else ''}
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
proxy65_ports = {{ {self.proxy_port} }}
proxy65_interfaces = {{ "127.0.0.1" }}
network_default_read_size = 65536
network_settings = {{ nagle = false }}
gc = {{ mode = "incremental"; threshold = 200 }}
c2s_stanza_size_limit = {self.stanza_size_limit}
{tls}
authentication = "internal_hashed"
storage = "internal"
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "smacks"; "groups"{'; "tls"' if self.tls else ''}{''.join(f'; "{m}"' for m in self.modules)} }}
admins = {{ {'; '.join(f'"{a}"' for a in self.admins)} }}
modules_disabled = {{ "s2s"; "limits"{'' if self.tls else '; "tls"'} }}
groups_file = "{self.workdir}/groups.txt"
VirtualHost "{self.domain}"
{proxy}"""

    def add_account(self, user: str, password: str) -> str:
        """Register ``user@domain`` (call before or after start); returns the bare JID."""
        self.accounts[user] = password
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_files()
        subprocess.run(
            ["prosodyctl", "--config", str(self.config_path), "register", user, self.domain, password],
            check=True, capture_output=True, timeout=30,
        )
        return f"{user}@{self.domain}"

    def _write_files(self) -> None:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        (self.workdir / "certs").mkdir(parents=True, exist_ok=True)
        members = "\n".join(f"{u}@{self.domain}={u}" for u in sorted(self.accounts))
        (self.workdir / "groups.txt").write_text(self.groups_text if self.groups_text is not None else f"[Gateways]\n{members}\n")
        self.config_path.write_text(self._config_text())
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "prosody", "prosody")
            for path in self.workdir.rglob("*"):
                shutil.chown(path, "prosody", "prosody")

    def stop(self, timeout_s: float = 15.0) -> None:
        super().stop(timeout_s)
        if self.workdir.exists():
            self.report_dir.mkdir(parents=True, exist_ok=True)
            for name in ("prosody.log", "prosody.err", "prosody-console.log", "prosody.cfg.lua"):
                if (self.workdir / name).exists():
                    shutil.copy(self.workdir / name, self.report_dir / name)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self, timeout_s: float = 15.0) -> None:
        """SIGKILL the server process itself (not the ``runuser`` wrapper, which would leave it running), as a
        crash would; its config, accounts and certificates stay, so ``start()`` brings it back on the same ports."""
        pid_file = self.workdir / "prosody.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        while port_open(self.c2s_port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def start(self, timeout_s: float = 30.0) -> Prosody:
        self._write_files()
        argv = ["prosody", "--config", str(self.config_path), "-F"]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "prosody", "--", *argv]
        self._spawn(argv)
        ready = ((lambda: xmpp_answers(self.c2s_port, self.domain) and socks5_answers(self.proxy_port)) if self.proxy65
                 else (lambda: xmpp_answers(self.c2s_port, self.domain)))
        self._wait_ready(ready, timeout_s)
        return self


def orthanc_instances(orthanc: Orthanc) -> dict[str, dict[str, str]]:
    """Every instance Orthanc holds: SOP Instance UID -> {'id': Orthanc id, 'transfer_syntax': UID}."""
    found = {}
    for orthanc_id in orthanc.rest("/instances"):
        tags = orthanc.rest(f"/instances/{orthanc_id}/simplified-tags")
        syntax = orthanc.raw(f"/instances/{orthanc_id}/metadata/TransferSyntax").decode().strip()
        found[str(tags["SOPInstanceUID"])] = {"id": orthanc_id, "transfer_syntax": syntax}
    return found


class BuiltinStorageSCP:
    """A small in-process Storage SCP (pynetdicom) standing in for a PACS when Orthanc is not installed: it
    writes each received data set to ``workdir`` and counts them. Used by the demo only, and labelled so."""

    label = "built-in storage SCP (a stand-in for a PACS)"

    def __init__(self, workdir: Path, ae_title: str = "DEMO_PACS") -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.stored: set[str] = set()
        self._server: Any = None

    def start(self) -> BuiltinStorageSCP:
        from pynetdicom import (
            AE,
            ALL_TRANSFER_SYNTAXES,
            AllStoragePresentationContexts,
            evt,
        )

        self.workdir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)

        def on_store(event: Any) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            (self.workdir / f"{uid}.dcm").write_bytes(event.encoded_dataset())
            self.stored.add(uid)
            return 0x0000

        self._server = ae.start_server(("127.0.0.1", self.dicom_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def instance_count(self) -> int:
        return len(self.stored)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
