/* balancer.c - the l4lb data plane, read top to bottom as a packet's path:
 * parse -> VIP? -> connection table -> Maglev ring -> encapsulate -> XDP_TX.
 * Anything not for a VIP leaves with XDP_PASS, untouched. docs/dataplane.md lists
 * every verdict and the counter it moves. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "hash.h"
#include "csum.h"
#include "parse.h"
#include "encap.h"
#include "icmp.h"

/* At most `rate` events per CPU per second; a fixed one-second window. */
static __always_inline int rate_allows(__u64 *window, __u64 *count, __u32 rate, __u64 now)
{
    if (now - *window >= ONE_SECOND_NS) {
        *window = now;
        *count = 0;
    }
    if (*count >= rate)
        return 0;
    *count += 1;
    return 1;
}

static __always_inline int icmp_allowed(const struct lb_config *cfg)
{
    __u32 zero = 0;
    struct cpu_state *cs = cpu_state.lookup(&zero);

    return cs && rate_allows(&cs->icmp_window, &cs->icmp_count, cfg->icmp_rate,
                             bpf_ktime_get_ns());
}

static __always_inline int is_vip_address(const struct pkt *p)
{
    struct addr_key k = {};

    __builtin_memcpy(k.addr, p->flow.dst, 16);
    k.family = p->flow.family;
    return vip_addrs.lookup(&k) != NULL;
}

/* Exact (address, port, protocol) first, then the port-less VIP. */
static __always_inline struct vip_meta *find_vip(const struct pkt *p, const struct lb_config *cfg)
{
    struct vip_key k = {};
    struct vip_meta *vip;

    __builtin_memcpy(k.addr, p->flow.dst, 16);
    k.port = p->flow.dport;
    k.proto = p->flow.proto;
    k.family = p->flow.family;
    vip = vips.lookup(&k);
    if (vip || !cfg->portless_vips)
        return vip;
    k.port = 0;
    return vips.lookup(&k);
}

static __always_inline int maglev_pick(const struct vip_meta *vip, __u32 hash, __u32 *idx,
                                       struct backend **out)
{
    __u32 ring_id = vip->vip_id * 2 + (vip->ring & 1);
    struct ring *ring = rings.lookup(&ring_id);
    struct backend *b;
    __u32 slot;

    if (!ring)
        return -1;
    slot = ring_slot(hash);
    /* hide the bound from the compiler so that the verifier sees the check */
    asm volatile("" : "+r"(slot));
    if (slot >= RING_SIZE)
        return -1;
    *idx = ring->slot[slot];
    if (!*idx)
        return -1;
    b = backends.lookup(idx);
    if (!b || !(b->flags & BACKEND_F_VALID))
        return -1;
    *out = b;
    return 0;
}

/* Does the VIP still list this backend? (A removed backend may live on for
 * other VIPs.) */
static __always_inline int listed_by(const struct backend *b, __u32 vip_id)
{
    __u32 word = vip_id / 64;

    if (word >= VIP_MASK_WORDS)
        return 0;
    return (b->vips[word] >> (vip_id % 64)) & 1;
}

/* The backend for this flow: a valid connection-table entry, else a fresh
 * Maglev pick, remembered unless the flow or the rate limit says otherwise. */
static __always_inline int pick_backend(struct pkt *p, const struct vip_meta *vip,
                                        const struct lb_config *cfg, struct global_stats *gs,
                                        __u32 hash, struct backend **out)
{
    int use_ct = !(vip->flags & VIP_F_NO_CONNTRACK);
    int syn = p->flow.proto == PROTO_TCP &&
              (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
    struct ct_entry *e;
    struct backend *b;
    __u64 now = 0;
    __u32 idx;
    int limited;

    if (use_ct && !syn) {
        e = conntrack.lookup(&p->flow);
        if (e) {
            idx = e->backend;
            b = backends.lookup(&idx);
            if (b && (b->flags & BACKEND_F_VALID) && b->generation == e->generation &&
                listed_by(b, vip->vip_id)) {
                if (p->flow.proto != PROTO_UDP) {
                    gs->ct_hit++;
                    *out = b;
                    return 0;
                }
                now = bpf_ktime_get_ns();
                if (now - e->last_seen < cfg->udp_timeout_ns) {
                    e->last_seen = now;
                    gs->ct_hit++;
                    *out = b;
                    return 0;
                }
            }
            gs->ct_stale++;
        }
    }
    gs->ct_miss++;
    if (maglev_pick(vip, hash, &idx, &b))
        return -1;
    *out = b;
    /* an ICMP error or a RST never creates an entry; neither do no-conntrack VIPs */
    if (!use_ct || p->icmp_error ||
        (p->flow.proto == PROTO_TCP && (p->tcp_flags & TCP_FLAG_RST)))
        return 0;
    if (!now)
        now = bpf_ktime_get_ns();
    /* New-flow rate limit: above it, new flows are served by Maglev alone, so
     * a flood of new flows cannot evict the established ones from the LRU. */
    limited = 0;
    if (cfg->new_flow_rate) {
        __u32 zero = 0;
        struct cpu_state *cs = cpu_state.lookup(&zero);

        if (cs && !rate_allows(&cs->ct_window, &cs->ct_count, cfg->new_flow_rate, now))
            limited = 1;
    }
    if (limited) {
        gs->ct_limited++;
    } else {
        struct ct_entry fresh = {.backend = idx, .generation = b->generation, .last_seen = now};

        if (!conntrack.update(&p->flow, &fresh))
            gs->ct_insert++;
    }
    return 0;
}

/* A VIP packet (or an ICMP error about a VIP flow): pick and encapsulate. */
static __always_inline int balance(struct xdp_md *ctx, struct pkt *p, const struct vip_meta *vip,
                                   const struct lb_config *cfg, struct global_stats *gs)
{
    __u32 vip_id = vip->vip_id;
    struct vip_stats *vs = vip_stats.lookup(&vip_id);
    __u32 hash, overhead;
    struct backend *b;
    int action;

    if (vs) {
        vs->packets++;
        vs->bytes += ctx->data_end - ctx->data;
    }
    hash = flow_hash(&p->flow, (vip->flags & VIP_F_NO_SPORT) ? 0 : p->flow.sport);
    if (pick_backend(p, vip, cfg, gs, hash, &b)) {
        gs->no_backend++;
        return XDP_DROP;
    }
    overhead = b->family == FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
    if (p->ip_len + overhead > cfg->mtu && p->df && !p->icmp_error) {
        /* too big once encapsulated and may not be fragmented: tell the client */
        __u32 mtu = cfg->mtu - overhead;

        if (!icmp_allowed(cfg)) {
            gs->icmp_limited++;
            return XDP_DROP;
        }
        if (p->flow.family == FAMILY_V4) {
            action = too_big4(ctx, p, mtu);
        } else {
            action = too_big6(ctx, p, mtu < IPV6_MIN_MTU ? IPV6_MIN_MTU : mtu);
        }
        if (action < 0) {
            gs->error++;
            return XDP_DROP;
        }
        gs->too_big++;
        return action;
    }
    action = encap(ctx, p, b, cfg, hash);
    if (action < 0) {
        gs->error++;
        return XDP_DROP;
    }
    if (p->icmp_error)
        gs->icmp_fwd++;
    gs->tx++;
    return action;
}

/* ICMP to a VIP address: echo requests are answered here; errors about a
 * VIP flow follow the flow to its backend; everything else passes. */
static __always_inline int handle_icmp(struct xdp_md *ctx, struct pkt *p, void *l4,
                                       const struct lb_config *cfg, struct global_stats *gs)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    /* ICMP bytes inside the IP length: Ethernet padding may follow them */
    __u32 icmp_len = p->ip_len - (__u32)(l4 - data - p->l3off);
    struct vip_meta *vip;
    __u8 type;
    int res;

    if ((void *)l4 + 8 > data_end || icmp_len < 8) {
        if (!is_vip_address(p))
            goto pass;
        gs->malformed++;
        return XDP_DROP;
    }
    type = *(__u8 *)l4;
    if (p->flow.family == FAMILY_V4) {
        if (type == ICMP_ECHO_REQUEST) {
            if (!is_vip_address(p))
                goto pass;
            goto echo;
        }
        if (type != ICMP_DEST_UNREACH)
            goto pass;
        res = parse_quoted_v4(l4 + 8, data_end, p, icmp_len - 8);
    } else {
        if (type == ICMPV6_ECHO_REQUEST) {
            if (!is_vip_address(p))
                goto pass;
            goto echo;
        }
        if (type != ICMPV6_DEST_UNREACH && type != ICMPV6_PKT_TOOBIG)
            goto pass;
        res = parse_quoted_v6(l4 + 8, data_end, p, icmp_len - 8);
    }
    if (res != PARSE_OK)
        goto pass;
    vip = find_vip(p, cfg);
    if (!vip)
        goto pass;
    return balance(ctx, p, vip, cfg, gs);

echo:
    if (!icmp_allowed(cfg)) {
        gs->icmp_limited++;
        return XDP_DROP;
    }
    gs->icmp_echo++;
    if (p->flow.family == FAMILY_V4)
        return echo_reply4(data, data_end, p, l4);
    return echo_reply6(data, data_end, p, l4);
pass:
    gs->pass++;
    return XDP_PASS;
}

int balancer(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 zero = 0;
    struct global_stats *gs = global_stats.lookup(&zero);
    struct lb_config *cfg = config.lookup(&zero);
    struct vip_meta *vip;
    struct pkt p = {};
    void *l4 = NULL;
    __be16 proto;
    int res;

    if (!gs || !cfg || !cfg->configured)
        return XDP_PASS;

    res = parse_eth(data, data_end, &p, &proto);
    if (res == PARSE_OK)
        res = parse_ip(data, data_end, &p, proto, &l4);
    switch (res) {
    case PARSE_OK:
        break;
    case PARSE_ICMP:
        return handle_icmp(ctx, &p, l4, cfg, gs);
    case PARSE_NOT_IP:
        goto pass;
    case PARSE_FRAGMENT:
        if (!is_vip_address(&p))
            goto pass;
        gs->fragment++;
        return XDP_DROP;
    case PARSE_EXT_HEADER:
        if (!is_vip_address(&p))
            goto pass;
        gs->ext_header++;
        return XDP_DROP;
    default: /* PARSE_MALFORMED */
        gs->malformed++;
        return XDP_DROP;
    }

    res = parse_l4(l4, data_end, &p, p.ip_len - (__u32)(l4 - data - p.l3off));
    if (res != PARSE_OK) {
        if (!is_vip_address(&p))
            goto pass;
        gs->malformed++;
        return XDP_DROP;
    }
    vip = find_vip(&p, cfg);
    if (!vip)
        goto pass;
    return balance(ctx, &p, vip, cfg, gs);

pass:
    gs->pass++;
    return XDP_PASS;
}
