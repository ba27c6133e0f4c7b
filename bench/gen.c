/* gen.c - the traffic generator for bench/traffic.py: run with
 * BPF_PROG_TEST_RUN in live-frames mode on an interface, every run's frame
 * leaves that interface (XDP_TX). The frame is written whole on every run:
 * the kernel hands out recycled pages that still hold what the receiver (the
 * LB, which encapsulates in place) made of them. Each run moves the TCP
 * source port along a cycle of FLOWS flows: many flows, each seen again and
 * again. Built with NEW_FLOWS instead, every run is a flow never seen
 * before (a stream of new connections when the frame is a SYN): the source
 * port takes the run number's low 16 bits and the last byte of the source
 * address (198.18.0.1-250) the next ones, 16 million flows before one comes
 * back; the IP checksum follows the address (RFC 1624). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#define FRAME_LEN 64

struct frame {
    __u64 w[FRAME_LEN / 8];
};

BPF_ARRAY(gen_frame, struct frame, 1);
BPF_PERCPU_ARRAY(gen_count, __u64, 1);

int gen(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct frame *out = data;
    struct tcphdr *tcp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
    __u32 zero = 0;
    struct frame *f = gen_frame.lookup(&zero);
    __u64 *n = gen_count.lookup(&zero);

    if ((void *)(out + 1) > data_end || (void *)(tcp + 1) > data_end || !f || !n)
        return XDP_ABORTED;
#pragma unroll
    for (int i = 0; i < FRAME_LEN / 8; i++)
        out->w[i] = f->w[i];
    /* the TCP checksum is left as it is: XDP forwards without checking it */
#ifdef NEW_FLOWS
    {
        struct iphdr *ip = data + sizeof(struct ethhdr);
        __u16 old = bpf_ntohs(((__be16 *)&ip->saddr)[1]);
        __u16 new = (old & 0xff00) | (1 + ((*n >> 16) % 250));
        __u32 sum = (__u16)~bpf_ntohs(ip->check) + (__u16)~old + new;

        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        ((__be16 *)&ip->saddr)[1] = bpf_htons(new);
        ip->check = bpf_htons(~sum);
        tcp->source = bpf_htons(*n & 0xffff);
    }
#else
    tcp->source = bpf_htons(10000 + (*n % FLOWS));
#endif
    *n += 1;
    return XDP_TX;
}
