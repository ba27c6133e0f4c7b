/* harness.c - makes BPF_PROG_TEST_RUN's `repeat` time the same packet on
 * every run.
 *
 * With repeat > 1 the kernel runs the program again on whatever the previous
 * run left in the buffer: an encapsulating program sees its own output from
 * the second run on. This program runs first on every run and puts the
 * original frame back:
 *   1. move the head back to the original offset: bpf_xdp_adjust_head by the
 *      difference between the current and the original length (called on
 *      every run, by 0 when nothing moved, so that the harness costs the
 *      same whatever the previous run did);
 *   2. rewrite the first COPY_MAX bytes (or the whole frame if shorter) from
 *      the stored copy: the programs measured here only change headers;
 *   3. optionally give the flow a new identity (TCP/UDP source port, then a
 *      16-bit word of the source address), so that every run is a new flow,
 *      with the checksums updated; the flow numbers may cycle through a fixed set
 *      of flows (`wrap`), so that every run hits another of a resident population,
 *      `stride` apart: a stride coprime with `wrap` visits every flow once per
 *      cycle, and a large one visits them in an order unrelated to the order
 *      they were made in (real traffic does not visit flows in the order the
 *      table allocated their entries);
 * and then tail-calls the program under test (slot 0 of `target`).
 * Programs that move the tail (bpf_xdp_adjust_tail) or change bytes past
 * COPY_MAX are out of its reach; the benchmark's checks (the head moves
 * counted here, the last run's output against a direct run) would catch it.
 *
 * A tail call never returns, so the harness cannot see the verdict: the
 * benchmark proves the path with the counters of the program under test and
 * with the harness's own counters below. Its cost is measured in the same
 * run by tail-calling a plain XDP_DROP program, and subtracted. */
#include <uapi/linux/bpf.h>

#ifndef COPY_MAX
#define COPY_MAX 128
#endif

/* One per CPU; user space writes the same frame into every CPU's copy. */
struct harness_state {
    __u32 len;          /* length of the original frame */
    __u32 copy_len;     /* bytes of it kept in `bytes`: min(len, COPY_MAX), >= 8 */
    __u16 sport_off;    /* offset of the L4 source port; 0: the flow never changes */
    __u16 addr_off;     /* offset of the source address's last 16-bit word; 0: none */
    __u16 ipcsum_off;   /* offset of the IPv4 header checksum; 0: none (IPv6) */
    __u16 l4csum_off;   /* offset of the TCP/UDP checksum; 0: none */
    __u32 flow;         /* the next run's flow number: sport += low 16 bits, address += high 16 */
    __u32 wrap;         /* flow numbers stay in 0 .. wrap-1 (flows that stay resident); 0: any u32 */
    __u32 stride;       /* added to the flow number after each run (modulo wrap); < wrap when set */
    __u32 pad;
    __u64 runs;         /* runs through the harness */
    __u64 moved;        /* runs that found the head moved by the previous run and moved it back */
    __s64 moved_bytes;  /* the sum of those moves: 20 per run after a 4in4 encapsulation */
    __u64 failed;       /* restore impossible (should stay 0): XDP_ABORTED */
    __u8 bytes[COPY_MAX + 8]; /* the frame's first copy_len bytes; 8 spare so reads stay in bounds */
};

BPF_PERCPU_ARRAY(harness_state, struct harness_state, 1);
BPF_PROG_ARRAY(target, 1);

/* RFC 1624: checksum after a 16-bit word it covers changed from old to new. */
static __always_inline __u16 csum_update(__u16 check, __u16 old, __u16 new)
{
    __u32 sum = (__u16)~check + (__u16)~old + (__u32)new;

    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* Adds `by` to the big-endian 16-bit word at off and fixes both checksums. */
static __always_inline int bump16(void *data, void *data_end, __u32 off, __u16 by,
                                  __u32 ipcsum_off, __u32 l4csum_off, int in_ip_header)
{
    __u16 *w, *c, old, new;

    off &= 0x7f;
    w = data + off;
    if ((void *)(w + 1) > data_end)
        return -1;
    old = *w;
    new = bpf_htons(bpf_ntohs(old) + by);
    *w = new;
    if (in_ip_header && ipcsum_off) {
        c = data + (ipcsum_off & 0x7f);
        if ((void *)(c + 1) > data_end)
            return -1;
        *c = csum_update(*c, old, new);
    }
    if (l4csum_off) {
        c = data + (l4csum_off & 0x7f);
        if ((void *)(c + 1) > data_end)
            return -1;
        *c = csum_update(*c, old, new);
    }
    return 0;
}

int harness(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct harness_state *s = harness_state.lookup(&zero);
    void *data, *data_end;
    __u32 n, off;
    int delta;

    if (!s)
        return XDP_ABORTED;
    delta = (int)(ctx->data_end - ctx->data) - (int)s->len;
    if (bpf_xdp_adjust_head(ctx, delta)) {
        s->failed++;
        return XDP_ABORTED;
    }
    s->runs++;
    if (delta) {
        s->moved++;
        s->moved_bytes += delta;
    }
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;

    /* the stored bytes, 8 at a time, then the last 8 again (overlapping) */
    n = s->copy_len;
#pragma unroll
    for (int i = 0; i < COPY_MAX / 8; i++) {
        if ((i + 1) * 8 > n)
            break;
        if (data + (i + 1) * 8 > data_end)
            goto bad;
        ((__u64 *)data)[i] = ((__u64 *)s->bytes)[i];
    }
    if (n & 7) {
        off = (n - 8) & 0x7f; /* n is 8..128: the mask changes nothing but bounds it for the verifier */
        if (data + off + 8 > data_end)
            goto bad;
        *(__u64 *)(data + off) = *(__u64 *)(s->bytes + off);
    }

    if (s->sport_off) {
        __u32 flow = s->flow;

        s->flow = flow + s->stride;
        if (s->wrap && s->flow >= s->wrap)
            s->flow -= s->wrap;

        if (bump16(data, data_end, s->sport_off, flow & 0xffff, 0, s->l4csum_off, 0))
            goto bad;
        if (s->addr_off && bump16(data, data_end, s->addr_off, flow >> 16, s->ipcsum_off,
                                  s->l4csum_off, 1))
            goto bad;
    }

    target.call(ctx, 0);
    /* only reached if slot 0 is empty */
bad:
    s->failed++;
    return XDP_ABORTED;
}
