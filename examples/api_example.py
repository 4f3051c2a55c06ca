"""The Python API end to end: submit a folder, wait, print the status, read the manifest.

On one machine, with nothing else running (Redis and the three stage workers are started
for the run, with a fresh signing key, and stopped at the end, as ``pixelrelay run`` does)::

    python examples/api_example.py IN OUT --demo 3

Against a cluster: the Redis its stage workers (``pixelrelay worker --stage ...``) consume,
and the signing key they use, from ``PIXELRELAY_SIGNING_KEY`` (the key, at least 16
characters) or ``PIXELRELAY_SIGNING_KEY_FILE`` (a file holding it)::

    PIXELRELAY_REDIS_URL=redis://host:6379/0 PIXELRELAY_SIGNING_KEY_FILE=/run/secrets/pixelrelay-key \\
        python examples/api_example.py IN OUT

``--demo N`` first writes N generated sample images into IN. Exits as ``pixelrelay status``
would: 0 every item done, 1 some failed, 3 gave up waiting, 4 cancelled; 2 for a bad
setting or input (the message names it).
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import pixelrelay
from pixelrelay.api import ConfigError, InputError


def run(input: str, output: str, timeout: float, settings=None) -> int:
    """Submit ``input``, wait for the job and print its status and manifest."""
    job = pixelrelay.submit(input, output, task="restore", format="png", settings=settings)
    print(f"submitted {job.job_id}", flush=True)
    try:
        status = job.wait(timeout=timeout)  # quiet; returns once the manifest is written
    except pixelrelay.WaitTimeout as exc:  # a TimeoutError: the job goes on
        print(exc, file=sys.stderr)
        return 3
    print(
        f"state={status.state.value} done={status.done} failed={status.failed} "
        f"cancelled={status.cancelled} total={status.total} manifest={status.manifest}"
    )
    for row in job.manifest():  # one validated row per item, streamed from storage
        print(f"{row.status:9} {row.input} -> {row.output or row.error}")
    return int(status.exit_code or 0)  # 0 ok, 1 failed items, 4 cancelled (None: not ended; wait returns once it has)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="input folder (or s3://bucket/prefix)")
    parser.add_argument("output", help="output folder (or s3://bucket/prefix)")
    parser.add_argument("--demo", type=int, default=0, metavar="N", help="first write N sample images into INPUT")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up waiting after this many seconds")
    args = parser.parse_args(argv)
    if args.demo:
        from pixelrelay.producer.demo import write_demo_images

        write_demo_images(args.input, args.demo)
    # No PIXELRELAY_REDIS_URL: start Redis and the workers here (local_services yields their settings).
    local = not os.environ.get("PIXELRELAY_REDIS_URL")
    try:
        with pixelrelay.local_services() if local else nullcontext() as settings:
            return run(args.input, args.output, args.timeout, settings)
    except (ConfigError, InputError) as exc:  # a bad setting or input: the message names it
        print(f"api_example: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
