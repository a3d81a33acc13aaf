#!/bin/sh
# Print the values of one key of contents.txt (beside this script), one per line:
#   sh deploy/image/contents.sh debian      -> python3 python3-venv ...
# The Containerfile reads the list with this; vnpu/cluster/imagebuild.py parses the same format, and
# tests/core/test_image_recipe.py checks that both read the same values.
set -eu
key=$1
list=${CONTENTS:-$(dirname "$0")/contents.txt}
sed -n "s/^$key:[[:space:]]*//p" "$list" | tr -s ' \t' '\n\n' | sed '/^$/d'
