# Sourced by the fetch scripts: with `dest` and `sha` set, `fetch_start` exits early when the
# file is already there and intact (else makes `tmp`, removed on exit); the script then writes
# "$dest.part", and `fetch_finish` checks its sha256 and moves it into place.
check() { echo "$sha  $1" | sha256sum --check --status; }
fetch_start() {
  if [ -f "$dest" ] && check "$dest"; then
    echo "model present: $dest"
    exit 0
  fi
  mkdir -p "$(dirname "$dest")"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
}
fetch_finish() {
  if ! check "$dest.part"; then
    echo "sha256 mismatch for the downloaded $(basename "$dest")" >&2
    rm -f "$dest.part"
    exit 1
  fi
  mv "$dest.part" "$dest"
  echo "model fetched: $dest"
}
