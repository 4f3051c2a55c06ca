"""The Python API end to end: submit a folder, wait, print the status, read the manifest.

    PIXELRELAY_REDIS_URL=redis://localhost:6379/0 python examples/api_example.py IN OUT [--demo N]

Stage workers must be running against the same Redis (``pixelrelay worker --stage ...``).
``--demo N`` first writes N generated sample images into IN. Exits as ``pixelrelay status``
would: 0 every item done, 1 some failed, 3 gave up waiting, 4 cancelled.
"""

from __future__ import annotations

import argparse
import sys

import pixelrelay


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

    job = pixelrelay.submit(args.input, args.output, task="restore", format="png")  # Redis: PIXELRELAY_REDIS_URL
    print(f"submitted {job.job_id}")
    try:
        status = job.wait(timeout=args.timeout)  # quiet; returns once the manifest is written
    except pixelrelay.WaitTimeout as exc:  # a TimeoutError: the job goes on
        print(exc, file=sys.stderr)
        return 3
    print(
        f"state={status.state.value} done={status.done} failed={status.failed} "
        f"cancelled={status.cancelled} total={status.total} manifest={status.manifest}"
    )
    for row in job.manifest():  # one validated row per item, streamed from storage
        print(f"{row.status:9} {row.input} -> {row.output or row.error}")
    return int(status.exit_code)  # 0 ok, 1 failed items, 4 cancelled


if __name__ == "__main__":
    sys.exit(main())
