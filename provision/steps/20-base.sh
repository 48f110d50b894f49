#!/usr/bin/env bash
# Step base (phase image): packages every other step relies on (sudo,
# ca-certificates, curl, gnupg, procps, xz-utils), always from the
# distribution.
#
# Variables: none.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../lib.sh
. "$(dirname "$0")/../lib.sh"

apt_install sudo ca-certificates curl gnupg procps xz-utils
finish "sudo ca-certificates curl gnupg procps xz-utils"
