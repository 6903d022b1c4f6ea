"""Upstream receiver on hl7apy's MLLPServer (plain MLLP; it closes the connection after every reply).

usage: hl7apy_upstream.py [--host H] [--port P] [--log FILE]

Every message, whatever its MSH-9, is parsed with hl7apy and answered with an AA built by hl7apy
(MSH sender/receiver swapped, MSH-9 ACK, a fresh MSH-10, MSA|AA|<received MSH-10>). Then hl7apy's
request handler closes the connection, so a client sending several messages must reconnect for
each one.
--log appends `<MSH-10>\\t<MSH-9>\\tAA` per received message, flushed at once (before the ACK).
Prints `READY <port>` on stdout once listening; exits on SIGTERM or SIGINT.
"""
import argparse
import signal
import sys
import threading
import time
import uuid

from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

SB, EB, CR = "\x0b", "\x1c", "\x0d"
LOCK = threading.Lock()
LOG = None


class AckHandler(AbstractHandler):
    def reply(self):
        msg = parse_message(self.incoming_message, find_groups=False)
        msh = msg.msh
        ctrl = msh.msh_10.value
        mtype = msh.msh_9.value
        if LOG is not None:
            with LOCK:
                LOG.write(f"{ctrl}\t{mtype}\tAA\n")
                LOG.flush()
        ack = Message("ACK", version=msh.msh_12.value)
        ack.msh.msh_3 = msh.msh_5.value
        ack.msh.msh_4 = msh.msh_6.value
        ack.msh.msh_5 = msh.msh_3.value
        ack.msh.msh_6 = msh.msh_4.value
        ack.msh.msh_7 = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        ack.msh.msh_9 = "ACK"
        ack.msh.msh_10 = uuid.uuid4().hex[:20]
        ack.msh.msh_11 = msh.msh_11.value
        ack.msa.msa_1 = "AA"
        ack.msa.msa_2 = ctrl
        return SB + ack.to_er7() + CR + EB + CR


class AnyType(dict):
    """hl7apy looks handlers up by the full MSH-9; every type gets the same one."""

    def __missing__(self, key):
        return (AckHandler,)


def main():
    global LOG
    p = argparse.ArgumentParser(description="hl7apy upstream MLLP receiver")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log")
    a = p.parse_args()
    if a.log:
        LOG = open(a.log, "a", encoding="utf-8")
    server = MLLPServer(a.host, a.port, AnyType())
    server.daemon_threads = True

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
