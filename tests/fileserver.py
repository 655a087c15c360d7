"""A static file server for tests, in a process of its own (so that killing it closes its
socket everywhere): `python -m tests.fileserver FOLDER [--cut-once NAME ...] [--die-on NAME]`
prints its port, then one line per GET ("GET <name>"). --cut-once sends half of NAME's body
once; --die-on sends half of NAME's body and kills the server (SIGKILL) mid-transfer."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--cut-once", nargs="*", default=[])
    parser.add_argument("--die-on")
    args = parser.parse_args()
    cut, printing = set(args.cut_once), threading.Lock()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def copyfile(self, source, outputfile) -> None:
            name = self.path.lstrip("/")
            with printing:  # one whole line per GET, whatever the threads
                print(f"GET {name}", flush=True)
            if name in cut or name == args.die_on:
                cut.discard(name)
                outputfile.write(source.read(os.fstat(source.fileno()).st_size // 2))
                outputfile.flush()
                if name == args.die_on:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.close_connection = True
                self.connection.shutdown(2)  # the body ends short of its Content-Length
                return
            super().copyfile(source, outputfile)

    handler = functools.partial(Handler, directory=args.folder)
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        print(httpd.server_address[1], flush=True)
        httpd.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
