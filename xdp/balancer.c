/* balancer.c - the l4lb data plane, read top to bottom as a packet's path:
 * parse -> VIP? -> connection table -> Maglev ring -> encapsulate -> next hop
 * (the gateway, or the kernel's FIB) -> XDP_TX (or XDP_REDIRECT).
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
#include "nexthop.h"

/* Bucket i of the IPv4 or the IPv6 connection table (v6 is a constant wherever
 * this is inlined, so one lookup remains); here, not in conntrack.h, because
 * bcc turns map.lookup() into a map access only in the main file. */
static __always_inline void *ct_bucket(int v6, __u32 i)
{
    void *b;

    if (v6)
        b = conntrack6.lookup(&i);
    else
        b = conntrack.lookup(&i);
    return b;
}

/* Flow hash fh's slot of the IPv4 or the IPv6 SYN table (xdp/conntrack.h). */
static __always_inline void *ct_syn_slot(int v6, __u32 fh)
{
    __u32 i = fh & (MAP_CT_SYN_ENTRIES - 1);
    void *s;

    if (v6)
        s = ct_syn6.lookup(&i);
    else
        s = ct_syn.lookup(&i);
    return s;
}

/* The byte of ct_syn_used that says whether that slot may hold an entry. */
static __always_inline __u8 *ct_syn_used_at(int v6, __u32 fh)
{
    __u32 t = v6 ? 1 : 0;
    struct ct_syn_used *u = ct_syn_used.lookup(&t);

    return u ? &u->used[fh & (MAP_CT_SYN_ENTRIES - 1)] : NULL;
}

#include "conntrack.h"

/* The clock of UDP expiry and the rate limits: the coarse monotonic clock
 * (jiffy resolution) costs far less than a clocksource read, and these only
 * need milliseconds. */
static __always_inline __u64 lb_now(void)
{
    return bpf_ktime_get_coarse_ns();
}

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
                             lb_now());
}

/* A copy of the frame for `l4lb capture`, if capture_cfg selects it (only
 * called while lb_config.capture is set). A full ring drops the copy and
 * counts it; forwarding never waits for the reader. */
static __always_inline void capture(struct xdp_md *ctx, const struct pkt *p, __u32 verdict, __u8 sent)
{
    __u32 zero = 0, len = ctx->data_end - ctx->data;
    __u64 n; /* 64 bits: the verifier follows the bounds checked below into the helper call */
    struct capture_cfg *cc = capture_cfg.lookup(&zero);
    struct capture_stats *cs = capture_stats.lookup(&zero);
    struct capture_rec *rec;

    if (!cc || !cs)
        return;
    if ((cc->vip && cc->vip != p->vip) || (cc->backend && cc->backend != p->backend) ||
        !((cc->verdicts >> verdict) & 1))
        return;
    rec = capture_ring.ringbuf_reserve(sizeof(*rec));
    if (!rec) {
        cs->lost++;
        return;
    }
    n = len < cc->snaplen ? len : cc->snaplen;
    if (n > CAPTURE_SNAP_MAX)
        n = CAPTURE_SNAP_MAX;
    if (n < 1 || bpf_xdp_load_bytes(ctx, 0, rec->data, n)) {
        capture_ring.ringbuf_discard(rec, 0);
        cs->lost++;
        return;
    }
    rec->ts = bpf_ktime_get_ns();
    rec->len = len;
    rec->cap_len = n;
    rec->vip = p->vip;
    rec->backend = p->backend;
    rec->seq = cs->copied;
    rec->cpu = bpf_get_smp_processor_id();
    rec->verdict = verdict;
    rec->sent = sent;
    capture_ring.ringbuf_submit(rec, 0);
    cs->copied++;
}

/* Could a VIP live on the destination address? A clear filter bit says no. */
static __always_inline int maybe_vip(const struct pkt *p)
{
    __u32 zero = 0;
    struct vip_filter *f = vip_filter.lookup(&zero);
    __u32 bit = vip_filter_bit(p->flow.dst, p->flow.family);

    if (!f)
        return 1;
    return (f->bits[(bit / 64) & (VIP_FILTER_WORDS - 1)] >> (bit % 64)) & 1;
}

static __always_inline int is_vip_address(const struct pkt *p)
{
    struct addr_key k = {};

    if (!maybe_vip(p))
        return 0;

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

/* The flow as the connection table keys it: IPv4 flows as flow4_key (four
 * words), IPv6 flows as the parser's flow_key itself. */
static __always_inline const __u32 *ct_key_of(const struct pkt *p, struct flow4_key *k4)
{
    if (p->flow.family != FAMILY_V4)
        return (const __u32 *)&p->flow;
    k4->src = p->flow.src[0];
    k4->dst = p->flow.dst[0];
    k4->sport = p->flow.sport;
    k4->dport = p->flow.dport;
    /* proto and its padding as one word: byte 12 = proto, 13..15 = 0 */
    ((__u32 *)k4)[3] = p->flow.proto;
    return (const __u32 *)k4;
}

/* Flow k's entry (k: `words` words, fh its hash): from its slot of the SYN
 * table, where an entry is newer than any in the connection table (*syn then
 * holds the slot, *seq the sequence word it was read under), else from the
 * connection table (*e then points at it). 0 with a stable copy in *c, or -1. */
static __always_inline int ct_get(int v6, const __u32 *k, __u32 fh, struct ct_entry *c,
                                  struct ct_entry **e, void **syn, __u8 **used, __u32 *seq)
{
    __u32 words = v6 ? CT_KEY6_WORDS : CT_KEY4_WORDS;
    __u8 *u = ct_syn_used_at(v6, fh);

    /* the slot only when its byte says it may hold an entry: most packets
     * read one byte of a small array here, not a slot of the SYN table */
    if (u && *(volatile __u8 *)u) {
        void *s = ct_syn_slot(v6, fh);

        if (s && !ct_syn_find(s, k, words, c, seq)) {
            *syn = s;
            *used = u;
            return 0;
        }
    }
    *e = ct_find(v6, k, fh, c);
    return *e ? 0 : -1;
}

/* An established flow: its entry says where it goes, as long as the VIP is
 * still the one that made the entry (same generation), the backend is still
 * the one it named and the VIP still lists it, and a UDP entry has not
 * expired. `fh` names the flow's buckets and SYN slot (ct_key_hash). The
 * flow's first packet after its SYN moves the entry from the SYN table into
 * the connection table. Returns 0 with the backend (and its index), VIP, the
 * VIP's flags (its encapsulation) and hash. */
static __always_inline int ct_lookup(struct pkt *p, const struct lb_config *cfg,
                                     struct global_stats *gs, __u32 fh, struct backend **out,
                                     __u32 *bidx, __u32 *vip_id, __u32 *vflags, __u32 *hash)
{
    int v6 = p->flow.family != FAMILY_V4;
    __u32 words = v6 ? CT_KEY6_WORDS : CT_KEY4_WORDS;
    struct flow4_key k4;
    const __u32 *k = ct_key_of(p, &k4);
    struct ct_entry c, *e = NULL;
    void *syn = NULL;
    __u8 *used = NULL;
    struct vip_info *vi;
    struct backend *b;
    __u32 idx, vid, seq = 0;
    __u64 now;
    int err;

    /* one call per family: each inlined with its own key size and maps */
    if (v6)
        err = ct_get(1, k, fh, &c, &e, &syn, &used, &seq);
    else
        err = ct_get(0, k, fh, &c, &e, &syn, &used, &seq);
    if (err)
        return -1;
    idx = c.backend;
    vid = c.vip_id;
    b = backends.lookup(&idx);
    vi = vip_info.lookup(&vid);
    if (!b || !vi || vi->generation != c.vip_gen)
        goto stale;
    if (vi->flags & VIP_F_NO_CONNTRACK) {
        if (syn)
            ct_syn_clear(syn, words, seq, used);
        return -1; /* such a VIP never uses the table (the flag came after the entry) */
    }
    if (!(b->flags & BACKEND_F_VALID) || b->generation != c.generation || !listed_by(b, vid))
        goto stale;
    now = lb_now();
    if (syn) {
        /* into the connection table; the slot stays until that succeeds (an
         * ICMP error about the flow is not its next packet: it moves nothing) */
        c.last_seen = now;
        err = -1;
        if (!p->icmp_error)
            err = v6 ? ct_write(1, k, fh, &c, gs) : ct_write(0, k, fh, &c, gs);
        if (!err) {
            ct_syn_clear(syn, words, seq, used);
            gs->ct_promote++;
        }
    } else if (p->flow.proto == PROTO_UDP) {
        if (now - c.last_seen >= cfg->udp_timeout_ns)
            goto stale;
        e->last_seen = now;
    } else if (now - c.last_seen >= CT_REFRESH_NS) {
        e->last_seen = now; /* which way to replace when the buckets are full: coarse is enough */
    }
    gs->ct_hit++;
    *out = b;
    *bidx = idx;
    *vip_id = vid;
    *vflags = vi->flags;
    *hash = c.hash;
    return 0;
stale:
    if (syn)
        ct_syn_clear(syn, words, seq, used);
    gs->ct_stale++;
    return -1;
}

/* A new flow to a backend: its VIP's and its backend's new-flow counters.
 * Only on the new-flow path: established packets never come here. */
static __always_inline void count_new_flow(__u32 vip_id, __u32 idx)
{
    struct vip_flows *vf = vip_flows.lookup(&vip_id);
    struct backend_stats *bs = backend_stats.lookup(&idx);

    if (vf)
        vf->new_flows++;
    if (bs)
        bs->new_flows++;
}

/* Too big to send towards b once encapsulated (IP-in-IP or GUE, as the
 * VIP's flags say), and not to be fragmented: the client gets ICMP instead
 * (forward), and no connection starts. */
static __always_inline int too_big_for(const struct pkt *p, const struct backend *b,
                                       const struct lb_config *cfg, __u32 vip_flags)
{
    return p->ip_len + encap_overhead(b, vip_flags) > cfg->mtu && p->df && !p->icmp_error;
}

/* A fresh Maglev pick, remembered unless the flow or the rate limit says
 * otherwise. A flow that gets an entry, or would but for the rate limit,
 * counts as a new flow of its VIP and backend. */
static __always_inline int pick_backend(struct pkt *p, const struct vip_meta *vip,
                                        const struct lb_config *cfg, struct global_stats *gs,
                                        __u32 hash, __u32 fh, struct backend **out, __u32 *bidx)
{
    struct backend *b;
    __u32 idx, vid = vip->vip_id;
    struct vip_info *vi;
    __u64 now;
    int limited;

    gs->ct_miss++;
    if (maglev_pick(vip, hash, &idx, &b))
        return -1;
    *out = b;
    *bidx = idx;
    /* an ICMP error, a RST or a packet answered "too big" never creates an
     * entry; neither do no-conntrack VIPs */
    if ((vip->flags & VIP_F_NO_CONNTRACK) || p->icmp_error ||
        (p->flow.proto == PROTO_TCP && (p->tcp_flags & TCP_FLAG_RST)) ||
        too_big_for(p, b, cfg, vip->flags))
        return 0;
    vi = vip_info.lookup(&vid);
    if (!vi)
        return 0;
    now = lb_now();
    /* New-flow rate limit: above it, new flows are served by Maglev alone, so
     * a flood of new flows cannot push the established ones out of the table. */
    limited = 0;
    if (cfg->new_flow_rate) {
        __u32 zero = 0;
        struct cpu_state *cs = cpu_state.lookup(&zero);

        if (cs && !rate_allows(&cs->ct_window, &cs->ct_count, cfg->new_flow_rate, now))
            limited = 1;
    }
    if (limited) {
        gs->ct_limited++;
        count_new_flow(vid, idx);
    } else {
        struct ct_entry fresh = {.backend = idx, .generation = b->generation, .vip_id = vid,
                                 .vip_gen = vi->generation, .hash = hash, .last_seen = now};
        struct flow4_key k4;
        int err;

        const __u32 *k = ct_key_of(p, &k4);
        void *s;
        __u8 *u;

        /* a SYN's entry waits in the SYN table for the flow's next packet; a
         * flow whose first packet we see is no SYN (UDP; TCP when the LB
         * restarted, or the flow moved from another node) goes into the
         * connection table at once */
        if (p->flow.proto == PROTO_TCP && (p->tcp_flags & TCP_FLAG_SYN)) {
            err = -1;
            if (p->flow.family == FAMILY_V4) {
                s = ct_syn_slot(0, fh);
                u = ct_syn_used_at(0, fh);
                if (s && u)
                    err = ct_syn_write(s, k, CT_KEY4_WORDS, &fresh, gs, u);
            } else {
                s = ct_syn_slot(1, fh);
                u = ct_syn_used_at(1, fh);
                if (s && u)
                    err = ct_syn_write(s, k, CT_KEY6_WORDS, &fresh, gs, u);
            }
        } else {
            if (p->flow.family == FAMILY_V4)
                err = ct_write(0, k, fh, &fresh, gs);
            else
                err = ct_write(1, k, fh, &fresh, gs);
        }
        if (!err) {
            gs->ct_insert++;
            count_new_flow(vid, idx);
        }
    }
    return 0;
}

/* The next hop of an encapsulated frame from the kernel's FIB (next_hop
 * fib): the Ethernet header rewritten from the answer, and the frame sent
 * back out of the ingress interface (XDP_TX) or out of another interface that
 * l4lb is attached to (XDP_REDIRECT through tx_ports). Returns the verdict
 * and moves its counter. (Here and not in nexthop.h: bcc rewrites map calls
 * in this file only.) */
static __always_inline int next_hop_fib(struct xdp_md *ctx, const struct pkt *p, __u8 family,
                                        __u32 idx, const struct lb_config *cfg,
                                        struct global_stats *gs)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct bpf_fib_lookup fib = {};
    struct fib_hop *hop = fib_hops.lookup(&idx);
    __u32 egress, *slot, s = 0;
    int action, fresh = 1;

    if ((void *)(eth + 1) > data_end) {
        gs->error++;
        return XDP_DROP;
    }
    /* the answer this CPU got for the backend, while no route, rule or
     * neighbour has changed (fib_gen) and for at most FIB_HOP_TTL_NS (read
     * every FIB_HOP_USES uses; the clock is a helper call) */
    if (hop && hop->expires && hop->gen == cfg->fib_gen && hop->ingress == ctx->ingress_ifindex) {
        if (--hop->uses == 0) {
            hop->uses = FIB_HOP_USES;
            fresh = lb_now() < hop->expires;
            if (!fresh) /* emptied: asked again until an answer sends, not only this once */
                hop->expires = 0;
        }
        action = !fresh ? XDP_ABORTED : hop->egress == hop->ingress ? XDP_TX
                                                                     : tx_ports.redirect_map(hop->slot, 0);
        if (action == XDP_TX || action == XDP_REDIRECT) {
            if (action == XDP_REDIRECT)
                gs->redirect++;
            __builtin_memcpy(eth->h_dest, hop->dmac, 6);
            __builtin_memcpy(eth->h_source, hop->smac, 6);
            return action;
        }
    }
    if (fib_params(ctx, p, family, &fib)) {
        gs->error++;
        return XDP_DROP;
    }
    gs->fib_lookup++;
    switch (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0)) {
    case BPF_FIB_LKUP_RET_SUCCESS:
        break;
    case BPF_FIB_LKUP_RET_NO_NEIGH:
        /* A route, but the next hop's MAC is not known (yet). Up the stack,
         * addressed to this NIC (encap() wrote the NIC's MAC as source): the
         * kernel forwards the packet itself, resolving the neighbour and
         * holding the packet until it answers; the next packets find it. */
        __builtin_memcpy(eth->h_dest, eth->h_source, 6);
        gs->fib_no_neigh++;
        return XDP_PASS;
    default:
        /* no route (unreachable, blackhole, prohibit), forwarding off on the
         * ingress interface, a local destination, too big for the egress
         * MTU, or a route the helper cannot follow (tunnels, lwt) */
        gs->fib_drop++;
        return XDP_DROP;
    }
    egress = fib.ifindex;
    if (egress == ctx->ingress_ifindex) {
        action = XDP_TX;
    } else {
        /* only to an interface l4lb is attached to (user space keeps
         * tx_port_slots and tx_ports to exactly those) */
        slot = tx_port_slots.lookup(&egress);
        if (slot)
            s = *slot;
        action = slot ? tx_ports.redirect_map(s, 0) : XDP_DROP;
        if (action != XDP_REDIRECT) {
            gs->fib_drop++;
            return XDP_DROP;
        }
        gs->redirect++;
    }
    __builtin_memcpy(eth->h_dest, fib.dmac, 6);
    __builtin_memcpy(eth->h_source, fib.smac, 6);
    if (hop) { /* only answers that send are kept: no neighbour, no route are asked again */
        __builtin_memcpy(hop->dmac, fib.dmac, 6);
        __builtin_memcpy(hop->smac, fib.smac, 6);
        hop->ingress = ctx->ingress_ifindex;
        hop->egress = egress;
        hop->slot = s;
        hop->gen = cfg->fib_gen;
        hop->uses = FIB_HOP_USES;
        hop->expires = lb_now() + FIB_HOP_TTL_NS;
    }
    return action;
}

/* An encapsulated packet sent to backend idx: tx, ICMP errors forwarded,
 * and the backend's packets and bytes (len: the frame as received). */
static __always_inline void count_sent(const struct pkt *p, struct global_stats *gs, __u32 idx,
                                       __u64 len)
{
    struct backend_stats *bs = backend_stats.lookup(&idx);

    if (p->icmp_error)
        gs->icmp_fwd++;
    gs->tx++;
    if (bs) {
        bs->packets++;
        bs->bytes += len;
    }
}

/* Sends a VIP packet to backend b (index idx): the too-big check,
 * encapsulation (vflags: the VIP's flags, which name it), counters. */
static __always_inline int forward(struct xdp_md *ctx, struct pkt *p, __u32 idx,
                                   const struct backend *b, const struct lb_config *cfg,
                                   struct global_stats *gs, __u32 hash, __u32 vflags)
{
    __u64 len = ctx->data_end - ctx->data; /* as received: the bytes vip_stats counts */
    int action;

    if (too_big_for(p, b, cfg, vflags)) {
        /* too big once encapsulated and may not be fragmented: tell the client */
        __u32 mtu = cfg->mtu - encap_overhead(b, vflags);

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
    if (cfg->capture)
        capture(ctx, p, XDP_TX, 0); /* as received: encapsulation rewrites it in place */
    action = encap(ctx, p, b, cfg, hash, vflags);
    if (action < 0) {
        gs->error++;
        return XDP_DROP;
    }
    if (cfg->next_hop == NEXT_HOP_FIB) {
        /* the next hop is asked once, in balancer(), whichever path got here:
         * one copy of that code, out of the way of the paths inlined here */
        p->fib_pending = 1;
        p->outer_family = b->family;
        p->rx_len = len;
        return action;
    }
    count_sent(p, gs, idx, len);
    return action;
}

static __always_inline void count_vip(struct xdp_md *ctx, __u32 vip_id)
{
    struct vip_stats *vs = vip_stats.lookup(&vip_id);

    if (vs) {
        vs->packets++;
        vs->bytes += ctx->data_end - ctx->data;
    }
}

/* A packet of a VIP flow: established flows go where their entry says (one
 * hash lookup in all); other packets find their VIP and take a fresh pick. */
static __always_inline int balance(struct xdp_md *ctx, struct pkt *p, const struct lb_config *cfg,
                                   struct global_stats *gs)
{
    int syn = p->flow.proto == PROTO_TCP &&
              (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
    struct vip_meta *vip;
    struct backend *b;
    __u32 vip_id, vflags, hash, idx;
    struct flow4_key k4;
    /* the hash that names the flow's connection-table buckets */
    __u32 fh = p->flow.family == FAMILY_V4 ? ct_key_hash(ct_key_of(p, &k4), CT_KEY4_WORDS)
                                           : ct_key_hash((const __u32 *)&p->flow, CT_KEY6_WORDS);

    /* a SYN always takes a fresh pick: a reused 5-tuple is a new connection */
    if (!syn && !ct_lookup(p, cfg, gs, fh, &b, &idx, &vip_id, &vflags, &hash)) {
        p->vip = vip_id + 1;
        p->backend = idx;
        count_vip(ctx, vip_id);
        return forward(ctx, p, idx, b, cfg, gs, hash, vflags);
    }
    vip = find_vip(p, cfg);
    if (!vip) {
        gs->pass++;
        return XDP_PASS;
    }
    vip_id = vip->vip_id;
    p->vip = vip_id + 1;
    count_vip(ctx, vip_id);
    hash = vip_flow_hash(&p->flow, vip->flags);
    if (pick_backend(p, vip, cfg, gs, hash, fh, &b, &idx)) {
        gs->no_backend++;
        return XDP_DROP;
    }
    p->backend = idx;
    return forward(ctx, p, idx, b, cfg, gs, hash, vip->flags);
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
    __u8 type;
    int res;

    if ((void *)l4 + 8 > data_end || icmp_len < 8) {
        if (!is_vip_address(p))
            goto pass;
        gs->malformed++;
        return XDP_DROP;
    }
    type = *(__u8 *)l4;
    /* echo and errors alike concern VIP addresses only: others leave after one array read */
    if (!maybe_vip(p))
        goto pass;
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
    return balance(ctx, p, cfg, gs);

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

/* Every packet's verdict; balancer() below adds the capture. */
static __always_inline int decide(struct xdp_md *ctx, struct pkt *p, const struct lb_config *cfg,
                                  struct global_stats *gs)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    void *l4 = NULL;
    __be16 proto;
    int res;

    res = parse_eth(data, data_end, p, &proto);
    if (res == PARSE_OK)
        res = parse_ip(data, data_end, p, proto, &l4);
    switch (res) {
    case PARSE_OK:
        break;
    case PARSE_ICMP:
        return handle_icmp(ctx, p, l4, cfg, gs);
    case PARSE_NOT_IP:
    case PARSE_GROUP_MAC:
        goto pass;
    case PARSE_FRAGMENT:
        if (!is_vip_address(p))
            goto pass;
        gs->fragment++;
        return XDP_DROP;
    case PARSE_EXT_HEADER:
        if (!is_vip_address(p))
            goto pass;
        gs->ext_header++;
        return XDP_DROP;
    default: /* PARSE_MALFORMED */
        gs->malformed++;
        return XDP_DROP;
    }

    /* traffic for the LB itself leaves here, after one array read */
    if (!maybe_vip(p))
        goto pass;
    res = parse_l4(l4, data_end, p, p->ip_len - (__u32)(l4 - data - p->l3off));
    if (res != PARSE_OK) {
        if (!is_vip_address(p))
            goto pass;
        gs->malformed++;
        return XDP_DROP;
    }
    return balance(ctx, p, cfg, gs);

pass:
    gs->pass++;
    return XDP_PASS;
}

int balancer(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct global_stats *gs = global_stats.lookup(&zero);
    struct lb_config *cfg = config.lookup(&zero);
    struct pkt p = {};
    int action;

    if (!gs || !cfg || !cfg->configured)
        return XDP_PASS;
    action = decide(ctx, &p, cfg, gs);
    if (p.fib_pending) { /* next_hop fib: an encapsulated packet's next hop */
        action = next_hop_fib(ctx, &p, p.outer_family, p.backend, cfg, gs);
        if (action == XDP_TX || action == XDP_REDIRECT)
            count_sent(&p, gs, p.backend, p.rx_len);
    }
    /* off: one test of a word the packet's path has read already; a packet
     * redirected to another interface is sent as any other: a "tx" copy */
    if (cfg->capture)
        capture(ctx, &p, action == XDP_REDIRECT ? XDP_TX : action,
                action == XDP_TX || action == XDP_REDIRECT);
    return action;
}
