"""The frames draft transport (workers that share no memory): byte-exact delivery into the
verifier's own buffers, drafts of other batches and stale drafts placed where they belong, strict
headers and frame sizes, and the real processes giving the shared-memory reference's tokens."""

import asyncio
import time

import msgpack
import pytest
import torch
import zmq

from minedraft.workers.buffers import draft_buffer_specs
from minedraft.workers.frames import FrameBuffers, FrameReceiver, FrameSender
from tests.runtime_utils import reference_outputs, running_daemon, status
from tests.test_runtime import run_load, workload

SPECS = draft_buffer_specs(4, 3, 16)  # 4 rows, k = 3, V = 16


@pytest.fixture
def pair(tmp_path):
    context = zmq.Context()
    endpoint = f"ipc://{tmp_path}/drafts.sock"
    sent = [FrameBuffers.create(SPECS, endpoint) for _ in range(2)]
    sender = FrameSender(context, endpoint)
    got = [FrameBuffers.attach(b.handle()) for b in sent]
    receiver = FrameReceiver(context, endpoint, got, timeout_s=2.0)
    yield sent, sender, got, receiver
    sender.close()
    receiver.close()
    context.destroy(linger=0)


def _fill(buffers: FrameBuffers, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    buffers.tensors["draft_tokens"].copy_(torch.randint(0, 16, (4, 3), generator=g))
    buffers.tensors["draft_probs"].copy_(torch.rand(4, 3, 16, generator=g))


def test_drafts_arrive_byte_exact_where_the_verifier_reads_them(pair):
    sent, sender, got, receiver = pair
    _fill(sent[0], 1)
    rows = [(0, 3, True), (1, 2, False), (2, 0, True), (3, 1, True)]  # (buffer_row, kept, is_sampled)
    sender.send(sent[0], 0, 7, rows)
    assert receiver.wait_for(0, 7) == sender.num_bytes > 4 * 3 * 8 + (3 + 1) * 16 * 4  # tokens + 2 sampled rows
    assert receiver.wait_for(0, 7) == 0  # already there
    assert torch.equal(got[0].tensors["draft_tokens"], sent[0].tensors["draft_tokens"])
    for row, kept, is_sampled in rows:
        expected = sent[0].tensors["draft_probs"][row, :kept] if is_sampled else torch.zeros(kept, 16)
        assert torch.equal(got[0].tensors["draft_probs"][row, :kept], expected)
    assert not got[0].tensors["draft_probs"][1].any()  # greedy rows send no distributions
    header = msgpack.packb({"batch_id": 0, "draft_id": 7, "num_rows": 4, "rows": [list(r) for r in rows]})
    assert receiver.num_bytes == sender.num_bytes == len(header) + 4 * 3 * 8 + (3 + 1) * 16 * 4


def test_other_batches_and_stale_drafts_land_in_their_own_buffers(pair):
    sent, sender, got, receiver = pair
    _fill(sent[0], 1)
    sender.send(sent[0], 0, 1, [(0, 3, True)])  # a draft never verified (its rows were aborted)
    _fill(sent[1], 2)
    sender.send(sent[1], 1, 2, [(0, 3, True), (1, 3, False)])
    _fill(sent[0], 3)
    sender.send(sent[0], 0, 3, [(0, 2, True)])
    receiver.wait_for(0, 3)  # takes draft 1 (stale), draft 2 (batch 1) and draft 3
    assert receiver.draft_ids == {0: 3, 1: 2}
    assert torch.equal(got[0].tensors["draft_probs"][0, :2], sent[0].tensors["draft_probs"][0, :2])
    assert torch.equal(got[1].tensors["draft_probs"][0], sent[1].tensors["draft_probs"][0])
    receiver.wait_for(1, 2)  # already there: returns without receiving
    with pytest.raises(RuntimeError, match="did not arrive within"):
        receiver.wait_for(1, 4)


@pytest.mark.parametrize("frames, match", [
    ([b"not msgpack \xc1"], "bad draft frames header|not msgpack"),
    ([msgpack.packb({"batch_id": 5, "draft_id": 1, "num_rows": 0, "rows": []}), b""], "bad draft frames header"),
    ([msgpack.packb({"batch_id": 0, "draft_id": 1, "num_rows": 9, "rows": []}), b""], "exceeds the buffers"),
    ([msgpack.packb({"batch_id": 0, "draft_id": 1, "num_rows": 1, "rows": [[0, 3, True]]}), bytes(24)],
     "ended early"),
    ([msgpack.packb({"batch_id": 0, "draft_id": 1, "num_rows": 1, "rows": []}), bytes(23)], "23 bytes"),
    ([msgpack.packb({"batch_id": 0, "draft_id": 1, "num_rows": 1, "rows": []}), bytes(24), b"x"], "more frames"),
])
def test_malformed_messages_are_refused(pair, frames, match):
    _, sender, _, receiver = pair
    sender.sock.send_multipart(frames)
    with pytest.raises(ValueError, match=match):
        receiver.wait_for(0, 1)


def test_frames_handle_is_checked():
    handle = FrameBuffers.create(SPECS, "ipc:///tmp/x.sock").handle()
    for bad in ({**handle, "endpoint": "http://x"}, {**handle, "extra": 1}, {**handle, "size_bytes": 8}):
        with pytest.raises(ValueError):
            FrameBuffers.attach(bad)


def test_daemon_with_frames_gives_the_shared_memory_tokens(tmp_path):
    """Greedy and seeded sampled rows through psd with the drafts sent as frames equal the
    in-process reference; the verifier reports the frames transport, and no shared segment."""
    requests = workload(8, temperature=0.0) + [dict(r, request_id=f"s{i}") for i, r in
                                                enumerate(workload(8, temperature=0.8))]
    with running_daemon(tmp_path, "psd", "cluster.draft_transport=frames") as (endpoint, _):
        outputs = asyncio.run(run_load(endpoint, requests))
        st = status(endpoint)
    assert st["draft_transport"] == "frames" and st["num_draft_frame_bytes"] > 0
    assert st["draft_buffers"] == {"num_buffers": 2, "device": "cpu", "device_uuid": None}
    assert outputs == reference_outputs(requests, mode="sd")
    assert st["acceptance_rate"] > 0.3


def test_frames_over_tcp_reach_only_the_workers_key():
    """Across hosts the drafts socket is a CURVE server on tcp://: the verifier holding this
    start's worker key receives the drafts byte-exact; a peer that knows the server's public key
    but holds another key pair gets nothing, and neither does one without CURVE."""
    from minedraft.common import curve as cv

    keys = cv.new_worker_keys()
    context = zmq.Context()
    auth = cv.start_authenticator(context, keys["worker_public"])
    sender = FrameSender(context, "tcp://127.0.0.1:*", (keys["drafts_public"], keys["drafts_secret"]))
    sent = [FrameBuffers.create(SPECS, sender.endpoint, sender.curve_public) for _ in range(2)]
    assert sender.endpoint.startswith("tcp://127.0.0.1:") and sent[0].handle()["curve_public"] == keys["drafts_public"]
    intruder_keys = {**keys, **dict(zip(("worker_public", "worker_secret"), (k.decode() for k in zmq.curve_keypair())))}
    receivers = []
    try:
        for client_keys in (intruder_keys, None, keys):  # the intruders connect first
            got = [FrameBuffers.attach(b.handle()) for b in sent]
            receivers.append(FrameReceiver(context, sender.endpoint, got, 2.0,
                                           keys["drafts_public"] if client_keys else None, client_keys))
        time.sleep(0.5)  # handshakes done (or refused)
        _fill(sent[0], 3)
        sender.send(sent[0], 0, 1, [(0, 3, True), (1, 3, False)])
        assert receivers[2].wait_for(0, 1) == sender.num_bytes
        assert torch.equal(receivers[2].buffers[0].tensors["draft_tokens"][:2], sent[0].tensors["draft_tokens"][:2])
        assert torch.equal(receivers[2].buffers[0].tensors["draft_probs"][0], sent[0].tensors["draft_probs"][0])
        for intruder in receivers[:2]:
            with pytest.raises(RuntimeError, match="did not arrive"):
                intruder.timeout_s = 0.3
                intruder.wait_for(0, 1)
    finally:
        for receiver in receivers:
            receiver.close()
        sender.close()
        auth.stop()
        context.destroy(linger=0)


def test_drafts_socket_binds_in_the_configured_ports_or_says_none_is_free():
    context = zmq.Context()
    try:
        first = FrameSender(context, "tcp://127.0.0.1:*", ports=(41800, 41809))
        port = int(first.endpoint.rsplit(":", 1)[1])
        assert 41800 <= port <= 41809
        with pytest.raises(ValueError, match=rf"no free port in cluster.worker_ports \[{port}, {port}\]"):
            FrameSender(context, "tcp://127.0.0.1:*", ports=(port, port))
        first.close()
    finally:
        context.destroy(linger=0)
