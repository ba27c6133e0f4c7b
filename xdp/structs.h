/* structs.h - the layout of every map key and value. User space takes these
 * layouts from the compiled program (bcc's Key/Leaf types), so this file is
 * their only definition. Addresses and ports are in network byte order; every
 * struct has explicit padding and no bitfields, since user space writes them. */
#pragma once

/* Key of the VIP map. Unused address words are 0. */
struct vip_key {
    __be32 addr[4];   /* IPv4 in addr[0] */
    __be16 port;      /* L4 port; 0: the VIP takes every port */
    __u8 proto;       /* PROTO_TCP or PROTO_UDP */
    __u8 family;      /* FAMILY_V4 or FAMILY_V6 */
};

/* Everything a packet needs about its VIP, in one lookup. */
struct vip_meta {
    __u32 vip_id;     /* index into vip_stats; rings hold copies 2*id and 2*id+1 */
    __u32 flags;      /* VIP_F_* */
    __u32 ring;       /* active ring copy, 0 or 1: user space writes the idle copy, then flips this */
    __u32 pad;
};

/* An address that carries at least one VIP (ICMP echo, fragments, errors). */
struct addr_key {
    __be32 addr[4];
    __u32 family;
};

/* One Maglev lookup table: a backend index per slot; 0 is "no backend". */
struct ring {
    __u32 slot[RING_SIZE];
};

/* Entry of the shared backend array; index 0 is never a backend. One address
 * has one index whatever the number of VIPs that list it, so the entry also
 * says which VIPs list it: a backend removed from one VIP but kept by another
 * stays valid, yet the first VIP's connection-table entries must re-pick. */
#define VIP_MASK_WORDS ((MAX_VIPS + 63) / 64)
struct backend {
    __be32 addr[4];
    __u32 generation; /* changes whenever the index is given to another backend */
    __u8 family;
    __u8 flags;       /* BACKEND_F_VALID while the slot holds a live backend */
    __u16 pad;
    __u64 vips[VIP_MASK_WORDS]; /* bit vip_id set while that VIP lists this backend */
};

/* An IPv4 flow as the connection table keeps it (16 bytes: IPv4 flows, the
 * most, compare in four words where flow_key takes ten). proto 0: an empty way. */
struct flow4_key {
    __be32 src;
    __be32 dst;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 pad[3];
};

/* A flow as the LB sees it: client -> VIP. The connection table keeps IPv6
 * flows in this form. */
struct flow_key {
    __be32 src[4];
    __be32 dst[4];
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 family;
    __u16 pad;
};

/* Connection-table value: everything an established packet needs, so that
 * it costs one bucket read and a few array reads. `seq` guards the entry and
 * its key against readers on other CPUs (xdp/conntrack.h): even while they
 * are stable, odd while one CPU rewrites them; seq and hash share the 64-bit
 * word that a writer claims with one compare-and-swap. backend 0: no entry
 * (a way whose flow was deleted by user space keeps its key). */
struct ct_entry {
    __u32 backend;     /* index into backends; 0: no entry */
    __u32 generation;  /* the backend's generation when the entry was made */
    __u16 vip_id;      /* the VIP that picked the backend */
    __u16 flags;       /* none yet: 0 */
    __u32 vip_gen;     /* vip_info[vip_id].generation when the entry was made */
    __u32 seq;         /* even: stable; odd: being written (8-byte aligned, with hash) */
    __u32 hash;        /* the flow hash (outer source, flow label) */
    __u64 last_seen;   /* ns (coarse monotonic clock): UDP expiry, and which way to replace;
                        * a TCP entry's is written at most once per CT_REFRESH_NS */
};

/* One way of the connection table: a flow and its entry (IPv4: 48 bytes, so
 * that a hit in a bucket's first way, the most common, reads one line). */
struct ct_way4 {
    struct flow4_key key;
    struct ct_entry e;
};

struct ct_way6 {
    struct flow_key key;
    struct ct_entry e;
};

/* Which slots of a SYN table may hold an entry: a byte per slot, 1 while it
 * does (xdp/conntrack.h), so that a packet reads its slot only then. */
struct ct_syn_used {
    __u8 used[MAP_CT_SYN_ENTRIES];
};

/* One bucket of the connection table: CT_WAYS ways, filled in order. */
struct ct_bucket4 {
    struct ct_way4 way[CT_WAYS];
};

struct ct_bucket6 {
    struct ct_way6 way[CT_WAYS];
};

/* What a connection-table hit needs to know about its VIP, by vip_id. */
struct vip_info {
    __u32 generation; /* changes when the VIP is deleted or its id given to another */
    __u32 flags;      /* VIP_F_*, as in vip_meta */
};

/* A bitmap over hashed destination addresses: a clear bit proves that no VIP
 * lives on the address, so traffic for the LB itself passes after one array
 * read. A set bit may be a collision; the VIP lookup decides. */
struct vip_filter {
    __u64 bits[VIP_FILTER_WORDS];
};

/* Runtime configuration, one entry, written by user space. */
struct lb_config {
    __u8 gw_mac[6];      /* destination MAC of every encapsulated packet (NEXT_HOP_GATEWAY) */
    __u8 configured;     /* 0 until user space wrote this entry: everything passes */
    __u8 next_hop;       /* NEXT_HOP_GATEWAY: to gw_mac, XDP_TX; NEXT_HOP_FIB: the kernel's FIB
                          * picks the next hop and the interface (xdp/nexthop.h) */
    __be32 src4;         /* outer IPv4 source prefix */
    __be32 src4_hostmask;/* bits of src4 taken from the flow hash; 0: one fixed source */
    __be32 src6[4];      /* outer IPv6 source prefix */
    __be32 src6_hostmask;/* applied to src6[3] */
    __u32 mtu;           /* largest outer packet (IP header and payload) the path carries */
    __u32 new_flow_rate; /* connection-table inserts per CPU per second; 0: no limit */
    __u32 icmp_rate;     /* generated ICMP messages per CPU per second */
    __u32 portless_vips; /* number of port-0 VIPs; 0 skips the second lookup */
    __u32 capture;       /* 1 while `l4lb capture` runs: packets that capture_cfg selects are
                          * copied to capture_ring; 0 costs one test of this word */
    __u64 udp_timeout_ns;/* a UDP entry older than this re-picks */
    __be16 gue_port;     /* UDP destination port of GUE packets (VIPs with VIP_F_GUE) */
    __u16 pad1;
    __u32 fib_gen;       /* next_hop fib: user space bumps it when a route, rule or neighbour
                          * changes; a fib_hops answer of another generation is asked again */
};

/* A FIB answer kept per CPU and backend (next_hop fib): the next hop of an
 * encapsulated packet depends on its outer destination (the backend) and the
 * ingress interface, so the packets of every flow to a backend share one
 * lookup. Used while gen is lb_config.fib_gen (user space bumps it on every
 * route, rule or neighbour change) and, checked once every FIB_HOP_USES
 * uses (a clock read costs as much as the rest of the hit), before expires. */
struct fib_hop {
    __u8 dmac[6];      /* the next hop's MAC */
    __u8 smac[6];      /* the egress interface's MAC */
    __u32 ingress;     /* the ingress ifindex the answer is for */
    __u32 egress;      /* the egress ifindex */
    __u32 slot;        /* egress's slot in tx_ports (egress != ingress) */
    __u32 gen;         /* lb_config.fib_gen when asked; the entry is empty while expires is 0 */
    __u32 uses;        /* uses left before the clock is read again */
    __u32 pad;
    __u64 expires;     /* coarse-clock ns after which it is asked again */
};

/* Per-VIP counters (per CPU). */
struct vip_stats {
    __u64 packets;
    __u64 bytes;
};

/* New flows per VIP (per CPU): connection-table entries written, and flows
 * served by Maglev alone under the new-flow rate limit. Apart from vip_stats,
 * which every packet touches: this one only moves on a new flow. */
struct vip_flows {
    __u64 new_flows;
};

/* Per-backend counters (per CPU), by backend index: packets sent to the
 * backend and their bytes as received (before encapsulation), and new flows
 * as in vip_flows. User space zeroes an index before giving it to another
 * backend, so a backend never inherits its predecessor's counts. */
struct backend_stats {
    __u64 packets;
    __u64 bytes;
    __u64 new_flows;
};

/* Global counters (per CPU); docs/dataplane.md documents each one. */
struct global_stats {
    __u64 pass;            /* not for a VIP: XDP_PASS */
    __u64 tx;              /* encapsulated and sent (XDP_TX) */
    __u64 ct_hit;          /* connection-table hit that was used */
    __u64 ct_miss;         /* no usable entry (or a SYN): a Maglev pick */
    __u64 ct_stale;        /* entry found but its backend is gone, replaced or the UDP entry expired */
    __u64 ct_insert;       /* entries written */
    __u64 ct_limited;      /* new flows served by Maglev alone (new-flow rate limit) */
    __u64 no_backend;      /* VIP with no backend for the flow: dropped */
    __u64 too_big;         /* ICMP fragmentation-needed / packet-too-big sent */
    __u64 icmp_echo;       /* echo replies sent for VIP addresses */
    __u64 icmp_fwd;        /* ICMP errors about a VIP flow sent to the flow's backend */
    __u64 icmp_limited;    /* ICMP the LB would have sent, dropped by the rate limit */
    __u64 fragment;        /* IPv4 fragments to a VIP address: dropped */
    __u64 ext_header;      /* IPv6 extension headers to a VIP address: dropped */
    __u64 malformed;       /* truncated or inconsistent headers: dropped */
    __u64 error;           /* a helper failed (e.g. no headroom): dropped */
    __u64 fib_no_neigh;    /* next_hop fib: route found, neighbour not resolved: passed to the stack */
    __u64 fib_drop;        /* next_hop fib: no usable route, or egress on an interface l4lb is not on */
    __u64 redirect;        /* next_hop fib: sent out of another interface (XDP_REDIRECT); also in tx */
    __u64 fib_lookup;      /* next_hop fib: FIB lookups (the others used a fib_hops answer) */
    __u64 ct_evict;        /* an entry written over another flow's: both its buckets were full */
    __u64 ct_busy;         /* no entry written: another CPU was writing the chosen way */
    __u64 ct_promote;      /* a SYN's entry moved from the SYN table to the connection table */
    __u64 ct_syn_evict;    /* a SYN's entry written over another flow's that had sent nothing since its SYN */
};

/* Per-CPU rate-limit windows. */
struct cpu_state {
    __u64 ct_window;   /* start of the current 1 s window, ns */
    __u64 ct_count;    /* inserts in it */
    __u64 icmp_window;
    __u64 icmp_count;
};

/* Decap program counters (per CPU). */
struct decap_stats {
    __u64 decap4;      /* outer IPv4 removed */
    __u64 decap6;      /* outer IPv6 removed */
    __u64 pass;        /* not a tunnel packet for this host */
    __u64 malformed;   /* truncated tunnel packet: dropped */
    __u64 gue;         /* of decap4 + decap6: GUE packets (outer UDP header removed too) */
};

/* Probe encapsulation counters (per CPU), tc egress on the LB's interface. */
struct probe_stats {
    __u64 encap4;      /* a probe's packet sent in an outer IPv4 header */
    __u64 encap6;      /* a probe's packet sent in an outer IPv6 header */
    __u64 pass;        /* no probe mark: left to the next filter, untouched */
    __u64 no_backend;  /* the mark names an index with no valid backend: dropped */
    __u64 error;       /* not IP, IPv6 to an IPv4 backend, no configuration, or a helper failed: dropped */
    __u64 gue;         /* of encap4 + encap6: sent in GUE (the mark's PROBE_MARK_GUE) */
};

/* What `l4lb capture` selects (one entry, read only while lb_config.capture is set). */
struct capture_cfg {
    __u32 vip;        /* vip_id + 1 of the VIP whose packets to copy; 0: every packet */
    __u32 backend;    /* backend index whose packets to copy; 0: any */
    __u32 verdicts;   /* a bit (1 << XDP_*) per verdict to copy */
    __u32 snaplen;    /* bytes of a frame to copy, 1..CAPTURE_SNAP_MAX */
};

/* Capture counters (per CPU). */
struct capture_stats {
    __u64 copied;     /* copies put in capture_ring */
    __u64 lost;       /* copies dropped: the ring was full (the reader did not keep up) */
};

/* One copy in capture_ring. A forwarded packet gives two: the frame as
 * received (before encapsulation) and as sent, with the same cpu and seq. */
struct capture_rec {
    __u64 ts;         /* bpf_ktime_get_ns() */
    __u32 len;        /* the frame's length */
    __u32 cap_len;    /* bytes copied into data */
    __u32 vip;        /* vip_id + 1; 0: not a VIP packet */
    __u32 backend;    /* backend index; 0: none */
    __u32 seq;        /* this copy's number on its CPU (capture_stats.copied before it); a
                       * sent copy's received copy is seq - 1 on the same CPU */
    __u16 cpu;
    __u8 verdict;     /* XDP_DROP, XDP_PASS or XDP_TX */
    __u8 sent;        /* 0: as received, 1: as sent */
    __u8 data[CAPTURE_SNAP_MAX];
};

/* What the parser learned about one packet. */
struct pkt {
    struct flow_key flow; /* client -> VIP (for ICMP errors: rebuilt from the quoted header) */
    __u32 l3off;          /* 14, or 18 with a VLAN tag */
    __u32 ip_len;         /* bytes of the IP packet, as its header says */
    __u8 tos;             /* IPv4 TOS or IPv6 traffic class */
    __u8 df;              /* IPv4 DF set (IPv6: always 1) */
    __u8 tcp_flags;
    __u8 icmp_error;      /* the packet is an ICMP error about a VIP flow */
    __u32 vip;            /* vip_id + 1 once the VIP is known (capture filters); 0: none */
    __u32 backend;        /* the backend index once chosen; 0: none */
    __u32 rx_len;         /* the frame's length as received (the bytes backend_stats counts) */
    __u8 fib_pending;     /* next_hop fib: encapsulated, the next hop still to ask (balancer()) */
    __u8 outer_family;    /* FAMILY_V4 or FAMILY_V6: the outer header's, once encapsulated */
    __u16 pad;
};
