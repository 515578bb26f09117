#!/bin/sh
# Ask every instance of the Persistence Service directly, not through the load balancer
# (which would send the request to one instance only):
#
#   deploy/fleet.sh flush|stats|health http://10.0.0.1:8001 http://10.0.0.2:8001 ...
#   FLEET="http://10.0.0.1:8001 http://10.0.0.2:8001" deploy/fleet.sh flush
#
# Prints one JSON line per instance, {"url": ..., "http_status": ..., "answer": ...},
# where answer is the instance's own JSON (it names its instance_id), or null when the
# instance did not answer. Exits 1 when any instance failed: a flush that answered 503,
# an unhealthy instance, one that did not answer. Set FLEET_TOKEN to send a bearer token.
# See docs/SCALING.md.
set -u

usage() {
    echo "usage: $0 flush|stats|health URL... (or the URLs in \$FLEET)" >&2
    exit 2
}

[ $# -ge 1 ] || usage
operation=$1
shift
case "$operation" in
    flush) method=POST path=/api/v1/persistence/flush ;;
    stats) method=GET path=/api/v1/persistence/stats ;;
    health) method=GET path=/health ;;
    *) usage ;;
esac
if [ $# -eq 0 ]; then
    # shellcheck disable=SC2086 # FLEET is a space-separated list of URLs
    set -- ${FLEET:-}
fi
[ $# -ge 1 ] || usage

body=$(mktemp)
trap 'rm -f "$body"' EXIT
failed=0
for url in "$@"; do
    url=${url%/}
    if [ -n "${FLEET_TOKEN:-}" ]; then
        status=$(curl -sS -o "$body" -w '%{http_code}' --max-time 150 -X "$method" \
            -H "Authorization: Bearer $FLEET_TOKEN" "$url$path" 2>/dev/null)
    else
        status=$(curl -sS -o "$body" -w '%{http_code}' --max-time 150 -X "$method" \
            "$url$path" 2>/dev/null)
    fi
    if [ "$status" = "000" ] || [ ! -s "$body" ]; then
        answer=null
    else
        answer=$(cat "$body")
    fi
    printf '{"url": "%s", "http_status": %d, "answer": %s}\n' "$url" "$status" "$answer"
    case "$status" in
        2??) ;;
        *) failed=1 ;;
    esac
done
exit $failed
