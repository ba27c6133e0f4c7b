/* baseline_encap.c - the minimal IPIP encapsulation that the balancer is
 * compared with: grow the head by one IPv4 header, write Ethernet and the
 * outer IPv4 header (with its checksum) in front of the untouched inner
 * packet, and send it back out with XDP_TX. No lookups, no hashing: one
 * fixed tunnel from 198.18.20.1 to the backend 198.18.2.1, addressed to the
 * gateway 02:00:00:00:00:01. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

#define TUNNEL_SRC 0x011412c6u  /* 198.18.20.1, as it lies in memory */
#define TUNNEL_DST 0x010212c6u  /* 198.18.2.1 */

int encap(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *inner = (void *)(eth + 1);
    struct iphdr *o;
    __u8 own_mac[6];
    __be16 inner_len;
    __u8 tos;
    __u64 sum = 0;

    if ((void *)(inner + 1) > data_end)
        return XDP_DROP;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    inner_len = inner->tot_len;
    tos = inner->tos;
    __builtin_memcpy(own_mac, eth->h_dest, 6);

    if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
        return XDP_ABORTED;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    o = (void *)(eth + 1);
    if ((void *)(o + 1) > data_end)
        return XDP_ABORTED;

    eth->h_dest[0] = 0x02;
    eth->h_dest[1] = 0;
    eth->h_dest[2] = 0;
    eth->h_dest[3] = 0;
    eth->h_dest[4] = 0;
    eth->h_dest[5] = 0x01;
    __builtin_memcpy(eth->h_source, own_mac, 6);
    eth->h_proto = bpf_htons(ETH_P_IP);

    o->version = 4;
    o->ihl = 5;
    o->tos = tos;
    o->tot_len = bpf_htons(bpf_ntohs(inner_len) + sizeof(struct iphdr));
    o->id = 0;
    o->frag_off = bpf_htons(0x4000); /* DF */
    o->ttl = 64;
    o->protocol = 4; /* IPPROTO_IPIP */
    o->check = 0;
    o->saddr = TUNNEL_SRC;
    o->daddr = TUNNEL_DST;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += ((__u16 *)o)[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    o->check = (__u16)~sum;
    return XDP_TX;
}
