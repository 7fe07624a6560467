#!/usr/bin/env python
"""Run a local S3-compatible server (moto's server mode) for the quickstart and the local stack.

    python infra/local/s3_server.py --port 9000 --bucket dhrcnn
    # in another shell, paste the printed exports, then e.g.
    dhrcnn synth --out s3://dhrcnn/shapes --images 200 --seed 0

The server keeps everything in memory and accepts any credentials (a development server bound to
127.0.0.1). Stop it with Ctrl-C. ``moto[server]`` comes with the project's installation.
"""

from __future__ import annotations

import argparse
import signal
import sys

from jobs.local_s3 import start_s3_server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    parser.add_argument("--bucket", action="append", default=None, help="bucket to create (repeatable; default dhrcnn)")
    args = parser.parse_args()
    server = start_s3_server(args.port, host=args.host)
    try:
        for bucket in args.bucket or ["dhrcnn"]:
            print(f"created bucket {server.create_bucket(bucket)}", file=sys.stderr)
        print("\n".join(f"export {k}={v}" for k, v in server.env.items()), flush=True)
        print(f"S3 server running at {server.endpoint_url} (pid {server.process.pid}); Ctrl-C to stop", file=sys.stderr)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
