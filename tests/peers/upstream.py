"""Upstream receiver (the "central hospital") on python-hl7's asyncio MLLP server.

usage: upstream.py [--host H] [--port P] [--log FILE]
                   [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]
                   [--ae CTRL:N] [--ar CTRL:N] [--hang CTRL:N]   (each repeatable)

Answers every message with an ACK (MSH sender/receiver swapped, MSH-9 ACK^<trigger>^ACK, a fresh
MSH-10, MSH-11/12 copied, MSA|<code>|<received MSH-10>). The code is AA unless a rule applies:
--ae/--ar CTRL:N answer AE/AR the first N times MSH-10 == CTRL arrives (N = -1: every time);
--hang CTRL:N sends no answer the first N times and keeps the connection open (later messages on
that connection are still read and answered). Rules for one CTRL apply in command-line order:
`--hang X:1 --ae X:2` hangs on the 1st X, answers AE to the 2nd and 3rd, then AA.
--tls-cert/--tls-key serve TLS 1.2+; --tls-ca also requires a client certificate from that CA.
--log appends `<MSH-10>\\t<MSH-9>\\t<AA|AE|AR|HANG>` per received message, flushed at once.
Prints `READY <port>` on stdout once listening; exits 0 on SIGTERM or SIGINT.
"""
import argparse
import asyncio
import signal
import ssl
import sys
import time

import hl7
from hl7.mllp import start_hl7_server
from hl7.util import generate_message_control_id

# Bytes round-trip unchanged through str (non-UTF-8 input survives into the ACK and the log).
ENC, ERRORS = "utf-8", "surrogateescape"


def rule(code):
    def parse(text):
        ctrl, _, n = text.rpartition(":")
        return ctrl, [code, int(n)]
    return parse


def build_ack(msg, code):
    try:
        return msg.create_ack(code)
    except (TypeError, IndexError):  # create_ack needs MSH-9 with components and MSH up to MSH-12
        msh = msg.segment("MSH")
        f = [str(x) for x in msh] + [""] * 13
        now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        return hl7.parse(f"MSH|^~\\&|{f[5]}|{f[6]}|{f[3]}|{f[4]}|{now}||ACK|"
                         f"{generate_message_control_id()}|{f[11]}|{f[12]}\rMSA|{code}|{f[10]}\r")


class Upstream:
    def __init__(self, args):
        self.rules = {}  # MSH-10 -> [[code, times left (-1: forever)], ...] in command-line order
        for ctrl, r in args.rules:
            self.rules.setdefault(ctrl, []).append(r)
        self.log = open(args.log, "a", encoding=ENC, errors=ERRORS) if args.log else None
        self.tasks = set()

    def decide(self, ctrl):
        for r in self.rules.get(ctrl, []):
            if r[1] != 0:
                if r[1] > 0:
                    r[1] -= 1
                return r[0]
        return "AA"

    def connected(self, reader, writer):
        task = asyncio.get_running_loop().create_task(self.serve(reader, writer))
        self.tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)

    async def serve(self, reader, writer):
        try:
            while True:
                msg = await reader.readmessage()
                msh = msg.segment("MSH")
                ctrl = str(msh[10]) if len(msh) > 10 else ""
                mtype = str(msh[9]) if len(msh) > 9 else ""
                code = self.decide(ctrl)
                if self.log:  # before the ACK: whatever the gateway saw acknowledged is logged
                    self.log.write(f"{ctrl}\t{mtype}\t{code}\n")
                    self.log.flush()
                if code != "HANG":
                    writer.writemessage(build_ack(msg, code))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # peer closed (possibly mid-message), or we are shutting down
        except Exception as e:  # bad block or unparsable HL7: report it, drop the connection
            print(f"upstream: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            writer.close()


def tls_context(a):
    if not a.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(a.tls_cert, a.tls_key)
    if a.tls_ca:
        ctx.load_verify_locations(a.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def main():
    p = argparse.ArgumentParser(description="python-hl7 upstream MLLP receiver")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    p.add_argument("--log")
    for code in ("AE", "AR", "HANG"):
        p.add_argument("--" + code.lower(), type=rule(code), dest="rules", action="append",
                       default=[], metavar="CTRL:N")
    a = p.parse_args()
    if bool(a.tls_cert) != bool(a.tls_key) or (a.tls_ca and not a.tls_cert):
        p.error("--tls-cert and --tls-key go together; --tls-ca needs both")

    up = Upstream(a)
    server = await start_hl7_server(
        up.connected, a.host, a.port, ssl=tls_context(a),
        encoding=ENC, encoding_errors=ERRORS, limit=64 << 20,  # default limit: 64 KiB
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()
    for t in list(up.tasks):
        t.cancel()
    await asyncio.gather(*up.tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main())
