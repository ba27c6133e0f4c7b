/* maps.h - every map of the balancer, once, with what it holds.
 * Capacities and flags come from the map registry in l4lb/consts.py through
 * cflags() (MAP_<NAME>_ENTRIES, MAP_<NAME>_FLAGS); a test holds this file's
 * types to the registry. With PIN_DIR defined (l4lb run) each map is pinned
 * there, so a restarted control plane adopts the maps that the attached
 * program is using. */
#pragma once

#ifdef PIN_DIR
#define L4LB_MAP(type, k, v, name, max, flags) \
    BPF_TABLE_PINNED7(type, k, v, name, max, PIN_DIR "/" #name, flags)
#define L4LB_RINGBUF_SECTION(name) "maps/ringbuf:" PIN_DIR "/" #name
#define L4LB_DEVMAP_SECTION(name) "maps/devmap:" PIN_DIR "/" #name
#else
#define L4LB_MAP(type, k, v, name, max, flags) BPF_F_TABLE(type, k, v, name, max, flags)
#define L4LB_RINGBUF_SECTION(name) "maps/ringbuf"
#define L4LB_DEVMAP_SECTION(name) "maps/devmap"
#endif

/* A BPF ring buffer of `bytes` whose records are `rec` (bcc's
 * BPF_RINGBUF_OUTPUT, pinned like the others; the record type as its leaf
 * gives user space the layout, as for any other map). */
#define L4LB_RINGBUF(name, rec, bytes)                               \
    struct name##_table_t {                                          \
        int key;                                                     \
        rec leaf;                                                    \
        int (*ringbuf_output)(void *, u64, u64);                     \
        void *(*ringbuf_reserve)(u64);                               \
        void (*ringbuf_discard)(void *, u64);                        \
        void (*ringbuf_submit)(void *, u64);                         \
        u32 max_entries;                                             \
    };                                                               \
    __attribute__((section(L4LB_RINGBUF_SECTION(name))))             \
    struct name##_table_t name = {.max_entries = (bytes)}

/* A devmap of `entries` slots (bcc's BPF_DEVMAP, pinned like the others):
 * slot -> ifindex of an interface that XDP_REDIRECT may send to. */
#define L4LB_DEVMAP(name, entries)                                   \
    struct name##_table_t {                                          \
        __u32 key;                                                   \
        int leaf;                                                    \
        u64 (*redirect_map)(int, int);                               \
        u32 max_entries;                                             \
    };                                                               \
    __attribute__((section(L4LB_DEVMAP_SECTION(name))))              \
    struct name##_table_t name = {.max_entries = (entries)}

/* (address, port, protocol) -> the VIP's id, flags and active ring copy */
L4LB_MAP("hash", struct vip_key, struct vip_meta, vips, MAP_VIPS_ENTRIES, MAP_VIPS_FLAGS);
/* VIP address -> number of VIPs on it (ICMP echo, fragments, ICMP errors) */
L4LB_MAP("hash", struct addr_key, __u32, vip_addrs, MAP_VIP_ADDRS_ENTRIES, MAP_VIP_ADDRS_FLAGS);
/* vip_id -> generation and flags: the generation changes when the VIP is
 * deleted or its id given to another, so the old VIP's entries stop being used */
L4LB_MAP("array", __u32, struct vip_info, vip_info, MAP_VIP_INFO_ENTRIES, MAP_VIP_INFO_FLAGS);
/* index 0 -> bitmap of hashed VIP addresses (see struct vip_filter) */
L4LB_MAP("array", __u32, struct vip_filter, vip_filter, MAP_VIP_FILTER_ENTRIES, MAP_VIP_FILTER_FLAGS);
/* 2 * vip_id + copy -> Maglev ring; a whole ring is one value, written in one syscall */
L4LB_MAP("array", __u32, struct ring, rings, MAP_RINGS_ENTRIES, MAP_RINGS_FLAGS);
/* backend index -> address, family, generation; index 0 stays empty */
L4LB_MAP("array", __u32, struct backend, backends, MAP_BACKENDS_ENTRIES, MAP_BACKENDS_FLAGS);
/* bucket number -> CT_WAYS IPv4 flows and their backends: the connection
 * table, one for all CPUs (veth runs XDP on the sender's CPU, so a flow's
 * packets move between CPUs). An array, so that the verifier inlines the
 * lookup: no helper call to find or to write an entry (xdp/conntrack.h). */
L4LB_MAP("array", __u32, struct ct_bucket4, conntrack, MAP_CONNTRACK_ENTRIES, MAP_CONNTRACK_FLAGS);
/* the same for IPv6 flows */
L4LB_MAP("array", __u32, struct ct_bucket6, conntrack6, MAP_CONNTRACK6_ENTRIES, MAP_CONNTRACK6_FLAGS);
/* flow hash mod slots -> the IPv4 flow whose SYN wrote it last, and its
 * entry, until the flow's next packet moves it into conntrack: a SYN writes
 * here, in cache, not into a bucket of the large table (xdp/conntrack.h) */
L4LB_MAP("array", __u32, struct ct_way4, ct_syn, MAP_CT_SYN_ENTRIES, MAP_CT_SYN_FLAGS);
/* the same for IPv6 flows */
L4LB_MAP("array", __u32, struct ct_way6, ct_syn6, MAP_CT_SYN6_ENTRIES, MAP_CT_SYN6_FLAGS);
/* 0 (IPv4), 1 (IPv6) -> a byte per SYN slot: 1 while the slot may hold an
 * entry, so that established packets read their slot only then */
L4LB_MAP("array", __u32, struct ct_syn_used, ct_syn_used, MAP_CT_SYN_USED_ENTRIES, MAP_CT_SYN_USED_FLAGS);
/* index 0 -> runtime configuration */
L4LB_MAP("array", __u32, struct lb_config, config, MAP_CONFIG_ENTRIES, MAP_CONFIG_FLAGS);
/* vip_id -> packets and bytes, per CPU */
L4LB_MAP("percpu_array", __u32, struct vip_stats, vip_stats, MAP_VIP_STATS_ENTRIES, MAP_VIP_STATS_FLAGS);
/* vip_id -> new flows, per CPU */
L4LB_MAP("percpu_array", __u32, struct vip_flows, vip_flows, MAP_VIP_FLOWS_ENTRIES, MAP_VIP_FLOWS_FLAGS);
/* backend index -> packets, bytes, new flows, per CPU */
L4LB_MAP("percpu_array", __u32, struct backend_stats, backend_stats, MAP_BACKEND_STATS_ENTRIES, MAP_BACKEND_STATS_FLAGS);
/* index 0 -> global counters, per CPU */
L4LB_MAP("percpu_array", __u32, struct global_stats, global_stats, MAP_GLOBAL_STATS_ENTRIES, MAP_GLOBAL_STATS_FLAGS);
/* index 0 -> rate-limit windows, per CPU */
L4LB_MAP("percpu_array", __u32, struct cpu_state, cpu_state, MAP_CPU_STATE_ENTRIES, MAP_CPU_STATE_FLAGS);
/* index 0 -> what `l4lb capture` selects */
L4LB_MAP("array", __u32, struct capture_cfg, capture_cfg, MAP_CAPTURE_CFG_ENTRIES, MAP_CAPTURE_CFG_FLAGS);
/* index 0 -> copies made and lost, per CPU */
L4LB_MAP("percpu_array", __u32, struct capture_stats, capture_stats, MAP_CAPTURE_STATS_ENTRIES, MAP_CAPTURE_STATS_FLAGS);
/* the copies (struct capture_rec), read by `l4lb run` while a capture runs */
L4LB_RINGBUF(capture_ring, struct capture_rec, MAP_CAPTURE_RING_ENTRIES);
/* slot -> ifindex of each interface the program is attached to (next_hop fib: XDP_REDIRECT) */
L4LB_DEVMAP(tx_ports, MAP_TX_PORTS_ENTRIES);
/* backend index -> the FIB's answer for it, per CPU (next_hop fib) */
L4LB_MAP("percpu_array", __u32, struct fib_hop, fib_hops, MAP_FIB_HOPS_ENTRIES, MAP_FIB_HOPS_FLAGS);
/* ifindex -> its slot in tx_ports; an interface not listed is never sent to */
L4LB_MAP("hash", __u32, __u32, tx_port_slots, MAP_TX_PORT_SLOTS_ENTRIES, MAP_TX_PORT_SLOTS_FLAGS);
