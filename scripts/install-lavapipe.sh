#!/usr/bin/env bash
# Installs a software Vulkan driver (Mesa's lavapipe/llvmpipe) so that Dawn (npm `webgpu`) finds a WebGPU adapter on
# a machine without a GPU: the webgpu backend then runs on the CPU, which is how CI tests it (test/webgpu.test.ts).
# Dawn needs Mesa 24 or later: Debian bookworm's Mesa 22.3 lacks features it requires, so on bookworm it comes from
# bookworm-backports; newer Debian releases have it in main.
# Idempotent; needs root and apt (Debian). Exits non-zero when it cannot install; the test suite then skips the
# webgpu tests. Usage: sudo bash scripts/install-lavapipe.sh
set -euo pipefail
if ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 && dpkg -s mesa-vulkan-drivers 2>/dev/null | grep -q '^Version: 2[4-9]'; then
  echo "lavapipe already installed: $(dpkg -s mesa-vulkan-drivers | grep '^Version')"; exit 0
fi
[ "$(id -u)" = 0 ] || { echo "install-lavapipe: needs root (apt-get)" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "install-lavapipe: needs apt-get (Debian)" >&2; exit 1; }
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
release=()
if [ "$codename" = bookworm ]; then
  uri=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 | awk '{print $2}' || true)
  [ -n "$uri" ] || uri=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 | awk '{print $2}' || true)
  [ -n "$uri" ] || { echo "install-lavapipe: no Debian source configured" >&2; exit 1; }
  echo "deb $uri bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
  release=(-t bookworm-backports)
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${release[@]}" mesa-vulkan-drivers libvulkan1 >/dev/null
version=$(dpkg -s mesa-vulkan-drivers | grep '^Version')
echo "$version" | grep -q '^Version: 2[4-9]' || { echo "install-lavapipe: Mesa is too old for Dawn ($version)" >&2; exit 1; }
echo "lavapipe installed: $version"
