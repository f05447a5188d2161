"""TLS: a real twistd on an C{ssl:} port with a generated self-signed certificate, and Python's C{ssl} as client;
and the one-line error when TLS support is not installed."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.serverprocess import ServerProcess
from tests.helpers import expectedReply, requireTool, scrape


def selfSignedCertificate(folder: str) -> tuple[str, str]:
    """A key and a certificate for localhost and 127.0.0.1, valid for a day; their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    keyPath, certificatePath = os.path.join(folder, "key.pem"), os.path.join(folder, "cert.pem")
    with open(keyPath, "wb") as file:
        file.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    with open(certificatePath, "wb") as file:
        file.write(certificate.public_bytes(serialization.Encoding.PEM))
    return keyPath, certificatePath


class TLSTests(SynchronousTestCase):
    """Requests over TLS end at a newline or after the quiet gap, as over plain TCP."""

    def setUp(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        key, self.certificate = selfSignedCertificate(folder)
        self.server = ServerProcess(os.path.join(folder, "records.txt"), "--quiet", "0.2",
                                    port=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={self.certificate}")
        self.addCleanup(lambda: self.assertEqual(self.server.stop(), 0, self.server.log))

    def ask(self, payload: bytes) -> bytes:
        """Send C{payload} over a verified TLS connection to localhost; return all the server sends."""
        context = ssl.create_default_context(cafile=self.certificate)
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as connection:
                connection.sendall(payload)
                received = b""
                while True:
                    try:
                        chunk = connection.recv(65536)
                    except ssl.SSLZeroReturnError:
                        break
                    if not chunk:
                        break
                    received += chunk
                return received

    def test_newline(self) -> None:
        """A line over TLS gets its answer and the connection closes."""
        self.assertEqual(self.ask("añoñ\n".encode()), expectedReply("añoñ"))

    def test_quietGap(self) -> None:
        """A message with no newline over TLS is answered after the quiet gap."""
        started = time.monotonic()
        self.assertEqual(self.ask(b"abc2a"), expectedReply("abc2a"))
        self.assertGreaterEqual(time.monotonic() - started, 0.2)


def handshake(port: int, *arguments: str) -> subprocess.CompletedProcess:
    """A real C{openssl s_client} handshake with C{arguments} (a version, a cipher), sending one request."""
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-ign_eof", *arguments],
                          input=b"abc2a\n", capture_output=True, timeout=30)


class CipherTests(SynchronousTestCase):
    """The ssl: port offers Mozilla's intermediate suites by default, and --tls-ciphers narrows them; checked
    with a real openssl s_client."""

    def start(self, *options: str) -> ServerProcess:
        """A TLS server with a fresh EC certificate and C{options}."""
        requireTool(self, "openssl")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        key, certificate = selfSignedCertificate(folder)
        server = ServerProcess(os.path.join(folder, "records.txt"), *options,
                               port=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}")
        self.addCleanup(lambda: self.assertEqual(server.stop(), 0, server.log))
        return server

    def assertAccepted(self, port: int, *arguments: str) -> None:
        """The handshake succeeds and the request is answered."""
        result = handshake(port, *arguments)
        self.assertIn(expectedReply("abc2a"), result.stdout, arguments + (result.stderr,))

    def assertRefused(self, port: int, *arguments: str) -> None:
        """The server refuses the handshake: no reply, a handshake failure alert."""
        result = handshake(port, *arguments)
        self.assertNotIn(expectedReply("abc2a"), result.stdout, arguments)
        self.assertIn(b"handshake failure", result.stdout + result.stderr, arguments)

    def test_intermediateByDefault(self) -> None:
        """Static-RSA and CBC suites are refused over TLS 1.2, ECDHE with AES-GCM or ChaCha20 accepted, and
        TLS 1.3 works as before."""
        port = self.start().port
        for cipher in ("AES128-SHA", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):
            self.assertRefused(port, "-tls1_2", "-cipher", cipher)
        for cipher in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
            self.assertAccepted(port, "-tls1_2", "-cipher", cipher)
        self.assertAccepted(port, "-tls1_3")

    def test_narrowed(self) -> None:
        """C{--tls-ciphers} leaves only the suites it names."""
        port = self.start("--tls-ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305").port
        self.assertAccepted(port, "-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305")
        self.assertRefused(port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")


class CipherOptionTests(SynchronousTestCase):
    """C{--tls-ciphers} is checked at parse time, and the Twisted internal it relies on is still there."""

    def test_badValues(self) -> None:
        """A cipher list OpenSSL cannot use, or one given without an ssl: port, is a UsageError naming it."""
        from twisted.python.usage import UsageError

        from primecount.options import Options

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        key, certificate = selfSignedCertificate(folder)
        records = os.path.join(folder, "records.txt")
        for arguments in (["--port", f"ssl:0:privateKey={key}:certKey={certificate}", "--tls-ciphers", "NOPE"],
                          ["--port", "5050", "--tls-ciphers", "ECDHE-RSA-AES128-GCM-SHA256"]):
            with self.assertRaises(UsageError) as caught:
                Options().parseOptions([*arguments, "--records", records])
            self.assertTrue(str(caught.exception).startswith("--tls-ciphers: "), str(caught.exception))


class BadKeyTests(SynchronousTestCase):
    """A key OpenSSL cannot load, or one that does not match its certificate, is one line naming --port."""

    def test_certificateAsKeyAndMismatchedKey(self) -> None:
        """The certificate given as the private key, and another pair's key: a UsageError each, in words, from
        the options and from a real twistd (one line on stderr, exit 1, no traceback)."""
        from twisted.python.usage import UsageError

        from primecount.options import Options
        from primecount.tools.serverprocess import TWISTD

        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "other"))
        key, certificate = selfSignedCertificate(folder)
        otherKey, _ = selfSignedCertificate(os.path.join(folder, "other"))
        for port, said in ((f"ssl:0:privateKey={certificate}:certKey={certificate}",
                            "OpenSSL cannot load the key or the certificate ("),
                           (f"ssl:0:privateKey={otherKey}:certKey={certificate}",
                            "Certificate public and private keys do not match.")):
            with self.assertRaises(UsageError) as caught:
                Options().parseOptions(["--port", port, "--records", os.path.join(folder, "records.txt")])
            self.assertTrue(str(caught.exception).startswith(f"--port: cannot use {port!r}: {said}"),
                            str(caught.exception))
            result = subprocess.run([*TWISTD, "-n", "--pidfile=", "primecount", "--port", port, "--records",
                                     os.path.join(folder, "records.txt")], capture_output=True, text=True, timeout=60)
            self.assertEqual((result.returncode, result.stderr.count("\n")), (1, 1), result.stderr)
            self.assertIn(f"--port: cannot use {port!r}: {said}", result.stderr)
            self.assertNotIn("Traceback", result.stdout + result.stderr)


class WithoutTLSSupportTests(SynchronousTestCase):
    """Without pyOpenSSL an ssl: port is a one-line usage error that says what to install."""

    def test_oneLineUsageError(self) -> None:
        """The error names the option and the extra to install, not a traceback."""
        probe = ("import sys; sys.modules['OpenSSL'] = None\n"
                 "from twisted.python.usage import UsageError\n"
                 "from primecount.options import Options\n"
                 "try:\n"
                 "    Options().parseOptions(['--port', 'ssl:5051:privateKey=key.pem:certKey=cert.pem',"
                 " '--records', sys.argv[1]])\n"
                 "except UsageError as error:\n"
                 "    print(error)\n")
        result = subprocess.run([sys.executable, "-c", probe, self.mktemp()], capture_output=True, text=True)
        self.assertEqual(result.stderr, "")
        self.assertTrue(result.stdout.startswith("--port: 'ssl:5051:privateKey=key.pem:certKey=cert.pem' needs TLS "
                                                 "support, which is not installed"), result.stdout)
        self.assertIn("pip install 'primecount[tls]'", result.stdout)


class InMemoryTLS:
    """A primecount factory behind Twisted's own TLS layer on a L{StringTransport}, with a pyOpenSSL client
    driven by hand: the bytes each side sends are moved only when L{pump} is called."""

    def __init__(self, test: SynchronousTestCase, limits: Any = None, maxConnections: int = 100) -> None:
        from OpenSSL import SSL
        from twisted.internet.address import IPv4Address
        from twisted.internet.ssl import DefaultOpenSSLContextFactory
        from twisted.internet.task import Clock
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from primecount.connection import RequestLimits
        from primecount.limits import ConnectionLimits
        from primecount.responder import Responder
        from tests.helpers import HalfCloseTransport, InlineThreads, MemoryRecords, RecordingMetrics, requestFactory

        folder = os.path.abspath(test.mktemp())
        os.makedirs(folder)
        key, certificate = selfSignedCertificate(folder)
        self.clock, self.metrics = Clock(), RecordingMetrics()
        self.limits = limits or RequestLimits(timeout=5.0, quiet=0)
        factory = requestFactory(self.limits, self.clock, Responder(self.clock, InlineThreads(), MemoryRecords()),
                                    self.metrics, ConnectionLimits(maxConnections, 0))
        tlsFactory = TLSMemoryBIOFactory(DefaultOpenSSLContextFactory(key, certificate), False, factory, self.clock)
        self.transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000))
        self.server = tlsFactory.buildProtocol(self.transport.getPeer())
        self.server.makeConnection(self.transport)
        self.client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        self.client.set_connect_state()
        self.received = b""
        self.closeNotified = False

    def pump(self, send: bytes = b"") -> None:
        """Move bytes both ways until neither side has more; C{send} goes out once the handshake allows."""
        from OpenSSL import SSL

        pending = send
        for _ in range(20):
            try:
                self.client.do_handshake()
                if pending:
                    self.client.send(pending)
                    pending = b""
            except SSL.WantReadError:
                pass
            try:
                toServer = self.client.bio_read(65536)
            except SSL.WantReadError:
                toServer = b""
            if toServer and not self.transport.disconnecting:
                self.server.dataReceived(toServer)
            self.clock.advance(0)
            toClient = self.transport.value()
            self.transport.clear()
            if toClient:
                self.client.bio_write(toClient)
                self._read()
            if not toServer and not toClient:
                return

    def _read(self) -> None:
        from OpenSSL import SSL

        while True:
            try:
                self.received += self.client.recv(65536)
            except SSL.ZeroReturnError:
                self.closeNotified = True
                return
            except SSL.Error:
                return


class TLSLayerTests(SynchronousTestCase):
    """Over Twisted's TLS layer, byte by byte: a refusal waits for the handshake and is read whole, nothing
    half-closes the TCP stream under TLS, and the handshake and the close are bounded."""

    def test_busyReadAfterHandshake(self) -> None:
        """A connection over the limit gets C{ERROR busy} once its handshake is over, then TLS's close_notify;
        the TCP stream is never half-closed under it."""
        tls = InMemoryTLS(self, maxConnections=0)
        tls.pump()
        self.assertEqual((tls.received, tls.closeNotified), (b"ERROR busy\n", True))
        self.assertFalse(tls.transport.writeClosed, "a half-close under TLS cuts the reply")

    def test_errorReplyEndsWithCloseNotify(self) -> None:
        """An ERROR over TLS (an empty line) arrives whole, followed by close_notify, not by a bare TCP FIN."""
        tls = InMemoryTLS(self)
        tls.pump(b"\n")
        self.assertEqual((tls.received, tls.closeNotified), (b"ERROR empty message\n", True))
        self.assertFalse(tls.transport.writeClosed)

    def test_handshakeWithinTheRequestDeadline(self) -> None:
        """A client that never finishes its handshake is aborted at the request deadline, and counted."""
        tls = InMemoryTLS(self)
        tls.clock.advance(tls.limits.timeout - 0.01)
        self.assertFalse(tls.transport.disconnected)
        tls.clock.advance(0.01)
        self.assertTrue(tls.transport.disconnected)
        self.assertIn(("connectionAborted", "handshake_timeout"), tls.metrics.events)

    def test_closeWithinTheLinger(self) -> None:
        """After the reply and close_notify, a client that never answers them is aborted after the linger time;
        the handshake's deadline no longer applies once it is over."""
        tls = InMemoryTLS(self)
        tls.pump(b"abc2a\n")
        self.assertEqual((tls.received, tls.closeNotified), (expectedReply("abc2a"), True))
        tls.clock.advance(tls.limits.linger - 0.01)
        self.assertFalse(tls.transport.disconnected)
        tls.clock.advance(0.01)
        self.assertTrue(tls.transport.disconnected)
        self.assertIn(("connectionAborted", "close_timeout"), tls.metrics.events)
        self.assertNotIn(("connectionAborted", "handshake_timeout"), tls.metrics.events)

    def test_answeredCloseIsNotAborted(self) -> None:
        """A client that answers close_notify is closed cleanly (its TCP connection closed, not reset)."""
        tls = InMemoryTLS(self)
        tls.pump(b"abc2a\n")
        tls.client.shutdown()
        tls.pump()
        self.assertTrue(tls.transport.disconnecting)
        tls.server.connectionLost(None)
        tls.clock.advance(60)
        self.assertFalse(tls.transport.disconnected)
        self.assertEqual([e for e in tls.metrics.events if e[0] == "connectionAborted"], [])


class RefusedOverTLSTests(SynchronousTestCase):
    """A real twistd on an ssl: port at its connection limit: refused clients read C{ERROR busy}, nothing is
    logged as a traceback, and a client that never handshakes is closed by the request deadline."""

    def test_refusedClientsReadBusy(self) -> None:
        """With both slots held, 20 more TLS clients each read C{ERROR busy}; no traceback is logged; a raw TCP
        connect that never handshakes is closed within the deadline and counted."""
        import threading

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        key, certificate = selfSignedCertificate(folder)
        server = ServerProcess(os.path.join(folder, "records.txt"), "--max-connections", "3", "--max-per-ip", "0",
                               "--timeout", "2", "--metrics", "tcp:0:interface=127.0.0.1",
                               port=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}")
        metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        context = ssl.create_default_context(cafile=certificate)
        held = []
        try:
            silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # never handshakes
            held.append(silent)
            for _ in range(2):
                raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                held.append(context.wrap_socket(raw, server_hostname="localhost"))
            replies: list[bytes] = []

            def refused() -> None:
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                    with context.wrap_socket(raw, server_hostname="localhost") as connection:
                        connection.sendall(b"hello\n")
                        received = b""
                        while True:
                            try:
                                chunk = connection.recv(100)
                            except ssl.SSLZeroReturnError:
                                break
                            if not chunk:
                                break
                            received += chunk
                        replies.append(received)

            threads = [threading.Thread(target=refused) for _ in range(20)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            self.assertEqual(replies, [b"ERROR busy\n"] * 20)
            try:
                ended = silent.recv(100)
            except ConnectionResetError:  # aborted: nothing could be said to a client that is not yet on TLS
                ended = b""
            self.assertEqual(ended, b"", "the silent client is closed by the deadline")
            aborted = scrape(metricsPort)['primecount_connections_aborted_total{reason="handshake_timeout"}']
            self.assertGreaterEqual(aborted, 1)
        finally:
            for connection in held:
                connection.close()
            status = server.stop()
        self.assertEqual(status, 0, server.log)
        self.assertNotIn("Traceback", server.log)
        self.assertNotIn("Unhandled Error", server.log)
