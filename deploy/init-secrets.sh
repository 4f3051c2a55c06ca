#!/usr/bin/env bash
# Make the one-host deployment's secrets, once, in deploy/.env: the Redis password, the MinIO
# credentials, the signing key (the HMAC key every worker and producer shares) and Flower's
# basic auth. Mode 600, gitignored; an existing file is never overwritten.
set -euo pipefail
cd "$(dirname "$0")"
umask 077
token() { python3 -c "import secrets; print(secrets.token_urlsafe($1))"; }
if [ -e .env ]; then
    echo "deploy/.env exists: kept" >&2
else
    cat > .env <<ENV
# Made by deploy/init-secrets.sh. Compose reads it for the variables in compose.yaml.
REDIS_PASSWORD=$(token 24)
MINIO_ROOT_USER=pixelrelay
MINIO_ROOT_PASSWORD=$(token 24)
PIXELRELAY_SIGNING_KEY=$(token 32)
FLOWER_BASIC_AUTH=admin:$(token 18)
# PIXELRELAY_BUCKET=images
# PIXELRELAY_TAG=cpu
ENV
    echo "wrote deploy/.env"
fi
