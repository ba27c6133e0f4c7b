/* probe_encap.c - tc egress (clsact, direct action) on the LB's interface:
 * sends a health probe to the VIP on one chosen backend. The prober's socket
 * carries a mark, PROBE_MARK_TAG | backend index (| PROBE_MARK_GUE for a VIP
 * whose packets go in GUE); this program wraps each marked packet in an outer
 * IP header (and the GUE UDP header) addressed to that backend, built by
 * encap.h's writers from the balancer's own pinned `backends` and `config`
 * maps, so the probe travels exactly as client traffic does and proves the
 * backend's decapsulation, its VIP on loopback and its server. Packets
 * without the tag go on untouched. A marked packet that cannot be wrapped is
 * dropped, never sent bare: the route to a VIP leads back to the balancer,
 * which would hand it to any backend.
 *
 * Checksums: the outer IPv4 header's is computed here. The inner packet is
 * not touched; a TCP checksum the stack left partial (CHECKSUM_PARTIAL:
 * csum_start and csum_offset point into the inner header, and stay valid as
 * the room opens in front of it) is completed by the device or by the stack,
 * which bpf_skb_adjust_room's ENCAP_L3 flags tell that the packet is now a
 * tunnel packet (skb->encapsulation, inner header offsets). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

#include "consts.h"
#include "structs.h"
#include "parse.h"
#include "csum.h"
#include "encap.h"

#ifndef PIN_DIR
#error "the probe program shares the balancer's pinned maps: compile through l4lb.bpf.load_probe_encap"
#endif

/* The balancer's maps, opened through their pins (xdp/maps.h owns them). */
BPF_TABLE_PINNED7("array", __u32, struct backend, backends, MAP_BACKENDS_ENTRIES, PIN_DIR "/backends",
                  MAP_BACKENDS_FLAGS);
BPF_TABLE_PINNED7("array", __u32, struct lb_config, config, MAP_CONFIG_ENTRIES, PIN_DIR "/config",
                  MAP_CONFIG_FLAGS);
/* index 0 -> this program's counters, per CPU */
BPF_F_TABLE("percpu_array", __u32, struct probe_stats, probe_stats, MAP_PROBE_STATS_ENTRIES,
            MAP_PROBE_STATS_FLAGS);

static __always_inline int is_probe(const struct __sk_buff *skb)
{
    return (skb->mark & PROBE_MARK_MASK) == PROBE_MARK_TAG;
}

/* What the outer header copies from the inner one. */
struct inner {
    __u8 tos;
    __u8 df;
    __u8 nexthdr; /* PROTO_IPIP or PROTO_IPV6: what the outer header carries */
    __u8 family;
};

static __always_inline int read_inner(struct __sk_buff *skb, __be16 proto, struct inner *in)
{
    if (proto == ETH_P_IP_BE) {
        struct iphdr ip;

        if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ip, sizeof(ip)))
            return -1;
        in->tos = ip.tos;
        in->df = !!(ip.frag_off & IP_DF_BE);
        in->nexthdr = PROTO_IPIP;
        in->family = FAMILY_V4;
        return 0;
    }
    if (proto == ETH_P_IPV6_BE) {
        __be32 w0;

        if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &w0, sizeof(w0)))
            return -1;
        in->tos = (bpf_ntohl(w0) >> 20) & 0xff;
        in->df = 1;
        in->nexthdr = PROTO_IPV6;
        in->family = FAMILY_V6;
        return 0;
    }
    return -1;
}

int probe_encap(struct __sk_buff *skb)
{
    __u32 zero = 0;
    __u32 index = skb->mark & PROBE_INDEX_MASK;
    __u32 gue = skb->mark & PROBE_MARK_GUE, udp = gue ? sizeof(struct udphdr) : 0;
    struct probe_stats *st = probe_stats.lookup(&zero);
    struct lb_config *cfg;
    struct backend *b;
    struct inner in = {};
    __be16 proto;
    __u32 inner_len, hash;

    if (!st)
        return is_probe(skb) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
    if (!is_probe(skb)) {
        st->pass++;
        return TC_ACT_UNSPEC;
    }
    b = backends.lookup(&index);
    if (!b || index == 0 || !(b->flags & BACKEND_F_VALID)) {
        st->no_backend++;
        return TC_ACT_SHOT;
    }
    cfg = config.lookup(&zero);
    if (!cfg || !cfg->configured)
        goto error;
    if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)))
        goto error;
    if (read_inner(skb, proto, &in))
        goto error;
    inner_len = skb->len - sizeof(struct ethhdr);
    hash = bpf_get_hash_recalc(skb);

    /* GUE: the UDP header right after the outer IP header, as encap() writes it */
    if (b->family == FAMILY_V4) {
        struct {
            struct iphdr ip;
            struct udphdr udp;
        } o;

        if (in.family != FAMILY_V4) /* IPv6 in IPv4: backends (and the balancer) never take it */
            goto error;
        write_outer4(&o.ip, cfg, hash, in.tos, inner_len + udp, in.df, b->addr[0],
                     gue ? PROTO_UDP : PROTO_IPIP);
        write_gue(&o.udp, cfg, hash, inner_len + sizeof(o.udp)); /* sent only for GUE */
        if (bpf_skb_adjust_room(skb, sizeof(o.ip) + udp, BPF_ADJ_ROOM_MAC,
                                BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | (gue ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0)))
            goto error;
        if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &o, gue ? sizeof(o) : sizeof(o.ip), 0))
            goto error;
        proto = ETH_P_IP_BE;
    } else {
        struct {
            struct ipv6hdr ip;
            struct udphdr udp;
        } o;

        write_outer6(&o.ip, cfg, hash, in.tos, inner_len + udp, gue ? PROTO_UDP : in.nexthdr, b->addr);
        write_gue(&o.udp, cfg, hash, inner_len + sizeof(o.udp));
        if (bpf_skb_adjust_room(skb, sizeof(o.ip) + udp, BPF_ADJ_ROOM_MAC,
                                BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | (gue ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0)))
            goto error;
        if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &o, gue ? sizeof(o) : sizeof(o.ip), 0))
            goto error;
        proto = ETH_P_IPV6_BE;
    }
    /* to the balancer's gateway, as its XDP_TX frames go; the source MAC stays the NIC's */
    if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), cfg->gw_mac, 6, 0) ||
        bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto), 0))
        goto error;
    if (b->family == FAMILY_V4)
        st->encap4++;
    else
        st->encap6++;
    if (gue)
        st->gue++;
    return TC_ACT_OK;
error:
    st->error++;
    return TC_ACT_SHOT;
}
