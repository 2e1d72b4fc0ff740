#!/bin/sh
# Smoke test of the `base` image, run inside the finished tree with chroot during the build.
set -eu
export PYTHONDONTWRITEBYTECODE=1
bash -c 'true'
python3 -c 'import ssl, sqlite3, venv'
python3 -m pip --version >/dev/null
git --version >/dev/null
curl --version >/dev/null
sudo --version >/dev/null
ip -V >/dev/null
command -v ps >/dev/null
test -s /etc/ssl/certs/ca-certificates.crt
