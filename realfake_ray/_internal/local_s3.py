"""A local S3-compatible server (moto's server mode, in its own process) for tests and benchmarks.

Needs the ``test`` extras (``moto[server]``, ``s3fs``). Clients reach it through the real s3fs/botocore
stack, configured by the environment in :attr:`LocalS3.env`.

Example:
    >>> server = LocalS3("/tmp/s3-requests.log")  # doctest: +SKIP
    >>> os.environ.update(server.env)  # doctest: +SKIP
    >>> server.requests("PUT")  # doctest: +SKIP
    0
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter

from realfake_ray._internal.addresses import free_port

__all__ = ["LocalS3"]


class LocalS3:
    """An S3-compatible server on 127.0.0.1 (moto's server mode, a separate process) for real s3fs clients.

    ``env`` holds what a client process needs (endpoint, dummy credentials, region); ``requests(method)``
    counts the requests the server has logged so far. Its request recorder is off; switched on by a client,
    it writes to ``recording_path`` beside the log."""

    def __init__(self, log_path: str) -> None:
        port = free_port()
        self.log_path = log_path
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        # moto's request recorder stays off, and should a client switch it on (its /moto-api/recorder/), it
        # writes beside the log, not a `moto_recording` file in the working directory.
        self.recording_path = log_path + ".recording"
        server_env = {**os.environ, "MOTO_ENABLE_RECORDING": "", "MOTO_RECORDER_FILEPATH": self.recording_path}
        server = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=server_env)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}; its log: {log_path}") from None
                time.sleep(0.2)

    def by_method(self) -> Counter:
        """Requests logged so far, counted by HTTP method (``GET`` includes listings)."""
        with open(self.log_path) as log:
            lines = [line for line in log if '"' in line and " HTTP/1.1" in line]
        return Counter(line.split('"', 2)[1].split(" ", 1)[0].lstrip("\x1b[0123456789;m") for line in lines)

    def requests(self, method: str | None = None) -> int:
        """Requests logged so far, of one HTTP method if given."""
        counts = self.by_method()
        return sum(counts.values()) if method is None else counts[method]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self._log.close()
