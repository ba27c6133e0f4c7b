/* decap.c - for backends without ipip/ip6tnl/fou devices: strips the outer
 * IPv4 or IPv6 header of IP-in-IP packets addressed to this host (an address
 * in decap_addrs), and the outer IP and UDP headers of GUE packets (variant 1:
 * the inner IP packet right after the UDP header) sent to the address's GUE
 * port, and passes the inner packet up the stack, where the VIP on the
 * loopback device takes it. Everything else passes untouched. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#include "consts.h"
#include "structs.h"
#include "parse.h"

/* this host's tunnel endpoint addresses -> the GUE destination port taken on
 * that address (network order in the low 16 bits; 0: IP-in-IP only) */
BPF_F_TABLE("hash", struct addr_key, __u32, decap_addrs, MAP_DECAP_ADDRS_ENTRIES, MAP_DECAP_ADDRS_FLAGS);
/* index 0 -> counters, per CPU */
BPF_F_TABLE("percpu_array", __u32, struct decap_stats, decap_stats, MAP_DECAP_STATS_ENTRIES, MAP_DECAP_STATS_FLAGS);

int decap(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 zero = 0;
    struct decap_stats *st = decap_stats.lookup(&zero);
    struct addr_key k = {};
    struct pkt p = {};
    struct ethhdr *eth;
    __be16 proto, inner_proto;
    __u8 inner, gue = 0;
    __u32 l3off, outer_len, *ep;

    if (!st)
        return XDP_PASS;
    if (parse_eth(data, data_end, &p, &proto) != PARSE_OK)
        goto pass;
    l3off = p.l3off & 0x1f;
    if (proto == ETH_P_IP_BE) {
        struct iphdr *ip = data + l3off;

        if ((void *)(ip + 1) > data_end || (ip->protocol != PROTO_IPIP && ip->protocol != PROTO_UDP))
            goto pass;
        if (ip->ihl < 5 || ip->frag_off & IP_FRAG_MASK_BE)
            goto pass; /* the stack reassembles or rejects these */
        k.addr[0] = ip->daddr;
        k.family = FAMILY_V4;
        outer_len = ip->ihl * 4;
        inner = ip->protocol;
    } else {
        struct ipv6hdr *ip6 = data + l3off;

        if ((void *)(ip6 + 1) > data_end)
            goto pass;
        if (ip6->nexthdr != PROTO_IPIP && ip6->nexthdr != PROTO_IPV6 && ip6->nexthdr != PROTO_UDP)
            goto pass;
        __builtin_memcpy(k.addr, &ip6->daddr, 16);
        k.family = FAMILY_V6;
        outer_len = sizeof(*ip6);
        inner = ip6->nexthdr;
    }
    ep = decap_addrs.lookup(&k);
    if (!ep)
        goto pass;
    if (inner == PROTO_UDP) {
        /* GUE to this address's port? The version nibble of the inner header
         * names the inner packet (GUE variant 1); anything else on the port
         * (variant 0 headers, control messages) is left to the stack. The
         * outer checksum is not checked: the inner packet carries its own. */
        struct udphdr *u = data + l3off + (outer_len & 0x3c);
        __u8 *ver = (void *)(u + 1);

        if ((void *)(ver + 1) > data_end || !(*ep & 0xffff) || u->dest != (__be16)*ep)
            goto pass;
        if ((*ver >> 4) == 4)
            inner = PROTO_IPIP;
        else if ((*ver >> 4) == 6)
            inner = PROTO_IPV6;
        else
            goto pass;
        outer_len = (outer_len & 0x3c) + sizeof(*u);
        gue = 1;
    }
    inner_proto = inner == PROTO_IPIP ? ETH_P_IP_BE : ETH_P_IPV6_BE;
    {
        /* the inner header must be there: never pass up a stub */
        void *in = data + l3off + (outer_len & 0x7c);
        __u32 need = inner == PROTO_IPIP ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);

        if (in + need > data_end) {
            st->malformed++;
            return XDP_DROP;
        }
    }
    /* move the link layer forward over the outer header, then drop the gap */
    {
        struct ethhdr saved;
        struct vlan_tag tag;

        eth = data;
        if ((void *)(eth + 1) + sizeof(tag) > data_end)
            goto pass;
        saved = *eth;
        tag = *(struct vlan_tag *)(eth + 1);
        if (bpf_xdp_adjust_head(ctx, (int)(outer_len & 0x7c)))
            goto pass;
        data = (void *)(long)ctx->data;
        data_end = (void *)(long)ctx->data_end;
        eth = data;
        if ((void *)(eth + 1) + sizeof(tag) > data_end) {
            st->malformed++;
            return XDP_DROP;
        }
        __builtin_memcpy(eth->h_dest, saved.h_dest, 6);
        __builtin_memcpy(eth->h_source, saved.h_source, 6);
        if (l3off == sizeof(struct ethhdr)) {
            eth->h_proto = inner_proto;
        } else {
            struct vlan_tag *t = (void *)(eth + 1);

            eth->h_proto = saved.h_proto;
            t->tci = tag.tci;
            t->proto = inner_proto;
        }
    }
    if (k.family == FAMILY_V4)
        st->decap4++;
    else
        st->decap6++;
    if (gue)
        st->gue++;
    return XDP_PASS;
pass:
    st->pass++;
    return XDP_PASS;
}
