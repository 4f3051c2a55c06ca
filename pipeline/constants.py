"""Defaults of the compute path and the stage/queue names, in one place.

Redis keys live in ``pixelrelay.jobs.keys``; a job's storage layout in ``pixelrelay.jobs.files``.
"""

# --- images -------------------------------------------------------------------------
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default (~ 0.25 GiB of 24-bit RGB)
# A job input with one of these names is a manifest file (a list of sources), not an image.
MANIFEST_EXTENSIONS = (".txt", ".jsonl", ".json", ".lst", ".csv")
INPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Listed too when readable (producer.listing.listed_extensions): AVIF when this Pillow reads
# it (Pillow 11.2+ wheels), HEIC/HEIF when pillow-heif (the ``heic`` extra) is installed.
AVIF_EXTENSIONS = (".avif",)
HEIF_EXTENSIONS = (".heic", ".heif")

# --- jobs ---------------------------------------------------------------------------
DEFAULT_CHUNK_SIZE = 16  # items per chain (one message per stage per chunk)
DEFAULT_WINDOW = 64  # chains in flight per job; the rest wait in storage, not Redis
DEFAULT_BATCH_SIZE = 8  # items per model call, per stage

# --- output fingerprints (pipeline.fingerprint) ---------------------------------------
# Bump when the decode path (tiling, encoding, colour handling...) changes the bytes of an
# output for the same request and models: outputs of older versions are then re-processed.
# Not the package version: a release that changes no output keeps every result reusable.
DECODE_PATH_VERSION = (
    2  # 2: CMYK/grey converted through their ICC; TIFF structural tags and pixel dimensions out of the EXIF
)

# --- Celery -------------------------------------------------------------------------
STAGES = ("encode", "plan", "decode")
STAGE_BACKEND = {"encode": "encoder", "plan": "planner", "decode": "decoder"}  # stage -> backend kind
QUEUE_PREFIX = "pixelrelay."  # queue per stage: pixelrelay.encode, ...
TASK_PREFIX = "pixelrelay."  # task names: pixelrelay.encode, ...
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # a queue entry's bytes (a 4,096-item chunk with long texts: ~21 MB)
DEFAULT_VISIBILITY_TIMEOUT_S = 2 * 3600  # a backstop: renewed leases keep their messages fresh
DEFAULT_MAX_RETRIES = 5
DEFAULT_MAX_DELIVERIES = 3  # a chunk whose worker died this often is split into single items
RETRY_BACKOFF_BASE_S = 2.0
RETRY_BACKOFF_MAX_S = 120.0
WIRE_REQUEUE_DELAY_S = 60  # a message of a newer wire version waits this long per re-queue

# --- defaults for the embedded setup ------------------------------------------------
DEFAULT_REDIS_URL = ""  # empty: `pixelrelay run` starts an embedded Redis
DEFAULT_ENCODER = "builtin"  # pixelrelay's own trained models, shipped in the package
DEFAULT_PLANNER = "rules"
DEFAULT_DECODER = "builtin"
DEFAULT_METRICS_ADDR = "127.0.0.1"  # /metrics listens on loopback unless told otherwise
