"""Send HL7 messages over MLLP (optionally TLS with a client certificate) with python-hl7's
asyncio client, and print each ACK's MSA-1 code on its own line.

usage: send_tls.py HOST PORT MESSAGES_FILE [--ca CA --cert CERT --key KEY] [--tls-max 1.1]
Messages in the file are separated by blank lines; segments by newlines (sent as CR).
"""
import argparse
import asyncio
import ssl

import hl7
from hl7.mllp import open_hl7_connection


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("file")
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    a = p.parse_args()
    ctx = None
    if a.ca:
        ctx = ssl.create_default_context(cafile=a.ca)
        ctx.check_hostname = False
        if a.cert:
            ctx.load_cert_chain(a.cert, a.key)
    text = open(a.file, encoding="utf-8").read()
    messages = [m.strip().replace("\n", "\r") for m in text.split("\n\n") if m.strip()]
    reader, writer = await open_hl7_connection(a.host, a.port, ssl=ctx, encoding="utf-8")
    try:
        for m in messages:
            writer.writemessage(hl7.parse(m))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readmessage(), 20)
            print(str(ack.segment("MSA")[1]), str(ack.segment("MSA")[2]), flush=True)
    finally:
        writer.close()


asyncio.run(main())
