/* parse.h - header parsing. Each step checks the bytes it reads against
 * data_end once, through a typed pointer, and checks length fields before it
 * trusts them. Parsers only describe the packet (struct pkt) and return a
 * PARSE_* code; the verdicts are decided in balancer.c. */
#pragma once

enum parse_result {
    PARSE_OK = 0,
    PARSE_NOT_IP,     /* not IPv4/IPv6, or an L4 protocol l4lb does not balance */
    PARSE_MALFORMED,  /* truncated or inconsistent Ethernet/IP header */
    PARSE_L4_SHORT,   /* IP header fine, L4 header truncated */
    PARSE_FRAGMENT,   /* IPv4 fragment */
    PARSE_EXT_HEADER, /* IPv6 extension header before L4 */
    PARSE_ICMP,       /* ICMP / ICMPv6: handled by icmp.h */
    PARSE_GROUP_MAC,  /* destination MAC multicast or broadcast: not for the balancer */
};

struct vlan_tag {
    __be16 tci;
    __be16 proto;
};

/* Ethernet and at most one 802.1Q/802.1ad tag. Sets p->l3off. A frame sent
 * to a group address (multicast, broadcast) is nobody's own flow: the
 * balancer leaves it to the stack. */
static __always_inline int parse_eth(void *data, void *data_end, struct pkt *p, __be16 *proto)
{
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return PARSE_MALFORMED;
    if (eth->h_dest[0] & 1)
        return PARSE_GROUP_MAC;
    *proto = eth->h_proto;
    p->l3off = sizeof(*eth);
    if (*proto == ETH_P_8021Q_BE || *proto == ETH_P_8021AD_BE) {
        struct vlan_tag *tag = (void *)(eth + 1);

        if ((void *)(tag + 1) > data_end)
            return PARSE_MALFORMED;
        *proto = tag->proto;
        p->l3off += sizeof(*tag);
    }
    if (*proto != ETH_P_IP_BE && *proto != ETH_P_IPV6_BE)
        return PARSE_NOT_IP;
    return PARSE_OK;
}

static __always_inline int is_ipv6_ext_header(__u8 nh)
{
    /* hop-by-hop, routing, fragment, ESP, AH, destination options, mobility, HIP, shim6 */
    return nh == 0 || nh == 43 || nh == 44 || nh == 50 || nh == 51 || nh == 60 ||
           nh == 135 || nh == 139 || nh == 140;
}

/* The IP header. On PARSE_OK/PARSE_ICMP/PARSE_L4_SHORT the addresses,
 * protocol and lengths in p are set; *l4 points after the IP header. */
static __always_inline int parse_ip(void *data, void *data_end, struct pkt *p, __be16 proto,
                                    void **l4)
{
    __u32 frame_len = data_end - data;
    __u32 l3off = p->l3off & 0x1f; /* 14 or 18; the mask gives the verifier a bound */

    if (proto == ETH_P_IP_BE) {
        struct iphdr *ip = data + l3off;
        __u32 ihl;

        if ((void *)(ip + 1) > data_end)
            return PARSE_MALFORMED;
        ihl = ip->ihl * 4;
        if (ip->version != 4 || ihl < sizeof(*ip))
            return PARSE_MALFORMED;
        p->ip_len = bpf_ntohs(ip->tot_len);
        if (p->ip_len < ihl || l3off + p->ip_len > frame_len)
            return PARSE_MALFORMED;
        p->flow.family = FAMILY_V4;
        p->flow.src[0] = ip->saddr;
        p->flow.dst[0] = ip->daddr;
        p->flow.proto = ip->protocol;
        p->tos = ip->tos;
        p->df = (ip->frag_off & IP_DF_BE) != 0;
        if (ip->frag_off & IP_FRAG_MASK_BE)
            return PARSE_FRAGMENT;
        *l4 = (void *)ip + ihl;
        if (ip->protocol == PROTO_ICMP)
            return PARSE_ICMP;
        if (ip->protocol != PROTO_TCP && ip->protocol != PROTO_UDP)
            return PARSE_NOT_IP;
        return PARSE_OK;
    } else {
        struct ipv6hdr *ip6 = data + l3off;

        if ((void *)(ip6 + 1) > data_end)
            return PARSE_MALFORMED;
        if (ip6->version != 6)
            return PARSE_MALFORMED;
        p->ip_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
        if (l3off + p->ip_len > frame_len)
            return PARSE_MALFORMED;
        p->flow.family = FAMILY_V6;
        __builtin_memcpy(p->flow.src, &ip6->saddr, 16);
        __builtin_memcpy(p->flow.dst, &ip6->daddr, 16);
        p->flow.proto = ip6->nexthdr;
        p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
        p->df = 1;
        *l4 = ip6 + 1;
        if (ip6->nexthdr == PROTO_ICMPV6)
            return PARSE_ICMP;
        if (is_ipv6_ext_header(ip6->nexthdr))
            return PARSE_EXT_HEADER;
        if (ip6->nexthdr != PROTO_TCP && ip6->nexthdr != PROTO_UDP)
            return PARSE_NOT_IP;
        return PARSE_OK;
    }
}

/* TCP or UDP ports (and TCP flags). The L4 header must lie inside both the
 * frame and the length that the IP header claims. */
static __always_inline int parse_l4(void *l4, void *data_end, struct pkt *p, __u32 l4_len)
{
    if (p->flow.proto == PROTO_TCP) {
        struct tcphdr *tcp = l4;

        if ((void *)(tcp + 1) > data_end || l4_len < sizeof(*tcp))
            return PARSE_L4_SHORT;
        p->flow.sport = tcp->source;
        p->flow.dport = tcp->dest;
        p->tcp_flags = ((__u8 *)tcp)[13];
    } else {
        struct udphdr *udp = l4;

        if ((void *)(udp + 1) > data_end || l4_len < sizeof(*udp))
            return PARSE_L4_SHORT;
        p->flow.sport = udp->source;
        p->flow.dport = udp->dest;
    }
    return PARSE_OK;
}

/* An ICMP error quotes the packet that caused it: IP header and 8 bytes of
 * L4. That packet went from a VIP (a backend's DSR reply) to a client, so the
 * flow it belongs to is the quote with source and destination swapped.
 * avail: bytes of the quote inside the error's IP length; whatever lies
 * beyond is Ethernet padding, not part of the quote. */
static __always_inline int parse_quoted_v4(void *quote, void *data_end, struct pkt *p, __u32 avail)
{
    struct iphdr *in = quote;
    __u32 ihl;
    __be16 *ports;

    if ((void *)(in + 1) > data_end)
        return PARSE_L4_SHORT;
    ihl = in->ihl * 4;
    if (in->version != 4 || ihl < sizeof(*in) || ihl + 4 > avail)
        return PARSE_L4_SHORT;
    if (in->protocol != PROTO_TCP && in->protocol != PROTO_UDP)
        return PARSE_NOT_IP;
    ports = (void *)in + ihl;
    if ((void *)(ports + 2) > data_end)
        return PARSE_L4_SHORT;
    if (in->saddr != p->flow.dst[0])
        return PARSE_NOT_IP; /* not about a packet this address sent */
    p->flow.src[0] = in->daddr;
    p->flow.proto = in->protocol;
    p->flow.sport = ports[1];
    p->flow.dport = ports[0];
    p->icmp_error = 1;
    return PARSE_OK;
}

static __always_inline int parse_quoted_v6(void *quote, void *data_end, struct pkt *p, __u32 avail)
{
    struct ipv6hdr *in = quote;
    __be16 *ports = (void *)(in + 1);

    if ((void *)(ports + 2) > data_end || sizeof(*in) + 4 > avail)
        return PARSE_L4_SHORT;
    if (in->nexthdr != PROTO_TCP && in->nexthdr != PROTO_UDP)
        return PARSE_NOT_IP;
    if (in->saddr.in6_u.u6_addr32[0] != p->flow.dst[0] ||
        in->saddr.in6_u.u6_addr32[1] != p->flow.dst[1] ||
        in->saddr.in6_u.u6_addr32[2] != p->flow.dst[2] ||
        in->saddr.in6_u.u6_addr32[3] != p->flow.dst[3])
        return PARSE_NOT_IP; /* not about a packet this address sent */
    __builtin_memcpy(p->flow.src, &in->daddr, 16);
    p->flow.proto = in->nexthdr;
    p->flow.sport = ports[1];
    p->flow.dport = ports[0];
    p->icmp_error = 1;
    return PARSE_OK;
}
