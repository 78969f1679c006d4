#!/bin/sh
# Install activation-shuffler into a fresh virtual environment on a cluster node (docs/cluster.md,
# "Installing on a node"). pip is upgraded first: the pip that Python 3.11 ships (23.2) took minutes to
# resolve these extras, and 12 minutes were not enough for the full development set.
#   sh install-node.sh VENV [EXTRAS]        EXTRAS default: s3,torch,ray
set -eu
VENV=${1:?usage: sh install-node.sh VENV [EXTRAS]}
EXTRAS=${2:-s3,torch,ray}
SRC=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install "$SRC[$EXTRAS]"
"$VENV/bin/shuffler" --help > /dev/null
echo "installed activation-shuffler[$EXTRAS] into $VENV"
