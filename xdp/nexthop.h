/* nexthop.h - the question an encapsulated packet asks the kernel's FIB when
 * lb_config.next_hop = NEXT_HOP_FIB: its outer destination, as if the packet
 * were forwarded from the ingress interface. balancer.c (next_hop_fib) sends
 * it by the answer. With NEXT_HOP_GATEWAY nothing here runs: encap()
 * addressed the frame to the gateway. */
#pragma once

#define FIB_AF_INET 2   /* AF_INET */
#define FIB_AF_INET6 10 /* AF_INET6 */

/* Fills fib from the outer header of `family` at p->l3off of the frame at
 * ctx; -1 if the header is not within the frame. */
static __always_inline int fib_params(struct xdp_md *ctx, const struct pkt *p, __u8 family,
                                      struct bpf_fib_lookup *fib)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 l3off = p->l3off & 0x1f;

    if (family == FAMILY_V4) {
        struct iphdr *o = data + l3off;

        if ((void *)(o + 1) > data_end)
            return -1;
        fib->family = FIB_AF_INET;
        fib->tos = o->tos;
        fib->l4_protocol = o->protocol;
        fib->tot_len = bpf_ntohs(o->tot_len);
        fib->ipv4_src = o->saddr;
        fib->ipv4_dst = o->daddr;
    } else {
        struct ipv6hdr *o = data + l3off;

        if ((void *)(o + 1) > data_end)
            return -1;
        fib->family = FIB_AF_INET6;
        fib->flowinfo = *(__be32 *)o & bpf_htonl(0x0FFFFFFF); /* traffic class and flow label */
        fib->l4_protocol = o->nexthdr;
        fib->tot_len = bpf_ntohs(o->payload_len) + sizeof(*o);
        __builtin_memcpy(fib->ipv6_src, &o->saddr, 16);
        __builtin_memcpy(fib->ipv6_dst, &o->daddr, 16);
    }
    fib->ifindex = ctx->ingress_ifindex;
    return 0;
}
