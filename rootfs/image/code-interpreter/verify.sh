#!/bin/sh
# Smoke test of the `code-interpreter` image, run inside the finished tree with chroot during the
# build (after base/verify.sh).
set -eu
# Keep matplotlib's and IPython's caches out of the image.
export HOME=/tmp/roost-verify MPLCONFIGDIR=/tmp/roost-verify/mpl PYTHONDONTWRITEBYTECODE=1
python3 -c 'import ipykernel, jupyter_client, numpy, pandas, matplotlib'
python3 -c 'import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.savefig("/tmp/roost-verify/plot.png")'
test -s /tmp/roost-verify/plot.png
rm -rf /tmp/roost-verify
