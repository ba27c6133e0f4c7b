/* ringmap.c - no program, one map: a plain array of SLOTS u32 entries, the
 * size of a Maglev ring. bench.controlplane writes a ring into it one slot
 * per syscall, and batched, beside writing the balancer's ring as one value. */
#include <uapi/linux/bpf.h>

BPF_ARRAY(slots, u32, SLOTS);
