# Sourced by .ci/xla-env.sh and .ci/tpu-env.sh: a virtualenv built once outside the clone and
# reused, guarded by a stamp file that holds the whole recipe (written last, so a failed build is
# rebuilt) and by a lock against concurrent builds.
#
# The caller defines log, die and venv_ok, and sets VENV, STAMP, EXPECTED_STAMP, WHEELS, PYTHON,
# PYVER, REBUILD (1: rebuild), LOCK_TIMEOUT (seconds) and VENV_KNOB (the variable naming VENV).

# Prints the venv's python and exits when it is built, before or after waiting for a concurrent build.
venv_reuse_or_lock() {
  if [[ "$REBUILD" != 1 ]] && venv_ok; then
    echo "$VENV/bin/python"
    exit 0
  fi
  mkdir -p "$(dirname "$VENV")"
  exec 9>"$VENV.lock"
  log "waiting for lock $VENV.lock"
  flock -w "$LOCK_TIMEOUT" 9 || die "timed out waiting for $VENV.lock"
  if [[ "$REBUILD" != 1 ]] && venv_ok; then
    log "built by a concurrent run"
    echo "$VENV/bin/python"
    exit 0
  fi
}

# Replaces a stale or partial venv (and refuses to delete anything that does not look like one),
# then sets PIPX, and DL / INST: pip's HTTP cache stores nothing for the registry (no cache
# headers), so wheels are kept in a wheelhouse that `pip download` fills once; installs are offline.
venv_create() {
  case "$VENV" in ""|/|"${HOME:-/}"|"${HOME:-/}/.cache") die "refusing VENV=$VENV" ;; esac
  if [[ -e "$VENV" ]]; then
    if [[ -f "$VENV/pyvenv.cfg" || -f "$STAMP" || -z "$(ls -A "$VENV" 2>/dev/null)" ]]; then
      log "removing stale or partial venv $VENV"
      rm -rf "$VENV"
    else
      die "$VENV exists and is not a virtualenv; remove it or set $VENV_KNOB"
    fi
  fi
  start=$SECONDS
  trap 'log "FAILED at line $LINENO; the venv has no stamp and is rebuilt next time. If a download is corrupt: rm -rf $WHEELS"' ERR
  log "creating $VENV with $PYTHON ($PYVER)"
  "$PYTHON" -m venv "$VENV"
  mkdir -p "$WHEELS"
  PIPX=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
  DL=("${PIPX[@]}" download --progress-bar off --only-binary=:all: -d "$WHEELS")
  INST=("${PIPX[@]}" install --progress-bar off --only-binary=:all: --no-index --find-links "$WHEELS")
}

# Writes the stamp (last), checks the venv and prints its python.
venv_finish() {
  printf '%s' "$EXPECTED_STAMP" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
  venv_ok || die "venv check failed right after the build"
  log "built in $((SECONDS - start)) s, $(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV"
  echo "$VENV/bin/python"
}
