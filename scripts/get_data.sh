#!/usr/bin/env bash
# Make sure Fashion-MNIST's IDX files are on this machine (Debian's dataset-fashion-mnist package).
# Prints one line and carries on when it cannot install them: the loader's other sources still apply.
set -u
DIR=/usr/share/datasets/fashion-mnist
have() { [ -n "${MINIAI_DATA:-}" ] && [ -e "$MINIAI_DATA/train-images-idx3-ubyte.gz" -o -e "${MINIAI_DATA:-}/train-images-idx3-ubyte" ] && return 0
         [ -e "$DIR/train-images-idx3-ubyte.gz" ]; }
have && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  { apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } >/dev/null 2>&1
fi
have || echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist', or set MINIAI_DATA to a folder with the four IDX files; miniai will otherwise try the Hugging Face hub."
exit 0
