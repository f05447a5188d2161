"""Tests for L{primecount.wire}: bytes of a request to an outcome, and outcomes to reply bytes."""

from twisted.trial.unittest import SynchronousTestCase

from primecount import wire


class EvaluateTests(SynchronousTestCase):
    """L{wire.evaluate} decodes, strips and analyses, or names the problem."""

    def test_answer(self) -> None:
        """A plain message is answered with its stripped text, count and primality."""
        self.assertEqual(wire.evaluate(b"  abc2a \r"), wire.Answer("abc2a", 2, True))

    def test_utf8(self) -> None:
        """The bytes are UTF-8: C{añoñ} counts 2 C{ñ}."""
        self.assertEqual(wire.evaluate("añoñ".encode()), wire.Answer("añoñ", 2, True))

    def test_invalidUTF8(self) -> None:
        """Bytes that are not UTF-8 are rejected as such."""
        self.assertEqual(wire.evaluate(b"ab\xff"), wire.Rejection(wire.INVALID_UTF8))

    def test_empty(self) -> None:
        """No bytes, or only whitespace, is an empty message."""
        self.assertEqual(wire.evaluate(b""), wire.Rejection(wire.EMPTY_MESSAGE))
        self.assertEqual(wire.evaluate(b" \t\r\x0b "), wire.Rejection(wire.EMPTY_MESSAGE))

    def test_evaluateAllKeepsOrder(self) -> None:
        """A batch is evaluated in order, one outcome per request."""
        self.assertEqual(
            wire.evaluateAll([b"aa", b"", b"xyz"]),
            [wire.Answer("aa", 2, True), wire.Rejection(wire.EMPTY_MESSAGE), wire.Answer("xyz", 1, False)],
        )


class ReplyTests(SynchronousTestCase):
    """Replies are single UTF-8 lines."""

    def test_replyLine(self) -> None:
        """A prime count says C{sí}, any other says C{no}."""
        self.assertEqual(wire.replyLine(wire.Answer("aa", 2, True)), "2 sí\n".encode())
        self.assertEqual(wire.replyLine(wire.Answer("a", 1, False)), b"1 no\n")

    def test_errorLine(self) -> None:
        """A rejection is C{ERROR <reason>} on one line."""
        self.assertEqual(wire.errorLine(wire.lineTooLong(10)), b"ERROR line too long (max 10 bytes)\n")


class TypedReplyTests(SynchronousTestCase):
    """Replies carry their bytes, a short metrics label, and whether they are errors that end the connection."""

    def test_answer(self) -> None:
        """An answer is labelled C{ok} and is not an error."""
        self.assertEqual(wire.answerReply(wire.Answer("aa", 2, True)), wire.Reply("2 sí\n".encode(), "ok", False, False))

    def test_labels(self) -> None:
        """Each ERROR reason becomes a lower-case word joined by underscores, the limit in brackets left out."""
        self.assertEqual(wire.errorReply(wire.lineTooLong(9), closes=True),
                         wire.Reply(b"ERROR line too long (max 9 bytes)\n", "line_too_long", True, True))
        self.assertEqual(wire.errorReply(wire.INVALID_UTF8).outcome, "invalid_utf8")
        self.assertEqual(wire.errorReply(wire.STORAGE_UNAVAILABLE).outcome, "storage_unavailable")
        self.assertFalse(wire.errorReply(wire.EMPTY_MESSAGE).closes)

    def test_text(self) -> None:
        """The text of a reply, for logs, is the line without its newline."""
        self.assertEqual(wire.errorReply(wire.TIMEOUT).text, "ERROR timeout")
