/* consts.h - protocol numbers and verdict helpers. The limits, flags, seeds
 * and map sizes are passed in with -D by l4lb/consts.py's cflags(), their one
 * home; compiling without them is an error rather than a silent default. */
#pragma once

#if !defined(RING_SIZE) || !defined(VIP_FILTER_MULT) || !defined(MAP_VIPS_ENTRIES)
#error "the limits, flags and map sizes come from l4lb/consts.py: compile through l4lb.bpf (cflags())"
#endif
#define VIP_FILTER_WORDS ((1u << VIP_FILTER_BITS_LOG2) / 64)

/* A helper returns an XDP verdict to stop, or FURTHER_PROCESSING to go on. */
#define FURTHER_PROCESSING -1

#define ETH_P_IP_BE 0x0008     /* htons(ETH_P_IP) on little-endian */
#define ETH_P_IPV6_BE 0xDD86   /* htons(ETH_P_IPV6) */
#define ETH_P_8021Q_BE 0x0081  /* htons(ETH_P_8021Q) */
#define ETH_P_8021AD_BE 0xA888 /* htons(ETH_P_8021AD) */

#define PROTO_ICMP 1
#define PROTO_IPIP 4
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_IPV6 41
#define PROTO_ICMPV6 58

#define IP_DF_BE 0x0040         /* htons(0x4000) */
#define IP_FRAG_MASK_BE 0xFF3F  /* htons(0x3fff): MF flag or a fragment offset */

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

#define OUTER_TTL 64
#define ONE_SECOND_NS 1000000000ull
#define IPV6_MIN_MTU 1280
