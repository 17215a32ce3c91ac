"""The decoding process's loop (rgpt.inference.decoder) driven in this process over a real socket pair, as the
web process drives it: what it sends back for what it is sent. (The whole server, with the decoder in a
process of its own, is tested in test_serve.py and test_serve_hardening.py.)"""

import socket
import threading
from multiprocessing.connection import Connection

import pytest

from rgpt.inference.decoder import Decoder, receive, send, submission
from rgpt.inference.generate import DecodeConfig
from tests.fixtures_ckpt import ANSWERS, trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pair():
    """(web end, decoder end) of a socket pair, as Engine.start makes them."""
    a, b = socket.socketpair()
    web, decoder = Connection(a.detach()), Connection(b.detach())
    yield web, decoder
    web.close()
    decoder.close()


def ask(web, rid, question, decode=None, stop=()):
    _, tok, _ = trained()
    send(web, submission(rid, tok.encode_prompt([("user", question)]), decode or DecodeConfig(), stop))


def replies(web, decoder: Decoder, n: int, turns=10_000) -> dict:
    """Turn the decoder until n replies ended: {id: (text, end event)}, and every counts message seen."""
    texts, ends = {}, {}
    for _ in range(turns):
        decoder._read(wait=False)
        decoder._turn()
        while web.poll():
            message = receive(web)
            assert set(message) == {"events", "counts"}, message
            for rid, kind, *rest in message["events"]:
                assert rid not in ends, f"an event after the end of reply {rid}"
                if kind == "text":
                    texts[rid] = texts.get(rid, "") + rest[0]
                else:
                    ends[rid] = (kind, *rest)
        if len(ends) == n:
            return {rid: (texts.get(rid, ""), ends[rid]) for rid in ends}
    raise AssertionError(f"only {len(ends)} of {n} replies ended")


def test_replies_come_back_whole_and_by_id(pair):
    web, end = pair
    model, tok, _ = trained()
    decoder = Decoder(model, tok, end, max_active=2)
    questions = list(ANSWERS)[:3]
    for rid, q in enumerate(questions):  # three for two slots: one waits for a slot
        ask(web, rid, q)
    got = replies(web, decoder, 3)
    for rid, q in enumerate(questions):
        text, (kind, reason, n) = got[rid]
        assert (kind, reason, text) == ("end", "stop", ANSWERS[q]) and n > 0
    assert decoder.counts() == {"active": 0, "queued": 0, "served": 3}


def test_a_stop_string_ends_a_reply_and_a_bad_request_fails_alone(pair):
    web, end = pair
    model, tok, _ = trained()
    decoder = Decoder(model, tok, end, max_active=4)
    q = list(ANSWERS)[0]
    cut = ANSWERS[q][2:4]
    ask(web, 0, q, stop=(cut,))
    send(web, submission(1, [10**6], DecodeConfig(), ()))  # a token id beyond the vocabulary
    ask(web, 2, q)
    got = replies(web, decoder, 3)
    assert got[0] == (ANSWERS[q][: ANSWERS[q].index(cut)], ("end", "stop", got[0][1][2]))
    assert got[1][1][:2] == ("error", 500) and "decoding failed" in got[1][1][2]
    assert got[2][0] == ANSWERS[q]


def test_a_cancelled_reply_sends_nothing_more_and_frees_its_slot(pair):
    web, end = pair
    model, tok, _ = trained()
    decoder = Decoder(model, tok, end, max_active=1)
    long = DecodeConfig(max_new_tokens=40, min_new_tokens=40)
    ask(web, 0, list(ANSWERS)[0], long)  # decoding
    ask(web, 1, list(ANSWERS)[1], long)  # waiting for the one slot
    for _ in range(3):
        decoder._read(wait=False)
        decoder._turn()
    send(web, {"cancel": 1})  # leaves the queue at once
    send(web, {"cancel": 0})  # leaves at its next turn
    ask(web, 2, list(ANSWERS)[2])
    got = replies(web, decoder, 1)
    assert list(got) == [2] and got[2][0] == ANSWERS[list(ANSWERS)[2]]
    assert decoder.counts() == {"active": 0, "queued": 0, "served": 2}  # 0 (dropped) and 2


def test_the_loop_ends_when_the_web_side_closes_and_says_why_it_died(pair):
    web, end = pair
    model, tok, _ = trained()
    decoder = Decoder(model, tok, end, max_active=2)
    ended = []
    runner = threading.Thread(target=lambda: ended.append(decoder.run()))  # an exception leaves `ended` empty
    runner.start()
    ask(web, 0, list(ANSWERS)[0], DecodeConfig(max_new_tokens=10_000, min_new_tokens=10_000))
    assert receive(web)["events"][0][:2] == [0, "text"]
    web.close()  # while it decodes (and sends)
    runner.join(10)
    assert not runner.is_alive() and ended == [None]

    a, b = socket.socketpair()
    web, end = Connection(a.detach()), Connection(b.detach())
    decoder = Decoder(model, tok, end, max_active=2)

    def broken(_):
        raise KeyboardInterrupt  # what no reply's guard catches (a BaseException)

    decoder._admit = broken
    ask(web, 0, list(ANSWERS)[0])
    with pytest.raises(SystemExit):
        decoder.run()
    assert receive(web) == {"died": "KeyboardInterrupt: "}


def test_text_decoded_between_messages_travels_as_one_piece(pair):
    """The first text goes at once, then (hand_over not yet passed) a reply's tokens join one text event
    until its end: a stream's chunks are per message, not per token."""
    web, end = pair
    model, tok, _ = trained()
    decoder = Decoder(model, tok, end, max_active=2, hand_over=3600.0)
    long = DecodeConfig(max_new_tokens=30, min_new_tokens=30)
    ask(web, 0, list(ANSWERS)[0], long)
    ask(web, 1, list(ANSWERS)[1], long)
    events = []
    while sum(e[1] == "end" for e in events) < 2:
        decoder._read(wait=False)
        decoder._turn()
        while web.poll():
            events += receive(web)["events"]
    for rid in (0, 1):
        kinds = [e[1] for e in events if e[0] == rid]
        assert kinds == ["text", "text", "end"], kinds
        assert [e[3] for e in events if e[0] == rid and e[1] == "end"] == [30]
