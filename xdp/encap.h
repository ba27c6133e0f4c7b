/* encap.h - IP-in-IP encapsulation (4in4, 6in6, 4in6) and the same in GUE
 * (variant 1: the inner IP packet right after an outer UDP header). The inner
 * packet is never touched; the head grows by one IP header (and a UDP header
 * for GUE) and the link layer is rebuilt in front of it, addressed to the
 * gateway. */
#pragma once

/* Link layer saved before the head moves. */
struct l2_saved {
    __u8 own_mac[6];   /* the frame's destination: this NIC */
    __u8 peer_mac[6];  /* the frame's source: the previous hop */
    __be16 outer_proto;/* the tag's ethertype when tagged */
    struct vlan_tag tag;
};

static __always_inline int save_l2(void *data, void *data_end, struct pkt *p, struct l2_saved *s)
{
    struct ethhdr *eth = data;
    struct vlan_tag *tag = (void *)(eth + 1);

    if ((void *)(tag + 1) > data_end) /* a parsed IP packet always has these bytes */
        return -1;
    __builtin_memcpy(s->own_mac, eth->h_dest, 6);
    __builtin_memcpy(s->peer_mac, eth->h_source, 6);
    s->outer_proto = eth->h_proto;
    s->tag = *tag;
    return 0;
}

/* Writes Ethernet (and the saved tag) at the new head. The caller has
 * checked that data + 18 <= data_end. */
static __always_inline void write_l2(void *data, struct pkt *p, const struct l2_saved *s,
                                     const __u8 *dst, const __u8 *src, __be16 l3proto)
{
    struct ethhdr *eth = data;

    __builtin_memcpy(eth->h_dest, dst, 6);
    __builtin_memcpy(eth->h_source, src, 6);
    if (p->l3off == sizeof(struct ethhdr)) {
        eth->h_proto = l3proto;
    } else {
        struct vlan_tag *tag = (void *)(eth + 1);

        eth->h_proto = s->outer_proto;
        tag->tci = s->tag.tci;
        tag->proto = l3proto;
    }
}

static __always_inline __be32 outer_src4(const struct lb_config *cfg, __u32 hash)
{
    return (cfg->src4 & ~cfg->src4_hostmask) | (hash & cfg->src4_hostmask);
}

/* The outer headers, written in place; shared with the probes' tc program
 * (probe_encap.c), so a probe leaves exactly as client traffic does.
 * inner_len: bytes after the outer header (the inner IP packet, and for GUE
 * the UDP header before it); proto: PROTO_IPIP or, for GUE, PROTO_UDP. */
static __always_inline void write_outer4(struct iphdr *o, const struct lb_config *cfg, __u32 hash,
                                         __u8 tos, __u32 inner_len, __u8 df, __be32 daddr,
                                         __u8 proto)
{
    *(__u8 *)o = 0x45; /* version 4, IHL 5 */
    o->tos = tos;
    o->tot_len = bpf_htons(inner_len + sizeof(*o));
    o->id = 0;
    o->frag_off = df ? IP_DF_BE : 0;
    o->ttl = OUTER_TTL;
    o->protocol = proto;
    o->check = 0;
    o->saddr = outer_src4(cfg, hash);
    o->daddr = daddr;
    o->check = ipv4_hdr_csum(o);
}

static __always_inline void write_outer6(struct ipv6hdr *o, const struct lb_config *cfg, __u32 hash,
                                         __u8 tos, __u32 inner_len, __u8 nexthdr, const __be32 *daddr)
{
    __be32 *w = (__be32 *)o;

    /* version, traffic class, and the flow hash as flow label for ECMP/RSS */
    w[0] = bpf_htonl((6u << 28) | ((__u32)tos << 20) | (hash & 0xfffff));
    o->payload_len = bpf_htons(inner_len);
    o->nexthdr = nexthdr;
    o->hop_limit = OUTER_TTL;
    __builtin_memcpy(&o->saddr, cfg->src6, 12);
    o->saddr.in6_u.u6_addr32[3] = (cfg->src6[3] & ~cfg->src6_hostmask) | (hash & cfg->src6_hostmask);
    __builtin_memcpy(&o->daddr, daddr, 16);
}

/* Is the VIP's encapsulation GUE (else IP-in-IP)? */
static __always_inline int vip_is_gue(__u32 vip_flags)
{
    return vip_flags & VIP_F_GUE;
}

/* Bytes that encapsulation towards b adds in front of the inner IP packet. */
static __always_inline __u32 encap_overhead(const struct backend *b, __u32 vip_flags)
{
    __u32 ip = b->family == FAMILY_V4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);

    return vip_is_gue(vip_flags) ? ip + sizeof(struct udphdr) : ip;
}

/* The GUE UDP header: the source port from the flow hash, so that the
 * backend's NIC spreads flows over its queues (RSS); checksum 0 (the inner
 * packet carries its own; docs/dataplane.md says why IPv6 allows it here).
 * udp_len: UDP header and the inner packet. */
static __always_inline void write_gue(struct udphdr *u, const struct lb_config *cfg, __u32 hash,
                                      __u32 udp_len)
{
    u->source = bpf_htons(GUE_SPORT_BASE | (hash & GUE_SPORT_MASK));
    u->dest = cfg->gue_port;
    u->len = bpf_htons(udp_len);
    u->check = 0;
}

/* Encapsulates the packet described by p towards backend b, in IP-in-IP or in
 * GUE as the VIP's flags say, and returns the verdict. Outer TTL 64, TOS
 * copied, DF copied from IPv4 (always on for an IPv6 outer header, which
 * routers never fragment). */
static __always_inline int encap(struct xdp_md *ctx, struct pkt *p, const struct backend *b,
                                 const struct lb_config *cfg, __u32 hash, __u32 vip_flags)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct l2_saved l2;
    __u32 l3off;
    int gue = vip_is_gue(vip_flags);
    int grow = encap_overhead(b, vip_flags);

    if (save_l2(data, data_end, p, &l2))
        return -1;
    if (bpf_xdp_adjust_head(ctx, -grow))
        return -1;
    /* adjust_head invalidates every packet pointer: reload and check again */
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    l3off = p->l3off & 0x1f;

    /* (for IP-in-IP, u is where the inner packet starts: it is only written for GUE) */
    if (b->family == FAMILY_V4) {
        struct iphdr *o = data + l3off;
        struct udphdr *u = (void *)(o + 1);

        if ((void *)(u + 1) > data_end || data + 18 > data_end)
            return -1;
        write_l2(data, p, &l2, cfg->gw_mac, l2.own_mac, ETH_P_IP_BE);
        if (gue) {
            write_outer4(o, cfg, hash, p->tos, p->ip_len + sizeof(*u), p->df, b->addr[0], PROTO_UDP);
            write_gue(u, cfg, hash, p->ip_len + sizeof(*u));
        } else {
            write_outer4(o, cfg, hash, p->tos, p->ip_len, p->df, b->addr[0], PROTO_IPIP);
        }
    } else {
        struct ipv6hdr *o = data + l3off;
        struct udphdr *u = (void *)(o + 1);

        if ((void *)(u + 1) > data_end || data + 18 > data_end)
            return -1;
        write_l2(data, p, &l2, cfg->gw_mac, l2.own_mac, ETH_P_IPV6_BE);
        if (gue) {
            write_outer6(o, cfg, hash, p->tos, p->ip_len + sizeof(*u), PROTO_UDP, b->addr);
            write_gue(u, cfg, hash, p->ip_len + sizeof(*u));
        } else {
            write_outer6(o, cfg, hash, p->tos, p->ip_len,
                         p->flow.family == FAMILY_V4 ? PROTO_IPIP : PROTO_IPV6, b->addr);
        }
    }
    return XDP_TX;
}
