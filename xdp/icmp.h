/* icmp.h - the ICMP the LB answers itself: echo replies for VIP addresses and
 * "fragmentation needed" / "packet too big" for VIP packets that would not fit
 * the path once encapsulated. Every message built here is rate-limited per
 * CPU by the caller, so the LB cannot be used as an amplifier. */
#pragma once

#define ICMP_ECHO_REQUEST 8
#define ICMP_ECHO_REPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

static __always_inline void swap_macs(struct ethhdr *eth)
{
    __u8 tmp[6];

    __builtin_memcpy(tmp, eth->h_source, 6);
    __builtin_memcpy(eth->h_source, eth->h_dest, 6);
    __builtin_memcpy(eth->h_dest, tmp, 6);
}

/* Echo request -> reply in place: swap addresses, new type, TTL 64, both
 * checksums updated incrementally (swapping addresses changes no sum). */
static __always_inline int echo_reply4(void *data, void *data_end, struct pkt *p, void *l4)
{
    struct iphdr *ip = data + (p->l3off & 0x1f);
    struct icmphdr *ic = l4;
    __u16 old, new;

    if ((void *)(ip + 1) > data_end || (void *)(ic + 1) > data_end ||
        data + sizeof(struct ethhdr) > data_end)
        return XDP_DROP;
    old = *(__u16 *)ic;
    ic->type = ICMP_ECHO_REPLY;
    ic->checksum = csum_replace16(ic->checksum, old, *(__u16 *)ic);
    old = *(__u16 *)&ip->ttl;
    ip->ttl = OUTER_TTL;
    ip->check = csum_replace16(ip->check, old, *(__u16 *)&ip->ttl);
    ip->daddr = ip->saddr;
    ip->saddr = p->flow.dst[0];
    swap_macs(data);
    return XDP_TX;
}

static __always_inline int echo_reply6(void *data, void *data_end, struct pkt *p, void *l4)
{
    struct ipv6hdr *ip6 = data + (p->l3off & 0x1f);
    struct icmp6hdr *ic = l4;
    __u16 old;

    if ((void *)(ip6 + 1) > data_end || (void *)(ic + 1) > data_end ||
        data + sizeof(struct ethhdr) > data_end)
        return XDP_DROP;
    old = *(__u16 *)ic;
    ic->icmp6_type = ICMPV6_ECHO_REPLY;
    ic->icmp6_cksum = csum_replace16(ic->icmp6_cksum, old, *(__u16 *)ic);
    ip6->hop_limit = OUTER_TTL;
    __builtin_memcpy(&ip6->daddr, &ip6->saddr, 16);
    __builtin_memcpy(&ip6->saddr, p->flow.dst, 16);
    swap_macs(data);
    return XDP_TX;
}

/* Fragmentation needed: [eth][IPv4][ICMP 8][quoted IPv4 header][8 bytes].
 * The frame is cut after the quote, then the head grows by IPv4 + ICMP. */
static __always_inline int too_big4(struct xdp_md *ctx, struct pkt *p, __u32 mtu)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 l3off = p->l3off & 0x1f;
    struct l2_saved l2;
    struct iphdr *ip = data + l3off;
    struct icmphdr *ic;
    __u32 ihl, icmp_len;
    __u64 sum = 0;
    __u16 *w;

    if (save_l2(data, data_end, p, &l2) || (void *)(ip + 1) > data_end)
        return -1;
    ihl = (ip->ihl * 4) & 0x3c;
    icmp_len = sizeof(*ic) + ihl + 8;
    if (bpf_xdp_adjust_tail(ctx, (int)(l3off + ihl + 8) - (int)(data_end - data)))
        return -1;
    if (bpf_xdp_adjust_head(ctx, -(int)(sizeof(*ip) + sizeof(*ic))))
        return -1;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    ip = data + l3off;
    ic = (void *)(ip + 1);
    if ((void *)(ic + 1) > data_end || data + 18 > data_end)
        return -1;
    write_l2(data, p, &l2, l2.peer_mac, l2.own_mac, ETH_P_IP_BE);
    *(__u8 *)ip = 0x45;
    ip->tos = 0;
    ip->tot_len = bpf_htons(sizeof(*ip) + icmp_len);
    ip->id = 0;
    ip->frag_off = 0;
    ip->ttl = OUTER_TTL;
    ip->protocol = PROTO_ICMP;
    ip->check = 0;
    ip->saddr = p->flow.dst[0];
    ip->daddr = p->flow.src[0];
    ip->check = ipv4_hdr_csum(ip);
    ic->type = ICMP_DEST_UNREACH;
    ic->code = ICMP_FRAG_NEEDED;
    ic->checksum = 0;
    ic->un.frag.__unused = 0;
    ic->un.frag.mtu = bpf_htons(mtu);
    w = (__u16 *)ic;
    for (int i = 0; i < (8 + 60 + 8) / 2; i++) {
        if (i * 2 >= icmp_len || (void *)(w + i + 1) > data_end)
            break;
        sum += w[i];
    }
    ic->checksum = fold_csum(sum);
    return XDP_TX;
}

/* Packet too big: [eth][IPv6][ICMPv6 8][quoted IPv6 header][8 bytes]. */
static __always_inline int too_big6(struct xdp_md *ctx, struct pkt *p, __u32 mtu)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 l3off = p->l3off & 0x1f;
    struct l2_saved l2;
    struct ipv6hdr *ip6;
    struct icmp6hdr *ic;
    const __u32 icmp_len = sizeof(*ic) + sizeof(*ip6) + 8;
    __u64 sum = 0;
    __u16 *w;

    if (save_l2(data, data_end, p, &l2))
        return -1;
    if (bpf_xdp_adjust_tail(ctx, (int)(l3off + sizeof(*ip6) + 8) - (int)(data_end - data)))
        return -1;
    if (bpf_xdp_adjust_head(ctx, -(int)(sizeof(*ip6) + sizeof(*ic))))
        return -1;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    ip6 = data + l3off;
    ic = (void *)(ip6 + 1);
    w = (__u16 *)ic;
    if ((void *)ic + icmp_len > data_end || data + 18 > data_end)
        return -1;
    write_l2(data, p, &l2, l2.peer_mac, l2.own_mac, ETH_P_IPV6_BE);
    *(__be32 *)ip6 = bpf_htonl(6u << 28);
    ip6->payload_len = bpf_htons(icmp_len);
    ip6->nexthdr = PROTO_ICMPV6;
    ip6->hop_limit = OUTER_TTL;
    __builtin_memcpy(&ip6->saddr, p->flow.dst, 16);
    __builtin_memcpy(&ip6->daddr, p->flow.src, 16);
    ic->icmp6_type = ICMPV6_PKT_TOOBIG;
    ic->icmp6_code = 0;
    ic->icmp6_cksum = 0;
    ic->icmp6_dataun.un_data32[0] = bpf_htonl(mtu);
    /* pseudo-header: addresses, upper-layer length, next header */
    sum = sum_words32(p->flow.dst, 4, sum);
    sum = sum_words32(p->flow.src, 4, sum);
    sum += bpf_htons(icmp_len);
    sum += bpf_htons(PROTO_ICMPV6);
#pragma unroll
    for (int i = 0; i < icmp_len / 2; i++)
        sum += w[i];
    ic->icmp6_cksum = fold_csum(sum);
    return XDP_TX;
}
