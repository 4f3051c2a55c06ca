#!/usr/bin/env bash
# Write deploy/k8s/secrets.env and deploy/k8s/signing.key (mode 600, gitignored) for
#   kubectl -n pixelrelay create secret generic pixelrelay-secrets \
#     --from-env-file=deploy/k8s/secrets.env --from-file=signing.key=deploy/k8s/signing.key
# A random Redis password (also written into PIXELRELAY_REDIS_URL, for the in-cluster Redis)
# and a random signing key. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are copied from this
# shell's environment when both are set; otherwise they are left out (the pods then use their
# own identity: IRSA, Pod Identity, Workload Identity). Existing files are never overwritten.
# Nothing secret is passed on a command line.
set -euo pipefail
dir="${1:-$(dirname "$0")}"
env_file="$dir/secrets.env"
key_file="$dir/signing.key"
for f in "$env_file" "$key_file"; do
    if [ -e "$f" ]; then
        echo "init-secrets: $f exists; remove it first to make new secrets" >&2
        exit 1
    fi
done
umask 077
python3 - "$env_file" "$key_file" <<'PY'
import os, secrets, sys

env_file, key_file = sys.argv[1:3]
password = secrets.token_urlsafe(32)
lines = [f"REDIS_PASSWORD={password}", f"PIXELRELAY_REDIS_URL=redis://:{password}@redis:6379/0"]
if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
    lines += [f"AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}",
              f"AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}"]
with open(env_file, "x") as f:
    f.write("\n".join(lines) + "\n")
with open(key_file, "x") as f:
    f.write(secrets.token_urlsafe(32) + "\n")
PY
echo "wrote $env_file and $key_file (mode 600); next:" >&2
echo "  kubectl -n pixelrelay create secret generic pixelrelay-secrets --from-env-file=$env_file --from-file=signing.key=$key_file" >&2
