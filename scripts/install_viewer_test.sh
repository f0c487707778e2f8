#!/usr/bin/env bash
# Installs what tests/viewer/test_ohif.py needs (idempotent; a second run does nothing):
#   - Debian packages: orthanc-dicomweb (Orthanc's DICOMweb plugin, pulls orthanc), chromium,
#     and nodejs + npm when there is no node;
#   - in tests/viewer: `npm ci` (playwright-core, pinned in package.json / package-lock.json);
#   - the built OHIF viewer: the dist/ folder of the npm package pinned under "ohifViewer" in
#     tests/viewer/package.json, fetched with `npm pack`, checked against the pinned integrity
#     and unpacked into tests/viewer/node_modules/.ohif-app/<version>/ (without dist/ort, the
#     onnxruntime files of OHIF's AI segmentation tools, 136 MB the test does not use).
# Nothing is fetched when the test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VIEWER_DIR=tests/viewer

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

missing=()
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The Debian package starts an Orthanc service on 4242/8042; tests start their own instances.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
    $sudo systemctl stop orthanc || true
  fi
fi

cd "$VIEWER_DIR"

# playwright-core, exactly as locked; again only when the lock file changed.
lock_stamp="node_modules/.installed-$(sha256sum package-lock.json | cut -c1-16)"
if [ ! -f "$lock_stamp" ]; then
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  touch "$lock_stamp"
fi

# The built OHIF viewer (after npm ci, which empties node_modules).
spec() { node -e "const v = require('./package.json').ohifViewer; console.log([].concat(v['$1']).join(' '))"; }
package=$(spec package)
version=$(spec version)
integrity=$(spec integrity)
into=$(spec into)
omit=$(spec omit)
target="$into/$version"
if [ ! -f "$target/.integrity" ] || [ "$(cat "$target/.integrity")" != "$integrity" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack "$package@$version" --json --loglevel=error >pack.json)
  tarball="$work/$(node -e "console.log(require('$work/pack.json')[0].filename)")"
  actual=$(node -e "const c = require('crypto'), fs = require('fs');
    console.log('sha512-' + c.createHash('sha512').update(fs.readFileSync(process.argv[1])).digest('base64'))" "$tarball")
  if [ "$actual" != "$integrity" ]; then
    echo "install_viewer_test: $package@$version: integrity $actual, expected $integrity" >&2
    exit 1
  fi
  excludes=()
  for path in $omit; do excludes+=("--exclude=package/$path"); done
  mkdir -p "$work/unpacked"
  tar -xzf "$tarball" -C "$work/unpacked" "${excludes[@]}" package/dist package/package.json
  [ -f "$work/unpacked/package/dist/index.html" ] || {
    echo "install_viewer_test: $package@$version has no dist/index.html" >&2
    exit 1
  }
  echo "$integrity" >"$work/unpacked/package/.integrity"
  rm -rf "$target"
  mkdir -p "$into"
  mv "$work/unpacked/package" "$target"
fi
echo "viewer test: playwright-core $(node -p "require('playwright-core/package.json').version"), $package $version in $VIEWER_DIR/$target, $(/usr/bin/chromium --version 2>/dev/null)"
