"""The only code that reaches under Twisted's public interfaces (private names, concrete classes' methods, the
socket itself), each function with a test in C{tests/test_internals.py}; C{tests/test_layout.py} checks no other
module does."""

from __future__ import annotations

import fcntl
import struct
import termios
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import abstract, main, tcp
from twisted.internet.interfaces import ITransport
from twisted.python.failure import Failure

if TYPE_CHECKING:  # Python 3.10's; the package runs on 3.9 (PyPy's among them), where annotations stay text
    from typing import TypeGuard


def _openTCP(transport: ITransport) -> TypeGuard[tcp.Connection]:
    """Whether C{transport} is a TCP connection that is connected and not closing."""
    return isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting


def _idleTCP(transport: ITransport) -> TypeGuard[tcp.Connection]:
    """Whether C{transport} is an open TCP connection with nothing queued in Twisted's write buffers
    (L{sendNow} repeats this check inline, for speed)."""
    return _openTCP(transport) and not transport.dataBuffer and not transport._tempDataBuffer


def parseServerEndpoint(description: str) -> Any:
    """The server endpoint C{description} names, parsed as C{serverFromString} parses it (raising what it
    raises), against Twisted's C{MemoryReactor}, a testing class: checking options must not import the real
    reactor, which twistd installs only later, as C{--reactor} says."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    return serverFromString(MemoryReactor(), description)


def sendNow(transport: ITransport, data: bytes) -> None:
    """Write C{data} to C{transport}, sending it in this call when nothing is queued before it.

    C{transport.write} only queues: the bytes go out on the reactor's next
    turn, after registering for writability and being told of it, two
    C{epoll_ctl} calls and a poll per write. For a TCP connection with an
    empty write buffer this sends at once on the transport's socket (as its
    own C{writeSomeData} would, without the two calls around it); anything
    the kernel does not take, an error, and every other transport (TLS,
    tests) go through C{write} as usual, so the buffer limits, producer
    pausing and error handling still apply. Reads C{tcp.Connection}'s
    C{socket}, C{dataBuffer}, C{_tempDataBuffer} and C{_writeDisconnecting}.
    """
    # _idleTCP's conditions, written out: calling it (and _openTCP within) costs about 2% of a kept request's
    # instructions (contrib/bench/instructions.py). Change both together.
    if (isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting
            and not transport.dataBuffer and not transport._tempDataBuffer and not transport._writeDisconnecting):
        try:
            sent = transport.socket.send(data)
        except OSError:  # full (EAGAIN) or failing: write queues it, and its own send sees any error
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


# The reason every orderly close reports, made once: a Failure works out its exception's class names the
# first time it is checked, about 5% of the reactor thread when made per connection (a one-shot profile).
# Twisted's reactor keeps one ConnectionDone failure for all its closes the same way, in _disconnectSelectable.
_CONNECTION_DONE = Failure(main.CONNECTION_DONE)


def closeNow(transport: ITransport) -> None:
    """Close C{transport} in this call when everything written has been handed to the kernel; otherwise
    (bytes still queued, a producer registered, any other transport) with C{loseConnection}.

    C{loseConnection} always waits for one more turn: it registers for
    writability, is told of it, finds nothing to write and only then closes.
    With nothing queued this closes at once the way Twisted's own
    C{loseConnection} does for a connection whose write side is already shut:
    stop reading and writing, then C{connectionLost} with C{CONNECTION_DONE}
    (an orderly close: shutdown, then close; the protocol's C{connectionLost}
    runs before this returns, with one shared failure). Reads
    C{tcp.Connection}'s C{dataBuffer} and C{_tempDataBuffer}.
    """
    if _idleTCP(transport) and transport.producer is None:
        transport.stopReading()
        transport.stopWriting()
        transport.connectionLost(_CONNECTION_DONE)
        return
    transport.loseConnection()


def readWaiting(transport: ITransport) -> bytes:
    """The bytes a new connection's client has already sent, read at once (C{b""} if none yet).

    A client sends its request right after connecting, so on a busy server the
    request is usually in the socket before the connection is accepted; read
    there and then, it is taken without a poll and a read event of its own, and
    without a deadline timer armed and cancelled. Only for a TCP connection that
    is reading (not TLS, not behind the PROXY-header reader: those get
    C{b""}). What this read cannot take (nothing yet, the end of input) is left
    for the reactor's own next read, which sees it again. An error (a reset
    before any byte) is taken here, so that read sees the end of input instead:
    the protocol treats the two alike. Reads C{tcp.Connection}'s socket through
    C{getHandle} and its C{bufferSize}.
    """
    if _openTCP(transport):
        try:
            return transport.getHandle().recv(transport.bufferSize)
        except OSError:
            return b""
    return b""


def queuedBytes(transport: ITransport) -> int:
    """How many bytes written to C{transport} its client has not taken yet: still in the process, or in the
    kernel's send queue unacknowledged (0 for transports it cannot see into).

    Twisted has no public way to ask. This reads, on the way down through any
    wrapping layers (the PROXY-header reader, TLS), a TLS layer's cleartext
    waiting for its handshake (C{_appSendBuffer}), the TCP connection's write
    buffers (C{dataBuffer} from C{offset}, and C{_tempDataLen} more), and the
    socket's send queue (C{SIOCOUTQ}, Linux). The kernel's part matters: a
    client that never reads leaves megabytes of replies in the server's socket
    buffer before any stay in Twisted's.
    """
    queued, layer = 0, transport
    while layer is not None:
        if isinstance(layer, abstract.FileDescriptor):
            return queued + len(layer.dataBuffer) - layer.offset + layer._tempDataLen + _kernelQueued(layer)
        queued += sum(map(len, getattr(layer, "_appSendBuffer", ())))
        layer = getattr(layer, "transport", None)
    return queued


def _kernelQueued(descriptor: abstract.FileDescriptor) -> int:
    """Bytes in a socket's send queue that its peer has not acknowledged (0 where that cannot be asked)."""
    try:
        return struct.unpack("i", fcntl.ioctl(descriptor.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError, AttributeError):
        return 0


def withContextFactory(endpoint: Any, wrap: Callable[[Any], Any]) -> Any:
    """The C{ssl:} server endpoint C{endpoint}, listening with the TLS context factory C{wrap} makes of its own:
    L{twisted.internet.endpoints.SSL4ServerEndpoint} keeps it in C{_sslContextFactory}, with no public way to
    change it after C{serverFromString} built it."""
    endpoint._sslContextFactory = wrap(endpoint._sslContextFactory)
    return endpoint


def acceptQueued(port: Any) -> int:
    """Accept every connection waiting in a TCP C{port}'s queue now; return how many (0 for other ports).

    Calls C{tcp.Port.doRead}, which accepts up to C{numberAccepts} connections
    and raises that batch size when a batch filled up (so a batch that did
    not raise it emptied the queue), and counts them by C{sessionno}.
    """
    doRead = getattr(port, "doRead", None)
    if doRead is None or not hasattr(port, "numberAccepts"):
        return 0
    before = getattr(port, "sessionno", 0)
    while True:
        allowed = port.numberAccepts
        doRead()
        if port.numberAccepts <= allowed:
            return getattr(port, "sessionno", before) - before


def stopAccepting(port: Any) -> int:
    """Keep a listening C{tcp.Port} open but accept nothing on it (C{stopReading}; the workers accept instead);
    return its socket's descriptor (C{fileno}), for the workers to inherit."""
    port.stopReading()
    return port.fileno()


def proxyV2Parser() -> Any:
    """A new parser of PROXY protocol v2 headers: Twisted's own, from its private C{_v2parser} module (its
    public C{HAProxyProtocol} wraps a whole connection; this is fed bytes)."""
    from twisted.protocols.haproxy._v2parser import V2Parser

    return V2Parser()
