/* sink.c - counts and drops what comes back to the generator's interface, so
 * the traffic rate measures the LB (or the reflector), not the stack behind. */
#include <uapi/linux/bpf.h>

BPF_PERCPU_ARRAY(sink_count, __u64, 1);

int sink(struct xdp_md *ctx)
{
    __u32 zero = 0;
    __u64 *n = sink_count.lookup(&zero);

    if (n)
        *n += 1;
    return XDP_DROP;
}
