# Sourced by demo.sh and test.sh from the repository root: make the virtual environment ready, then activate it.
#
# VENV (default .venv) is made when absent, and made again when its python no longer runs (the directory was
# moved, or its Python was removed). The requirement files are installed into it when they changed since
# the last install (their checksum is kept in VENV/requirements.cksum). VENV= (empty) uses the python on
# PATH as it is and installs nothing.
VENV=${VENV-.venv}
if [ -n "$VENV" ]; then
    if ! "$VENV/bin/python" -c '' 2>/dev/null; then
        if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
            echo "error: $VENV: exists but is not a virtual environment; remove it or set VENV" >&2
            exit 2
        fi
        echo "== making the virtual environment $VENV"
        python3 -m venv --clear "$VENV"
    fi
    . "$VENV/bin/activate"
    wanted=$(cat requirements.txt requirements-dev.txt requirements-assets.txt | cksum)
    if [ "$(cat "$VENV/requirements.cksum" 2>/dev/null)" != "$wanted" ]; then
        echo "== installing requirements-dev.txt and requirements-assets.txt into $VENV (minutes the first time)"
        pip install --quiet -r requirements-dev.txt
        pip install --quiet --no-deps -r requirements-assets.txt
        echo "$wanted" > "$VENV/requirements.cksum"
    fi
fi
