#!/usr/bin/env bash
# Run a command with a Redis answering at TT_REDIS_URL (default redis://127.0.0.1:6379/0).
#
#   scripts/with-redis.sh COMMAND [ARGS...]
#
# If a Redis already answers there, it is used as it is. Otherwise, when the URL points at this
# machine and redis-server is installed, a throw-away server is started on that port (no
# persistence, data in a temporary directory) and stopped again when COMMAND ends, whatever way it
# ends. The script exits with COMMAND's exit status. With no Redis and no way to start one it stops
# with an error, because the test suite talks to a real Redis and must not silently skip it.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: with-redis.sh COMMAND [ARGS...]" >&2
    exit 2
fi

url=${TT_REDIS_URL:-redis://127.0.0.1:6379/0}
# redis://[user:password@]host[:port][/db]  ->  host, port
hostport=${url#*://}
hostport=${hostport##*@}
hostport=${hostport%%/*}
host=${hostport%%:*}
port=6379
[[ $hostport == *:* ]] && port=${hostport##*:}

redis_answers() {
    # Speak RESP directly over bash's /dev/tcp so neither redis-cli nor Python is needed. Any reply
    # (+PONG, or -NOAUTH from a password-protected server) means a Redis is listening. A subshell
    # keeps the socket and the silenced "connection refused" from leaking into this shell.
    local reply
    reply=$( (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && IFS= read -r -t 2 line <&3 \
              && printf '%s' "$line") 2>/dev/null ) || true
    [[ $reply == +* || $reply == -* ]]
}

started_pid=""
workdir=""
# shellcheck disable=SC2317  # called through the EXIT trap
cleanup() {
    if [[ -n $started_pid ]]; then
        kill "$started_pid" 2>/dev/null || true
        # wait for it to go so the port is free for the next run
        for _ in $(seq 1 50); do kill -0 "$started_pid" 2>/dev/null || break; sleep 0.1; done
        echo "with-redis: stopped the redis-server it started (pid $started_pid)"
    fi
    [[ -n $workdir ]] && rm -rf "$workdir"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if redis_answers; then
    echo "with-redis: using the Redis that answers at $host:$port"
elif [[ $host != 127.0.0.1 && $host != localhost ]]; then
    echo "with-redis: error: no Redis answers at $host:$port (TT_REDIS_URL=$url), and it is not on this machine" >&2
    exit 1
elif ! command -v redis-server >/dev/null 2>&1; then
    echo "with-redis: error: no Redis answers at $host:$port and redis-server is not installed." >&2
    echo "with-redis: install it (Debian/Ubuntu: apt-get install redis-server) or point TT_REDIS_URL at a Redis." >&2
    exit 1
else
    workdir=$(mktemp -d)
    redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
        --daemonize yes --dir "$workdir" --pidfile "$workdir/redis.pid" --logfile "$workdir/redis.log"
    for _ in $(seq 1 100); do
        [[ -s $workdir/redis.pid ]] && redis_answers && break
        sleep 0.05
    done
    started_pid=$(cat "$workdir/redis.pid" 2>/dev/null || true)
    if [[ -z $started_pid ]] || ! redis_answers; then
        echo "with-redis: error: started redis-server on port $port but it does not answer; its log:" >&2
        cat "$workdir/redis.log" >&2 || true
        exit 1
    fi
    echo "with-redis: started redis-server on 127.0.0.1:$port (pid $started_pid); it is stopped afterwards"
fi

export TT_REDIS_URL="$url"
set +e
"$@"
rc=$?
set -e
exit $rc
