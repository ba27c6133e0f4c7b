/* baseline_drop.c - the cheapest XDP program there is: every packet is
 * dropped untouched. Tail-called by the harness, it measures the harness
 * itself; run directly, it is the "plain XDP_DROP program" of the targets. */
#include <uapi/linux/bpf.h>

int drop(struct xdp_md *ctx)
{
    return XDP_DROP;
}
