"""Properties of everything intake parses from untrusted bytes.

- arbitrary argument text never makes the command parsers raise anything but a
  ``CommandError`` carrying a well-formed reply;
- arbitrary lines, bodies and exchanges never crash the session, and every reply it
  produces is well-formed on the wire;
- a message written with the delivery client's dot-stuffing and read by intake's DATA
  reader and body checks comes back byte for byte, however the bytes are split into
  reads.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from ferry.delivery.client import dot_stuff
from ferry.envelope import Reply
from ferry.intake import commands
from ferry.intake.commands import CommandError
from ferry.intake.server import DataReader
from ferry.intake.session import (
    Authenticate,
    Close,
    Enqueue,
    ReceiveData,
    StartTls,
    check_body,
    reply_bytes,
)
from tests.intake.test_session import make_session

# RFC 5321 §4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
#                            Reply-code [ SP textstring ] CRLF
_WIRE_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*\r\n")
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")


def assert_well_formed(reply: Reply) -> None:
    """What the client will see: lines of code, separator and text, the last with a
    space, the code the same on every line, and the enhanced code in its class."""
    wire = reply_bytes(reply)
    lines = wire.splitlines(keepends=True)
    assert lines, reply
    for i, line in enumerate(lines):
        assert _WIRE_LINE.fullmatch(line), line
        assert line[:3] == lines[0][:3]
        assert line[3:4] == (b" " if i == len(lines) - 1 else b"-")
    if reply.enhanced is not None:
        assert _ENHANCED.match(reply.enhanced), reply
        assert reply.enhanced[0] == str(reply.code)[0], reply


# Text a client may put after a verb: anything but the line end the server splits at.
arg_text = st.text(st.characters(exclude_characters="\n"), max_size=80)
ascii_args = st.text(st.sampled_from('<>@:;=+-. "\\,[]aAzZ09\t\r\x00é'), max_size=60)
args = st.one_of(arg_text, ascii_args, st.none())


@given(args, st.sampled_from(["FROM", "TO"]))
def test_path_parser_raises_only_command_errors(arg: str | None, keyword: str) -> None:
    try:
        path = commands.parse_path_arg(arg, keyword, smtputf8_offered=True)
    except CommandError as exc:
        assert exc.reply.code in (501, 553, 555)
        assert_well_formed(exc.reply)
        return
    assert len(path.address) <= commands.MAX_PATH
    for key in path.params:
        assert key == key.upper()
    # The address checks answer with a problem or None; they never raise.
    commands.check_mailbox(path.address, utf8=True)
    commands.check_mailbox(path.address, utf8=False)


@given(st.one_of(arg_text, st.none()))
def test_parameter_value_parsers_raise_only_command_errors(value: str | None) -> None:
    for parse in (commands.parse_orcpt, commands.parse_mt_priority, commands.decode_xtext):
        try:
            parse(value) if parse is not commands.decode_xtext else parse(value or "")
        except CommandError as exc:
            assert exc.reply.code == 501
            assert_well_formed(exc.reply)


# Valid mailboxes, from the RFC 5321 §4.1.2 grammar.
atom = st.text(st.sampled_from("abcxyzABC019!#$%&'*+/=?^_`{|}~-"), min_size=1, max_size=8)
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
mailboxes = st.builds(
    lambda atoms, labels: ".".join(atoms) + "@" + ".".join(labels),
    st.lists(atom, min_size=1, max_size=3),
    st.lists(label, min_size=1, max_size=4),
)
params = st.dictionaries(
    st.from_regex(r"[A-Z][A-Z0-9-]{0,10}", fullmatch=True),
    st.one_of(st.none(), st.from_regex(r"[!-<>-~]{1,12}", fullmatch=True)),
    max_size=4,
)


@given(mailboxes, params, st.sampled_from(["FROM", "TO"]))
def test_valid_paths_parse_back(address: str, values: dict[str, str | None], keyword: str) -> None:
    text = " ".join(k if v is None else f"{k}={v}" for k, v in values.items())
    arg = f"{keyword}:<{address}> {text}".rstrip()
    path = commands.parse_path_arg(arg, keyword, smtputf8_offered=True)
    assert path.address == address
    assert path.params == values
    assert commands.check_mailbox(address, utf8=False) is None


@given(st.text(max_size=40))
def test_xtext_round_trips(text: str) -> None:
    assert commands.decode_xtext(commands.encode_xtext(text)) == text


# -- the session ---------------------------------------------------------------------

VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "STARTTLS",
         "AUTH", "VRFY", "HELP", "BDAT", "mail", "rcpt"]  # fmt: skip
USEFUL = [
    b"EHLO c", b"HELO c", b"MAIL FROM:<s@example.org>", b"MAIL FROM:<>",
    b"RCPT TO:<a@example.net>", b"RCPT TO:<info@local.test>", b"DATA",
    b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH PLAIN AGFsaWNlAHMzY3JldA==", b"STARTTLS",
    b"*", b"YWxpY2U=",
]  # fmt: skip


def _verb_line(verb: str, arg: str) -> bytes:
    return (verb + " " + arg).encode("utf-8", "surrogatepass")


line_bytes = st.binary(max_size=120).map(lambda b: b.replace(b"\n", b""))
command_lines = st.one_of(
    line_bytes,
    st.builds(_verb_line, st.sampled_from(VERBS), arg_text),
    st.sampled_from(USEFUL),
    st.none(),  # a line over the limit
)
bodies = st.binary(max_size=300)
settings_choices = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["mta", "submission", "smtps"]),
        "tls": st.sampled_from([None, "TLSv1.3"]),
        "tls_available": st.booleans(),
        "require_helo": st.booleans(),
        "bare_lf": st.sampled_from(["reject", "normalize"]),
        "max_errors": st.integers(1, 30),
    }
)


@given(settings_choices, st.lists(command_lines, max_size=25), bodies, st.booleans())
def test_session_never_crashes_and_replies_well_formed(
    choices: dict[str, object], lines: list[bytes | None], body: bytes, auth_ok: bool
) -> None:
    session = make_session(choices)
    pending = list(session.greet())
    feed = iter(lines)
    while True:
        closed = False
        while pending:
            action = pending.pop(0)
            if isinstance(action, Reply):
                assert_well_formed(action)
            elif isinstance(action, Close):
                closed = True
            elif isinstance(action, ReceiveData):
                buf = bytearray(dot_stuff(body))
                done = DataReader(action.limit).feed(buf)
                assert done is not None and not buf
                pending += session.data_received(*done)
            elif isinstance(action, Enqueue):
                assert action.envelope.recipients
                pending += session.enqueued()
            elif isinstance(action, Authenticate):
                pending += (
                    session.auth_succeeded(action.username, None)
                    if auth_ok
                    else session.auth_failed(1)
                )
            else:
                assert isinstance(action, StartTls)
                pending += session.tls_started("TLSv1.3")
        if closed:
            assert session.state == "closed"
            return
        line = next(feed, b"QUIT")
        pending = session.receive_line(line)
        # Every line gets an answer (a reply, or an action that leads to one).
        assert pending, line


# -- the DATA reader and dot-stuffing ------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def read_body(wire: bytes, cuts: list[int], limit: int) -> tuple[bytes | None, int, bytes]:
    """Feed ``wire`` to a DataReader in the given pieces, as the server does: ``feed``
    only after a read that ``ready`` says has work; return its result and what was
    left in the buffer (the next pipelined command)."""
    reader = DataReader(limit)
    buf = bytearray()
    assert reader.feed(buf) is None
    pieces = chunked(wire, cuts)
    for i, piece in enumerate(pieces):
        buf += piece
        if not reader.ready(buf):
            continue
        done = reader.feed(buf)
        if done is not None:
            return done[0], done[1], bytes(buf) + b"".join(pieces[i + 1 :])
    raise AssertionError("terminator not found")


crlf_messages = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=12,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
dotty_messages = st.lists(
    st.sampled_from([b".", b"..", b".x", b"", b"x", b"\r\n.\r\n", b"\r", b"\n", b"\x00"]),
    max_size=20,
).map(lambda parts: b"".join(parts))
messages = st.one_of(crlf_messages, dotty_messages, st.binary(max_size=200))
cuts = st.lists(st.integers(0, 10_000), max_size=8)


@given(crlf_messages, cuts)
def test_dot_stuffed_message_round_trips_byte_for_byte(message: bytes, where: list[int]) -> None:
    wire = dot_stuff(message) + b"QUIT\r\n"
    raw, size, rest = read_body(wire, where, limit=100_000)
    assert raw is not None and size == len(raw)
    assert check_body(raw, 100_000, "reject") == message
    assert rest == b"QUIT\r\n"


@given(messages, cuts)
def test_any_message_round_trips_with_crlf_line_ends(message: bytes, where: list[int]) -> None:
    # dot_stuff turns bare CR and LF into CRLF (RFC 5321 §2.3.8) and ends the last
    # line; apart from that the bytes come back unchanged.
    expected = _LINE_END.sub(b"\r\n", message)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    raw, _, rest = read_body(dot_stuff(message) + b"NOOP\r\n", where, limit=100_000)
    assert raw is not None
    assert check_body(raw, 100_000, "reject") == expected
    assert rest == b"NOOP\r\n"


@given(messages, cuts, st.integers(0, 300))
def test_oversized_bodies_are_measured_and_dropped(
    message: bytes, where: list[int], limit: int
) -> None:
    wire = dot_stuff(message)
    body_size = len(wire) - 3 if wire != b".\r\n" else 0  # without the final ".\r\n"
    raw, size, rest = read_body(wire + b"RSET\r\n", where, limit=limit)
    assert size == body_size
    assert (raw is None) == (size > limit)
    assert rest == b"RSET\r\n"


@given(st.binary(max_size=400), cuts)
def test_data_reader_on_arbitrary_bytes(data: bytes, where: list[int]) -> None:
    """Whatever arrives, the reader either waits or returns a body that ends with CRLF
    and contains no terminator; nothing after the terminator is consumed."""
    reader = DataReader(200)
    buf = bytearray()
    fed = 0
    for piece in chunked(data, where):
        buf += piece
        fed += len(piece)
        done = reader.feed(buf)
        if done is not None:
            raw, size = done
            if raw is not None:
                assert raw == b"" or raw.endswith(b"\r\n")
                assert b"\r\n.\r\n" not in raw
                assert data.startswith(raw)
                consumed = len(raw) + 3
                assert bytes(buf) == data[consumed:fed]
            assert size >= 0
            return
    assert b"\r\n.\r\n" not in data and not data.startswith(b".\r\n")


@given(st.binary(max_size=400), cuts, st.integers(0, 300))
def test_reading_only_when_ready_gives_what_reading_every_time_gives(
    data: bytes, where: list[int], limit: int
) -> None:
    """The server wakes its reading task only when ``ready`` says so: that must never
    miss a terminator or a trim (same body, same size, same buffer left)."""
    every, gated = DataReader(limit), DataReader(limit)
    buf_every, buf_gated = bytearray(), bytearray()
    for piece in chunked(data, where):
        buf_every += piece
        buf_gated += piece
        want = every.feed(buf_every)
        got = gated.feed(buf_gated) if gated.ready(buf_gated) else None
        assert got == want
        assert gated.received(buf_gated) == every.received(buf_every)
        if want is not None:
            assert buf_gated == buf_every
            return


def reference_check(raw: bytes, max_line: int, bare_lf: str) -> bytes | None:
    """The body checks written the slow, obvious way: line by line."""
    lines = re.split(rb"\r\n|\r|\n", raw)
    if bare_lf == "reject" and len(lines) - 1 != raw.count(b"\r\n"):
        return None
    if any(len(line) > max_line for line in lines):
        return None
    text = b"\r\n".join(lines)
    return (
        text[1:].replace(b"\r\n..", b"\r\n.")
        if text.startswith(b"..")
        else text.replace(b"\r\n..", b"\r\n.")
    )


long_lines = st.lists(
    st.one_of(
        st.integers(995, 1005).map(lambda n: b"x" * n),
        st.sampled_from([b"", b".", b"..", b"\r", b"\n", b"\r\n", b"a"]),
    ),
    max_size=8,
).map(lambda parts: b"".join(parts))


@given(st.one_of(messages, long_lines), st.sampled_from(["reject", "normalize"]))
def test_whole_buffer_checks_match_the_line_by_line_rule(raw: bytes, bare_lf: str) -> None:
    got = check_body(raw, 1000, bare_lf)
    want = reference_check(raw, 1000, bare_lf)
    assert (None if isinstance(got, Reply) else got) == want
