#!/bin/sh
# Routes the VIPs (L4LB_VIPS, comma-separated prefixes) through the router
# (L4LB_ROUTER), then waits for `docker compose exec client ...`.
set -eu
for vip in $(echo "${L4LB_VIPS:?}" | tr ',' ' '); do
    ip route replace "$vip" via "${L4LB_ROUTER:?}"
done
echo "l4lb-client: $(ip route | tr '\n' ';')"
exec sleep infinity
