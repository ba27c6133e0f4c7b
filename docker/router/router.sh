#!/bin/sh
# Routes the VIPs (L4LB_VIPS, comma-separated prefixes) to the LB (L4LB_LB);
# everything else is on the one data network. Then waits.
#
# Segmentation offloads off: what the router forwards leaves it as packets of
# the link's MTU, as from a wire. A sender's stack hands a veth segments of up
# to 64 KB (TSO/GSO), and the LB runs generic XDP (docker/compose.yaml), which
# sees them whole, after the stack: it would answer them "fragmentation
# needed" instead of forwarding them.
set -eu
for dev in $(ls /sys/class/net); do
    [ "$dev" = lo ] && continue
    ethtool -K "$dev" tso off gso off >/dev/null 2>&1 \
        || echo "l4lb-router: warning: cannot turn segmentation offloads off on $dev" >&2
done
for vip in $(echo "${L4LB_VIPS:?}" | tr ',' ' '); do
    ip route replace "$vip" via "${L4LB_LB:?}"
done
echo "l4lb-router: $(ip route | tr '\n' ';')"
exec sleep infinity
