"""The only code that reads Twisted's private attributes, for speed and for the send deadline; each function
here has a test in C{tests/test_internals.py} that fails if Twisted changes under it."""

from __future__ import annotations

import fcntl
import struct
import termios

from twisted.internet import abstract, tcp
from twisted.internet.interfaces import ITransport


def sendNow(transport: ITransport, data: bytes) -> None:
    """Write C{data} to C{transport}, sending it in this call when nothing is queued before it.

    C{transport.write} only queues: the bytes go out on the reactor's next
    turn, after registering for writability and being told of it, two
    C{epoll_ctl} calls and a poll per write. For a TCP connection with an
    empty write buffer this sends at once with the transport's own
    C{writeSomeData}; anything the kernel does not take, and every other
    transport (TLS, tests), goes through C{write} as usual, so the buffer
    limits and producer pausing still apply. Reads C{tcp.Connection}'s
    C{dataBuffer}, C{_tempDataBuffer} and C{_writeDisconnecting}.
    """
    if (
        isinstance(transport, tcp.Connection)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent >= 0:
            data = data[sent:]
        if not data:
            return
    transport.write(data)


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
