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

from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.serverprocess import ServerProcess
from tests.helpers import expectedReply, requireTool


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

        from primecount.tap import Options

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        key, certificate = selfSignedCertificate(folder)
        records = os.path.join(folder, "records.txt")
        for arguments in (["--port", f"ssl:0:privateKey={key}:certKey={certificate}", "--tls-ciphers", "NOPE"],
                          ["--port", "5050", "--tls-ciphers", "ECDHE-RSA-AES128-GCM-SHA256"]):
            with self.assertRaises(UsageError) as caught:
                Options().parseOptions([*arguments, "--records", records])
            self.assertTrue(str(caught.exception).startswith("--tls-ciphers: "), str(caught.exception))

    def test_twistedKeepsTheContextFactoryWhereExpected(self) -> None:
        """C{serverFromString} still gives an ssl: endpoint with C{_sslContextFactory}, which L{withCiphers}
        replaces; this fails if Twisted changes under it."""
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        from primecount.tls import MOZILLA_INTERMEDIATE, withCiphers

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        key, certificate = selfSignedCertificate(folder)
        endpoint = serverFromString(MemoryReactor(), f"ssl:0:privateKey={key}:certKey={certificate}")
        self.assertTrue(hasattr(endpoint, "_sslContextFactory"))
        context = withCiphers(endpoint, MOZILLA_INTERMEDIATE)._sslContextFactory.getContext()
        self.assertIs(context, endpoint._sslContextFactory.getContext(), "built once")


class WithoutTLSSupportTests(SynchronousTestCase):
    """Without pyOpenSSL an ssl: port is a one-line usage error that says what to install."""

    def test_oneLineUsageError(self) -> None:
        """The error names the option and the extra to install, not a traceback."""
        probe = ("import sys; sys.modules['OpenSSL'] = None\n"
                 "from twisted.python.usage import UsageError\n"
                 "from primecount.tap import Options\n"
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
